"""The audit's Adam against torch's: the same trajectory, bitwise."""

import torch
from torch import nn

from crossaudit.method.adam import Adam


def _trajectory(make_optimiser, steps: int = 25) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    unused = nn.Parameter(torch.ones(2))  # never reaches the loss: its grad stays None
    sometimes = nn.Parameter(torch.ones(3))  # in the loss every other step: its own step count
    optimiser = make_optimiser([*model.parameters(), unused, sometimes])
    x, y = torch.randn(16, 6), torch.randint(3, (16,))
    for step in range(steps):
        logits = model(x) * sometimes if step % 2 else model(x)
        loss = nn.functional.cross_entropy(logits, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return [p.detach().clone() for p in [*model.parameters(), unused, sometimes]]


def test_updates_are_bitwise_torchs_single_tensor_adam():
    for betas in ((0.9, 0.999), (0.5, 0.9)):
        ours = _trajectory(lambda params, b=betas: Adam(params, lr=0.05, betas=b))
        torchs = _trajectory(lambda params, b=betas: torch.optim.Adam(params, lr=0.05, betas=b, foreach=False))
        assert all(torch.equal(a, b) for a, b in zip(ours, torchs, strict=True))
        assert torch.equal(ours[-2], torch.ones(2)) and not torch.equal(ours[-1], torch.ones(3))
