"""Users' models: clear errors for bad settings (the whole pipeline on birealnet and a user's
model is in test_any_model_outputs)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bnnprune.models import ModelError, build_model, model_config
from bnnprune.pipeline.config import ConfigError, parse_params

from conftest import copy_project, sh

USER = "usermodels.tiny_bireal:build"
TESTS = Path(__file__).resolve().parent


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


def test_a_bad_user_model_stops_validate_with_one_clear_line(tmp_path):
    root, env = copy_project(tmp_path / "repo", model={"arch": "nosuchpkg.mod:build"})
    proc = sh([sys.executable, "stages/validate.py"], root, {**env, "PYTHONPATH": "src"},
              check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: model.arch: 'nosuchpkg.mod:build': module 'nosuchpkg.mod' cannot be imported "
        "(ModuleNotFoundError: No module named 'nosuchpkg'); allowed: a package the stages "
        "import: under src/ (dvc.yaml runs them with PYTHONPATH=src) or installed in the "
        "environment")
    assert "Traceback" not in proc.stderr
