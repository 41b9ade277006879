"""Curvature: the one Hessian-vector-product engine and the probes built on it.

Planned here: ``hvp``/``jvp``/``vjp`` over parameter pytrees, ``LinearOperator`` with
``HessianOperator``, ``GGNOperator`` and ``FisherOperator``, and the probes (Lanczos
eigenvalues, Hutchinson / Hutch++ trace, SLQ spectral density, diagonal estimates,
sharpness and edge-of-stability monitors). Riemannian curvature reaches manifolds
only through the structural ``TangentSpace`` protocol, so this package never imports
:mod:`torsion.manifolds`.
"""

__all__: list[str] = []
