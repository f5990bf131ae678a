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
(the detection benchmark's "fine-tuning scored" ablation rescores with it). For language
models it is scored, in the other direction (`paradigms.autoregressive.TextEffect.score`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossaudit.method.adam import Adam
from crossaudit.method.inversion import Trigger


@dataclass(frozen=True)
class SensitivityConfig:
    steps: int = 40
    batch: int = 64
    lr: float = 1e-3


@dataclass(frozen=True)
class AttackEffect:
    """What a trigger does on held-out samples of other classes than its target, to the
    suspect before and after fine-tuning, and to the witness."""

    suspect_flip: float
    witness_flip: float
    witness_kept: float
    suspect_flip_after_finetune: float


@torch.no_grad()
def attack_effect(
    trigger: Trigger, suspect: nn.Module, tuned: nn.Module, witness: nn.Module, x: Tensor, y: Tensor
) -> AttackEffect:
    """One stamping and one witness pass serve both the suspect and its fine-tuned copy."""
    source = y != trigger.target
    triggered = trigger.apply(x[source])
    w_pred = witness(triggered).argmax(1)

    def flip(model: nn.Module) -> float:
        return float((model(triggered).argmax(1) == trigger.target).float().mean())

    return AttackEffect(
        flip(suspect),
        float((w_pred == trigger.target).float().mean()),
        float((w_pred == y[source]).float().mean()),
        flip(tuned),
    )


def fine_tuned_copy(suspect: nn.Module, x: Tensor, y: Tensor, config: SensitivityConfig, seed: int) -> nn.Module:
    """A copy of the suspect after `steps` of Adam on clean audit data."""
    model = copy.deepcopy(suspect)
    trainable = [p for p in model.parameters() if p.is_floating_point()]
    for p in trainable:
        p.requires_grad_(True)
    optimiser = Adam(trainable, lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(config.steps):
        index = torch.randint(len(x), (config.batch,), generator=generator).to(x.device)
        loss = F.cross_entropy(model(x[index]), y[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.requires_grad_(False).eval()
