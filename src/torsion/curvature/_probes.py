"""Curvature probes: eigenvalues, trace, diagonal and spectral density of a symmetric operator.

Every probe is a plain function of an operator and an explicit ``torch.Generator``. The
operator is used structurally (duck typing), so any object with

- ``shape`` -- ``(n, n)``,
- ``dtype`` and ``device``,
- ``matmat(V)`` -- ``(n, k) -> (n, k)``, the product with a block of vectors,

works, and optionally ``unflatten(flat) -> pytree`` (results are then also returned as
parameter pytrees) and ``flatten(pytree) -> flat`` (a pytree warm start is then accepted).
All work happens on the operator's device and dtype; blocks of vectors go through one
``matmat`` call, so a vmapped HVP engine sees them together. No SciPy, no ARPACK.

Host synchronisation: the products and the inner products never synchronise. The only
synchronisations are the stopping tests of :func:`eigsh` (one per Lanczos step: the
residual test and the rank test of the new block) and the estimator choice of
``trace(method="auto")`` (once). Trace, diagonal and spectral-density estimates are
computed without any synchronisation after the argument checks.

Distributed operators (``op.distributed``, e.g. a model operator over data sharded across
:mod:`torch.distributed` ranks): every random block is drawn on rank 0 and broadcast, and
so are the results, so every rank probes the same full-data operator with the same vectors
and returns rank 0's numbers. All ranks must call the same probe with the same arguments.

References:
- K. Wu and H. Simon, Thick-restart Lanczos method for large symmetric eigenvalue
  problems, SIMAX 22 (2000).
- M. F. Hutchinson, A stochastic estimator of the trace of the influence matrix, 1990.
- R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, Hutch++: optimal stochastic trace
  estimation, SOSA 2021.
- E. N. Epperly, J. A. Tropp, R. J. Webber, XTrace: making the most of every sample in
  stochastic trace estimation, SIMAX 45 (2024).
- C. Bekas, E. Kokiopoulou, Y. Saad, An estimator for the diagonal of a matrix, APNUM 2007.
- S. Ubaru, J. Chen, Y. Saad, Fast estimation of tr(f(A)) via stochastic Lanczos
  quadrature, SIMAX 38 (2017).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DiagonalEstimate",
    "EigshResult",
    "TraceEstimate",
    "diagonal",
    "eigsh",
    "slq_quadrature",
    "spectral_density",
    "trace",
]

Which = Literal["LA", "SA", "LM"]
TraceMethod = Literal["auto", "hutchinson", "hutchpp", "xtrace"]

_WHICH = ("LA", "SA", "LM")
_TRACE_METHODS = ("auto", "hutchinson", "hutchpp", "xtrace")
# Largest block handed to one ``matmat`` call by the stochastic estimators; bounds the
# memory of the product while keeping blocks large enough for a vmapped engine.
_CHUNK = 64
_FIRST_SAMPLES = 8  # first block of a sequential trace estimate (rtol)


class EigshResult(NamedTuple):
    """Result of :func:`eigsh`.

    ``eigenvalues`` (k,) and ``eigenvectors`` (n, k) come in the *wanted* order: for
    ``"LA"`` the largest first, for ``"SA"`` the smallest first, for ``"LM"`` the largest
    magnitude first. ``residuals`` (k,) are ``||A y - theta y||`` per pair. ``matvecs`` is
    the number of operator-vector products spent (a block of ``j`` vectors counts ``j``).
    ``eigenvector_trees`` holds one parameter pytree per eigenvector when the operator has
    ``unflatten``, else ``None``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    matvecs: int
    converged: bool
    eigenvector_trees: tuple[Any, ...] | None = None


class TraceEstimate(NamedTuple):
    """Result of :func:`trace`: the estimate, its estimated standard error, the number of
    products spent and the estimator actually used (``"auto"`` is resolved)."""

    estimate: Tensor
    standard_error: Tensor
    matvecs: int
    method: str


class DiagonalEstimate(NamedTuple):
    """Result of :func:`diagonal`: the estimate and its per-entry standard error, both flat
    ``(n,)`` tensors, or parameter pytrees when the operator has ``unflatten``."""

    estimate: Any
    standard_error: Any
    matvecs: int


# --------------------------------------------------------------------------- helpers


def _check_operator(op: Any) -> int:
    for attr in ("shape", "dtype", "device", "matmat"):
        if not hasattr(op, attr):
            raise TypeError(
                f"operator must have 'shape', 'dtype', 'device' and 'matmat'; "
                f"{type(op).__name__} has no {attr!r}"
            )
    shape = tuple(op.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"operator must be square with shape (n, n), got shape {shape}")
    if shape[0] < 1:
        raise ValueError(f"operator must have n >= 1, got shape {shape}")
    if not op.dtype.is_floating_point or op.dtype.is_complex:
        raise TypeError(f"operator must have a real floating dtype, got {op.dtype}")
    return int(shape[0])


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")


def _check_count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _apply(op: Any, x: Tensor) -> Tensor:
    """``op.matmat(x)`` with a shape check that names the problem."""
    y = op.matmat(x)
    if not isinstance(y, Tensor) or y.shape != x.shape:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"op.matmat returned {got} for an input of shape {tuple(x.shape)}")
    return y


def _apply_chunked(op: Any, x: Tensor) -> Tensor:
    if x.shape[1] <= _CHUNK:
        return _apply(op, x)
    return torch.cat([_apply(op, c) for c in x.split(_CHUNK, dim=1)], dim=1)


def _shared(op: Any, x: Tensor) -> Tensor:
    """``x`` on the operator's device; rank 0's value on every rank of a distributed operator.

    Random draws go through here, so every rank probes with the same vectors; results do
    too, because BLAS may round the same products differently in different processes.
    """
    x = x.to(op.device)
    if getattr(op, "distributed", False):
        x = x.contiguous()
        dist.broadcast(x, src=0)
    return x


def _randn(n: int, k: int, op: Any, generator: torch.Generator | None) -> Tensor:
    device = op.device if generator is None else generator.device
    return _shared(op, torch.randn(n, k, dtype=op.dtype, device=device, generator=generator))


def _rademacher(n: int, k: int, op: Any, generator: torch.Generator | None) -> Tensor:
    device = op.device if generator is None else generator.device
    x = torch.randint(0, 2, (n, k), device=device, generator=generator).to(op.dtype)
    return _shared(op, 2 * x - 1)


class _CountingOperator:
    """``op`` with every product counted on a progress bar; everything else delegated."""

    def __init__(self, op: Any, bar: Any):
        self._op, self._bar = op, bar

    def __getattr__(self, name: str) -> Any:
        return getattr(self._op, name)

    def matmat(self, x: Tensor) -> Tensor:
        y = self._op.matmat(x)
        self._bar.update(x.shape[1])
        return y


@contextlib.contextmanager
def _progress(op: Any, enabled: bool, total: int | None, desc: str) -> Iterator[Any]:
    """``op``, or with ``enabled`` a counting view of it behind a tqdm bar of products.

    Only rank 0 of a distributed operator draws the bar. Without tqdm there is no bar and
    a warning says so.
    """
    if getattr(op, "distributed", False) and dist.get_rank() != 0:
        enabled = False
    if not enabled:
        yield op
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("progress=True needs tqdm (pip install tqdm); no bar", stacklevel=3)
        yield op
        return
    bar = tqdm(total=total, desc=desc, unit="matvec")
    try:
        yield _CountingOperator(op, bar)
    finally:
        bar.close()


def _unflatten_or_flat(op: Any, flat: Tensor) -> Any:
    unflatten = getattr(op, "unflatten", None)
    return unflatten(flat) if callable(unflatten) else flat


def _mean_and_standard_error(samples: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Sample mean and ``std / sqrt(m)`` (unbiased variance) along ``dim``; needs m >= 2."""
    m = samples.shape[dim]
    mean = samples.mean(dim=dim)
    var = samples.var(dim=dim, correction=1)
    return mean, (var / m).sqrt()


# --------------------------------------------------------------------------- eigsh


def _wanted_order(theta: Tensor, which: str) -> Tensor:
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _orthonormal_extension(basis: Tensor, x: Tensor, drop: float) -> Tensor:
    """Orthonormal columns spanning the part of ``span(x)`` orthogonal to ``basis``.

    Classical Gram-Schmidt twice ("twice is enough") against ``basis``, then an SVD of the
    (column-normalised) block that drops directions whose new content is below ``drop``.
    The rank test is one host synchronisation.
    """
    norms = torch.linalg.vector_norm(x, dim=0)
    x = x / torch.where(norms > 0, norms, torch.ones_like(norms))
    for _ in range(2):
        x = x - basis @ (basis.mT @ x)
    if x.shape[1] == 1:  # the SVD of one column is its norm: skip LAPACK's tall-skinny path
        s = torch.linalg.vector_norm(x, dim=0)
        u = x / torch.where(s > 0, s, torch.ones_like(s))
    else:
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
    u = u[:, s > drop * max(1.0, x.shape[1]) ** 0.5]
    if u.shape[1] == 0:
        return u
    # ``u`` rescales by 1/s; clean the basis component once more and re-orthonormalise.
    u = u - basis @ (basis.mT @ u)
    if u.shape[1] == 1:
        return u / torch.linalg.vector_norm(u)
    q, _ = torch.linalg.qr(u)
    return q


def _initial_block(
    v0: Any, op: Any, n: int, block: int, generator: torch.Generator | None
) -> Tensor:
    if v0 is None:
        return _randn(n, block, op, generator)
    if isinstance(v0, EigshResult):
        v0 = v0.eigenvectors
    if not isinstance(v0, Tensor):
        flatten = getattr(op, "flatten", None)
        if not callable(flatten):
            raise TypeError(
                "v0 must be a tensor of shape (n,) or (n, j), an EigshResult, or a pytree "
                f"for an operator with 'flatten'; got {type(v0).__name__}"
            )
        v0 = flatten(v0)
    if v0.ndim == 1:
        v0 = v0[:, None]
    if v0.ndim != 2 or v0.shape[0] != n or v0.shape[1] < 1:
        raise ValueError(f"v0 must have shape (n,) or (n, j) with n={n}, got {tuple(v0.shape)}")
    if v0.shape[1] > n:
        raise ValueError(f"v0 has {v0.shape[1]} columns, more than n={n}")
    return v0.to(device=op.device, dtype=op.dtype)


def eigsh(
    op: Any,
    k: int = 1,
    which: Which = "LA",
    *,
    tol: float = 1e-6,
    max_iter: int | None = None,
    v0: Any = None,
    ncv: int | None = None,
    block_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> EigshResult:
    """A few extreme eigenpairs of a symmetric operator by thick-restart block Lanczos.

    The search space is a (block) Krylov space kept orthonormal by full
    reorthogonalisation (classical Gram-Schmidt twice). After every block of products the
    Rayleigh-Ritz problem on the whole space is solved; the next block is the residual
    ``A y - theta y`` of the not yet converged wanted Ritz vectors (for one vector this *is*
    the next Lanczos vector; converged pairs are soft-locked and cost no more products).
    When the space reaches ``ncv`` vectors it is restarted with the ``ncv // 2`` or so most
    wanted Ritz vectors (thick restart), whose products are reused, so restarting costs
    no products.

    Args:
        op: symmetric operator (``shape``, ``dtype``, ``device``, ``matmat``).
        k: number of eigenpairs, ``1 <= k <= n``.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
            magnitude.
        tol: relative residual: a pair is converged when
            ``||A y - theta y|| <= tol * max(|theta|, eps**(1/3) * anorm)`` (``anorm`` the
            largest Ritz magnitude seen, so zero eigenvalues can converge), and never asks
            for less than ``100 * eps * anorm``. The eigenvalue error is then at most
            ``||r||`` and about ``||r||**2 / gap``.
        max_iter: maximum number of block steps (each costs at most ``block_size``
            products); default ``max(100, 10 * n // block_size)`` capped at 10_000.
        v0: warm start: ``(n,)`` or ``(n, j)`` tensor (e.g. the previous eigenvectors), an
            :class:`EigshResult`, or a parameter pytree if ``op`` has ``flatten``. Its ``j``
            columns form the first block.
        ncv: maximum dimension of the search space (default ``max(20, 2 * k + 6 *
            block_size)`` capped at ``n``).
        block_size: new directions per step; default ``k`` (block Lanczos for ``k > 1``),
            which finds eigenvalues of multiplicity up to ``block_size``. ``block_size=1``
            needs fewer products when no eigenvalue is repeated (top-5 of a decaying
            spectrum, n=300: about 23 products against 36-41 with blocks of 5) but, like
            any single-vector Krylov method, sees only one copy of a repeated eigenvalue.
        generator: for the random start (and random refills after an invariant subspace).
        progress: show a tqdm bar of the products spent (when tqdm is installed).

    Returns:
        :class:`EigshResult`. ``converged`` is ``False`` when ``max_iter`` ran out; the
        best current approximations are returned then.

    One host synchronisation per step (the residual test, the rank test of the new block).
    Like every Krylov method (ARPACK included) it cannot see eigenvectors orthogonal to
    the start space; a random start avoids that with probability one.
    """
    n = _check_operator(op)
    _check_generator(generator)
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    _check_count(k, "k", 1)
    if k > n:
        raise ValueError(f"k={k} eigenpairs requested but the operator has dimension n={n}")
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    block = k if block_size is None else _check_count(block_size, "block_size", 1)
    block = min(block, n)
    if ncv is None:
        ncv = min(n, max(20, 2 * k + 6 * block))
    else:
        _check_count(ncv, "ncv", 1)
        if ncv > n:
            raise ValueError(f"ncv={ncv} exceeds the dimension n={n}")
        if ncv < n and ncv < k + block:
            raise ValueError(f"ncv={ncv} must be at least k + block_size = {k + block} (or n)")
    if max_iter is None:
        max_iter = min(10_000, max(100, 10 * n // block))
    else:
        _check_count(max_iter, "max_iter", 1)
    with _progress(op, progress, None, "eigsh") as op:
        # Kept Ritz vectors at a restart: the wanted ones plus about half the rest.
        keep = max(k, min(ncv - block, k + (ncv - k) // 2))

        dtype, device = op.dtype, op.device
        eps = torch.finfo(dtype).eps
        drop = eps**0.5
        basis = torch.zeros(n, 0, dtype=dtype, device=device)
        images = torch.zeros(n, 0, dtype=dtype, device=device)
        proj = torch.zeros(0, 0, dtype=torch.float64, device=device)  # V^T A V
        x = _initial_block(v0, op, n, block, generator)
        matvecs = 0
        converged = False
        anorm = 0.0
        theta_k = y = residual_norms = None

        for _ in range(max_iter):
            x = _orthonormal_extension(basis, x, drop)
            room = n - basis.shape[1]
            if x.shape[1] == 0:
                # The space is invariant but the wanted pairs are not converged: refill randomly.
                x = _orthonormal_extension(basis, _randn(n, min(block, room), op, generator), drop)
            x = x[:, :room]
            if x.shape[1] == 0:
                break
            ax = _apply(op, x)
            matvecs += x.shape[1]
            cross = (basis.mT @ ax).to(torch.float64)
            diag = (x.mT @ ax).to(torch.float64)
            diag = (diag + diag.mT) / 2
            proj = torch.cat(
                [torch.cat([proj, cross], dim=1), torch.cat([cross.mT, diag], dim=1)], dim=0
            )
            basis = torch.cat([basis, x], dim=1)
            images = torch.cat([images, ax], dim=1)

            theta, s = torch.linalg.eigh(proj)
            order = _wanted_order(theta, which)
            sel = order[:k]
            s_k = s[:, sel].to(dtype)
            theta_k = theta[sel].to(dtype)
            y = basis @ s_k
            r = images @ s_k - y * theta_k
            residual_norms = torch.linalg.vector_norm(r, dim=0)

            anorm = max(anorm, float(theta.abs().max()))  # host sync: stopping test
            scale = torch.clamp(theta_k.abs(), min=eps ** (1 / 3) * anorm)
            thresholds = torch.clamp(tol * scale, min=100 * eps * anorm)
            done = residual_norms <= thresholds
            if bool(done.all()) or basis.shape[1] >= n:  # host sync: stopping test
                converged = True
                break

            if basis.shape[1] + block > ncv:  # thick restart: keep the most wanted Ritz vectors
                kept = order[:keep]
                s_keep = s[:, kept].to(dtype)
                basis = basis @ s_keep
                images = images @ s_keep
                proj = torch.diag(theta[kept])
            x = r[:, ~done]
            if x.shape[1] > block:  # compress the residuals to the block's dominant directions
                x = x / torch.linalg.vector_norm(x, dim=0)
                u, _, _ = torch.linalg.svd(x, full_matrices=False)
                x = u[:, :block]

        if y is None:  # pragma: no cover - max_iter >= 1 always runs one step
            raise RuntimeError("eigsh ran no step")
        theta_k, y, residual_norms = (_shared(op, t) for t in (theta_k, y, residual_norms))
        trees = None
        if callable(getattr(op, "unflatten", None)):
            trees = tuple(op.unflatten(y[:, i]) for i in range(k))
        return EigshResult(theta_k, y, residual_norms, matvecs, converged, trees)


# --------------------------------------------------------------------------- trace


def _hutchinson_samples(op: Any, z: Tensor) -> tuple[Tensor, Tensor]:
    az = _apply_chunked(op, z)
    return (z * az).sum(dim=0), az


def _sample_until(
    draw: Callable[[int], Tensor],
    budget: int,
    rtol: float | None,
    samples: Tensor | None = None,
    offset: Tensor | float = 0.0,
) -> tuple[Tensor, Tensor, int]:
    """Mean and standard error of i.i.d. samples ``draw(k)`` (``k`` at a time).

    Without ``rtol`` the whole ``budget`` is drawn in one block. With it, samples come in
    growing blocks (at least :data:`_FIRST_SAMPLES`, then half of those so far), and
    sampling stops once ``standard error <= rtol * |offset + mean|`` (one host sync per
    block) or the budget is spent. ``samples`` are earlier samples to continue from.
    """
    if samples is None:
        samples = draw(budget if rtol is None else min(budget, _FIRST_SAMPLES))
    while samples.shape[0] < budget:
        if rtol is not None:
            mean, se = _mean_and_standard_error(samples)
            if bool(se <= rtol * (offset + mean).abs()):  # host sync: the stopping test
                break
            k = min(budget - samples.shape[0], max(_FIRST_SAMPLES, samples.shape[0] // 2))
        else:
            k = budget - samples.shape[0]
        samples = torch.cat([samples, draw(k)])
    mean, se = _mean_and_standard_error(samples)
    return mean, se, samples.shape[0]


def _rademacher_quadratic_forms(op: Any, n: int, generator, basis: Tensor | None = None):
    """``k -> z_i^T A z_i`` for ``k`` fresh Rademacher ``z_i``, projected off ``basis``."""

    def draw(k: int) -> Tensor:
        z = _rademacher(n, k, op, generator)
        if basis is not None:
            z = z - basis @ (basis.mT @ z)
        return _hutchinson_samples(op, z)[0]

    return draw


def _trace_hutchinson(op: Any, n: int, m: int, generator, rtol=None) -> TraceEstimate:
    draw = _rademacher_quadratic_forms(op, n, generator)
    est, se, spent = _sample_until(draw, m, rtol)
    return TraceEstimate(est, se, spent, "hutchinson")


def _hutchpp_from_sketch(
    op: Any, n: int, sketch_images: Tensor, num_samples: int, generator, spent: int, rtol=None
) -> TraceEstimate:
    """Hutch++ given ``A S`` for a sketch ``S``: exact trace on ``Q = orth(A S)`` plus
    Hutchinson with up to ``num_samples`` fresh Rademacher vectors on
    ``(I - QQ^T) A (I - QQ^T)`` (fewer when ``rtol`` is met first).

    Conditional on ``Q`` the estimate is unbiased, and its only randomness is the deflated
    Hutchinson part, whose sample standard error is returned."""
    q, _ = torch.linalg.qr(sketch_images)
    exact = (q * _apply_chunked(op, q)).sum()
    draw = _rademacher_quadratic_forms(op, n, generator, basis=q)
    mean, se, used = _sample_until(draw, num_samples, rtol, offset=exact)
    return TraceEstimate(exact + mean, se, spent + q.shape[1] + used, "hutchpp")


def _trace_hutchpp(op: Any, n: int, m: int, generator, rtol=None) -> TraceEstimate:
    s = m // 3
    sketch = _rademacher(n, s, op, generator)
    return _hutchpp_from_sketch(op, n, _apply_chunked(op, sketch), m - 2 * s, generator, s, rtol)


def _trace_xtrace(op: Any, n: int, m: int, generator, rtol=None) -> TraceEstimate:
    """XTrace: ``s = m // 2`` test vectors, each left out in turn from the low-rank part.

    With ``Y = A Omega = Q R``, the leave-one-out basis is ``Q_i = Q U_i`` where ``U_i``
    orthonormalises ``R`` without column ``i`` (all in the small ``s``-dimensional space),
    so the ``s`` estimates ``tr(Q_i^T A Q_i) + w_i^T (I - P_i) A (I - P_i) w_i`` need only
    ``A Q`` besides ``A Omega``. Test vectors are Gaussian normalised to length ``sqrt(n)``
    (the paper's "improved" choice). Each estimate is unbiased; the standard error is the
    paper's ``std / sqrt(s)`` of the ``s`` exchangeable estimates.
    """
    s = m // 2
    omega = _randn(n, s, op, generator)
    omega = omega * (n**0.5 / torch.linalg.vector_norm(omega, dim=0))
    y = _apply_chunked(op, omega)
    q, r = torch.linalg.qr(y)
    z = _apply_chunked(op, q)
    h = q.mT @ z
    h = (h + h.mT) / 2
    w = q.mT @ omega  # (s, s): coordinates of the test vectors in span(Q)
    t = z.mT @ omega  # (s, s): (A Q)^T omega_i = Q^T A omega_i
    wy = (omega * y).sum(dim=0)  # omega_i^T A omega_i
    idx = torch.arange(s, device=r.device)
    # R without column i, for every i: (s, s, s - 1)
    others = torch.stack([torch.cat([idx[:i], idx[i + 1 :]]) for i in range(s)])
    r_minus = r[:, others].permute(1, 0, 2)
    u, _ = torch.linalg.qr(r_minus)  # (s, s, s-1), orthonormal columns
    low_rank = torch.einsum("iak,ab,ibk->i", u, h, u)
    w_i = w.mT  # row i is w_i
    c = torch.einsum("iak,ibk,ib->ia", u, u, w_i)  # U_i U_i^T w_i
    t_i = t.mT  # row i is Q^T A omega_i
    r_i = r.mT  # row i is Q^T y_i = R[:, i]
    residual = (
        wy - (t_i * c).sum(dim=1) - (c * r_i).sum(dim=1) + torch.einsum("ia,ab,ib->i", c, h, c)
    )
    est, se = _mean_and_standard_error(low_rank + residual)
    return TraceEstimate(est, se, 2 * s, "xtrace")


def _trace_auto(op: Any, n: int, m: int, generator, rtol=None) -> TraceEstimate:
    """Pilot of ``p = m // 3`` Rademacher products, reused by whichever estimator wins.

    From ``Y = A G`` (``G = [G1, G2]``, halves of the pilot):
    - Hutchinson's per-sample variance ``v_H`` is the sample variance of ``g_i^T y_i``;
    - the Frobenius mass left after deflating a rank-``p/2`` sketch is estimated on the
      held-out half: ``tail = ||(I - Q1 Q1^T) A G2||_F^2 / |G2|`` with ``Q1 = orth(A G1)``.
    Predicted variances at the full budget: Hutchinson ``v_H / m`` (the pilot samples are
    reused, so it still gets ``m`` samples); Hutch++ ``2 tail / (m - 2p)`` (the pilot is its
    sketch, ``p`` products go to ``A Q`` and ``m - 2p`` to deflated Hutchinson samples; the
    true tail after a rank-``p`` sketch is at most the rank-``p/2`` one, and ``2 ||B||_F^2``
    bounds the Rademacher variance, so the rule is conservative towards Hutchinson). The
    smaller prediction wins. Budgets below 12 products always use Hutchinson.

    The Hutch++ branch stays exactly unbiased (its estimate is unbiased given any sketch);
    the Hutchinson branch reuses the pilot samples, a selection effect that is negligible
    whenever the choice is clear-cut.
    """
    if m < 12:
        return _trace_hutchinson(op, n, m, generator, rtol)
    p = m // 3
    pilot, y = _hutchinson_samples(op, _rademacher(n, p, op, generator))
    p1 = p // 2
    q1, _ = torch.linalg.qr(y[:, :p1])
    held_out = y[:, p1:]
    held_out = held_out - q1 @ (q1.mT @ held_out)
    tail = held_out.square().sum() / held_out.shape[1]
    var_hutchinson = pilot.var(correction=1)
    hutchpp_wins = 2 * tail / (m - 2 * p) < var_hutchinson / m
    if bool(hutchpp_wins):  # host sync: the one estimator choice
        return _hutchpp_from_sketch(op, n, y, m - 2 * p, generator, p, rtol)
    draw = _rademacher_quadratic_forms(op, n, generator)
    est, se, spent = _sample_until(draw, m, rtol, samples=pilot)
    return TraceEstimate(est, se, spent, "hutchinson")


_MIN_MATVECS = {"auto": 2, "hutchinson": 2, "hutchpp": 4, "xtrace": 4}


def trace(
    op: Any,
    num_matvecs: int,
    method: TraceMethod = "auto",
    *,
    generator: torch.Generator | None = None,
    rtol: float | None = None,
    progress: bool = False,
) -> TraceEstimate:
    """Stochastic estimate of ``tr(A)`` with a standard error, from ``num_matvecs`` products.

    ``num_matvecs`` is the budget. With ``rtol``, the Hutchinson samples (Hutch++'s deflated
    ones) are drawn in growing blocks and sampling stops as soon as the estimated standard
    error is at most ``rtol * |estimate|``; ``matvecs`` reports what was spent. This rule
    uses the variance, unlike PyHessian's relative-change rule, which stopped after 6
    products at 0.7 % error. (The first block holds 8 samples, so the variance estimate
    is meaningful; XTrace has no sequential form and rejects ``rtol``.)
    ``progress=True`` shows a tqdm bar of the products (when tqdm is installed).

    Methods:

    - ``"hutchinson"``: mean of ``z^T A z`` over Rademacher ``z``; standard error from the
      sample variance (needs >= 2 products).
    - ``"hutchpp"``: Hutch++ with the budget split in thirds: sketch ``A S``, exact trace on
      ``Q = orth(A S)``, Hutchinson on the deflated rest; standard error of that rest
      (needs >= 4 products; uses ``2 * (m // 3)`` plus the remainder).
    - ``"xtrace"``: XTrace (Epperly, Tropp & Webber 2024), the exchangeable estimator that
      uses every test vector both in the low-rank part and in the residual part; uses
      ``2 * (m // 2)`` products, needs >= 4.
    - ``"auto"``: a pilot of ``m // 3`` products decides between Hutchinson and Hutch++
      (rule in :func:`_trace_auto`); nothing in the pilot is wasted. Hutch++ only pays when
      a few eigenvalues dominate; on a flat spectrum it is no better than Hutchinson.

    Standard errors are estimated from the samples: they cover the truth at roughly the
    nominal Gaussian rate for moderate budgets (a few tens of samples), not for tiny ones.
    """
    n = _check_operator(op)
    _check_generator(generator)
    if method not in _TRACE_METHODS:
        raise ValueError(f"method must be one of {_TRACE_METHODS}, got {method!r}")
    _check_count(num_matvecs, "num_matvecs", _MIN_MATVECS[method])
    if rtol is not None:
        if not (isinstance(rtol, (int, float)) and rtol > 0):
            raise ValueError(f"rtol must be a positive number or None, got {rtol!r}")
        if method == "xtrace":
            raise ValueError("rtol needs a sequential estimator; XTrace draws all at once")
    estimator = {
        "hutchinson": _trace_hutchinson,
        "hutchpp": _trace_hutchpp,
        "xtrace": _trace_xtrace,
        "auto": _trace_auto,
    }[method]
    with _progress(op, progress, num_matvecs, "trace") as counted:
        result = estimator(counted, n, num_matvecs, generator, rtol)
    return result._replace(
        estimate=_shared(op, result.estimate), standard_error=_shared(op, result.standard_error)
    )


# --------------------------------------------------------------------------- diagonal


def diagonal(
    op: Any,
    num_matvecs: int,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> DiagonalEstimate:
    """Hutchinson's diagonal estimator (Bekas et al. 2007) with per-entry standard errors.

    ``diag(A) ~ mean_i z_i * (A z_i)`` over Rademacher ``z_i`` (``z * z = 1``, so no
    normalisation is needed); entry ``j`` has variance ``sum_{l != j} A_jl^2`` per sample,
    and the standard error is its sample estimate over ``sqrt(num_matvecs)``. Returned as
    parameter pytrees when the operator has ``unflatten``. Needs >= 2 products.
    ``progress=True`` shows a tqdm bar of the products (when tqdm is installed).
    """
    n = _check_operator(op)
    _check_generator(generator)
    _check_count(num_matvecs, "num_matvecs", 2)
    z = _rademacher(n, num_matvecs, op, generator)
    with _progress(op, progress, num_matvecs, "diagonal") as counted:
        samples = z * _apply_chunked(counted, z)
    est, se = (_shared(op, t) for t in _mean_and_standard_error(samples, dim=1))
    return DiagonalEstimate(_unflatten_or_flat(op, est), _unflatten_or_flat(op, se), num_matvecs)


# --------------------------------------------------------------------------- SLQ


def slq_quadrature(
    op: Any,
    num_probes: int,
    num_steps: int,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Stochastic Lanczos quadrature nodes and weights, each ``(num_probes, num_steps)``.

    For each normalised Rademacher probe ``v``, ``num_steps`` Lanczos steps (with full
    reorthogonalisation, all probes advanced together in one ``matmat`` per step) give a
    tridiagonal ``T = U diag(nodes) U^T``; the weights are ``U[0, :]**2`` and sum to one.
    The Gauss rule is exact for polynomials of degree ``< 2 num_steps``:
    ``sum_j w_j nodes_j**d = v^T A^d v``, whose mean over probes estimates ``tr(A^d) / n``.
    Lanczos breakdown (an invariant Krylov space, e.g. ``num_steps > n``) sets the coupling
    to exactly zero, so the extra nodes get zero weight. No host synchronisation.
    ``progress=True`` shows a tqdm bar of the products (when tqdm is installed).
    """
    n = _check_operator(op)
    _check_generator(generator)
    _check_count(num_probes, "num_probes", 1)
    _check_count(num_steps, "num_steps", 1)
    p, s = num_probes, num_steps
    dtype, device = op.dtype, op.device
    eps = torch.finfo(dtype).eps
    q = _rademacher(n, p, op, generator) / n**0.5  # (n, p), unit columns
    basis = torch.zeros(p, s, n, dtype=dtype, device=device)
    alphas = torch.zeros(p, s, dtype=dtype, device=device)
    betas = torch.zeros(p, max(s - 1, 0), dtype=dtype, device=device)
    anorm = torch.zeros(p, dtype=dtype, device=device)
    with _progress(op, progress, p * s, "slq") as counted:
        for j in range(s):
            basis[:, j] = q.mT
            aq = _apply(counted, q)
            alphas[:, j] = (q * aq).sum(dim=0)
            if j == s - 1:
                break
            r = aq.mT  # (p, n)
            for _ in range(2):  # full reorthogonalisation, twice is enough
                coeff = torch.einsum("pjn,pn->pj", basis[:, : j + 1], r)
                r = r - torch.einsum("pjn,pj->pn", basis[:, : j + 1], coeff)
            beta = torch.linalg.vector_norm(r, dim=1)
            anorm = torch.maximum(anorm, alphas[:, j].abs() + beta)
            alive = beta > (n * eps) ** 0.5 * anorm
            # On breakdown continue from a random vector orthogonal to the basis, with beta = 0.
            fresh = _randn(n, p, op, generator).mT
            for _ in range(2):
                coeff = torch.einsum("pjn,pn->pj", basis[:, : j + 1], fresh)
                fresh = fresh - torch.einsum("pjn,pj->pn", basis[:, : j + 1], coeff)
            fresh = fresh / torch.linalg.vector_norm(fresh, dim=1, keepdim=True).clamp_min(eps)
            safe_beta = torch.where(alive, beta, torch.ones_like(beta))
            q = torch.where(alive[:, None], r / safe_beta[:, None], fresh).mT
            betas[:, j] = torch.where(alive, beta, torch.zeros_like(beta))
    tri = torch.diag_embed(alphas)
    if s > 1:
        tri = tri + torch.diag_embed(betas, offset=1) + torch.diag_embed(betas, offset=-1)
    nodes, vecs = torch.linalg.eigh(tri)
    return _shared(op, nodes), _shared(op, vecs[:, 0, :].square())


def spectral_density(
    op: Any,
    num_probes: int,
    num_steps: int,
    grid: Tensor | int | None = None,
    sigma: float | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Spectral density by stochastic Lanczos quadrature with Gaussian broadening.

    ``density(t) = mean_probes sum_j w_j N(t; node_j, sigma**2)``; over a grid that covers
    the spectrum it integrates to one, its mean is the quadrature estimate of
    ``tr(A) / n`` and its second moment that of ``tr(A^2) / n`` plus ``sigma**2``.

    Args:
        num_probes, num_steps: as in :func:`slq_quadrature`.
        grid: evaluation points ``(g,)``, or a number of points (default 1000) spread over
            ``[min node - 6 sigma, max node + 6 sigma]``.
        sigma: Gaussian width; default 1% of the node range (at least ``1e-3`` of the
            largest node magnitude; 1 for the zero operator).
        progress: show a tqdm bar of the products (when tqdm is installed).

    Returns:
        ``(grid, density)``, both ``(g,)`` on the operator's device and dtype.
    """
    if sigma is not None and not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    if grid is not None and not isinstance(grid, (Tensor, int)):
        raise TypeError(f"grid must be a tensor, an int or None, got {type(grid).__name__}")
    if isinstance(grid, Tensor) and grid.ndim != 1:
        raise ValueError(f"grid must be one-dimensional, got shape {tuple(grid.shape)}")
    if isinstance(grid, int):
        _check_count(grid, "grid", 2)
    nodes, weights = slq_quadrature(
        op, num_probes, num_steps, generator=generator, progress=progress
    )
    lo, hi = nodes.min(), nodes.max()
    if sigma is None:
        width = torch.maximum(hi - lo, 1e-3 * nodes.abs().max())
        sig = torch.where(width > 0, 0.01 * width, torch.ones_like(width))
    else:
        sig = torch.tensor(float(sigma), dtype=op.dtype, device=op.device)
    if not isinstance(grid, Tensor):
        points = 1000 if grid is None else grid
        unit = torch.linspace(0, 1, points, dtype=op.dtype, device=op.device)
        grid = (lo - 6 * sig) + (hi - lo + 12 * sig) * unit
    grid = grid.to(device=op.device, dtype=op.dtype)
    z = (grid[:, None, None] - nodes[None]) / sig
    kernel = torch.exp(-0.5 * z.square()) / (sig * math.sqrt(2 * math.pi))
    density = (kernel * weights[None]).sum(dim=(1, 2)) / num_probes
    return grid, density
