"""Batch augmentations for the zoo's label-free training (FixMatch, SimCLR), in torch.

Weak: a random shift of up to 2 pixels. Strong: a shift, pixel noise and a random erased
square. Both keep images in [0, 1], as the model contract expects.
"""

from __future__ import annotations

import torch
from torch import Tensor


def shift(x: Tensor, generator: torch.Generator, pixels: int = 2) -> Tensor:
    """Each image moved by its own random offset, the border padded with zeros."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pixels, pixels, pixels, pixels))
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pixels)
    moved = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    return moved.gather(3, cols)


def weak(x: Tensor, generator: torch.Generator) -> Tensor:
    return shift(x, generator)


def strong(x: Tensor, generator: torch.Generator) -> Tensor:
    """Shift, Gaussian noise (sigma 0.1) and one erased square of a quarter of the side."""
    n, _, h, w = x.shape
    out = shift(x, generator) + 0.1 * torch.randn(x.shape, generator=generator)
    side = max(1, h // 4)
    top = torch.randint(0, h - side + 1, (n,), generator=generator)
    left = torch.randint(0, w - side + 1, (n,), generator=generator)
    ys, xs = torch.arange(h)[None, :], torch.arange(w)[None, :]
    inside = ((ys >= top[:, None]) & (ys < top[:, None] + side))[:, :, None] & (
        (xs >= left[:, None]) & (xs < left[:, None] + side)
    )[:, None, :]
    return out.masked_fill(inside[:, None], 0.0).clamp(0.0, 1.0)
