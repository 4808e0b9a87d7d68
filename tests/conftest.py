import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
REPO = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray, magic_dims: int | None = None,
              compress: bool = True) -> Path:
    dims = array.ndim if magic_dims is None else magic_dims
    raw = struct.pack(">I", 0x0800 | dims) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.fixture
def idx_root(tmp_path: Path) -> Path:
    """A tiny Fashion-MNIST-style folder: 60 train and 20 test 28x28 images, 10 classes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "idx"
    root.mkdir()
    for split, n in (("train", 60), ("t10k", 20)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
