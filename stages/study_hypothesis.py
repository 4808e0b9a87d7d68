"""study_hypothesis: the direct test of "weights that flip often are insensitive": the loss
rise when one sampled channel alone is removed, rank-correlated with each criterion's score,
per unit (bootstrap CIs); and p_l against the unit sensitivities. A unit is a binary layer of a
chain model, a prunable coupled channel group of any other (see study_sensitivity)."""

from bnnprune.cli import run_stage
from bnnprune.core.files import load_json, save_json
from bnnprune.core.flips import load_flips
from bnnprune.models import load_checkpoint
from bnnprune.pipeline.config import load_params
from bnnprune.pipeline.data import load_prepared
from bnnprune.pipeline.tracking import layer_segment, log_artifacts, log_metrics, stage_run
from bnnprune.pipeline.train import fingerprint
from bnnprune.study.cells import channel_sensitivity, head, hypothesis_tables, set_threads

BASELINE, FLIPS = "models/baseline.pt", "models/flips.pt"
LAYERS, OUT = "reports/study/layer_sensitivity.json", "reports/study/hypothesis.json"


def main() -> None:
    params = load_params()
    study, prune = params.study, params.prune
    baseline, ckpt = load_checkpoint(BASELINE, arch=params.model.arch)
    flips = load_flips(FLIPS, baseline)
    layers = load_json(LAYERS)["layers"]
    splits, card = load_prepared("data/prepared")
    set_threads(params.finetune.threads)
    groups = {"study": study, "prune": prune}
    with stage_run("study_hypothesis", groups, fingerprint(groups, ckpt["meta"], layers)):
        val = head(splits["val"], study.sensitivity_images)
        channels = channel_sensitivity(baseline, val, card, study.channel_samples)
        tables = hypothesis_tables(baseline, flips, layers, channels, prune, study.bootstrap)
        save_json(OUT, {"val_images": len(val), "samples_per_layer": study.channel_samples,
                        "loss_rise": {n: {str(c): v for c, v in s.items()}
                                      for n, s in channels.items()}, **tables})
        log_metrics({f"rho/{c}/{layer_segment(n).replace(' ', '_')}": r["rho"]
                     for c, rows in tables["channels"].items() for n, r in rows.items()
                     if r["rho"] == r["rho"]})
        log_artifacts(OUT)
    for criterion, rows in tables["channels"].items():
        r = rows["all layers"]
        print(f"{criterion}: Spearman rho (score vs insensitivity, all sampled channels) "
              f"{r['rho']:+.3f} [{r['lo']}, {r['hi']}]")


if __name__ == "__main__":
    run_stage(main)
