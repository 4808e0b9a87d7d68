import pytest
import torch
from torch import nn

from bnnprune.core.binary import BinaryLinear
from bnnprune.core.files import save_torch
from bnnprune.core.flips import FlipCounter, FlipsError, load_flips


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = BinaryLinear(3, 1)


def set_weights(model, values):
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([values], dtype=torch.float32))


# sign sequences per weight (3 weights), one row per observation after the initial state
INITIAL = [0.5, -0.5, 0.5]
STEPS = [
    [-0.5, -0.5, 0.5],   # w0 flips
    [0.5, 0.5, 0.5],     # w0, w1 flip
    [0.5, 0.5, 0.0],     # 0.0 counts as +1: no flip
    [0.5, -0.1, -0.1],   # w1, w2 flip
]


def test_step_granularity_counts_every_sign_change_in_the_window_only():
    model = Tiny()
    set_weights(model, INITIAL)
    counter = FlipCounter(model, granularity="step")
    counter.active = False  # the training loop configures the interval per epoch
    set_weights(model, STEPS[0])
    counter.step()  # an epoch outside the window: not counted, but becomes the reference
    assert counter.end_epoch()["fc"] == pytest.approx(1 / 3)
    counter.active = True
    for values in STEPS[1:]:
        set_weights(model, values)
        counter.step()
    ratios = counter.end_epoch()
    assert counter.counts["fc"].tolist() == [[1, 2, 1]]
    assert counter.observations == 3
    assert ratios["fc"] == pytest.approx(4 / (3 * 3))  # 4 flips over 3 observations of 3 weights


def test_epoch_granularity_sees_only_end_of_epoch_snapshots():
    model = Tiny()
    set_weights(model, INITIAL)
    counter = FlipCounter(model, granularity="epoch")
    counter.active = False  # the training loop configures the interval per epoch
    counter.active = True
    for values in STEPS[:2]:  # epoch 1: w0 flips twice (back to +), w1 flips once
        set_weights(model, values)
        counter.step()  # no-op at epoch granularity
    counter.end_epoch()
    assert counter.counts["fc"].tolist() == [[0, 1, 0]]
    for values in STEPS[2:]:
        set_weights(model, values)
    counter.end_epoch()
    assert counter.counts["fc"].tolist() == [[0, 2, 1]]
    assert counter.observations == 2


def test_state_dict_roundtrip_continues_counting():
    model = Tiny()
    set_weights(model, INITIAL)
    counter = FlipCounter(model, granularity="step")
    counter.active = False  # the training loop configures the interval per epoch
    counter.active = True
    set_weights(model, STEPS[0])
    counter.step()
    counter.end_epoch()
    clone = FlipCounter(model, granularity="step")
    clone.load_state_dict(counter.state_dict())
    set_weights(model, STEPS[1])
    clone.step()
    clone.end_epoch()
    assert clone.counts["fc"].tolist() == [[2, 1, 0]]
    assert clone.observations == 2


def test_flips_file_must_match_the_model(tmp_path):
    model = Tiny()
    counter = FlipCounter(model)
    path = save_torch(tmp_path / "flips.pt", counter.export({"arch": "tiny"}, 1))
    assert load_flips(path, model)["observations"] == 0
    other = nn.Module()
    other.fc = BinaryLinear(4, 1)
    with pytest.raises(FlipsError, match=r"layer fc has flip counts of shape \(1, 3\)"):
        load_flips(path, other)
    renamed = nn.Module()
    renamed.head = BinaryLinear(3, 1)
    with pytest.raises(FlipsError, match="do not match the checkpoint's binary layers"):
        load_flips(path, renamed)
    with pytest.raises(FlipsError, match="not found"):
        load_flips(tmp_path / "missing.pt", model)
