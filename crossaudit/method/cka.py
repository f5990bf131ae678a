"""Stage 2: centered kernel alignment between two models' features.

CKA (Kornblith et al. 2019) compares representations up to rotation and isotropic
scaling, which is what lets us line up the layers of two different architectures. All
estimators here run in float64 and are differentiable torch functions, so the same code
gives the alignment matrix and the inversion's alignment loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def _as_float64(x: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(x).to(torch.float64).flatten(1)


def _centered(x: Tensor) -> Tensor:
    """Features (..., n, d) centered over their n samples."""
    return x - x.mean(dim=-2, keepdim=True)


def unbiased_hsic(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741 - the paper's names
    """HSIC_1 of Song et al. (2012) on Gram matrices (..., n, n) with zeroed diagonals.

    Leading dimensions are a batch of independent minibatches, so that the inversion's
    alignment loss for every target is one computation rather than one per target.
    """
    n = k.shape[-1]
    k = k - torch.diag_embed(torch.diagonal(k, dim1=-2, dim2=-1))
    l = l - torch.diag_embed(torch.diagonal(l, dim1=-2, dim2=-1))  # noqa: E741
    trace = (k * l.mT).sum(dim=(-2, -1))
    sums = k.sum(dim=(-2, -1)) * l.sum(dim=(-2, -1)) / ((n - 1) * (n - 2))
    # 1^T K L 1: K's column sums against L's row sums.
    cross = 2.0 / (n - 2) * (k.sum(dim=-2) * l.sum(dim=-1)).sum(dim=-1)
    return (trace + sums - cross) / (n * (n - 3))


def _debiased_cka(xc: Tensor, yc: Tensor) -> Tensor:
    """Debiased linear CKA of centered features (..., n, d), one value per leading index."""
    k, l = xc @ xc.mT, yc @ yc.mT  # noqa: E741
    denominator = torch.sqrt(torch.clamp(unbiased_hsic(k, k) * unbiased_hsic(l, l), min=1e-24))
    return unbiased_hsic(k, l) / denominator


def debiased_linear_cka(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> Tensor:
    """Linear CKA with the unbiased HSIC estimator (Song et al. 2012).

    The biased estimator drifts towards 1 for small batches of wide features,
    which would make unrelated layers look aligned.
    """
    return _debiased_cka(_centered(_as_float64(x)), _centered(_as_float64(y)))


def minibatch_cka(x: Tensor, y: Tensor) -> Tensor:
    """Differentiable CKA of minibatches (debiased), for use as a loss term: features
    (n, d), or (groups, n, d) for one CKA per group.

    Debiased because inversion batches are small (tens of samples) and wide, exactly where
    the biased estimator is inflated.
    """
    if x.shape[-2] < 4:
        raise ValueError("minibatch CKA needs at least 4 samples")
    return _debiased_cka(_centered(x.to(torch.float64)), _centered(y.to(torch.float64)))


@dataclass(frozen=True)
class Alignment:
    """The CKA matrix (suspect taps x witness taps) and its best cell."""

    suspect_taps: list[str]
    witness_taps: list[str]
    matrix: np.ndarray
    suspect_tap: str
    witness_tap: str
    cka: float

    @property
    def similarity(self) -> float:
        """How alike the two models' representations are, layer by layer: for each model,
        the mean over its layers of its best CKA with any layer of the other; the lower of
        the two.

        Why the lower: one model's layers can each find a close match in the other while
        the other's cannot (a small MLP's few layers all resemble some CNN layer, not the
        reverse), and only a likeness that holds both ways says the two providers learned
        the same way, so that their natural shortcuts are alike too (`verdict.Thresholds`).
        """
        best = np.nan_to_num(self.matrix, nan=0.0)
        return float(min(best.max(axis=1).mean(), best.max(axis=0).mean()))

    def summary(self) -> dict[str, object]:
        """The report's `alignment` entry."""
        return {
            "suspect_layer": self.suspect_tap,
            "witness_layer": self.witness_tap,
            "cka": round(self.cka, 4),
            "similarity": round(self.similarity, 4),
        }


def align_layers(suspect_features: dict[str, np.ndarray], witness_features: dict[str, np.ndarray]) -> Alignment:
    """Debiased CKA of every tap pair on clean data; the best pair is the aligned layer."""
    s_taps, w_taps = list(suspect_features), list(witness_features)
    matrix = np.array(
        [[float(debiased_linear_cka(suspect_features[s], witness_features[w])) for w in w_taps] for s in s_taps]
    )
    i, j = np.unravel_index(int(np.nanargmax(matrix)), matrix.shape)
    return Alignment(s_taps, w_taps, matrix, s_taps[i], w_taps[j], float(matrix[i, j]))
