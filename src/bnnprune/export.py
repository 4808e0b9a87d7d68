"""ONNX export for clients: pixels / 255 in, logits out, checked against torch in onnxruntime.

The exported graph is self-contained: one input `images`, float32 (N, C, H, W) in [0, 1]
(uint8 pixels / 255); the dataset normalisation (training-split mean/std) is inside the graph;
one output `logits` (N, num_classes). The batch axis is dynamic. Binarisation is exported as
standard ops (GreaterOrEqual + Where, Pad with +1, Conv), so plain onnxruntime runs it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from bnnprune.binary import binary_layers
from bnnprune.config import ExportConfig
from bnnprune.data import Split
from bnnprune.files import write_atomic
from bnnprune.models import BNN

INPUT, OUTPUT = "images", "logits"
BATCH_AXIS = "batch"


class ExportError(ValueError):
    """An ONNX file that is missing, not ONNX, or not a model with this project's contract."""


class ClientModel(nn.Module):
    """images (N, C, H, W) float32 in [0, 1] -> logits (N, classes), normalisation inside."""

    def __init__(self, model: BNN, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]: what a client feeds the ONNX model."""
    return images.float() / 255


def client_model(model: BNN, card: dict) -> ClientModel:
    return ClientModel(model, card["mean"], card["std"]).eval()


def export_onnx(model: BNN, card: dict, path: str | Path, cfg: ExportConfig) -> Path:
    """Write `model` as a client ONNX file at `path` (atomically) and verify its contract."""
    client = client_model(model, card)
    example = torch.rand(2, *card["shape"])  # (2, C, H, W); batch 2 keeps the axis symbolic

    def write(tmp: Path) -> None:
        quiet = io.StringIO()  # the exporters print progress and deprecation notes
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            if cfg.exporter == "dynamo":
                torch.onnx.export(
                    client, (example,), str(tmp), dynamo=True, external_data=False,
                    input_names=[INPUT], output_names=[OUTPUT], opset_version=cfg.opset,
                    dynamic_shapes={INPUT: {0: torch.export.Dim(BATCH_AXIS)}})
            else:
                torch.onnx.export(
                    client, (example,), str(tmp), dynamo=False, input_names=[INPUT],
                    output_names=[OUTPUT], opset_version=cfg.opset, do_constant_folding=True,
                    dynamic_axes={INPUT: {0: BATCH_AXIS}, OUTPUT: {0: BATCH_AXIS}})

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


def session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    """A plain onnxruntime CPU session with default graph optimisations (as a client gets)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(sess: ort.InferenceSession, images: torch.Tensor,
             batch_size: int = 500) -> np.ndarray:
    """uint8 images (N, C, H, W) -> logits (N, classes) from onnxruntime."""
    return np.concatenate([sess.run([OUTPUT], {INPUT: pixels(images[i:i + batch_size]).numpy()})[0]
                           for i in range(0, len(images), batch_size)])


@torch.no_grad()
def run_torch(model: BNN, card: dict, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """uint8 images (N, C, H, W) -> logits (N, classes) from torch, through the client wrapper."""
    client = client_model(model, card)
    return torch.cat([client(pixels(images[i:i + batch_size]))
                      for i in range(0, len(images), batch_size)]).numpy()


@torch.no_grad()
def near_threshold(model: BNN, card: dict, images: torch.Tensor, eps: float = 1e-5) -> np.ndarray:
    """Per image: does any binary layer see an input within `eps` of its sign threshold (0)?
    There float32 rounding order (torch vs onnxruntime kernels) decides the sign, so a logit
    difference on such an image is a tie, not an export bug."""
    found = torch.zeros(len(images), dtype=torch.bool)

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        found.logical_or_(inputs[0].abs().flatten(1).min(1).values < eps)

    handles = [m.register_forward_hook(hook) for m in binary_layers(model).values()]
    try:
        run_torch(model, card, images)
    finally:
        for h in handles:
            h.remove()
    return found.numpy()


def parity(model: BNN, sess: ort.InferenceSession, split: Split, card: dict,
           tolerance: float, max_outlier_fraction: float = 0.0) -> dict[str, Any]:
    """onnxruntime vs torch on a whole split. Passes when every prediction is identical and
    every image's logits are within `tolerance`, except at most `max_outlier_fraction` of the
    images, each of which must have a binary input on the sign threshold (see near_threshold)."""
    ref = run_torch(model, card, split.images)
    got = run_onnx(sess, split.images)
    labels = split.labels.numpy()
    mismatches = int((ref.argmax(1) != got.argmax(1)).sum())
    per_image = np.abs(ref - got).max(1)  # (N,)
    outliers = np.flatnonzero(per_image > tolerance)
    ties = near_threshold(model, card, split.images[torch.from_numpy(outliers)]) \
        if len(outliers) else np.zeros(0, dtype=bool)
    unexplained = int((~ties).sum())
    return {"images": len(split), "prediction_mismatches": mismatches,
            "max_abs_logit_diff": float(per_image.max()),
            "p999_abs_logit_diff": float(np.quantile(per_image, 0.999)),
            "tolerance": tolerance, "images_over_tolerance": len(outliers),
            "images_over_tolerance_at_sign_threshold": int(ties.sum()),
            "outlier_images": outliers[:20].tolist(),
            "passed": (mismatches == 0 and unexplained == 0
                       and len(outliers) <= max_outlier_fraction * len(split)),
            "test_acc_torch": float((ref.argmax(1) == labels).mean()),
            "test_acc_onnx": float((got.argmax(1) == labels).mean())}


def latency(sessions: dict[str, ort.InferenceSession], images: torch.Tensor,
            batch_sizes: list[int], repeats: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    """Median milliseconds per batch of each session, measured interleaved in one run so both
    models see the same machine load: {name: {"batch_1": ms, ...}}."""
    out: dict[str, dict[str, float]] = {name: {} for name in sessions}
    for bs in batch_sizes:
        reps = -(-bs // len(images))
        x = pixels(images.repeat(reps, 1, 1, 1)[:bs]).numpy()  # (bs, C, H, W)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for i in range(warmup + repeats):
            for name, sess in sessions.items():
                start = time.perf_counter()
                sess.run([OUTPUT], {INPUT: x})
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
        for name in sessions:
            out[name][f"batch_{bs}"] = round(1000 * statistics.median(times[name]), 4)
    return out


def export_and_check(models: dict[str, tuple[BNN, str | Path]], test: Split, card: dict,
                     cfg: ExportConfig) -> dict[str, Any]:
    """Export every named model, check parity on `test` and time all of them side by side.

    `models`: {"baseline": (model, "models/baseline.onnx"), "pruned": (...)}; the result is
    the content of reports/metrics/export.json."""
    result: dict[str, Any] = {"exporter": cfg.exporter, "opset": cfg.opset,
                              "threads": cfg.threads, "models": {}}
    sessions = {}
    for name, (model, path) in models.items():
        model.eval()
        export_onnx(model, card, path, cfg)
        sessions[name] = session(path, cfg.threads)
        result["models"][name] = {"path": str(path), "size_bytes": Path(path).stat().st_size,
                                  "parity": parity(model, sessions[name], test, card,
                                                   cfg.tolerance, cfg.max_outlier_fraction)}
    times = latency(sessions, test.images, cfg.latency_batch_sizes, cfg.latency_repeats)
    for name in models:
        result["models"][name]["latency_ms"] = times[name]
    if "baseline" in times and "pruned" in times:
        result["speedup"] = {k: round(times["baseline"][k] / times["pruned"][k], 4)
                             for k in times["pruned"]}
    result["parity_passed"] = all(m["parity"]["passed"] for m in result["models"].values())
    return result


def log_onnx_model(path: str | Path, card: dict, name: str = "model") -> None:
    """Log an exported model to the active MLflow run, with an input example and signature."""
    import mlflow
    from mlflow.models import infer_signature

    if not mlflow.active_run():
        return
    proto = verify(path, card)
    example = np.random.default_rng(0).random((2, *card["shape"]), dtype=np.float32)
    logits = session(path).run([OUTPUT], {INPUT: example})[0]
    mlflow.onnx.log_model(
        proto, name=name, input_example={INPUT: example},
        signature=infer_signature({INPUT: example}, {OUTPUT: logits}),
        pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={ort.__version__}"],
        onnx_execution_providers=["CPUExecutionProvider"], save_as_external_data=False)


def require_parity(result: dict[str, Any]) -> None:
    """Raise when any model failed parity (after its metrics were written)."""
    failed = {name: m["parity"] for name, m in result["models"].items()
              if not m["parity"]["passed"]}
    if failed:
        lines = [f"{name}: {p['prediction_mismatches']} of {p['images']} predictions differ; "
                 f"{p['images_over_tolerance']} images have a logit off by more than "
                 f"{p['tolerance']} (max {p['max_abs_logit_diff']:.3g}), "
                 f"{p['images_over_tolerance_at_sign_threshold']} of them explained by a binary "
                 f"input on the sign threshold" for name, p in failed.items()]
        raise ExportError("onnxruntime does not match torch: " + "; ".join(lines))
