"""GrNet layers: networks on Grassmann points given by orthonormal bases.

A point of Gr(n, q) enters as an ``n x q`` matrix with orthonormal columns; ``FRMap``
maps it linearly, ``ReOrth`` re-orthonormalises, ``ProjMap`` turns it into its
projection matrix (a basis-independent representation), ``ProjPooling`` averages
projections, and ``OrthMap`` returns to a basis through the top eigenvectors.

Reference: Z. Huang, J. Wu, L. Van Gool, Building deep networks on Grassmann manifolds,
AAAI 2018.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torsion._dtypes import tie_tolerance
from torsion.linalg import qr_unique

__all__ = ["FRMap", "OrthMap", "ProjMap", "ProjPooling", "ReOrth"]


def _check_matrices(x: Tensor, layer: str) -> None:
    if not isinstance(x, Tensor) or x.ndim < 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{layer} expects (..., rows, cols) matrices, got {got}")


class FRMap(nn.Module):
    """Full-rank linear map ``X -> W X`` of ``n x q`` bases, ``W`` of shape ``m x n``.

    ``W`` is a plain parameter, initialised (semi-)orthogonal, so it is full rank at the
    start; :class:`ReOrth` after it restores an orthonormal basis.

    Args:
        in_size: ``n``.
        out_size: ``m``.
        channels: ``None`` for one map; an int ``C`` for ``C`` maps of the same input
            (GrNet's multi-channel FRMap).

    Shapes:
        ``(..., n, q) -> (..., m, q)``, or ``(..., C, m, q)`` with ``channels=C``.
    """

    def __init__(
        self,
        in_size: int,
        out_size: int,
        channels: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        for name, value in [("in_size", in_size), ("out_size", out_size)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FRMap: {name} must be a positive int, got {value!r}")
        if channels is not None and (not isinstance(channels, int) or channels < 1):
            raise ValueError(f"FRMap: channels must be None or a positive int, got {channels!r}")
        self.in_size, self.out_size, self.channels = in_size, out_size, channels
        shape = (out_size, in_size) if channels is None else (channels, out_size, in_size)
        weight = torch.empty(shape, dtype=dtype, device=device)
        for matrix in weight.view(-1, out_size, in_size):
            nn.init.orthogonal_(matrix)
        self.weight = nn.Parameter(weight)

    def forward(self, x: Tensor) -> Tensor:
        _check_matrices(x, "FRMap")
        if x.shape[-2] != self.in_size:
            raise ValueError(f"FRMap expects (..., {self.in_size}, q) input, got {tuple(x.shape)}")
        if self.channels is None:
            return self.weight @ x
        return self.weight @ x.unsqueeze(-3)

    def extra_repr(self) -> str:
        return f"in_size={self.in_size}, out_size={self.out_size}, channels={self.channels}"


class ReOrth(nn.Module):
    """Re-orthonormalisation ``X -> Q`` of the QR decomposition with ``diag(R) > 0``.

    Shapes:
        ``(..., n, q) -> (..., n, q)``, ``n >= q``.
    """

    def forward(self, x: Tensor) -> Tensor:
        _check_matrices(x, "ReOrth")
        return qr_unique(x)[0]


class ProjMap(nn.Module):
    """Projection matrix ``X -> X X^T`` of an orthonormal basis: basis-independent.

    Shapes:
        ``(..., n, q) -> (..., n, n)``.
    """

    def forward(self, x: Tensor) -> Tensor:
        _check_matrices(x, "ProjMap")
        return x @ x.mT


class ProjPooling(nn.Module):
    """Mean of projection matrices over groups of ``kernel_size`` consecutive channels.

    Shapes:
        ``(..., C, n, n) -> (..., C / kernel_size, n, n)``.
    """

    def __init__(self, kernel_size: int):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(
                f"ProjPooling: kernel_size must be a positive int, got {kernel_size!r}"
            )
        self.kernel_size = kernel_size

    def forward(self, x: Tensor) -> Tensor:
        _check_matrices(x, "ProjPooling")
        if x.ndim < 3 or x.shape[-3] % self.kernel_size:
            raise ValueError(
                f"ProjPooling({self.kernel_size}) expects (..., C, n, n) with C divisible by "
                f"{self.kernel_size}, got {tuple(x.shape)}"
            )
        groups = x.shape[-3] // self.kernel_size
        return x.unflatten(-3, (groups, self.kernel_size)).mean(dim=-3)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


class _TopEigenvectors(torch.autograd.Function):
    """Top-``p`` eigenvectors of ``sym(x)`` with the gradient of the *subspace* they span.

    The backward keeps only the motion of the subspace, ``U_r (K * (U_r^T G)) U_p^T``
    with ``K_ij = 1 / (lambda_p_j - lambda_r_i)`` (``U_r`` the other eigenvectors),
    symmetrised. Rotations within the subspace are a gauge: they do not change any
    function of the subspace (such as :class:`ProjMap`), and dropping them keeps the
    gradient finite when eigenvalues inside the top ``p`` repeat. Pairs tied across the
    cut (where the subspace is not unique) get zero weight instead of an infinite one.
    """

    @staticmethod
    def forward(ctx, x: Tensor, p: int) -> Tensor:
        lam, vectors = torch.linalg.eigh((x + x.mT) / 2)
        ctx.p = p
        ctx.save_for_backward(lam, vectors)
        return vectors[..., -p:].flip(-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        lam, vectors = ctx.saved_tensors
        p, n = ctx.p, lam.shape[-1]
        top, lam_top = vectors[..., -p:].flip(-1), lam[..., -p:].flip(-1)
        rest, lam_rest = vectors[..., : n - p], lam[..., : n - p]
        gap = lam_top[..., None, :] - lam_rest[..., :, None]  # (..., n - p, p)
        scale = lam.abs().amax(dim=-1)[..., None, None]
        separated = gap.abs() > tie_tolerance(lam.dtype) * scale
        weight = torch.where(separated, 1 / torch.where(separated, gap, 1), 0)
        dx = rest @ (weight * (rest.mT @ grad)) @ top.mT
        return (dx + dx.mT) / 2, None


class OrthMap(nn.Module):
    """The top-``p`` eigenvectors of a symmetric matrix: back from projections to bases.

    Columns come in descending eigenvalue order. The gradient is that of the spanned
    subspace (see :class:`_TopEigenvectors`): exact for any function of the subspace, such
    as a following :class:`ProjMap`, and finite at repeated eigenvalues.

    Shapes:
        ``(..., n, n) -> (..., n, p)``.
    """

    def __init__(self, p: int):
        super().__init__()
        if not isinstance(p, int) or p < 1:
            raise ValueError(f"OrthMap: p must be a positive int, got {p!r}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        _check_matrices(x, "OrthMap")
        if x.shape[-1] != x.shape[-2] or x.shape[-1] < self.p:
            raise ValueError(
                f"OrthMap({self.p}) expects square (..., n, n) input with n >= {self.p}, "
                f"got {tuple(x.shape)}"
            )
        return _TopEigenvectors.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
