"""Datasets: IDX (Fashion-MNIST, MNIST), CIFAR-10 python archive, synthetic; prepare and load."""

from __future__ import annotations

import gzip
import hashlib
import math
import pickle
import shutil
import struct
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bnnprune.core.errors import UserError
from bnnprune.core.files import load_json, save_json
from bnnprune.pipeline.config import DataConfig

DEFAULT_ROOTS = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
    "cifar10": "data/cifar10",
}
CLASSES = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
    "mnist": [str(i) for i in range(10)],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"],
    "synthetic": [f"class{i}" for i in range(10)],
}
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SPLITS = ("train", "val", "test")


class DataError(UserError, ValueError):
    """A missing, truncated or malformed dataset file, or an unusable dataset."""


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- IDX -----------------------------------------------------------------------------------

def find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root / stem}[.gz]: file not found; expected the IDX file {stem} or "
                    f"{stem}.gz in {root} (install Debian's dataset-fashion-mnist or set "
                    f"data.root to a folder holding the four IDX files)")


def read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) of unsigned bytes with `expected_dims` dims."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e}); expected a complete gzip IDX file") from e
    magic = 0x0800 | expected_dims
    if len(raw) < 4 + 4 * expected_dims:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    got = struct.unpack(">I", raw[:4])[0]
    if got != magic:
        raise DataError(f"{path}: wrong magic number 0x{got:08x}; expected 0x{magic:08x} "
                        f"(IDX, unsigned byte, {expected_dims} dimension(s))")
    dims = struct.unpack(f">{expected_dims}I", raw[4:4 + 4 * expected_dims])
    body = raw[4 + 4 * expected_dims:]
    if len(body) != int(np.prod(dims)):
        raise DataError(f"{path}: truncated or oversized body: {len(body)} bytes, expected "
                        f"{int(np.prod(dims))} for shape {dims}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_idx_dataset(root: Path) -> tuple[Split, Split, dict[str, str]]:
    paths = {k: find_idx(root, stem) for k, stem in IDX_FILES.items()}
    arrays = {k: read_idx(p, 3 if k.endswith("images") else 1) for k, p in paths.items()}
    out = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DataError(f"{paths[split + '_images']}: {len(images)} images but "
                            f"{paths[split + '_labels']} has {len(labels)} labels")
        # (N, H, W) -> (N, 1, H, W)
        out.append(Split(torch.from_numpy(images.copy()).unsqueeze(1),
                         torch.from_numpy(labels.astype(np.int64))))
    return out[0], out[1], {p.name: sha256(p) for p in paths.values()}


# ---- CIFAR-10 python archive ---------------------------------------------------------------

def _unpickle_batch(name: str, blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = pickle.loads(blob, encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:  # corrupt pickles raise many different types
        raise DataError(f"{name}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{name}: data of shape {data.shape} with {len(labels)} labels; "
                        f"expected (N, 3072) uint8 and N labels")
    # (N, 3072) -> (N, 3, 32, 32)
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: Path) -> tuple[Split, Split, dict[str, str]]:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    archive = root if root.suffix == ".gz" else root / "cifar-10-python.tar.gz"
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    blobs: dict[str, bytes] = {}
    if archive.is_file():
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                for n in names:
                    if n not in members:
                        raise DataError(f"{archive}: member {n} missing; expected "
                                        f"cifar-10-batches-py/{{{', '.join(names)}}}")
                    blobs[n] = tar.extractfile(members[n]).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{archive}: corrupt or truncated archive ({e})") from e
        sums = {archive.name: sha256(archive)}
    elif all((folder / n).is_file() for n in names):
        blobs = {n: (folder / n).read_bytes() for n in names}
        sums = {n: sha256(folder / n) for n in names}
    else:
        raise DataError(f"{root}: no CIFAR-10 data; expected cifar-10-python.tar.gz or the "
                        f"extracted folder cifar-10-batches-py with {', '.join(names)}")
    parts = [_unpickle_batch(n, blobs[n]) for n in names]
    train_x = np.concatenate([p[0] for p in parts[:5]])
    train_y = np.concatenate([p[1] for p in parts[:5]])
    test_x, test_y = parts[5]
    return (Split(torch.from_numpy(train_x), torch.from_numpy(train_y)),
            Split(torch.from_numpy(test_x.copy()), torch.from_numpy(test_y)), sums)


# ---- synthetic -----------------------------------------------------------------------------

def make_synthetic(n_train: int, n_test: int, seed: int, shape: tuple[int, int, int] = (1, 28, 28),
                   num_classes: int = 10) -> tuple[Split, Split]:
    """Learnable toy data: each class is a fixed random blob pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    coarse = torch.rand(num_classes, c, h // 4, w // 4, generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")

    def sample(n: int) -> Split:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=g)]
        noise = 0.35 * torch.randn(n, c, h, w, generator=g)
        images = ((templates[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
        return Split(images, labels)

    return sample(n_train), sample(n_test)


# ---- prepare -------------------------------------------------------------------------------

def load_source(cfg: DataConfig) -> tuple[Split, Split, dict[str, str]]:
    if cfg.dataset == "synthetic":
        vf = cfg.val_fraction  # enough images for both requested split sizes
        n_train = math.ceil(max((cfg.subset.train or 1000) / (1 - vf), (cfg.subset.val or 1) / vf))
        train, test = make_synthetic(n_train, cfg.subset.test or 200, cfg.seed)
        return train, test, {}
    root = Path(cfg.root or DEFAULT_ROOTS[cfg.dataset])
    if not root.exists():
        raise DataError(f"data.root {str(root)!r} does not exist; for {cfg.dataset} expected "
                        + ("cifar-10-python.tar.gz or its extracted folder"
                           if cfg.dataset == "cifar10" else
                           "a folder with the four IDX files (train-images-idx3-ubyte.gz, ...)"))
    if cfg.dataset == "cifar10":
        return load_cifar10(root)
    return load_idx_dataset(root)


def missing_debian_package(cfg: DataConfig) -> str | None:
    """The Debian package to install when the configured dataset relies on it and it is absent."""
    if cfg.dataset != "fashion-mnist" or cfg.root is not None:
        return None
    root = Path(DEFAULT_ROOTS["fashion-mnist"])
    return None if (root / (IDX_FILES["train_images"] + ".gz")).is_file() \
        else "dataset-fashion-mnist"


def split_train_val(train: Split, cfg: DataConfig) -> tuple[Split, Split]:
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train), generator=g)
    n_val = round(cfg.val_fraction * len(train))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if cfg.subset.train:
        train_idx = train_idx[: cfg.subset.train]
    if cfg.subset.val:
        val_idx = val_idx[: cfg.subset.val]
    return (Split(train.images[train_idx], train.labels[train_idx]),
            Split(train.images[val_idx], train.labels[val_idx]))


def check_usable(name: str, split: Split, min_classes: int) -> None:
    classes = int(split.labels.unique().numel()) if len(split) else 0
    if len(split) == 0 or classes < min_classes:
        raise DataError(f"{name} split has {len(split)} images in {classes} class(es); need at "
                        f"least {max(min_classes, 1)} classes (check data.subset and "
                        f"data.val_fraction)")


def prepare(cfg: DataConfig, out_dir: str | Path) -> dict:
    """Load, split, subset and write `out_dir/{train,val,test}.pt` + `card.json` atomically."""
    train_full, test, sources = load_source(cfg)
    train, val = split_train_val(train_full, cfg)
    if cfg.subset.test:
        test = Split(test.images[: cfg.subset.test], test.labels[: cfg.subset.test])
    check_usable("train", train, 2)
    check_usable("val", val, 1)
    check_usable("test", test, 1)
    x = train.images.float() / 255  # (N, C, H, W)
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    splits = {"train": train, "val": val, "test": test}
    num_classes = len(CLASSES[cfg.dataset])
    card = {
        "dataset": cfg.dataset,
        "shape": list(train.images.shape[1:]),
        "num_classes": num_classes,
        "classes": CLASSES[cfg.dataset],
        "sizes": {k: len(s) for k, s in splits.items()},
        "class_counts": {k: torch.bincount(s.labels, minlength=num_classes).tolist()
                         for k, s in splits.items()},
        "mean": mean,
        "std": std,
        "sources": sources,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
    }
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for k, s in splits.items():
            torch.save({"images": s.images.contiguous(), "labels": s.labels}, tmp / f"{k}.pt")
        save_json(tmp / "card.json", card)
        old = out_dir.with_name(f".{out_dir.name}.old")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return card


def load_prepared(data_dir: str | Path) -> tuple[dict[str, Split], dict]:
    data_dir = Path(data_dir)
    card_path = data_dir / "card.json"
    if not card_path.is_file():
        raise DataError(f"{card_path}: not found; run the prepare stage first (dvc repro prepare)")
    card = load_json(card_path)
    splits = {}
    for k in SPLITS:
        d = torch.load(data_dir / f"{k}.pt", weights_only=True)
        splits[k] = Split(d["images"], d["labels"])
    return splits, card


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 normalised with the training-split statistics."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s
