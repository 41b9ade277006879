"""Riemannian optimizers: batched Riemannian SGD and Adam, the landing method and
Cayley updates for Stiefel parameters, and a :func:`scipy.optimize.minimize`-like
``minimize`` with trust-region, conjugate-gradient, L-BFGS and steepest-descent
solvers that reuse the :mod:`torsion.curvature` engine for Hessian products.
"""

__all__: list[str] = []
