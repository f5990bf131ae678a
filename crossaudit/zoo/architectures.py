"""Three provider architectures; each normalises its own input, as the model contract asks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

ARCHITECTURES = ("cnn", "resnet", "mlp")


class Normalize(nn.Module):
    def __init__(self, mean: float = 0.3, std: float = 0.35) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def small_cnn(channels: int, size: int, classes: int) -> nn.Module:
    return nn.Sequential(
        Normalize(),
        nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (size // 4) ** 2, 64), nn.ReLU(),
        nn.Linear(64, classes),
    )  # fmt: skip


class Block(nn.Module):
    """Basic residual block; a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.skip(x))


def small_resnet(channels: int, size: int, classes: int) -> nn.Module:
    return nn.Sequential(
        Normalize(),
        nn.Conv2d(channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Block(16, 16, 1), Block(16, 32, 2), Block(32, 32, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes),
    )  # fmt: skip


def mlp(channels: int, size: int, classes: int) -> nn.Module:
    return nn.Sequential(
        Normalize(), nn.Flatten(),
        nn.Linear(channels * size * size, 256), nn.ReLU(),
        nn.Linear(256, 128), nn.ReLU(),
        nn.Linear(128, classes),
    )  # fmt: skip


def build(arch: str, channels: int, size: int, classes: int) -> nn.Module:
    builders = {"cnn": small_cnn, "resnet": small_resnet, "mlp": mlp}
    if arch not in builders:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    return builders[arch](channels, size, classes)
