"""Orthonormalization: the building blocks of Stiefel and Grassmann retractions."""

from __future__ import annotations

import torch
from torch import Tensor

from torsion.linalg._spectral import sym_invsqrtm

__all__ = ["cayley_retraction", "polar", "qr_unique"]


def _check_tall(a: Tensor, name: str) -> None:
    if not isinstance(a, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(a).__name__}")
    if a.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} expects a float32 or float64 tensor, got dtype {a.dtype}")
    if a.ndim < 2 or a.shape[-2] < a.shape[-1]:
        raise ValueError(
            f"{name} expects tall matrices of shape (..., n, p) with n >= p, "
            f"got shape {tuple(a.shape)}"
        )


def qr_unique(a: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR decomposition with the sign fixed so that ``R`` has a non-negative diagonal.

    Householder QR determines each column of ``Q`` only up to sign; fixing
    ``diag(R) >= 0`` makes the factorization unique for full-rank ``a``, which makes
    ``qr_unique(a)[0]`` a well-defined retraction ``R_x(u) = qf(x + u)`` on Stiefel.

    Args:
        a: tall matrices.

    Returns:
        ``(Q, R)`` with ``Q^T Q = I``, ``R`` upper triangular, ``Q R = a``.

    Shapes:
        ``a``: ``(..., n, p)`` with ``n >= p``; ``Q``: ``(..., n, p)``; ``R``: ``(..., p, p)``.

    Example:
        >>> q, r = qr_unique(-torch.eye(3, 2, dtype=torch.float64))
        >>> r.diagonal()
        tensor([1., 1.], dtype=torch.float64)
    """
    _check_tall(a, "qr_unique")
    q, r = torch.linalg.qr(a)
    diag = r.diagonal(dim1=-2, dim2=-1)
    sign = torch.ones_like(diag).copysign_(diag)  # +-1 (torch.sign would give 0 at a zero pivot)
    return q * sign[..., None, :], r * sign[..., :, None]


def polar(a: Tensor) -> Tensor:
    """Orthogonal polar factor ``U = a (a^T a)^(-1/2)``: the closest orthonormal matrix to ``a``.

    Computed through :func:`torsion.linalg.sym_invsqrtm`, so its gradient is the stable
    Daleckii-Krein one even when singular values repeat (as at any orthonormal ``a``),
    where autograd through an SVD divides by zero. The forward error grows with
    ``cond(a) ** 2``; retractions call it on ``x + u`` with ``x`` orthonormal, where
    ``cond`` is close to one.

    Shapes:
        ``a``: ``(..., n, p)`` with ``n >= p``; output: ``(..., n, p)``.

    Example:
        >>> polar(torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64))
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.float64)
    """
    _check_tall(a, "polar")
    gram = a.mT @ a
    if a.numel() > 0 and not _gram_is_safe(gram):
        # The polar factor does not depend on the scale, but a^T a under- or overflows
        # beyond about 1e-19 / 1e19 in float32 (1e-154 / 1e154 in float64): rescale a by
        # its largest entry. A pass and a copy of a, so only where the Gram matrix shows
        # the need (always off the CPU and under torch.compile, where reading it costs).
        scale = torch.linalg.vector_norm(a, ord=float("inf"), dim=(-2, -1), keepdim=True)
        a = a / torch.where(scale > 0, scale, 1.0)
        gram = a.mT @ a
    return a @ sym_invsqrtm(gram)


def reads_freely(t: Tensor) -> bool:
    """Whether a value computed from ``t`` can steer Python control flow at no cost: a
    non-empty CPU tensor (no device to wait for) outside ``torch.compile`` tracing and
    outside ``torch.func`` transforms (``vmap`` refuses data-dependent control flow)."""
    return (
        t.numel() > 0
        and t.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def _gram_is_safe(gram: Tensor) -> bool:
    """Whether ``a^T a`` kept its precision: every column norm squared finite and well above
    the dtype's smallest normal number (read on the CPU only; elsewhere ``False``). The
    diagonal bounds the rest, ``|g_ij| <= sqrt(g_ii g_jj)``, and a NaN in ``a`` reaches it."""
    if not reads_freely(gram):
        return False
    info = torch.finfo(gram.dtype)
    norms = gram.diagonal(dim1=-2, dim2=-1)
    return bool(((norms > info.tiny / info.eps) & (norms < info.max)).all())


def cayley_retraction(x: Tensor, u: Tensor) -> Tensor:
    """Cayley retraction on the Stiefel manifold through a ``2p x 2p`` solve.

    With ``P = I - x x^T / 2`` and the skew matrix ``W = (P u) x^T - x (P u)^T``, the
    retraction is ``(I - W/2)^(-1) (I + W/2) x`` (Wen & Yin, 2013). ``W`` has rank
    ``2p``: ``W = A B^T`` with ``A = [P u, x]`` and ``B = [x, -P u]``, so by the
    push-through identity ``(I - W/2)^(-1) W x = A (I - B^T A / 2)^(-1) B^T x`` and only a
    ``2p x 2p`` system is solved, never an ``n x n`` one. For tangent ``u`` (``x^T u`` skew)
    ``W x = u``, so the curve ``t -> R_x(t u)`` leaves ``x`` with velocity ``u``.

    Args:
        x: points with orthonormal columns.
        u: tangent vectors at ``x``.

    Shapes:
        ``x``, ``u``: ``(..., n, p)`` with ``n >= p``; output: ``(..., n, p)``.

    Example:
        >>> x = torch.eye(3, 1, dtype=torch.float64)
        >>> u = torch.tensor([[0.0], [1.0], [0.0]], dtype=torch.float64)
        >>> y = cayley_retraction(x, u)
        >>> torch.allclose(y.mT @ y, torch.ones(1, 1, dtype=torch.float64))
        True
    """
    _check_tall(x, "cayley_retraction")
    if not isinstance(u, Tensor) or u.dtype != x.dtype:
        got = u.dtype if isinstance(u, Tensor) else type(u).__name__
        raise ValueError(f"cayley_retraction expects u with the dtype of x ({x.dtype}), got {got}")
    if u.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"cayley_retraction expects u with the matrix shape of x {tuple(x.shape[-2:])}, "
            f"got {tuple(u.shape[-2:])}"
        )
    pu = u - 0.5 * x @ (x.mT @ u)
    x, pu = torch.broadcast_tensors(x, pu)
    left = torch.cat([pu, x], dim=-1)
    right = torch.cat([x, -pu], dim=-1)
    eye = torch.eye(left.shape[-1], dtype=x.dtype, device=x.device)
    return x + left @ torch.linalg.solve(eye - 0.5 * right.mT @ left, right.mT @ x)
