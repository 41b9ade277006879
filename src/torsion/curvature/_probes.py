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
synchronisations are the tests of :func:`eigsh` (per Lanczos step: the stopping test and
the orthogonalisation tests of the new block) and the estimator choice of
``trace(method="auto")`` (once). Trace, diagonal and spectral-density estimates are
computed without any synchronisation after the argument checks.

Distributed operators (``op.distributed``, e.g. a model operator over data sharded across
:mod:`torch.distributed` ranks): every random block is drawn on rank 0 and broadcast, and
so are the results, so every rank probes the same full-data operator with the same vectors
and returns rank 0's numbers. All ranks must call the same probe with the same arguments.

References:
- K. Wu and H. Simon, Thick-restart Lanczos method for large symmetric eigenvalue
  problems, SIMAX 22 (2000).
- G. W. Stewart, A Krylov-Schur algorithm for large eigenproblems, SIMAX 23 (2001).
- A. Stathopoulos and K. Wu, A block orthogonalization procedure with constant
  synchronization requirements, SISC 23 (2002) (SVQB).
- B. N. Parlett, The Symmetric Eigenvalue Problem, SIAM 1998 (Kato-Temple inequality,
  "twice is enough").
- L. Lin, Y. Saad, C. Yang, Approximating spectral densities of large matrices, SIAM
  Review 58 (2016).
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
    magnitude first. ``residuals`` (k,) are ``||A y - theta y||`` per pair, from the
    Krylov-Schur relation (no Ritz vector is multiplied by ``A``); they equal the explicit
    residuals to within a few ``eps ||A||`` (at most ``10.6 eps ||A||`` over 58 test
    problems run to the rounding floor), so some eigenvalue lies within about
    ``residuals[i]`` of ``eigenvalues[i]``.
    ``error_estimates`` (k,) are the eigenvalue error estimates of the stopping rule,
    ``min(||r||, ||r||**2 / gap)`` plus the rounding of the Rayleigh-Ritz values (see
    :func:`eigsh` for when the Kato-Temple part is a bound). ``matvecs`` is the number of
    operator-vector products spent (a block of ``j`` vectors counts ``j``). ``converged``:
    ``tol`` was met for every pair. ``stalled``: the residuals reached the rounding floor
    of the products before ``tol`` was met (``eigsh`` warned). ``eigenvector_trees`` holds
    one parameter pytree per eigenvector when the operator has ``unflatten``, else
    ``None``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    matvecs: int
    converged: bool
    eigenvector_trees: tuple[Any, ...] | None = None
    error_estimates: Tensor | None = None
    stalled: bool = False


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

EigshCriterion = Literal["eigenvalue", "residual"]
_CRITERIA = ("eigenvalue", "residual")
#: Lanczos breakdown in SLQ: a reorthogonalised residual below this many
#: ``sqrt(n) eps ||A||`` (rounding noise) ends the Krylov space.
_SLQ_BREAKDOWN = 10.0
_RESOLVED = 0.25  # a neighbour with a larger residual-to-distance ratio is unresolved
_RESOLUTION = 4.0  # gaps below RESOLUTION * width / steps**2 may still hide eigenvalues
# a single row skips the second Gram-Schmidt pass when more than this fraction of its norm
# survives the first (Daniel-Gragg-Kaufman-Stewart); see _orthonormal_block
_ONE_PASS = 2**-0.5


def _wanted_order(theta: Tensor, which: str) -> Tensor:
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _as_rows(x: Tensor) -> Tensor:
    """``x`` (``(b, n)``) with row-major strides. A transposed ``(n, 1)`` column has strides
    ``(1, 1)``: contiguous, yet torch's copy kernels run 40x slower on it (measured)."""
    return x.contiguous().view(x.shape)


def _project_out_(basis: Tensor, x: Tensor) -> Tensor:
    """One classical Gram-Schmidt pass, in place: ``x <- x - (x V^T) V`` for the rows of
    ``x`` against the orthonormal rows of ``basis`` (two matmuls); returns ``x V^T``.

    In place because every fresh ``(b, n)`` tensor costs page faults on first touch,
    which for large ``n`` rival the arithmetic of the pass itself (measured).
    """
    coeff = x @ basis.mT
    x.addmm_(coeff, basis, alpha=-1)
    return coeff


_GRAM_RESOLUTION = 16 * torch.finfo(torch.float64).eps ** 0.5


def _svqb(x: Tensor, drop: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """Orthonormal rows spanning the rows of ``x``, dropping singular values ``<= drop``.

    SVQB (Stathopoulos & Wu 2002): the eigendecomposition of the small Gram matrix
    ``x x^T`` (in float64) instead of a tall-skinny QR or SVD; one row is just normalised
    (in place). Returns the rows ``q``, the norm of what was dropped and ``q x^T``
    (``(r, b)``, from the Gram factors). The rank test is one host synchronisation.
    """
    if x.shape[0] == 1:
        s = torch.linalg.vector_norm(x)
        if bool(s <= drop):  # host sync: rank test
            return x[:0], s, x.new_zeros(0, 1)
        return x.div_(s), torch.zeros_like(s), s.reshape(1, 1)
    gram = x.double() @ x.double().mT
    w, u = torch.linalg.eigh(gram)
    s = w.clamp_min(0).sqrt()
    # eigh of the Gram matrix resolves singular values only down to about sqrt(eps) of
    # the largest: below that s is noise and u / s would not normalise (a spurious,
    # non-unit row), so that is the smallest drop honoured
    floor = _GRAM_RESOLUTION * s.max()
    keep = s > torch.clamp(floor, min=drop)  # boolean indexing below: the rank test's sync
    u, kept, dropped = u[:, keep], s[keep], torch.linalg.vector_norm(s[~keep])
    q = (u / kept).mT.to(x.dtype) @ x
    return q, dropped.to(x.dtype), (kept[:, None] * u.mT).to(x.dtype)


def _orthonormal_block(
    basis: Tensor, x: Tensor, drop: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Orthonormal rows spanning the part of ``span(x)`` orthogonal to ``basis``.

    Classical Gram-Schmidt twice ("twice is enough"; a single row skips the second pass
    when more than ``1 / sqrt(2)`` of its norm survives the first), then :func:`_svqb`,
    which drops directions whose new content is ``<= drop`` times the largest row norm of ``x``; a
    block of several rows gets one more Gram-Schmidt and SVQB pass (as in CholQR2), since
    the rescaling by the inverse singular values amplifies the rounding of the first.
    ``x`` is overwritten (the caller owns it).

    Returns:
        The orthonormal rows ``q``, the norm of the dropped part, ``q y^T`` for the
        projected rows ``y = x - x V^T V`` (``(r, b)``: ``y``'s coordinates in ``q``) and
        the coefficients ``x V^T``.
    """
    ref = torch.linalg.vector_norm(x, dim=1).max()
    coeff = _project_out_(basis, x)
    if x.shape[0] == 1:
        s = torch.linalg.vector_norm(x)
        # One pass leaves y V^T = (x V^T)(I - V V^T) + O(eps ||x||): the basis's own loss
        # of orthogonality, amplified by ||x V^T|| / ||y|| in the new row. Only when that
        # factor is <= 1, i.e. ||y|| >= ||x|| / sqrt(2) (Kahan-Parlett; Daniel, Gragg,
        # Kaufman & Stewart 1976), is the second pass (half the cost) skipped: with a laxer
        # test the loss grows geometrically from step to step (restarts keep it), and with
        # it the error of the Krylov-Schur relation behind the reported residuals. One
        # host sync.
        if bool(s > _ONE_PASS * ref):
            return x.div_(s), torch.zeros_like(s), s.reshape(1, 1), coeff
    _project_out_(basis, x)
    if x.shape[0] == 1:
        q, dropped, coupling = _svqb(x, drop * ref)
        return q, dropped, coupling, coeff
    projected = x.clone()
    q, dropped, _ = _svqb(x, drop * ref)
    if q.shape[0] > 0:
        _project_out_(basis, q)
        # q's rows had unit norm: a row that re-projection shrinks to rounding noise lay
        # in span(basis) after all (kept by the first pass at a rank-deficient residual)
        # and must be dropped, not normalised into a spurious direction
        q, _, _ = _svqb(q, drop)
    return q, dropped, q @ projected.mT, coeff


def _initial_block(
    v0: Any, op: Any, n: int, block: int, generator: torch.Generator | None
) -> Tensor:
    """The first block as rows ``(j, n)``: ``v0``'s columns, padded with random vectors
    to ``block`` rows when it has fewer."""
    if v0 is None:
        return _as_rows(_randn(n, block, op, generator).mT)
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
    rows = _as_rows(v0.to(device=op.device, dtype=op.dtype).mT)
    if rows.shape[0] < block:
        pad = _randn(n, min(block, n) - rows.shape[0], op, generator).mT
        rows = torch.cat([rows, pad])
    return rows


class _KrylovSchur:
    """State of the thick-restart block Lanczos: an orthonormal basis ``V`` (rows, in a
    preallocated ``(capacity, n)`` buffer), the projection ``H = V A V^T`` (float64) and
    the next block ``P``.

    Invariant (the Krylov-Schur relation): ``A V^T = V^T H + P^T C`` with ``P``
    orthonormal rows orthogonal to ``V``, so the residual of every Ritz pair
    ``(theta_j, V^T s_j)`` is ``P^T C s_j`` and its norm ``||C s_j||``: residual norms of
    all Ritz pairs come from a ``(b, m)`` matrix, without forming any Ritz vector.
    """

    def __init__(self, n: int, capacity: int, block: int, dtype: torch.dtype, device: torch.device):
        self.rows = torch.empty(capacity, n, dtype=dtype, device=device)
        self.work = torch.empty(block, n, dtype=dtype, device=device)
        self.proj = torch.zeros(capacity, capacity, dtype=torch.float64, device=device)
        self.size = 0

    @property
    def basis(self) -> Tensor:
        return self.rows[: self.size]

    def append(self, x: Tensor, ax: Tensor, drop: float) -> tuple[Tensor, Tensor, Tensor]:
        """Add the block ``x`` (orthonormal rows, orthogonal to ``V``) with its images
        ``ax``; return the next block ``P``, the coupling ``C_new`` (``C``'s only nonzero
        columns, those of ``x``) and the norm of the residual dropped by the rank test."""
        m, b = self.size, x.shape[0]
        self.rows[m : m + b] = x
        self.size = m + b
        self.work[:b] = ax  # the residual is formed in place in a reused buffer
        p, dropped, coupling, coeff = _orthonormal_block(self.basis, self.work[:b], drop)
        coeff = coeff.double()  # ax V^T: the new rows (and columns) of H
        self.proj[m : m + b, : m + b] = coeff
        self.proj[: m + b, m : m + b] = coeff.mT
        diag = coeff[:, m:]
        self.proj[m : m + b, m : m + b] = (diag + diag.mT) / 2
        return p, coupling.double(), dropped

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Ritz values (ascending, float64) and the coefficient matrix ``S``."""
        m = self.size
        return torch.linalg.eigh(self.proj[:m, :m])

    def vectors(self, s: Tensor) -> Tensor:
        """Ritz vectors ``S^T V`` as rows."""
        return s.mT.to(self.rows.dtype) @ self.basis

    def restart(self, s_keep: Tensor, theta_keep: Tensor) -> None:
        """Thick restart: ``V <- S_keep^T V``, ``H <- diag(theta_keep)``; the next block
        and its coupling are unchanged, so no product is spent."""
        j = s_keep.shape[1]
        self.rows[:j] = self.vectors(s_keep)
        self.proj.zero_()
        self.proj[:j, :j] = torch.diag(theta_keep)
        self.size = j


def _gaps(theta: Tensor, residual_norms: Tensor, k: int, resolution: Tensor) -> Tensor:
    """Estimated distance from each Ritz value to the rest of the spectrum.

    For Ritz values ``theta`` (ascending) with residual norms ``r``: the distance to each
    neighbour minus that neighbour's residual norm (an eigenvalue lies within ``r_j`` of
    ``theta_j``), the smaller of the two sides; the outer side of the extreme Ritz values
    counts as infinitely far. Capped at ``resolution``: an eigenvalue closer than that to
    a Ritz value may not have its own Ritz value yet (it hides in the Ritz vector), so no
    larger gap is claimed. With at most ``k`` Ritz values there is no unwanted one to
    estimate the gap from: all gaps are 0 (unknown).
    """
    m = theta.shape[0]
    if m <= k:
        return torch.zeros_like(theta)
    inf = torch.full((1,), math.inf, dtype=theta.dtype, device=theta.device)
    step = theta[1:] - theta[:-1]
    # A neighbour whose residual is a sizeable part of the distance is itself unresolved.
    lower = torch.where(residual_norms[:-1] <= _RESOLVED * step, step - residual_norms[:-1], 0)
    upper = torch.where(residual_norms[1:] <= _RESOLVED * step, step - residual_norms[1:], 0)
    lower, upper = torch.cat([inf, lower]), torch.cat([upper, inf])
    return torch.minimum(torch.minimum(lower, upper), resolution)


def _eigenvalue_error_estimates(residual_norms: Tensor, gaps: Tensor) -> Tensor:
    """``min(||r||, ||r||^2 / gap)``: the Kato-Temple bound where the gap exceeds the
    residual, else the residual bound (both hold for the eigenvalue nearest the Ritz
    value, the first when ``gap`` is the true distance to the rest of the spectrum)."""
    trusted = gaps > residual_norms
    safe = torch.where(trusted, gaps, torch.ones_like(gaps))
    return torch.where(trusted, residual_norms.square() / safe, residual_norms)


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
    criterion: EigshCriterion = "eigenvalue",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> EigshResult:
    """A few extreme eigenpairs of a symmetric operator by thick-restart block Lanczos.

    Block Lanczos in Krylov-Schur form: the search space is a block Krylov space kept
    orthonormal by full reorthogonalisation (classical Gram-Schmidt twice, as matmuls
    against a preallocated basis; new blocks orthonormalised by SVQB on their small Gram
    matrix). After every block of products the Rayleigh-Ritz problem on the whole space
    is solved, and the Krylov-Schur relation gives the residual norms of *all* Ritz pairs
    from a ``(block, m)`` matrix, without forming Ritz vectors. When the space reaches
    ``ncv`` vectors it is restarted with the ``ncv // 2`` or so most wanted Ritz vectors
    (thick restart, Wu & Simon 2000; Stewart 2001), which costs no products.

    Stopping rule (``criterion``), for each wanted Ritz pair ``(theta, y)`` with residual
    ``r = A y - theta y`` and ``scale = max(|theta|, eps**(1/3) * anorm)`` (``anorm`` the
    largest Ritz magnitude seen, so zero eigenvalues can converge):

    - ``"eigenvalue"`` (default): stop when the *eigenvalue* error estimate
      ``min(||r||, ||r||**2 / gap) <= tol * scale``. ``||r||`` bounds the distance from
      ``theta`` to the nearest eigenvalue (always); ``||r||**2 / gap`` is the Kato-Temple
      inequality (e.g. Parlett, *The Symmetric Eigenvalue Problem*; Saad, *Numerical
      Methods for Large Eigenvalue Problems*), a bound when ``gap`` is the
      distance from ``theta`` to the rest of the spectrum. That gap is estimated from the
      neighbouring Ritz values, each moved towards ``theta`` by its residual norm; it is
      not used (the residual bound applies) when a neighbour is itself unresolved (its
      residual exceeds a quarter of its distance), when the space holds no unwanted Ritz
      value (``k`` Ritz values only), or when it is below ``||r||`` (clustered values);
      and it is capped at ``4 * width / steps**2``, the spacing below which a Krylov space
      of that degree separates eigenvalues only slowly (Kaniel-Paige-Saad). The
      eigenvalue error behaves like ``||r||**2 / gap``, so this needs fewer products than
      the residual rule at the same ``tol``; the eigenvectors are then accurate to about
      ``||r|| / gap``, roughly ``sqrt(tol)``.
    - ``"residual"``: stop when ``||r|| <= tol * scale``, a rigorous bound on the
      eigenvalue error (to the nearest eigenvalue) that needs no gap; eigenvalues then
      come out far more accurate than ``tol`` (about ``(tol * scale)**2 / gap``) and
      eigenvectors to about ``tol * scale / gap``.

    What ``tol`` certifies with ``"eigenvalue"``: ``|lambda - theta| <= tol * scale`` for
    the eigenvalue ``lambda`` nearest ``theta``, rigorously where the residual bound was
    used, and where the Kato-Temple bound was used under the assumption that no eigenvalue
    hides between ``theta`` and its neighbouring Ritz values. That assumption fails inside
    a cluster narrower than the Krylov space has resolved: a single vector
    (``block_size=1``) aimed at an eigenvalue ``1e-4`` from the next one can stop, at
    ``tol=1e-6``, on a Ritz value between them, with an error up to the cluster's width
    (which the ``residuals`` still bound). Use a block at least
    as wide as the cluster, or ``criterion="residual"``, when ``tol`` is below the
    relative spacing of the wanted eigenvalues. In any case, like every Krylov method,
    a Ritz value the start vector hardly sees can be taken for the top one.

    Rounding floor: the products of a float32 operator (or HVP) are accurate to about
    ``sqrt(n) * eps * ||A||``, and residuals cannot go below that. When every wanted pair
    not yet certified has ``||r|| <= max(100, sqrt(n)) * eps * anorm``, iterating further
    cannot help: ``eigsh`` stops, sets ``stalled`` (and ``converged=False``) and warns;
    ``residuals`` and ``error_estimates`` say what was reached.

    Args:
        op: symmetric operator (``shape``, ``dtype``, ``device``, ``matmat``).
        k: number of eigenpairs, ``1 <= k <= n``.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
            magnitude.
        tol: relative tolerance of the stopping rule (default ``1e-6``), see above.
        max_iter: maximum number of block steps (each costs at most ``block_size``
            products); default ``max(100, 10 * n // block_size)`` capped at 10_000.
        v0: warm start: ``(n,)`` or ``(n, j)`` tensor (e.g. the previous eigenvectors), an
            :class:`EigshResult`, or a parameter pytree if ``op`` has ``flatten``. Its ``j``
            columns form the first block (padded with random vectors to ``block_size``;
            with ``j > block_size`` every block has ``j`` vectors).
        ncv: maximum dimension of the search space (default ``max(20, 2 * k + 6 *
            block_size)`` capped at ``n``).
        block_size: new directions per step; default ``k`` (block Lanczos for ``k > 1``),
            which finds eigenvalues of multiplicity up to ``block_size``. ``block_size=1``
            needs fewer products when no eigenvalue is repeated but, like any
            single-vector Krylov method, sees only one copy of a repeated eigenvalue.
        criterion: ``"eigenvalue"`` (default) or ``"residual"``, see above.
        generator: for the random start (and random refills after an invariant subspace).
        progress: show a tqdm bar of the products spent (when tqdm is installed).

    Returns:
        :class:`EigshResult`. ``converged`` is ``False`` when ``max_iter`` ran out or the
        rounding floor was reached first (``stalled``); the best current approximations
        are returned then.

    Raises:
        ValueError: ``k`` outside ``[1, n]``, an unknown ``which`` or ``criterion``, a
            non-positive ``tol``, a ``v0`` of the wrong shape, ``ncv`` too small, or
            products with NaN or infinite entries (detected when the decomposition fails).
        TypeError: ``op`` lacks the operator attributes, or a bad ``generator``/``v0``.

    Shapes:
        ``op``: ``(n, n)``; ``eigenvalues`` ``(k,)``; ``eigenvectors`` ``(n, k)``.

    Host synchronisation: one stopping test per step and the rank test of the new block.
    Like every Krylov method (ARPACK included) it cannot see eigenvectors orthogonal to
    the start space; a random start avoids that with probability one.
    """
    n = _check_operator(op)
    _check_generator(generator)
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if criterion not in _CRITERIA:
        raise ValueError(f"criterion must be one of {_CRITERIA}, got {criterion!r}")
    _check_count(k, "k", 1)
    if k > n:
        raise ValueError(f"k={k} eigenpairs requested but the operator has dimension n={n}")
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    block = k if block_size is None else _check_count(block_size, "block_size", 1)
    block = min(block, n)
    x = _initial_block(v0, op, n, block, generator)
    block = max(block, x.shape[0])
    if ncv is None:
        ncv = min(n, max(20, 2 * k + 6 * block))
    else:
        _check_count(ncv, "ncv", 1)
        if ncv > n:
            raise ValueError(f"ncv={ncv} exceeds the dimension n={n}")
        if ncv < n and ncv < k + block:
            raise ValueError(
                f"ncv={ncv} must be at least k + block_size = {k + block} (or n); the block "
                "is as wide as v0 when v0 has more columns than block_size"
            )
    if max_iter is None:
        max_iter = min(10_000, max(100, 10 * n // block))
    else:
        _check_count(max_iter, "max_iter", 1)
    with _progress(op, progress, None, "eigsh") as op:
        try:
            return _thick_restart_lanczos(
                op, n, k, which, tol, max_iter, x, ncv, block, criterion, generator
            )
        except torch.linalg.LinAlgError as error:
            # checked only on failure: a NaN or Inf product is the usual cause, and
            # eigh's "failed to converge" message does not say so
            ones = torch.ones(n, 1, dtype=op.dtype, device=op.device)
            if not bool(torch.isfinite(_apply(op, ones)).all()):
                raise _non_finite_products("eigsh") from error
            raise


def _thick_restart_lanczos(
    op: Any,
    n: int,
    k: int,
    which: str,
    tol: float,
    max_iter: int,
    x: Tensor,
    ncv: int,
    block: int,
    criterion: str,
    generator: torch.Generator | None,
) -> EigshResult:
    """The iteration of :func:`eigsh` on validated arguments; ``x`` is the first block (rows)."""
    dtype, device = op.dtype, op.device
    eps = torch.finfo(dtype).eps
    drop = eps**0.75  # new content (relative) below which a direction is rounding noise
    noise = max(100.0, n**0.5) * eps  # rounding floor of the residuals, relative to anorm
    # Kept Ritz vectors at a restart: the wanted ones plus about half the rest.
    keep = max(k, min(ncv - block, k + (ncv - k) // 2))
    space = _KrylovSchur(n, ncv, block, dtype, device)
    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    x = _orthonormal_block(space.basis, x, drop)[0]
    matvecs, stop = 0, 0
    lost = torch.zeros((), dtype=torch.float64, device=device)  # residual norm dropped
    anorm = torch.zeros((), dtype=torch.float64, device=device)
    width = torch.zeros((), dtype=torch.float64, device=device)
    steps = 0
    theta = s = order = sel = res_k = bounds = None
    for _ in range(max_iter):
        if order is not None and space.size + min(x.shape[0], block) > ncv:
            kept = order[:keep]  # thick restart: keep the most wanted Ritz vectors
            space.restart(s[:, kept], theta[kept])
            theta, s = space.ritz()  # the same pairs, now in the restarted basis
            order = _wanted_order(theta, which)
            sel = order[:k]
        if x.shape[0] == 0:  # invariant subspace, wanted pairs not certified: refill
            fresh = _as_rows(_randn(n, min(block, n - space.size), op, generator).mT)
            x = _orthonormal_block(space.basis, fresh, drop)[0]
        x = _shared(op, x[: n - space.size])
        if x.shape[0] == 0:
            break
        ax = _as_rows(_apply(op, x.mT).mT)
        matvecs += x.shape[0]
        b = x.shape[0]
        x, coupling, dropped = space.append(x, ax, drop)
        lost = torch.linalg.vector_norm(torch.stack([lost, dropped.double()]))
        theta, s = space.ritz()
        m = space.size
        residual_norms = torch.linalg.vector_norm(coupling @ s[m - b :], dim=0) + lost
        order = _wanted_order(theta, which)
        sel = order[:k]
        anorm = torch.maximum(anorm, theta.abs().max())
        # Krylov resolution: after j steps a Krylov space separates eigenvalues closer
        # than about width / j**2 (the Chebyshev bound of Kaniel-Paige-Saad) only slowly.
        width = torch.maximum(width, theta.max() - theta.min())
        steps += 1
        gaps = _gaps(theta, residual_norms, k, _RESOLUTION * width / steps**2)
        bounds = _eigenvalue_error_estimates(residual_norms, gaps)[sel]
        res_k = residual_norms[sel]
        measure = bounds if criterion == "eigenvalue" else res_k
        target = tol * torch.clamp(theta[sel].abs(), min=eps ** (1 / 3) * anorm)
        done = measure <= target
        at_floor = res_k <= noise * anorm
        code = 2 * done.all().to(torch.int64) + (done | at_floor).all().to(torch.int64)
        stop = 3 if m >= n else int(_shared(op, code))  # host sync: the stopping test
        if stop:
            break
    if theta is None:  # pragma: no cover - max_iter >= 1 always runs one product
        raise RuntimeError("eigsh ran no step")
    if space.size >= n:  # the whole space: Ritz pairs are exact
        bounds = res_k = torch.zeros_like(res_k)
    bounds = bounds + space.size * eps * anorm  # rounding of the Rayleigh-Ritz values
    if stop == 1:
        advice = "a larger tol" if dtype == torch.float64 else "a float64 operator or a larger tol"
        warnings.warn(
            f"eigsh: the residuals reached the rounding floor of the {dtype} products "
            f"(||r|| <= {float(noise * anorm):.1e}) before tol={tol} could be certified; "
            f"the eigenvalues are returned with error estimates up to {float(bounds.max()):.1e} "
            f"(EigshResult.error_estimates). Use {advice}.",
            RuntimeWarning,
            stacklevel=3,
        )
    y = space.vectors(s[:, sel]).mT.contiguous()
    theta_k, y, res_k, bounds = (_shared(op, t.to(dtype)) for t in (theta[sel], y, res_k, bounds))
    trees = None
    if callable(getattr(op, "unflatten", None)):
        trees = tuple(op.unflatten(y[:, i]) for i in range(k))
    return EigshResult(theta_k, y, res_k, matvecs, stop == 3, trees, bounds, stop == 1)


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

    The Hutch++ branch stays exactly unbiased (its estimate is unbiased given any sketch).
    The Hutchinson branch reuses the pilot samples, so the choice and the estimate share
    them: a selection effect, negligible when the choice is clear-cut (on network
    Hessians ``auto`` picked Hutchinson in every run) but not when the two predictions are
    close. Measured on a 20 x 20 matrix with eigenvalues 30, 10 and -8 among small ones,
    where each branch was taken about half the time: at 12 products the mean estimate was
    3.7 % low, about 0.2 of its standard error. Pick ``"hutchinson"`` or ``"hutchpp"``
    explicitly where that matters; discarding the pilot would cost a third of the budget.
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


def _non_finite_products(probe: str) -> ValueError:
    return ValueError(
        f"{probe}: the operator's products have NaN or infinite entries (a NaN in the "
        "model, the loss or the data?)"
    )


def _check_finite_answer(probe: str, *answers: Tensor) -> None:
    """A ``ValueError`` when a probe's answer is not finite: the operator's products were.

    One host synchronisation at the end of a probe (which spent many products), so a NaN
    in the model, the loss or the data is named instead of returned as an estimate.
    """
    if not all(bool(torch.isfinite(answer).all()) for answer in answers):
        raise _non_finite_products(probe)


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

    Raises:
        ValueError: for a bad budget, method or ``rtol``, or when the operator's products
            have NaN or infinite entries (checked once, on the estimate).
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
    _check_finite_answer("trace", result.estimate)
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

    Raises:
        ValueError: for fewer than 2 products, or when the operator's products have NaN or
            infinite entries (checked once, on the estimate).
    """
    n = _check_operator(op)
    _check_generator(generator)
    _check_count(num_matvecs, "num_matvecs", 2)
    z = _rademacher(n, num_matvecs, op, generator)
    with _progress(op, progress, num_matvecs, "diagonal") as counted:
        samples = z * _apply_chunked(counted, z)
    _check_finite_answer("diagonal", samples)
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
    to exactly zero, so the extra nodes get zero weight. No host synchronisation, so a NaN
    product gives NaN nodes (:func:`spectral_density` checks and raises).
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
    dead = torch.zeros(p, s, dtype=torch.bool, device=device)  # steps past an exhausted space
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
            # Breakdown: what is left after full reorthogonalisation is rounding noise. (The
            # bound was sqrt(n eps) ||A||, 8e-3 ||A|| in float32 at n = 600: once Lanczos had
            # found a few outliers, the bulk's couplings fell below it and the bulk
            # collapsed to one or two nodes.)
            alive = beta > _SLQ_BREAKDOWN * n**0.5 * eps * anorm
            # On breakdown continue from a random vector orthogonal to the basis, with beta = 0.
            fresh = _randn(n, p, op, generator).mT
            for _ in range(2):
                coeff = torch.einsum("pjn,pn->pj", basis[:, : j + 1], fresh)
                fresh = fresh - torch.einsum("pjn,pj->pn", basis[:, : j + 1], coeff)
            fresh_norm = torch.linalg.vector_norm(fresh, dim=1, keepdim=True)
            # no vector is left once the basis spans the space (num_steps > n)
            dead[:, j + 1] = ~alive & (fresh_norm[:, 0] <= _SLQ_BREAKDOWN * n**0.5 * eps)
            fresh = fresh / fresh_norm.clamp_min(eps)
            safe_beta = torch.where(alive, beta, torch.ones_like(beta))
            q = torch.where(alive[:, None], r / safe_beta[:, None], fresh).mT
            betas[:, j] = torch.where(alive, beta, torch.zeros_like(beta))
    # A step past an exhausted space is a decoupled 1 x 1 block of zero weight; its node
    # (0 from the zero vector) is set to the probe's first Ritz value v^T A v, inside the
    # spectrum, so that it does not stretch the default grid or sigma of spectral_density.
    alphas = torch.where(dead.cumsum(dim=1) > 0, alphas[:, :1], alphas)
    tri = torch.diag_embed(alphas)
    if s > 1:
        tri = tri + torch.diag_embed(betas, offset=1) + torch.diag_embed(betas, offset=-1)
    nodes, vecs = torch.linalg.eigh(tri)
    return _shared(op, nodes), _shared(op, vecs[:, 0, :].square())


def _default_sigma(nodes: Tensor, weights: Tensor) -> Tensor:
    """Half the typical spacing of the Gauss nodes where the spectral mass is.

    The local spacing of node ``j`` of a probe is the mean distance to its neighbours;
    the weighted median over all nodes (weights = quadrature weights) is the resolution
    of the quadrature where most eigenvalues are, and half of it smooths the comb of
    nodes without washing out the bulk. A width proportional to the whole spectral range
    would be set by a few outliers, which stretch the range but carry no mass. Falls back
    to 1 % of the node range (at least ``1e-3`` of the largest node magnitude; 1 for the
    zero operator) with a single node per probe or coinciding nodes (a spacing below
    ``100 eps`` of the largest node magnitude). No host sync.
    """
    lo, hi = nodes.min(), nodes.max()
    scale = nodes.abs().max()
    width = torch.maximum(hi - lo, 1e-3 * scale)
    fallback = torch.where(width > 0, 0.01 * width, torch.ones_like(width))
    if nodes.shape[1] < 2:
        return fallback
    gaps = nodes.diff(dim=1)  # nodes come sorted from eigh
    local = torch.cat([gaps[:, :1], (gaps[:, 1:] + gaps[:, :-1]) / 2, gaps[:, -1:]], dim=1)
    local, mass = local.flatten(), weights.flatten()
    order = torch.argsort(local)
    cumulative = torch.cumsum(mass[order], dim=0)
    half = torch.searchsorted(cumulative, cumulative[-1:] / 2).clamp_max(local.numel() - 1)
    sigma = 0.5 * local[order][half[0]]
    # only coinciding nodes fall back: a bulk spacing far below the range is the point
    # (outliers 100x the bulk width stretch the range; comparing with it flattened the bulk)
    floor = 100 * torch.finfo(nodes.dtype).eps * scale
    return torch.where(sigma > floor, sigma, fallback)


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
        sigma: Gaussian width. Default: half the weighted median spacing of the Gauss
            nodes (the quadrature's own resolution where the eigenvalues are, in the
            spirit of Lin, Saad & Yang 2016, whose broadening follows the resolution of
            the degree-``num_steps`` approximation); unlike a fraction of the spectral
            range it is not inflated by a few outlying eigenvalues (a trained network's
            Hessian: a bulk near zero and outliers far out). Falls back to 1 % of the node
            range with ``num_steps=1``.
        progress: show a tqdm bar of the products (when tqdm is installed).

    Returns:
        ``(grid, density)``, both ``(g,)`` on the operator's device and dtype.

    Raises:
        ValueError: for a bad ``sigma`` or ``grid``, or when the operator's products have
            NaN or infinite entries (checked once, on the quadrature nodes).
    """
    if sigma is not None and not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    if grid is not None and not isinstance(grid, (Tensor, int)):
        raise TypeError(f"grid must be a tensor, an int or None, got {type(grid).__name__}")
    if isinstance(grid, Tensor) and grid.ndim != 1:
        raise ValueError(f"grid must be one-dimensional, got shape {tuple(grid.shape)}")
    if isinstance(grid, int):
        _check_count(grid, "grid", 2)
    try:
        nodes, weights = slq_quadrature(
            op, num_probes, num_steps, generator=generator, progress=progress
        )
    except torch.linalg.LinAlgError as error:  # eigh of a tridiagonal with NaN entries
        raise _non_finite_products("spectral_density") from error
    _check_finite_answer("spectral_density", nodes, weights)
    lo, hi = nodes.min(), nodes.max()
    if sigma is None:
        sig = _default_sigma(nodes, weights)
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
