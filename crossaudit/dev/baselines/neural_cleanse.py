"""Neural Cleanse (Wang et al., S&P 2019): the single-model detector crossaudit is measured against.

For every class t, optimise a mask m and pattern p so that (1 - m) x + m p sends clean
inputs to t, with an L1 penalty on m whose weight adapts to keep the attack success near
`target_asr`. A backdoored class needs a far smaller mask than the others: the anomaly
index of the smallest mask norm, |norm - median| / (1.4826 * MAD), at or above 2 (lower
tail only) flags the model and names that class as the target. One full optimisation per
class: its cost grows linearly with the number of classes, which is what crossaudit's
batched target search is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossaudit.method.adam import Adam
from crossaudit.method.parallel import side_by_side

MAD_CONSISTENCY = 1.4826
CLASS_SEEDS = 1_000_003  # a class's generator is seeded seed * CLASS_SEEDS + class: distinct per (seed, class)


@dataclass(frozen=True)
class NeuralCleanseConfig:
    steps: int = 300
    batch: int = 64
    lr: float = 0.1
    init_cost: float = 1e-3
    cost_step: float = 1.5
    patience: int = 10
    target_asr: float = 0.99
    anomaly_threshold: float = 2.0


@dataclass(frozen=True)
class NeuralCleanseResult:
    mask_l1: list[float]
    anomaly_index: float
    suspected_target: int
    flagged: bool


def _reverse_engineer(
    model: nn.Module, x: Tensor, target: int, config: NeuralCleanseConfig, generator: torch.Generator
) -> float:
    """The smallest mask L1 (in pixels) that reached `target_asr` for this class (or the
    last one, when none did)."""
    _, c, h, w = x.shape
    mask_logit = torch.zeros(1, 1, h, w, device=x.device, requires_grad=True)
    pattern_logit = torch.zeros(1, c, h, w, device=x.device, requires_grad=True)
    optimiser = Adam([mask_logit, pattern_logit], lr=config.lr, betas=(0.5, 0.9))
    labels = torch.full((config.batch,), target, device=x.device)
    cost, best, last = config.init_cost, float("inf"), float("inf")
    successes = failures = 0
    for _ in range(config.steps):
        batch = x[torch.randint(len(x), (config.batch,), generator=generator).to(x.device)]
        mask = torch.sigmoid(mask_logit)
        stamped = (1 - mask) * batch + mask * torch.sigmoid(pattern_logit)
        logits = model(stamped)
        loss = F.cross_entropy(logits, labels) + cost * mask.sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        asr = float((logits.argmax(1) == target).float().mean())
        last = float(mask.detach().sum())
        if asr >= config.target_asr:
            best = min(best, last)
            successes, failures = successes + 1, 0
        else:
            successes, failures = 0, failures + 1
        if successes >= config.patience:
            cost, successes = cost * config.cost_step, 0
        elif failures >= config.patience:
            cost, failures = cost / config.cost_step**1.5, 0
    return best if np.isfinite(best) else last


def _reverse_engineer_classes(
    model: nn.Module, x: Tensor, classes: range, config: NeuralCleanseConfig, seed: int
) -> list[float]:
    """`_reverse_engineer` for each of `classes`, each with the generator of its own (seed, class)."""
    return [
        _reverse_engineer(model, x, target, config, torch.Generator().manual_seed(seed * CLASS_SEEDS + target))
        for target in classes
    ]


def anomaly_index(norms: np.ndarray) -> tuple[float, int]:
    """Lower-tail anomaly index of the smallest norm, and its class."""
    median = float(np.median(norms))
    mad = MAD_CONSISTENCY * float(np.median(np.abs(norms - median)))
    smallest = int(np.argmin(norms))
    return (median - float(norms[smallest])) / max(mad, 1e-12), smallest


def neural_cleanse(
    model: nn.Module, x: np.ndarray, num_classes: int, config: NeuralCleanseConfig, seed: int = 0, device: str = "cpu"
) -> NeuralCleanseResult:
    """Run Neural Cleanse on one model with the auditor's clean images `x`.

    Each class's optimisation draws its batches from its own generator, so the classes are
    independent jobs: they run split over torch's threads (`parallel.side_by_side`), since
    a small model's step cannot keep two cores busy and two classes at a time can. The
    norms do not depend on the split (a test checks), so the baseline gets the same cores
    as crossaudit, whose two directions run side by side the same way.
    """
    model = model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    images = torch.from_numpy(x).to(device)
    workers = max(1, min(torch.get_num_threads(), num_classes))
    groups = [range(first, num_classes, workers) for first in range(workers)]
    per_group = side_by_side([partial(_reverse_engineer_classes, model, images, g, config, seed) for g in groups])
    norms = np.empty(num_classes)
    for classes, found in zip(groups, per_group, strict=True):
        norms[list(classes)] = found
    index, target = anomaly_index(norms)
    return NeuralCleanseResult(
        [round(float(n), 3) for n in norms], round(index, 4), target, index >= config.anomaly_threshold
    )
