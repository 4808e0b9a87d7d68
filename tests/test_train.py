import pytest
import torch

from bnnprune.models import build_model, model_config
from bnnprune.pipeline.config import DataConfig, Subset, TrainConfig
from bnnprune.pipeline.data import load_prepared, prepare
from bnnprune.pipeline.train import TrainingError, fit

CFG = TrainConfig(epochs=3, batch_size=32, lr=0.01, threads=1, flip_window=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(DataConfig(dataset="synthetic", subset=Subset(train=160, val=40, test=40)), out)
    return load_prepared(out)


def run(tiny, cfg=CFG, resume=None):
    splits, card = tiny
    model = build_model(model_config("cnn", 0.25, card["shape"], 10), seed=cfg.seed)
    return fit(model, splits["train"], splits["val"], card, cfg, resume)


def test_training_learns_and_is_deterministic(tiny):
    a, b = run(tiny), run(tiny)
    assert a.history == b.history
    for name, counts in a.flips.counts.items():
        assert torch.equal(counts, b.flips.counts[name])
    assert a.history[-1]["val_acc"] > 0.5  # 10 classes: chance is 0.1
    steps = 5  # ceil(160 / 32)
    assert a.flips.observations == CFG.flip_window * steps
    assert sum(int(c.sum()) for c in a.flips.counts.values()) > 0


def test_non_finite_loss_stops_with_epoch_and_step(tiny):
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at epoch 1 step \d+"):
        run(tiny, TrainConfig(epochs=1, batch_size=32, lr=1e30, threads=1))


def test_resume_after_interruption_equals_uninterrupted_run(tiny, tmp_path):
    full = run(tiny)
    resume = tmp_path / "resume.pt"
    assert run_until(tiny, 1, resume) == 1
    assert torch.load(resume, weights_only=False)["epoch"] == 0
    resumed = run(tiny, CFG, resume)
    assert resumed.resumed_from_epoch == 1
    assert resumed.history == full.history
    for name, counts in full.flips.counts.items():
        assert torch.equal(counts, resumed.flips.counts[name])
    # a state saved under another config is ignored, not resumed
    other = run(tiny, TrainConfig(**{**CFG.__dict__, "lr": 0.02}), resume)
    assert other.resumed_from_epoch == 0


def run_until(tiny, epochs_done, resume_path):
    """Run CFG but stop (as if killed) after `epochs_done` epochs, leaving the resume state."""
    import bnnprune.pipeline.train as train_mod

    original = train_mod.evaluate
    calls = {"n": 0}

    def evaluate_then_die(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > epochs_done:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    train_mod.evaluate = evaluate_then_die
    try:
        run(tiny, CFG, resume_path)
    except KeyboardInterrupt:
        pass
    finally:
        train_mod.evaluate = original
    return calls["n"] - 1
