"""study_sensitivity: the latent-weight paper's layer analysis on the baseline (each unit alone
loses study.sensitivity_ratio of its channels; validation drop), which the `latent` method's
allocation reads. A unit is a binary layer of a chain model (cnn, nin, alexnet), a prunable
coupled channel group of any other (birealnet: one per stage; a user's model)."""

from bnnprune.cli import run_stage
from bnnprune.core.files import save_json
from bnnprune.models import load_checkpoint
from bnnprune.pipeline.config import load_params
from bnnprune.pipeline.data import load_prepared
from bnnprune.pipeline.tracking import layer_segment, log_artifacts, log_metrics, stage_run
from bnnprune.pipeline.train import fingerprint
from bnnprune.study.cells import head, layer_sensitivity, set_threads

BASELINE, OUT = "models/baseline.pt", "reports/study/layer_sensitivity.json"


def main() -> None:
    params = load_params()
    study, prune = params.study, params.prune
    baseline, ckpt = load_checkpoint(BASELINE, arch=params.model.arch)
    splits, card = load_prepared("data/prepared")
    set_threads(params.finetune.threads)
    groups = {"study": study, "prune": prune}
    with stage_run("study_sensitivity", groups, fingerprint(groups, ckpt["meta"])):
        layers = layer_sensitivity(baseline, head(splits["val"], study.sensitivity_images),
                                   card, study.sensitivity_ratio, prune)
        save_json(OUT, {"ratio": study.sensitivity_ratio,
                        "val_images": min(study.sensitivity_images, len(splits["val"])),
                        "layers": layers})
        log_metrics({f"drop_pt/{layer_segment(n)}": r["drop_pt"] for n, r in layers.items()})
        log_artifacts(OUT)
    for name, r in layers.items():
        print(f"{name}: keep {r['kept']}/{r['channels']} -> val drop {r['drop_pt']:+.2f} pt")


if __name__ == "__main__":
    run_stage(main)
