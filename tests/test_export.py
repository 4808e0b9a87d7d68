"""ONNX export: parity with torch on a pruned-shaped model, normalisation inside the graph,
dynamic batch, the client contract, and rejection of files that are not the model."""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bnnprune.models import build_model, model_config, save_checkpoint
from bnnprune.pipeline import export
from bnnprune.pipeline.config import ExportConfig
from bnnprune.pipeline.data import make_synthetic
from bnnprune.pipeline.train import evaluate

from conftest import REPO, sh

CARD = {"shape": [1, 28, 28], "num_classes": 10, "mean": [0.3], "std": [0.2]}
PRUNED_CHANNELS = [8, 5, 11, 3, 13, 7]  # cnn width 0.25 is [8, 8, 16, 16, 32, 32]


def trained_like(channels: list[int]) -> torch.nn.Module:
    """A tiny model whose BatchNorm statistics look trained (not the 0/1 init, which puts
    binary-conv outputs exactly on the sign threshold)."""
    config = {**model_config("cnn", 0.25, CARD["shape"], CARD["num_classes"]),
              "channels": channels}
    model = build_model(config, seed=0)
    g = torch.Generator().manual_seed(1)
    for block in model.blocks:
        bn = block.bn
        bn.running_mean.copy_(3 * torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(0.5 + 5 * torch.rand(bn.running_var.shape, generator=g))
        bn.weight.data.copy_(0.5 + torch.rand(bn.weight.shape, generator=g))
        bn.bias.data.copy_(0.2 * torch.randn(bn.bias.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def test_split():
    return make_synthetic(10, 64, seed=3)[1]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    model = trained_like(PRUNED_CHANNELS)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export.export_onnx(model, CARD, path, ExportConfig(exporter="legacy"))
    return model, path


@pytest.mark.parametrize("exporter", ["legacy", "dynamo", "folded"])
def test_onnx_logits_match_torch_on_a_pruned_shaped_model(exporter, tmp_path, test_split):
    model = trained_like(PRUNED_CHANNELS)
    path = export.export_onnx(model, CARD, tmp_path / "m.onnx", ExportConfig(exporter=exporter))
    result = export.parity(model, export.session(path), test_split, CARD, tolerance=1e-4)
    assert result["passed"], result
    assert result["prediction_mismatches"] == 0 and result["max_abs_logit_diff"] < 1e-4
    assert result["test_acc_onnx"] == result["test_acc_torch"]
    # binarisation as standard ONNX ops: no custom domain, nothing onnxruntime lacks
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}
    sign_op = "Less" if exporter == "folded" else "Where"
    assert {sign_op, "Conv"} <= {n.op_type for n in graph.node}


def test_normalisation_is_inside_the_graph(pruned, test_split):
    """A client feeds pixels / 255; the graph must reproduce the project's own evaluation,
    which normalises with the dataset mean/std."""
    model, path = pruned
    logits = export.run_onnx(export.session(path), test_split.images)
    torch_pred = evaluate(model, test_split, CARD)["pred"].numpy()
    np.testing.assert_array_equal(logits.argmax(1), torch_pred)
    with torch.no_grad():
        ref = model((test_split.images.float() / 255 - 0.3) / 0.2).numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_batch_axis_is_dynamic(pruned, test_split):
    model, path = pruned
    sess = export.session(path)
    full = export.run_onnx(sess, test_split.images, batch_size=64)
    for n in (1, 37):
        x = export.pixels(test_split.images[:n]).numpy()
        out = sess.run(["logits"], {"images": x})[0]
        assert out.shape == (n, 10)
        np.testing.assert_allclose(out, full[:n], atol=1e-5)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]


def test_parity_failure_is_reported_and_raised(pruned, test_split):
    model, path = pruned
    other = trained_like(PRUNED_CHANNELS)
    with torch.no_grad():
        other.classifier.bias.add_(torch.arange(10.0))  # a different model, same contract
    result = export.parity(other, export.session(path), test_split, CARD, tolerance=1e-4,
                           max_outlier_fraction=1.0)
    assert not result["passed"] and result["max_abs_logit_diff"] > 1e-4
    assert result["images_over_tolerance"] == len(test_split)
    # a different model is not explained by rounding ties at the sign threshold
    assert result["images_over_tolerance_at_sign_threshold"] < len(test_split) / 4
    with pytest.raises(export.ExportError, match="does not match torch"):
        export.require_parity({"models": {"pruned": {"parity": result}}})


def test_sign_threshold_ties_are_detected(test_split):
    model = trained_like(PRUNED_CHANNELS)
    assert export.near_threshold(model, CARD, test_split.images).mean() < 0.1
    with torch.no_grad():  # the stem's BN outputs exactly 0: every first binary input is a tie
        model.blocks[0].bn.weight.zero_()
        model.blocks[0].bn.bias.zero_()
    assert export.near_threshold(model, CARD, test_split.images).all()


def test_sign_threshold_ties_are_flagged_per_image_across_batches(test_split):
    model = trained_like(PRUNED_CHANNELS)
    images = test_split.images
    with torch.no_grad():  # ties on the stem's BN output only where a channel's pixel is 0
        model.blocks[0].bn.bias.zero_()
        model.blocks[0].bn.running_mean.zero_()
    whole = export.near_threshold(model, CARD, images, batch_size=len(images))
    assert len(whole) == len(images) and 0 < whole.sum() <= len(images)
    np.testing.assert_array_equal(export.near_threshold(model, CARD, images, batch_size=7), whole)


def _renamed_input(src: Path, dst: Path) -> Path:
    model = onnx.load(str(src))
    old = model.graph.input[0].name
    model.graph.input[0].name = "input"
    for node in model.graph.node:
        node.input[:] = ["input" if i == old else i for i in node.input]
    onnx.save(model, str(dst))
    return dst


def test_verify_rejects_files_that_are_not_the_model(pruned, tmp_path):
    _, path = pruned
    export.verify(path, CARD)  # the real one passes
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(export.ExportError, match="not an ONNX model"):
        export.verify(junk)
    with pytest.raises(export.ExportError, match="not found"):
        export.verify(tmp_path / "missing.onnx")
    renamed = r"'input' float32 \[batch, 1, 28, 28\]; expected one input 'images'"
    with pytest.raises(export.ExportError, match=renamed):
        export.verify(_renamed_input(path, tmp_path / "renamed.onnx"))
    cifar = {**CARD, "shape": [3, 32, 32]}
    with pytest.raises(export.ExportError, match=r"\[batch, 3, 32, 32\]"):
        export.verify(path, cifar)
    with pytest.raises(export.ExportError, match="output"):
        export.verify(path, {**CARD, "num_classes": 100})


def test_verify_rejects_a_fixed_batch_axis(tmp_path):
    model = trained_like(PRUNED_CHANNELS)
    path = tmp_path / "static.onnx"
    torch.onnx.export(export.client_model(model, CARD), (torch.rand(4, 1, 28, 28),), str(path),
                      dynamo=False, input_names=["images"], output_names=["logits"])
    with pytest.raises(export.ExportError, match="dynamic batch axis"):
        export.verify(path, CARD)


def test_export_and_check_times_both_models_side_by_side(tmp_path, test_split):
    base = trained_like([8, 8, 16, 16, 32, 32])
    small = trained_like(PRUNED_CHANNELS)
    cfg = ExportConfig(exporter="legacy", latency_batch_sizes=[1, 16], latency_repeats=2,
                       threads=1)
    result = export.export_and_check({"baseline": (base, tmp_path / "b.onnx"),
                                      "pruned": (small, tmp_path / "p.onnx")},
                                     test_split, CARD, cfg)
    assert result["parity_passed"]
    for name in ("baseline", "pruned"):
        m = result["models"][name]
        assert set(m["latency_ms"]) == {"batch_1", "batch_16"}
        assert all(v > 0 for v in m["latency_ms"].values())
        assert all(0 < m["latency_ms_min"][k] <= m["latency_ms"][k] for k in m["latency_ms"])
        assert m["parity"]["images"] == len(test_split)
    assert result["models"]["pruned"]["size_bytes"] < result["models"]["baseline"]["size_bytes"]
    assert result["speedup"]["batch_16"] == pytest.approx(
        result["models"]["baseline"]["latency_ms"]["batch_16"]
        / result["models"]["pruned"]["latency_ms"]["batch_16"], rel=1e-3)
    from bnnprune.core.ops import count_ops

    macs = [count_ops(m).total for m in (base, small)]
    ratio = (macs[0]["bops"] + macs[0]["flops"]) / (macs[1]["bops"] + macs[1]["flops"])
    assert result["mac_ratio"] == pytest.approx(ratio)
    assert result["speedup_vs_mac_ratio"]["batch_16"] == pytest.approx(
        result["speedup"]["batch_16"] / ratio, rel=1e-3)
    assert len(result["load_average"]["before"]) == 3
    executed = [result["models"][n]["onnxruntime_convs"]["executed_macs"]
                for n in ("baseline", "pruned")]
    assert result["executed_mac_ratio"] == pytest.approx(executed[0] / executed[1])


def test_timed_sessions_do_not_spin(tmp_path, test_split, monkeypatch):
    """Two sessions timed in one process must not spin (each would take the other's cores):
    the sessions export_and_check hands to `latency` have allow_spinning 0 (nothing timed)."""
    timed = {}

    def fake_latency(sessions, images, batch_sizes, repeats, **kwargs):
        timed.update(sessions)
        return {name: {"batch_1": {"median": 1.0, "min": 1.0}} for name in sessions}

    monkeypatch.setattr(export, "latency", fake_latency)
    result = export.export_and_check(
        {"baseline": (trained_like([8, 8, 16, 16, 32, 32]), tmp_path / "b.onnx"),
         "pruned": (trained_like(PRUNED_CHANNELS), tmp_path / "p.onnx")},
        test_split, CARD, ExportConfig(exporter="legacy", threads=1))
    assert set(timed) == {"baseline", "pruned"} and result["ort_allow_spinning"] is False
    for sess in timed.values():
        assert sess.get_session_options().get_session_config_entry(export.SPINNING) == "0"
    client = export.session(tmp_path / "p.onnx")  # a client's session keeps the default
    assert client.get_session_options().get_session_config_entry(export.SPINNING) == "1"


def test_executed_convs_read_the_channel_padding_off_onnxruntimes_graph(pruned):
    model, path = pruned
    e = export.executed_convs(path, model, threads=1)
    from bnnprune.core.ops import count_ops

    convs = [r for r in count_ops(model).layers if r["kind"] == "conv"]
    assert e["conv_layers"] == len(convs) == 6
    assert e["nchwc_layers"] >= 5  # the fast path (a 1-channel input may take another)
    for r in convs:
        layer = e["layers"][r["name"]]
        assert layer["channels"] == [r["in_channels"], r["out_channels"]]
        cin, cout = layer["executed_channels"]
        assert cin >= r["in_channels"] and cout >= r["out_channels"]
        if layer["nchwc"]:  # NCHWc blocks are 8 (AVX2) or 16 (AVX-512) channels; a small
            # input may stay NCHW (the conv reads it unblocked)
            assert cout % 8 == 0 and (cin % 8 == 0 or cin == r["in_channels"]), layer
        assert layer["executed_macs"] == layer["macs"] * cin * cout // (
            r["in_channels"] * r["out_channels"])
    padded = e["layers"]["blocks.1.layer"]  # 5 output channels: padded to a whole block
    assert padded["executed_channels"][1] > 5 and padded["executed_macs"] > padded["macs"]
    total = count_ops(model).total
    assert e["executed_macs"] == total["bops"] + total["flops"] + sum(
        v["executed_macs"] - v["macs"] for v in e["layers"].values())


def test_logged_mlflow_model_has_signature_and_runs(pruned, tmp_path, monkeypatch):
    import mlflow

    _, path = pruned
    monkeypatch.chdir(tmp_path)  # the default experiment's artifacts go to ./mlruns
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
        with mlflow.start_run():
            info = export.log_onnx_model(path, CARD, "pruned_bnn_onnx", images)
        assert info.name == "pruned_bnn_onnx"
        loaded = mlflow.pyfunc.load_model(info.model_uri)
        example = mlflow.models.Model.load(info.model_uri).load_input_example()
        np.testing.assert_array_equal(example["images"],
                                      export.pixels(images[:export.EXAMPLE_IMAGES]).numpy())
        sig = loaded.metadata.signature
        assert sig.inputs.input_names() == ["images"] and sig.outputs.input_names() == ["logits"]
        out = loaded.predict({"images": np.zeros((3, 1, 28, 28), np.float32)})
        assert out["logits"].shape == (3, 10)
    finally:
        mlflow.set_tracking_uri("")


@pytest.mark.parametrize("channels", [PRUNED_CHANNELS, [8, 8, 16, 16, 32, 32]])
def test_folded_binary_layers_give_the_same_integers(channels):
    """sum(W) - 2 conv(L, W) with L = [x < 0] zero-padded equals the +1-padded sign conv,
    layer by layer (exact integers) and for the whole model."""
    model = trained_like(channels)
    folded = export.fold_binary_layers(model)
    x = torch.randn(5, 1, 28, 28)
    x[0, 0, :3, :3] = 0.0  # sign(0) = +1 (L = 0)
    with torch.no_grad():
        h = x
        for block, fblock in zip(model.blocks, folded.blocks, strict=True):
            assert torch.equal(block.layer(h), fblock.layer(h))
            h = block(h)
        assert torch.equal(model(x), folded(x))
    assert isinstance(folded.blocks[1].layer, export.FoldedBinaryConv2d)
    assert model.blocks[1].layer.weight.requires_grad  # the original is left alone


def test_folded_linear_is_exact():
    from bnnprune.core.binary import BinaryLinear

    layer = BinaryLinear(37, 5)
    x = torch.randn(4, 37)
    with torch.no_grad():
        assert torch.equal(layer(x), export.FoldedBinaryLinear(layer)(x))


def test_folded_graph_has_no_pad_or_where(tmp_path):
    path = export.export_onnx(trained_like(PRUNED_CHANNELS), CARD, tmp_path / "f.onnx",
                              ExportConfig(exporter="folded"))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Conv" in ops and "Less" in ops
    assert not ops & {"Pad", "Where", "GreaterOrEqual"}


EXPORT_IN_CHECKOUT = """
import json, sys
import bnnprune
from bnnprune.models import load_checkpoint
from bnnprune.pipeline.config import ExportConfig
from bnnprune.pipeline.export import export_onnx
model = load_checkpoint("models/finetuned.pt")[0]
export_onnx(model, json.loads(sys.argv[1]), "models/model.onnx", ExportConfig())
print(bnnprune.__file__)
"""


def test_onnx_is_byte_identical_from_checkouts_in_different_folders(tmp_path):
    """The same weights exported by two checkouts (each importing its own src/, as the stages
    do) give the same bytes: the exporter's per-node stack traces and other build details,
    which name the checkout's and the environment's folders, are not in the file."""
    ckpt = save_checkpoint(tmp_path / "finetuned.pt", trained_like(PRUNED_CHANNELS))
    env = {**os.environ, "PYTHONPATH": "src"}
    files = []
    for name in ("a", "checkout-b"):
        root = tmp_path / name
        shutil.copytree(REPO / "src/bnnprune", root / "src/bnnprune",
                        ignore=shutil.ignore_patterns("__pycache__"))
        (root / "models").mkdir()
        shutil.copy(ckpt, root / "models/finetuned.pt")
        out = sh([sys.executable, "-c", EXPORT_IN_CHECKOUT, json.dumps(CARD)], root, env).stdout
        assert out.strip().startswith(str(root / "src")), out  # its own copy of the library
        files.append((root / "models/model.onnx").read_bytes())
    a, b = files
    assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest()
    for folder in (tmp_path, REPO, Path(sys.prefix)):
        assert str(folder).encode() not in a, folder


USER_ARCH = "usermodels.tiny_bireal:build"


def any_model(arch: str, channels: list[int] | None = None) -> torch.nn.Module:
    """A tiny birealnet or user's residual model (tests/usermodels) in eval mode with random
    BatchNorm statistics."""
    from conftest import tiny_bnn

    if arch == "birealnet":
        return tiny_bnn("birealnet", CARD["shape"], 0.25, channels)
    config = model_config(USER_ARCH, 1.0, CARD["shape"], CARD["num_classes"], {"width": 12},
                          ["usermodels.tiny_bireal:MyBinaryConv"])
    model = build_model(config, seed=0)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()


@pytest.fixture
def usermodels(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests"))


def test_folded_birealnet_scales_its_constants_and_gives_the_same_outputs():
    """Every ScaledBinaryConv2d, wherever it sits, becomes a FoldedBinaryConv2d whose constants
    carry the scale mean|W|: the same outputs up to float32 rounding."""
    from bnnprune.core.binary import BinaryConv2d, ScaledBinaryConv2d

    model = any_model("birealnet", [5, 13, 3])
    folded = export.fold_binary_layers(model)
    assert not any(isinstance(m, BinaryConv2d) for m in folded.modules())
    x = torch.randn(6, 5, 14, 14)
    x[0, 0, :3, :3] = 0.0  # sign(0) = +1
    with torch.no_grad():
        layer, flayer = model.blocks[1].conv, folded.blocks[1].conv
        assert isinstance(layer, ScaledBinaryConv2d)
        assert isinstance(flayer, export.FoldedBinaryConv2d)
        torch.testing.assert_close(flayer(x), layer(x))
        images = torch.randn(8, *CARD["shape"])
        torch.testing.assert_close(folded(images), model(images), atol=1e-4, rtol=1e-5)
    assert isinstance(model.blocks[1].conv, ScaledBinaryConv2d)  # the original is left alone


def test_a_users_binary_class_is_left_unfolded(usermodels):
    model = any_model("user")
    folded = export.fold_binary_layers(model)
    assert type(folded.body[0].conv).__name__ == "MyBinaryConv"
    x = torch.randn(4, *CARD["shape"])
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


@pytest.mark.parametrize("arch, exporter", [("birealnet", "folded"), ("birealnet", "dynamo"),
                                            ("user", "folded"), ("user", "legacy")])
def test_any_model_exports_with_parity_and_named_convs(arch, exporter, tmp_path, test_split,
                                                       usermodels):
    """birealnet (folded: scale in the constants, no Pad / Where) and a user's model (its own
    binary class exported as it is) pass parity; onnxruntime's convolutions are reported per
    count_ops row, shortcuts included, whatever order onnxruntime puts them in."""
    from bnnprune.core.ops import count_ops

    model = any_model(arch, [5, 13, 3] if arch == "birealnet" else None)
    path = export.export_onnx(model, CARD, tmp_path / "m.onnx", ExportConfig(exporter=exporter))
    p = export.parity(model, export.session(path), test_split, CARD, 1e-4, 0.25)
    assert p["passed"] and p["prediction_mismatches"] == 0, p
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("Where" in ops) == (exporter != "folded" or arch == "user")
    e = export.executed_convs(path, model, threads=1)
    rows = [r for r in count_ops(model).layers if r["kind"] == "conv"]
    assert list(e["layers"]) == [r["name"] for r in rows]
    for r in rows:
        layer = e["layers"][r["name"]]
        assert layer["channels"] == [r["in_channels"], r["out_channels"]]
        cin, cout = layer["executed_channels"]
        assert r["in_channels"] <= cin and r["out_channels"] <= cout < r["out_channels"] + 16
    shortcut = "blocks.2.shortcut.1" if arch == "birealnet" else "body.1.short.1"
    assert shortcut in e["layers"]


def test_convs_are_matched_by_kernel_and_channels_not_graph_order():
    """onnxruntime may put a shortcut's 1x1 conv before its block's 3x3 conv: each count_ops
    row takes the conv of its own kernel, stride and (padded) channels."""
    from bnnprune.core.ops import count_ops

    model = any_model("birealnet", [5, 13, 3])
    rows = [r for r in count_ops(model).layers if r["kind"] == "conv"]
    pad = {5: 8, 13: 16, 3: 8, 1: 1}
    convs = []
    for r in rows:
        module = model.get_submodule(r["name"])
        out_ch, in_ch, kh, kw = module.weight.shape
        convs.append({"domain": "com.microsoft.nchwc", "shape": [pad[out_ch], in_ch, kh, kw],
                      "group": 1, "strides": tuple(module.stride), "row": r["name"]})
    matched = export._match_convs(model, rows, convs[::-1], "m.onnx")
    signature = {c["row"]: (c["shape"], c["strides"]) for c in convs}
    # convs of one signature are interchangeable (blocks.0 and blocks.1 here)
    assert [signature[c["row"]] for c in matched] == [signature[r["name"]] for r in rows]
    assert matched[4]["row"] == "blocks.2.shortcut.1" and matched[3]["row"] == "blocks.2.conv"
    with pytest.raises(export.ExportError, match="no convolution left for layer 'blocks.5.conv'"):
        export._match_convs(model, rows, convs[:-1], "m.onnx")
