"""The benchmark function on two tiny models: schema, positive numbers, skipped CUDA, and the
triton_cuda bookkeeping with a stand-in engine (no GPU here)."""

import pytest
import torch

from bnnprune import benchmark
from bnnprune.models import build_model, model_config


def tiny(channels):
    cfg = {**model_config("cnn", 0.25, [1, 28, 28], 10), "channels": channels}
    return build_model(cfg, seed=0).eval()


@pytest.fixture(scope="module")
def result():
    models = {"baseline": tiny([8, 8, 16, 16, 32, 32]), "pruned": tiny([8, 5, 9, 16, 17, 32])}
    images = torch.randn(40, 1, 28, 28)
    return benchmark.run_benchmark(models, images, batch_size=8, threads=1, warmup=1,
                                   repeats=3)


def test_schema_and_positive_numbers(result):
    for name in ("baseline", "pruned"):
        for b in ("torch_float", "packed_cpu"):
            r = result["models"][name][b]
            for key in ("latency_ms_median", "latency_ms_min", "latency_ms_max",
                        "throughput_ips"):
                assert r[key] > 0, (name, b, key)
            assert r["latency_ms_min"] <= r["latency_ms_median"] <= r["latency_ms_max"]
        assert result["bnn_vs_float"][name] > 0
        assert result["prediction_mismatches"][name]["mismatches"] == 0
        assert result["prediction_mismatches"][name]["images"] == 40
    assert set(result["speedup"]) >= {"torch_float", "packed_cpu"}
    assert all(v > 0 for v in result["speedup"].values())
    assert result["ops_ratio"] > 1
    assert result["speedup_vs_ops_ratio"]["packed_cpu"] > 0
    assert result["machine"]["cpu"] and result["machine"]["threads"] == 1
    assert result["config"]["batch_size"] == 8
    # the keys report.py / gate.py read
    assert result["backends"]["cpu"]["speedup"] == result["speedup"]["packed_cpu"]
    assert result["backends"]["torch"]["baseline_ms"] > 0
    assert {"speedup", "packed_ms", "float_ms"} <= set(result["bnn_vs_float"])
    rows = benchmark.latency_rows(result)
    assert len(rows) == 4 and all(r["latency_ms_median"] > 0 for r in rows)
    assert all(isinstance(v, (int, float)) for v in benchmark.flat_metrics(result).values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_skipped_with_reason(result):
    reason = result["skipped"]["triton_cuda"]
    assert "CUDA" in reason
    assert "triton_cuda" not in result["speedup"]
    assert "triton_cuda" not in result["models"]["baseline"]
    assert result["backends"]["triton"] == {"backend": "triton_cuda", "speedup": None,
                                            "reason": reason}
    assert result["machine"]["gpu"] is None


def test_cuda_unavailable_reported_even_when_forced(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA" in benchmark.skipped_backends()["triton_cuda"]


def test_with_cuda_triton_runs_unless_interpreted(monkeypatch):
    """With a GPU the Triton backend is timed, unless the kernels run in the interpreter."""
    from bnnprune.kernels import triton_kernels  # importing works without a GPU in any mode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton_kernels, "INTERPRET", False)
    assert benchmark.skipped_backends() == {}
    monkeypatch.setattr(triton_kernels, "INTERPRET", True)
    assert "TRITON_INTERPRET=1" in benchmark.skipped_backends()["triton_cuda"]


def test_triton_backend_wiring(monkeypatch):
    """The triton_cuda code path without a GPU: the engine is a stand-in (the torch model on
    the CPU) and synchronize a counter, so only the bookkeeping is checked, not speeds."""
    from bnnprune import triton_engine

    made, syncs = [], []

    class StandIn:
        device = torch.device("cpu")

        def __init__(self, model):
            self.model = model

        def __call__(self, x):
            assert x.device == self.device
            with torch.no_grad():
                return self.model(x)

    def from_model(model, device):
        assert torch.device(device) == torch.device("cpu")
        made.append(model)
        return StandIn(model)

    monkeypatch.setattr(benchmark, "skipped_backends", lambda: {})
    monkeypatch.setattr(benchmark, "TRITON_DEVICE", "cpu")
    monkeypatch.setattr(triton_engine.TritonModel, "from_model", staticmethod(from_model))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(1))
    models = {"baseline": tiny([8, 8, 16, 16, 32, 32]), "pruned": tiny([8, 5, 9, 16, 17, 32])}
    res = benchmark.run_benchmark(models, torch.randn(12, 1, 28, 28), batch_size=4, threads=1,
                                  warmup=1, repeats=2)
    assert made == [models["baseline"], models["pruned"]]
    assert len(syncs) == 2 * (1 + 1 + 2)  # per model: the untimed first call, warmup, repeats
    assert res["skipped"] == {}
    for name in models:
        assert res["models"][name]["triton_cuda"]["latency_ms_median"] > 0
        mm = res["prediction_mismatches_by_backend"]["triton_cuda"][name]
        assert mm["images"] == 12 and mm["mismatches"] == 0
        assert res["prediction_mismatches_by_backend"]["packed_cpu"][name] == \
            res["prediction_mismatches"][name]
    tri = res["backends"]["triton"]
    assert tri["backend"] == "triton_cuda" and tri["speedup"] == res["speedup"]["triton_cuda"]
    assert tri["baseline_ms"] == res["models"]["baseline"]["triton_cuda"]["latency_ms_median"]
    assert "triton_cuda" in res["speedup_vs_ops_ratio"]
    assert len(benchmark.latency_rows(res)) == 6
    flat = benchmark.flat_metrics(res)
    assert {"speedup_triton_cuda", "pruned_triton_cuda_latency_ms",
            "pruned_triton_cuda_prediction_mismatches"} <= set(flat)
