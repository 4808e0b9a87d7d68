"""validate: check the whole params.yaml before any stage with outputs runs.

DVC deletes a stage's outputs before it runs the stage's command, so a bad value found by the
stage itself comes too late. Every other stage depends on this one's output, whose content
never changes: a valid edit re-runs only the stages whose own params changed, and an invalid
one stops `dvc repro` / `dvc exp run` here, before any output is touched.
"""

from bnnprune.cli import run_stage
from bnnprune.config import load_params
from bnnprune.files import write_atomic
from bnnprune.models import ARCHS
from bnnprune.prune import check_round_to, layer_name

OUT = ".bnnprune/params.valid"


def main() -> None:
    params = load_params()
    specs, _ = ARCHS[params.model.arch](params.model.width)
    check_round_to({layer_name(i): s.out for i, s in enumerate(specs) if s.binary},
                   params.prune.round_to)
    write_atomic(OUT, lambda p: p.write_text("params.yaml is valid\n"))
    print("params.yaml is valid")


if __name__ == "__main__":
    run_stage(main)
