"""Tolerances keyed by floating dtype, kept in one place.

Every numerical threshold in torsion that depends on precision is derived here from
``torch.finfo``, so that float32 and float64 code paths differ only through this table.
"""

from __future__ import annotations

import torch

__all__ = ["check_floating", "eigenvalue_floor", "symmetry_tolerance", "tie_tolerance"]


def check_floating(x: torch.Tensor, name: str = "input") -> None:
    """Raise ``TypeError`` unless ``x`` has a real floating dtype."""
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype (float32 or float64), got {x.dtype}")


def tie_tolerance(dtype: torch.dtype) -> float:
    """Relative gap below which two eigenvalues are treated as tied: ``eps ** (1/3)``.

    A first divided difference ``(f(a) - f(b)) / (a - b)`` loses about ``eps / h`` to
    cancellation at relative gap ``h``; replacing it by the midpoint derivative errs by
    about ``h ** 2``. The two balance at ``h = eps ** (1/3)`` (6e-6 in float64, 5e-3 in
    float32), where both errors are ``eps ** (2/3)``.
    """
    return torch.finfo(dtype).eps ** (1.0 / 3.0)


def eigenvalue_floor(dtype: torch.dtype) -> float:
    """Relative eigenvalue floor for logarithms and roots: ``eps`` times the largest eigenvalue.

    ``eigh`` resolves eigenvalues only to about ``eps * ||X||``, so anything below that is
    numerical noise; clamping there keeps ``log``/``sqrt`` finite without changing any
    eigenvalue the decomposition can actually resolve.
    """
    return torch.finfo(dtype).eps


def symmetry_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance ``||X - X^T|| <= tol * ||X||`` accepted as symmetric."""
    return 100.0 * torch.finfo(dtype).eps
