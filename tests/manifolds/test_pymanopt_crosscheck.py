"""Stiefel and Grassmann against pymanopt (optional `bench` extra), in float64.

pymanopt is an independent NumPy implementation of the same formulas; the tests skip
cleanly when it is not installed.
"""

import numpy as np
import pytest
import torch

from torsion.manifolds import Grassmann, Stiefel

pymanopt_manifolds = pytest.importorskip("pymanopt.manifolds")

N, P = 6, 2


def _case(manifold, generator):
    x = manifold.random(N, P, dtype=torch.float64, generator=generator)
    u = 0.5 * manifold.random_tangent(x, generator=generator)
    egrad = torch.randn(N, P, dtype=torch.float64, generator=generator)
    ehess = torch.randn(N, P, dtype=torch.float64, generator=generator)
    return x, u, egrad, ehess


def _np(t):
    return t.numpy()


def test_grassmann_agrees_with_pymanopt(generator):
    ours, theirs = Grassmann(), pymanopt_manifolds.Grassmann(N, P)
    x, u, egrad, ehess = _case(ours, generator)
    y = ours.expmap(x, u)
    # exp returns a representative; compare subspaces through their projectors.
    their_y = theirs.exp(_np(x), _np(u))
    np.testing.assert_allclose(_np(y @ y.mT), their_y @ their_y.T, atol=1e-10)
    np.testing.assert_allclose(_np(ours.logmap(x, y)), theirs.log(_np(x), _np(y)), atol=1e-8)
    np.testing.assert_allclose(float(ours.dist(x, y)), theirs.dist(_np(x), _np(y)), rtol=1e-10)
    np.testing.assert_allclose(
        _np(ours.egrad2rgrad(x, egrad)),
        theirs.euclidean_to_riemannian_gradient(_np(x), _np(egrad)),
        atol=1e-12,
    )
    # pymanopt's Hessian is proj(ehess) - u x^T egrad; torsion symmetrizes x^T egrad (the
    # two agree when x^T egrad is symmetric, as for every cost invariant under x -> xQ).
    symmetric_egrad = egrad - x @ ((x.mT @ egrad - egrad.mT @ x) / 2)
    np.testing.assert_allclose(
        _np(ours.ehess2rhess(x, symmetric_egrad, ehess, u)),
        theirs.euclidean_to_riemannian_hessian(_np(x), _np(symmetric_egrad), _np(ehess), _np(u)),
        atol=1e-10,
    )


def test_stiefel_agrees_with_pymanopt(generator):
    ours = Stiefel(metric="euclidean", retraction="qr")
    theirs = pymanopt_manifolds.Stiefel(N, P)
    x, u, egrad, ehess = _case(ours, generator)
    np.testing.assert_allclose(_np(ours.retr(x, u)), theirs.retraction(_np(x), _np(u)), atol=1e-10)
    np.testing.assert_allclose(_np(ours.expmap(x, u)), theirs.exp(_np(x), _np(u)), atol=1e-10)
    np.testing.assert_allclose(
        _np(ours.egrad2rgrad(x, egrad)),
        theirs.euclidean_to_riemannian_gradient(_np(x), _np(egrad)),
        atol=1e-12,
    )
    np.testing.assert_allclose(
        _np(ours.ehess2rhess(x, egrad, ehess, u)),
        theirs.euclidean_to_riemannian_hessian(_np(x), _np(egrad), _np(ehess), _np(u)),
        atol=1e-10,
    )
