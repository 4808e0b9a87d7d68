"""prepare: read the raw dataset, split train/val, write data/prepared/ and its card."""

from bnnprune.cli import run_stage
from bnnprune.pipeline.config import load_params
from bnnprune.pipeline.data import prepare
from bnnprune.pipeline.tracking import log_artifacts, log_metrics, stage_run
from bnnprune.pipeline.train import fingerprint

OUT = "data/prepared"


def main() -> None:
    params = load_params()
    with stage_run("prepare", {"data": params.data}, fingerprint(params.data)):
        card = prepare(params.data, OUT)
        log_metrics({f"images/{k}": v for k, v in card["sizes"].items()})
        log_artifacts(f"{OUT}/card.json")
    print(f"prepared {card['dataset']}: {card['sizes']} -> {OUT}")


if __name__ == "__main__":
    run_stage(main)
