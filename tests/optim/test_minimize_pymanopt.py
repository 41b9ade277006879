"""The trust-region solver against pymanopt's TrustRegions (optional `bench` extra).

Same problem, same start, same defaults (radius, kappa, theta, rho rules): the two runs
must take the same number of iterations to the same optimum. pymanopt is an independent
NumPy implementation; the tests skip cleanly when it is not installed.
"""

import numpy as np
import pytest
import torch

from torsion.manifolds import Grassmann, SPDAffineInvariant, Stiefel
from torsion.optim import minimize

pymanopt = pytest.importorskip("pymanopt")
pymanopt_manifolds = pytest.importorskip("pymanopt.manifolds")
pymanopt_optimizers = pytest.importorskip("pymanopt.optimizers")

TOL = 1e-10


def _theirs(manifold, cost, egrad, ehess, x0):
    problem = pymanopt.Problem(
        manifold,
        pymanopt.function.numpy(manifold)(cost),
        euclidean_gradient=pymanopt.function.numpy(manifold)(egrad),
        euclidean_hessian=pymanopt.function.numpy(manifold)(ehess),
    )
    optimizer = pymanopt_optimizers.TrustRegions(verbosity=0, min_gradient_norm=TOL)
    return optimizer.run(problem, initial_point=x0)


def _symmetric(n, generator):
    a = torch.randn(n, n, dtype=torch.float64, generator=generator)
    return (a + a.mT) / 2


def test_dominant_subspace_on_grassmann(generator):
    n, p = 20, 3
    a = _symmetric(n, generator)
    x0 = Grassmann().random(n, p, dtype=torch.float64, generator=generator)
    ours = minimize(lambda x: -torch.trace(x.mT @ a @ x), x0, Grassmann(), tol=TOL)
    an = a.numpy()
    theirs = _theirs(
        pymanopt_manifolds.Grassmann(n, p),
        lambda x: -np.trace(x.T @ an @ x),
        lambda x: -2 * an @ x,
        lambda x, u: -2 * an @ u,
        x0.numpy(),
    )
    assert ours.success and ours.nit == theirs.iterations
    assert ours.fun == pytest.approx(theirs.cost, rel=1e-12)
    projector = ours.x @ ours.x.mT
    np.testing.assert_allclose(projector.numpy(), theirs.point @ theirs.point.T, atol=1e-9)


def test_procrustes_on_stiefel(generator):
    n, p, m = 12, 4, 20
    a = torch.randn(m, n, dtype=torch.float64, generator=generator)
    b = torch.randn(m, p, dtype=torch.float64, generator=generator)
    x0 = Stiefel().random(n, p, dtype=torch.float64, generator=generator)
    ours = minimize(lambda x: 0.5 * ((a @ x - b) ** 2).sum(), x0, Stiefel(), tol=TOL)
    an, bn = a.numpy(), b.numpy()
    theirs = _theirs(
        pymanopt_manifolds.Stiefel(n, p),
        lambda x: 0.5 * np.sum((an @ x - bn) ** 2),
        lambda x: an.T @ (an @ x - bn),
        lambda x, u: an.T @ (an @ u),
        x0.numpy(),
    )
    assert ours.success and ours.nit == theirs.iterations
    assert ours.fun == pytest.approx(theirs.cost, rel=1e-12)
    np.testing.assert_allclose(ours.x.numpy(), theirs.point, atol=1e-9)


def test_karcher_mean_on_spd(generator):
    """Affine-invariant Karcher mean. pymanopt gets the Euclidean gradient and Hessian of
    the same cost from ``torch.func`` (its own PyTorch backend through ``eigh`` has NaN
    Hessians where eigenvalues repeat), so the runs differ only in the solver and the
    geometry, whose formulas (metric, retraction, Hessian conversion) are the same."""
    manifold = SPDAffineInvariant()
    n, count = 4, 5
    points = manifold.random(count, n, n, dtype=torch.float64, generator=generator)
    x0 = points.mean(dim=0)

    def cost(x):
        return 0.5 * manifold.dist2(x, points).sum() / count

    ours = minimize(cost, x0, manifold, tol=TOL)

    def egrad(x):
        return torch.func.grad(cost)(torch.from_numpy(x)).numpy()

    def ehess(x, u):
        x, u = torch.from_numpy(x), torch.from_numpy(u)
        return torch.func.jvp(torch.func.grad(cost), (x,), (u,))[1].numpy()

    theirs = _theirs(
        pymanopt_manifolds.SymmetricPositiveDefinite(n),
        lambda x: float(cost(torch.from_numpy(x))),
        egrad,
        ehess,
        x0.numpy(),
    )
    assert ours.success and ours.nit == theirs.iterations
    assert ours.fun == pytest.approx(theirs.cost, rel=1e-12)
    np.testing.assert_allclose(ours.x.numpy(), theirs.point, atol=1e-9)
    reference = manifold.frechet_mean(points, tol=1e-12).mean
    torch.testing.assert_close(ours.x, reference, atol=1e-9, rtol=1e-9)
