"""Training under DistributedDataParallel: two gloo processes on the CPU.

Each rank sees different data; DDP averages the gradients, so every rank takes the same
Riemannian step and the parameters must stay identical across ranks (bit for bit) and on
their manifolds. The same training on the concatenated data in one process is the oracle.
"""

from __future__ import annotations

import pytest
import torch
from geoopt import ManifoldParameter
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests._distributed import run_on_ranks
from torsion.manifolds import SPDAffineInvariant, Stiefel
from torsion.optim import Landing, RiemannianAdam, RiemannianSGD

pytestmark = pytest.mark.slow

STEPS = 4


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        stiefel = Stiefel()
        self.frames = nn.ParameterList(
            [
                ManifoldParameter(stiefel.random(6, 3, generator=g), manifold=stiefel)
                for _ in range(2)
            ]
        )
        spd = SPDAffineInvariant()
        self.spd = ManifoldParameter(0.5 * spd.random(3, 3, generator=g, condition=2.0), spd)
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(sum(torch.tanh(x @ w) for w in self.frames) @ self.spd)


def _data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)) for _ in range(STEPS)]


def _optimizer(name: str, model: nn.Module):
    if name == "adam":
        return RiemannianAdam(model.parameters(), lr=0.05, amsgrad=True)
    if name == "sgd":
        return RiemannianSGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    landing = Landing(list(model.frames), lr=0.05, momentum=0.5)
    rest = RiemannianAdam([model.spd, *model.linear.parameters()], lr=0.05)
    return landing, rest


def _step(optimizers, model, x, y):
    optimizers = optimizers if isinstance(optimizers, tuple) else (optimizers,)
    for optimizer in optimizers:
        optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    for optimizer in optimizers:
        optimizer.step()


NAMES = ("adam", "sgd", "landing")


def _train_on_rank(rank: int, world_size: int) -> dict[str, list[torch.Tensor]]:
    """Every optimizer in one pair of processes: spawning them costs more than training."""
    trained = {}
    for name in NAMES:
        torch.manual_seed(rank)  # the Linear layer starts differently; DDP broadcasts rank 0's
        model = _Model()
        ddp = DistributedDataParallel(model)
        optimizers = _optimizer(name, model)
        for x, y in _data(rank):
            _step(optimizers, ddp, x, y)
        trained[name] = [p.detach().clone() for p in model.parameters()]
    return trained


@pytest.fixture(scope="module")
def trained_on_two_ranks() -> list[dict[str, list[torch.Tensor]]]:
    return run_on_ranks(_train_on_rank, world_size=2)


@pytest.mark.parametrize("name", NAMES)
def test_ddp_keeps_ranks_identical_and_on_the_manifold(trained_on_two_ranks, name):
    rank0, rank1 = (trained[name] for trained in trained_on_two_ranks)
    for a, b in zip(rank0, rank1, strict=True):
        assert torch.equal(a, b)

    torch.manual_seed(0)
    model = _Model()
    optimizers = _optimizer(name, model)
    for (x0, y0), (x1, y1) in zip(_data(0), _data(1), strict=True):
        _step(optimizers, model, torch.cat([x0, x1]), torch.cat([y0, y1]))
    for a, b in zip(rank0, model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-5)

    eye = torch.eye(3)
    for p, q in zip(rank0, model.parameters(), strict=True):
        if isinstance(q, ManifoldParameter) and isinstance(q.manifold, Stiefel):
            gap = float(torch.linalg.matrix_norm(p.mT @ p - eye))
            # landing is retraction-free: within its safe-step tolerance, not on the manifold
            assert gap < (0.5 if name == "landing" else 1e-5)
        if isinstance(q, ManifoldParameter) and isinstance(q.manifold, SPDAffineInvariant):
            assert float((p - p.mT).abs().amax()) < 1e-6
            assert float(torch.linalg.eigvalsh(p).min()) > 0
