"""Spectral functions of symmetric matrices with a Daleckii-Krein backward.

For a symmetric ``X = Q diag(lam) Q^T`` and a scalar function ``g`` (here ``g = f``
composed with an optional eigenvalue floor), ``g(X) = Q diag(g(lam)) Q^T``. Its
Frechet derivative is the Daleckii-Krein formula

    Dg(X)[E] = Q (G o (Q^T E Q)) Q^T,      G_ij = g[lam_i, lam_j]

with ``G`` the Loewner matrix of first divided differences (``g'(lam_i)`` on the
diagonal), and its second derivative uses second divided differences:

    (Q^T D^2g(X)[E, H] Q)_ij = sum_k g[lam_i, lam_k, lam_j] (E'_ik H'_kj + H'_ik E'_kj).

Both are computed from the one eigendecomposition of the forward pass. Divided
differences of nearly tied eigenvalues switch to derivatives at a dtype-aware relative
gap (:func:`torsion._dtypes.tie_tolerance`), or at any gap ``eigh`` cannot resolve (see
:func:`_tie_threshold`), so gradients stay finite and exact when eigenvalues repeat. The
second derivative is assembled from batched matrix products (no ``n^3`` tensor), see
:func:`_second_frechet_in_eigenbasis`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from torsion._dtypes import eigenvalue_floor, symmetry_tolerance, tie_tolerance

__all__ = [
    "sym_clampm",
    "sym_expm",
    "sym_funcm",
    "sym_invsqrtm",
    "sym_logm",
    "sym_powm",
    "sym_sqrtm",
]

ScalarFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class _SpectralFunction:
    """A scalar function applied to eigenvalues, with what its derivatives need.

    The function actually applied is ``g = f o clamp``, where ``clamp`` raises eigenvalues
    to a floor (none by default).

    Attributes:
        f, df, d2f: the function and its first and second derivatives (elementwise).
        divided_difference: optional exact ``g[a, b]`` for ``a > b``, given the gap
            ``a - b`` and the clamped eigenvalues ``ca, cb`` (broadcast); its value where
            ``a <= b`` is ignored.
            Without it, a difference quotient is used, with the trapezoid rule on
            derivatives for ties (gaps up to :func:`_tie_threshold`).
        floor: absolute lower clamp on eigenvalues before ``f`` (ReEig's ``eps``).
        resolution_floor: also clamp at ``eps(dtype) * lambda_max``, the resolution of
            ``eigh``; used by logarithms and roots so they never see a non-positive value.
    """

    f: ScalarFn
    df: ScalarFn
    d2f: ScalarFn | None = None
    divided_difference: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None
    floor: float | None = None
    resolution_floor: bool = False


# ---------------------------------------------------------------------------------------
# Divided differences
# ---------------------------------------------------------------------------------------


def _clamped(fn: _SpectralFunction, lam: Tensor) -> Tensor:
    """Eigenvalues raised to the function's floor, if it has one (``eigh`` sorts ascending)."""
    if fn.resolution_floor:
        tiny = torch.finfo(lam.dtype).tiny
        floor = (eigenvalue_floor(lam.dtype) * lam[..., -1:]).clamp_min(max(tiny, fn.floor or 0.0))
        return torch.maximum(lam, floor)
    return lam if fn.floor is None else lam.clamp_min(fn.floor)


def _slopes(fn: _SpectralFunction, lam: Tensor, clamped: Tensor) -> Tensor:
    """``g'`` at each eigenvalue: ``f'`` where the clamp is inactive, zero where it holds."""
    return torch.where(clamped == lam, fn.df(clamped), 0.0)


# Eigenvalue gaps up to this many times the resolution of ``eigh`` count as ties.
_RESOLUTION_TIES = 64.0


def _tie_threshold(lam: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Largest gap ``|a - b|`` treated as a tie, for pairs ``a, b`` of eigenvalues ``lam``.

    The relative gap :func:`torsion._dtypes.tie_tolerance` of ``max(|a|, |b|)``, but never
    below ``64 eps max_k |lam_k|``: ``eigh`` resolves eigenvalues only to about
    ``eps max_k |lam_k|`` (:func:`torsion._dtypes.eigenvalue_floor`), so a cluster at zero
    comes out as rounding noise of either sign (``+-1e-17`` next to an eigenvalue 1), whose
    relative gap is large although the gap itself is noise. Dividing rounding errors by
    it put second derivatives of ``expm`` at a rank-one matrix off by up to 4000 %.
    """
    resolution = _RESOLUTION_TIES * eigenvalue_floor(lam.dtype) * lam.abs().amax(dim=-1)
    relative = tie_tolerance(lam.dtype) * torch.maximum(a.abs(), b.abs())
    return torch.maximum(relative, resolution[..., None, None])


def _loewner(fn: _SpectralFunction, lam: Tensor, weight: float = 1.0) -> Tensor:
    """``weight`` times the Loewner matrix ``G_ij = g[lam_i, lam_j]`` (``g'(lam_i)`` on ties).

    Shape ``(..., n, n)`` from ascending eigenvalues ``lam`` of shape ``(..., n)``.
    Numerators use clamped eigenvalues and denominators raw ones, which is exactly the
    chain rule ``g[a, b] = f[c(a), c(b)] c[a, b]`` of divided differences. The weight is
    folded into the eigenvalue vectors, so it costs no pass over the matrix. Only the
    lower triangle (``lam_i >= lam_j``) is evaluated and then mirrored, so divided
    differences may assume ``a >= b``; divisions by an exact zero gap produce values
    that ``where`` discards.
    """
    clamped = _clamped(fn, lam)
    slopes = weight * _slopes(fn, lam, clamped)
    # Broadcast ops on small matrices are several times slower than contiguous ones, so
    # broadcast once into ``gap`` and stay contiguous after that where possible.
    scaled = lam / weight
    a, b = scaled[..., :, None], scaled[..., None, :]
    gap = a - b
    tied = gap == 0
    if fn.divided_difference is not None:
        ca, cb = clamped[..., :, None], clamped[..., None, :]
        loewner = fn.divided_difference(gap, ca, cb)
    else:
        values = fn.f(clamped)
        quotient = (values[..., :, None] - values[..., None, :]) / gap
        trapezoid = (slopes[..., :, None] + slopes[..., None, :]) / 2
        near = gap.abs() <= _tie_threshold(scaled, a, b)
        loewner = torch.where(near, trapezoid, quotient)
    loewner = torch.where(tied, slopes[..., :, None], loewner)
    n = lam.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool, device=lam.device).tril()
    return torch.where(lower, loewner, loewner.mT)


def _second_derivative(fn: _SpectralFunction, lam: Tensor) -> Tensor:
    """``g''`` at ``lam`` (zero where the clamp holds)."""
    if fn.d2f is None:
        raise RuntimeError(
            "the second derivative of this matrix function needs d2f; "
            "pass d2f= to sym_funcm to differentiate it twice"
        )
    clamped = _clamped(fn, lam)
    return torch.where(clamped == lam, fn.d2f(clamped), 0.0)


# ---------------------------------------------------------------------------------------
# Frechet derivatives in the eigenbasis
# ---------------------------------------------------------------------------------------


def _sym(a: Tensor) -> Tensor:
    return (a + a.mT) / 2


def _to_eigenbasis(q: Tensor, e: Tensor) -> Tensor:
    return q.mT @ e @ q


def _from_eigenbasis(q: Tensor, e: Tensor) -> Tensor:
    return q @ e @ q.mT


def _second_frechet_in_eigenbasis(
    fn: _SpectralFunction, lam: Tensor, loewner: Tensor, e: Tensor, h: Tensor
) -> Tensor:
    """``Q^T D^2g(X)[E, H] Q`` from ``E' = Q^T E Q`` and ``H' = Q^T H Q`` (both symmetric).

    Entry ``ij`` is ``sum_k g[i, k, j] (E'_ik H'_kj + H'_ik E'_kj)``. The second divided
    difference is written with whichever eigenvalue gap is safe to divide by:

    * ``i, j`` apart: ``g[i, k, j] = (G_ik - G_kj) / (lam_i - lam_j)`` for every ``k``,
      so the sum over ``k`` is four matrix products divided by ``lam_i - lam_j``;
    * ``i, j`` tied, ``k`` apart from ``i``: ``g[i, j, k] = (G_ij - G_kj) / (lam_i - lam_k)``;
    * all three tied: ``g''(mid) / 2``.

    Every branch is a product of ``n x n`` matrices, so memory stays ``O(n^2)``.
    """
    li, lj = lam[..., :, None], lam[..., None, :]
    gap = li - lj
    tied = gap.abs() <= _tie_threshold(lam, li, lj)
    ge, gh = loewner * e, loewner * h

    # e, h, G symmetric: h @ (G o e) = ((G o e) @ h)^T, so two products serve four terms.
    skew = ge @ h + gh @ e
    apart = (skew - skew.mT) / gap  # where() below drops tied entries

    inverse_gap = torch.where(tied, 0.0, 1.0 / gap)  # D_ik: k apart from i
    half_curvature = torch.where(tied, _second_derivative(fn, (li + lj) / 2) / 2, 0.0)
    de, dh = inverse_gap * e, inverse_gap * h
    ce, ch = half_curvature * e, half_curvature * h
    close = loewner * (de @ h + dh @ e) - (de @ gh + dh @ ge) + (ce @ h + ch @ e)

    return _sym(torch.where(tied, close, apart))


def _frechet(fn: _SpectralFunction, lam: Tensor, q: Tensor, e: Tensor) -> Tensor:
    """``Dg(X)[E] = Q (G o Q^T sym(E) Q) Q^T``; self-adjoint, so it is also the backward.

    ``sym(E) = (E + E^T) / 2`` with the half folded into the Loewner matrix.
    """
    return _from_eigenbasis(q, _loewner(fn, lam, 0.5) * _to_eigenbasis(q, e + e.mT))


def _second_frechet(fn: _SpectralFunction, lam: Tensor, q: Tensor, e: Tensor, h: Tensor) -> Tensor:
    e_, h_ = _to_eigenbasis(q, _sym(e)), _to_eigenbasis(q, _sym(h))
    return _from_eigenbasis(q, _second_frechet_in_eigenbasis(fn, lam, _loewner(fn, lam), e_, h_))


class _FrechetDerivative(torch.autograd.Function):
    """``(x, E) -> Dg(x)[E]``, the backward of :class:`_SpectralApply`, made differentiable.

    Its backward gives second derivatives (double backward, Hessian-vector products). The
    gradient in ``E`` is this same operator (``Dg(x)`` is self-adjoint), so it stays
    differentiable to any order in ``E``; the gradient in ``x`` is ``D^2 g(x)[E, .]``,
    and differentiating that once more (a third derivative in ``x``) raises.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, lam: Tensor, q: Tensor, e: Tensor, fn: _SpectralFunction) -> Tensor:
        return _frechet(fn, lam, q, e)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, lam, q, e, fn = inputs
        ctx.save_for_backward(x, lam, q, e)
        ctx.save_for_forward(x, lam, q, e)
        ctx.fn = fn

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, lam, q, e = ctx.saved_tensors
        grad_x = grad_e = None
        if ctx.needs_input_grad[0]:
            grad_x = _second_derivative_in_x(ctx.fn, x, lam, q, e, grad)
        if ctx.needs_input_grad[3]:
            if torch.is_grad_enabled():
                grad_e = _frechet_derivative_function().apply(x, lam, q, grad, ctx.fn)
            else:
                grad_e = _frechet(ctx.fn, lam, q, grad)
        return grad_x, None, None, grad_e, None


_THIRD_ORDER = (
    "third derivatives of torsion.linalg matrix functions with respect to the matrix are "
    "not implemented"
)


class _SecondFrechet(torch.autograd.Function):
    """``(x, E, H) -> D^2 g(x)[E, H]``: the last derivative implemented.

    Differentiating it again, in reverse or forward mode, would need third divided
    differences, so both raise (naming the problem) instead of silently giving zero: it is
    a function of ``x`` through ``lam, Q``, which carry no derivatives. A Function rather
    than autograd's ``DelayedError`` node, which ``torch.func.vmap`` (``jacrev`` of a
    gradient) cannot run, and which guarded reverse mode only.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, lam: Tensor, q: Tensor, e: Tensor, h: Tensor, fn: _SpectralFunction
    ) -> Tensor:
        return _second_frechet(fn, lam, q, e, h)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_THIRD_ORDER)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_THIRD_ORDER)


def _second_derivative_in_x(
    fn: _SpectralFunction, x: Tensor, lam: Tensor, q: Tensor, e: Tensor, h: Tensor
) -> Tensor:
    """``D^2 g(x)[E, H]``, behind :class:`_SecondFrechet` when a graph is being recorded."""
    if not torch.is_grad_enabled():
        return _second_frechet(fn, lam, q, e, h)
    return _SecondFrechet.apply(x, lam, q, e, h, fn)


class _SpectralApply(torch.autograd.Function):
    """``x -> (g(x), lam, Q)`` with the Daleckii-Krein backward (``lam, Q`` not differentiable)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, fn: _SpectralFunction):
        # eigh of x + x^T halves to that of sym(x) on the eigenvalue vector, saving a pass.
        twice_lam, q = torch.linalg.eigh(x + x.mT)
        lam = twice_lam / 2
        values = fn.f(_clamped(fn, lam))
        return (q * values[..., None, :]) @ q.mT, lam, q

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, fn = inputs
        _, lam, q = output
        ctx.mark_non_differentiable(lam, q)
        ctx.save_for_backward(x, lam, q)
        ctx.save_for_forward(x, lam, q)
        ctx.fn = fn

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_lam, _grad_q):
        x, lam, q = ctx.saved_tensors
        if not torch.is_grad_enabled():  # plain backward: no graph to record
            return _frechet(ctx.fn, lam, q, grad), None
        return _frechet_derivative_function().apply(x, lam, q, grad, ctx.fn), None


# Dynamo cannot trace an autograd.Function that defines ``jvp``, while torch.func's
# forward mode (forward-over-reverse Hessian products) needs one. So each Function comes
# twice: as above for torch.compile, and with ``jvp`` for eager mode.


class _FrechetDerivativeWithJvp(_FrechetDerivative):
    @staticmethod
    def jvp(ctx, x_t, lam_t, q_t, e_t, fn_t):
        x, lam, q, e = ctx.saved_tensors
        out = torch.zeros_like(e)
        if x_t is not None:
            out = out + _SecondFrechet.apply(x, lam, q, e, x_t, ctx.fn)
        if e_t is not None:
            out = out + _FrechetDerivativeWithJvp.apply(x, lam, q, e_t, ctx.fn)
        return out


class _SpectralApplyWithJvp(_SpectralApply):
    @staticmethod
    def jvp(ctx, x_t, _fn_t):
        # Through the Frechet Function, not its formula: an enclosing forward or reverse
        # level then differentiates the tangent in x as well (forward-over-forward,
        # reverse-over-forward), where lam and Q alone carry no derivatives (it was 0).
        x, lam, q = ctx.saved_tensors
        return _FrechetDerivativeWithJvp.apply(x, lam, q, x_t, ctx.fn), None, None


def _frechet_derivative_function() -> type[_FrechetDerivative]:
    return _FrechetDerivative if torch.compiler.is_compiling() else _FrechetDerivativeWithJvp


def _spectral_apply_function() -> type[_SpectralApply]:
    return _SpectralApply if torch.compiler.is_compiling() else _SpectralApplyWithJvp


# ---------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------


def _validate(x: Tensor, name: str, check: bool) -> None:
    """Cheap checks always (type, dtype, shape); value checks only when ``check`` is set."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} expects a float32 or float64 tensor, got dtype {x.dtype}")
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"{name} expects a batch of square matrices of shape (..., n, n), "
            f"got shape {tuple(x.shape)}"
        )
    if check and x.numel() > 0:
        finite = torch.isfinite(x).all(dim=(-2, -1))
        if not bool(finite.all()):
            raise ValueError(
                f"{name} expects finite matrices; {int((~finite).sum())} of "
                f"{finite.numel()} have NaN or infinite entries"
            )
        asymmetry = (x - x.mT).abs().amax(dim=(-2, -1))
        scale = x.abs().amax(dim=(-2, -1))
        bad = asymmetry > symmetry_tolerance(x.dtype) * scale
        if bool(bad.any()):
            worst = (asymmetry / scale.clamp_min(torch.finfo(x.dtype).tiny)).max()
            raise ValueError(
                f"{name} expects symmetric matrices; {int(bad.sum())} of "
                f"{bad.numel()} are not (worst relative asymmetry {float(worst):.3g})"
            )


def _check_positive(lam: Tensor, name: str) -> None:
    if lam.numel() > 0 and bool((lam[..., 0] <= 0).any()):
        count = int((lam[..., 0] <= 0).sum())
        raise ValueError(
            f"{name} expects symmetric positive definite matrices; {count} of "
            f"{lam[..., 0].numel()} have a non-positive eigenvalue "
            f"(smallest {float(lam[..., 0].min()):.3g})"
        )


def _apply(x: Tensor, fn: _SpectralFunction, name: str, check: bool, positive: bool) -> Tensor:
    _validate(x, name, check)
    y, lam, _ = _spectral_apply_function().apply(x, fn)
    if check and positive:
        _check_positive(lam, name)
    return y


# ---------------------------------------------------------------------------------------
# The functions
# ---------------------------------------------------------------------------------------


# Exact divided differences g[a, b] for a > b, given the gap a - b and the clamped
# eigenvalues ca >= cb (clamping is monotone). Each avoids the cancellation of
# (f(a) - f(b)) / (a - b) at nearby a, b.


def _log_divided_difference(gap: Tensor, ca: Tensor, cb: Tensor) -> Tensor:
    # log(ca / cb) / (a - b) = log1p((ca - cb) / cb) / (a - b), accurate at any gap.
    return torch.log1p((ca - cb) / cb).div_(gap)


def _exp_divided_difference(gap: Tensor, ca: Tensor, cb: Tensor) -> Tensor:
    # exp(ca) (1 - exp(cb - ca)) / (a - b): finite wherever exp(ca) is (expm1(ca - cb)
    # exp(cb) overflowed once ca - cb passed 88.7 in float32, 709.8 in float64)
    return torch.expm1(cb - ca).neg_().mul_(torch.exp(ca)).div_(gap)


def _sqrt_divided_difference(gap: Tensor, ca: Tensor, cb: Tensor) -> Tensor:
    # (sqrt(ca) - sqrt(cb)) / (a - b) = (ca - cb) / ((sqrt(ca) + sqrt(cb)) (a - b))
    return (ca - cb).div_(ca.sqrt() + cb.sqrt()).div_(gap)


def _invsqrt_divided_difference(gap: Tensor, ca: Tensor, cb: Tensor) -> Tensor:
    ra, rb = ca.sqrt(), cb.sqrt()
    return (cb - ca).div_((ra * rb) * (ra + rb)).div_(gap)


def _identity_divided_difference(gap: Tensor, ca: Tensor, cb: Tensor) -> Tensor:
    return (ca - cb).div_(gap)


_LOG = _SpectralFunction(
    f=torch.log,
    df=torch.reciprocal,
    d2f=lambda t: -1 / t**2,
    divided_difference=_log_divided_difference,
    resolution_floor=True,
)
_EXP = _SpectralFunction(
    f=torch.exp, df=torch.exp, d2f=torch.exp, divided_difference=_exp_divided_difference
)
_SQRT = _SpectralFunction(
    f=torch.sqrt,
    df=lambda t: 0.5 / t.sqrt(),
    d2f=lambda t: -0.25 / t**1.5,
    divided_difference=_sqrt_divided_difference,
    resolution_floor=True,
)
_INVSQRT = _SpectralFunction(
    f=torch.rsqrt,
    df=lambda t: -0.5 / t**1.5,
    d2f=lambda t: 0.75 / t**2.5,
    divided_difference=_invsqrt_divided_difference,
    resolution_floor=True,
)


def _power(p: float) -> _SpectralFunction:
    def divided_difference(gap: Tensor, ca: Tensor, cb: Tensor) -> Tensor:
        # Factor out the larger power, so the result is finite wherever ca^p and cb^p are
        # (cb^p expm1(p log(ca / cb)) overflowed once p log(ca / cb) passed log(max float):
        # p = 10 at a condition number 1e4 in float32). With r = log(ca / cb) >= 0:
        # p > 0: ca^p - cb^p = -ca^p expm1(-p r);  p < 0: ca^p - cb^p = cb^p expm1(p r).
        ratio = torch.log1p((ca - cb) / cb)
        if p > 0:
            return ratio.mul_(-p).expm1_().neg_().mul_(ca**p).div_(gap)
        return ratio.mul_(p).expm1_().mul_(cb**p).div_(gap)

    return _SpectralFunction(
        f=lambda t: t**p,
        df=lambda t: p * t ** (p - 1),
        d2f=lambda t: p * (p - 1) * t ** (p - 2),
        divided_difference=divided_difference,
        resolution_floor=True,
    )


def sym_funcm(
    x: Tensor,
    f: ScalarFn,
    df: ScalarFn,
    d2f: ScalarFn | None = None,
    *,
    check: bool = False,
) -> Tensor:
    """Apply a scalar function to the eigenvalues of symmetric matrices.

    Computes ``Q diag(f(lam)) Q^T`` from one ``eigh`` of the symmetric part of ``x``, with
    the Daleckii-Krein (Loewner matrix) backward. Near-tied eigenvalues (relative gap
    below ``eps(dtype) ** (1/3)``, or gap below ``64 eps max|lambda|``, what ``eigh``
    cannot resolve) use the mean derivative ``(df(a) + df(b)) / 2`` instead of a
    difference quotient, so gradients stay finite and exact at repeated eigenvalues.

    Args:
        x: symmetric matrices. Only the symmetric part ``(x + x^T) / 2`` is read.
        f: elementwise function of the eigenvalues.
        df: its derivative, used for the backward.
        d2f: its second derivative; needed only to differentiate twice (double backward,
            Hessian-vector products, forward-over-reverse). Without it, a second
            derivative raises ``RuntimeError``.
        check: verify that ``x`` is finite and symmetric (a host sync; off by default).

    Returns:
        ``f(x)``, symmetric, with the shape of ``x``.

    Shapes:
        ``x``: ``(..., n, n)``; output: ``(..., n, n)``.

    Raises:
        ValueError: on a non-square or non-float input, or (with ``check=True``) a
            non-symmetric one.

    Example:
        >>> x = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
        >>> sym_funcm(x, torch.sqrt, lambda t: 0.5 / t.sqrt()).diagonal()
        tensor([1., 2.], dtype=torch.float64)
    """
    return _apply(x, _SpectralFunction(f=f, df=df, d2f=d2f), "sym_funcm", check, False)


def sym_logm(x: Tensor, *, check: bool = False) -> Tensor:
    """Matrix logarithm of symmetric positive definite matrices.

    Eigenvalues below ``eps(dtype) * lambda_max`` (what ``eigh`` cannot resolve) are
    clamped to that floor, so near-singular input gives large but finite values rather
    than NaN; the clamped directions get zero gradient. Divided differences use the
    cancellation-free form ``log1p((b - a) / a) / (b - a)``.

    Args:
        x: SPD matrices.
        check: raise ``ValueError`` if ``x`` is not symmetric or has a non-positive
            eigenvalue (a host sync; off by default so hot paths stay sync-free).

    Shapes:
        ``x``: ``(..., n, n)``; output: ``(..., n, n)``.

    Example:
        >>> x = torch.diag(torch.tensor([1.0, torch.e], dtype=torch.float64))
        >>> sym_logm(x).diagonal()
        tensor([0., 1.], dtype=torch.float64)
    """
    return _apply(x, _LOG, "sym_logm", check, True)


def sym_expm(x: Tensor, *, check: bool = False) -> Tensor:
    """Matrix exponential of symmetric matrices (the result is SPD).

    Args:
        x: symmetric matrices.
        check: raise ``ValueError`` if ``x`` is not symmetric (a host sync).

    Shapes:
        ``x``: ``(..., n, n)``; output: ``(..., n, n)``.

    Example:
        >>> sym_expm(torch.zeros(2, 2, dtype=torch.float64))
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.float64)
    """
    return _apply(x, _EXP, "sym_expm", check, False)


def sym_sqrtm(x: Tensor, *, check: bool = False) -> Tensor:
    """Principal square root of SPD matrices (eigenvalue floor as in :func:`sym_logm`).

    Shapes:
        ``x``: ``(..., n, n)``; output: ``(..., n, n)``.

    Example:
        >>> x = torch.tensor([[5.0, 4.0], [4.0, 5.0]], dtype=torch.float64)
        >>> sym_sqrtm(x)
        tensor([[2., 1.],
                [1., 2.]], dtype=torch.float64)
    """
    return _apply(x, _SQRT, "sym_sqrtm", check, True)


def sym_invsqrtm(x: Tensor, *, check: bool = False) -> Tensor:
    """Inverse principal square root ``x^(-1/2)`` of SPD matrices.

    Shapes:
        ``x``: ``(..., n, n)``; output: ``(..., n, n)``.

    Example:
        >>> x = torch.diag(torch.tensor([4.0, 0.25], dtype=torch.float64))
        >>> sym_invsqrtm(x).diagonal()
        tensor([0.5000, 2.0000], dtype=torch.float64)
    """
    return _apply(x, _INVSQRT, "sym_invsqrtm", check, True)


def sym_powm(x: Tensor, p: float, *, check: bool = False) -> Tensor:
    """Real power ``x^p`` of SPD matrices (eigenvalue floor as in :func:`sym_logm`).

    Args:
        x: SPD matrices.
        p: the exponent, a Python number.
        check: raise ``ValueError`` on non-symmetric input or a non-positive eigenvalue.

    Shapes:
        ``x``: ``(..., n, n)``; output: ``(..., n, n)``.

    Example:
        >>> x = torch.diag(torch.tensor([2.0, 3.0], dtype=torch.float64))
        >>> sym_powm(x, 2.0).diagonal()
        tensor([4., 9.], dtype=torch.float64)
    """
    if isinstance(p, Tensor) or not isinstance(p, (int, float)):
        raise TypeError(f"sym_powm expects a Python number as exponent, got {type(p).__name__}")
    if not torch.compiler.is_compiling() and not math.isfinite(p):  # p may be symbolic there
        raise ValueError(f"sym_powm expects a finite exponent, got {p}")
    return _apply(x, _power(float(p)), "sym_powm", check, True)


def sym_clampm(x: Tensor, eps: float, *, check: bool = False) -> Tensor:
    """Clamp eigenvalues from below at ``eps``: the ReEig nonlinearity of SPDNet.

    The derivative is one above ``eps`` and zero below it (Huang & Van Gool, 2017).

    Shapes:
        ``x``: ``(..., n, n)``; output: ``(..., n, n)``.

    Example:
        >>> x = torch.diag(torch.tensor([1e-6, 2.0], dtype=torch.float64))
        >>> sym_clampm(x, 1e-4).diagonal()
        tensor([1.0000e-04, 2.0000e+00], dtype=torch.float64)
    """
    if isinstance(eps, Tensor) or not isinstance(eps, (int, float)):
        raise TypeError(f"sym_clampm expects a Python number as eps, got {type(eps).__name__}")
    if not torch.compiler.is_compiling() and not math.isfinite(eps):  # symbolic when compiling
        raise ValueError(f"sym_clampm expects a finite eps, got {eps}")
    fn = _SpectralFunction(
        f=lambda t: t,
        df=torch.ones_like,
        d2f=torch.zeros_like,
        divided_difference=_identity_divided_difference,
        floor=float(eps),
    )
    return _apply(x, fn, "sym_clampm", check, False)
