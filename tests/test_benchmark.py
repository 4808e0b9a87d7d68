"""The benchmark function on two tiny models: schema, positive numbers, skipped CUDA."""

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
