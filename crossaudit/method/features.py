"""Stage 1: intermediate activations of a model, pooled to one vector per sample.

Convolutional maps are averaged over space: CKA then compares *what* a layer encodes, not
where, which keeps the comparison meaningful between a CNN and an MLP.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

MAX_TAPS = 6


def pooled(activation: Tensor) -> Tensor:
    """N x C x H x W -> N x C (spatial mean); anything else -> N x features."""
    if activation.dim() == 4:
        return activation.mean(dim=(2, 3))
    return activation.flatten(1)


def candidate_taps(module: nn.Module, limit: int = MAX_TAPS) -> list[str]:
    """Up to `limit` taps spread evenly from input to output, always keeping the deepest."""
    taps: list[str] = list(module.taps)
    if len(taps) <= limit:
        return taps
    index = np.unique(np.round(np.linspace(0, len(taps) - 1, limit)).astype(int))
    return [taps[i] for i in index]


@torch.no_grad()
def extract_features(
    module: nn.Module, x: np.ndarray, taps: list[str], device: str = "cpu", batch: int = 256
) -> dict[str, np.ndarray]:
    """Pooled float64 features at `taps` for all of `x`."""
    chunks: dict[str, list[np.ndarray]] = {tap: [] for tap in taps}
    for i in range(0, len(x), batch):
        _, tapped = module.forward_tapped(torch.from_numpy(x[i : i + batch]).to(device), taps)
        for tap in taps:
            chunks[tap].append(pooled(tapped[tap]).double().cpu().numpy())
    return {tap: np.concatenate(parts) for tap, parts in chunks.items()}
