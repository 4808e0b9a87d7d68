"""Residual and users' models through the pipeline's stage scripts: train (with flips), prune
(coupled groups from the graph), finetune, on tiny synthetic data."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from bnnprune.models import ModelError, build_model, load_checkpoint, model_config
from bnnprune.pipeline.config import ConfigError, parse_params

from conftest import copy_project, sh

USER = "usermodels.tiny_bireal:build"
TESTS = Path(__file__).resolve().parent


def run_stages(root: Path, env: dict, *stages: str) -> None:
    for stage in stages:
        sh([sys.executable, f"stages/{stage}.py"], root, {**env, "PYTHONPATH": "src"})


@pytest.mark.parametrize("model", [
    {"arch": "birealnet", "width": 0.5},
    {"arch": USER, "kwargs": {"width": 16}, "binary": ["usermodels.tiny_bireal:MyBinaryConv"]},
], ids=["birealnet", "user-factory"])
def test_train_prune_finetune_stages_run_a_residual_model(tmp_path, model):
    root, env = copy_project(tmp_path / "repo", model=model,
                             prune={"tau": 0, "min_channels": 4, "round_to": 4})
    env["PYTHONPATH"] = f"src{os.pathsep}{TESTS}"
    for stage in ("validate", "prepare", "train", "prune", "finetune"):
        sh([sys.executable, f"stages/{stage}.py"], root, env)
    prune = json.loads((root / "reports/metrics/prune.json").read_text())
    assert prune["total"]["bops_after"] < prune["total"]["bops_before"]
    for group in prune["layers"].values():
        after = group["channels_after"]
        assert after % 4 == 0 or after == group["channels_before"]
    sys.path.insert(0, str(TESTS))
    try:
        pruned, _ = load_checkpoint(root / "models/finetuned.pt")
        baseline, _ = load_checkpoint(root / "models/baseline.pt")
    finally:
        sys.path.remove(str(TESTS))
    assert sum(p.numel() for p in pruned.parameters()) < sum(
        p.numel() for p in baseline.parameters())
    assert pruned(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_a_user_model_with_bad_settings_gets_clear_errors():
    with pytest.raises(ModelError, match="cannot be imported"):
        build_model(model_config("nosuchpkg.mod:build", 1.0, [1, 8, 8], 10))
    with pytest.raises(ModelError, match="not callable"):
        build_model(model_config("bnnprune.models.birealnet:STAGE_CHANNELS", 1.0, [1, 8, 8], 10))
    sys.path.insert(0, str(TESTS))
    try:
        with pytest.raises(ValueError, match="no binary layer found"):
            build_model(model_config(USER, 1.0, [1, 8, 8], 10))  # MyBinaryConv not declared
    finally:
        sys.path.remove(str(TESTS))
    with pytest.raises(ConfigError, match="model.arch: 'resnet' is not allowed"):
        parse_params({"model": {"arch": "resnet"}})
    with pytest.raises(ConfigError, match="model.binary: 'MyConv' is not allowed"):
        parse_params({"model": {"arch": USER, "binary": ["MyConv"]}})


def test_validate_refuses_scratch_for_a_user_model():
    for study in ({"methods": ["flip", "scratch"]}, {"scratch_budgets": [0.5]}):
        with pytest.raises(ConfigError, match=r"'scratch' on model.arch 'usermodels.tiny_bireal:"
                                              r"build'.*allowed: scratch on the built-in"):
            parse_params({"model": {"arch": USER}, "study": study})
    parse_params({"model": {"arch": "birealnet"}, "study": {"scratch_budgets": [0.5]}})
