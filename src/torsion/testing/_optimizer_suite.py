"""A suite of Riemannian problems with known optima that every optimizer must solve.

Subclass :class:`OptimizerSuite` in a ``Test*`` class and implement the hook
:meth:`OptimizerSuite.solve`, which runs the optimizer on an :class:`OptimizationProblem`
and returns the final point; report each iterate to :meth:`OptimizationProblem.observe`
so the suite can check that every iterate stays on the manifold::

    class TestTrustRegion(OptimizerSuite):
        def solve(self, problem):
            result = minimize(problem.cost, problem.x0, problem.manifold,
                              method="trust-region", tol=self.gradient_tolerance,
                              callback=lambda r: problem.observe(r.x))
            return result.x

A training optimizer binds the same way, with a loop of steps on a
``geoopt.ManifoldParameter`` initialised at a copy of ``problem.x0`` (and, typically, a
looser :attr:`OptimizerSuite.optimum_tolerance`)::

    class TestRiemannianAdam(OptimizerSuite):
        optimum_tolerance = 1e-4

        def solve(self, problem):
            param = geoopt.ManifoldParameter(problem.x0.clone(), manifold=problem.manifold)
            optimizer = RiemannianAdam([param], lr=1e-2)
            problem.observe(param.detach())
            for _ in range(2000):
                optimizer.zero_grad()
                problem.cost(param).backward()
                optimizer.step()
                problem.observe(param.detach())
            return param.detach()

The problems, all in float64 and small (n <= 12), each with an oracle independent of the
optimizers and of torsion's manifold code where one exists:

* ``rayleigh-grassmann``: the dominant ``p``-dimensional eigenspace of a symmetric ``A``,
  ``min -tr(X^T A X) / 2`` on Grassmann; error ``||X X^T - V V^T||_F`` with ``V`` the top
  eigenvectors from ``torch.linalg.eigh``;
* ``brockett-stiefel``: Brockett's cost ``min -tr(X^T A X N) / 2``, ``N = diag(p, ..., 1)``,
  on Stiefel, whose minimizers are the top eigenvectors in order (up to signs); error
  against ``eigh`` with the signs aligned;
* ``procrustes-stiefel``: orthogonal Procrustes ``min ||X - M||_F^2 / 2`` on Stiefel; error
  against the polar factor ``U V^T`` of the SVD ``M = U S V^T``;
* ``karcher-<metric>``: the Karcher mean ``min sum_i dist(X, A_i)^2 / (2 N)`` of SPD
  matrices under each metric; error against the closed forms written out here for the
  log-Euclidean (``expm(mean logm A_i)``) and log-Cholesky (Lin 2019) metrics, and
  against the manifold's ``frechet_mean`` (its own fixed-point iteration) for the
  affine-invariant and Bures-Wasserstein metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import geoopt
import torch
from torch import Tensor

__all__ = ["PROBLEM_NAMES", "OptimizationProblem", "OptimizerSuite", "optimization_problems"]

_DTYPE = torch.float64


@dataclass
class OptimizationProblem:
    """A cost on a manifold, a start, and the distance of a point to the known minimizers.

    Attributes:
        name: identifies the problem in test ids.
        manifold: where to optimize.
        cost: maps a point to a scalar tensor.
        x0: the starting point (on the manifold; do not modify it).
        optimum: one minimizer.
        error: distance of a point to the set of minimizers (0 at every minimizer), e.g.
            the distance of projectors for a subspace problem.
        iterates_off_manifold: why each iterate :meth:`observe` found off the manifold.
        observed: how many iterates :meth:`observe` has seen.
    """

    name: str
    manifold: geoopt.Manifold
    cost: Callable[[Tensor], Tensor]
    x0: Tensor
    optimum: Tensor
    error: Callable[[Tensor], float]
    iterates_off_manifold: list[str] = field(default_factory=list)
    observed: int = 0

    def observe(self, x: Tensor) -> None:
        """Record one iterate and whether it lies on the manifold (tolerance 1e-8)."""
        self.observed += 1
        ok, reason = self.manifold.check_point_on_manifold(
            x.detach(), explain=True, atol=1e-8, rtol=1e-8
        )
        if not ok:
            self.iterates_off_manifold.append(f"iterate {self.observed - 1}: {reason}")


# ----------------------------------------------------------------------------- oracles


def _symmetric_with_gaps(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``A = Q diag(lam) Q^T`` with well separated eigenvalues; returns ``A`` and ``eigh(A)``."""
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=_DTYPE, generator=generator))
    lam = torch.linspace(1.0, 2.0 * n, n, dtype=_DTYPE)
    a = (q * lam) @ q.mT
    a = (a + a.mT) / 2
    evals, evecs = torch.linalg.eigh(a)
    return a, evals, evecs


def _spd_points(count: int, n: int, generator: torch.Generator) -> Tensor:
    """SPD matrices ``B B^T / n + I / 2`` (condition about 10), drawn independently of torsion."""
    b = torch.randn(count, n, n, dtype=_DTYPE, generator=generator)
    return b @ b.mT / n + 0.5 * torch.eye(n, dtype=_DTYPE)


def _logm(a: Tensor) -> Tensor:
    lam, v = torch.linalg.eigh(a)
    return (v * lam.log()[..., None, :]) @ v.mT


def _expm_sym(s: Tensor) -> Tensor:
    lam, v = torch.linalg.eigh(s)
    return (v * lam.exp()[..., None, :]) @ v.mT


def _log_cholesky_mean(points: Tensor) -> Tensor:
    """Lin (2019), Prop. 9: average the strictly lower Cholesky parts and the log diagonals."""
    chol = torch.linalg.cholesky(points)
    lower = chol.tril(-1).mean(dim=0)
    diagonal = chol.diagonal(dim1=-2, dim2=-1).log().mean(dim=0).exp()
    factor = lower + torch.diag_embed(diagonal)
    return factor @ factor.mT


def _relative(x: Tensor, y: Tensor) -> float:
    return float(torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y))


def optimization_problems(seed: int = 0) -> dict[str, OptimizationProblem]:
    """The suite's problems drawn from ``seed``, by name (fresh objects on every call)."""
    return {
        name: dataclasses.replace(
            problem, x0=problem.x0.clone(), iterates_off_manifold=[], observed=0
        )
        for name, problem in _drawn_problems(seed).items()
    }


@functools.lru_cache(maxsize=4)
def _drawn_problems(seed: int) -> dict[str, OptimizationProblem]:
    from torsion.manifolds import (
        Grassmann,
        SPDAffineInvariant,
        SPDBuresWasserstein,
        SPDLogCholesky,
        SPDLogEuclidean,
        Stiefel,
    )

    generator = torch.Generator().manual_seed(seed)
    problems: dict[str, OptimizationProblem] = {}

    # Dominant eigenspace on Grassmann.
    n, p = 12, 3
    a, _, evecs = _symmetric_with_gaps(n, generator)
    top = evecs[:, -p:]
    grassmann = Grassmann()
    problems["rayleigh-grassmann"] = OptimizationProblem(
        name="rayleigh-grassmann",
        manifold=grassmann,
        cost=lambda x, a=a: -0.5 * torch.trace(x.mT @ a @ x),
        x0=grassmann.random(n, p, dtype=_DTYPE, generator=generator),
        optimum=top,
        error=lambda x, top=top: float(torch.linalg.matrix_norm(x @ x.mT - top @ top.mT)),
    )

    # Brockett's cost on Stiefel: ordered eigenvectors, up to signs.
    n, p = 10, 3
    a, _, evecs = _symmetric_with_gaps(n, generator)
    ordered = evecs[:, -p:].flip(-1)
    weights = torch.diag(torch.arange(p, 0, -1, dtype=_DTYPE))
    stiefel = Stiefel()

    def brockett_error(x: Tensor, ordered: Tensor = ordered) -> float:
        signs = torch.sign((ordered * x).sum(dim=0))
        return float(torch.linalg.matrix_norm(x - ordered * signs))

    problems["brockett-stiefel"] = OptimizationProblem(
        name="brockett-stiefel",
        manifold=stiefel,
        cost=lambda x, a=a, w=weights: -0.5 * torch.trace(x.mT @ a @ x @ w),
        x0=stiefel.random(n, p, dtype=_DTYPE, generator=generator),
        optimum=ordered,
        error=brockett_error,
    )

    # Orthogonal Procrustes on Stiefel: the polar factor of M.
    n, p = 10, 4
    m = torch.randn(n, p, dtype=_DTYPE, generator=generator)
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    polar = u @ vh
    problems["procrustes-stiefel"] = OptimizationProblem(
        name="procrustes-stiefel",
        manifold=stiefel,
        cost=lambda x, m=m: 0.5 * ((x - m) ** 2).sum(),
        x0=stiefel.random(n, p, dtype=_DTYPE, generator=generator),
        optimum=polar,
        error=lambda x, polar=polar: float(torch.linalg.matrix_norm(x - polar)),
    )

    # Karcher means on SPD, one per metric.
    count, n = 6, 4
    points = _spd_points(count, n, generator)
    means = {
        "log-euclidean": (SPDLogEuclidean(), _expm_sym(_logm(points).mean(dim=0))),
        "log-cholesky": (SPDLogCholesky(), _log_cholesky_mean(points)),
        "affine-invariant": (SPDAffineInvariant(), None),
        "bures-wasserstein": (SPDBuresWasserstein(), None),
    }
    for metric, (manifold, mean) in means.items():
        if mean is None:
            mean = manifold.frechet_mean(points, tol=1e-13, max_iter=1000).mean
        problems[f"karcher-{metric}"] = OptimizationProblem(
            name=f"karcher-{metric}",
            manifold=manifold,
            cost=lambda x, manifold=manifold: manifold.dist2(x, points).sum() / (2 * count),
            x0=points[0].clone(),
            optimum=mean,
            error=lambda x, mean=mean: _relative(x, mean),
        )
    return problems


PROBLEM_NAMES = (
    "rayleigh-grassmann",
    "brockett-stiefel",
    "procrustes-stiefel",
    "karcher-log-euclidean",
    "karcher-log-cholesky",
    "karcher-affine-invariant",
    "karcher-bures-wasserstein",
)


class OptimizerSuite:
    """Known Riemannian problems every optimizer must solve, iterates on the manifold.

    Implement :meth:`solve`. Class attributes tune the run:

    Attributes:
        problem_names: which problems to run (all by default; see the module notes).
        gradient_tolerance: the gradient norm a solver should stop at (a hint for
            :meth:`solve`; 1e-9).
        optimum_tolerance: the largest accepted :attr:`OptimizationProblem.error` (1e-6).
        seed: seed of the problem draws.
    """

    problem_names: ClassVar[tuple[str, ...]] = PROBLEM_NAMES
    gradient_tolerance: ClassVar[float] = 1e-9
    optimum_tolerance: ClassVar[float] = 1e-6
    seed: ClassVar[int] = 0

    def solve(self, problem: OptimizationProblem) -> Tensor:
        """Run the optimizer on ``problem`` from ``problem.x0``; return the final point.

        Call ``problem.observe(x)`` with every iterate (the start included).
        """
        raise NotImplementedError("bind the suite by implementing solve(problem)")

    def pytest_generate_tests(self, metafunc) -> None:
        """One test per name in :attr:`problem_names` (pytest calls this on test classes)."""
        if "problem_name" in metafunc.fixturenames:
            unknown = set(self.problem_names) - set(PROBLEM_NAMES)
            if unknown:
                raise ValueError(f"unknown problem names {sorted(unknown)}; known: {PROBLEM_NAMES}")
            metafunc.parametrize("problem_name", self.problem_names)

    def test_reaches_the_optimum_with_iterates_on_the_manifold(self, problem_name):
        problem = optimization_problems(self.seed)[problem_name]
        x0 = problem.x0.clone()
        x = self.solve(problem)
        assert torch.equal(problem.x0, x0), "the solver modified problem.x0"
        assert problem.observed > 0, "solve() reported no iterate to problem.observe"
        assert not problem.iterates_off_manifold, "\n".join(problem.iterates_off_manifold[:5])
        problem.observe(x)
        assert not problem.iterates_off_manifold, problem.iterates_off_manifold[-1]
        error = problem.error(x)
        assert math.isfinite(error) and error <= self.optimum_tolerance, (
            f"{problem.name}: distance to the known optimum {error:.3g} > "
            f"{self.optimum_tolerance:g}"
        )
