"""The benchmark function on two tiny models: schema, positive numbers, skipped CUDA, and the
triton_cuda bookkeeping with a stand-in engine (no GPU here)."""

import pytest
import torch
from torch import nn

from bnnprune.core.binary import BinaryConv2d
from bnnprune.models import build_model, model_config
from bnnprune.pipeline import benchmark, tracking


def tiny(channels):
    cfg = {**model_config("cnn", 0.25, [1, 28, 28], 10), "channels": channels}
    return build_model(cfg, seed=0).eval()


ENGINES_BUILT: list = []  # the models `result` built a packed engine of


@pytest.fixture(scope="module")
def result():
    models = {"baseline": tiny([8, 8, 16, 16, 32, 32]), "pruned": tiny([8, 5, 9, 16, 17, 32])}
    images = torch.randn(40, 1, 28, 28)
    build = benchmark.PackedModel.from_model

    def counted(model, **kwargs):
        ENGINES_BUILT.append(model)
        return build(model, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(benchmark.PackedModel, "from_model", staticmethod(counted))
        return benchmark.run_benchmark(models, images, batch_size=8, threads=1, warmup=1,
                                       repeats=3, batch_sizes=[1, 8, 50])


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
    m = result["models"]
    assert result["backends"]["cpu"]["speedup_of_min_ms"] == pytest.approx(
        m["baseline"]["packed_cpu"]["latency_ms_min"] / m["pruned"]["packed_cpu"]["latency_ms_min"])
    assert result["backends"]["torch"]["baseline_ms"] > 0
    assert {"speedup", "packed_ms", "float_ms"} <= set(result["bnn_vs_float"])
    rows = benchmark.latency_rows(result)
    assert len(rows) == 4 and all(r["latency_ms_median"] > 0 for r in rows)
    flat = benchmark.flat_metrics(result)
    assert all(isinstance(v, (int, float)) for v in flat.values())
    assert all(tracking.METRIC_NAME.fullmatch(k) for k in flat), flat


def test_latency_by_batch_size_per_backend(result):
    by = result["by_batch"]
    assert list(by) == ["batch_1", "batch_8", "batch_50"]  # 50 > the 40 images: repeated
    for batch, rows in by.items():
        assert set(rows) == {"torch_float", "packed_cpu"}
        for b, r in rows.items():
            assert 0 < r["baseline_ms_min"] <= r["baseline_ms"], (batch, b)
            assert 0 < r["pruned_ms_min"] <= r["pruned_ms"], (batch, b)
            assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["pruned_ms"])
            assert r["share_of_work_ratio"] == pytest.approx(r["speedup"] / r["work_ratio"])
    assert len(ENGINES_BUILT) == 2  # by_batch reuses the main loop's engines
    # the headline batch is the main loop's rounds, not a second timing
    assert by["batch_8"]["packed_cpu"]["speedup"] == result["speedup"]["packed_cpu"]
    assert by["batch_8"]["torch_float"]["baseline_ms"] == \
        result["models"]["baseline"]["torch_float"]["latency_ms_median"]
    # torch float executes MACs, the engine OPs (BOPs / 64 + FLOPs)
    m = result["models"]
    macs = {n: m[n]["bops"] + m[n]["flops"] for n in m}
    assert by["batch_1"]["torch_float"]["work_ratio"] == pytest.approx(
        macs["baseline"] / macs["pruned"])
    assert by["batch_50"]["packed_cpu"]["work_ratio"] == pytest.approx(result["ops_ratio"])
    flat = benchmark.flat_metrics(result)
    assert flat["speedup/packed_cpu_b50"] == by["batch_50"]["packed_cpu"]["speedup"]
    assert flat["pruned/torch_float/latency_ms_b1"] == by["batch_1"]["torch_float"]["pruned_ms"]


def test_batch_key_round_trip():
    assert benchmark.batch_key(64) == "batch_64"
    assert benchmark.batch_size_of("batch_64") == 64
    assert all(benchmark.batch_size_of(benchmark.batch_key(b)) == b for b in (1, 8, 256))


def test_batch_of_repeats_images_to_fill_the_batch():
    images = torch.arange(3.0).view(3, 1, 1, 1)
    assert benchmark.batch_of(images, 7).flatten().tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert benchmark.batch_of(images, 2).flatten().tolist() == [0, 1]


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
    from bnnprune.engines.kernels import triton_kernels  # importing works without a GPU in any mode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton_kernels, "INTERPRET", False)
    assert benchmark.skipped_backends() == {}
    monkeypatch.setattr(triton_kernels, "INTERPRET", True)
    assert "TRITON_INTERPRET=1" in benchmark.skipped_backends()["triton_cuda"]


def test_triton_backend_wiring(monkeypatch):
    """The triton_cuda code path without a GPU: the engine is a stand-in (the torch model on
    the CPU) and synchronize a counter, so only the bookkeeping is checked, not speeds."""
    from bnnprune.engines import triton_engine

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
    b = res["config"]["batch_size"]
    assert {f"speedup/triton_cuda_b{b}", f"pruned/triton_cuda/latency_ms_b{b}",
            "pruned/triton_cuda/prediction_mismatches"} <= set(flat)


def test_predicted_speedup_on_hand_numbers():
    # t = 2 (not pruned), 6 (half the work), 2 (a quarter): 10 / (2 + 3 + 0.5) = 10 / 5.5
    times = {"stem": 2.0, "conv": 6.0, "fc": 2.0}
    ratios = {"stem": 1.0, "conv": 0.5, "fc": 0.25}
    assert benchmark.predicted_speedup(times, ratios) == pytest.approx(10 / 5.5)
    assert benchmark.predicted_speedup(times, dict.fromkeys(times, 1.0)) == pytest.approx(1.0)


def test_layer_summary_on_hand_numbers():
    ops = {"baseline": {"layers": [
        {"name": "blocks.0", "kind": "conv", "binary": False, "out_channels": 4, "bops": 0,
         "flops": 100},
        {"name": "blocks.1", "kind": "conv", "binary": True, "out_channels": 8, "bops": 1000,
         "flops": 0}]},
        "pruned": {"layers": [
            {"name": "blocks.0", "kind": "conv", "binary": False, "out_channels": 4, "bops": 0,
             "flops": 100},
            {"name": "blocks.1", "kind": "conv", "binary": True, "out_channels": 6, "bops": 750,
             "flops": 0}]}}
    calls = {"baseline": [{"blocks.0": 1.0, "blocks.1": 3.0}, {"blocks.0": 2.0, "blocks.1": 4.0},
                          {"blocks.0": 1.5, "blocks.1": 5.0}],
             "pruned": [{"blocks.0": 1.5, "blocks.1": 3.0}] * 3}
    # peak: 2e6 MACs per call at 1 ms median (2e9/s), 0.5 ms best (4e9/s)
    s = benchmark.layer_summary(ops, calls, batch_size=2, peak_ms=[0.5, 1.0, 2.0],
                                peak_macs=2_000_000)
    assert s["peak_binary_macs_per_s"]["median"] == pytest.approx(2e9)
    assert s["peak_binary_macs_per_s"]["max"] == pytest.approx(4e9)
    stem, conv = s["rows"]
    assert (stem["baseline_ms"], stem["baseline_ms_min"], stem["work_ratio"]) == (1.5, 1.0, 1.0)
    assert "baseline_pct_of_peak" not in stem  # float layers have no binary rate
    assert (conv["baseline_ms"], conv["pruned_ms"], conv["work_ratio"]) == (4.0, 3.0, 0.75)
    assert conv["channels"] == [8, 6] and conv["speedup"] == pytest.approx(4 / 3)
    assert conv["share_of_work_ratio"] == pytest.approx(4 / 3 * 0.75)
    # 1000 BOPs x batch 2 in 4 ms = 5e5 MACs/s = 0.025 % of 2e9; best: 2000 / 3 ms vs 4e9
    assert conv["baseline_macs_per_s"] == pytest.approx(5e5)
    assert conv["baseline_pct_of_peak"] == pytest.approx(100 * 5e5 / 2e9)
    assert conv["baseline_pct_of_peak_best"] == pytest.approx(100 * 2000 / 3e-3 / 4e9)
    assert s["baseline_ms_sum"] == 5.5 and s["pruned_ms_sum"] == 4.5
    assert stem["baseline_share_of_time"] + conv["baseline_share_of_time"] == pytest.approx(1)
    assert s["predicted_speedup"] == pytest.approx(5.5 / (1.5 + 4.0 * 0.75))


def test_per_layer_timing_lines_up_with_count_ops(result):
    from bnnprune.core.ops import count_ops

    layers = result["layers"]
    names = [r["name"] for r in count_ops(tiny([8, 8, 16, 16, 32, 32])).layers]
    assert [r["name"] for r in layers["rows"]] == names  # stem, binary blocks, classifier
    assert names[0] == "blocks.0.layer" and names[-1] == "classifier"
    for r in layers["rows"]:
        assert r["baseline_ms"] > 0 and r["pruned_ms"] > 0
        assert 0 < r["work_ratio"] <= 1
        assert ("baseline_pct_of_peak" in r) == r["binary"]
    assert [r["work_ratio"] for r in layers["rows"]][0] == 1.0  # the stem is never pruned
    assert layers["peak_binary_macs_per_s"]["median"] > 0
    assert layers["predicted_speedup"] > 1
    assert layers["measured_speedup"] == result["speedup"]["packed_cpu"]
    assert layers["ops_ratio"] == result["ops_ratio"]
    assert result["work_ratio"]["packed_cpu"] == result["ops_ratio"]
    assert result["work_ratio"]["torch_float"] > 1
    table = benchmark.layer_table_md(result)
    assert table.count("\n| blocks.") == 6 and "| classifier" in table
    assert "Predicted speedup" in table and "% of peak" in table


def test_engine_layer_clock_sums_to_the_call():
    from bnnprune.engines.packed import PackedModel

    engine = PackedModel.from_model(tiny([8, 5, 9, 16, 17, 32]))
    x = torch.randn(4, 1, 28, 28)
    times: dict[str, float] = {}
    got = engine(x, times)
    assert torch.equal(got, engine(x))  # the clock changes nothing
    assert list(times) == [f"blocks.{i}.layer" for i in range(6)] + ["classifier"]
    assert all(v > 0 for v in times.values())


class FakeSession:
    """onnxruntime stand-in: the torch model on the fed array (wiring only, no export)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def run(self, outputs, feed):
        self.calls += 1
        with torch.no_grad():
            return [self.model(torch.from_numpy(feed["images"])).numpy()]


def bireal(width):
    return build_model(model_config("birealnet", width, [1, 28, 28], 10), seed=0).eval()


@pytest.fixture(scope="module")
def bireal_result():
    """birealnet baseline and a narrower one: the packed engine runs them (residual blocks),
    side by side with torch float and (stand-in) onnxruntime sessions at every batch size."""
    models = {"baseline": bireal(0.25), "pruned": bireal(0.125)}
    sessions = {n: FakeSession(m) for n, m in models.items()}
    res = benchmark.run_benchmark(models, torch.randn(20, 1, 28, 28), batch_size=8, threads=1,
                                  warmup=1, repeats=2, batch_sizes=[1, 8], onnx=sessions)
    return res, sessions


def test_birealnet_runs_on_the_packed_engine_beside_torch_and_onnxruntime(bireal_result):
    from bnnprune.core.ops import count_ops

    res, sessions = bireal_result
    assert "packed_cpu" not in res["skipped"] and "CUDA" in res["skipped"]["triton_cuda"]
    assert all(s.calls > 0 for s in sessions.values())
    for name in ("baseline", "pruned"):
        m = res["models"][name]
        for b in ("torch_float", "onnxruntime", "packed_cpu"):
            assert m[b]["latency_ms_median"] > 0, (name, b)
        assert m["channels"] == ([8, 16, 32] if name == "baseline" else [4, 8, 16])
        assert res["prediction_mismatches"][name]["mismatches"] == 0
        assert res["prediction_mismatches"][name]["images"] == 20
    assert res["backends"]["cpu"]["speedup"] == res["speedup"]["packed_cpu"] > 0
    assert res["work_ratio"]["onnxruntime"] == res["work_ratio"]["torch_float"] > 1
    rows = res["layers"]["rows"]
    assert [r["name"] for r in rows] == [r["name"] for r in count_ops(bireal(0.25)).layers]
    assert {r["name"] for r in rows if r["binary"]} == {f"blocks.{i}.conv" for i in range(6)}
    assert all(("baseline_pct_of_peak" in r) == r["binary"] for r in rows)
    assert res["layers"]["predicted_speedup"] > 1
    assert list(res["by_batch"]) == ["batch_1", "batch_8"]
    for batch, rows in res["by_batch"].items():
        assert set(rows) == {"torch_float", "onnxruntime", "packed_cpu"}
        for model in ("baseline", "pruned"):
            vs = res["engine_vs"][batch][model]
            assert set(vs) == {"torch_float", "torch_float_of_min_ms", "onnxruntime",
                               "onnxruntime_of_min_ms"}
            assert vs["torch_float"] == pytest.approx(
                rows["torch_float"][f"{model}_ms"] / rows["packed_cpu"][f"{model}_ms"])
    flat = benchmark.flat_metrics(res)
    assert all(tracking.METRIC_NAME.fullmatch(k) for k in flat), flat
    assert "baseline/packed_vs_onnxruntime_b8" in flat and "speedup/onnxruntime_b1" in flat
    assert "| blocks.5.conv" in benchmark.layer_table_md(res)
    assert {r["backend"] for r in benchmark.latency_rows(res)} == {
        "torch_float", "onnxruntime", "packed_cpu"}


class Hard(nn.Module):
    """A residual binary block with a Hardtanh: no engine runs it."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.config = {"arch": "hard", "in_shape": [1, 12, 12]}
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.conv = BinaryConv2d(c, c, 3, 1, 1)
        self.act = nn.Hardtanh()
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.fc(self.act(self.conv(h) + h).mean(dim=(2, 3)))


def test_a_block_no_engine_runs_is_skipped_with_the_module_and_op(monkeypatch):
    """As if a GPU were there: both engines skipped with the reason their from_model gives,
    torch float still timed; no peak kernel, no layer table, no engine checks."""
    monkeypatch.setattr(benchmark, "skipped_backends", lambda: {})
    monkeypatch.setattr(benchmark, "PeakXorPopcount", None)  # never built
    models = {"baseline": Hard().eval(), "pruned": Hard().eval()}
    res = benchmark.run_benchmark(models, torch.randn(6, 1, 12, 12), batch_size=4, threads=1,
                                  warmup=1, repeats=2, batch_sizes=[4])
    why = ("hard: module act (Hardtanh): not a module the engine runs; the packed engines run "
           "residual BNN blocks")
    assert res["skipped"]["packed_cpu"].startswith(f"packed engine: {why}")
    assert res["skipped"]["triton_cuda"].startswith(f"Triton engine: {why}")
    for key, backend in (("cpu", "packed_cpu"), ("triton", "triton_cuda")):
        assert res["backends"][key] == {"backend": backend, "speedup": None,
                                        "reason": res["skipped"][backend],
                                        "unsupported_model": True}
    assert set(res["speedup"]) == {"torch_float"} and "layers" not in res
    assert res["prediction_mismatches"] == {} and res["engine_vs"] == {}
    assert res["bnn_vs_float"] == {"speedup": None, "reason": res["skipped"]["packed_cpu"]}
    assert set(res["by_batch"]["batch_4"]) == {"torch_float"}


def test_build_engines_is_the_one_decision():
    engines, why = benchmark.build_engines({"a": tiny([8, 8, 16, 16, 32, 32])},
                                           benchmark.PackedModel.from_model)
    assert why is None and set(engines) == {"a"}
    engines, why = benchmark.build_engines({"a": Hard().eval()}, benchmark.PackedModel.from_model)
    assert engines == {} and "module act (Hardtanh)" in why
