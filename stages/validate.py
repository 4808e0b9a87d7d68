"""validate: check the whole params.yaml before any stage with outputs runs.

DVC deletes a stage's outputs before it runs the stage's command, so a bad value found by the
stage itself comes too late. Every other stage depends on this one's output, whose content
never changes: a valid edit re-runs only the stages whose own params changed, and an invalid
one stops `dvc repro` / `dvc exp run` here, before any output is touched.
"""

from pathlib import Path

from bnnprune.cli import run_stage
from bnnprune.core.files import write_atomic
from bnnprune.models import build_model, model_config
from bnnprune.models.birealnet import default_channels
from bnnprune.models.chain import ARCHS
from bnnprune.pipeline.config import flat_dict, load_params
from bnnprune.pipeline.pruning import check_round_to, layer_name
from bnnprune.pipeline.tracking import log_params, stage_run
from bnnprune.pipeline.train import fingerprint

OUT, PARAMS = ".bnnprune/params.valid", Path("params.yaml")


def main() -> None:
    # the run opens before parsing: an invalid params.yaml ends it FAILED with the error
    with stage_run("validate", {}, fingerprint(PARAMS.read_text() if PARAMS.is_file() else "")):
        params = load_params(PARAMS)
        m = params.model
        if m.arch in ARCHS:
            specs, _ = ARCHS[m.arch](m.width)
            widths = {layer_name(i): s.out for i, s in enumerate(specs) if s.binary}
        elif m.arch == "birealnet":
            widths = {f"stage {s}": c for s, c in enumerate(default_channels(m.width))}
        else:  # a user's model: importable, callable, with binary layers (else a clear error)
            build_model(model_config(m.arch, m.width, [1, 1, 1], 1, m.kwargs, m.binary))
            widths = {}
        if widths:
            check_round_to(widths, params.prune.round_to)
        log_params(flat_dict(params))
        write_atomic(OUT, lambda p: p.write_text("params.yaml is valid\n"))
    print("params.yaml is valid")


if __name__ == "__main__":
    run_stage(main)
