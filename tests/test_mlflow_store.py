"""What an MLflow user sees after the tiny pipeline (conftest's shared e2e_project): curves
monotone in step, each run's params its own, one naming rule for every metric, failed runs
carrying their error, each ONNX model logged once with real test images as its example, and the
runs table as the UI shows it: a model-training experiment, the summary run named after its
configuration with the prepared dataset as input and the pruned model as output, a run for
every stage."""

import shutil

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from bnnprune.core.files import load_json
from bnnprune.pipeline import tracking
from bnnprune.pipeline.data import load_prepared
from bnnprune.pipeline.export import EXAMPLE_IMAGES, ONNX_MODEL_NAMES, pixels


@pytest.fixture(scope="module")
def store(e2e_project):
    root, env = e2e_project
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("bnnprune").experiment_id
    return root, client, experiment, client.search_runs([experiment], max_results=1000)


def by_stage(runs, stage):
    return [r for r in runs if r.data.tags.get("stage") == stage]


def test_per_epoch_metrics_are_monotone_in_step(store):
    """No final value at step 0 after a curve at steps 1..N (it drew the curve backwards)."""
    _, client, _, runs = store
    curves = 0
    for run in runs:
        for name in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, name)
            steps = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
            if max(steps) > 0:
                curves += 1
                assert 0 not in steps and steps == sorted(steps), (run.data.tags["stage"], name)
    assert curves >= 5  # train, finetune and the study cells log per-epoch curves
    train = by_stage(runs, "train")[0]
    assert {"val_acc", "final/val_acc", "test_acc"} <= set(train.data.metrics)


def test_each_run_records_the_params_it_ran_with(store):
    root, _, _, runs = store
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["prune"]["tau"] == 0  # the e2e project's override
    for stage in ("prune", "finetune"):
        run = by_stage(runs, stage)[0].data.params
        assert run["prune.criterion"] == params["prune"]["criterion"], stage
        assert float(run["prune.tau"]) == 0, stage
        assert float(run["prune.target_bop_reduction"]) == params["prune"]["target_bop_reduction"]
    for stage in ("validate", "prepare"):  # the e2e project reads no data.root
        assert by_stage(runs, stage)[0].data.params["data.root"] == "null"  # not "None"
    cells = [r for r in runs if "study.method" in r.data.tags]
    assert len(cells) == 4
    for cell in cells:  # a cell selects channels by its method, not by prune.criterion
        assert cell.data.params["study.method"] == cell.data.tags["study.method"]
        assert "prune.criterion" not in cell.data.params
    assert not [(r.data.tags.get("stage"), k) for r in runs
                for k, v in r.data.params.items() if v == "None"]


def test_every_metric_name_follows_the_naming_rule(store):
    _, _, _, runs = store
    bad = [(r.data.tags.get("stage"), name) for r in runs for name in r.data.metrics
           if not tracking.METRIC_NAME.fullmatch(name)]
    assert not bad
    summary = next(r for r in runs if r.data.tags.get("bnnprune.summary") == "true")
    assert {"test_acc", "acc_drop_pt", "bops_reduction_pct"} <= set(summary.data.metrics)
    assert any(n.startswith("speedup_cpu_b") for n in summary.data.metrics)


def test_failed_runs_carry_their_error(store, tmp_path, monkeypatch):
    """Every FAILED run has an `error` tag; one is produced here (a stage that raises), in a
    copy of the store (the shared one is left to the other tests as the pipeline wrote it)."""
    root, _, _, _ = store
    shutil.copy2(root.parent / "tracking.db", tmp_path / "tracking.db")
    client = MlflowClient(f"sqlite:///{tmp_path / 'tracking.db'}")
    experiment = client.get_experiment_by_name("bnnprune").experiment_id
    monkeypatch.chdir(tmp_path)  # stage_run's state file
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    with pytest.raises(RuntimeError):
        with tracking.stage_run("prepare", {}, "failing"):
            raise RuntimeError("dataset folder is empty")
    failed = client.search_runs([experiment], "attributes.status = 'FAILED'")
    assert failed
    for run in failed:
        assert run.data.tags.get("error"), run.data.tags.get("stage")
    assert any(r.data.tags["error"] == "RuntimeError: dataset folder is empty" for r in failed)


def test_onnx_models_are_logged_once_with_real_test_images(store):
    root, client, experiment, runs = store
    export = by_stage(runs, "export")[0]
    models = mlflow.search_logged_models([experiment], output_format="list")
    names = sorted(m.name for m in models)
    assert names == sorted(ONNX_MODEL_NAMES.values())  # the report stage registers, not logs
    assert all(m.source_run_id == export.info.run_id for m in models)
    mlflow.set_tracking_uri(client.tracking_uri)
    pruned = next(m for m in models if m.name == ONNX_MODEL_NAMES["pruned"])
    example = mlflow.models.Model.load(pruned.model_uri).load_input_example()
    test = load_prepared(root / "data/prepared")[0]["test"]
    np.testing.assert_array_equal(example["images"],
                                  pixels(test.images[:EXAMPLE_IMAGES]).numpy())


def test_experiment_opens_as_a_model_training_experiment(store):
    _, client, experiment, _ = store
    tags = client.get_experiment(experiment).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_summary_run_is_named_after_its_configuration(store):
    root, _, _, runs = store
    params = yaml.safe_load((root / "params.yaml").read_text())
    [summary] = [r for r in runs if r.data.tags.get("bnnprune.summary") == "true"]
    assert summary.info.run_name == f"cnn/synthetic/{params['prune']['criterion']}/tau0"


def test_train_and_summary_runs_have_the_prepared_dataset_as_input(store):
    root, _, _, runs = store
    card = load_json(root / "data/prepared/card.json")
    summary = next(r for r in runs if r.data.tags.get("bnnprune.summary") == "true")
    for run in (by_stage(runs, "train")[0], summary):
        [dataset] = run.inputs.dataset_inputs
        assert dataset.dataset.name == "synthetic"
        assert dataset.dataset.digest == tracking.dataset_digest(card)
        assert dataset.dataset.source == '{"uri": "data/prepared"}'  # not the folder it ran in
    # another split of the same sources is another dataset
    assert tracking.dataset_digest({**card, "seed": card["seed"] + 1}) != \
        tracking.dataset_digest(card)


def test_summary_run_has_the_pruned_onnx_model_as_output(store):
    _, client, experiment, runs = store
    summary = next(r for r in runs if r.data.tags.get("bnnprune.summary") == "true")
    pruned = client.search_logged_models(
        [experiment], filter_string=f"name = '{ONNX_MODEL_NAMES['pruned']}'")
    assert [m.model_id for m in summary.outputs.model_outputs] == [pruned[0].model_id]
    assert pruned[0].source_run_id == by_stage(runs, "export")[0].info.run_id


def test_every_stage_has_a_finished_run_validate_included(store):
    _, _, _, runs = store
    finished = {r.data.tags.get("stage") for r in runs if r.info.status == "FINISHED"}
    assert {"validate", "prepare", "train", "prune", "finetune", "export", "benchmark",
            "report"} <= finished
