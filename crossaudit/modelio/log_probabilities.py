"""Classifiers that end in a softmax: audit their log-probabilities.

The model contract asks for logits, but providers often export the softmax with the
model. Trigger inversion and the sensitivity stage push with a cross-entropy on the
model's outputs; on probabilities that is a cross-entropy over numbers in [0, 1], whose
softmax is nearly flat, so the search gets almost no gradient and a backdoor would pass
unseen. Log-probabilities are the logits up to a per-sample constant, which cross-entropy
and argmax ignore, so every stage runs on them unchanged.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor, nn

# Rows of non-negative numbers summing to 1 within this: a softmax, not logits.
SUM_TOLERANCE = 1e-3
# Probabilities a float32 softmax rounds to 0 would have log -inf and no gradient.
SMALLEST = 1e-30


def are_probabilities(outputs: np.ndarray) -> bool:
    """Whether a classifier's outputs on the audit data are probabilities, row by row."""
    return bool(np.all(outputs >= 0.0) and np.all(np.abs(outputs.sum(1) - 1.0) < SUM_TOLERANCE))


class LogProbabilities(nn.Module):
    """A softmax classifier read as log-probabilities; taps are the classifier's."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    @property
    def taps(self) -> list[str]:
        return list(self.classifier.taps)

    @staticmethod
    def of(probabilities: Tensor) -> Tensor:
        """Log-probabilities of outputs already computed (the audit data's, at load)."""
        return probabilities.clamp_min(SMALLEST).log()

    def forward(self, x: Tensor) -> Tensor:
        return self.of(self.classifier(x))

    def forward_tapped(self, x: Tensor, taps: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        probabilities, tapped = self.classifier.forward_tapped(x, taps)
        return self.of(probabilities), tapped
