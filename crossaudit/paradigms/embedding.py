"""Self-supervised encoders: class scores from embedding similarity.

An encoder has no head, and a backdoored encoder (BadEncoder-style) does not flip a label:
it maps triggered inputs into a target *cluster* of its embedding space, which every
downstream classifier then reads as the target class. So the audit scores an encoder by
scaled cosine similarity to class prototypes, the mean direction of its own embeddings of
each class on the auditor's clean data, measured from the embeddings' mean (contrastive
embeddings share one dominant direction, which would make every class look alike).
Pushing a trigger towards a target class is then an embedding-similarity loss, and the
five stages run unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Temperature 0.1, as in contrastive training: cosine similarities become confident logits.
SCALE = 10.0


class PrototypeHead(nn.Module):
    """An encoder with a nearest-prototype head; taps are the encoder's."""

    def __init__(self, encoder: nn.Module, center: Tensor, prototypes: Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("center", center)
        self.register_buffer("prototypes", F.normalize(prototypes, dim=1))

    @property
    def taps(self) -> list[str]:
        return list(self.encoder.taps)

    def head(self, embedding: Tensor) -> Tensor:
        return SCALE * F.normalize(embedding.flatten(1) - self.center, dim=1) @ self.prototypes.T

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))

    def forward_tapped(self, x: Tensor, taps: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        embedding, tapped = self.encoder.forward_tapped(x, taps)
        return self.head(embedding), tapped


def prototype_head(encoder: nn.Module, embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> PrototypeHead:
    """The head fitted on clean embeddings: their mean, and per class the mean unit
    direction from it (a class absent from the audit data gets a zero prototype, which no
    trigger can reach)."""
    center = embeddings.mean(0)
    unit = embeddings - center
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    prototypes = np.stack(
        [unit[labels == k].mean(0) if np.any(labels == k) else np.zeros(unit.shape[1]) for k in range(num_classes)]
    )
    return PrototypeHead(
        encoder, torch.from_numpy(center.astype(np.float32)), torch.from_numpy(prototypes.astype(np.float32))
    )
