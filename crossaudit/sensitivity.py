"""Stage 4: fine-tuning sensitivity, how much of a trigger's effect brief clean
fine-tuning of the suspect removes.

The hypothesis (the paper's): a backdoor is a feature the suspect *learned* from poisoned
data, so brief fine-tuning barely moves it, while a model-specific adversarial
perturbation exploits the exact position of a decision boundary and loses its effect. For
image classifiers our detection benchmark did not bear that out: the false positives that
remain are natural shortcuts, which survive fine-tuning as backdoors do, and backdoors lose
some success too. Scoring only the surviving success cut no false positive and cost
detection, on three runs. So for images the effect after fine-tuning is measured and reported
with every finding (`Finding.sensitivity`), as evidence for the reviewer, but not scored
(`AuditConfig.score_after_finetune`). For language models it is scored, in the other
direction (`paradigms.autoregressive.TextEffect.score`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossaudit.inversion import Trigger


@dataclass(frozen=True)
class SensitivityConfig:
    steps: int = 40
    batch: int = 64
    lr: float = 1e-3


@dataclass(frozen=True)
class AttackEffect:
    """What a trigger does on held-out samples of other classes than its target."""

    suspect_flip: float
    witness_flip: float
    witness_kept: float


@torch.no_grad()
def attack_effect(trigger: Trigger, suspect: nn.Module, witness: nn.Module, x: Tensor, y: Tensor) -> AttackEffect:
    source = y != trigger.target
    xs, ys = x[source], y[source]
    triggered = trigger.apply(xs)
    s_pred, w_pred = suspect(triggered).argmax(1), witness(triggered).argmax(1)
    return AttackEffect(
        float((s_pred == trigger.target).float().mean()),
        float((w_pred == trigger.target).float().mean()),
        float((w_pred == ys).float().mean()),
    )


def fine_tuned_copy(suspect: nn.Module, x: Tensor, y: Tensor, config: SensitivityConfig, seed: int) -> nn.Module:
    """A copy of the suspect after `steps` of Adam on clean audit data."""
    model = copy.deepcopy(suspect)
    trainable = [p for p in model.parameters() if p.is_floating_point()]
    for p in trainable:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(trainable, lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(config.steps):
        index = torch.randint(len(x), (config.batch,), generator=generator).to(x.device)
        loss = F.cross_entropy(model(x[index]), y[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.requires_grad_(False).eval()
