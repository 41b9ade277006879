"""Manifold-valued layers: the SPDNet family, Riemannian SPD batch normalization,
Grassmann layers (GrNet) and SPD message passing.

* SPD: :class:`BiMap` (weights on Stiefel, trained by :mod:`torsion.optim`),
  :class:`ReEig`, :class:`LogEig`, :class:`ExpEig`, :class:`PowEig`, :class:`CovPool`,
  :class:`SPDVectorize` and :class:`SPDBatchNorm` (affine-invariant, log-Euclidean and
  log-Cholesky metrics);
* Grassmann: :class:`FRMap`, :class:`ReOrth`, :class:`ProjMap`, :class:`ProjPooling`,
  :class:`OrthMap`;
* graphs: :class:`SPDConv`, a :class:`torch_geometric.nn.MessagePassing` layer over SPD
  node features with Fréchet-mean aggregation.
"""

from torsion.nn._batchnorm import SPDBatchNorm
from torsion.nn._graph import SPDConv
from torsion.nn._grassmann import FRMap, OrthMap, ProjMap, ProjPooling, ReOrth
from torsion.nn._spd import BiMap, CovPool, ExpEig, LogEig, PowEig, ReEig, SPDVectorize

__all__ = [
    "BiMap",
    "CovPool",
    "ExpEig",
    "FRMap",
    "LogEig",
    "OrthMap",
    "PowEig",
    "ProjMap",
    "ProjPooling",
    "ReEig",
    "ReOrth",
    "SPDBatchNorm",
    "SPDConv",
    "SPDVectorize",
]
