"""Provider architectures; each normalises its own input, as the model contract asks.

The zoo's four small ones (`ARCHITECTURES`) train in seconds on 2 cores; the sized ones
(`SIZED`: a ResNet-18 at several widths, a small ViT) measure what an audit of a model of
realistic size costs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

ARCHITECTURES = ("cnn", "resnet", "mlp", "mobilenet")


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


def separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """MobileNet's depthwise-separable block: a 3x3 convolution per channel, then a 1x1 across them."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(),
    )  # fmt: skip


def small_mobilenet(channels: int, size: int, classes: int) -> nn.Module:
    """A MobileNet-style net: a family whose features (grouped convolutions, ReLU6) differ
    from the CNN's and the ResNet's, so that clean pairs span how providers actually differ."""
    return nn.Sequential(
        Normalize(),
        nn.Conv2d(channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        separable(16, 32, 2), separable(32, 64, 2), separable(64, 64, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes),
    )  # fmt: skip


def mlp(channels: int, size: int, classes: int) -> nn.Module:
    return nn.Sequential(
        Normalize(), nn.Flatten(),
        nn.Linear(channels * size * size, 256), nn.ReLU(),
        nn.Linear(256, 128), nn.ReLU(),
        nn.Linear(128, classes),
    )  # fmt: skip


def resnet18(channels: int, size: int, classes: int, width: int = 64) -> nn.Module:
    """ResNet-18 (four stages of two basic blocks, widths `width` x 1, 2, 4, 8; 11.2M
    parameters at width 64) for small images: a stride-2 3x3 stem in place of ImageNet's
    7x7 convolution and max pool, which would leave a 32x32 input 8x8 before any block."""
    widths = [width, 2 * width, 4 * width, 8 * width]
    layers: list[nn.Module] = [
        Normalize(), nn.Conv2d(channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
    ]  # fmt: skip
    cin = width
    for stage, cout in enumerate(widths):
        layers += [Block(cin, cout, 1 if stage == 0 else 2), Block(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


class VisionTransformer(nn.Module):
    """A small ViT: 4x4 patches, `depth` pre-norm encoder layers, tokens averaged into the
    head (no class token: its concatenation to the batch is a graph the translator cannot
    prove keeps samples apart, `onnx_torch._check_per_sample`)."""

    def __init__(self, channels: int, size: int, classes: int, dim: int = 128, depth: int = 4) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.patches = nn.Conv2d(channels, dim, 4, 4)
        self.position = nn.Parameter(0.02 * torch.randn(1, (size // 4) ** 2, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes))

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patches(self.normalize(x)).flatten(2).transpose(1, 2) + self.position
        return self.head(self.encoder(tokens).mean(1))


# Sized architectures: name -> builder (the ResNet-18's widths make a width axis up to full size).
SIZED = {
    "resnet18-w16": lambda c, s, k: resnet18(c, s, k, width=16),
    "resnet18-w32": lambda c, s, k: resnet18(c, s, k, width=32),
    "resnet18": resnet18,
    "vit": VisionTransformer,
}


def build(arch: str, channels: int, size: int, classes: int) -> nn.Module:
    builders = {"cnn": small_cnn, "resnet": small_resnet, "mlp": mlp, "mobilenet": small_mobilenet, **SIZED}
    if arch not in builders:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {(*ARCHITECTURES, *SIZED)}")
    return builders[arch](channels, size, classes)
