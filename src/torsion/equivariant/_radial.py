"""Edge embeddings: spherical harmonics of the direction, a Bessel basis of the length."""

from __future__ import annotations

import math
from typing import Any

import torch
from e3nn import o3
from torch import Tensor, nn

__all__ = ["RadialBasis", "SphericalHarmonics", "polynomial_cutoff"]

_SH_NORMALIZATIONS = ("component", "norm", "integral")


#: ``(-1)^k / (2k + 1)!``: the Taylor coefficients of ``sin(x) / x`` in ``x^2``, to ``x^12``
#: (the first term left out, ``x^14 / 15!``, is below float64's rounding for ``|x| < 1/2``).
_SINC_TAYLOR = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(7))


def _sin_over_x(x: Tensor) -> Tensor:
    """``sin(x) / x`` with finite derivatives of every order at ``x = 0``.

    ``torch.sinc``'s second derivative is NaN at 0 (its backward divides by ``x`` behind
    a ``where``). Below ``|x| = 1/2`` the Taylor series is used, a polynomial in ``x^2``;
    above, ``sin(x) / x`` of a denominator that the ``where`` keeps away from zero, whose
    derivatives lose no more than a few ulps to cancellation there.
    """
    small = x.abs() < 0.5
    x2 = x * x
    series = torch.full_like(x, _SINC_TAYLOR[-1])
    for c in reversed(_SINC_TAYLOR[:-1]):
        series = series * x2 + c
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, series, torch.sin(safe) / safe)


def _unit_vectors(vectors: Tensor) -> Tensor:
    """``v / |v|``, and ``0`` for ``v = 0``, with finite derivatives of every order.

    ``torch.nn.functional.normalize`` (e3nn's) divides by ``max(|v|, 1e-12)``: at ``v = 0``
    (a self-loop's edge vector) its derivative is ``1e12`` and its second derivative NaN.
    The two ``where`` keep the zero vector out of the ``rsqrt`` and give it the constant
    direction ``0``, so forces and double backward (force training, Hessians) stay exact.
    """
    squared_norm = (vectors * vectors).sum(-1, keepdim=True)
    nonzero = squared_norm > 0
    inverse_norm = torch.rsqrt(torch.where(nonzero, squared_norm, 1.0))
    return torch.where(nonzero, vectors * inverse_norm, 0.0)


def polynomial_cutoff(r: Tensor, cutoff: float, p: int = 6) -> Tensor:
    """The smooth polynomial envelope of DimeNet (Gasteiger et al. 2020, eq. 8).

    ``u(d) = 1 - (p+1)(p+2)/2 d^p + p(p+2) d^(p+1) - p(p+1)/2 d^(p+2)`` with ``d = r / cutoff``
    for ``d < 1``, and ``0`` beyond. ``u(0) = 1``, and ``u``, ``u'`` and ``u''`` vanish at
    the cutoff, so energies built on it are twice continuously differentiable there.

    Args:
        r: distances ``>= 0``.
        cutoff: the cutoff radius ``> 0``.
        p: the polynomial order (default 6, as in NequIP).

    Returns:
        ``u(r / cutoff)``, same shape as ``r``.

    Example:
        >>> polynomial_cutoff(torch.tensor([0.0, 5.0, 6.0]), cutoff=5.0)
        tensor([1., 0., 0.])
    """
    # The polynomial is exactly 0 at d = 1 (its coefficients sum to 0), so clamping d
    # gives the zero beyond the cutoff with zero derivatives and no overflow for large r.
    d = (r / cutoff).clamp(max=1.0)
    return (
        1.0
        - 0.5 * (p + 1) * (p + 2) * d.pow(p)
        + p * (p + 2) * d.pow(p + 1)
        - 0.5 * p * (p + 1) * d.pow(p + 2)
    )


class RadialBasis(nn.Module):
    """Bessel radial basis with a smooth polynomial cutoff (DimeNet; NequIP's edge embedding).

    ``e_n(r) = sqrt(2 / r_c) sin(f_n r / r_c) / r * u(r)``, ``n = 1..num_basis``, with
    frequencies ``f_n = n pi`` (the zeros of the spherical Bessel function ``j_0`` at the
    cutoff; learnable with ``trainable=True``) and the envelope ``u`` of
    :func:`polynomial_cutoff`. ``sin(x) / r`` is evaluated through a Taylor series near 0,
    so ``r = 0`` gives the finite limit ``sqrt(2 / r_c) f_n / r_c`` and finite derivatives.
    Every basis function and its first two derivatives go to zero at ``r_c``.

    Args:
        num_basis: number of basis functions (default 8).
        cutoff: the cutoff radius ``r_c > 0`` (default 5.0).
        p: order of the envelope polynomial (default 6).
        trainable: learn the frequencies (default ``False``).
        dtype: of the frequencies.
        device: of the frequencies.

    Raises:
        ValueError: for ``num_basis < 1``, ``cutoff <= 0`` or ``p < 2``.

    Shapes:
        ``r``: ``(...)``; output ``(..., num_basis)``.

    Example:
        >>> basis = RadialBasis(num_basis=4, cutoff=3.0)
        >>> basis(torch.tensor([0.5, 3.0])).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        num_basis: int = 8,
        cutoff: float = 5.0,
        p: int = 6,
        *,
        trainable: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_basis, int) or num_basis < 1:
            raise ValueError(f"RadialBasis: num_basis must be an int >= 1, got {num_basis!r}")
        if not (isinstance(cutoff, int | float) and math.isfinite(cutoff) and cutoff > 0):
            raise ValueError(f"RadialBasis: cutoff must be a finite number > 0, got {cutoff!r}")
        if not isinstance(p, int) or p < 2:
            raise ValueError(f"RadialBasis: p must be an int >= 2, got {p!r}")
        self.num_basis, self.cutoff, self.p = num_basis, float(cutoff), p
        frequencies = math.pi * torch.arange(1, num_basis + 1, dtype=dtype, device=device)
        if trainable:
            self.frequencies = nn.Parameter(frequencies)
        else:
            self.register_buffer("frequencies", frequencies)

    def forward(self, r: Tensor) -> Tensor:
        """Embed distances.

        Args:
            r: distances ``(...)``, ``>= 0``.

        Returns:
            ``(..., num_basis)``; zero at and beyond the cutoff.

        Raises:
            TypeError: for a non-floating tensor.
        """
        if not isinstance(r, Tensor) or not r.dtype.is_floating_point:
            raise TypeError(f"RadialBasis: r must be a floating tensor, got {type(r).__name__}")
        r = r.unsqueeze(-1)
        f = self.frequencies.to(r.dtype)
        # sin(f r / rc) / r = (f / rc) sin(x) / x with x = f r / rc: finite at r = 0, and
        # so are its derivatives of every order
        bessel = math.sqrt(2.0 / self.cutoff) * (f / self.cutoff) * _sin_over_x(f * r / self.cutoff)
        return bessel * polynomial_cutoff(r, self.cutoff, self.p)

    def extra_repr(self) -> str:
        return f"num_basis={self.num_basis}, cutoff={self.cutoff}, p={self.p}"


class SphericalHarmonics(nn.Module):
    """Spherical harmonics of vectors: e3nn's ``o3.SphericalHarmonics``, reused.

    ``Y^l(R x) = D^l(R) Y^l(x)``; they are the usual edge attributes of equivariant
    message passing (the irreps ``0e + 1o + 2e + ...`` of
    ``o3.Irreps.spherical_harmonics(lmax)``).

    Args:
        irreps_out: the harmonics to compute, as e3nn takes them: irreps such as
            ``"0e + 1o + 2e"`` (parities must be ``(-1)^l`` for vectors), a list of ``l``, or
            one ``l``.
        normalize: project the input onto the unit sphere first (default ``True``). A zero
            vector (a self-loop's edge vector) gets the direction ``0``, as in e3nn: ``Y^0``
            keeps its constant value and every ``l >= 1`` harmonic is 0, with finite
            derivatives of every order (zero ones), where e3nn's normalization has a
            ``1e12`` first and a NaN second derivative. Vectors shorter than ``1e-12``
            are normalized exactly (e3nn divides them by ``1e-12``).
        normalization: ``"component"`` (default; ``|Y^l|^2 = 2l + 1`` on the sphere, NequIP
            and MACE's choice), ``"norm"`` (``|Y^l| = 1``) or ``"integral"`` (e3nn's default).

    Raises:
        ValueError: for an unknown normalization or irreps of the wrong parity.

    Shapes:
        input ``(..., 3)``, output ``(..., irreps_out.dim)``.

    Example:
        >>> sh = SphericalHarmonics("0e + 1o + 2e")
        >>> sh(torch.tensor([[0.0, 0.0, 2.0]])).shape
        torch.Size([1, 9])
    """

    def __init__(
        self, irreps_out: Any, normalize: bool = True, normalization: str = "component"
    ) -> None:
        super().__init__()
        if normalization not in _SH_NORMALIZATIONS:
            raise ValueError(
                f"SphericalHarmonics: normalization must be one of {_SH_NORMALIZATIONS}, "
                f"got {normalization!r}"
            )
        try:
            # normalized here (_unit_vectors), not by e3nn: see ``normalize``
            self.sh = o3.SphericalHarmonics(irreps_out, False, normalization)
        except (ValueError, AssertionError) as error:
            raise ValueError(
                f"SphericalHarmonics: invalid irreps_out {irreps_out!r}: {error}"
            ) from None
        self.irreps_out = self.sh.irreps_out
        # e3nn takes all-even parities as harmonics of a pseudovector; of an edge vector
        # (a true vector) they are not equivariant under reflections, so refuse them
        wrong = [str(ir) for _, ir in self.irreps_out if ir.p != (-1) ** ir.l]
        if wrong:
            raise ValueError(
                f"SphericalHarmonics: irreps_out {irreps_out!r} has {', '.join(wrong)}; the "
                "harmonics of a vector have parity (-1)^l (0e, 1o, 2e, 3o, ...)"
            )
        self.normalize, self.normalization = normalize, normalization

    def forward(self, vectors: Tensor) -> Tensor:
        """Evaluate the harmonics.

        Args:
            vectors: ``(..., 3)``.

        Returns:
            ``(..., irreps_out.dim)``.

        Raises:
            TypeError: for a non-floating tensor.
            ValueError: if the last dimension is not 3.
        """
        if not isinstance(vectors, Tensor) or not vectors.dtype.is_floating_point:
            raise TypeError("SphericalHarmonics: vectors must be a floating torch.Tensor")
        if vectors.ndim < 1 or vectors.shape[-1] != 3:
            raise ValueError(
                f"SphericalHarmonics: vectors must have shape (..., 3), got {tuple(vectors.shape)}"
            )
        return self.sh(_unit_vectors(vectors) if self.normalize else vectors)

    def extra_repr(self) -> str:
        return (
            f"{self.irreps_out}, normalize={self.normalize}, normalization={self.normalization!r}"
        )
