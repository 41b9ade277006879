"""Checkpoint round trips for every model family, bit-exact on CPU.

Each family trains three steps with each optimizer, saves the model's and the
optimizers' ``state_dict`` (batch-norm running statistics are buffers, so they are in the
model's) with :func:`torch.save` into memory, loads them into a freshly built model and
optimizer (built from a different seed, so nothing is shared by accident), and both copies
train three more steps: losses, parameters and buffers must be bitwise equal
(:func:`torch.equal`), and every :class:`geoopt.ManifoldParameter` must still carry its
manifold.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import geoopt
import pytest
import torch
from torch import nn

from torsion.equivariant import EquivariantPotential, Linear, energy_and_forces
from torsion.manifolds import Stiefel
from torsion.nn import (
    BiMap,
    FRMap,
    LogEig,
    OrthMap,
    ProjMap,
    ReEig,
    ReOrth,
    SPDBatchNorm,
    SPDConv,
    SPDVectorize,
)
from torsion.optim import Landing, RiemannianAdam, RiemannianSGD
from torsion.spectral import SPE, BasisNet, BernConv, ChebIIConv, OptBasisConv, SignNet

F64 = torch.float64
STEPS = 3


def _spd(generator: torch.Generator, *shape: int) -> torch.Tensor:
    a = torch.randn(*shape, dtype=F64, generator=generator)
    return a @ a.mT / shape[-1] + 0.1 * torch.eye(shape[-1], dtype=F64)


def _ring(num_nodes: int) -> torch.Tensor:
    src = torch.arange(num_nodes)
    dst = (src + 1) % num_nodes
    return torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])


# --------------------------------------------------------------------------------------
# Model families: (build, data, loss)
# --------------------------------------------------------------------------------------


class SPDNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bimap = BiMap(6, 4, dtype=F64)
        self.reeig = ReEig()
        self.bn = SPDBatchNorm(4, dtype=F64)
        self.logeig = LogEig()
        self.vec = SPDVectorize()
        self.head = nn.Linear(10, 1, dtype=F64)

    def forward(self, x):
        return self.head(self.vec(self.logeig(self.bn(self.reeig(self.bimap(x)))))).squeeze(-1)


class GrNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.frmap = FRMap(8, 6, dtype=F64)
        self.reorth = ReOrth()
        self.proj = ProjMap()
        self.orth = OrthMap(2)
        self.head = nn.Linear(12, 1, dtype=F64)

    def forward(self, x):
        y = self.orth(self.proj(self.reorth(self.frmap(x))))
        return self.head(y.flatten(-2)).squeeze(-1)


class SPDGraphNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = SPDConv(5, 4, dtype=F64)
        self.conv2 = SPDConv(4, 3, "affine_invariant", dtype=F64)
        self.logeig = LogEig()

    def forward(self, data):
        x, edge_index = data
        h = self.conv2(self.conv1(x, edge_index), edge_index)
        return self.logeig(h).flatten(-2).sum(-1)


class SpectralNet(nn.Module):
    """Filters on node features plus the three PE encoders, one readout."""

    def __init__(self, k: int):
        super().__init__()
        self.signnet = SignNet(3, hidden_channels=8, weight_manifold="stiefel").double()
        self.spe = SPE(3, num_partitions=4, hidden_channels=8).double()
        self.basisnet = BasisNet(k, 3, hidden_channels=8).double()
        self.bern = BernConv(3).double()
        self.cheb = ChebIIConv(3).double()
        self.opt = OptBasisConv(4, 3, weight_manifold="stiefel").double()
        self.head = nn.Linear(4 + 9, 1, dtype=F64)

    def forward(self, data):
        x, edge_index, vecs, vals = data
        h = self.opt(self.cheb(self.bern(x, edge_index), edge_index), edge_index)
        pe = torch.cat(
            [
                self.signnet(vecs, vals, edge_index=edge_index),
                self.spe(vecs, vals),
                self.basisnet(vecs, vals),
            ],
            dim=-1,
        )
        return self.head(torch.cat([h, pe], dim=-1)).squeeze(-1)


class PotentialModel(nn.Module):
    def __init__(self, weight_manifold=None):
        super().__init__()
        self.potential = EquivariantPotential(
            3,
            cutoff=2.5,
            channels=4,
            num_layers=1,
            num_radial=4,
            radial_hidden=8,
            weight_manifold=weight_manifold,
            dtype=F64,
        )

    def forward(self, data):
        pos, species = data
        energy, forces = energy_and_forces(self.potential, pos, species, create_graph=True)
        return torch.cat([energy, forces.flatten()])


class StiefelLinearModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = Linear("4x0e + 3x1o", "4x0e + 3x1o", weight_manifold="stiefel", dtype=F64)

    def forward(self, x):
        return self.linear(x)


def _spectral_data(generator):
    n, k = 7, 4
    edge_index = _ring(n)
    adjacency = torch.zeros(n, n, dtype=F64)
    adjacency[edge_index[0], edge_index[1]] = 1.0
    degree = adjacency.sum(1)
    laplacian = torch.eye(n, dtype=F64) - adjacency / (degree[:, None] * degree[None, :]).sqrt()
    vals, vecs = torch.linalg.eigh(laplacian)
    x = torch.randn(n, 4, dtype=F64, generator=generator)
    return (x, edge_index, vecs[:, :k].contiguous(), vals[None, :k].contiguous()), n


def _family_data(name: str, generator: torch.Generator):
    if name == "spdnet":
        return _spd(generator, 8, 6, 6), torch.randn(8, dtype=F64, generator=generator)
    if name == "grnet":
        x = torch.linalg.qr(torch.randn(5, 8, 3, dtype=F64, generator=generator))[0]
        return x, torch.randn(5, dtype=F64, generator=generator)
    if name == "spdconv":
        data = (_spd(generator, 6, 5, 5), _ring(6))
        return data, torch.randn(6, dtype=F64, generator=generator)
    if name == "spectral":
        data, n = _spectral_data(generator)
        return data, torch.randn(n, dtype=F64, generator=generator)
    if name.startswith("potential"):
        pos = 1.2 * torch.randn(5, 3, dtype=F64, generator=generator)
        species = torch.randint(0, 3, (5,), generator=generator)
        return (pos, species), torch.randn(16, dtype=F64, generator=generator)
    x = torch.randn(6, 13, dtype=F64, generator=generator)
    return x, torch.randn(6, 13, dtype=F64, generator=generator)


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "spdnet": SPDNet,
    "grnet": GrNet,
    "spdconv": SPDGraphNet,
    "spectral": lambda: SpectralNet(4),
    "potential": PotentialModel,
    "potential_stiefel": lambda: PotentialModel("stiefel"),
    "equivariant_linear_stiefel": StiefelLinearModel,
}


def _is_stiefel(param) -> bool:
    return isinstance(param, geoopt.ManifoldParameter) and isinstance(param.manifold, Stiefel)


def _optimizers(name: str, model: nn.Module) -> list[torch.optim.Optimizer]:
    params = list(model.parameters())
    if name == "adam":
        return [RiemannianAdam(params, lr=1e-2)]
    if name == "sgd_momentum":
        return [RiemannianSGD(params, lr=1e-2, momentum=0.9, nesterov=True)]
    stiefel = [p for p in params if _is_stiefel(p)]
    others = [p for p in params if not _is_stiefel(p)]
    optimizers = [Landing(stiefel, lr=1e-2, momentum=0.5)]
    if others:
        optimizers.append(RiemannianAdam(others, lr=1e-2))
    return optimizers


def _train(model, optimizers, data, target, steps: int) -> list[torch.Tensor]:
    losses = []
    for _ in range(steps):
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss = (model(data) - target).pow(2).mean()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        losses.append(loss.detach())
    return losses


def _has_stiefel(model: nn.Module) -> bool:
    return any(_is_stiefel(p) for p in model.parameters())


CASES = [
    (family, optimizer)
    for family in FAMILIES
    for optimizer in ("adam", "sgd_momentum", "landing")
    if optimizer != "landing" or family not in ("grnet", "potential")
]


@pytest.mark.parametrize(("family", "optimizer"), CASES)
def test_checkpoint_round_trip_is_bit_exact(family, optimizer):
    generator = torch.Generator().manual_seed(7)
    data, target = _family_data(family, generator)
    torch.manual_seed(0)
    model = FAMILIES[family]()
    if optimizer == "landing":
        assert _has_stiefel(model)
    optimizers = _optimizers(optimizer, model)
    model.train()
    _train(model, optimizers, data, target, STEPS)

    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers]},
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    torch.manual_seed(1)  # a different initialisation: everything must come from the file
    restored = FAMILIES[family]()
    restored_optimizers = _optimizers(optimizer, restored)
    restored.load_state_dict(checkpoint["model"])
    for target_optimizer, state in zip(restored_optimizers, checkpoint["optimizers"], strict=True):
        target_optimizer.load_state_dict(state)
    restored.train()

    pairs = zip(model.named_parameters(), restored.named_parameters(), strict=True)
    for (name, p), (_, q) in pairs:
        assert type(p) is type(q), name
        if isinstance(p, geoopt.ManifoldParameter):
            assert type(q.manifold) is type(p.manifold), name
            assert vars(q.manifold) == vars(p.manifold) or repr(q.manifold) == repr(p.manifold)

    losses = _train(model, optimizers, data, target, STEPS)
    restored_losses = _train(restored, restored_optimizers, data, target, STEPS)
    for step, (a, b) in enumerate(zip(losses, restored_losses, strict=True)):
        assert torch.equal(a, b), f"loss of step {step} differs: {a.item()!r} vs {b.item()!r}"
    assert all(bool(torch.isfinite(loss)) for loss in losses)
    state, restored_state = model.state_dict(), restored.state_dict()
    assert state.keys() == restored_state.keys()
    for key in state:
        assert torch.equal(state[key], restored_state[key]), f"{key} differs after resuming"
    if family == "spdnet":
        assert any("running" in key for key in state)  # batch-norm statistics round-tripped


def test_whole_model_pickle_keeps_manifolds():
    """``torch.save(model)`` (not just the state_dict) keeps every ManifoldParameter's
    manifold, and the unpickled model computes bitwise the same output."""
    torch.manual_seed(0)
    model = SPDNet()
    generator = torch.Generator().manual_seed(3)
    x, _ = _family_data("spdnet", generator)
    model.eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert isinstance(restored.bimap.weight, geoopt.ManifoldParameter)
    assert isinstance(restored.bimap.weight.manifold, Stiefel)
    assert torch.equal(restored(x), model(x))
