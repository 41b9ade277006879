"""Riemannian optimizers: batched Riemannian SGD and Adam (torch.optim optimizers for
training with :class:`geoopt.ManifoldParameter` and plain parameters; with
``Stiefel(retraction="cayley")`` they are Li et al.'s Cayley SGD / Adam), the
retraction-free landing method for square and rectangular Stiefel parameters, and a
:func:`scipy.optimize.minimize`-like ``minimize`` with trust-region, conjugate-gradient,
L-BFGS and steepest-descent solvers that reuse the :mod:`torsion.curvature` engine for
Hessian products.
"""

from torsion.optim._landing import Landing
from torsion.optim._minimize import METHODS, OptimizeResult, minimize
from torsion.optim._riemannian import RiemannianAdam, RiemannianSGD

__all__: list[str] = [
    "METHODS",
    "Landing",
    "OptimizeResult",
    "RiemannianAdam",
    "RiemannianSGD",
    "minimize",
]
