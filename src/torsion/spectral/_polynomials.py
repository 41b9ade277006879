"""Polynomial bases on ``[-1, 1]`` and their evaluation by three-term recurrences.

Every spectral filter in :mod:`torsion.spectral` is ``sum_k c_k p_k(M) x`` for a sparse
operator ``M`` whose spectrum lies in ``[-1, 1]`` and a polynomial basis ``p_0 .. p_K``
that satisfies a three-term recurrence

    p_0 = 1,   p_1 = alpha_0 t + beta_0,
    p_{k+1} = (alpha_k t + beta_k) p_k - gamma_k p_{k-1}      (k >= 1).

:func:`recurrence_filter` evaluates such a series with exactly ``K`` products by ``M``.
Bases without a short recurrence of their own (Bernstein, values at interpolation nodes)
are first mapped to Chebyshev coefficients by a ``(K + 1) x (K + 1)`` change of basis
built here in float64: the cost of a forward pass then does not depend on the basis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Recurrence",
    "bernstein_to_chebyshev",
    "chebyshev_interpolation_matrix",
    "chebyshev_nodes",
    "chebyshev_recurrence",
    "chebyshev_vandermonde",
    "jacobi_recurrence",
    "monomial_recurrence",
    "recurrence_filter",
]

Coefficient = float | Tensor


@dataclass(frozen=True)
class Recurrence:
    """Coefficients of ``p_{k+1} = (alpha_k t + beta_k) p_k - gamma_k p_{k-1}``.

    Each sequence has length ``K`` (``gamma_0`` is never used). Entries are Python floats
    for a fixed basis, or tensors broadcasting against one row of the signal (a
    per-channel learnable recurrence). A float zero ``beta_k`` or ``gamma_k`` skips its
    term, so the monomial and Chebyshev recurrences cost no more than their textbook form.
    """

    alpha: Sequence[Coefficient]
    beta: Sequence[Coefficient]
    gamma: Sequence[Coefficient]

    def __post_init__(self) -> None:
        if not len(self.alpha) == len(self.beta) == len(self.gamma):
            raise ValueError(
                "Recurrence needs alpha, beta and gamma of equal length, got "
                f"{len(self.alpha)}, {len(self.beta)} and {len(self.gamma)}"
            )

    @property
    def degree(self) -> int:
        return len(self.alpha)


def _is_zero(c: Coefficient) -> bool:
    return not isinstance(c, Tensor) and c == 0.0


def monomial_recurrence(K: int) -> Recurrence:
    """``p_k(t) = t^k``."""
    return Recurrence([1.0] * K, [0.0] * K, [0.0] * K)


def chebyshev_recurrence(K: int, *, doubled: bool = False) -> Recurrence:
    """Chebyshev polynomials of the first kind, ``T_k(cos u) = cos(k u)``.

    With ``doubled=True`` the recurrence is written in ``s = 2t``: ``T_1 = s / 2`` and
    ``T_{k+1} = s T_k - T_{k-1}``, for an operator whose weights already carry the factor
    2. Each step is then one product and one subtraction (no scaling pass).
    """
    if K == 0:
        return Recurrence([], [], [])
    first, rest = (0.5, 1.0) if doubled else (1.0, 2.0)
    return Recurrence([first] + [rest] * (K - 1), [0.0] * K, [0.0] + [1.0] * (K - 1))


def jacobi_recurrence(K: int, a: float, b: float) -> Recurrence:
    """Jacobi polynomials ``P_k^{(a, b)}`` (orthogonal for ``(1 - t)^a (1 + t)^b``).

    The standard normalisation ``P_k^{(a, b)}(1) = binom(k + a, k)`` (Abramowitz & Stegun
    22.7.1), as in JacobiConv. Needs ``a, b > -1``.
    """
    if not (a > -1.0 and b > -1.0):
        raise ValueError(f"Jacobi parameters must satisfy a > -1 and b > -1, got a={a}, b={b}")
    alpha, beta, gamma = [], [], []
    for k in range(K):
        n = k + 1
        if n == 1:
            alpha.append((a + b + 2.0) / 2.0)
            beta.append((a - b) / 2.0)
            gamma.append(0.0)
            continue
        s = 2.0 * n + a + b
        denom = 2.0 * n * (n + a + b) * (s - 2.0)
        alpha.append((s - 1.0) * s * (s - 2.0) / denom)
        beta.append((s - 1.0) * (a * a - b * b) / denom)
        gamma.append(2.0 * (n + a - 1.0) * (n + b - 1.0) * s / denom)
    return Recurrence(alpha, beta, gamma)


def recurrence_filter(
    apply: Callable[[Tensor], Tensor],
    x: Tensor,
    coefficients: Sequence[Tensor] | Tensor,
    recurrence: Recurrence,
    *,
    first: Tensor | None = None,
) -> Tensor:
    """``sum_k coefficients[k] * p_k(M) x`` with exactly ``K`` calls of ``apply`` (``= M @``).

    Args:
        apply: the sparse operator, ``h -> M h``.
        x: the signal.
        coefficients: ``K + 1`` coefficients, each broadcasting against ``x`` (a scalar
            tensor, or one value per channel).
        recurrence: the basis, of degree ``K``.
        first: ``p_0(M) x`` when it is not ``x`` itself (a per-channel scaling, as in
            FavardGNN); defaults to ``x``.

    Shapes:
        ``x``: ``(N, C)``; each coefficient ``()``, ``(1,)`` or ``(C,)``; output ``(N, C)``.
    """
    K = recurrence.degree
    if len(coefficients) != K + 1:
        raise ValueError(
            f"a degree-{K} recurrence needs {K + 1} coefficients, got {len(coefficients)}"
        )
    prev = x if first is None else first
    out = coefficients[0] * prev
    if K == 0:
        return out
    cur = _step(apply, prev, None, recurrence, 0)
    out = torch.addcmul(out, coefficients[1], cur)
    for k in range(1, K):
        prev, cur = cur, _step(apply, cur, prev, recurrence, k)
        out = torch.addcmul(out, coefficients[k + 1], cur)
    return out


def _axpy(y: Tensor, a: Coefficient, x: Tensor) -> Tensor:
    """``y + a * x`` in one pass over memory (``a`` a float or a broadcasting tensor)."""
    if isinstance(a, Tensor):
        return torch.addcmul(y, a, x)
    return torch.add(y, x, alpha=a)


def _step(
    apply: Callable[[Tensor], Tensor], cur: Tensor, prev: Tensor | None, rec: Recurrence, k: int
) -> Tensor:
    """``(alpha_k M + beta_k) cur - gamma_k prev``: one product by ``M``.

    Elementwise passes cost about as much as a sparse product at 64 channels, so terms
    are fused (``torch.add(..., alpha=)``, ``addcmul``) and zero or unit coefficients skipped.
    """
    nxt = apply(cur)
    alpha, beta, gamma = rec.alpha[k], rec.beta[k], rec.gamma[k]
    if isinstance(alpha, Tensor) or alpha != 1.0:
        nxt = nxt * alpha
    if not _is_zero(beta):
        nxt = _axpy(nxt, beta, cur)
    if prev is not None and not _is_zero(gamma):
        nxt = _axpy(nxt, -gamma, prev)
    return nxt


# ---------------------------------------------------------------------------------------
# Changes of basis into Chebyshev coefficients (float64, K x K, built once per layer)
# ---------------------------------------------------------------------------------------


def chebyshev_nodes(K: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The ``K + 1`` Chebyshev nodes ``cos((K - j + 1/2) pi / (K + 1))`` in ascending order.

    These are ChebNetII's interpolation points ``x_0 < x_1 < ... < x_K``.
    """
    j = torch.arange(K + 1, dtype=torch.float64)
    return torch.cos((K - j + 0.5) * math.pi / (K + 1)).to(dtype)


def chebyshev_vandermonde(t: Tensor, K: int) -> Tensor:
    """``T_k(t)`` for ``k = 0 .. K``, by the recurrence.

    Shapes:
        ``t``: ``(n,)``; output ``(n, K + 1)``.
    """
    cols = [torch.ones_like(t)]
    if K >= 1:
        cols.append(t)
    for _ in range(2, K + 1):
        cols.append(2 * t * cols[-1] - cols[-2])
    return torch.stack(cols, dim=-1)


def chebyshev_interpolation_matrix(K: int) -> Tensor:
    """Values at :func:`chebyshev_nodes` to Chebyshev coefficients of the interpolant.

    ``c_k = (2 - [k = 0]) / (K + 1) * sum_j f(x_j) T_k(x_j)`` (discrete orthogonality of
    ``T_0 .. T_K`` on the ``K + 1`` nodes), exact for polynomials of degree ``<= K``.

    Shapes:
        output ``(K + 1, K + 1)``, float64: ``coefficients = matrix @ values``.
    """
    t = chebyshev_vandermonde(chebyshev_nodes(K), K)  # (node j, degree k)
    scale = torch.full((K + 1, 1), 2.0 / (K + 1), dtype=torch.float64)
    scale[0] = 1.0 / (K + 1)
    return scale * t.T


def bernstein_to_chebyshev(K: int) -> Tensor:
    """Bernstein coefficients on ``lambda in [0, 2]`` to Chebyshev coefficients in ``t``.

    The Bernstein basis of BernNet is ``b_k(lambda) = binom(K, k) / 2^K (2 - lambda)^(K - k)
    lambda^k``; with ``t = lambda - 1`` it reads ``binom(K, k) / 2^K (1 - t)^(K - k)
    (1 + t)^k``. The map is exact (interpolation at ``K + 1`` Chebyshev nodes of a degree-
    ``K`` polynomial), and well conditioned: Bernstein values on the nodes lie in
    ``[0, 1]`` and the interpolation matrix has norm at most 2.

    Shapes:
        output ``(K + 1, K + 1)``, float64: ``chebyshev = matrix @ bernstein``.
    """
    t = chebyshev_nodes(K).unsqueeze(-1)
    k = torch.arange(K + 1, dtype=torch.float64)
    binom = torch.tensor([math.comb(K, int(i)) for i in k], dtype=torch.float64)
    values = binom / 2.0**K * (1 - t) ** (K - k) * (1 + t) ** k  # (node j, basis k)
    return chebyshev_interpolation_matrix(K) @ values
