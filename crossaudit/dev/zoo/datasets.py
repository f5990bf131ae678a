"""Real datasets for the zoo: Fashion-MNIST (Debian's dataset-fashion-mnist), sklearn
digits, and colour Fashion-MNIST at 32x32 for models of realistic size."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossaudit.errors import AuditError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("fmnist", "digits", "cfmnist")


@dataclass(frozen=True)
class Split:
    """Train and held-out images (N x 1 x H x W, float32 in [0, 1]) with int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist() -> Split:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        raise AuditError(
            f"Fashion-MNIST not found under {FASHION_MNIST_DIR}: "
            "install it with `apt-get install dataset-fashion-mnist`"
        )

    def images(name: str) -> np.ndarray:
        return (_read_idx(FASHION_MNIST_DIR / name)[:, None] / 255.0).astype(np.float32)

    def labels(name: str) -> np.ndarray:
        return _read_idx(FASHION_MNIST_DIR / name).astype(np.int64)

    return Split(
        images("train-images-idx3-ubyte.gz"),
        labels("train-labels-idx1-ubyte.gz"),
        images("t10k-images-idx3-ubyte.gz"),
        labels("t10k-labels-idx1-ubyte.gz"),
    )


def digits() -> Split:
    """sklearn's 8x8 digits, upsampled to 16x16 so patch triggers and convs have room."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.kron(bunch.images / 16.0, np.ones((2, 2)))[:, None].astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.RandomState(0).permutation(len(x))
    train, test = order[:1300], order[1300:]
    return Split(x[train], y[train], x[test], y[test])


def colour_fashion_mnist() -> Split:
    """Fashion-MNIST as 32x32 RGB: each image padded by two pixels and painted with its own
    random garment and background colours (drawn from the image's index, not its class,
    so colour says nothing about the label). The input of CIFAR-sized models (a ResNet-18,
    a small ViT) from real images, without a download."""
    grey = fashion_mnist()

    def paint(x: np.ndarray, seed: int) -> np.ndarray:
        rng = np.random.RandomState(seed)
        garment = rng.uniform(0.4, 1.0, (len(x), 3, 1, 1)).astype(np.float32)
        background = rng.uniform(0.0, 0.3, (len(x), 3, 1, 1)).astype(np.float32)
        padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
        return padded * garment + (1 - padded) * background

    return Split(paint(grey.x_train, 0), grey.y_train, paint(grey.x_test, 1), grey.y_test)


def load_dataset(name: str) -> Split:
    if name == "fmnist":
        return fashion_mnist()
    if name == "cfmnist":
        return colour_fashion_mnist()
    if name == "digits":
        return digits()
    raise AuditError(f"unknown dataset {name!r}; expected one of {DATASETS}")
