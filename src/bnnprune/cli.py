"""`bnnprune` command line, and the error handling every stage script shares."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from bnnprune.core.errors import UserError


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage's main(); a user error becomes one clear line on stderr and exit code 2.
    (Nothing heavy is imported here: a stage loads only what it uses.)"""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bnnprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench-flips", help="overhead of flip logging on the training step")
    bench.add_argument("--steps", type=int, default=30)
    bench.add_argument("--batch-size", type=int, default=128)
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--repeats", type=int, default=5)
    check = sub.add_parser("check", help="regression gate: reports/summary.json against the "
                           "gate params; exit 1 with a table of what regressed")
    check.add_argument("--summary", default="reports/summary.json")
    check.add_argument("--params", default="params.yaml")
    sub.add_parser("study", help="the newest criteria study's table (mean, 95%% CI, paired "
                   "differences), rebuilt from its cell runs in MLflow")
    compare = sub.add_parser("compare", help="table of the MLflow summary runs (one per "
                             "pipeline execution): differing params and headline metrics")
    compare.add_argument("--max-runs", type=int, default=20)
    compare.add_argument("--all-params", action="store_true", help="show every param")
    sub.add_parser("backfill", help="log what stages journaled while MLflow was unreachable "
                   "(.bnnprune/journal/) into their runs")
    verify = sub.add_parser("verify-onnx", help="check that an .onnx file is a client model "
                            "(input 'images' [batch, C, H, W] float32, output 'logits')")
    verify.add_argument("path")
    verify.add_argument("--card", default="data/prepared/card.json",
                        help="dataset card for the expected shapes ('' to skip)")
    args = parser.parse_args(argv)
    if args.command == "check":
        from bnnprune.reports.gate import run as gate

        run_stage(lambda: sys.exit(gate(args.summary, args.params)))
    elif args.command == "study":
        from bnnprune.study.report import study_from_mlflow

        run_stage(lambda: print(study_from_mlflow()))
    elif args.command == "compare":
        from bnnprune.tracking.runs import compare as compare_runs

        run_stage(lambda: print(compare_runs(args.max_runs, args.all_params)))
    elif args.command == "backfill":
        from bnnprune.pipeline.tracking import backfill

        run_stage(lambda: print("\n".join(backfill()) or "nothing to back-fill"))
    elif args.command == "verify-onnx":
        run_stage(lambda: verify_onnx(args.path, args.card))
    if args.command == "bench-flips":
        from bnnprune.pipeline.bench_flips import main as bench_flips

        bench_flips(args.steps, args.batch_size, args.threads, args.repeats)


def verify_onnx(path: str, card_path: str) -> None:
    from pathlib import Path

    from bnnprune.core.files import load_json
    from bnnprune.pipeline.export import verify

    card = load_json(card_path) if card_path and Path(card_path).is_file() else None
    model = verify(path, card)
    print(f"{path}: OK, a client model (opset {model.opset_import[0].version}, "
          f"{len(model.graph.node)} nodes)")


if __name__ == "__main__":
    main()
