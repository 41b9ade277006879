"""torsion's models under DistributedDataParallel, trained by RiemannianAdam on two ranks.

Two gloo processes on the CPU train three models of the library, each wrapped in
:class:`torch.nn.parallel.DistributedDataParallel`, on rank-sharded float64 data:

* an SPDNet (``BiMap -> ReEig -> BiMap -> SPDBatchNorm -> LogEig``), Stiefel and SPD
  parameters, batch-norm running statistics;
* an :class:`~torsion.equivariant.EquivariantPotential` with Stiefel-constrained linears,
  trained on energies and forces: the forces come from ``create_graph=True`` inside the
  wrapped forward, so the loss back-propagates by double backward through DDP;
* a GNN: a SignNet positional encoding and a JacobiConv spectral filter, both with
  ``weight_manifold="stiefel"`` (an orthonormal readout, an orthogonal channel frame).

Each rank starts from a different random initialisation (DDP broadcasts rank 0's). The
oracle is single-process training in float64: with equal shards and a mean loss, DDP's
gradient average is the full-batch gradient, so the parameters must match full-batch
training to rounding. SPDNet's batch norm normalises with each rank's own batch
statistics (the default ``sync=False``; ``tests/nn/test_batchnorm_sync.py`` covers
``sync=True``), so its oracle evaluates the two
shards separately and keeps rank 0's running statistics (DDP broadcasts rank 0's buffers
at every forward). Then the curvature operators run on the DDP-trained models with
``distributed=True`` and must equal the full-data operator of one process.

FSDP2: ``fully_shard`` turns every parameter into a plain DTensor parameter (the manifold
is lost); with the manifold parameters passed as ``ignored_params`` and their gradients
averaged by hand, training the GNN matches single-process training too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from geoopt import ManifoldParameter
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch_geometric.data import Batch, Data
from torch_geometric.nn import global_mean_pool

from tests._distributed import run_on_ranks
from torsion.curvature import HessianOperator, eigsh
from torsion.equivariant import EquivariantPotential, energy_and_forces
from torsion.manifolds import SPDAffineInvariant, Stiefel
from torsion.nn import BiMap, LogEig, ReEig, SPDBatchNorm, SPDVectorize
from torsion.optim import RiemannianAdam
from torsion.spectral import AddLaplacianPE, JacobiConv, SignNet

pytestmark = pytest.mark.slow

DTYPE = torch.float64
STEPS = 3
WORLD_SIZE = 2
# Parameters after training against the single-process oracle, which sums the shard
# gradients in another order: rounding of the summands, amplified by Adam (see _optimizer)
TRAINED = {"rtol": 1e-9, "atol": 1e-11}


# ----------------------------------------------------------------------------- models


def _spdnet() -> nn.Module:
    return nn.Sequential(
        BiMap(6, 4, dtype=DTYPE),
        ReEig(),
        BiMap(4, 3, dtype=DTYPE),
        SPDBatchNorm(3, dtype=DTYPE),
        LogEig(),
        SPDVectorize(),
        nn.Linear(6, 2, dtype=DTYPE),
    )


class _EnergyAndForces(nn.Module):
    """A potential whose forward returns energies and differentiable forces.

    Computing the forces inside the module that DDP wraps keeps the whole double-backward
    graph under one DDP forward, so one ``loss.backward()`` all-reduces every gradient.
    """

    def __init__(self) -> None:
        super().__init__()
        self.potential = EquivariantPotential(
            2,
            cutoff=2.5,
            channels=2,
            lmax=1,
            num_layers=1,
            num_radial=3,
            radial_hidden=4,
            avg_num_neighbors=3.0,
            weight_manifold="stiefel",
            dtype=DTYPE,
        )

    def forward(self, pos: Tensor, species: Tensor, batch: Tensor) -> tuple[Tensor, Tensor]:
        return energy_and_forces(self.potential, pos, species, batch, create_graph=True)


class _SpectralGNN(nn.Module):
    """SignNet PE + node features -> Linear -> JacobiConv -> graph mean -> Linear.

    Both the encoder's readout and the filter's channel frame are Stiefel-constrained
    (``weight_manifold="stiefel"``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.encoder = SignNet(3, hidden_channels=4, weight_manifold="stiefel")
        self.embed = nn.Linear(2 + 3, 4)
        self.filter = JacobiConv(4, K=3, weight_manifold="stiefel")
        self.readout = nn.Linear(4, 1)
        self.to(DTYPE)

    def forward(self, x, edge_index, batch, pe, eigvals, mask) -> Tensor:
        h = torch.cat([x, self.encoder(pe, eigvals, batch, mask=mask)], dim=-1)
        h = torch.tanh(self.filter(self.embed(h), edge_index))
        return self.readout(global_mean_pool(h, batch)).squeeze(-1)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "spdnet": _spdnet,
    "potential": _EnergyAndForces,
    "gnn": _SpectralGNN,
}


# ----------------------------------------------------------------------------- data


def _spd_batch(generator: torch.Generator, size: int) -> tuple[Tensor, Tensor]:
    a = torch.randn(size, 6, 10, dtype=DTYPE, generator=generator)
    x = a @ a.mT / 10 + 0.1 * torch.eye(6, dtype=DTYPE)
    return (x,), torch.randint(0, 2, (size,), generator=generator)


def _structures(generator: torch.Generator, count: int) -> tuple[tuple, Tensor]:
    """``count`` structures of 4 atoms: ``((pos, species, batch), targets)``.

    The targets of a structure are one row: its energy, then its atoms' forces.
    """
    atoms = 4 * count
    pos = 1.5 * torch.rand(atoms, 3, dtype=DTYPE, generator=generator)
    species = torch.randint(0, 2, (atoms,), generator=generator)
    batch = torch.arange(count).repeat_interleave(4)
    return (pos, species, batch), torch.randn(count, 1 + 4 * 3, dtype=DTYPE, generator=generator)


def _graph_list(generator: torch.Generator, count: int) -> list[Data]:
    """``count`` connected graphs of 5 nodes (a cycle plus one chord) with Laplacian PEs and
    a regression target each."""
    transform = AddLaplacianPE(k=3)
    graphs = []
    for _ in range(count):
        ring = torch.arange(5)
        chord = torch.randint(0, 5, (1,), generator=generator)
        src = torch.cat([ring, chord])
        dst = torch.cat([(ring + 1) % 5, (chord + 2) % 5])
        edge_index = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], dim=1)
        x = torch.randn(5, 2, dtype=DTYPE, generator=generator)
        y = torch.randn(1, dtype=DTYPE, generator=generator)
        graphs.append(transform(Data(x=x, edge_index=edge_index.unique(dim=1), y=y)))
    return graphs


def _collate_graphs(graphs: list[Data]) -> tuple[tuple, Tensor]:
    data = Batch.from_data_list(graphs)
    pe, eigvals = data.lap_pe.to(DTYPE), data.lap_pe_eigvals.to(DTYPE)
    return (data.x, data.edge_index, data.batch, pe, eigvals, data.lap_pe_mask), data.y


def _spdnet_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(outputs, targets)


def _potential_loss(outputs: tuple[Tensor, Tensor], targets: Tensor) -> Tensor:
    energy, forces = outputs
    return nn.functional.mse_loss(energy, targets[:, 0]) + nn.functional.mse_loss(
        forces, targets[:, 1:].reshape(-1, 3)
    )


LOSSES = {"spdnet": _spdnet_loss, "potential": _potential_loss, "gnn": nn.functional.mse_loss}
SHARD_SIZE = {"spdnet": 4, "potential": 2, "gnn": 2}
# the parameters of the curvature checks: manifold and Euclidean ones
PROBED = {
    "spdnet": ["2.weight", "3.bias", "6.bias"],
    "potential": ["potential.readout_hidden.weights.0", "potential.atomic_energies"],
    "gnn": ["filter.channel_frame", "encoder.rho.layers.1.weight", "readout.bias"],
}


def _generator(step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * step + rank)


def _shard(name: str, step: int, rank: int) -> tuple[tuple, Tensor]:
    """Rank ``rank``'s shard of step ``step``: its own generator, equal sizes on all ranks."""
    generator, size = _generator(step, rank), SHARD_SIZE[name]
    if name == "spdnet":
        return _spd_batch(generator, size)
    if name == "potential":
        return _structures(generator, size)
    return _collate_graphs(_graph_list(generator, size))


def _full_batch(name: str, step: int) -> tuple[tuple, Tensor]:
    """All ranks' shards of step ``step`` as one batch, in rank order."""
    if name == "gnn":
        graphs = [g for r in range(WORLD_SIZE) for g in _graph_list(_generator(step, r), 2)]
        return _collate_graphs(graphs)
    shards = [_shard(name, step, rank) for rank in range(WORLD_SIZE)]
    targets = torch.cat([t for _, t in shards])
    if name == "spdnet":
        return (torch.cat([inputs[0] for inputs, _ in shards]),), targets
    pos, species, batch = (torch.cat(parts) for parts in zip(*(i for i, _ in shards), strict=True))
    structure_offset = torch.arange(WORLD_SIZE).repeat_interleave(4 * SHARD_SIZE[name])
    return (pos, species, batch + SHARD_SIZE[name] * structure_offset), targets


def _optimizer(model: nn.Module) -> RiemannianAdam:
    # eps bounds how much Adam's division by sqrt(v) amplifies rounding: by at most
    # lr / eps for gradient entries that nearly cancel (JacobiConv's coefficients do)
    return RiemannianAdam(model.parameters(), lr=0.02, eps=1e-4)


# ----------------------------------------------------------------------------- ranks


def _operator(model: nn.Module, name: str, data: object, distributed: bool, **kwargs):
    """The Hessian operator of the probed parameters (DDP names them ``module.*``)."""
    prefix = "module." if isinstance(model, DistributedDataParallel) else ""
    params = [prefix + p for p in PROBED[name]]
    return HessianOperator(model, LOSSES[name], data, params, distributed=distributed, **kwargs)


def _train_on_rank(rank: int, world_size: int) -> dict[str, dict]:
    """Every model in one pair of processes: spawning costs more than training."""
    results = {}
    for name, build in MODELS.items():
        torch.manual_seed(rank)  # every rank starts differently; DDP broadcasts rank 0's
        model = build()
        ddp = DistributedDataParallel(model)
        optimizer = _optimizer(model)
        losses = []
        for step in range(STEPS):
            inputs, targets = _shard(name, step, rank)
            optimizer.zero_grad()
            loss = LOSSES[name](ddp(*inputs), targets)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        # running statistics differ across ranks until the next forward broadcasts rank 0's
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
        data = _shard(name, STEPS, rank)
        hessian = _operator(model, name, data, True, riemannian=True).to_dense()
        wrapped = _operator(ddp, name, data, True, riemannian=True).to_dense()
        top = eigsh(  # the largest eigenvalue
            _operator(model, name, data, True),
            k=1,
            tol=1e-10,
            generator=torch.Generator().manual_seed(rank),  # rank 0's is used on every rank
        ).eigenvalues
        results[name] = {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": buffers,
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "losses": torch.stack(losses),
            "hessian": hessian,
            "hessian_of_wrapper": wrapped,
            "top_eigenvalue": top,
        }
    return results


def _fsdp_on_rank(rank: int, world_size: int) -> dict:
    """FSDP2 with the manifold parameters left out of sharding (``ignored_params``); their
    gradients are averaged by hand. Plain ``fully_shard`` would turn them into DTensors and
    drop their manifolds."""
    torch.manual_seed(0)
    plain = _SpectralGNN()
    mesh = init_device_mesh("cpu", (world_size,))
    fully_shard(plain, mesh=mesh)
    dropped = {n: not hasattr(p, "manifold") for n, p in plain.named_parameters()}

    torch.manual_seed(0)  # unlike DDP, FSDP does not broadcast: initialise alike
    model = _SpectralGNN()
    # a list in model order: the ranks all-reduce the gradients one by one, so they must
    # take them in the same order (a set's order depends on object addresses)
    constrained = [p for p in model.parameters() if isinstance(p, ManifoldParameter)]
    fully_shard(model, mesh=mesh, ignored_params=set(constrained))
    optimizer = _optimizer(model)
    for step in range(STEPS):
        inputs, targets = _shard("gnn", step, rank)
        optimizer.zero_grad()
        LOSSES["gnn"](model(*inputs), targets).backward()
        for p in constrained:
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        optimizer.step()
    params = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
    }
    sharded = {n: isinstance(p, DTensor) for n, p in model.named_parameters()}
    return {"dropped": dropped, "params": params, "sharded": sharded}


def _on_rank(rank: int, world_size: int) -> dict[str, dict]:
    return {**_train_on_rank(rank, world_size), "fsdp": _fsdp_on_rank(rank, world_size)}


@pytest.fixture(scope="module")
def trained_on_two_ranks() -> list[dict[str, dict]]:
    return run_on_ranks(_on_rank, world_size=WORLD_SIZE)


# ----------------------------------------------------------------------------- oracle


def _snapshot(model: nn.Module) -> list[Tensor]:
    return [b.clone() for b in model.buffers()]


def _restore(model: nn.Module, buffers: list[Tensor]) -> None:
    with torch.no_grad():
        for b, value in zip(model.buffers(), buffers, strict=True):
            b.copy_(value)


def _oracle_step(name: str, model: nn.Module, step: int) -> Tensor:
    """The loss DDP's averaged gradient differentiates; buffers as rank 0 keeps them."""
    if name != "spdnet":  # no batch statistics: the full batch is the oracle
        inputs, targets = _full_batch(name, step)
        return LOSSES[name](model(*inputs), targets)
    start, losses, rank0_buffers = _snapshot(model), [], None
    for rank in range(WORLD_SIZE):
        _restore(model, start)
        inputs, targets = _shard(name, step, rank)
        losses.append(LOSSES[name](model(*inputs), targets))
        if rank == 0:
            rank0_buffers = _snapshot(model)
    _restore(model, rank0_buffers)
    return sum(losses) / WORLD_SIZE


def _trained_in_one_process(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]()
    optimizer = _optimizer(model)
    for step in range(STEPS):
        optimizer.zero_grad()
        _oracle_step(name, model, step).backward()
        optimizer.step()
    return model


@pytest.fixture(scope="module")
def trained_in_one_process() -> dict[str, nn.Module]:
    return {name: _trained_in_one_process(name) for name in MODELS}


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(MODELS))
def test_ranks_stay_identical_and_match_single_process_training(
    trained_on_two_ranks, trained_in_one_process, name
):
    rank0, rank1 = (result[name] for result in trained_on_two_ranks)
    for key, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][key]), key
    oracle = trained_in_one_process[name]
    for key, value in oracle.named_parameters():
        torch.testing.assert_close(rank0["params"][key], value.detach(), **TRAINED)
    # rank 0's running statistics are the single-process ones of rank 0's shards
    for key, value in oracle.named_buffers():
        torch.testing.assert_close(rank0["buffers"][key], value, **TRAINED)


@pytest.mark.parametrize("name", list(MODELS))
def test_manifold_parameters_stay_on_their_manifolds(trained_on_two_ranks, name):
    oracle = MODELS[name]()
    params = trained_on_two_ranks[0][name]["params"]
    constrained = 0
    for key, template in oracle.named_parameters():
        manifold = getattr(template, "manifold", None)
        if isinstance(manifold, Stiefel):
            constrained += 1
            w = params[key]
            eye = torch.eye(w.shape[-1], dtype=DTYPE)
            torch.testing.assert_close(w.mT @ w, eye.expand_as(w.mT @ w), atol=1e-10, rtol=0)
        elif isinstance(manifold, SPDAffineInvariant):
            constrained += 1
            s = params[key]
            torch.testing.assert_close(s, s.mT, atol=1e-12, rtol=0)
            assert float(torch.linalg.eigvalsh(s).min()) > 0
    assert constrained > 0


def test_batchnorm_running_statistics_are_rank_local_until_broadcast(
    trained_on_two_ranks,
):
    """Training-mode SPDBatchNorm uses each rank's own batch: after the last step the
    ranks' running statistics differ (DDP re-broadcasts rank 0's at the next forward)."""
    rank0, rank1 = (result["spdnet"]["buffers"] for result in trained_on_two_ranks)
    assert set(rank0) == {"3.running_mean", "3.running_var"}
    assert not torch.equal(rank0["3.running_mean"], rank1["3.running_mean"])
    # after the broadcast from rank 0 (what the next DDP forward would do) they agree
    synced0, synced1 = (result["spdnet"]["state"] for result in trained_on_two_ranks)
    for key in rank0:
        assert torch.equal(synced0[key], synced1[key])
        assert torch.equal(synced0[key], rank0[key])


def test_the_loss_sequences_differ_by_rank_but_average_to_the_oracle(trained_on_two_ranks):
    """Each rank reports its shard's loss; their mean is the full-batch loss."""
    torch.manual_seed(0)
    model = _EnergyAndForces()
    optimizer = _optimizer(model)
    expected = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = _oracle_step("potential", model, step)
        expected.append(loss.detach())
        loss.backward()
        optimizer.step()
    per_rank = torch.stack([result["potential"]["losses"] for result in trained_on_two_ranks])
    assert not torch.equal(per_rank[0], per_rank[1])
    torch.testing.assert_close(per_rank.mean(0), torch.stack(expected), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_distributed_hessian_of_the_trained_model_is_the_full_data_hessian(
    trained_on_two_ranks, name
):
    """Each rank passes its shard; every rank gets the full-data (Riemannian) Hessian at
    the DDP-trained parameters, and ``eigsh`` returns the same eigenvalue on every rank."""
    rank0, rank1 = (result[name] for result in trained_on_two_ranks)
    model = MODELS[name]()
    model.load_state_dict(rank0["state"])
    if name == "spdnet":
        # after the broadcast every rank holds rank 0's running statistics; in eval
        # semantics the two shards are just two batches of the full data
        data = [_shard(name, STEPS, rank) for rank in range(WORLD_SIZE)]
    else:
        data = _full_batch(name, STEPS)
    expected = _operator(model, name, data, False, riemannian=True).to_dense()
    for result in (rank0, rank1):
        torch.testing.assert_close(result["hessian"], expected, rtol=1e-9, atol=1e-11)
    assert torch.equal(rank0["top_eigenvalue"], rank1["top_eigenvalue"])
    largest = torch.linalg.eigvalsh(_operator(model, name, data, False).to_dense())[-1]
    torch.testing.assert_close(rank0["top_eigenvalue"][0], largest, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", list(MODELS))
def test_hessian_of_the_ddp_wrapper_equals_that_of_its_module(trained_on_two_ranks, name):
    """``HessianOperator(ddp, ...)`` (parameters named ``module.*``) gives the same
    operator as ``HessianOperator(ddp.module, ...)``."""
    for result in trained_on_two_ranks:
        torch.testing.assert_close(
            result[name]["hessian_of_wrapper"], result[name]["hessian"], rtol=0, atol=0
        )


def test_fsdp2_drops_manifolds_unless_they_are_ignored(trained_on_two_ranks):
    """``fully_shard`` makes every parameter a plain ``nn.Parameter`` holding a DTensor,
    so a Riemannian optimizer would treat the Stiefel frames as Euclidean."""
    for result in trained_on_two_ranks:
        assert all(result["fsdp"]["dropped"].values())


def test_fsdp2_with_ignored_manifold_parameters_matches_single_process_training(
    trained_on_two_ranks, trained_in_one_process
):
    rank0, rank1 = (result["fsdp"] for result in trained_on_two_ranks)
    oracle = trained_in_one_process["gnn"]
    for key, value in oracle.named_parameters():
        on_manifold = isinstance(value, ManifoldParameter)
        assert rank0["sharded"][key] == (not on_manifold), key
        assert torch.equal(rank0["params"][key], rank1["params"][key]), key
        torch.testing.assert_close(rank0["params"][key], value.detach(), **TRAINED)
        if on_manifold:
            w = rank0["params"][key]
            eye = torch.eye(w.shape[-1], dtype=DTYPE)
            torch.testing.assert_close(w.mT @ w, eye, atol=1e-12, rtol=0)
