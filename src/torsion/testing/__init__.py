"""The shipped test kit: property suites and helpers that torsion's own tests and
users' implementations bind to. Nothing in the library imports this package, and it
needs pytest.

* :class:`ManifoldSuite`: properties every :class:`torsion.manifolds.Manifold` must have.
* :class:`LinearOperatorSuite` with :class:`OperatorCase`: properties every curvature
  operator must have, against the dense oracles :func:`dense_hessian`, :func:`dense_ggn`
  and :func:`dense_empirical_fisher`.
* :class:`OptimizerSuite` with :class:`OptimizationProblem`: Riemannian problems with known
  optima (eigenspaces, Procrustes, Karcher means) every optimizer must solve, iterates on
  the manifold; :func:`optimization_problems` builds them.
"""

from torsion.testing._manifold_suite import ManifoldSuite
from torsion.testing._operator_suite import (
    LinearOperatorSuite,
    OperatorCase,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
)
from torsion.testing._optimizer_suite import (
    OptimizationProblem,
    OptimizerSuite,
    optimization_problems,
)

__all__ = [
    "LinearOperatorSuite",
    "ManifoldSuite",
    "OperatorCase",
    "OptimizationProblem",
    "OptimizerSuite",
    "dense_empirical_fisher",
    "dense_ggn",
    "dense_hessian",
    "optimization_problems",
]
