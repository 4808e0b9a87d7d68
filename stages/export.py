"""export: baseline and pruned fine-tuned model -> ONNX; parity with torch and latency in
onnxruntime on the test set; both models are logged to MLflow (baseline_bnn_onnx,
pruned_bnn_onnx), once parity passed."""

from bnnprune.cli import run_stage
from bnnprune.core.files import save_json
from bnnprune.models import load_checkpoint
from bnnprune.pipeline.config import load_params
from bnnprune.pipeline.data import load_prepared, sha256
from bnnprune.pipeline.export import (
    ONNX_MODEL_NAMES,
    export_and_check,
    export_metrics,
    log_onnx_model,
    require_parity,
)
from bnnprune.pipeline.tracking import log_artifacts, log_metrics, stage_run
from bnnprune.pipeline.train import fingerprint

MODELS = {"baseline": ("models/baseline.pt", "models/baseline.onnx"),
          "pruned": ("models/finetuned.pt", "models/model.onnx")}
OUT = "reports/metrics/export.json"


def main() -> None:
    params = load_params()
    splits, card = load_prepared("data/prepared")
    cfg = params.export
    loaded = {name: (load_checkpoint(pt)[0], onnx) for name, (pt, onnx) in MODELS.items()}
    key = fingerprint(cfg, card["sources"], [sha256(pt) for pt, _ in MODELS.values()])
    with stage_run("export", {"export": cfg}, key):
        result = export_and_check(loaded, splits["test"], card, cfg)
        save_json(OUT, result)
        log_metrics(export_metrics(result))
        log_artifacts(OUT)
        require_parity(result)
        for name, (_, onnx_path) in MODELS.items():  # the report stage registers the pruned one
            log_onnx_model(onnx_path, card, ONNX_MODEL_NAMES[name], splits["test"].images)
    for name, m in result["models"].items():
        p = m["parity"]
        print(f"export {name}: {m['path']} {m['size_bytes']} bytes; parity on {p['images']} "
              f"images: {p['prediction_mismatches']} mismatches, max |logit diff| "
              f"{p['max_abs_logit_diff']:.2e}; latency {m['latency_ms']} ms")
    print(f"export: onnxruntime speedup pruned vs baseline {result.get('speedup')} (from min "
          f"times {result.get('speedup_min')}); MAC ratio {result.get('mac_ratio')}, speedup "
          f"as a share of it {result.get('speedup_vs_mac_ratio')}; load "
          f"{result.get('load_average')}")


if __name__ == "__main__":
    run_stage(main)
