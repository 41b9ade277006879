"""Riemannian trust regions, rule by rule: the truncated-CG inner solver against a textbook
Steihaug-Toint transcription, and the outer radius and acceptance rules against the ratio
``rho`` recomputed here from the cost, the retraction and the Hessian.

(``test_minimize.py`` binds the method to the optimizer suite and checks its convergence
rate; these tests check the documented rules that a converging run does not exercise.)
"""

from __future__ import annotations

import itertools
import math

import geoopt
import pytest
import torch

from torsion.manifolds import Grassmann, Stiefel
from torsion.optim import _trust_region, minimize
from torsion.optim._objective import Objective
from torsion.optim._trust_region import InnerStop, truncated_cg, trust_region

F64 = torch.float64

# ---------------------------------------------------------------------------------------
# Truncated CG
# ---------------------------------------------------------------------------------------


def _steihaug(a: torch.Tensor, g: torch.Tensor, radius: float) -> tuple[torch.Tensor, str]:
    """Steihaug-Toint CG for ``min g.eta + eta.A eta / 2`` in ``|eta| <= radius`` (Nocedal &
    Wright 2006, alg. 7.2), every norm and inner product computed afresh; only the stops at
    the boundary, which is where the tests below end."""
    eta, r = torch.zeros_like(g), g.clone()
    d = -r
    for _ in range(len(g)):
        curvature = d @ a @ d
        alpha = (r @ r) / curvature
        if curvature <= 0 or (eta + alpha * d).norm() >= radius:
            # the positive root tau of |eta + tau d|^2 = radius^2
            dd, ed, ee = d @ d, eta @ d, eta @ eta
            tau = (-ed + torch.sqrt(ed * ed + dd * (radius * radius - ee))) / dd
            return eta + tau * d, "negative" if curvature <= 0 else "boundary"
        eta = eta + alpha * d
        r_new = r + alpha * (a @ d)
        d = -r_new + (r_new @ r_new) / (r @ r) * d
        r = r_new
    raise AssertionError("the reference did not reach the boundary")


def _quadratic(eigenvalues: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric ``A`` with the given spectrum and a gradient with a component along
    every eigenvector (so that CG takes several steps)."""
    generator = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=generator))
    a = (q * torch.tensor(eigenvalues, dtype=F64)) @ q.T
    return a, q @ (torch.rand(n, dtype=F64, generator=generator) + 0.5)


@pytest.mark.parametrize(
    ("eigenvalues", "radius", "stop"),
    [
        ([1.0, 2, 3, 4, 5, 6, 7, 8], 1.2, InnerStop.EXCEEDED_RADIUS),
        ([-0.1, -0.05, 1, 2, 3, 4, 5, 6, 7], 25.0, InnerStop.EXCEEDED_RADIUS),
        ([-0.5, 1, 2, 3, 4, 5, 6, 7], 50.0, InnerStop.NEGATIVE_CURVATURE),
        ([-0.5, 1, 2, 3, 4, 5, 6, 7], 25.0, InnerStop.NEGATIVE_CURVATURE),
        ([-0.1, -0.05, 1, 2, 3, 4, 5, 6, 7], 50.0, InnerStop.NEGATIVE_CURVATURE),
    ],
)
def test_truncated_cg_stops_on_the_boundary_after_inner_steps(eigenvalues, radius, stop):
    """A stop at the boundary after at least one full CG step (where the step uses the
    recurrences for ``<eta, delta>`` and ``|delta|^2`` rather than a fresh inner product)
    returns ``|eta| = radius`` and Steihaug-Toint's step, and ``H eta``."""
    a, b = _quadratic(eigenvalues, seed=0)
    objective = Objective(lambda x: b @ x + 0.5 * x @ a @ x, geoopt.Euclidean(ndim=1))
    point, hessian = objective.second_order(torch.zeros(len(b), dtype=F64))
    eta, h_eta, inner, reason = truncated_cg(
        objective, point, hessian, radius, theta=1.0, kappa=0.1, min_inner=1, max_inner=len(b)
    )
    assert reason is stop and inner >= 1
    torch.testing.assert_close(eta.norm(), torch.tensor(radius, dtype=F64), rtol=1e-13, atol=0)
    expected, kind = _steihaug(a, b, radius)
    assert kind == ("negative" if stop is InnerStop.NEGATIVE_CURVATURE else "boundary")
    torch.testing.assert_close(eta, expected, rtol=1e-10, atol=1e-10 * radius)
    torch.testing.assert_close(h_eta, a @ eta, rtol=1e-10, atol=1e-10 * radius)


# ---------------------------------------------------------------------------------------
# The outer iteration: radius and acceptance
# ---------------------------------------------------------------------------------------


def _eigenproblem(seed: int = 1, n: int = 12, p: int = 3):
    """``-tr(X^T A X) / 2 + 0.1 sum X^4`` on Stiefel: indefinite Hessians far from the
    minimizer, and ratios on every side of 1/4 and 3/4."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=generator))
    a = (q * torch.linspace(1, 24, n, dtype=F64)) @ q.T
    manifold = Stiefel()
    x0 = manifold.random(n, p, dtype=F64, generator=generator)

    def cost(x):
        return -0.5 * torch.trace(x.mT @ a @ x) + 0.1 * (x**4).sum()

    return cost, manifold, x0


@pytest.mark.parametrize(
    ("options", "exercised"),
    [
        ({}, {"shrink", "shrink, taken", "grow", "keep"}),
        ({"radius_max": 0.2, "radius_init": 0.1}, {"capped", "grow", "keep"}),
    ],
    ids=["default", "small-radius-max"],
)
def test_radius_and_acceptance_follow_the_ratio_rule(options, exercised, monkeypatch):
    """Each outer iteration, from its inner solve (recorded) and ``rho`` recomputed here
    from the documented formula ``(f(x) - f(R_x(eta)) + s) / (m(0) - m(eta) + s)``,
    ``s = 1e3 eps max(1, |f(x)|)``: the next radius is a quarter of it when ``rho < 1/4``,
    ``min(2 radius, radius_max)`` when ``rho > 3/4`` and the inner solver stopped at the
    boundary, else the same (a quarter also when the model did not decrease); the step is
    taken when ``rho > 0.1`` (``rho_prime``) and the model decreased;
    ``|eta| <= radius <= radius_max``, with equality at a boundary stop. Each run must
    exercise the rules named: ``"shrink, taken"`` is a ratio in ``(0.1, 1/4)`` (the step
    taken, the radius quartered), ``"capped"`` a doubling cut to ``radius_max``."""
    cost, manifold, x0 = _eigenproblem()
    solves = []

    def recording(objective, point, hessian, radius, **kwargs):
        eta, h_eta, inner, stop = truncated_cg(objective, point, hessian, radius, **kwargs)
        solves.append((point.x, radius, eta, hessian(eta), stop))
        return eta, h_eta, inner, stop

    monkeypatch.setattr(_trust_region, "truncated_cg", recording)
    objective = Objective(cost, manifold)
    iterates = [p.x for p in itertools.islice(trust_region(objective, x0, **options), 25)]
    radius_max = options.get("radius_max", math.sqrt(3))  # sqrt(p) on Stiefel
    eps = torch.finfo(F64).eps
    rules = set()
    for k, (x, radius, eta, h_eta, stop) in enumerate(solves[:-1]):
        assert torch.equal(x, iterates[k])
        norm = float(manifold.norm(x, eta))
        assert radius <= radius_max and norm <= radius * (1 + 1e-12)
        if stop in (InnerStop.NEGATIVE_CURVATURE, InnerStop.EXCEEDED_RADIUS):
            assert norm == pytest.approx(radius, rel=1e-12)
        value, proposal = float(cost(x)), manifold.retr(x, eta)
        grad = manifold.egrad2rgrad(x, torch.func.grad(cost)(x))
        model_decrease = float(-manifold.inner(x, grad, eta) - 0.5 * manifold.inner(x, eta, h_eta))
        shift = 1e3 * eps * max(1.0, abs(value))
        rho = (value - float(cost(proposal)) + shift) / (model_decrease + shift)
        assert min(abs(rho - 0.25), abs(rho - 0.75), abs(rho - 0.1)) > 1e-6  # no ties
        model_decreased = model_decrease + shift >= 0
        if rho < 0.25 or not model_decreased:
            expected, rule = radius / 4, "shrink" if rho <= 0.1 else "shrink, taken"
        elif rho > 0.75 and stop in (InnerStop.NEGATIVE_CURVATURE, InnerStop.EXCEEDED_RADIUS):
            expected = min(2 * radius, radius_max)
            rule = "capped" if 2 * radius > radius_max else "grow"
        else:
            expected, rule = radius, "keep"
        rules.add(rule)
        assert solves[k + 1][1] == pytest.approx(expected, rel=1e-15), (k, rho, stop)
        if rho > 0.1 and model_decreased:
            torch.testing.assert_close(iterates[k + 1], proposal, rtol=0, atol=1e-15)
        else:
            assert torch.equal(iterates[k + 1], x)
    assert exercised <= rules


def test_no_step_is_longer_than_radius_max():
    """With the exponential map as retraction, the geodesic distance between consecutive
    iterates is ``|eta| <= radius <= radius_max``."""
    generator = torch.Generator().manual_seed(3)
    manifold = Grassmann(retraction="exp")
    n, p = 10, 3
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=generator))
    a = (q * torch.linspace(1, 20, n, dtype=F64)) @ q.T
    x0 = manifold.random(n, p, dtype=F64, generator=generator)
    iterates = []
    result = minimize(
        lambda x: -0.5 * torch.trace(x.mT @ a @ x),
        x0,
        manifold,
        "trust-region",
        radius_max=0.2,
        radius_init=0.1,
        tol=1e-9,
        callback=lambda r: iterates.append(r.x),
    )
    assert result.success, result.message
    steps = manifold.dist(torch.stack([x0, *iterates[:-1]]), torch.stack(iterates))
    assert float(steps.max()) <= 0.2 * (1 + 1e-9)
    assert float(steps.max()) >= 0.19  # steps of the full radius were taken
