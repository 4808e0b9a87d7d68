"""End to end: the real `dvc repro` on tiny synthetic data, in a temporary copy of the repo
(conftest's `e2e_build`, built once per session; `e2e_project` is this worker's copy)."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, copy_e2e, sh


def stage_runs(env):
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    return client.search_runs([client.get_experiment_by_name("bnnprune").experiment_id])


def test_repro_writes_every_declared_output_and_tracks_each_stage(e2e_project):
    root, env = e2e_project
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    stages = set(sh(["dvc", "stage", "list", "--name-only"], root, env).stdout.split())
    for name, stage in lock["stages"].items():
        for out in stage.get("outs", []) if name in stages else []:
            assert (root / out["path"]).exists(), out["path"]
    train = json.loads((root / "reports/metrics/train.json").read_text())
    assert 0.0 <= train["test_acc"] <= 1.0 and train["flip_observations"] > 0
    # the pruned network really is smaller, and that is what the later stages measured
    prune = json.loads((root / "reports/metrics/prune.json").read_text())
    assert prune["total"]["bops_reduction_pct"] > 0
    summary = json.loads((root / "reports/summary.json").read_text())
    assert summary["reduction"]["bops_pct"] == pytest.approx(prune["total"]["bops_reduction_pct"])
    runs = stage_runs(env)
    tracked = {r.data.tags["stage"] for r in runs if r.info.status == "FINISHED"}
    assert {"study@flip-0.3-0", "study@flip_random-0.3-1", "study_summary"} <= stages
    assert stages <= tracked  # every stage has a run, validate included
    train_run = next(r for r in runs if r.data.tags["stage"] == "train")
    assert train_run.data.params["train.epochs"] == "2"
    assert train_run.data.metrics["test_acc"] == pytest.approx(train["test_acc"])


def test_second_repro_is_a_no_op(e2e_project):
    """Every stage is skipped, not just some: no stage runs and DVC sees nothing changed."""
    root, env = e2e_project
    out = sh(["dvc", "repro"], root, env).stdout
    assert "Running stage" not in out, out
    assert json.loads(sh(["dvc", "status", "--json"], root, env).stdout) == {}


def test_outputs_name_no_folder_of_the_machine(e2e_project, e2e_build):
    """What the pipeline writes (ONNX models, data card, reports, plot data) and what its
    finished MLflow runs record (params, tags, dataset inputs) name paths relative to the
    project: not the folder it ran in (the build's; this is a copy of it), nor this checkout's
    or the environment's."""
    root, env = e2e_project
    folders = [str(p) for p in (e2e_build.parent, root.parent, REPO, Path(sys.prefix))]
    files = [root / "data/prepared/card.json", *root.glob("models/*.onnx"),
             *(p for ext in ("json", "csv", "md") for p in root.glob(f"reports/**/*.{ext}"))]
    assert len([p for p in files if p.suffix == ".onnx"]) == 2
    assert not [(p, f) for p in files for f in folders if f.encode() in p.read_bytes()]
    runs = [r for r in stage_runs(env) if r.info.status == "FINISHED"]
    records = [(r.data.tags.get("stage"), value) for r in runs
               for value in (*r.data.params.values(), *r.data.tags.values(),
                             *(d.dataset.source for d in r.inputs.dataset_inputs))]
    assert not [(stage, v) for stage, v in records for f in folders if f in v]


def test_exp_run_with_override_shows_in_exp_show(e2e_build, tmp_path):
    """`dvc exp run -S` in the workspace (the README's first example), up to the stage the
    override invalidates: the override reaches the stage, DVC records the experiment, and the
    stage's MLflow run is tagged with the experiment's name. Changes the workspace: in a copy
    of its own."""
    root, env = copy_e2e(e2e_build, tmp_path / "repo")
    out = sh(["dvc", "exp", "run", "-n", "one-epoch", "-S", "train.epochs=1", "train"],
             root, env).stdout
    assert "Running stage 'train'" in out and "Running stage 'prepare'" not in out
    table = json.loads(sh(["dvc", "exp", "show", "--json"], root, env).stdout)
    revs = [rev for row in table for exp in row.get("experiments") or [] for rev in exp["revs"]]
    one_epoch = next(rev for rev in revs if rev["name"] == "one-epoch")
    assert one_epoch["data"]["params"]["params.yaml"]["data"]["train"]["epochs"] == 1
    runs = [r for r in stage_runs(env) if r.data.tags.get("dvc_exp_name") == "one-epoch"]
    # the edit re-validates params.yaml, then re-runs train; both runs carry the experiment
    assert sorted(r.data.tags["stage"] for r in runs) == ["train", "validate"]
    train_run = next(r for r in runs if r.data.tags["stage"] == "train")
    assert train_run.info.status == "FINISHED" and train_run.data.params["train.epochs"] == "1"


def test_every_stage_imports_the_library_of_its_own_checkout(e2e_project):
    """A queued or --temp experiment runs the stages in a copy of the repo: they must import
    that copy's src/ (the code its dvc.lock records), not the editable install's."""
    root, env = e2e_project
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        cmd = (stage.get("do") or stage)["cmd"]
        prefix = cmd[:cmd.index("python stages/")]
        probe = f"{prefix}python -c 'import bnnprune; print(bnnprune.__file__)'"
        where = sh(["sh", "-c", probe], root, env).stdout.strip()
        assert where.startswith(str(root / "src")), (name, where)
