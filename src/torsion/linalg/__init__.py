"""Batched symmetric-matrix functions with a stable backward, and orthonormalization.

The numerical core under the SPD manifolds, the SPD layers and the optimizers:

* :func:`sym_funcm` and the named functions :func:`sym_logm`, :func:`sym_expm`,
  :func:`sym_sqrtm`, :func:`sym_invsqrtm`, :func:`sym_powm`, :func:`sym_clampm` apply a
  scalar function to the eigenvalues of symmetric matrices, with a Daleckii-Krein
  backward that is finite and exact at repeated eigenvalues and supports double
  backward;
* :func:`qr_unique`, :func:`polar` and :func:`cayley_retraction` orthonormalize for the
  Stiefel and Grassmann manifolds;
* :func:`matrix_exp`, the general matrix exponential, accurate to rounding at every norm
  (``torch.linalg.matrix_exp`` loses up to ``1e-10`` in float64 at small norms).
"""

from torsion.linalg._expm import matrix_exp
from torsion.linalg._orthonormal import cayley_retraction, polar, qr_unique
from torsion.linalg._spectral import (
    sym_clampm,
    sym_expm,
    sym_funcm,
    sym_invsqrtm,
    sym_logm,
    sym_powm,
    sym_sqrtm,
)

__all__ = [
    "cayley_retraction",
    "matrix_exp",
    "polar",
    "qr_unique",
    "sym_clampm",
    "sym_expm",
    "sym_funcm",
    "sym_invsqrtm",
    "sym_logm",
    "sym_powm",
    "sym_sqrtm",
]
