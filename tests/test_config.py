import pytest

from bnnprune.pipeline.config import ConfigError, Params, load_params, parse_params

from conftest import REPO


def test_committed_params_parse_and_defaults_fill_in():
    params = load_params(REPO / "params.yaml")
    assert params.data.dataset == "fashion-mnist"
    assert parse_params({}) == Params()
    assert parse_params({"train": {"lr": 1}}).train.lr == 1.0  # int accepted as float


@pytest.mark.parametrize("raw, fragment", [
    ({"trian": {}}, "trian: unknown key; did you mean 'train'?"),
    ({"train": {"epoch": 3}}, "train.epoch: unknown key; did you mean 'epochs'?"),
    ({"train": {"epochs": "ten"}}, "train.epochs: 'ten' is not allowed; expected an integer"),
    ({"train": {"epochs": True}}, "train.epochs: True is not allowed"),
    ({"train": {"epochs": 0}}, "train.epochs: 0 is out of range; allowed: [1, 10000]"),
    ({"train": {"lr": -0.1}}, "train.lr: -0.1 is out of range"),
    ({"data": {"val_fraction": 1.0}},
     "data.val_fraction: 1.0 is out of range; allowed: (0.0, 1.0)"),
    ({"data": {"dataset": "imagenet"}}, "data.dataset: 'imagenet' is not allowed; expected one of"),
    ({"data": {"subset": {"train": 0}}}, "data.subset.train: 0 is out of range"),
    ({"data": {"subset": {"trainn": 5}}}, "did you mean 'train'?"),
    ({"model": {"arch": "resnet"}}, "model.arch: 'resnet' is not allowed"),
    ({"train": {"flip_granularity": "batch"}}, "expected one of 'step', 'epoch'"),
    ({"train": []}, "train: [] is not allowed; expected a mapping"),
    ({"prune": {"max_pruning_ratio": 0}},
     "prune.max_pruning_ratio: 0 is out of range; allowed: (0.0, 1.0]"),
    ({"prune": {"max_pruning_ratio": 1.5}}, "prune.max_pruning_ratio: 1.5 is out of range"),
])
def test_bad_values_name_key_value_and_allowed(raw, fragment):
    with pytest.raises(ConfigError) as e:
        parse_params(raw)
    assert fragment in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "p.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
