"""Curvature probes on composed models with manifold parameters, against dense oracles.

Three small float64 models, each with Stiefel-constrained parameters:

* an :class:`~torsion.equivariant.EquivariantPotential` with Stiefel linears and a loss on
  energies *and* forces (the gradient is already a double backward; Hessian products
  differentiate three times, through the fused kernels);
* an SPDNet (``BiMap -> ReEig -> BiMap -> LogEig -> SPDVectorize -> Linear``);
* a GNN with positional encodings (``AddLaplacianPE`` eigenpairs through ``SignNet``, a
  ``JacobiConv`` filter in a learned Stiefel channel frame, mean pooling).

The oracle is built without :mod:`torsion.curvature` and without the manifolds' own
Hessian code: the dense Euclidean Hessian and gradient of the loss in the flat parameter
vector (``torch.autograd.functional.hessian``), then the textbook Riemannian Hessian of
the embedded (Euclidean-metric) Stiefel manifold, ``Hess f(X)[U] = P_X(D^2 f(X)[U] -
U sym(X^T grad f(X)))`` with ``P_X(Z) = Z - X sym(X^T Z)`` (Absil, Mahony & Sepulchre
2008, sec. 5.5), assembled as the matrix ``P (H - W) P`` on the ambient space and
restricted to an orthonormal basis of the tangent space.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import geoopt
import pytest
import torch
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import global_mean_pool

from torsion.curvature import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    SharpnessMonitor,
    eigsh,
    hvp,
    spectral_density,
    trace,
)
from torsion.equivariant import EquivariantPotential, energy_and_forces
from torsion.manifolds import Stiefel
from torsion.nn import BiMap, LogEig, ReEig, SPDVectorize
from torsion.optim import RiemannianAdam
from torsion.spectral import AddLaplacianPE, JacobiConv, SignNet

F64 = torch.float64


# ----------------------------------------------------------------------------- the oracle


def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.mT)


def _linear_map_matrix(fn, shape: torch.Size) -> Tensor:
    """The matrix of a linear map of ``shape``-tensors, on row-major flattened vectors."""
    numel = shape.numel()
    basis = torch.eye(numel, dtype=F64).reshape(numel, *shape)
    return torch.stack([fn(e).reshape(-1) for e in basis], dim=1)


def _stiefel_blocks(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Projection ``P`` and Weingarten term ``W: U -> U sym(X^T G)`` of the embedded Stiefel
    manifold at ``x`` (a batch of ``(n, p)`` frames; the matrices act on the flat batch)."""
    frames, grads = x.reshape(-1, *x.shape[-2:]), g.reshape(-1, *x.shape[-2:])
    proj, weingarten = [], []
    for y, gy in zip(frames, grads, strict=True):
        curvature = _sym(y.mT @ gy)
        proj.append(_linear_map_matrix(lambda z, y=y: z - y @ _sym(y.mT @ z), y.shape))
        weingarten.append(_linear_map_matrix(lambda u, c=curvature: u @ c, y.shape))
    return torch.block_diag(*proj), torch.block_diag(*weingarten)


@dataclass
class DenseRiemannianHessian:
    """``matrix``: ``P (H - W) P`` on the ambient flat space (what ``HessianOperator(...,
    riemannian=True)`` applies); ``tangent``: an orthonormal basis of the tangent space,
    ``(n, d)``; ``spectrum``: eigenvalues of the Riemannian Hessian on it, ``(d,)``."""

    matrix: Tensor
    tangent: Tensor
    spectrum: Tensor


def _flat_model(model: nn.Module) -> tuple[Any, Tensor, list]:
    """``call(t, inputs)``: the model (a deep copy in eval mode) at the flat parameters
    ``t``; the flat parameters; the selected ``(name, parameter)`` pairs."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    reference = copy.deepcopy(model).eval()

    def call(t: Tensor, inputs: Any) -> Any:
        pieces = t.split([s.numel() for s in shapes])
        state = {n: p.reshape(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        return torch.func.functional_call(reference, state, tuple(inputs))

    return call, theta, [(n, params[n]) for n in names]


def _batches_of(data) -> tuple[list, int]:
    batches = [data] if isinstance(data, tuple) else list(data)
    return batches, sum(len(y) for _, y in batches)


def _flat_loss(model: nn.Module, loss_fn, data) -> tuple[Any, Tensor, list]:
    call, theta, named = _flat_model(model)
    batches, total = _batches_of(data)

    def loss(t: Tensor) -> Tensor:
        return sum(len(y) / total * loss_fn(call(t, x), y) for x, y in batches)

    return loss, theta, named


def _rows_of_gradients(values: Tensor, t: Tensor) -> Tensor:
    """The gradients of every entry of ``values`` with respect to ``t``, one per row (plain
    autograd, one backward each)."""
    rows = []
    for value in values.reshape(-1):
        (row,) = torch.autograd.grad(value, t, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(t) if row is None else row)
    return torch.stack(rows)


def dense_ggn_by_autograd(model: nn.Module, loss_fn, data) -> Tensor:
    """``sum_b (n_b / N) J_b^T H_b J_b``: the Jacobian row by row, the loss Hessian at the
    outputs by autograd (independent of the double-vjp trick the operator uses)."""
    call, theta, _ = _flat_model(model)
    batches, total = _batches_of(data)
    ggn = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for x, y in batches:
        t = theta.clone().requires_grad_()
        out = call(t, x)
        jacobian = _rows_of_gradients(out, t)
        point = out.detach().reshape(-1)
        h = torch.autograd.functional.hessian(
            lambda o, s=out.shape, y=y: loss_fn(o.reshape(s), y), point
        )
        ggn += len(y) / total * jacobian.T @ h @ jacobian
    return ggn


def dense_fisher_by_autograd(model: nn.Module, loss_fn, data) -> Tensor:
    """``(1/N) sum_i g_i g_i^T`` from one backward per sample."""
    call, theta, _ = _flat_model(model)
    batches, total = _batches_of(data)
    grads = []
    for x, y in batches:
        for i in range(len(y)):
            t = theta.clone().requires_grad_()
            loss = loss_fn(call(t, [a[i : i + 1] for a in x]), y[i : i + 1])
            grads.append(_rows_of_gradients(loss, t)[0])
    g = torch.stack(grads)
    return g.T @ g / total


def dense_riemannian_hessian(model: nn.Module, loss_fn, data) -> DenseRiemannianHessian:
    """The oracle (see the module docstring); only Euclidean-metric Stiefel manifolds."""
    loss, theta, named = _flat_loss(model, loss_fn, data)
    hessian = torch.autograd.functional.hessian(loss, theta)
    theta_ = theta.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(loss(theta_), theta_)
    proj_blocks, weingarten_blocks, offset = [], [], 0
    for _, p in named:
        size = p.numel()
        manifold = getattr(p, "manifold", None)
        if manifold is None:
            proj_blocks.append(torch.eye(size, dtype=F64))
            weingarten_blocks.append(torch.zeros(size, size, dtype=F64))
        else:
            assert isinstance(manifold, Stiefel) and manifold.metric == "euclidean"
            g = gradient[offset : offset + size].reshape(p.shape)
            proj, weingarten = _stiefel_blocks(p.detach(), g)
            proj_blocks.append(proj)
            weingarten_blocks.append(weingarten)
        offset += size
    proj, weingarten = torch.block_diag(*proj_blocks), torch.block_diag(*weingarten_blocks)
    matrix = proj @ (hessian - weingarten) @ proj
    eigenvalues, eigenvectors = torch.linalg.eigh(proj)
    tangent = eigenvectors[:, eigenvalues > 0.5]
    spectrum = torch.linalg.eigvalsh(tangent.T @ matrix @ tangent)
    return DenseRiemannianHessian(matrix, tangent, spectrum)


# ----------------------------------------------------------------------------- the models


class EnergyAndForces(nn.Module):
    """Energies and forces of ``S`` structures of ``N`` atoms each (atoms in structure
    order), one row per structure: ``(S, 1 + 3N)``, the energy then the flat forces."""

    def __init__(self, potential: nn.Module):
        super().__init__()
        self.potential = potential

    def forward(self, pos: Tensor, species: Tensor, batch: Tensor) -> Tensor:
        energy, forces = energy_and_forces(self.potential, pos, species, batch, create_graph=True)
        return torch.cat([energy[:, None], forces.reshape(energy.shape[0], -1)], dim=1)


def energy_force_loss(out: Tensor, target: Tensor) -> Tensor:
    return (out[:, 0] - target[:, 0]).pow(2).mean() + (out[:, 1:] - target[:, 1:]).pow(2).mean()


@dataclass
class Problem:
    model: nn.Module
    loss_fn: Any
    data: Any  # one (inputs, targets) batch
    splits: Any  # the same data as a list of batches


def _potential_problem(backend: str = "auto") -> Problem:
    torch.manual_seed(0)
    potential = EquivariantPotential(
        2,
        cutoff=3.0,
        channels=2,
        lmax=1,
        num_layers=1,
        num_radial=3,
        radial_hidden=3,
        avg_num_neighbors=3.0,
        weight_manifold="stiefel",
        backend=backend,
        dtype=F64,
    )
    generator = torch.Generator().manual_seed(1)
    structures, atoms = 2, 4
    pos = torch.randn(structures * atoms, 3, generator=generator, dtype=F64)
    species = torch.randint(0, 2, (structures * atoms,), generator=generator)
    batch = torch.arange(structures).repeat_interleave(atoms)
    target = torch.randn(structures, 1 + 3 * atoms, generator=generator, dtype=F64)
    splits = [
        (
            (pos[s * atoms : (s + 1) * atoms], species[s * atoms : (s + 1) * atoms], batch[:atoms]),
            target[s : s + 1],
        )
        for s in range(structures)
    ]
    return Problem(
        EnergyAndForces(potential), energy_force_loss, ((pos, species, batch), target), splits
    )


def _random_spd(generator: torch.Generator, count: int, n: int) -> Tensor:
    a = torch.randn(count, n, n, generator=generator, dtype=F64)
    return a @ a.mT / n + 0.5 * torch.eye(n, dtype=F64)


def _spdnet_problem() -> Problem:
    torch.manual_seed(0)
    model = nn.Sequential(
        BiMap(5, 4, dtype=F64),
        ReEig(),
        BiMap(4, 3, dtype=F64),
        LogEig(),
        SPDVectorize(),
        nn.Linear(6, 3, dtype=F64),
    )
    generator = torch.Generator().manual_seed(2)
    x = _random_spd(generator, 8, 5)
    y = torch.randint(0, 3, (8,), generator=generator)
    return Problem(model, nn.CrossEntropyLoss(), ((x,), y), [((x[:3],), y[:3]), ((x[3:],), y[3:])])


class PEGNN(nn.Module):
    """SignNet on Laplacian eigenpairs, concatenated to the node features, filtered by a
    ``JacobiConv`` in a Stiefel channel frame, mean-pooled, read out."""

    def __init__(self, features: int, pe_channels: int):
        super().__init__()
        channels = features + pe_channels
        self.encoder = SignNet(pe_channels, hidden_channels=3, phi_layers=1, rho_layers=1)
        self.filter = JacobiConv(channels, K=2, weight_manifold="stiefel")
        self.readout = nn.Linear(channels, 1)

    def forward(self, x, edge_index, pe, eigvals, batch):
        h = torch.cat([x, self.encoder(pe, eigvals, batch)], dim=1)
        h = torch.tanh(self.filter(h, edge_index))
        return self.readout(global_mean_pool(h, batch)).squeeze(-1)


def _graph(generator: torch.Generator, num_nodes: int) -> Data:
    ring = torch.arange(num_nodes)
    chords = torch.randint(0, num_nodes, (2, 2), generator=generator)
    src = torch.cat([ring, chords[0]])
    dst = torch.cat([(ring + 1) % num_nodes, chords[1]])
    keep = src != dst
    edge_index = torch.stack([torch.cat([src[keep], dst[keep]]), torch.cat([dst[keep], src[keep]])])
    x = torch.randn(num_nodes, 2, generator=generator, dtype=F64)
    return AddLaplacianPE(k=2)(Data(x=x, edge_index=edge_index, num_nodes=num_nodes))


def _gnn_problem() -> Problem:
    torch.manual_seed(0)
    model = PEGNN(features=2, pe_channels=2).to(F64)
    with torch.no_grad():
        frame = model.filter.channel_frame
        frame.copy_(
            Stiefel().random(*frame.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
        )
    generator = torch.Generator().manual_seed(4)
    graphs = [_graph(generator, n) for n in (5, 6, 7)]
    y = torch.randn(3, generator=generator, dtype=F64)

    def batch_of(items):
        b = Batch.from_data_list([graphs[i] for i in items])
        return (b.x, b.edge_index, b.lap_pe.to(F64), b.lap_pe_eigvals.to(F64), b.batch)

    mse = lambda out, target: (out - target).pow(2).mean()  # noqa: E731
    return Problem(
        model, mse, (batch_of([0, 1, 2]), y), [(batch_of([0]), y[:1]), (batch_of([1, 2]), y[1:])]
    )


PROBLEMS = {"potential": _potential_problem, "spdnet": _spdnet_problem, "pe-gnn": _gnn_problem}


@pytest.fixture(scope="module", params=list(PROBLEMS))
def case(request):
    problem = PROBLEMS[request.param]()
    on_stiefel = [p for p in problem.model.parameters() if isinstance(p, geoopt.ManifoldParameter)]
    assert on_stiefel  # every model has manifold parameters
    oracle = dense_riemannian_hessian(problem.model, problem.loss_fn, problem.data)
    return problem, oracle


# ----------------------------------------------------------------------------- the tests


def test_products_match_the_dense_riemannian_hessian(case):
    problem, oracle = case
    n = oracle.matrix.shape[0]
    v = torch.randn(n, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    expected = oracle.matrix @ v
    scale = expected.abs().max()
    for data in (problem.data, problem.splits):  # graph reuse; per-batch products
        op = HessianOperator(problem.model, problem.loss_fn, data, riemannian=True)
        torch.testing.assert_close(op @ v, expected, atol=1e-9 * scale, rtol=0)
    # the Euclidean operator differs: the manifold is not ignored by accident
    euclidean = HessianOperator(problem.model, problem.loss_fn, problem.data) @ v
    assert (euclidean - expected).abs().max() > 1e-3 * scale


def test_eigsh_trace_and_density_match_the_dense_spectrum(case):
    problem, oracle = case
    op = HessianOperator(problem.model, problem.loss_fn, problem.data, riemannian=True)
    generator = torch.Generator().manual_seed(6)
    # top-3: the ambient operator adds zeros on the normal space, the top is tangent
    top = oracle.spectrum[-3:].flip(0)
    assert top[-1] > 1e-6
    result = eigsh(op, k=3, which="LA", tol=1e-10, generator=generator)
    torch.testing.assert_close(result.eigenvalues, top, atol=1e-8 * top[0], rtol=0)
    for y in result.eigenvectors.T:  # eigenvectors are tangent
        torch.testing.assert_close(oracle.tangent @ (oracle.tangent.T @ y), y, atol=1e-6, rtol=0)
    # trace over the tangent space: Hutch++ is exact once its sketch spans the operator
    n, exact = oracle.matrix.shape[0], oracle.spectrum.sum()
    estimate = trace(op, 3 * n, "hutchpp", generator=generator).estimate
    torch.testing.assert_close(estimate, exact, atol=1e-8 * oracle.spectrum.abs().sum(), rtol=0)
    hutchinson = trace(op, 32, "hutchinson", generator=generator)
    assert abs(hutchinson.estimate - exact) < 5 * hutchinson.standard_error
    # SLQ density: mass 1, first two moments are tr(A^d) / n (within their sampling error)
    probes, sigma = 16, 0.05 * float(oracle.spectrum.abs().max())
    lo, hi = oracle.spectrum.min() - 8 * sigma, oracle.spectrum.max() + 8 * sigma
    grid = torch.linspace(float(lo), float(hi), 4001, dtype=F64)
    points, density = spectral_density(op, probes, 4, grid, sigma, generator=generator)
    step = points[1] - points[0]
    torch.testing.assert_close((density * step).sum(), torch.tensor(1.0, dtype=F64))
    a = oracle.matrix
    for power, shift in ((1, 0.0), (2, sigma**2)):
        a_d = torch.linalg.matrix_power(a, power)
        moment = (density * points**power * step).sum() - shift
        # Rademacher quadratic forms: Var(z^T B z) = 2 (||B||_F^2 - sum_i B_ii^2)
        sd = (2 * (a_d.square().sum() - a_d.diagonal().square().sum()) / probes).sqrt() / n
        assert abs(moment - a_d.trace() / n) < 5 * sd + 1e-9 * a_d.abs().max()


def test_sharpness_monitor_tracks_the_riemannian_sharpness_along_training(case):
    problem, _ = case
    model = copy.deepcopy(problem.model)
    optimizer = RiemannianAdam(model.parameters(), lr=1e-2)
    monitor = SharpnessMonitor(
        model,
        problem.loss_fn,
        problem.data,
        every=2,
        optimizer=optimizer,
        riemannian=True,
        tol=1e-6,
        generator=torch.Generator().manual_seed(7),
    )
    inputs, target = problem.data
    for _ in range(4):
        monitor()
        optimizer.zero_grad()
        problem.loss_fn(model(*inputs), target).backward()
        optimizer.step()
    monitor.check()
    assert monitor.history["step"] == [0, 2, 3]
    assert monitor.history["threshold"][0] == [2 / 1e-2]
    assert all(monitor.history["converged"])
    # the last check against the oracle at the trained weights (still on the manifold)
    for p in model.parameters():
        if isinstance(p, geoopt.ManifoldParameter):
            assert p.manifold.check_point_on_manifold(p.detach(), atol=1e-10)
    sharpness = dense_riemannian_hessian(model, problem.loss_fn, problem.data).spectrum[-1]
    assert abs(monitor.history["eigenvalues"][-1][0] - sharpness) < 1e-5 * abs(sharpness)


# ----------------------------------------------------------------------------- the engine


def test_force_losses_take_the_double_backward_path():
    """torch.func cannot transform a forward that calls ``torch.autograd.grad`` (forces)
    nor the ``torch`` kernel backend's custom ops: ``auto`` takes double backward, an
    explicit torch.func method says what is wrong and what to use instead."""
    problem = _potential_problem()
    (inputs, target) = problem.data
    params = {n: p.detach() for n, p in problem.model.named_parameters()}

    def f(state):
        out = torch.func.functional_call(problem.model, state, inputs)
        return problem.loss_fn(out, target)

    v = {
        n: torch.randn(p.shape, generator=torch.Generator().manual_seed(8), dtype=F64)
        for n, p in params.items()
    }
    reference = hvp(f, params, v, method="double_backward")
    for block in (False, True):
        vb = {n: t.unsqueeze(0).repeat(2, *([1] * t.ndim)) for n, t in v.items()} if block else v
        out = hvp(f, params, vb, block=block)
        for name in params:
            got = out[name][1] if block else out[name]
            torch.testing.assert_close(got, reference[name], atol=1e-12, rtol=1e-10)
    for method in ("reverse_over_reverse", "forward_over_reverse"):
        with pytest.raises(RuntimeError, match="use method='double_backward'"):
            hvp(f, params, v, method=method)
        with pytest.raises(RuntimeError, match=r"torch\.func"):
            HessianOperator(problem.model, problem.loss_fn, problem.splits, method=method) @ v


@pytest.mark.parametrize(
    ("make_problem", "operator", "oracle", "torch_func_runs"),
    [
        (_potential_problem, GGNOperator, dense_ggn_by_autograd, False),
        (_spdnet_problem, GGNOperator, dense_ggn_by_autograd, True),
        (_spdnet_problem, EmpiricalFisherOperator, dense_fisher_by_autograd, True),
    ],
    ids=["potential-ggn", "spdnet-ggn", "spdnet-fisher"],
)
def test_ggn_and_fisher_on_composed_models(make_problem, operator, oracle, torch_func_runs):
    """The GGN and the empirical Fisher equal dense matrices built by plain autograd, on one
    batch and on splits, by both methods. torch.func cannot run the force-trained
    potential (its forward calls ``torch.autograd.grad``): ``"auto"`` falls back to
    autograd and keeps that choice, ``"torch_func"`` names the problem. (The SPDNet's
    first derivatives do run under torch.func.)"""
    problem = make_problem()
    dense = oracle(problem.model, problem.loss_fn, problem.data)
    v = torch.randn(dense.shape[0], 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    for data in (problem.data, problem.splits):
        for method in ("auto", "autograd"):
            op = operator(problem.model, problem.loss_fn, data, method=method)
            torch.testing.assert_close(op @ v, dense @ v, atol=1e-10, rtol=1e-9)
            fell_back = method == "auto" and not torch_func_runs
            assert op.method == ("autograd" if fell_back else method)
    if not torch_func_runs:
        with pytest.raises(RuntimeError, match="use method='autograd'"):
            operator(problem.model, problem.loss_fn, problem.data, method="torch_func") @ v


def test_both_kernel_backends_give_the_same_riemannian_hessian():
    """The fused ``torch`` backend's third derivatives equal the reference einsums'."""
    products = []
    for backend in ("reference", "torch"):
        problem = _potential_problem(backend)
        op = HessianOperator(problem.model, problem.loss_fn, problem.data, riemannian=True)
        v = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(9), dtype=F64)
        products.append(op @ v)
    torch.testing.assert_close(products[1], products[0], atol=1e-10, rtol=1e-10)
