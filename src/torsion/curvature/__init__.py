"""Curvature: the one Hessian-vector-product engine and the probes built on it.

* the engine: :func:`hvp`, :func:`jvp`, :func:`vjp` and :func:`ggn_vp` over parameter
  pytrees, and :class:`GradientGraph` (one gradient graph reused by a probe loop);
* operators: :class:`LinearOperator`, :class:`DenseOperator`, and the model operators
  :class:`HessianOperator`, :class:`GGNOperator` and :class:`EmpiricalFisherOperator`
  (batch-size-weighted over any iterable of batches; Riemannian with ``riemannian=True``);
* probes, plain functions of any operator and a ``torch.Generator``: :func:`eigsh`
  (thick-restart block Lanczos), :func:`trace` (Hutchinson, Hutch++, XTrace),
  :func:`diagonal`, :func:`spectral_density` and :func:`slq_quadrature`;
* :class:`SharpnessMonitor`: warm-started sharpness checks next to ``2 / lr`` in training.

Riemannian curvature reaches manifolds only through the structural :class:`TangentSpace`
protocol, so this package never imports :mod:`torsion.manifolds`.
"""

from torsion.curvature._hvp import GGNMethod, GradientGraph, HVPMethod, ggn_vp, hvp, jvp, vjp
from torsion.curvature._linop import DenseOperator, LinearOperator, TangentSpace
from torsion.curvature._monitor import SharpnessMonitor
from torsion.curvature._operators import EmpiricalFisherOperator, GGNOperator, HessianOperator
from torsion.curvature._probes import (
    DiagonalEstimate,
    EigshResult,
    TraceEstimate,
    diagonal,
    eigsh,
    slq_quadrature,
    spectral_density,
    trace,
)

__all__ = [
    "DenseOperator",
    "DiagonalEstimate",
    "EigshResult",
    "EmpiricalFisherOperator",
    "GGNMethod",
    "GGNOperator",
    "GradientGraph",
    "HVPMethod",
    "HessianOperator",
    "LinearOperator",
    "SharpnessMonitor",
    "TangentSpace",
    "TraceEstimate",
    "diagonal",
    "eigsh",
    "ggn_vp",
    "hvp",
    "jvp",
    "slq_quadrature",
    "spectral_density",
    "trace",
    "vjp",
]
