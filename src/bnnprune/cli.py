"""`bnnprune` command line, and the error handling every stage script shares."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from bnnprune.config import ConfigError
from bnnprune.data import DataError
from bnnprune.flips import FlipsError
from bnnprune.models import CheckpointError
from bnnprune.tracking import TrackingError
from bnnprune.train import TrainingError

USER_ERRORS = (ConfigError, DataError, FlipsError, CheckpointError, TrackingError, TrainingError)


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage's main(); a user error becomes one clear line on stderr and exit code 2."""
    try:
        main()
    except USER_ERRORS as e:
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
    args = parser.parse_args(argv)
    if args.command == "bench-flips":
        from bnnprune.bench_flips import main as bench_flips

        bench_flips(args.steps, args.batch_size, args.threads, args.repeats)


if __name__ == "__main__":
    main()
