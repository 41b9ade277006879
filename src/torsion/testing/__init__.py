"""The shipped test kit: property suites and helpers that torsion's own tests and
users' implementations bind to. Nothing in the library imports this package, and it
needs pytest.

* :class:`ManifoldSuite`: properties every :class:`torsion.manifolds.Manifold` must have.
"""

from torsion.testing._manifold_suite import ManifoldSuite

__all__ = ["ManifoldSuite"]
