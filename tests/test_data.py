import dataclasses
import gzip
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from bnnprune.pipeline.config import DataConfig, Subset
from bnnprune.pipeline.data import DataError, load_cifar10, load_prepared, prepare

from conftest import write_idx


def test_prepare_idx_split_stats_and_card(idx_root, tmp_path):
    cfg = DataConfig(dataset="fashion-mnist", root=str(idx_root), val_fraction=0.2, seed=3)
    card = prepare(cfg, tmp_path / "prep")
    assert card["sizes"] == {"train": 48, "val": 12, "test": 20}
    assert sum(card["class_counts"]["train"]) == 48
    assert len(card["sources"]) == 4 and all(len(s) == 64 for s in card["sources"].values())
    splits, card2 = load_prepared(tmp_path / "prep")
    assert card2 == card
    # statistics come from the training split only
    train = splits["train"].images.float() / 255
    assert card["mean"][0] == pytest.approx(train.mean().item(), rel=1e-5)
    # same seed -> same split; other seed -> another split
    again = prepare(cfg, tmp_path / "prep2")
    assert torch.equal(load_prepared(tmp_path / "prep2")[0]["val"].labels, splits["val"].labels)
    other = prepare(DataConfig(root=str(idx_root), val_fraction=0.2, seed=4), tmp_path / "p3")
    assert again["mean"] != other["mean"]


def test_subset_sizes(idx_root, tmp_path):
    cfg = DataConfig(root=str(idx_root), subset=Subset(train=10, val=5, test=7))
    assert prepare(cfg, tmp_path / "p")["sizes"] == {"train": 10, "val": 5, "test": 7}


@pytest.mark.parametrize("damage, message", [
    ("missing", "t10k-labels-idx1-ubyte[.gz]: file not found"),
    ("truncated", "truncated or oversized body"),
    ("magic", "wrong magic number 0x00000803; expected 0x00000801"),
    ("gzip", "cannot read"),
])
def test_bad_idx_files_are_named_and_leave_previous_outputs_intact(idx_root, tmp_path, damage,
                                                                   message):
    out = tmp_path / "prep"
    prepare(DataConfig(root=str(idx_root)), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    target = idx_root / "t10k-labels-idx1-ubyte.gz"
    if damage == "missing":
        target.unlink()
    elif damage == "truncated":
        target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes())[:-3]))
    elif damage == "magic":
        write_idx(target, np.zeros((20, 28, 28)))  # an images file where labels belong
    else:
        target.write_bytes(target.read_bytes()[:20])
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        prepare(DataConfig(root=str(idx_root)), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_single_class_or_empty_dataset_is_refused(tmp_path):
    root = tmp_path / "one"
    root.mkdir()
    for split, n in (("train", 30), ("t10k", 10)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.full(n, 3))
    with pytest.raises(DataError, match="train split has 27 images in 1 class"):
        prepare(DataConfig(root=str(root)), tmp_path / "p")
    with pytest.raises(DataError, match="does not exist"):
        prepare(DataConfig(root=str(tmp_path / "nowhere")), tmp_path / "p")


def make_cifar_archive(path, corrupt_member=None):
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            blob = pickle.dumps({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                                 b"labels": [0, 1, 2, 3]})
            if name == corrupt_member:
                blob = blob[:30]
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def test_cifar_archive_good_and_corrupt(tmp_path):
    train, test, sums = load_cifar10(make_cifar_archive(tmp_path / "cifar-10-python.tar.gz"))
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert list(sums) == ["cifar-10-python.tar.gz"]
    card = prepare(DataConfig(dataset="cifar10", root=str(tmp_path), val_fraction=0.2),
                   tmp_path / "prep")
    assert card["shape"] == [3, 32, 32] and len(card["mean"]) == 3
    bad = tmp_path / "bad"
    bad.mkdir()
    make_cifar_archive(bad / "cifar-10-python.tar.gz", corrupt_member="data_batch_3")
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR-10 python batch"):
        load_cifar10(bad)
    (bad / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="corrupt or truncated archive"):
        load_cifar10(bad)


def test_synthetic_is_deterministic(tmp_path):
    cfg = DataConfig(dataset="synthetic", subset=Subset(train=50, val=10, test=20))
    a = prepare(cfg, tmp_path / "a")
    b = prepare(cfg, tmp_path / "b")
    assert a["sizes"] == {"train": 50, "val": 10, "test": 20} and a == b
    prepare(dataclasses.replace(cfg, seed=1), tmp_path / "c")
    (same, _), (again, _), (other, _) = (load_prepared(tmp_path / k) for k in "abc")
    for split in ("train", "val", "test"):
        assert torch.equal(same[split].images, again[split].images), split
        assert torch.equal(same[split].labels, again[split].labels), split
        assert not torch.equal(same[split].images, other[split].images), split


def test_missing_debian_package_only_when_the_default_folder_is_needed(monkeypatch, tmp_path,
                                                                       idx_root):
    import bnnprune.pipeline.data as data

    monkeypatch.setitem(data.DEFAULT_ROOTS, "fashion-mnist", str(tmp_path / "absent"))
    assert data.missing_debian_package(DataConfig()) == "dataset-fashion-mnist"
    assert data.missing_debian_package(DataConfig(root=str(idx_root))) is None
    assert data.missing_debian_package(DataConfig(dataset="synthetic")) is None
    monkeypatch.setitem(data.DEFAULT_ROOTS, "fashion-mnist", str(idx_root))
    assert data.missing_debian_package(DataConfig()) is None
