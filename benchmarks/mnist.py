"""Reading MNIST from its original IDX files (gzipped or not), for the benchmarks.

The path is always an argument: nothing here assumes where the data lives.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FILES = {
    "train": ("train-images.idx3-ubyte", "train-labels.idx1-ubyte"),
    "test": ("t10k-images.idx3-ubyte", "t10k-labels.idx1-ubyte"),
}


def _read(path: Path, offset: int) -> np.ndarray:
    for candidate in (path.with_name(path.name + ".gz"), path):
        if candidate.exists():
            opener = gzip.open if candidate.suffix == ".gz" else open
            with opener(candidate, "rb") as fh:
                return np.frombuffer(fh.read(), np.uint8, offset=offset)
    raise FileNotFoundError(f"{path}(.gz) not found: pass the folder holding the MNIST IDX files with --data")


def load_mnist(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of the 'train' or 'test' split."""
    images, labels = FILES[split]
    x = _read(Path(folder) / images, 16).reshape(-1, 28, 28)
    y = _read(Path(folder) / labels, 8)
    if len(x) != len(y):
        raise ValueError(f"{folder}: {len(x)} images but {len(y)} labels in the {split} split")
    return x, y
