"""The shipped test kit: property suites and helpers that torsion's own tests and
users' implementations bind to. Nothing in the library imports this package, and it
needs pytest.

* :class:`ManifoldSuite`: properties every :class:`torsion.manifolds.Manifold` must have.
* :class:`LinearOperatorSuite` with :class:`OperatorCase`: properties every curvature
  operator must have, against the dense oracles :func:`dense_hessian`, :func:`dense_ggn`
  and :func:`dense_empirical_fisher`.
"""

from torsion.testing._manifold_suite import ManifoldSuite
from torsion.testing._operator_suite import (
    LinearOperatorSuite,
    OperatorCase,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
)

__all__ = [
    "LinearOperatorSuite",
    "ManifoldSuite",
    "OperatorCase",
    "dense_empirical_fisher",
    "dense_ggn",
    "dense_hessian",
]
