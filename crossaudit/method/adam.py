"""Adam for the audit's own optimisations: the trigger searches, the fine-tunes and the
Neural Cleanse baseline.

Why not `torch.optim.Adam`: a torch optimiser's first use imports torch's compiler stack
(`torch._dynamo`, about 0.7 s on 2 cores), a tenth of a command-line audit of a small pair,
and every pipeline step that optimises pays it again in its own process. The update is
torch's single-tensor Adam (no weight decay, no amsgrad) op for op, each parameter with
its own step count, so on CPU a search moves its triggers bitwise as torch's optimiser
does (`tests/test_adam.py`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class Adam:
    """Kingma and Ba's Adam with bias correction: `step()` after `backward()`, `zero_grad()` before."""

    def __init__(
        self, params: Iterable[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.steps = [0] * len(self.params)
        self.averages = [torch.zeros_like(p) for p in self.params]
        self.squares = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient; one without keeps its step count."""
        beta1, beta2 = self.betas
        for index, p in enumerate(self.params):
            if p.grad is None:
                continue
            self.steps[index] += 1
            step = self.steps[index]
            average, square = self.averages[index], self.squares[index]
            average.lerp_(p.grad, 1 - beta1)
            square.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denominator = (square.sqrt() / (1 - beta2**step) ** 0.5).add_(self.eps)
            p.addcdiv_(average, denominator, value=-(self.lr / (1 - beta1**step)))
