"""ONNX export for clients: pixels / 255 in, logits out, checked against torch in onnxruntime.

The exported graph is self-contained: one input `images`, float32 (N, C, H, W) in [0, 1]
(uint8 pixels / 255); the dataset normalisation (training-split mean/std) is inside the graph;
one output `logits` (N, num_classes). The batch axis is dynamic. Binarisation is exported as
standard ops, so plain onnxruntime runs it. Exporters (`export.exporter`):
  dynamo  torch.export-based; a binary conv is GreaterOrEqual + Where on the input, Pad with
          +1, Conv with the weight's Where(W >= 0, 1, -1) (onnxruntime folds that at load)
  legacy  the TorchScript-based exporter, the same ops
  folded  (default) dynamo on a copy whose binary layers are folded (`FoldedBinaryConv2d`):
          sign(x) padded with +1, times constant ±1 weights, is rewritten exactly as
          sum(W) - 2 * conv(L, W) with L = [x < 0] zero-padded: one Less + Cast, then a plain
          Conv with constant weights -2 sign(W) and bias sum(sign(W)) and its own zero padding.
          No Pad and no Where pass over the activations (measured ~20% faster at batch 64 and
          256 than dynamo, the same predictions; every value is an integer below 2**24, so the
          float32 sums are exact whatever their order). A `ScaledBinaryConv2d` (birealnet) has
          its per-output-channel scale mean|W| folded into those constants (the sums are then
          exact up to float32 rounding). Every project binary layer of the model is folded,
          wherever it sits (`named_modules`); a user's own binary class is exported as it is
          (its forward through dynamo), so parity is checked the same way.
Every conv then runs on onnxruntime's NCHWc path (channels in blocks of 8 with AVX2, 16 with
AVX-512); channel counts that are not multiples of the block are padded up to it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import statistics
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from google.protobuf.message import Message
from torch import nn

from bnnprune.core.binary import (
    BinaryConv2d,
    BinaryLinear,
    ScaledBinaryConv2d,
    binarize,
    binary_layers,
)
from bnnprune.core.errors import UserError
from bnnprune.core.files import write_atomic
from bnnprune.core.ops import count_ops
from bnnprune.engines.timing import time_interleaved
from bnnprune.pipeline.benchmark import batch_key, batch_size_of
from bnnprune.pipeline.config import ExportConfig
from bnnprune.pipeline.data import Split

INPUT, OUTPUT = "images", "logits"
BATCH_AXIS = "batch"


class ExportError(UserError, ValueError):
    """An ONNX file that is missing, not ONNX, or not a model with this project's contract."""


class ClientModel(nn.Module):
    """images (N, C, H, W) float32 in [0, 1] -> logits (N, classes), normalisation inside.

    The normalisation buffers are `input_mean` / `input_std`, not `mean` / `std`: the dynamo
    exporter's constant folding names a folded tensor after its op (`mean` of a weight, as
    `ScaledBinaryConv2d` computes) and failed on the clash with a top-level initializer."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("input_mean",
                             torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("input_std",
                             torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.input_mean) / self.input_std)


class FoldedBinaryConv2d(nn.Module):
    """A `BinaryConv2d` for export: conv(sign(x) padded with +1, sign(W)) computed as
    bias - conv(L, 2 sign(W)) with L = [x < 0] zero-padded (the +1 padding is L = 0) and
    bias = sum of sign(W) over (Cin, kh, kw). Integer-valued, so exactly the same outputs.
    A `ScaledBinaryConv2d`'s output scale s (per output channel) multiplies both constants:
    s * (bias - conv(L, 2 sign(W))) = s * bias - conv(L, 2 s sign(W))."""

    def __init__(self, layer: BinaryConv2d):
        super().__init__()
        w = binarize(layer.weight.detach())  # (Cout, Cin, kh, kw) ±1
        weight, bias = -2 * w, w.sum(dim=(1, 2, 3))
        if isinstance(layer, ScaledBinaryConv2d):  # its forward's scale: mean |W| per channel
            scale = layer.output_scale()  # (Cout,)
            weight, bias = weight * scale.view(-1, 1, 1, 1), bias * scale
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.stride, self.pad = layer.stride, layer.pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d((x < 0).to(x.dtype), self.weight, self.bias, self.stride, self.pad)


class FoldedBinaryLinear(nn.Module):
    """A `BinaryLinear` for export: sign(x) @ sign(W).T as sum(sign(W)) - L @ (2 sign(W)).T."""

    def __init__(self, layer: BinaryLinear):
        super().__init__()
        w = binarize(layer.weight.detach())  # (M, F) ±1
        self.register_buffer("weight", -2 * w)
        self.register_buffer("bias", w.sum(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear((x < 0).to(x.dtype), self.weight, self.bias)


def fold_binary_layers(model: nn.Module) -> nn.Module:
    """A copy of `model` whose project binary layers (`BinaryConv2d` and its subclasses,
    `BinaryLinear`), wherever they sit, are `FoldedBinaryConv2d` / `FoldedBinaryLinear`; other
    modules, a user's own binary classes among them, are left as they are."""
    model = copy.deepcopy(model).eval()
    folds = {name: FoldedBinaryConv2d(m) if isinstance(m, BinaryConv2d) else FoldedBinaryLinear(m)
             for name, m in model.named_modules() if isinstance(m, BinaryConv2d | BinaryLinear)}
    for name, folded in folds.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, folded)
    return model


def pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]: what a client feeds the ONNX model."""
    return images.float() / 255


def client_model(model: nn.Module, card: dict) -> ClientModel:
    return ClientModel(model, card["mean"], card["std"]).eval()


BUILD_DETAILS = ("doc_string", "metadata_props")  # ONNX fields the exporters fill per build


def strip_build_details(proto: Message) -> None:
    """Clear every doc string and metadata entry of an ONNX model, its graph, nodes, values
    and functions, in place. The dynamo exporter puts each node's Python stack trace there
    (`pkg.torch.onnx.stack_trace`: absolute paths of the checkout and the environment), and
    module scopes and rewrite rules beside it, so the same weights exported from another folder
    gave another file."""
    for field, value in proto.ListFields():
        if field.name in BUILD_DETAILS:
            proto.ClearField(field.name)
        elif isinstance(value, Message):
            strip_build_details(value)
        elif field.type == field.TYPE_MESSAGE:
            for item in value:
                strip_build_details(item)


def export_onnx(model: nn.Module, card: dict, path: str | Path, cfg: ExportConfig) -> Path:
    """Write `model` as a client ONNX file at `path` (atomically) and verify its contract. The
    file holds no build details (strip_build_details): the same weights, the same bytes."""
    client = client_model(fold_binary_layers(model) if cfg.exporter == "folded" else model,
                          card)
    example = torch.rand(2, *card["shape"])  # (2, C, H, W); batch 2 keeps the axis symbolic

    def write(tmp: Path) -> None:
        quiet = io.StringIO()  # the exporters print progress and deprecation notes
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            if cfg.exporter in ("dynamo", "folded"):
                torch.onnx.export(
                    client, (example,), str(tmp), dynamo=True, external_data=False,
                    input_names=[INPUT], output_names=[OUTPUT], opset_version=cfg.opset,
                    dynamic_shapes={INPUT: {0: torch.export.Dim(BATCH_AXIS)}})
            else:
                torch.onnx.export(
                    client, (example,), str(tmp), dynamo=False, input_names=[INPUT],
                    output_names=[OUTPUT], opset_version=cfg.opset, do_constant_folding=True,
                    dynamic_axes={INPUT: {0: BATCH_AXIS}, OUTPUT: {0: BATCH_AXIS}})
        proto = onnx.load(str(tmp))
        strip_build_details(proto)
        onnx.save(proto, str(tmp))

    write_atomic(path, write)
    verify(path, card)
    return Path(path)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value if (d.dim_param or d.HasField("dim_value")) else "?"
            for d in value.type.tensor_type.shape.dim]


def _describe(value: onnx.ValueInfoProto) -> str:
    elem = value.type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "non-tensor"
    dims = ", ".join(map(str, _dims(value)))
    return f"{value.name!r} {dtype} [{dims}]"


def verify(path: str | Path, card: dict | None = None) -> onnx.ModelProto:
    """Load an .onnx file and check the client contract; a clear ExportError if it is not.

    Contract: valid ONNX; one input 'images' float32 [batch, C, H, W] with a symbolic batch
    axis; one output 'logits' float32 [batch, num_classes]; C, H, W and num_classes match
    the dataset card when one is given."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf raises several types on garbage
        raise ExportError(f"{path}: not an ONNX model ({type(e).__name__}: {e})") from e
    if not model.graph.node:
        raise ExportError(f"{path}: not an ONNX model (no graph nodes)")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"{path}: ONNX checker failed: {e}") from e
    shape = list(card["shape"]) if card else None
    want_in = f"one input 'images' float32 [{BATCH_AXIS}, " + (
        ", ".join(map(str, shape)) if shape else "C, H, W") + "] (pixels / 255, NCHW)"
    want_out = f"one output 'logits' float32 [{BATCH_AXIS}, " + (
        str(card["num_classes"]) if card else "num_classes") + "]"
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    outputs = list(model.graph.output)

    def bad(kind: str, got: list[onnx.ValueInfoProto], want: str) -> ExportError:
        found = ", ".join(_describe(v) for v in got) or "none"
        return ExportError(f"{path}: not a bnnprune client model: {kind} {found}; expected "
                           f"{want}")

    float32 = onnx.TensorProto.FLOAT
    if len(inputs) != 1 or inputs[0].name != INPUT:
        raise bad("inputs", inputs, want_in)
    dims = _dims(inputs[0])
    if (inputs[0].type.tensor_type.elem_type != float32 or len(dims) != 4
            or not isinstance(dims[0], str) or (shape and dims[1:] != shape)):
        raise bad("input", inputs, want_in + " with a dynamic batch axis")
    if len(outputs) != 1 or outputs[0].name != OUTPUT:
        raise bad("outputs", outputs, want_out)
    dims = _dims(outputs[0])
    if (outputs[0].type.tensor_type.elem_type != float32 or len(dims) != 2
            or not isinstance(dims[0], str) or (card and dims[1] != card["num_classes"])):
        raise bad("output", outputs, want_out)
    return model


SPINNING = "session.intra_op.allow_spinning"  # onnxruntime's session config key


def session(path: str | Path, threads: int = 0, spinning: bool = True,
            optimized_model_filepath: str | Path | None = None) -> ort.InferenceSession:
    """A plain onnxruntime CPU session with default graph optimisations (as a client gets).

    spinning=False stops the intra-op pool's threads spinning after a run: two sessions timed
    in one process (`latency`) would otherwise take each other's cores. With
    `optimized_model_filepath` onnxruntime writes its optimised graph there."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry(SPINNING, "1" if spinning else "0")
    if optimized_model_filepath is not None:
        options.optimized_model_filepath = str(optimized_model_filepath)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_convs(graph: onnx.GraphProto) -> list[dict[str, Any]]:
    """The Conv nodes of an onnxruntime-optimised graph whose weight is a constant: domain,
    weight shape (out, in per group, kh, kw), group and strides."""
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    convs = []
    for n in graph.node:
        if n.op_type == "Conv" and n.input[1] in shapes:
            attrs = {a.name: a for a in n.attribute}
            convs.append({"domain": n.domain, "shape": shapes[n.input[1]],
                          "group": attrs["group"].i if "group" in attrs else 1,
                          "strides": tuple(attrs["strides"].ints) if "strides" in attrs
                          else None})
    return convs


def _pair(v: Any) -> tuple[int, int] | None:
    """A module's stride as (sh, sw); None when it has none the graph can be compared with."""
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, tuple | list) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return (int(v[0]), int(v[1]))
    return None


def _match_convs(model: nn.Module, rows: list[dict[str, Any]], convs: list[dict[str, Any]],
                 path: str | Path) -> list[dict[str, Any]]:
    """The onnxruntime conv that runs each conv row of `count_ops`. The graph's order is not
    the forward order (onnxruntime sorts parallel branches, a shortcut and its block's conv,
    as it likes), so each row takes the conv with its kernel, stride and grouping whose padded
    channel counts are the closest at or above its own (first in graph order on a tie)."""
    left = list(convs)
    matched = []
    for r in rows:
        module = model.get_submodule(r["name"])
        out_ch, in_per_group, *kernel = module.weight.shape
        grouped = getattr(module, "groups", 1) != 1
        stride = _pair(getattr(module, "stride", None))
        fits = [c for c in left if c["shape"][2:] == kernel and (c["group"] != 1) == grouped
                and (stride is None or c["strides"] in (None, stride))
                and c["shape"][0] >= out_ch and c["shape"][1] >= in_per_group]
        if not fits:
            raise ExportError(
                f"{path}: onnxruntime's graph has no convolution left for layer {r['name']!r} "
                f"({r['in_channels']} -> {out_ch} channels, kernel {kernel}); its "
                f"convolutions: {[c['shape'] for c in convs]}")
        best = min(fits, key=lambda c: c["shape"][0] - out_ch + c["shape"][1] - in_per_group)
        left.remove(best)
        matched.append(best)
    if any(c["group"] == 1 for c in left):
        raise ExportError(f"{path}: onnxruntime's graph has {len(convs)} convolutions, the "
                          f"model {len(rows)}")
    return matched


def executed_convs(path: str | Path, model: nn.Module, threads: int = 0) -> dict[str, Any]:
    """How onnxruntime's optimised graph runs the model's convolutions: whether each takes the
    NCHWc fast path (domain com.microsoft.nchwc), the channel counts it pads them to (NCHWc
    blocks: 8 with AVX2, 16 with AVX-512) and the MACs it then executes, per layer (by
    `count_ops` row name, any model) and in all (`count_ops`' MACs scaled by the padded / true
    weight shape; non-conv layers unchanged)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, threads, optimized_model_filepath=optimized)
        graph = onnx.load(str(optimized)).graph
    ops = count_ops(model)
    rows = [r for r in ops.layers if r["kind"] == "conv"]
    layers, extra = {}, 0
    for r, conv in zip(rows, _match_convs(model, rows, _ort_convs(graph), path), strict=True):
        out_p, in_p = conv["shape"][:2]  # in: per group
        out_ch, in_per_group = model.get_submodule(r["name"]).weight.shape[:2]
        macs = r["bops"] + r["flops"]
        executed = macs * out_p * in_p // (out_ch * in_per_group)
        extra += executed - macs
        layers[r["name"]] = {"nchwc": conv["domain"] == "com.microsoft.nchwc",
                             "channels": [r["in_channels"], r["out_channels"]],
                             "executed_channels": [in_p * conv["group"], out_p], "macs": macs,
                             "executed_macs": executed}
    total = ops.total
    return {"conv_layers": len(rows), "nchwc_layers": sum(v["nchwc"] for v in layers.values()),
            "layers": layers, "executed_macs": total["bops"] + total["flops"] + extra}


def run_onnx(sess: ort.InferenceSession, images: torch.Tensor,
             batch_size: int = 500) -> np.ndarray:
    """uint8 images (N, C, H, W) -> logits (N, classes) from onnxruntime."""
    return np.concatenate([sess.run([OUTPUT], {INPUT: pixels(images[i:i + batch_size]).numpy()})[0]
                           for i in range(0, len(images), batch_size)])


@torch.no_grad()
def run_torch(model: nn.Module, card: dict, images: torch.Tensor,
              batch_size: int = 500) -> np.ndarray:
    """uint8 images (N, C, H, W) -> logits (N, classes) from torch, through the client wrapper."""
    client = client_model(model, card)
    return torch.cat([client(pixels(images[i:i + batch_size]))
                      for i in range(0, len(images), batch_size)]).numpy()


@torch.no_grad()
def near_threshold(model: nn.Module, card: dict, images: torch.Tensor, eps: float = 1e-5,
                   batch_size: int = 500) -> np.ndarray:
    """Per image: does any binary layer see an input within `eps` of its sign threshold (0)?
    There float32 rounding order (torch vs onnxruntime kernels) decides the sign, so a logit
    difference on such an image is a tie, not an export bug."""
    found = torch.zeros(len(images), dtype=torch.bool)
    start = [0]  # first image of the batch being run

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        near = inputs[0].abs().flatten(1).min(1).values < eps  # (batch,)
        found[start[0]:start[0] + len(near)] |= near

    handles = [m.register_forward_hook(hook) for m in binary_layers(model).values()]
    try:
        for start[0] in range(0, len(images), batch_size):
            run_torch(model, card, images[start[0]:start[0] + batch_size], batch_size)
    finally:
        for h in handles:
            h.remove()
    return found.numpy()


def parity(model: nn.Module, sess: ort.InferenceSession, split: Split, card: dict,
           tolerance: float, max_outlier_fraction: float = 0.0) -> dict[str, Any]:
    """onnxruntime vs torch on a whole split. Passes when every image's prediction is identical
    and its logits are within `tolerance`, except on at most `max_outlier_fraction` of the
    images, each of which must have a binary input on the sign threshold (see near_threshold):
    there the exact value is a tie that float rounding order settles either way."""
    ref = run_torch(model, card, split.images)
    got = run_onnx(sess, split.images)
    labels = split.labels.numpy()
    differ = ref.argmax(1) != got.argmax(1)  # (N,)
    per_image = np.abs(ref - got).max(1)  # (N,)
    outliers = np.flatnonzero((per_image > tolerance) | differ)
    ties = near_threshold(model, card, split.images[torch.from_numpy(outliers)]) \
        if len(outliers) else np.zeros(0, dtype=bool)
    unexplained = int((~ties).sum())
    return {"images": len(split), "prediction_mismatches": int(differ.sum()),
            "prediction_mismatches_at_sign_threshold": int((ties & differ[outliers]).sum()),
            "max_abs_logit_diff": float(per_image.max()),
            "p999_abs_logit_diff": float(np.quantile(per_image, 0.999)),
            "tolerance": tolerance, "max_outlier_fraction": max_outlier_fraction,
            "images_over_tolerance": len(outliers),
            "images_over_tolerance_at_sign_threshold": int(ties.sum()),
            "outlier_images": outliers[:20].tolist(),
            "passed": unexplained == 0 and len(outliers) <= max_outlier_fraction * len(split),
            "test_acc_torch": float((ref.argmax(1) == labels).mean()),
            "test_acc_onnx": float((got.argmax(1) == labels).mean())}


def latency(sessions: dict[str, ort.InferenceSession], images: torch.Tensor,
            batch_sizes: list[int], repeats: int, warmup: int = 3,
            stat: str = "median") -> dict[str, dict[str, float]]:
    """Milliseconds per batch of each session (`stat`: median, or min with stat="both" giving
    {"median": ..., "min": ...}), measured interleaved (`benchmark.time_interleaved`, rotating
    order) in one run so both models see the same machine load: {name: {"batch_1": ms}}.
    Make the sessions with `session(..., spinning=False)`, or they take each other's cores."""
    out: dict[str, dict[str, Any]] = {name: {} for name in sessions}
    for bs in batch_sizes:
        reps = -(-bs // len(images))
        x = pixels(images.repeat(reps, 1, 1, 1)[:bs]).numpy()  # (bs, C, H, W)
        times = time_interleaved({name: (lambda s=sess, x=x: s.run([OUTPUT], {INPUT: x}))
                                  for name, sess in sessions.items()}, warmup, repeats)
        for name in sessions:
            med, low = round(statistics.median(times[name]), 4), round(min(times[name]), 4)
            out[name][batch_key(bs)] = {"median": med, "min": low} if stat == "both" else med
    return out


def export_and_check(models: dict[str, tuple[nn.Module, str | Path]], test: Split, card: dict,
                     cfg: ExportConfig) -> dict[str, Any]:
    """Export every named model, check parity on `test` and time all of them side by side.

    `models`: {"baseline": (model, "models/baseline.onnx"), "pruned": (...)}; the result is
    the content of reports/metrics/export.json."""
    result: dict[str, Any] = {"exporter": cfg.exporter, "opset": cfg.opset,
                              "threads": cfg.threads, "ort_allow_spinning": False, "models": {}}
    sessions = {}
    for name, (model, path) in models.items():
        model.eval()
        export_onnx(model, card, path, cfg)
        sessions[name] = session(path, cfg.threads, spinning=result["ort_allow_spinning"])
        result["models"][name] = {"path": str(path), "size_bytes": Path(path).stat().st_size,
                                  "parity": parity(model, sessions[name], test, card,
                                                   cfg.tolerance, cfg.max_outlier_fraction)}
    load = [round(v, 2) for v in os.getloadavg()]
    both = latency(sessions, test.images, cfg.latency_batch_sizes, cfg.latency_repeats,
                   stat="both")
    result["load_average"] = {"before": load, "after": [round(v, 2) for v in os.getloadavg()]}
    times = {name: {k: v["median"] for k, v in t.items()} for name, t in both.items()}
    for name, (model, _) in models.items():
        result["models"][name]["latency_ms"] = times[name]
        result["models"][name]["latency_ms_min"] = {k: v["min"] for k, v in both[name].items()}
        total = count_ops(model).total
        result["models"][name]["macs"] = total["bops"] + total["flops"]  # as onnxruntime runs it
    if "baseline" in times and "pruned" in times:
        result["speedup"] = {k: round(times["baseline"][k] / times["pruned"][k], 4)
                             for k in times["pruned"]}
        result["speedup_min"] = {
            k: round(result["models"]["baseline"]["latency_ms_min"][k]
                     / result["models"]["pruned"]["latency_ms_min"][k], 4) for k in times["pruned"]}
        # every binary conv runs as a float conv: the work ratio is (BOPs + FLOPs), not OPs
        mac_ratio = result["models"]["baseline"]["macs"] / result["models"]["pruned"]["macs"]
        result["mac_ratio"] = mac_ratio
        result["speedup_vs_mac_ratio"] = {k: round(v / mac_ratio, 4)
                                          for k, v in result["speedup"].items()}
        # the same after onnxruntime's NCHWc padding of channel counts (a diagnosis)
        executed = {name: executed_convs(path, model, cfg.threads)
                    for name, (model, path) in models.items()}
        for name, e in executed.items():
            result["models"][name]["onnxruntime_convs"] = e
        result["executed_mac_ratio"] = (executed["baseline"]["executed_macs"]
                                        / executed["pruned"]["executed_macs"])
    result["parity_passed"] = all(m["parity"]["passed"] for m in result["models"].values())
    return result


ONNX_MODEL_NAMES = {"baseline": "baseline_bnn_onnx", "pruned": "pruned_bnn_onnx"}
EXAMPLE_IMAGES = 4  # test images in a logged model's input example


def log_onnx_model(path: str | Path, card: dict, name: str, images: torch.Tensor) -> Any:
    """Log an exported model to the active MLflow run as `name`, with the first EXAMPLE_IMAGES
    of `images` (uint8 test images) as its input example, a signature and the file's sha256 as
    tag `onnx_sha256`. Returns the logged model (None without an active run)."""
    import mlflow
    from mlflow.models import infer_signature

    from bnnprune.pipeline.data import sha256

    if not mlflow.active_run():
        return None
    proto = verify(path, card)
    example = pixels(images[:EXAMPLE_IMAGES]).numpy()
    logits = session(path).run([OUTPUT], {INPUT: example})[0]
    return mlflow.onnx.log_model(
        proto, name=name, input_example={INPUT: example},
        signature=infer_signature({INPUT: example}, {OUTPUT: logits}),
        pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={ort.__version__}"],
        onnx_execution_providers=["CPUExecutionProvider"], save_as_external_data=False,
        tags={"onnx_sha256": sha256(Path(path))})


def export_metrics(result: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of an export result (reports/metrics/export.json), by the naming rule:
    `<model>/onnxruntime/latency_ms_b<batch>`, `speedup/onnxruntime_b<batch>`, ..."""
    out: dict[str, float] = {}
    for name, m in result["models"].items():
        out[f"{name}/onnx_file_bytes"] = m["size_bytes"]
        out[f"{name}/macs"] = m["macs"]
        for key, value in m["parity"].items():
            if isinstance(value, (int, float)) and key not in ("images", "tolerance"):
                out[f"{name}/parity/{key}"] = float(value)
        for stat, by_batch in (("latency_ms", m["latency_ms"]),
                               ("latency_min_ms", m["latency_ms_min"])):
            for batch, ms in by_batch.items():
                out[f"{name}/onnxruntime/{stat}_b{batch_size_of(batch)}"] = ms
    for key in ("speedup", "speedup_min", "speedup_vs_mac_ratio"):
        for batch, value in result.get(key, {}).items():
            out[f"{key}/onnxruntime_b{batch_size_of(batch)}"] = value
    if "mac_ratio" in result:
        out["mac_ratio"] = result["mac_ratio"]
    out["parity_passed"] = float(result["parity_passed"])
    return out


def require_parity(result: dict[str, Any]) -> None:
    """Raise when any model failed parity (after its metrics were written)."""
    failed = {name: m["parity"] for name, m in result["models"].items()
              if not m["parity"]["passed"]}
    if failed:
        lines = [f"{name}: {p['prediction_mismatches']} of {p['images']} predictions differ; "
                 f"{p['images_over_tolerance']} images differ (a prediction, or a logit by more "
                 f"than {p['tolerance']}; max {p['max_abs_logit_diff']:.3g}), "
                 f"{p['images_over_tolerance_at_sign_threshold']} of them explained by a binary "
                 f"input on the sign threshold (allowed: all of them, on at most "
                 f"{p['max_outlier_fraction']:.0%} of the images)" for name, p in failed.items()]
        raise ExportError("onnxruntime does not match torch: " + "; ".join(lines))
