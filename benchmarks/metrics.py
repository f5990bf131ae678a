"""Detection metrics over per-model scores: AUROC with a bootstrap interval, TPR at a fixed FPR,
and exact intervals for detection and false-positive rates."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binomtest


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


def rate_interval(hits: int, total: int) -> tuple[float, float]:
    """Exact (Clopper-Pearson) 95% interval of a rate seen as `hits` of `total`.

    Why exact: the benchmark's rates sit at or near 0% and 100% on tens of models, where
    the normal approximation gives intervals that leave [0, 1] or shrink to a point; the
    exact interval says honestly that 0 false positives of 52 cannot show a rate under 1%.
    """
    if total == 0:
        return float("nan"), float("nan")
    interval = binomtest(hits, total).proportion_ci(0.95, method="exact")
    return float(interval.low), float(interval.high)


def percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"


def rate_text(hits: int, total: int) -> str:
    """A rate with its exact 95% interval: on tens of models the interval, not the rate,
    says what the run can show (no false positive of 52 still allows 6.8%)."""
    if total == 0:
        return "n/a"
    low, high = rate_interval(hits, total)
    return f"{percent(hits / total)} [{percent(low)}, {percent(high)}]"
