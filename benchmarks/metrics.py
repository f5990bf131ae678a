"""Detection metrics over per-model scores: AUROC with a bootstrap interval, TPR at a fixed FPR."""

from __future__ import annotations

import numpy as np


def auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting half."""
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def bootstrap_auroc(
    positives: np.ndarray, negatives: np.ndarray, rounds: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval, resampling positives and negatives separately."""
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan"), float("nan")
    rng = np.random.RandomState(seed)
    values = [
        auroc(rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))) for _ in range(rounds)
    ]
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def tpr_at_fpr(positives: np.ndarray, negatives: np.ndarray, fpr: float) -> float:
    """The detection rate of the threshold that lets at most `fpr` of the negatives through
    (with few negatives, 1% means none: the threshold sits at the highest clean score)."""
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    allowed = int(np.floor(fpr * len(negatives)))
    threshold = np.sort(negatives)[::-1][allowed]
    return float(np.mean(positives > threshold))
