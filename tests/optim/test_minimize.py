"""torsion.optim.minimize: the optimizer suite per method, convergence rates, the result's
bookkeeping, batched and product manifolds, devices, and bad input."""

from __future__ import annotations

import itertools
import math

import geoopt
import pytest
import torch

from torsion.manifolds import (
    Grassmann,
    ProductManifold,
    SPDAffineInvariant,
    SPDLogCholesky,
    Stiefel,
)
from torsion.optim import METHODS, OptimizeResult, minimize
from torsion.optim._linesearch import initial_step, strong_wolfe
from torsion.optim._objective import Objective
from torsion.testing import OptimizationProblem, OptimizerSuite, optimization_problems

F64 = torch.float64


def _minimize_solver(method: str, **options):
    def solve(self, problem: OptimizationProblem) -> torch.Tensor:
        result = minimize(
            problem.cost,
            problem.x0,
            problem.manifold,
            method,
            tol=self.gradient_tolerance,
            max_iter=5000,
            callback=lambda r: problem.observe(r.x),
            **options,
        )
        assert result.success, result.message
        return result.x

    return solve


class TestTrustRegion(OptimizerSuite):
    solve = _minimize_solver("trust-region")


class TestConjugateGradient(OptimizerSuite):
    solve = _minimize_solver("cg")


class TestLBFGS(OptimizerSuite):
    solve = _minimize_solver("lbfgs")


class TestSteepestDescent(OptimizerSuite):
    solve = _minimize_solver("sd")


# ---------------------------------------------------------------------------------------
# Method options
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "beta", ["hestenes-stiefel", "polak-ribiere+", "fletcher-reeves", "dai-yuan"]
)
@pytest.mark.parametrize("line_search", ["strong-wolfe", "armijo"])
def test_every_cg_beta_rule_converges(beta, line_search):
    problem = optimization_problems()["rayleigh-grassmann"]
    result = minimize(
        problem.cost, problem.x0, problem.manifold, "cg", tol=1e-9, max_iter=3000,
        beta=beta, line_search=line_search,
    )  # fmt: skip
    assert result.success, result.message
    assert problem.error(result.x) < 1e-7


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("lbfgs", {"memory": 1}),
        ("lbfgs", {"line_search": "armijo", "cautious": False}),
        ("lbfgs", {"transport": "projection"}),
        ("cg", {"transport": "projection"}),
        ("sd", {"line_search": "strong-wolfe"}),
        ("trust-region", {"hvp_method": "reverse_over_reverse"}),
        ("trust-region", {"radius_max": 0.5, "max_inner": 3}),
    ],
)
def test_method_options_converge(method, options):
    problem = optimization_problems()["karcher-affine-invariant"]
    result = minimize(
        problem.cost, problem.x0, problem.manifold, method, tol=1e-9, max_iter=3000, **options
    )
    assert result.success, result.message
    assert problem.error(result.x) < 1e-7


def test_hvp_methods_give_the_same_trust_region_run():
    problem = optimization_problems()["brockett-stiefel"]
    runs = [
        minimize(problem.cost, problem.x0, problem.manifold, tol=1e-10, hvp_method=method)
        for method in (None, "double_backward", "forward_over_reverse")
    ]
    assert len({r.nit for r in runs}) == 1 and len({r.nhvp for r in runs}) == 1
    for other in runs[1:]:
        torch.testing.assert_close(other.x, runs[0].x, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------
# Convergence rates
# ---------------------------------------------------------------------------------------


def _rates(grad_norms: list[float], low: float = 1e-13, high: float = 1e-1) -> list[float]:
    """``log g_{k+1} / log g_k`` over the accepted steps with both norms in (low, high)."""
    distinct = [g for i, g in enumerate(grad_norms) if i == 0 or g != grad_norms[i - 1]]
    return [
        math.log(b) / math.log(a)
        for a, b in itertools.pairwise(distinct)
        if low < a < high and low < b < high
    ]


def test_trust_region_converges_superlinearly():
    problem = optimization_problems()["brockett-stiefel"]
    result = minimize(problem.cost, problem.x0, problem.manifold, tol=1e-14, max_iter=200)
    rates = _rates(result.history["grad_norm"])
    assert len(rates) >= 2, result.history["grad_norm"]
    # Quadratic convergence: g_{k+1} ~ C g_k^2, so log g_{k+1} / log g_k -> 2 as g_k -> 0.
    assert min(rates[-2:]) > 1.5, (rates, result.history["grad_norm"])
    assert problem.error(result.x) < 1e-10


def test_the_rate_check_rejects_a_linearly_convergent_method():
    problem = optimization_problems()["brockett-stiefel"]
    result = minimize(problem.cost, problem.x0, problem.manifold, "sd", tol=1e-9, max_iter=5000)
    assert result.success
    assert max(_rates(result.history["grad_norm"])[-10:]) < 1.1


# ---------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------


class _CountingCost:
    def __init__(self, fun):
        self.fun, self.calls = fun, 0

    def __call__(self, x):
        self.calls += 1
        return self.fun(x)


@pytest.mark.parametrize("method", METHODS)
def test_result_fields_and_counters(method):
    problem = optimization_problems()["procrustes-stiefel"]
    cost = _CountingCost(problem.cost)
    x0 = problem.x0.clone()
    # Reverse-over-reverse HVPs call fun once per product, so every call is accounted for.
    options = {"hvp_method": "reverse_over_reverse"} if method == "trust-region" else {}
    result = minimize(cost, problem.x0, problem.manifold, method, tol=1e-9, **options)
    assert isinstance(result, OptimizeResult)
    assert result.success and result.message.startswith("the gradient norm")
    assert torch.equal(problem.x0, x0) and result.x.data_ptr() != problem.x0.data_ptr()
    assert cost.calls == result.nfev + result.nhvp
    assert (result.nhvp > 0) == (method == "trust-region")
    assert result.nfev >= result.nit >= 1
    history = result.history
    assert set(history) == {"fun", "grad_norm", "time"}
    assert all(len(values) == result.nit + 1 for values in history.values())
    assert history["fun"][-1] == result.fun and history["grad_norm"][-1] == result.grad_norm
    assert result.grad_norm <= 1e-9 < history["grad_norm"][0]
    assert all(b >= a for a, b in itertools.pairwise(history["time"]))
    assert result.fun == pytest.approx(float(problem.cost(result.x)), rel=1e-12)
    egrad = torch.func.grad(problem.cost)(result.x)
    rgrad = problem.manifold.egrad2rgrad(result.x, egrad)
    assert float(problem.manifold.norm(result.x, rgrad)) == pytest.approx(
        result.grad_norm, rel=1e-6
    )


def test_a_manifold_parameter_start_is_copied_not_trained(generator):
    stiefel = Stiefel()
    param = geoopt.ManifoldParameter(
        stiefel.random(6, 2, dtype=F64, generator=generator), manifold=stiefel
    )
    before = param.detach().clone()
    m = torch.randn(6, 2, dtype=F64, generator=generator)
    result = minimize(lambda x: ((x - m) ** 2).sum(), param, stiefel, "lbfgs", tol=1e-10)
    assert result.success and type(result.x) is torch.Tensor
    assert torch.equal(param.detach(), before) and param.grad is None


def test_callback_sees_every_iterate_and_can_stop_the_run():
    problem = optimization_problems()["rayleigh-grassmann"]
    seen: list[OptimizeResult] = []

    def callback(intermediate):
        seen.append(intermediate)
        if intermediate.nit == 3:
            raise StopIteration

    result = minimize(problem.cost, problem.x0, problem.manifold, "lbfgs", callback=callback)
    assert [r.nit for r in seen] == [0, 1, 2, 3]
    assert result.nit == 3 and not result.success and "callback" in result.message
    torch.testing.assert_close(seen[0].x, problem.x0)

    def vandal(intermediate):  # the point handed to a callback is a copy
        intermediate.x.mul_(2.0)

    spoiled = minimize(problem.cost, problem.x0, problem.manifold, "cg", callback=vandal)
    clean = minimize(problem.cost, problem.x0, problem.manifold, "cg")
    torch.testing.assert_close(spoiled.x, clean.x)


def test_max_iter_ends_the_run_unsuccessfully():
    problem = optimization_problems()["brockett-stiefel"]
    result = minimize(problem.cost, problem.x0, problem.manifold, "sd", max_iter=5)
    assert result.nit == 5 and not result.success and "max_iter" in result.message
    zero = minimize(problem.cost, problem.x0, problem.manifold, max_iter=0)
    assert zero.nit == 0 and zero.nhvp == 0 and len(zero.history["fun"]) == 1


# ---------------------------------------------------------------------------------------
# Batches, products, geoopt manifolds, float32, devices
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["trust-region", "lbfgs"])
def test_a_batched_point_solves_independent_problems_jointly(method, generator):
    n, p, batch = 8, 2, 3
    a = torch.randn(batch, n, n, dtype=F64, generator=generator)
    a = a + a.mT
    manifold = Grassmann()
    x0 = manifold.random(batch, n, p, dtype=F64, generator=generator)
    result = minimize(
        lambda x: -(x * (a @ x)).sum(), x0, manifold, method, tol=1e-10, max_iter=1000
    )
    assert result.success, result.message and result.x.shape == x0.shape
    top = torch.linalg.eigh(a).eigenvectors[..., -p:]
    torch.testing.assert_close(result.x @ result.x.mT, top @ top.mT, atol=1e-8, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_product_of_torsion_manifolds(method, generator):
    spd, stiefel = SPDLogCholesky(), Stiefel()
    product = ProductManifold((spd, (3, 3)), (stiefel, (5, 2)))
    target_spd = spd.random(3, 3, dtype=F64, generator=generator)
    m = torch.randn(5, 2, dtype=F64, generator=generator)
    x0 = product.pack_point(
        spd.random(3, 3, dtype=F64, generator=generator),
        stiefel.random(5, 2, dtype=F64, generator=generator),
    )

    def cost(x):
        s, frame = product.unpack_tensor(x)
        return spd.dist2(s, target_spd) + 0.5 * ((frame - m) ** 2).sum()

    result = minimize(cost, x0, product, method, tol=1e-9, max_iter=3000)
    assert result.success, result.message
    s, frame = product.unpack_tensor(result.x)
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    torch.testing.assert_close(s, target_spd, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(frame, u @ vh, atol=1e-8, rtol=1e-8)


def test_geoopt_sphere_and_euclidean(generator):
    n = 7
    a = torch.randn(n, n, dtype=F64, generator=generator)
    a = a + a.mT
    sphere = geoopt.Sphere()
    x0 = sphere.projx(torch.randn(n, dtype=F64, generator=generator))
    result = minimize(lambda x: -x @ a @ x, x0, sphere, tol=1e-10)
    assert result.success, result.message
    top = torch.linalg.eigh(a).eigenvectors[:, -1]
    assert float((result.x @ top).abs()) == pytest.approx(1.0, abs=1e-12)
    b = torch.randn(n, dtype=F64, generator=generator)
    spd = a @ a.mT + torch.eye(n, dtype=F64)
    result = minimize(lambda x: 0.5 * x @ spd @ x - b @ x, b, geoopt.Euclidean(ndim=1), tol=1e-10)
    torch.testing.assert_close(result.x, torch.linalg.solve(spd, b))
    # an isotropic quadratic: the first truncated-CG step solves the model exactly (r = 0);
    # the inner loop went on and divided by zero
    x0 = torch.tensor([0.1, -0.2, 0.05], dtype=F64)
    for method in METHODS:
        result = minimize(lambda x: (x * x).sum(), x0, geoopt.Euclidean(ndim=1), method, tol=1e-10)
        assert result.success, (method, result.message)
        torch.testing.assert_close(result.x, torch.zeros(3, dtype=F64), rtol=0, atol=1e-9)


def test_trust_region_needs_a_riemannian_hessian(generator):
    ball = geoopt.PoincareBall()
    x0 = 0.1 * torch.randn(3, dtype=F64, generator=generator)
    target = torch.tensor([0.2, -0.1, 0.3], dtype=F64)
    with pytest.raises(TypeError, match="ehess2rhess"):
        minimize(lambda x: ball.dist2(x, target), x0, ball)
    result = minimize(lambda x: ball.dist2(x, target), x0, ball, "lbfgs", tol=1e-10)
    torch.testing.assert_close(result.x, target)


@pytest.mark.parametrize("method", METHODS)
def test_float32(method):
    problem = optimization_problems()["rayleigh-grassmann"]
    x0 = problem.x0.float()
    result = minimize(
        lambda x: problem.cost(x.double()).float(), x0, problem.manifold, method, tol=1e-4
    )
    assert result.success and result.x.dtype == torch.float32
    assert problem.error(result.x.double()) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_runs_unchanged_and_matches_cpu(method):
    manifold = SPDAffineInvariant()
    a = torch.randn(5, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    points = a @ a.mT / 4 + 0.5 * torch.eye(4, dtype=F64)
    results = {}
    for device in ("cpu", "cuda"):
        data = points.to(device)
        results[device] = minimize(
            lambda x, data=data: manifold.dist2(x, data).sum(), data[0], manifold, method,
            tol=1e-9,
        )  # fmt: skip
    assert results["cuda"].success and results["cuda"].x.is_cuda
    torch.testing.assert_close(results["cuda"].x.cpu(), results["cpu"].x, atol=1e-8, rtol=1e-8)


# ---------------------------------------------------------------------------------------
# The strong Wolfe line search
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [1e-3, 1.0, 50.0])
def test_strong_wolfe_step_satisfies_the_conditions(step, generator):
    euclidean = geoopt.Euclidean(ndim=1)
    center = torch.randn(4, dtype=F64, generator=generator)

    def fun(x):
        return ((x - center) ** 4).sum() + (x**2).sum()

    objective = Objective(fun, euclidean)
    point = objective.first_order(torch.zeros(4, dtype=F64))
    direction = -point.grad
    value, slope = float(point.value), -(float(point.grad_norm) ** 2)
    found = strong_wolfe(
        objective, point, direction, value=value, slope=slope, step=step, c1=1e-4, c2=0.1
    )
    assert found is not None
    t, new = found
    phi = float(fun(t * direction))
    dphi = float(torch.func.grad(fun)(t * direction) @ direction)
    assert phi <= value + 1e-4 * t * slope
    assert abs(dphi) <= 0.1 * abs(slope)
    torch.testing.assert_close(new.x, t * direction)


@pytest.mark.parametrize("optimism", [2.0, 1.5])
def test_initial_step_repeats_the_last_decrease_capped_by_the_last_step(optimism):
    """The documented rule: a unit distance ``1 / ||d||`` first; then ``optimism * 2 (f_prev -
    f) / |phi'(0)|`` (on a quadratic, the step that repeats the last decrease), never more
    than ``optimism`` times the last accepted step; the last step again when the decrease
    is within the noise. The cap binds where the gradient shrank fast: the uncapped guess
    overestimates the step by the ratio of the decreases."""
    assert initial_step(
        value=1.0, previous_value=None, slope=-4.0, direction_norm=2.0, previous_step=None,
        noise=0.0, optimism=optimism,
    ) == 0.5  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    capped = uncapped = 0
    for _ in range(200):
        value, decrease, slope, previous_step = (
            10.0 ** (6 * torch.rand((), dtype=F64, generator=generator).item() - 3)
            for _ in range(4)
        )
        noise, previous_value = 1e-3, value + decrease
        decrease = previous_value - value  # as rounded
        step = initial_step(
            value=value, previous_value=previous_value, slope=-slope, direction_norm=1.0,
            previous_step=previous_step, noise=noise, optimism=optimism,
        )  # fmt: skip
        if decrease <= noise:
            assert step == previous_step
            continue
        guess = optimism * 2.0 * decrease / slope
        assert step <= optimism * previous_step
        assert step == pytest.approx(min(guess, optimism * previous_step), rel=1e-15)
        capped += guess > optimism * previous_step
        uncapped += guess < optimism * previous_step
    assert capped > 20 and uncapped > 20  # both branches of the rule were exercised


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def test_fun_must_return_a_scalar():
    problem = optimization_problems()["procrustes-stiefel"]
    for method in METHODS:
        with pytest.raises(ValueError, match=r"scalar \(0-dim\) tensor, got shape \(4,\)"):
            minimize(lambda x: (x**2).sum(dim=0), problem.x0, problem.manifold, method)
    with pytest.raises(ValueError, match="got float"):
        minimize(lambda x: 1.0, problem.x0, problem.manifold)


def test_x0_off_the_manifold_reports_its_distance():
    stiefel = Stiefel()
    x0 = torch.eye(5, 2, dtype=F64)
    x0[0, 0] = 1.1
    with pytest.raises(ValueError, match=r"not on the manifold.*distance to the manifold is 0\.1"):
        minimize(lambda x: x.sum(), x0, stiefel)
    spd = SPDAffineInvariant()
    with pytest.raises(ValueError, match="positive definite"):
        minimize(lambda x: x.sum(), -torch.eye(3, dtype=F64), spd)
    with pytest.raises(ValueError, match="shape"):
        minimize(lambda x: x.sum(), torch.eye(3, 2, dtype=F64), spd)
    with pytest.raises(TypeError, match="float32 or float64"):
        minimize(lambda x: x.sum(), torch.eye(3, dtype=torch.int64), spd)


def test_unknown_method_and_options_are_named():
    problem = optimization_problems()["procrustes-stiefel"]
    args = (problem.cost, problem.x0, problem.manifold)
    with pytest.raises(ValueError, match=r"unknown method 'newton'.*'trust-region', 'cg'"):
        minimize(*args, method="newton")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['memory'\] for method='cg'"):
        minimize(*args, method="cg", memory=5)
    with pytest.raises(ValueError, match="unknown beta rule"):
        minimize(*args, method="cg", beta="polak")
    with pytest.raises(ValueError, match="unknown transport"):
        minimize(*args, method="lbfgs", transport="parallel")
    with pytest.raises(ValueError, match="unknown hvp_method"):
        minimize(*args, hvp_method="finite_differences")
    with pytest.raises(ValueError, match="unknown line_search"):
        minimize(*args, method="sd", line_search="exact")
    with pytest.raises(ValueError, match="c1 < c2"):
        minimize(*args, method="lbfgs", c1=0.5, c2=0.1)


def test_a_non_finite_start_is_an_error():
    problem = optimization_problems()["procrustes-stiefel"]
    with pytest.raises(ValueError, match="finite at the starting point"):
        minimize(lambda x: x.sum() * math.nan, problem.x0, problem.manifold)


@pytest.mark.parametrize(
    ("method", "option", "value"),
    [
        ("trust-region", "max_iter", math.inf),
        ("cg", "max_iter", math.nan),
        ("lbfgs", "memory", math.inf),
        ("cg", "max_line_evals", math.inf),
        ("trust-region", "max_inner", math.inf),
        ("trust-region", "max_inner", -3),
        ("trust-region", "min_inner", math.nan),
    ],
)
def test_counts_that_are_not_whole_numbers_are_named(method, option, value):
    """``int(inf)`` raised a bare OverflowError, ``int(nan)`` a ValueError naming no
    option, and a negative ``max_inner`` was silently taken as 1."""
    problem = optimization_problems()["procrustes-stiefel"]
    with pytest.raises(ValueError, match=rf"{option} must be an integer >= \d, got {value}"):
        minimize(problem.cost, problem.x0, problem.manifold, method, **{option: value})


def test_an_infinite_trust_region_radius_is_refused():
    """With ``radius_max=inf`` (and so ``radius_init = inf / 8``) every boundary step was
    infinite, every proposal rejected, and the run stayed at x0 until ``max_iter``."""
    problem = optimization_problems()["procrustes-stiefel"]
    with pytest.raises(ValueError, match="radius_max < inf"):
        minimize(problem.cost, problem.x0, problem.manifold, radius_max=math.inf)


@pytest.mark.parametrize("manifold", [Stiefel(), Grassmann()])
def test_trust_region_takes_an_empty_batch(manifold):
    """The default radius was ``sqrt(p * 0) = 0``, refused before the first stopping test."""
    x0 = manifold.random(0, 5, 2, dtype=F64)
    result = minimize(lambda x: (x**2).sum(), x0, manifold)
    assert result.success and result.nit == 0 and result.x.shape == (0, 5, 2)


def test_geoopt_scaled_is_refused_with_the_reason():
    """Scaled multiplies retraction steps by 1 / scale but not gradients: along a step the
    cost's slope is off by the scale and its curvature by its square (trust regions took
    85 iterations at scale 3 where the unscaled problem takes 8)."""
    problem = optimization_problems()["procrustes-stiefel"]
    scaled = geoopt.Scaled(problem.manifold, scale=3.0)
    with pytest.raises(TypeError, match=r"geoopt\.Scaled.*unscaled manifold"):
        minimize(problem.cost, problem.x0, scaled)
    product = ProductManifold((scaled, (5, 2)), (Stiefel(), (5, 2)))
    x0 = torch.cat([problem.x0.reshape(-1)[:10], problem.x0.reshape(-1)[:10]])
    with pytest.raises(TypeError, match=r"geoopt\.Scaled"):
        minimize(lambda x: x.sum(), x0, product)


def test_numpy_integers_are_counts():
    """np.int64(5) was refused as 'not an integer' (frechet_mean took it)."""
    np = pytest.importorskip("numpy")
    problem = optimization_problems()["procrustes-stiefel"]
    result = minimize(problem.cost, problem.x0, problem.manifold, "lbfgs", max_iter=np.int64(3))
    assert result.nit <= 3
