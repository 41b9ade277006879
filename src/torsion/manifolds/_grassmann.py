r"""The Grassmann manifold ``Gr(n, p)`` of ``p``-dimensional subspaces of ``R^n``.

A subspace is represented by an ``n x p`` matrix ``X`` with orthonormal columns spanning
it; ``X`` and ``X Q`` (``Q`` orthogonal) represent the same point. Tangent vectors are
horizontal lifts: ``U`` with ``X^T U = 0``, and the lift of the same tangent vector at the
representative ``X Q`` is ``U Q``. The metric is ``<U, V> = tr(U^T V)`` (Edelman, Arias &
Smith 1998; Absil, Mahony & Sepulchre 2004, 2008).

Everything that is a function of the subspaces is invariant under ``X -> X Q``: ``dist``,
``inner`` of correspondingly rotated lifts, the projector ``X X^T`` of ``expmap`` and
``retr``, and ``logmap(X, Y)`` does not depend on the representative of ``Y``.

Matrix functions with a derivative go through :mod:`torsion.linalg` (Daleckii-Krein
backward) or ``eigvalsh``, never through the singular vectors of an SVD, whose gradient is
infinite where singular values repeat (for instance at ``Y = X``). The formulas and their
sources are collected in ``docs/manifolds_stiefel_grassmann.md``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torsion.linalg import matrix_exp, polar, qr_unique, sym_funcm
from torsion.manifolds._matrix import frobenius_inner, sym
from torsion.manifolds._stiefel import (
    _block,
    _eye,
    _geodesic_frame,
    _haar_frames,
    _orthonormal_polar,
    _OrthonormalFrames,
    _size,
)

__all__ = ["Grassmann"]

_RETRACTIONS = ("qr", "polar", "exp")


# ---------------------------------------------------------------------------------------
# arcsin(sqrt(s)) / sqrt(s) and its derivatives, for the logarithm
# ---------------------------------------------------------------------------------------

# arcsin(z) / z = sum_k c_k z^(2k) with c_k = binom(2k, k) / (4^k (2k + 1)); below the
# cutoff the series (12 terms, truncation < 1e-17) replaces closed forms whose derivatives
# cancel catastrophically as s -> 0.
_ASINC_CUTOFF = 0.05
_ASINC = [math.comb(2 * k, k) / (4**k * (2 * k + 1)) for k in range(14)]


def _polynomial(coefficients: list[float], s: Tensor) -> Tensor:
    result = torch.full_like(s, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        result = result * s + c
    return result


def _asinc_parts(s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(small, safe, s)`` in float64: the series mask and ``s`` made safe for closed forms."""
    s = s.to(torch.float64).clamp(0.0, 1.0)
    small = s < _ASINC_CUTOFF
    safe = torch.where(small, 0.5, s).clamp_max(1.0 - torch.finfo(torch.float64).eps)
    return small, safe, s


def _asinc(s: Tensor) -> Tensor:
    """``arcsin(sqrt(s)) / sqrt(s)`` (1 at 0), for ``s`` in ``[0, 1]``."""
    small, _, s64 = _asinc_parts(s)
    safe = torch.where(small, 0.5, s64)
    root = safe.sqrt()
    closed = torch.asin(root) / root
    return torch.where(small, _polynomial(_ASINC, s64), closed).to(s.dtype)


def _asinc_d1(s: Tensor) -> Tensor:
    small, safe, s64 = _asinc_parts(s)
    closed = ((1.0 - safe).rsqrt() - _asinc(safe)) / (2.0 * safe)
    series = _polynomial([k * c for k, c in enumerate(_ASINC)][1:], s64)
    return torch.where(small, series, closed).to(s.dtype)


def _asinc_d2(s: Tensor) -> Tensor:
    small, safe, s64 = _asinc_parts(s)
    closed = (0.5 * (1.0 - safe) ** -1.5 - 3.0 * _asinc_d1(safe)) / (2.0 * safe)
    series = _polynomial([k * (k - 1) * c for k, c in enumerate(_ASINC)][2:], s64)
    return torch.where(small, series, closed).to(s.dtype)


def _procrustes(m: Tensor) -> Tensor:
    """The orthogonal polar factor of the square ``m = y^T x``, accurate near singular ``m``.

    :func:`~torsion.linalg.polar` goes through ``m^T m``, whose small eigenvalues
    ``cos^2 theta`` lose their relative accuracy as the largest principal angle nears
    ``pi/2``: an error ``eps / cos^2 theta_max`` (4e-4 at ``pi/2 - 1e-7``). The value is
    therefore the SVD's ``U V^T`` (error ``eps / cos theta_max``). Where derivatives may be
    taken, they are those of ``polar``, of every order (the same function, whose
    Daleckii-Krein gradient stays finite at repeated singular values, where the SVD's does
    not): ``polar(m)`` plus the detached difference.
    """
    if not _carries_derivatives(m):
        u, _, vh = torch.linalg.svd(m)
        return u @ vh
    smooth = polar(m)
    with torch.no_grad():
        u, _, vh = torch.linalg.svd(m)
        correction = u @ vh - smooth
    return smooth + correction.detach()


def _carries_derivatives(t: Tensor) -> bool:
    """Whether derivatives may be taken through ``t``: it requires grad (in grad mode), is
    a forward-mode dual or a ``torch.func`` transform's tensor, or is being traced by
    ``torch.compile`` (which may differentiate what it traces)."""
    return (
        torch.compiler.is_compiling()
        or (torch.is_grad_enabled() and t.requires_grad)
        or torch._C._functorch.is_functorch_wrapped_tensor(t)
        or torch.autograd.forward_ad.unpack_dual(t).tangent is not None
    )


def _grassmann_log(x: Tensor, y: Tensor) -> Tensor:
    """``Log_x(span y)`` by the stable formula of Bendokat, Zimmermann & Absil (2020).

    Align the representative, ``y* = y polar(y^T x)`` (so ``x^T y*`` is symmetric positive
    semi-definite: the Procrustes step, :func:`_procrustes`), then with
    ``W = (I - x x^T) y* = Q sin(S) R^T`` the logarithm is ``Q S R^T = W f(W^T W)``,
    ``f(s) = arcsin(sqrt(s)) / sqrt(s)``. Using the sines (not ``arctan`` of tangents)
    keeps small angles accurate; writing the SVD as a spectral function of ``W^T W`` keeps
    the gradient finite at repeated angles.
    """
    x, y = torch.broadcast_tensors(x, y)
    aligned = y @ _procrustes(y.mT @ x)
    w = aligned - x @ (x.mT @ aligned)
    return w @ sym_funcm(w.mT @ w, _asinc, _asinc_d1, _asinc_d2)


# ---------------------------------------------------------------------------------------
# Principal angles, for the distance
# ---------------------------------------------------------------------------------------


def _atanc(r: Tensor) -> Tensor:
    """``arctan(sqrt(r)) / sqrt(r)`` (1 at 0) with a finite derivative at 0."""
    small = r < 1e-8
    safe = torch.where(small, 1.0, r)
    root = safe.sqrt()
    return torch.where(small, 1.0 - r / 3.0, torch.atan(root) / root)


def _principal_angles_squared(sin2: Tensor, cos2: Tensor) -> Tensor:
    """``theta^2`` from paired ``sin^2 theta`` and ``cos^2 theta`` (``theta`` in ``[0, pi/2]``).

    ``theta = arctan(sqrt(sin2 / cos2))`` where ``sin2 <= cos2`` (accurate for small
    angles, where ``sin2`` is computed from the small matrix ``(I - x x^T) y``) and
    ``pi/2 - arctan(sqrt(cos2 / sin2))`` otherwise (accurate near ``pi/2``). Written so the
    derivative is finite everywhere, also at ``theta = 0``.
    """
    sin2, cos2 = sin2.clamp_min(0.0), cos2.clamp_min(0.0)
    first = sin2 <= cos2
    numerator = torch.where(first, sin2, cos2)
    denominator = torch.where(first, cos2, sin2)
    ratio = (numerator / torch.where(denominator > 0, denominator, 1.0)).clamp(0.0, 1.0)
    h = _atanc(ratio)
    root = ratio.clamp_min(torch.finfo(ratio.dtype).tiny).sqrt()
    return torch.where(first, ratio * h * h, (0.5 * math.pi - root * h) ** 2)


def _safe_sqrt(squared: Tensor) -> Tensor:
    """``sqrt`` with derivative 0 (not infinity) at 0, where the distance has a kink.

    A NaN stays NaN (``squared * 0``), so non-finite input never comes out as distance 0.
    """
    positive = squared > 0
    return torch.where(positive, torch.where(positive, squared, 1.0).sqrt(), squared * 0.0)


# ---------------------------------------------------------------------------------------
# The manifold
# ---------------------------------------------------------------------------------------


class Grassmann(_OrthonormalFrames):
    r"""Subspaces ``span(X)``, ``X`` an ``n x p`` matrix with orthonormal columns.

    Shape-agnostic (``n >= p`` from the tensors) and batched. Formulas, with the thin SVD
    ``U = Q S R^T`` written as a spectral function of ``U^T U`` wherever it is
    differentiated:

    * ``inner(X, U, V) = tr(U^T V)``; ``proju(X, U) = egrad2rgrad(X, U) = U - X X^T U``
      (horizontal projection);
    * ``projx(X)``: the orthogonal polar factor (the closest orthonormal representative);
    * ``retr``: ``qr`` (``qf(X + U)``), ``polar`` (``polar(X + U)``) or ``exp``. ``qr`` and
      ``polar`` give two representatives of the same subspace ``span(X + U)``, which agrees
      with the geodesic to second order (a second-order retraction);
    * ``expmap(X, U) = X R cos(S) R^T + Q sin(S) R^T`` (Edelman et al. 1998; the
      horizontal geodesic), evaluated as ``[X, U] expm([[0, -U^T U], [I, 0]])[:, :p]``;
    * ``logmap(X, Y)``: Bendokat, Zimmermann & Absil (2020), the inverse of
      ``expmap`` for principal angles below ``pi/2``, independent of the representative
      of ``Y``;
    * ``dist``: the 2-norm of the principal angles, from ``sin^2`` (eigenvalues of
      ``Y^T (I - X X^T) Y``) and ``cos^2`` (of ``Y^T X X^T Y``), each used where it is
      accurate;
    * ``transp(X, Y, V)``: parallel transport along the geodesic from ``X`` to ``Y``
      (``expm(t (D X^T - X D^T)) V`` with ``D = Log_X(Y)``; Edelman et al. 1998),
      expressed at the representative ``Y``; an isometry;
    * ``ehess2rhess = proju(X, H) - U sym(X^T G)``: Absil et al. (2008) write ``U X^T G``,
      the same whenever ``X^T G`` is symmetric, as it is for every ``f(XQ) = f(X)``; the
      symmetrization keeps the operator symmetric (and equal to the second derivative
      along horizontal geodesics) for costs evaluated on a representative;
    * ``random``: uniform (sign-fixed QR of a Gaussian matrix); ``frechet_mean``: Karcher
      flow (inherited); ``dim = p (n - p)``.

    ``geodesic(X, Y, 1)`` is a representative of ``span(Y)``, not necessarily ``Y``.

    Args:
        retraction: ``"qr"`` (default), ``"polar"`` or ``"exp"``.
        check: validate points (orthonormal columns) and tangent vectors (horizontal) on
            every call (a host synchronisation); shapes are always validated.

    Shapes:
        points and tangent vectors ``(..., n, p)`` with ``n >= p``; scalars ``(...)``.

    Example:
        >>> gr = Grassmann()
        >>> x = torch.eye(3, 1, dtype=torch.float64)
        >>> y = torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64) / 2**0.5
        >>> gr.dist(x, y)  # the angle between the two lines: pi / 4
        tensor(0.7854, dtype=torch.float64)
    """

    _point_description = "an orthonormal representative"
    _vector_description = "a horizontal tangent vector"
    _tangent_condition = "horizontal: x^T u"

    ndim = 2
    reversible = False

    def __init__(self, retraction: str = "qr", *, check: bool = False) -> None:
        super().__init__()
        if retraction not in _RETRACTIONS:
            raise ValueError(
                f"Grassmann retraction must be one of {_RETRACTIONS}, got {retraction!r}"
            )
        self.retraction = retraction
        self.check = bool(check)

    @property
    def name(self) -> str:  # geoopt uses it in its messages
        return "Grassmann"

    def extra_repr(self) -> str:
        return f"retraction={self.retraction!r}" + (", check=True" if self.check else "")

    # -- validation ------------------------------------------------------------------------

    def _tangent_residual(self, x, u):
        return x.mT @ u

    # -- metric ------------------------------------------------------------------------------

    def dim(self, shape) -> int:
        """``p (n - p)``."""
        ok, reason = self._check_shape(tuple(shape), "shape")
        if not ok:
            raise ValueError(reason)
        n, p = shape[-2:]
        return p * (n - p)

    def inner(self, x: Tensor, u: Tensor, v: Tensor | None = None, *, keepdim: bool = False):
        """``tr(u^T v)``."""
        self._validate("inner", {"x": x}, {"u": u} if v is None else {"u": u, "v": v})
        return frobenius_inner(u, u if v is None else v, keepdim)

    def norm(self, x: Tensor, u: Tensor, *, keepdim: bool = False) -> Tensor:
        self._validate("norm", {"x": x}, {"u": u})
        return torch.linalg.matrix_norm(u, keepdim=keepdim)

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        """Horizontal projection ``u - x x^T u``."""
        self._validate("proju", {"x": x}, ambient={"u": u})
        return u - x @ (x.mT @ u)

    def egrad2rgrad(self, x: Tensor, u: Tensor) -> Tensor:
        """Horizontal projection of the Euclidean gradient."""
        self._validate("egrad2rgrad", {"x": x}, ambient={"u": u})
        return u - x @ (x.mT @ u)

    def projx(self, x: Tensor) -> Tensor:
        """Closest orthonormal representative: the polar factor ``x (x^T x)^(-1/2)``; for a
        rank-deficient ``x`` an orthonormal completion, as :meth:`Stiefel.projx`."""
        self._validate("projx", {}, ambient={"x": x})
        return _orthonormal_polar(x)

    # -- retraction, exponential, logarithm, distance ---------------------------------------

    def retr(self, x: Tensor, u: Tensor) -> Tensor:
        """The retraction chosen at construction (``qr``, ``polar`` or ``exp``)."""
        self._validate("retr", {"x": x}, {"u": u})
        if self.retraction == "qr":
            return qr_unique(x + u)[0]
        if self.retraction == "polar":
            return polar(x + u)
        return self._exp(x, u)

    @staticmethod
    def _exp(x: Tensor, u: Tensor) -> Tensor:
        x, u = torch.broadcast_tensors(x, u)
        p = x.shape[-1]
        normal, block, _ = _geodesic_frame(x, u, 0.0)
        e = matrix_exp(block)[..., :p]
        return x @ e[..., :p, :] + normal @ e[..., p:, :]

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        """Horizontal geodesic endpoint ``x R cos(S) R^T + Q sin(S) R^T`` (``u = Q S R^T``).

        Of the horizontal part ``u - x x^T u`` for a non-horizontal ``u``. Computed as
        ``[x, u] expm([[0, -u^T u], [I, 0]])[:, :p]`` (a ``2p x 2p`` exponential, smooth in
        ``u``); its columns are orthonormal to rounding.
        """
        self._validate("expmap", {"x": x}, {"u": u})
        return self._exp(x, u)

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        """Horizontal lift at ``x`` of the logarithm of ``span(y)``; see :func:`_grassmann_log`.

        The inverse of :meth:`expmap` while all principal angles are below ``pi/2``; at
        ``pi/2`` (the cut locus) the result is one of several minimizing directions.
        """
        self._validate("logmap", {"x": x, "y": y})
        return _grassmann_log(x, y)

    def dist(self, x: Tensor, y: Tensor, *, keepdim: bool = False) -> Tensor:
        """``||theta||_2`` of the principal angles between ``span(x)`` and ``span(y)``."""
        self._validate("dist", {"x": x, "y": y})
        x, y = torch.broadcast_tensors(x, y)
        xty = x.mT @ y
        w = y - x @ xty
        sin2 = torch.linalg.eigvalsh(sym(w.mT @ w))
        cos2 = torch.linalg.eigvalsh(sym(xty.mT @ xty)).flip(-1)
        distance = _safe_sqrt(_principal_angles_squared(sin2, cos2).sum(dim=-1))
        # eigvalsh of an infinite matrix can return finite angles: report NaN, never a
        # distance, for non-finite input (no host sync)
        finite = torch.isfinite(x).all(dim=(-2, -1)) & torch.isfinite(y).all(dim=(-2, -1))
        distance = torch.where(finite, distance, float("nan"))
        return distance[..., None, None] if keepdim else distance

    def dist2(self, x: Tensor, y: Tensor, *, keepdim: bool = False) -> Tensor:
        return self.dist(x, y, keepdim=keepdim) ** 2

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """Parallel transport of ``v`` from ``x`` to ``y`` along the minimizing geodesic.

        With ``D = Log_x(y)`` and ``Omega = D x^T - x D^T``, the transport is
        ``expm(Omega) v`` at the representative ``expm(Omega) x = expmap(x, D)``. ``Omega``
        leaves ``span(x, D)`` invariant, so ``expm(Omega) v = v + [x, D] phi(K) c`` with the
        ``2p x 2p`` matrix ``K`` of ``Omega`` on that span, ``phi(K) = (expm(K) - I) K^-1``
        (from one ``4p x 4p`` exponential) and ``c = [-D^T v; 0]``. The result is rotated to
        the representative ``y`` and is horizontal there.
        """
        self._validate("transp", {"x": x, "y": y}, {"v": v})
        x, y, v = torch.broadcast_tensors(x, y, v)
        p = x.shape[-1]
        v = v - x @ (x.mT @ v)
        delta = _grassmann_log(x, y)
        normal, block, _ = _geodesic_frame(x, delta, 0.0)
        eye = _eye(2 * p, block).expand_as(block)
        augmented = _block(block, eye, torch.zeros_like(block), torch.zeros_like(block))
        e = matrix_exp(augmented)
        endpoint = e[..., : 2 * p, :p]
        phi = e[..., : 2 * p, 2 * p : 3 * p]
        coefficient = -(delta.mT @ v)
        moved = v + x @ (phi[..., :p, :] @ coefficient) + normal @ (phi[..., p:, :] @ coefficient)
        representative = x @ endpoint[..., :p, :] + normal @ endpoint[..., p:, :]
        moved = moved @ (representative.mT @ y)
        return moved - y @ (y.mT @ moved)

    # -- second order --------------------------------------------------------------------------

    def ehess2rhess(self, x: Tensor, egrad: Tensor, ehess: Tensor, u: Tensor) -> Tensor:
        """``proju(x, ehess) - u sym(x^T egrad)`` (Absil, Mahony & Sepulchre 2008)."""
        self._validate("ehess2rhess", {"x": x}, {"u": u}, ambient={"egrad": egrad, "ehess": ehess})
        return ehess - x @ (x.mT @ ehess) - u @ sym(x.mT @ egrad)

    # -- sampling ----------------------------------------------------------------------------

    def random(
        self,
        *size,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Uniformly distributed subspaces, as Haar-distributed orthonormal representatives.

        Args:
            size: shape ``(..., n, p)`` with ``n >= p``, as integers or one tuple.
            dtype: float32 or float64; the default dtype when omitted.
            device: device of the result (the draw happens on the generator's device).
            generator: source of randomness.
        """
        size = _size(size)
        ok, reason = self._check_shape(size, "size")
        if not ok:
            raise ValueError(f"Grassmann.random: {reason}")
        return _haar_frames("Grassmann", size, dtype, device, generator)
