"""The general matrix exponential, accurate at every norm in float64."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["matrix_exp"]

# torch.linalg.matrix_exp (torch 2.13, CPU, float64) loses up to 1e-10 absolute accuracy
# for 1-norms in about [3e-3, 6e-2] (a Taylor degree too low for that bracket); degree 12
# below this 1-norm errs by less than 0.25^13 / 13! = 4e-19.
_TAYLOR_NORM = 0.25
_TAYLOR_COEFFICIENTS = [1.0 / math.factorial(k) for k in range(13)]


def _taylor12(a: Tensor) -> Tensor:
    """``sum_{k <= 12} a^k / k!`` by Paterson-Stockmeyer (six matrix products)."""
    c = _TAYLOR_COEFFICIENTS
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    a2 = a @ a
    a3 = a2 @ a
    a4 = a2 @ a2

    def block(j: int) -> Tensor:
        return c[4 * j] * eye + c[4 * j + 1] * a + c[4 * j + 2] * a2 + c[4 * j + 3] * a3

    return block(0) + a4 @ (block(1) + a4 @ (block(2) + c[12] * a4))


def matrix_exp(a: Tensor) -> Tensor:
    """Matrix exponential of square matrices, accurate to rounding at every norm.

    :func:`torch.linalg.matrix_exp` in float64 loses up to ``1e-10`` for 1-norms between
    about ``3e-3`` and ``6e-2``; this evaluates a degree-12 Taylor polynomial for 1-norms
    up to ``0.25`` (error below ``4e-19``) and torch's scaling-and-squaring above. Both
    branches are computed and selected per matrix with :func:`torch.where`, so there is
    no host synchronisation; the Taylor branch sees only the small matrices, so large
    ones never overflow into its gradient. float32 input goes to torch directly.

    Args:
        a: square matrices.

    Returns:
        ``expm(a)``.

    Shapes:
        ``a``: ``(..., n, n)``; output: ``(..., n, n)``.

    Raises:
        ValueError: on a non-square input.

    Example:
        >>> a = torch.tensor([[0.0, -0.04], [0.04, 0.0]], dtype=torch.float64)
        >>> rotation = matrix_exp(a)
        >>> float(rotation[1, 0] - math.sin(0.04)) == 0.0
        True
    """
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"matrix_exp expects square matrices (..., n, n), got {tuple(a.shape)}")
    full = torch.linalg.matrix_exp(a)
    if a.dtype != torch.float64 or a.numel() == 0:
        return full
    small = torch.linalg.matrix_norm(a, ord=1, keepdim=True) <= _TAYLOR_NORM
    taylor = _taylor12(torch.where(small, a, 0.0))
    return torch.where(small, taylor, full)
