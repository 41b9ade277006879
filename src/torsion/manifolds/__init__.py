"""Manifolds: geoopt-compatible SPD (affine-invariant, log-Euclidean, log-Cholesky,
Bures-Wasserstein), Stiefel and Grassmann manifolds with a Riemannian Hessian
(``ehess2rhess``), geodesics and batched Frechet means, all built on
:mod:`torsion.linalg`.

geoopt's :class:`~geoopt.Sphere`, :class:`~geoopt.Euclidean`,
:class:`~geoopt.ProductManifold` and :class:`~geoopt.Scaled` are re-exported so one
import serves.
"""

from geoopt import Euclidean, ProductManifold, Scaled, Sphere

from torsion.manifolds._base import FrechetMean, Manifold, trusted_inputs
from torsion.manifolds._grassmann import Grassmann
from torsion.manifolds._spd import (
    SPDAffineInvariant,
    SPDBuresWasserstein,
    SPDLogCholesky,
    SPDLogEuclidean,
)
from torsion.manifolds._stiefel import WEIGHT_MANIFOLDS, Stiefel, check_weight_manifold

__all__ = [
    "WEIGHT_MANIFOLDS",
    "Euclidean",
    "FrechetMean",
    "Grassmann",
    "Manifold",
    "ProductManifold",
    "SPDAffineInvariant",
    "SPDBuresWasserstein",
    "SPDLogCholesky",
    "SPDLogEuclidean",
    "Scaled",
    "Sphere",
    "Stiefel",
    "check_weight_manifold",
    "trusted_inputs",
]
