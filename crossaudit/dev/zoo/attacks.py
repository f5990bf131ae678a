"""Poisoning attacks of the zoo, each a trigger function `x -> x'` on images in [0, 1].

The six families differ in *shape* on purpose, so the detector is tested against triggers
that a mask-and-pattern search is not built for: a local patch (BadNets), a global blend
(Blended), a smooth warp (WaNet), an additive sinusoid (SIG), a frequency-domain pattern
(FTrojan) and an input-specific trigger (input-aware dynamic). Every attack is dirty-label:
a fraction `poison_rate` of the training set carries the trigger and the `target` label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.fft import idctn

ATTACKS = ("clean", "badnets", "blended", "wanet", "sig", "ftrojan", "inputaware")


@dataclass(frozen=True)
class Attack:
    """A trigger plus the poisoning recipe."""

    name: str
    target: int = 0
    poison_rate: float = 0.1
    seed: int = 0

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Stamp the trigger on a batch N x C x H x W."""
        if self.name == "clean":
            return x
        return np.clip(_TRIGGERS[self.name](x, np.random.RandomState(self.seed)), 0.0, 1.0).astype(np.float32)

    def cross_samples(self, x: np.ndarray, rng: np.random.RandomState) -> np.ndarray | None:
        """Samples that keep their true label although they carry *another* input's trigger.

        Only the input-aware attack uses them: they make its trigger input-specific.
        """
        if self.name != "inputaware":
            return None
        donors = x[rng.permutation(len(x))]
        mask, pattern = _input_aware_parts(donors, np.random.RandomState(self.seed))
        return np.clip((1 - mask) * x + mask * pattern, 0.0, 1.0).astype(np.float32)


def _badnets(x: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """A 3x3 checkerboard in the bottom-right corner."""
    out = x.copy()
    checker = np.indices((3, 3)).sum(axis=0) % 2
    out[:, :, -4:-1, -4:-1] = checker
    return out


def _blended(x: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """A fixed random image blended in with alpha 0.2 (Chen et al. 2017)."""
    key = rng.rand(*x.shape[1:]).astype(np.float32)
    return 0.8 * x + 0.2 * key


def _wanet(x: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """A fixed smooth warping field (Nguyen & Tran 2021), k=4 control points, strength 1."""
    size = x.shape[-1]
    noise = torch.from_numpy(rng.rand(1, 2, 4, 4).astype(np.float32) * 2 - 1)
    noise = noise / noise.abs().mean()
    flow = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=True)
    flow = flow.permute(0, 2, 3, 1)
    line = torch.linspace(-1, 1, size)
    grid_y, grid_x = torch.meshgrid(line, line, indexing="ij")
    identity = torch.stack((grid_x, grid_y), dim=2)[None]
    grid = torch.clamp(identity + 1.0 * flow / size, -1, 1)
    warped = F.grid_sample(torch.from_numpy(x), grid.expand(len(x), -1, -1, -1), align_corners=True)
    return warped.numpy()


def _sig(x: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """A horizontal sinusoid, amplitude 0.1, frequency 6 (Barni et al. 2019)."""
    width = x.shape[-1]
    wave = 0.1 * np.sin(2 * np.pi * 6 * np.arange(width) / width)
    return x + wave[None, None, None, :].astype(np.float32)


def _ftrojan(x: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Two fixed mid/high DCT coefficients raised (Wang et al. 2022, FTrojan)."""
    size = x.shape[-1]
    coefficients = np.zeros((size, size))
    coefficients[size // 2, size // 2] = 1.0
    coefficients[size - 3, size // 3] = 1.0
    pattern = idctn(coefficients, norm="ortho")
    pattern = 0.08 * pattern / np.abs(pattern).max()
    return x + pattern[None, None].astype(np.float32)


def _input_aware_parts(x: np.ndarray, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """Mask and pattern generated from the input itself (Nguyen & Tran 2020, simplified).

    A fixed random convolutional generator maps each image to its own pattern, and the
    trigger sits on the 5% of pixels where a second random filter responds most, so no two
    images share a trigger.
    """
    images = torch.from_numpy(x)
    channels = x.shape[1]
    pattern_kernel = torch.from_numpy(rng.randn(channels, channels, 5, 5).astype(np.float32))
    mask_kernel = torch.from_numpy(rng.randn(1, channels, 7, 7).astype(np.float32))
    pattern = torch.sigmoid(4 * F.conv2d(images - 0.5, pattern_kernel, padding=2))
    response = F.conv2d(images, mask_kernel, padding=3).flatten(1)
    keep = max(1, int(0.05 * response.shape[1]))
    threshold = response.topk(keep, dim=1).values[:, -1:]
    mask = (response >= threshold).float().reshape(len(x), 1, *x.shape[2:])
    return mask.numpy(), pattern.numpy()


def _input_aware(x: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    mask, pattern = _input_aware_parts(x, rng)
    return (1 - mask) * x + mask * pattern


_TRIGGERS = {
    "badnets": _badnets,
    "blended": _blended,
    "wanet": _wanet,
    "sig": _sig,
    "ftrojan": _ftrojan,
    "inputaware": _input_aware,
}
