"""GrNet layers: networks on Grassmann points given by orthonormal bases.

A point of Gr(n, q) enters as an ``n x q`` matrix with orthonormal columns; ``FRMap``
maps it linearly, ``ReOrth`` re-orthonormalises, ``ProjMap`` turns it into its
projection matrix (a basis-independent representation), ``ProjPooling`` averages
projections, and ``OrthMap`` returns to a basis through the top eigenvectors.

Reference: Z. Huang, J. Wu, L. Van Gool, Building deep networks on Grassmann manifolds,
AAAI 2018.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from torsion._dtypes import eigenvalue_floor
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


class _Cut(NamedTuple):
    """An eigendecomposition split at the top ``p``, with the weights of the pairs across."""

    rest: Tensor  # U_r: the other eigenvectors, (..., n, n - p)
    top: Tensor  # U_p: the top eigenvectors in descending order, (..., n, p)
    weight: Tensor  # K_ij = 1 / (lambda_p_j - lambda_r_i), zero where tied, (..., n - p, p)


def _cut(lam: Tensor, q: Tensor, p: int) -> _Cut:
    """Split ``eigh``'s ascending ``lam, Q`` at the top ``p``.

    Only gaps across the cut are ever divided by, and ``1 / gap`` has no cancellation, so
    any gap that ``eigh`` resolves is used as it is. ``eigh`` resolves eigenvalues to
    about ``eps * max|lambda|`` (:func:`torsion._dtypes.eigenvalue_floor`); a pair at most
    ``n`` times that apart is a genuine tie, where the subspace is not unique, and gets
    zero weight instead of an arbitrarily large one.
    """
    n = lam.shape[-1]
    gap = lam[..., n - p :].flip(-1)[..., None, :] - lam[..., : n - p, None]
    resolution = n * eigenvalue_floor(lam.dtype) * lam.abs().amax(dim=-1)[..., None, None]
    resolved = gap > resolution
    weight = torch.where(resolved, 1 / torch.where(resolved, gap, 1), 0)
    return _Cut(q[..., : n - p], q[..., n - p :].flip(-1), weight)


def _sym(a: Tensor) -> Tensor:
    return (a + a.mT) / 2


# The derivatives below are those of the top basis U(x) in the gauge that does not rotate
# within the subspace: U(x) = P(x) U_0 (U_0^T P(x) U_0)^(-1/2), the orthonormal basis of
# the top-p projector P(x) closest to the current one, U_0. It has the subspace and
# eigh's basis at x, so every function of the subspace (such as ProjMap) gets exact
# derivatives of every order, and no gap inside the top p (nor inside the rest) appears.


def _subspace_jvp(cut: _Cut, v: Tensor) -> Tensor:
    """``DU[V] = U_r (K o U_r^T sym(V) U_p)``: the motion of the subspace, ``(..., n, p)``."""
    rest, top, weight = cut
    return rest @ (weight * (rest.mT @ _sym(v) @ top))


def _subspace_vjp(cut: _Cut, g: Tensor) -> Tensor:
    """``DU^*[G] = sym(U_r (K o U_r^T G) U_p^T)``, the adjoint of :func:`_subspace_jvp`."""
    rest, top, weight = cut
    return _sym(rest @ (weight * (rest.mT @ g)) @ top.mT)


def _subspace_hessian(cut: _Cut, g: Tensor, w: Tensor) -> Tensor:
    """``D^2U^*[G, W]``: the gradient in ``x`` of ``<G, D^2U(x)[W, .]>``, symmetric.

    In the eigenbasis, with ``M = K o U_r^T G`` and ``A = K o U_r^T sym(W) U_p`` (the
    rest-by-top block of ``DU[W]``), the second derivative of ``P`` has the second divided
    differences of a step function, which involve only gaps across the cut, and the
    ``-U_0 U_0^T D^2P U_0 / 2`` of the orthonormalisation keeps ``U^T U = I`` to second
    order. Their adjoint has the blocks ``M A^T`` (rest, rest), ``-A^T M`` (top, top) and
    ``K o (W_rr M - M W_tt - A sym(U_p^T G))`` (rest, top).
    """
    rest, top, weight = cut
    w = _sym(w)
    w_top = w @ top
    m = weight * (rest.mT @ g)
    a = weight * (rest.mT @ w_top)
    mixed = weight * ((rest.mT @ w @ rest) @ m - m @ (top.mT @ w_top) - a @ _sym(top.mT @ g))
    z = rest @ (m @ (rest @ a).mT + mixed @ top.mT) - (top @ a.mT) @ (m @ top.mT)
    return _sym(z)


_THIRD_ORDER = "third derivatives of OrthMap are not implemented"


class _SubspaceHessian(torch.autograd.Function):
    """``(x, G, W) -> D^2U^*[G, W]``: the last derivative implemented; differentiating it
    again raises instead of silently missing the terms of a third derivative."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, lam: Tensor, q: Tensor, g: Tensor, w: Tensor, p: int) -> Tensor:
        return _subspace_hessian(_cut(lam, q, p), g, w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_THIRD_ORDER)


def _save_linear_map_inputs(ctx, inputs, output):
    x, lam, q, e, p = inputs
    ctx.save_for_backward(x, lam, q, e)
    ctx.p = p


class _SubspaceJvp(torch.autograd.Function):
    """``(x, V) -> DU(x)[V]``, differentiable in ``x`` and ``V`` (reached from the backward
    of :class:`_SubspaceVjp`): its adjoint in ``V`` is :class:`_SubspaceVjp`."""

    generate_vmap_rule = True
    setup_context = staticmethod(_save_linear_map_inputs)

    @staticmethod
    def forward(x: Tensor, lam: Tensor, q: Tensor, v: Tensor, p: int) -> Tensor:
        return _subspace_jvp(_cut(lam, q, p), v)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, lam, q, v = ctx.saved_tensors
        grad_x = _hessian(x, lam, q, grad, v, ctx.p) if ctx.needs_input_grad[0] else None
        grad_v = _vjp(x, lam, q, grad, ctx.p) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_v, None


class _SubspaceVjp(torch.autograd.Function):
    """``(x, G) -> DU(x)^*[G]``: the backward of :class:`_TopEigenvectors`, made
    differentiable. Its gradient in ``G`` is :class:`_SubspaceJvp`, and in ``x``
    :func:`_subspace_hessian`, so double backward (Hessian-vector products) has every
    term that depends on ``x``."""

    generate_vmap_rule = True
    setup_context = staticmethod(_save_linear_map_inputs)

    @staticmethod
    def forward(x: Tensor, lam: Tensor, q: Tensor, g: Tensor, p: int) -> Tensor:
        return _subspace_vjp(_cut(lam, q, p), g)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, lam, q, g = ctx.saved_tensors
        grad_x = _hessian(x, lam, q, g, grad, ctx.p) if ctx.needs_input_grad[0] else None
        grad_g = _jvp(x, lam, q, grad, ctx.p) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_g, None


# Each derivative is recorded through its Function only while a graph is being built
# (create_graph=True); a plain backward evaluates the formula.


def _jvp(x: Tensor, lam: Tensor, q: Tensor, v: Tensor, p: int) -> Tensor:
    if not torch.is_grad_enabled():
        return _subspace_jvp(_cut(lam, q, p), v)
    return _SubspaceJvp.apply(x, lam, q, v, p)


def _vjp(x: Tensor, lam: Tensor, q: Tensor, g: Tensor, p: int) -> Tensor:
    if not torch.is_grad_enabled():
        return _subspace_vjp(_cut(lam, q, p), g)
    return _SubspaceVjp.apply(x, lam, q, g, p)


def _hessian(x: Tensor, lam: Tensor, q: Tensor, g: Tensor, w: Tensor, p: int) -> Tensor:
    if not torch.is_grad_enabled():
        return _subspace_hessian(_cut(lam, q, p), g, w)
    return _SubspaceHessian.apply(x, lam, q, g, w, p)


class _TopEigenvectors(torch.autograd.Function):
    """Top-``p`` eigenvectors of ``sym(x)`` with the derivatives of the *subspace* they span.

    The backward keeps only the motion of the subspace, ``U_r (K * (U_r^T G)) U_p^T``
    with ``K_ij = 1 / (lambda_p_j - lambda_r_i)`` (``U_r`` the other eigenvectors),
    symmetrised. Rotations within the subspace are a gauge: they do not change any
    function of the subspace (such as :class:`ProjMap`), and dropping them keeps the
    gradient finite when eigenvalues inside the top ``p`` repeat. Pairs tied across the
    cut at ``eigh``'s resolution (where the subspace is not unique, see :func:`_cut`) get
    zero weight instead of an infinite one. The backward is differentiable (see
    :class:`_SubspaceVjp`), so second derivatives of functions of the subspace are exact
    as well; forward mode (``torch.func.jvp``) is not implemented.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, p: int) -> tuple[Tensor, Tensor, Tensor]:
        lam, q = torch.linalg.eigh(_sym(x))
        return q[..., -p:].flip(-1), lam, q

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, p = inputs
        _, lam, q = output
        ctx.mark_non_differentiable(lam, q)
        ctx.save_for_backward(x, lam, q)
        ctx.p = p

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_lam, _grad_q) -> tuple[Tensor, None]:
        x, lam, q = ctx.saved_tensors
        return _vjp(x, lam, q, grad, ctx.p), None


class OrthMap(nn.Module):
    """The top-``p`` eigenvectors of a symmetric matrix: back from projections to bases.

    Columns come in descending eigenvalue order. The gradient is that of the spanned
    subspace (see :class:`_TopEigenvectors`): exact for any function of the subspace, such
    as a following :class:`ProjMap`, and finite at repeated eigenvalues; so are second
    derivatives (double backward, Hessian-vector products).

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
        return _TopEigenvectors.apply(x, self.p)[0]

    def extra_repr(self) -> str:
        return f"p={self.p}"
