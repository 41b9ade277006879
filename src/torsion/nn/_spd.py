"""SPDNet layers: bilinear maps on SPD matrices and their eigenvalue nonlinearities.

Inputs are batched over leading dimensions. Every spectral layer goes through
:mod:`torsion.linalg`, so gradients are finite at repeated eigenvalues (the identity
included) and the layers compile without graph breaks. ``check=True`` validates the
input's values (a host synchronisation) and raises ``ValueError`` naming the problem.

References:
- Z. Huang and L. Van Gool, A Riemannian network for SPD matrix learning, AAAI 2017.
- D. Brooks et al., Riemannian batch normalization for SPD neural networks, NeurIPS 2019.
"""

from __future__ import annotations

import math

import geoopt
import torch
from torch import Tensor, nn

from torsion.linalg import sym_clampm, sym_expm, sym_logm, sym_powm
from torsion.manifolds import Stiefel

__all__ = ["BiMap", "CovPool", "ExpEig", "LogEig", "PowEig", "ReEig", "SPDVectorize"]


def _check_square(x: Tensor, size: int | None, layer: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{layer} expects a tensor, got {type(x).__name__}")
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{layer} expects (..., n, n) matrices, got shape {tuple(x.shape)}")
    if size is not None and x.shape[-1] != size:
        raise ValueError(
            f"{layer} expects {size} x {size} matrices, got {x.shape[-1]} x {x.shape[-1]}"
        )


class BiMap(nn.Module):
    """Bilinear map ``X -> W^T X W`` with orthonormal ``W``: SPD ``n x n`` to SPD ``m x m``.

    With channels, output channel ``o`` is ``sum_i W_oi^T X_i W_oi`` (Huang & Van Gool's
    multi-channel BiMap). Each ``W_oi`` is an ``in_size x out_size`` matrix with
    orthonormal columns, a :class:`geoopt.ManifoldParameter` on
    :class:`torsion.manifolds.Stiefel`, so :mod:`torsion.optim` keeps it orthonormal and a
    full-rank SPD input stays SPD.

    Initialisation: Haar-random orthonormal frames (the distribution of the Q factor of a
    Gaussian matrix; SPDNet's "random semi-orthogonal" initialisation), drawn from the
    global RNG like every ``torch.nn`` initialiser.

    Args:
        in_size: ``n``.
        out_size: ``m <= n``.
        in_channels, out_channels: channel counts. With both equal to one the layer maps
            ``(..., n, n) -> (..., m, m)``; otherwise ``(..., in_channels, n, n) ->
            (..., out_channels, m, m)``.
        dtype, device: of the weight.

    Shapes:
        input ``(..., [in_channels,] n, n)``; output ``(..., [out_channels,] m, m)``.
    """

    def __init__(
        self,
        in_size: int,
        out_size: int,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        for name, value in [
            ("in_size", in_size),
            ("out_size", out_size),
            ("in_channels", in_channels),
            ("out_channels", out_channels),
        ]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BiMap: {name} must be a positive int, got {value!r}")
        if out_size > in_size:
            raise ValueError(
                f"BiMap: out_size={out_size} > in_size={in_size} would make the output "
                "rank-deficient (not SPD)"
            )
        self.in_size, self.out_size = in_size, out_size
        self.in_channels, self.out_channels = in_channels, out_channels
        stiefel = Stiefel()
        frames = stiefel.random(
            out_channels, in_channels, in_size, out_size, dtype=dtype, device=device
        )
        self.weight = geoopt.ManifoldParameter(frames, manifold=stiefel)

    @property
    def _channels(self) -> bool:
        return self.in_channels != 1 or self.out_channels != 1

    def forward(self, x: Tensor) -> Tensor:
        _check_square(x, self.in_size, "BiMap")
        w = self.weight
        if x.dtype != w.dtype:
            raise TypeError(f"BiMap has {w.dtype} weights but got {x.dtype} input")
        if not self._channels:
            w = w[0, 0]
            return w.mT @ x @ w
        if x.ndim < 3 or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"BiMap expects (..., {self.in_channels}, n, n) input, got {tuple(x.shape)}"
            )
        # (..., 1, c_in, n, n) against (c_out, c_in, n, m), summed over c_in
        return (w.mT @ x.unsqueeze(-4) @ w).sum(dim=-3)

    def extra_repr(self) -> str:
        return (
            f"in_size={self.in_size}, out_size={self.out_size}, "
            f"in_channels={self.in_channels}, out_channels={self.out_channels}"
        )


class ReEig(nn.Module):
    """Rectified eigenvalues ``U max(Lambda, eps) U^T``: the SPDNet nonlinearity.

    Args:
        eps: the floor, a positive number (SPDNet uses ``1e-4``).
        check: validate that the input is symmetric (a host synchronisation).

    Shapes:
        ``(..., n, n) -> (..., n, n)``.
    """

    def __init__(self, eps: float = 1e-4, *, check: bool = False):
        super().__init__()
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"ReEig: eps must be a positive number, got {eps!r}")
        self.eps, self.check = float(eps), check

    def forward(self, x: Tensor) -> Tensor:
        _check_square(x, None, "ReEig")
        return sym_clampm(x, self.eps, check=self.check)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class LogEig(nn.Module):
    """Matrix logarithm of SPD input: into the (flat) log-Euclidean tangent space.

    Args:
        check: validate symmetry and positive definiteness (a host synchronisation).

    Shapes:
        ``(..., n, n) -> (..., n, n)``.
    """

    def __init__(self, *, check: bool = False):
        super().__init__()
        self.check = check

    def forward(self, x: Tensor) -> Tensor:
        _check_square(x, None, "LogEig")
        return sym_logm(x, check=self.check)


class ExpEig(nn.Module):
    """Matrix exponential of symmetric input: back from the log domain to SPD.

    Shapes:
        ``(..., n, n) -> (..., n, n)``.
    """

    def __init__(self, *, check: bool = False):
        super().__init__()
        self.check = check

    def forward(self, x: Tensor) -> Tensor:
        _check_square(x, None, "ExpEig")
        return sym_expm(x, check=self.check)


class PowEig(nn.Module):
    """Matrix power ``X^p`` of SPD input (``p`` fixed).

    Shapes:
        ``(..., n, n) -> (..., n, n)``.
    """

    def __init__(self, p: float, *, check: bool = False):
        super().__init__()
        if not isinstance(p, (int, float)) or not math.isfinite(p):
            raise ValueError(f"PowEig: p must be a finite number, got {p!r}")
        self.p, self.check = float(p), check

    def forward(self, x: Tensor) -> Tensor:
        _check_square(x, None, "PowEig")
        return sym_powm(x, self.p, check=self.check)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class CovPool(nn.Module):
    """Covariance descriptor with trace-normalised shrinkage, so the output is SPD.

    ``C`` is the sample covariance of ``T`` observations of ``d`` variables (rows are
    variables, as in :func:`torch.cov`); the output is
    ``(1 - shrinkage) C + shrinkage * mu * I`` with ``mu = max(tr(C) / d, eps)``, the
    Ledoit-Wolf target scaled to the average variance. For ``shrinkage > 0`` it is SPD even
    when ``T <= d`` (and ``eps`` keeps it SPD for constant features).

    Args:
        shrinkage: in ``(0, 1]``.
        eps: floor of the average variance ``mu``.

    Shapes:
        ``(..., d, T) -> (..., d, d)``.
    """

    def __init__(self, shrinkage: float = 1e-3, eps: float = 1e-8):
        super().__init__()
        if not (isinstance(shrinkage, (int, float)) and 0 < shrinkage <= 1):
            raise ValueError(f"CovPool: shrinkage must be in (0, 1], got {shrinkage!r}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"CovPool: eps must be a positive number, got {eps!r}")
        self.shrinkage, self.eps = float(shrinkage), float(eps)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim < 2:
            raise ValueError("CovPool expects (..., d, T) features")
        if x.shape[-1] < 2:
            raise ValueError(f"CovPool needs T >= 2 observations, got {x.shape[-1]}")
        centred = x - x.mean(dim=-1, keepdim=True)
        cov = centred @ centred.mT / (x.shape[-1] - 1)
        d = x.shape[-2]
        mu = (cov.diagonal(dim1=-2, dim2=-1).sum(-1) / d).clamp_min(self.eps)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        return (1 - self.shrinkage) * cov + self.shrinkage * mu[..., None, None] * eye

    def extra_repr(self) -> str:
        return f"shrinkage={self.shrinkage}, eps={self.eps}"


class SPDVectorize(nn.Module):
    """Upper triangle of a symmetric matrix, off-diagonals weighted by ``sqrt(2)``.

    The Euclidean norm of the output equals the Frobenius norm of the input, so a linear
    layer after :class:`LogEig` + ``SPDVectorize`` sees the log-Euclidean geometry.

    Shapes:
        ``(..., n, n) -> (..., n (n + 1) / 2)``, rows of the upper triangle in order.
    """

    def forward(self, x: Tensor) -> Tensor:
        _check_square(x, None, "SPDVectorize")
        n = x.shape[-1]
        rows, cols = torch.triu_indices(n, n, device=x.device)
        # sqrt(2) set in x's dtype (a float32 constant would round it for float64 input)
        weight = torch.ones(rows.shape, dtype=x.dtype, device=x.device)
        weight.masked_fill_(rows != cols, math.sqrt(2.0))
        return x[..., rows, cols] * weight
