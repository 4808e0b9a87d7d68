import datetime

import pytest
import torch
from torch import nn

from bnnprune.core.binary import BinaryLinear
from bnnprune.core.files import save_torch
from bnnprune.core.flips import FlipCounter, FlipsError, interval_counts, load_flips


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


def test_granularity_must_be_step_or_epoch():
    with pytest.raises(ValueError, match=r"^flip granularity 'batch'; allowed: 'step', 'epoch'$"):
        FlipCounter(Tiny(), granularity="batch")
    counter = FlipCounter(Tiny())
    assert (counter.granularity, counter.active, counter.tail) == ("step", None, False)
    assert (counter.observations, counter.tail_observations) == (0, 0)
    assert counter.counts["fc"].dtype == torch.int32
    assert counter.tail_counts["fc"].tolist() == [[0, 0, 0]]


def test_without_an_interval_every_step_counts_at_once():
    model = Tiny()
    set_weights(model, INITIAL)
    counter = FlipCounter(model)  # active None
    for values in STEPS:
        set_weights(model, values)
        counter.step()
    assert counter.counts["fc"].tolist() == [[2, 2, 1]]
    assert counter.observations == 4
    assert counter.end_epoch()["fc"] == pytest.approx(5 / (3 * 4))
    assert counter.counts["fc"].tolist() == [[2, 2, 1]]  # not added a second time
    assert counter.observations == 4
    assert counter.tail_counts["fc"].tolist() == [[0, 0, 0]]


def test_tail_epochs_count_apart_from_the_window_and_epochs_start_afresh():
    model = Tiny()
    set_weights(model, INITIAL)
    counter = FlipCounter(model)
    counter.active, counter.tail = True, False
    set_weights(model, STEPS[0])
    counter.step()  # w0
    assert counter.end_epoch()["fc"] == pytest.approx(1 / 3)
    counter.active, counter.tail = False, True
    for values in STEPS[1:3]:  # w0, w1; then nothing
        set_weights(model, values)
        counter.step()
    assert counter.end_epoch()["fc"] == pytest.approx(2 / (3 * 2))
    assert counter.counts["fc"].tolist() == [[1, 0, 0]]
    assert counter.observations == 1
    assert counter.tail_counts["fc"].tolist() == [[1, 1, 0]]
    assert counter.tail_observations == 2
    counter.active, counter.tail = False, False
    assert counter.end_epoch()["fc"] == 0.0  # an epoch without observations
    counter.active = counter.tail = True  # both at once: the epoch goes to both
    set_weights(model, STEPS[3])
    counter.step()  # w1, w2
    assert counter.end_epoch()["fc"] == pytest.approx(2 / 3)
    assert counter.counts["fc"].tolist() == [[1, 1, 1]]
    assert counter.tail_counts["fc"].tolist() == [[1, 2, 1]]
    assert (counter.observations, counter.tail_observations) == (2, 3)


def test_state_dict_holds_everything_and_loading_copies_it():
    model = Tiny()
    set_weights(model, INITIAL)
    counter = FlipCounter(model)
    counter.active, counter.tail = True, True
    set_weights(model, STEPS[0])
    counter.step()
    counter.end_epoch()
    state = counter.state_dict()
    assert state["prev"]["fc"].tolist() == [[False, False, True]]
    assert state["counts"]["fc"].tolist() == state["tail_counts"]["fc"].tolist() == [[1, 0, 0]]
    assert (state["observations"], state["tail_observations"]) == (1, 1)
    assert (state["active"], state["tail"]) == (True, True)
    clone = FlipCounter(model)
    clone.load_state_dict(state)
    assert (clone.active, clone.tail, clone.tail_observations) == (True, True, 1)
    set_weights(model, STEPS[1])
    clone.step()
    clone.end_epoch()
    assert clone.counts["fc"].tolist() == clone.tail_counts["fc"].tolist() == [[2, 1, 0]]
    # counting on changed neither the state nor the counter it came from
    assert state["counts"]["fc"].tolist() == counter.counts["fc"].tolist() == [[1, 0, 0]]
    assert state["tail_counts"]["fc"].tolist() == counter.tail_counts["fc"].tolist() == [[1, 0, 0]]
    assert state["prev"]["fc"].tolist() == counter.prev["fc"].tolist() == [[False, False, True]]


def test_export_is_the_flips_file_content():
    model = Tiny()
    set_weights(model, INITIAL)
    counter = FlipCounter(model, granularity="epoch")
    counter.active, counter.tail = True, True
    set_weights(model, STEPS[0])
    counter.end_epoch()
    flips = counter.export({"arch": "tiny"}, 3, 2)
    assert flips["counts"]["fc"].tolist() == flips["tail_counts"]["fc"].tolist() == [[1, 0, 0]]
    assert {k: v for k, v in flips.items() if "counts" not in k} == {
        "observations": 1, "tail_observations": 1, "granularity": "epoch",
        "window_epochs": 3, "tail_epochs": 2, "model_config": {"arch": "tiny"}}
    assert counter.export({}, 1)["tail_epochs"] == 0


def test_interval_counts_and_an_unreadable_flips_file(tmp_path):
    flips = {"counts": {"fc": 1}, "tail_counts": {"fc": 2}, "tail_observations": 4}
    assert interval_counts(flips, "window") == {"fc": 1}
    assert interval_counts(flips, "tail") == {"fc": 2}
    with pytest.raises(FlipsError, match=r"^flip interval 'last'; allowed: 'window', 'tail'$"):
        interval_counts(flips, "last")
    for no_tail in ({**flips, "tail_observations": 0}, {"counts": {}, "tail_counts": {}}):
        with pytest.raises(FlipsError, match=r"^flip interval 'tail': the baseline was trained "
                                             r"without a tail \(train.tail_epochs: 0\); "
                                             r"allowed: set train.tail_epochs >= 1, or use the "
                                             r"interval 'window'$"):
            interval_counts(no_tail, "tail")
    garbage = tmp_path / "flips.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(FlipsError, match=r"flips.pt: not a bnnprune flips file \("):
        load_flips(garbage, Tiny())
    no_counts = save_torch(tmp_path / "other.pt", {"weights": torch.zeros(1)})
    with pytest.raises(FlipsError, match=r"other.pt: not a bnnprune flips file \(KeyError"):
        load_flips(no_counts, Tiny())


def test_a_flips_file_is_never_unpickled_beyond_tensors_and_containers(tmp_path):
    model = Tiny()
    flips = FlipCounter(model).export({"arch": "tiny"}, 1)
    flips["made_on"] = datetime.date(2026, 1, 1)  # any object beyond tensors needs full pickle
    path = save_torch(tmp_path / "flips.pt", flips)
    with pytest.raises(FlipsError, match=r"flips.pt: not a bnnprune flips file "
                                         r"\(UnpicklingError: Weights only load failed"):
        load_flips(path, model)


def test_a_weight_of_exactly_zero_at_construction_counts_as_positive():
    # sign(0) is +1 in the forward pass, so 0.0 -> -0.5 is a flip and 0.0 -> 0.5 is not
    model = Tiny()
    set_weights(model, [0.0, 0.0, -0.5])
    counter = FlipCounter(model)
    set_weights(model, [-0.5, 0.5, 0.0])
    counter.step()
    assert counter.counts["fc"].tolist() == [[1, 0, 1]]
