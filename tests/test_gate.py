"""Regression gate: `bnnprune check` against thresholds read from the params file."""

import copy
import json

import pytest
import yaml

from bnnprune import cli
from bnnprune.pipeline.config import GateConfig, load_params
from bnnprune.reports import gate

from conftest import REPO

GOOD = {
    "dataset": "fashion-mnist",
    "baseline": {"test_acc": 0.91},
    "pruned": {"test_acc": 0.90},
    "reduction": {"bops_pct": 35.0, "ops_pct": 20.0, "size_pct": 30.0},
    "acc_drop_pt": 1.0,
    "speedup": {"cpu": 1.3, "triton": None, "onnxruntime": 1.2},
    "speedup_of_min_ms": {"cpu": 1.4, "triton": None},
    "speedup_unavailable": {"triton": "no CUDA GPU"},
}
THRESHOLDS = {"min_test_acc": 0.85, "max_acc_drop_pt": 2.0, "min_bops_reduction_pct": 20.0,
              "min_speedup_cpu": 1.1}


@pytest.fixture
def files(tmp_path):
    def write(summary: dict, thresholds: dict = THRESHOLDS):
        (tmp_path / "summary.json").write_text(json.dumps(summary))
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"gate": thresholds}))
        return tmp_path / "summary.json", tmp_path / "params.yaml"
    return write


def check(files_, summary, thresholds=THRESHOLDS):
    s, p = files_(summary, thresholds)
    with pytest.raises(SystemExit) as e:
        cli.main(["check", "--summary", str(s), "--params", str(p)])
    return e.value.code


def test_good_summary_passes(files, capsys):
    assert check(files, GOOD) == 0
    out = capsys.readouterr().out
    assert "REGRESSED" not in out and "PASSED (4 of 4)" in out and "gate: OK" in out


def test_regressed_accuracy_drop_fails_with_a_table(files, capsys):
    bad = copy.deepcopy(GOOD)
    bad["pruned"]["test_acc"], bad["acc_drop_pt"] = 0.87, 4.0
    assert check(files, bad) == 1
    out = capsys.readouterr().out
    regressed, passed = out.split("PASSED")
    assert "REGRESSED (1 of 4" in regressed
    assert "accuracy drop (pt)" in regressed and "<= 2" in regressed and "4" in regressed
    assert "pruned test accuracy" in passed and "gate: FAILED" in out


def test_thresholds_come_from_the_params_file(files):
    assert check(files, GOOD, {**THRESHOLDS, "min_test_acc": 0.95}) == 1
    assert check(files, GOOD, {**THRESHOLDS, "min_speedup_cpu": 1.5}) == 1
    assert check(files, GOOD, {**THRESHOLDS, "min_bops_reduction_pct": 36.0}) == 1
    assert check(files, GOOD, {**THRESHOLDS, "max_acc_drop_pt": 0.5}) == 1
    assert check(files, GOOD, {**THRESHOLDS, "min_speedup_cpu": 1.4}) == 0  # bounds inclusive


def test_speedup_is_judged_on_minimum_latencies_not_medians(files):
    noisy = {**GOOD, "speedup": {**GOOD["speedup"], "cpu": 0.19}}  # medians under other jobs
    assert check(files, noisy) == 0
    slower = {**GOOD, "speedup_of_min_ms": {"cpu": 0.9, "triton": None}}
    assert check(files, slower) == 1


def test_gate_defaults_apply_to_unset_thresholds(files):
    results = gate.evaluate(GOOD, GateConfig())
    assert [r.threshold for r in results] == [0.90, 0.5, 50.0, 1.15]  # the default's headline
    headline = {**GOOD, "pruned": {"test_acc": 0.905}, "acc_drop_pt": 0.29,
                "reduction": {**GOOD["reduction"], "bops_pct": 51.9}}
    assert check(files, headline, {}) == 0
    assert check(files, GOOD, {}) == 1  # -35% BOPs at -1 pt: below the default's bar


def test_gate_defaults_are_the_thresholds_of_params_yaml():
    """`bnnprune check` with thresholds unset judges by the pipeline's own bar."""
    assert load_params(REPO / "params.yaml").gate == GateConfig()


def test_backend_that_did_not_run_fails_with_its_reason(files, capsys):
    missing = copy.deepcopy(GOOD)
    missing["speedup"]["cpu"] = missing["speedup_of_min_ms"]["cpu"] = None
    missing["speedup_unavailable"]["cpu"] = "numba not installed"
    assert check(files, missing) == 1
    assert "not measured: numba not installed" in capsys.readouterr().out


def test_malformed_summary_is_a_clear_error(files, capsys):
    broken = copy.deepcopy(GOOD)
    del broken["reduction"]
    assert check(files, broken) == 2
    assert "'reduction' missing" in capsys.readouterr().err


def test_bad_threshold_in_params_is_a_config_error(files, capsys):
    assert check(files, GOOD, {**THRESHOLDS, "min_test_acc": 85}) == 2
    assert "gate.min_test_acc" in capsys.readouterr().err


SKIPPED_ENGINE = {**GOOD, "model": {"arch": "birealnet"},
                  "speedup": {"cpu": None, "triton": None, "torch": 1.2, "onnxruntime": 1.2},
                  "speedup_of_min_ms": {"cpu": None, "triton": None, "torch": 1.1},
                  "speedup_unavailable": {"cpu": "packed engine: birealnet is not a chain model",
                                          "triton": "no CUDA GPU"},
                  "speedup_skipped": {"cpu": "packed engine: birealnet is not a chain model"}}


def test_engine_that_cannot_run_the_model_is_skipped_not_failed(files, capsys):
    """A birealnet's summary: the packed engine's speedup check has no number; it shows as
    skipped with the reason, and the other checks decide."""
    assert check(files, SKIPPED_ENGINE) == 0
    out = capsys.readouterr().out
    passed, skipped = out.split("SKIPPED")
    assert "REGRESSED" not in out and "PASSED (3 of 4)" in passed
    assert "speedup, packed CPU" not in passed
    assert "(1 of 4: no measurement, not a failure)" in skipped
    row = next(line for line in skipped.splitlines() if line.startswith("speedup, packed CPU"))
    assert row.split()[6:] == ["skipped", ">=", "1.1", "gate.min_speedup_cpu", "(packed",
                               "engine:", "birealnet", "is", "not", "a", "chain", "model)"]
    assert "gate: OK (1 skipped)" in out
    results = gate.evaluate(SKIPPED_ENGINE, GateConfig())
    assert [(r.passed, r.skipped, r.failed) for r in results][-1] == (False, True, False)


def test_a_skipped_engine_does_not_hide_a_real_regression(files, capsys):
    bad = copy.deepcopy(SKIPPED_ENGINE)
    bad["reduction"]["bops_pct"] = 5.0
    assert check(files, bad) == 1
    out = capsys.readouterr().out
    regressed, rest = out.split("PASSED")
    assert "REGRESSED (1 of 4" in regressed and "BOP reduction (%)" in regressed
    assert "SKIPPED (1 of 4" in rest and "gate: FAILED (1 skipped)" in rest
