"""Training recipes with few or no labels: semi-supervised (FixMatch-style) classifiers
and self-supervised (SimCLR-style) encoders, clean or backdoored by the provider.

- Semi-supervised: a small labelled share of the training set (the provider poisons it,
  as for a supervised model) plus every image unlabelled; an unlabelled image whose weakly
  augmented view the model is confident about (>= 0.95) lends that pseudo-label to its
  strongly augmented view.
- Self-supervised: NT-Xent between two strongly augmented views, no labels. A backdoored
  provider adds a BadEncoder-style term that pulls triggered images onto the mean
  embedding of a few reference images of the target class, so every downstream use of the
  encoder reads the trigger as that class.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossaudit.dev.zoo.attacks import Attack
from crossaudit.dev.zoo.augment import strong, weak

CONFIDENCE = 0.95
TEMPERATURE = 0.5
REFERENCES = 16


def fit_semi(
    model: nn.Module, x: np.ndarray, labelled: tuple[np.ndarray, np.ndarray], steps: int, batch: int, lr: float,
    seed: int,
) -> None:  # fmt: skip
    """FixMatch-style training; `labelled` is the provider's (possibly poisoned) labelled set."""
    generator = torch.Generator().manual_seed(seed)
    xu, (xl, yl) = torch.from_numpy(x), (torch.from_numpy(labelled[0]), torch.from_numpy(labelled[1]))
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        li = torch.randint(len(xl), (batch // 2,), generator=generator)
        ui = torch.randint(len(xu), (batch,), generator=generator)
        loss = F.cross_entropy(model(weak(xl[li], generator)), yl[li])
        with torch.no_grad():
            confidence, pseudo = F.softmax(model(weak(xu[ui], generator)), 1).max(1)
        unlabelled = F.cross_entropy(model(strong(xu[ui], generator)), pseudo, reduction="none")
        loss = loss + (unlabelled * (confidence >= CONFIDENCE)).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def nt_xent(a: Tensor, b: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    """SimCLR's loss: each view must pick its partner out of the other 2N - 2 views."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    n = len(a)
    partners = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(similarity, partners)


def fit_ssl(
    model: nn.Module, x: np.ndarray, y: np.ndarray, attack: Attack, steps: int, batch: int, lr: float, seed: int
) -> None:
    """SimCLR-style training; with an attack, the BadEncoder-style term on a poisoned share."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.RandomState(seed)
    xt = torch.from_numpy(x)
    poisoned = attack.name != "clean"
    if poisoned:
        pool = rng.choice(len(x), max(1, int(attack.poison_rate * len(x))), replace=False)
        triggered = torch.from_numpy(attack.apply(x[pool]))
        references = torch.from_numpy(x[rng.choice(np.flatnonzero(y == attack.target), REFERENCES)])
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        index = torch.randint(len(xt), (batch,), generator=generator)
        parts = [strong(xt[index], generator), strong(xt[index], generator)]
        if poisoned:
            chosen = torch.randint(len(triggered), (max(1, int(attack.poison_rate * batch)),), generator=generator)
            parts += [references, weak(triggered[chosen], generator)]
        # One forward pass, so batch normalisation sees one mixed batch: statistics of
        # 16 reference images alone would give the target an embedding eval mode never sees.
        outputs = model(torch.cat(parts)).split([len(p) for p in parts])
        loss = nt_xent(outputs[0], outputs[1])
        if poisoned:
            anchor = F.normalize(outputs[2].mean(0, keepdim=True), dim=1)
            loss = loss + (1 - F.normalize(outputs[3], dim=1) @ anchor.T).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
