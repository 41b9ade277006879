"""SPD manifolds under four metrics: the shared property suite plus metric-specific checks.

Oracles are independent of the implementation: SciPy/NumPy matrix functions in float64,
the metrics' textbook distance formulas, autograd through the exponential map, and
(optionally) pymanopt.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import geoopt
import numpy as np
import pytest
import scipy.linalg
import torch

from torsion.linalg import sym_expm
from torsion.manifolds._spd import (
    SPDAffineInvariant,
    SPDBuresWasserstein,
    SPDLogCholesky,
    SPDLogEuclidean,
)
from torsion.testing import ManifoldSuite
from torsion.testing._manifold_suite import _cost

METRICS = [SPDAffineInvariant, SPDLogEuclidean, SPDLogCholesky, SPDBuresWasserstein]
F64 = torch.float64


def _ids(cls) -> str:
    return cls.__name__.removeprefix("SPD")


def _spd(n, batch=(), *, generator, condition=10.0, dtype=F64):
    return SPDAffineInvariant().random(
        *batch, n, n, dtype=dtype, generator=generator, condition=condition
    )


def _sym(a):
    return (a + a.mT) / 2


def _numpy_apply(fn, x):
    flat = x.detach().reshape(-1, *x.shape[-2:]).numpy()
    out = np.stack([np.real(fn(a)) for a in flat])
    return torch.from_numpy(out).reshape(x.shape)


# ---------------------------------------------------------------------------------------
# The shared property suite
# ---------------------------------------------------------------------------------------


class TestSPDAffineInvariant(ManifoldSuite):
    manifold = SPDAffineInvariant()
    point_shape = (4, 4)
    parallel_transport = True
    closed_form_mean = False


class TestSPDLogEuclidean(ManifoldSuite):
    manifold = SPDLogEuclidean()
    point_shape = (4, 4)
    parallel_transport = True
    closed_form_mean = True


class TestSPDLogCholesky(ManifoldSuite):
    manifold = SPDLogCholesky()
    point_shape = (4, 4)
    parallel_transport = True
    closed_form_mean = True


class TestSPDBuresWasserstein(ManifoldSuite):
    manifold = SPDBuresWasserstein()
    point_shape = (4, 4)
    # transp is the identity, a documented vector transport: tangent, not isometric.
    parallel_transport = False
    closed_form_mean = False


class TestSPDAffineInvariantOddSize(ManifoldSuite):
    manifold = SPDAffineInvariant()
    point_shape = (3, 3)
    batch_shapes: ClassVar[list[tuple[int, ...]]] = [(), (2, 2)]


# ---------------------------------------------------------------------------------------
# Riemannian Hessian against an exact oracle
# ---------------------------------------------------------------------------------------


def _mixed_second_derivative(fn):
    a = torch.zeros((), dtype=F64, requires_grad=True)
    b = torch.zeros((), dtype=F64, requires_grad=True)
    (da,) = torch.autograd.grad(fn(a, b), a, create_graph=True)
    (dab,) = torch.autograd.grad(da, b)
    return dab


@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_riemannian_hessian_matches_autograd_through_expmap(cls, generator):
    # expmap is a second-order retraction, so <Hess f(x)[u], v> is the mixed derivative
    # of f(expmap(x, a u + b v)) at 0, here by double backward (exact up to rounding).
    manifold = cls()
    x = manifold.random(4, 4, dtype=F64, generator=generator)
    u = manifold.random_tangent(x, generator=generator)
    v = manifold.random_tangent(x, generator=generator)
    x_grad = x.clone().requires_grad_()
    (egrad,) = torch.autograd.grad(_cost(x_grad), x_grad, create_graph=True)
    (ehess,) = torch.autograd.grad(egrad, x_grad, u)
    expected = manifold.inner(x, manifold.ehess2rhess(x, egrad.detach(), ehess, u), v)
    if cls is SPDLogEuclidean:
        # Through the flat chart: expmap(x, w) = expm(logm x + Dlog_x[w]), with Dlog_x
        # from SciPy's Frechet derivative of logm (an independent oracle).
        log_x = torch.from_numpy(scipy.linalg.logm(x.numpy()).real)

        def dlog(w):
            # logm(x + t w) = logm(x) + t Dlog_x[w] + ..., via the 2n x 2n block trick.
            n = x.shape[-1]
            block = np.block([[x.numpy(), w.numpy()], [np.zeros((n, n)), x.numpy()]])
            return torch.from_numpy(scipy.linalg.logm(block).real[:n, n:])

        wu, wv = dlog(u), dlog(v)
        actual = _mixed_second_derivative(lambda a, b: _cost(sym_expm(log_x + a * wu + b * wv)))
    else:
        actual = _mixed_second_derivative(lambda a, b: _cost(manifold.expmap(x, a * u + b * v)))
    torch.testing.assert_close(expected, actual, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------
# Derivatives of the operations themselves
# ---------------------------------------------------------------------------------------


def _operations(manifold, y, u):
    """Each operation as a function of two symmetric matrices (a point and a point/vector)."""
    return {
        "logmap": lambda a, b: manifold.logmap(a, b),
        "expmap": lambda a, b: manifold.expmap(a, b - y + u),
        "transp": lambda a, b: manifold.transp(a, b, u + a),
        "inner": lambda a, b: manifold.inner(a, b - y + u, u),
        "dist": lambda a, b: manifold.dist(a, b),
        "geodesic": lambda a, b: manifold.geodesic(a, b, 0.3),
        "egrad2rgrad": lambda a, b: manifold.egrad2rgrad(a, b),
    }


def _symmetric_inputs(fn):
    return lambda a, b: fn(_sym(a), _sym(b))


@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_operations_have_exact_first_derivatives(cls, generator):
    manifold = cls()
    x, y = _spd(3, generator=generator), _spd(3, generator=generator)
    u = manifold.random_tangent(x, generator=generator)
    inputs = (x.clone().requires_grad_(), y.clone().requires_grad_())
    for name, fn in _operations(manifold, y, u).items():
        assert torch.autograd.gradcheck(
            _symmetric_inputs(fn), inputs, eps=1e-6, atol=1e-5, rtol=1e-4
        ), name


def _second_derivatives_are_exact(cls, names, generator):
    manifold = cls()
    x, y = _spd(3, generator=generator), _spd(3, generator=generator)
    u = manifold.random_tangent(x, generator=generator)
    inputs = (x.clone().requires_grad_(), y.clone().requires_grad_())
    operations = _operations(manifold, y, u)
    for name in names:
        assert torch.autograd.gradgradcheck(
            _symmetric_inputs(operations[name]), inputs, eps=1e-6, atol=1e-5, rtol=1e-4
        ), name


@pytest.mark.parametrize("cls", [SPDAffineInvariant, SPDLogCholesky, SPDBuresWasserstein], ids=_ids)
def test_operations_have_exact_second_derivatives(cls, generator):
    names = ["logmap", "expmap", "transp", "inner", "dist"]
    _second_derivatives_are_exact(cls, names, generator)


def test_log_euclidean_distance_has_exact_second_derivatives(generator):
    _second_derivatives_are_exact(SPDLogEuclidean, ["dist", "geodesic"], generator)


@pytest.mark.parametrize("name", ["logmap", "expmap", "transp", "inner"])
def test_log_euclidean_base_point_second_derivatives_raise_clearly(name, generator):
    # These need third derivatives of expm/logm, which torsion.linalg does not implement:
    # it must say so rather than drop terms.
    with pytest.raises(RuntimeError, match="third derivatives"):
        _second_derivatives_are_exact(SPDLogEuclidean, [name], generator)


def test_log_euclidean_expmap_is_twice_differentiable_in_the_tangent(generator):
    manifold = SPDLogEuclidean()
    x = manifold.random(3, 3, dtype=F64, generator=generator)
    u = manifold.random_tangent(x, generator=generator)
    v = manifold.random_tangent(x, generator=generator)
    _mixed_second_derivative(lambda a, b: _cost(manifold.expmap(x, a * u + b * v)))


# ---------------------------------------------------------------------------------------
# Metric-specific closed forms
# ---------------------------------------------------------------------------------------


def test_affine_invariant_distance_is_congruence_invariant(generator):
    manifold = SPDAffineInvariant()
    x, y = _spd(4, (5,), generator=generator), _spd(4, (5,), generator=generator)
    a = torch.randn(5, 4, 4, dtype=F64, generator=generator) + 2 * torch.eye(4, dtype=F64)
    assert (torch.linalg.det(a).abs() > 1e-3).all()
    moved = manifold.dist(a @ x @ a.mT, a @ y @ a.mT)
    torch.testing.assert_close(moved, manifold.dist(x, y), rtol=1e-9, atol=1e-9)
    # and the log map is congruence-equivariant: log_{AXA^T}(AYA^T) = A log_X(Y) A^T
    torch.testing.assert_close(
        manifold.logmap(a @ x @ a.mT, a @ y @ a.mT),
        a @ manifold.logmap(x, y) @ a.mT,
        rtol=1e-8,
        atol=1e-8,
    )


def test_affine_invariant_distance_matches_generalized_eigenvalues(generator):
    x, y = _spd(4, (3,), generator=generator), _spd(4, (3,), generator=generator)
    expected = torch.stack(
        [
            torch.from_numpy(np.log(scipy.linalg.eigh(b.numpy(), a.numpy(), eigvals_only=True)))
            for a, b in zip(x, y, strict=True)
        ]
    ).norm(dim=-1)
    torch.testing.assert_close(SPDAffineInvariant().dist(x, y), expected, rtol=1e-10, atol=1e-10)


def test_log_euclidean_distance_is_the_frobenius_distance_of_logarithms(generator):
    x, y = _spd(4, (3,), generator=generator), _spd(4, (3,), generator=generator)
    logm = lambda t: _numpy_apply(scipy.linalg.logm, t)  # noqa: E731
    expected = torch.linalg.matrix_norm(logm(x) - logm(y))
    torch.testing.assert_close(SPDLogEuclidean().dist(x, y), expected, rtol=1e-10, atol=1e-10)


def test_bures_wasserstein_distance_matches_the_trace_formula(generator):
    x, y = _spd(4, (3,), generator=generator), _spd(4, (3,), generator=generator)
    sqrtm = lambda t: _numpy_apply(scipy.linalg.sqrtm, t)  # noqa: E731
    root = sqrtm(x)
    trace = lambda t: t.diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    expected = (trace(x) + trace(y) - 2 * trace(sqrtm(root @ y @ root))).sqrt()
    torch.testing.assert_close(SPDBuresWasserstein().dist(x, y), expected, rtol=1e-9, atol=1e-9)


def test_log_cholesky_distance_matches_the_cholesky_formula(generator):
    x, y = _spd(4, (3,), generator=generator), _spd(4, (3,), generator=generator)
    lx, ly = (torch.from_numpy(np.linalg.cholesky(t.numpy())) for t in (x, y))
    strictly_lower = (lx - ly).tril(-1).pow(2).sum((-2, -1))
    diagonal = (lx.diagonal(dim1=-2, dim2=-1).log() - ly.diagonal(dim1=-2, dim2=-1).log()).pow(2)
    expected = (strictly_lower + diagonal.sum(-1)).sqrt()
    torch.testing.assert_close(SPDLogCholesky().dist(x, y), expected, rtol=1e-10, atol=1e-10)


def test_commuting_matrices_have_the_known_distances(generator):
    # Diagonal matrices: every metric reduces to a formula in the eigenvalues.
    a = torch.tensor([0.5, 1.0, 3.0], dtype=F64)
    b = torch.tensor([2.0, 1.5, 0.25], dtype=F64)
    x, y = torch.diag(a), torch.diag(b)
    log_gap = (a.log() - b.log()).norm()
    expected = {
        SPDAffineInvariant: log_gap,
        SPDLogEuclidean: log_gap,
        SPDLogCholesky: (0.5 * (a.log() - b.log())).norm(),
        SPDBuresWasserstein: (a.sqrt() - b.sqrt()).norm(),
    }
    for cls, value in expected.items():
        torch.testing.assert_close(cls().dist(x, y), value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_dist2_is_the_squared_distance(cls, generator):
    manifold = cls()
    x, y = _spd(3, (4,), generator=generator), _spd(3, (4,), generator=generator)
    torch.testing.assert_close(manifold.dist2(x, y), manifold.dist(x, y) ** 2)
    assert manifold.dist(x, y, keepdim=True).shape == (4, 1, 1)


def test_affine_invariant_transport_is_the_congruence_by_the_geometric_mean(generator):
    manifold = SPDAffineInvariant()
    x, y = _spd(4, (3,), generator=generator), _spd(4, (3,), generator=generator)
    # E x E^T = y for E = (y x^-1)^(1/2), and x is a tangent vector at x.
    torch.testing.assert_close(manifold.transp(x, y, x), y, rtol=1e-9, atol=1e-9)
    u = manifold.random_tangent(x, generator=generator)
    there_and_back = manifold.transp(y, x, manifold.transp(x, y, u))
    torch.testing.assert_close(there_and_back, u, rtol=1e-9, atol=1e-9)


def test_affine_invariant_retraction_is_second_order(generator):
    manifold = SPDAffineInvariant()
    x = _spd(4, (3,), generator=generator)
    u = manifold.random_tangent(x, generator=generator)
    gaps = [
        torch.linalg.matrix_norm(manifold.retr(x, t * u) - manifold.expmap(x, t * u)).max()
        for t in (1e-2, 5e-3)
    ]
    # second order: the gap is O(t^3), so halving t divides it by about 8
    assert 6.0 < float(gaps[0] / gaps[1]) < 10.0
    # and it stays SPD far outside any neighbourhood
    far = manifold.retr(x, -20 * u)
    assert (torch.linalg.eigvalsh(far) > 0).all()


def test_bures_wasserstein_transport_is_the_documented_identity(generator):
    manifold = SPDBuresWasserstein()
    x, y = _spd(3, (2,), generator=generator), _spd(3, (), generator=generator)
    v = torch.randn(3, 3, dtype=F64, generator=generator)
    moved = manifold.transp(x, y, v)
    assert moved.shape == (2, 3, 3)
    torch.testing.assert_close(moved, _sym(v).expand(2, 3, 3))


@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_transport_of_one_vector_to_a_batch_owns_its_memory(cls, generator):
    """Broadcasting one vector to a batch of points gives a tensor of its own: writing to
    one transported vector changes neither the others nor ``v`` (an ``expand`` view with
    stride 0 would change them all)."""
    manifold = cls()
    x, y = _spd(3, (3,), generator=generator), _spd(3, (3,), generator=generator)
    v = _sym(torch.randn(3, 3, dtype=F64, generator=generator))
    before = v.clone()
    moved = manifold.transp(x, y, v)
    others = moved[1:].clone()
    moved[0].add_(1.0)
    torch.testing.assert_close(moved[1:], others, rtol=0, atol=0)
    torch.testing.assert_close(v, before, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [SPDLogEuclidean, SPDLogCholesky], ids=_ids)
def test_flat_metrics_transport_composes_and_inverts(cls, generator):
    manifold = cls()
    x, y, z = (_spd(3, (2,), generator=generator) for _ in range(3))
    u = manifold.random_tangent(x, generator=generator)
    direct = manifold.transp(x, z, u)
    torch.testing.assert_close(manifold.transp(y, z, manifold.transp(x, y, u)), direct)
    torch.testing.assert_close(manifold.transp(z, x, direct), u)


@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_geodesic_accepts_a_batch_of_times(cls, generator):
    manifold = cls()
    x, y = _spd(3, (3,), generator=generator), _spd(3, (3,), generator=generator)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    path = manifold.geodesic(x, y, t)
    torch.testing.assert_close(path[0], x[0])
    torch.testing.assert_close(path[2], y[2])
    torch.testing.assert_close(path[1], manifold.geodesic(x[1], y[1], 0.4))
    torch.testing.assert_close(path[1], manifold.expmap(x[1], 0.4 * manifold.logmap(x[1], y[1])))


# ---------------------------------------------------------------------------------------
# Frechet means
# ---------------------------------------------------------------------------------------


def test_means_of_commuting_matrices_have_closed_forms(generator):
    eigenvalues = 0.5 + 3 * torch.rand(2, 4, 3, dtype=F64, generator=generator)
    q = torch.linalg.qr(torch.randn(2, 1, 3, 3, dtype=F64, generator=generator))[0]
    points = q @ torch.diag_embed(eigenvalues) @ q.mT
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    spectrum = lambda lam: q[:, 0] @ torch.diag_embed(lam) @ q[:, 0].mT  # noqa: E731
    geometric = spectrum(torch.exp((weights[:, None] * eigenvalues.log()).sum(-2)))
    wasserstein = spectrum((weights[:, None] * eigenvalues.sqrt()).sum(-2) ** 2)
    for cls, expected in [
        (SPDAffineInvariant, geometric),
        (SPDLogEuclidean, geometric),
        (SPDBuresWasserstein, wasserstein),
    ]:
        result = cls().frechet_mean(points, weights)
        torch.testing.assert_close(result.mean, expected, rtol=1e-9, atol=1e-9)
        assert result.converged.all() and result.mean.shape == (2, 3, 3)
        # weights per batch element broadcast; a batch the points lack is named
        batched = cls().frechet_mean(points, weights.expand(2, 4))
        torch.testing.assert_close(batched.mean, expected, rtol=1e-9, atol=1e-9)
        with pytest.raises(ValueError, match=r"weights of shape \(3, 4\) do not broadcast"):
            cls().frechet_mean(points, weights.expand(3, 4))


def test_affine_invariant_mean_of_two_points_is_the_geodesic_midpoint(generator):
    manifold = SPDAffineInvariant()
    x, y = _spd(4, (3,), generator=generator), _spd(4, (3,), generator=generator)
    result = manifold.frechet_mean(torch.stack([x, y], dim=-3))
    torch.testing.assert_close(result.mean, manifold.geodesic(x, y, 0.5), rtol=1e-8, atol=1e-8)
    assert result.converged.all() and result.iterations > 0


@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_mean_agrees_with_the_generic_karcher_flow(cls, generator):
    # The base class's Karcher flow (the generic algorithm) is the oracle for the closed
    # forms (log-Euclidean, log-Cholesky) and the specialised iterations (AI, BW).
    manifold = cls()
    points = _spd(3, (2, 5), generator=generator)
    weights = torch.rand(2, 5, dtype=F64, generator=generator)
    mine = manifold.frechet_mean(points, weights, tol=1e-12)
    generic = super(type(manifold), manifold).frechet_mean(points, weights, tol=1e-12)
    torch.testing.assert_close(mine.mean, generic.mean, rtol=1e-8, atol=1e-8)
    assert mine.converged.all() and generic.converged.all()
    assert mine.gradient_norm.shape == (2,)


def test_bures_wasserstein_mean_reports_non_convergence():
    manifold = SPDBuresWasserstein()
    points = _spd(3, (6,), generator=torch.Generator().manual_seed(3), condition=100.0)
    result = manifold.frechet_mean(points, max_iter=1, tol=1e-14)
    assert result.iterations == 1 and not result.converged.all()
    assert (result.gradient_norm > 1e-14).all()


# ---------------------------------------------------------------------------------------
# Gradients at repeated eigenvalues (geoopt's are NaN there)
# ---------------------------------------------------------------------------------------


def _point_with_repeated_eigenvalues(kind: str, generator) -> torch.Tensor:
    if kind == "identity":
        return torch.eye(4, dtype=F64)
    q = torch.linalg.qr(torch.randn(4, 4, dtype=F64, generator=generator))[0]
    return q @ torch.diag(torch.tensor([2.0, 2.0, 2.0, 0.5], dtype=F64)) @ q.T


@pytest.mark.parametrize("kind", ["identity", "triple eigenvalue"])
@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_distance_gradient_is_finite_and_exact_at_repeated_eigenvalues(cls, kind, generator):
    manifold = cls()
    x = _point_with_repeated_eigenvalues(kind, generator)
    y = _spd(4, generator=generator)
    for dtype in (F64, torch.float32):
        x_ = x.to(dtype).requires_grad_()
        half_squared = 0.5 * manifold.dist(x_, y.to(dtype)) ** 2
        (egrad,) = torch.autograd.grad(half_squared, x_)
        assert torch.isfinite(egrad).all()
        # grad of d(., y)^2 / 2 is -logmap(x, y)
        rgrad = manifold.egrad2rgrad(x_.detach(), egrad)
        expected = -manifold.logmap(x_.detach(), y.to(dtype))
        tol = 1e-8 if dtype == F64 else 1e-3
        torch.testing.assert_close(rgrad, expected, rtol=tol, atol=tol)
    # At y = x the distance is not differentiable (like |t| at 0): its gradient must be
    # finite; the squared distance has a zero gradient there.
    x_ = x.clone().requires_grad_()
    (egrad,) = torch.autograd.grad(manifold.dist(x_, x), x_)
    assert torch.isfinite(egrad).all()
    (egrad,) = torch.autograd.grad(manifold.dist2(x_, x), x_)
    assert torch.isfinite(egrad).all() and egrad.abs().max() < 1e-6


@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_squared_distance_has_a_finite_hessian_at_the_identity(cls, generator):
    manifold = cls()
    x = torch.eye(3, dtype=F64, requires_grad=True)
    y = _spd(3, generator=generator)
    v = _sym(torch.randn(3, 3, dtype=F64, generator=generator))
    (grad,) = torch.autograd.grad(manifold.dist2(x, y), x, create_graph=True)
    (hvp,) = torch.autograd.grad(grad, x, v)
    assert torch.isfinite(hvp).all()
    h = 1e-6

    def gradient_at(z):
        z = z.clone().requires_grad_()
        return torch.autograd.grad(manifold.dist2(z, y), z)[0]

    eye = torch.eye(3, dtype=F64)
    fd = (gradient_at(eye + h * v) - gradient_at(eye - h * v)) / (2 * h)
    torch.testing.assert_close(_sym(hvp), _sym(fd), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# float32 robustness (TARGETS.md section 1)
# ---------------------------------------------------------------------------------------


def test_affine_invariant_log_of_exp_is_accurate_in_float32_at_condition_1e3():
    # geoopt: 2.7 % NaN and 4.6 % error at condition 200 (16 x 16, float32).
    # Target: no NaN and relative error below 1e-3 at condition 1e3.
    manifold = SPDAffineInvariant()
    generator = torch.Generator().manual_seed(7)
    x64 = manifold.random(128, 16, 16, dtype=F64, generator=generator, condition=1e3)
    u64 = manifold.random_tangent(x64, generator=generator)
    u64 = u64 / manifold.norm(x64, u64, keepdim=True)
    x, u = x64.float(), u64.float()
    back = manifold.logmap(x, manifold.expmap(x, u))
    assert not torch.isnan(back).any()
    error = torch.linalg.matrix_norm(back.double() - u64) / torch.linalg.matrix_norm(u64)
    assert error.max() < 1e-3, float(error.max())


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


NOT_POSITIVE = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 3.0]], dtype=F64)
NOT_SYMMETRIC = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]], dtype=F64)


@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_checking_raises_readable_errors_on_non_spd_input(cls, generator):
    manifold = cls(check=True)
    assert "check=True" in repr(manifold)
    x = _spd(3, generator=generator)
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.logmap .*`y`.*not positive definite"):
        manifold.logmap(x, NOT_POSITIVE)
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.dist .*`x`.*not positive definite"):
        manifold.dist(NOT_POSITIVE, x)
    with pytest.raises(ValueError, match=r"`x` is not symmetric"):
        manifold.expmap(NOT_SYMMETRIC, torch.zeros(3, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"symmetric tangent vector `u`"):
        manifold.expmap(x, NOT_SYMMETRIC)
    with pytest.raises(ValueError, match=r"NaN or infinite"):
        manifold.dist(x, torch.full((3, 3), float("nan"), dtype=F64))
    with pytest.raises(ValueError, match=r"frechet_mean .*not positive definite"):
        manifold.frechet_mean(torch.stack([x, NOT_POSITIVE]))
    # valid input still works with checking on
    assert torch.isfinite(manifold.dist(x, 2 * x))


@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_shapes_are_always_checked(cls):
    manifold = cls()
    with pytest.raises(ValueError, match=r"square matrices of shape \(\.\.\., n, n\).*\(3, 4\)"):
        manifold.dist(torch.ones(3, 4, dtype=F64), torch.ones(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="square"):
        manifold.projx(torch.ones(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="square"):
        manifold.random(3, 4)
    with pytest.raises(ValueError, match="square"):
        manifold.dim((3, 4))


@pytest.mark.parametrize("cls", METRICS, ids=_ids)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_unchecked_non_spd_input_gives_finite_values_not_nan(cls, dtype, generator):
    manifold = cls()
    x = _spd(3, generator=generator, dtype=dtype)
    negative = -torch.eye(3, dtype=F64)  # all eigenvalues negative (Bures-Wasserstein's root)
    bad = torch.stack([NOT_POSITIVE, -NOT_POSITIVE, torch.zeros(3, 3, dtype=F64), negative])
    bad = bad.to(dtype)
    for value in (
        manifold.logmap(x, bad),
        manifold.logmap(bad, x),
        manifold.dist(x, bad),
        manifold.dist(bad, x),
        manifold.dist2(bad, x),
    ):
        assert torch.isfinite(value).all()


def test_check_point_explains_what_is_wrong():
    manifold = SPDLogCholesky()
    ok, reason = manifold.check_point_on_manifold(NOT_POSITIVE, explain=True)
    assert not ok and "not positive definite" in reason and "smallest -1" in reason
    ok, reason = manifold.check_point_on_manifold(NOT_SYMMETRIC, explain=True)
    assert not ok and "not symmetric" in reason
    ok, reason = manifold.check_point_on_manifold(torch.ones(2, 3), explain=True)
    assert not ok and "square" in reason
    ok, reason = manifold.check_vector_on_tangent(torch.eye(3), NOT_SYMMETRIC, explain=True)
    assert not ok and "`u` is not symmetric" in reason
    with pytest.raises(ValueError, match="not positive definite"):
        manifold.assert_check_point_on_manifold(NOT_POSITIVE)


# ---------------------------------------------------------------------------------------
# random, projx, dim, modules
# ---------------------------------------------------------------------------------------


def test_random_has_the_requested_condition_and_follows_the_generator():
    manifold = SPDBuresWasserstein()
    a = manifold.random(5, 4, 4, generator=torch.Generator().manual_seed(1), condition=1e3)
    b = manifold.random((5, 4, 4), generator=torch.Generator().manual_seed(1), condition=1e3)
    assert a.dtype == torch.get_default_dtype() and torch.equal(a, b)
    x = manifold.random(5, 4, 4, dtype=F64, condition=1e3, generator=torch.Generator())
    eigenvalues = torch.linalg.eigvalsh(x)
    torch.testing.assert_close(
        eigenvalues[:, -1] / eigenvalues[:, 0], torch.full((5,), 1e3, dtype=F64)
    )
    assert (eigenvalues[:, 0] >= 0.5 - 1e-12).all() and (eigenvalues[:, 0] <= 2 + 1e-12).all()
    torch.testing.assert_close(x, x.mT, rtol=0, atol=0)
    assert manifold.random(1, 1, dtype=F64).shape == (1, 1)
    with pytest.raises(ValueError, match="condition"):
        manifold.random(3, 3, condition=0.5)
    with pytest.raises(ValueError, match="float32 and float64"):
        manifold.random(3, 3, dtype=torch.float16)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_projx_clamps_eigenvalues_and_keeps_spd_points(dtype, generator):
    manifold = SPDAffineInvariant()
    x = _spd(4, (3,), generator=generator, dtype=dtype)
    torch.testing.assert_close(manifold.projx(x), x)
    bad = torch.stack([NOT_POSITIVE, NOT_SYMMETRIC, torch.zeros(3, 3, dtype=F64)]).to(dtype)
    projected = manifold.projx(bad)
    assert (torch.linalg.eigvalsh(projected) > 0).all()
    ok, reason = manifold.check_point_on_manifold(projected, explain=True)
    assert ok, reason
    # the non-positive eigenvalue of NOT_POSITIVE (-1) is raised, the others are kept
    torch.testing.assert_close(
        torch.linalg.eigvalsh(projected[0])[1:], torch.tensor([3.0, 3.0], dtype=dtype)
    )


def test_dim_is_the_dimension_of_symmetric_matrices():
    assert SPDLogEuclidean().dim((5, 5)) == 15
    assert SPDAffineInvariant().dim(torch.Size([2, 3, 3])) == 6


@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_riemannian_adam_with_checking_on(cls, generator):
    manifold = cls(check=True)
    target = _spd(3, (2,), generator=generator)
    param = geoopt.ManifoldParameter(_spd(3, (2,), generator=generator), manifold=manifold)
    optimizer = geoopt.optim.RiemannianAdam([param], lr=5e-2, stabilize=1)
    start = manifold.dist(param, target).detach()
    for _ in range(20):
        optimizer.zero_grad()
        manifold.dist2(param, target).sum().backward()
        optimizer.step()
    assert (manifold.dist(param, target) < start).all()
    clone = copy.deepcopy(param)
    assert clone.manifold.check and type(clone.manifold) is cls


@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_operations_broadcast_a_single_point_against_a_batch(cls, generator):
    manifold = cls()
    x, ys = _spd(3, generator=generator), _spd(3, (4,), generator=generator)
    u = manifold.logmap(x, ys)
    assert u.shape == (4, 3, 3)
    torch.testing.assert_close(manifold.expmap(x, u), ys)
    torch.testing.assert_close(manifold.inner(x, u), manifold.norm(x, u) ** 2)
    assert manifold.transp(x, ys, u[0]).shape == (4, 3, 3)


# ---------------------------------------------------------------------------------------
# Cross-check against pymanopt (optional `bench` extra)
# ---------------------------------------------------------------------------------------


def test_affine_invariant_agrees_with_pymanopt(generator):
    pymanopt_manifolds = pytest.importorskip("pymanopt.manifolds")
    reference = pymanopt_manifolds.SymmetricPositiveDefinite(4)
    manifold = SPDAffineInvariant()
    x, y = _spd(4, generator=generator), _spd(4, generator=generator)
    u, g, h = (_sym(torch.randn(4, 4, dtype=F64, generator=generator)) for _ in range(3))
    xn, yn, un, gn, hn = (t.numpy() for t in (x, y, u, g, h))

    def close(actual, expected):
        np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-9, atol=1e-9)

    close(manifold.dist(x, y), reference.dist(xn, yn))
    close(manifold.expmap(x, u), reference.exp(xn, un))
    close(manifold.logmap(x, y), reference.log(xn, yn))
    close(manifold.retr(x, u), reference.retraction(xn, un))
    close(manifold.inner(x, u, g), reference.inner_product(xn, un, gn))
    close(manifold.egrad2rgrad(x, g), reference.euclidean_to_riemannian_gradient(xn, gn))
    close(
        manifold.ehess2rhess(x, g, h, u),
        reference.euclidean_to_riemannian_hessian(xn, gn, hn, un),
    )


@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_frechet_mean_rejects_bad_weights_and_measures_its_gradient(cls, generator):
    manifold = cls()
    points = _spd(3, (4,), generator=generator)
    with pytest.raises(ValueError, match="non-negative"):
        manifold.frechet_mean(points, torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="positive sum"):
        manifold.frechet_mean(points, torch.zeros(4, dtype=F64))
    result = manifold.frechet_mean(points)
    # The reported gradient norm is measured, also for closed forms: it matches an
    # independent evaluation from the log map at the returned mean.
    direction = manifold.logmap(result.mean.unsqueeze(-3), points).mean(dim=-3)
    torch.testing.assert_close(result.gradient_norm, manifold.norm(result.mean, direction))
    assert result.converged


def test_log_euclidean_hessian_where_the_logarithm_has_rank_one(generator):
    """At ``x = I + v v^T``, ``logm x`` has ``n - 1`` eigenvalues that are zero up to
    rounding (``+-1e-17``); treated as apart, they made the Hessian wrong and not
    self-adjoint. Oracle: ``<Hess f(x)[u], w> = d/db d/da f(Exp_x(a u + b w))`` at 0 (the
    exponential map is exact here), the derivative in ``a`` by autograd (first order
    only) and the one in ``b`` by central differences."""
    manifold = SPDLogEuclidean()
    v = torch.randn(4, 1, dtype=F64, generator=generator)
    x = torch.eye(4, dtype=F64) + v @ v.mT
    u, w = (manifold.random_tangent(x, generator=generator) for _ in range(2))
    x_grad = x.clone().requires_grad_()
    (egrad,) = torch.autograd.grad(_cost(x_grad), x_grad, create_graph=True)

    def hessian(direction):
        (ehess,) = torch.autograd.grad(egrad, x_grad, direction, retain_graph=True)
        return manifold.ehess2rhess(x, egrad.detach(), ehess, direction)

    def along(direction, b):
        a = torch.zeros((), dtype=F64, requires_grad=True)
        point = manifold.expmap(x, a * direction + b * w)
        return torch.autograd.grad(_cost(point), a)[0]

    h = 1e-5
    for direction in (u, w):
        expected = (along(direction, h) - along(direction, -h)) / (2 * h)
        actual = manifold.inner(x, hessian(direction), w)
        torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-7)
    uw, wu = manifold.inner(x, hessian(u), w), manifold.inner(x, u, hessian(w))
    torch.testing.assert_close(uw, wu, rtol=1e-9, atol=1e-9)


def test_affine_invariant_mean_of_spread_points_converges():
    """The quick-start of docs/manifolds_spd.md: with the unit step the Karcher flow
    diverged on 10 seeds of 10 (gradient norm growing from 1 to 4). Oracle: the flow with
    step 1/2, which converges there, and the gradient norm measured at the result."""
    manifold = SPDAffineInvariant()
    generator = torch.Generator().manual_seed(0)
    points = manifold.random(4, 8, 5, 5, dtype=F64, generator=generator, condition=1e3)
    result = manifold.frechet_mean(points)
    assert result.converged.all()
    reference = manifold.frechet_mean(points, step=0.5)
    assert reference.converged.all()
    assert (manifold.dist(result.mean, reference.mean) < 1e-7).all()
    direction = manifold.logmap(result.mean.unsqueeze(-3), points).mean(dim=-3)
    torch.testing.assert_close(result.gradient_norm, manifold.norm(result.mean, direction))


@pytest.mark.parametrize("scale", [1e-12, 1e16, 1e20])
@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_frechet_mean_is_scale_invariant(cls, scale, generator):
    """``mean(s X_i) = s mean(X_i)`` under every metric, so the result and its convergence
    may not depend on ``s``. The Bures-Wasserstein gradient norm grows like ``sqrt(s)``,
    and an absolute tolerance stopped 7e-3 from the barycenter at ``s = 1e-12`` and never
    at 1e16; the log-Cholesky closed form reported no convergence at 1e20."""
    manifold = cls()
    points = _spd(4, (6,), generator=generator)
    reference = manifold.frechet_mean(points, tol=1e-13, max_iter=500)
    result = manifold.frechet_mean(scale * points)
    assert result.converged
    torch.testing.assert_close(result.mean / scale, reference.mean, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_norm_has_a_zero_gradient_at_zero(cls, generator):
    """The norm is smallest at zero, so its (sub)gradient there is 0; the square root of
    the Bures-Wasserstein inner product gave NaN."""
    manifold = cls()
    x = manifold.random(3, 3, dtype=F64, generator=generator).requires_grad_()
    u = torch.zeros(3, 3, dtype=F64, requires_grad=True)
    grad_x, grad_u = torch.autograd.grad(manifold.norm(x, u), (x, u))
    assert torch.equal(grad_x, torch.zeros_like(grad_x))
    assert torch.equal(grad_u, torch.zeros_like(grad_u))
    v = manifold.random_tangent(x.detach(), generator=generator)
    torch.testing.assert_close(manifold.norm(x, v) ** 2, manifold.inner(x, v))


@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_ehess2rhess_checks_the_euclidean_derivatives(cls, generator):
    manifold = cls(check=True)
    x = manifold.random(3, 3, dtype=F64, generator=generator)
    u = manifold.random_tangent(x, generator=generator)
    with pytest.raises(ValueError, match=r"`ehess` has matrix shape \(3, 3\) but `egrad`"):
        manifold.ehess2rhess(x, torch.ones(4, 4, dtype=F64), u, u)
    with pytest.raises(TypeError, match=r"`ehess` has dtype torch\.float64 but `egrad`"):
        manifold.ehess2rhess(x, u.float(), u, u)
    with pytest.raises(TypeError, match=r"`ehess` to be a torch\.Tensor"):
        manifold.ehess2rhess(x, u, [[1.0]], u)
    with pytest.raises(ValueError, match="`egrad` has NaN or infinite entries"):
        manifold.ehess2rhess(x, u * float("nan"), u, u)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_iter", -1),
        ("max_iter", 2.5),
        ("step", float("nan")),
        ("step", 0.0),
        ("step", -1.0),
        ("tol", float("nan")),
        ("tol", -1.0),
    ],
)
@pytest.mark.parametrize("cls", METRICS, ids=_ids)
def test_frechet_mean_rejects_bad_options(cls, option, value, generator):
    """``max_iter=-1`` raised ``AssertionError('unreachable')``, a NaN step a ``LinAlgError``
    from ``eigh``, and a NaN tolerance ran every iteration; every metric now names the
    option (the closed forms too, though they ignore ``max_iter`` and ``step``)."""
    points = _spd(3, (4,), generator=generator)
    with pytest.raises(ValueError, match=f"{option} must be"):
        cls().frechet_mean(points, **{option: value})
    assert cls().frechet_mean(points, max_iter=0).iterations == 0
