"""Eigensolvers for the smallest eigenpairs of one symmetric graph Laplacian.

Every solver here works on a :class:`SymmetricProblem`: a symmetric positive
semidefinite sparse matrix ``M`` (the combinatorial or the symmetric normalized
Laplacian) whose null space is known exactly (one vector per connected component), and
returns the ``nev`` smallest eigenpairs of ``M`` on the orthogonal complement of that
null space. Knowing the null space lets every solver deflate it exactly instead of
spending iterations on a cluster of zero eigenvalues.

* :func:`chebyshev_eigs`: Chebyshev-filtered subspace iteration (Zhou & Saad, 2007) on the
  device of the inputs. The filter runs in float32 over blocks of columns that fit a
  cache line per row (the sparse products are then several times cheaper per column
  than one matrix-vector product), the Rayleigh-Ritz steps in float64.
* :func:`lobpcg_eigs`: block LOBPCG (Knyazev, 2001) on the device of the inputs, with an
  optional warm start.
* :func:`arpack_eigs` and :func:`shift_invert_eigs`: SciPy's ARPACK on the CPU
  (thick-restart Lanczos, plain or on ``(M - sigma I)^-1`` through a SuperLU
  factorization). Shift-invert is the fastest choice on mesh-like graphs, whose wanted
  eigenvalues are tiny and whose LU factors stay sparse; on small-world graphs the
  factors fill in. Both check their result for missed copies of repeated eigenvalues,
  which single-vector Lanczos can miss, and fall back on LOBPCG when they find one.
* :func:`looks_mesh_like` is the cheap test that picks between the last two families.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SolverResult",
    "SymmetricProblem",
    "arpack_eigs",
    "chebyshev_eigs",
    "csr_tensor",
    "lobpcg_eigs",
    "looks_mesh_like",
    "row_pointers",
    "shift_invert_eigs",
]

# Filter block width: one 64-byte cache line of float32 (or float64) per row. Wider
# blocks fall out of cache on 1e5-node graphs and cost more per column, narrower ones
# re-read the matrix more often.
_CHUNK = {torch.float32: 16, torch.float64: 8}
# Largest amplification of one filtered component over another inside one float32 filter
# pass; beyond it the weaker components sink under the rounding of the stronger ones.
_MAX_GROWTH = {torch.float32: 1e4, torch.float64: 1e8}
# Blocks up to this size are filtered whole (they stay in cache anyway).
_CACHE_BYTES = 2**22
_MAX_DEGREE = 40
# From this many nodes up, the Chebyshev filter's upper end is estimated by Lanczos rather
# than taken from the hard bound: measured, the estimate made whole solves 5-15 % faster on
# 3e4- and 1e5-node small-world graphs, but 10-45 % slower on 400- to 1e4-node ones.
_TOP_ESTIMATE_MIN_NODES = 20_000
_LOBPCG_MAX_ITER = 2000


def row_pointers(rows: Tensor, n: int) -> Tensor:
    """The ``(n + 1,)`` int64 CSR row pointers of entries in rows ``rows`` (values in
    ``[0, n)``, in any order): ``crow[i]`` counts the entries in rows below ``i``. Shapes
    depend only on ``n``, so there is no host synchronisation and ``torch.compile``
    traces it."""
    counts = torch.zeros(n + 1, dtype=torch.long, device=rows.device)
    return counts.index_add(0, rows + 1, torch.ones_like(rows, dtype=torch.long)).cumsum(0)


def csr_tensor(crow: Tensor, col: Tensor, values: Tensor, size: int | tuple[int, int]) -> Tensor:
    """A sparse CSR tensor (``size`` ``n`` means ``(n, n)``), without torch's one-time
    "CSR support is in beta" warning."""
    shape = (size, size) if isinstance(size, int) else size
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)


@dataclass(frozen=True)
class SolverResult:
    """The ``nev`` smallest non-null eigenpairs found by one solver.

    ``eigenvalues`` ``(nev,)`` ascending, ``eigenvectors`` ``(n, nev)`` orthonormal and
    orthogonal to the null space, ``residuals`` ``(nev,)`` the norms ``||M v - lambda v||``
    (float64, on the problem's device) where the solver has them for free (``None`` for
    ARPACK: :func:`~torsion.spectral.laplacian_eigs` computes the residuals of what it
    returns anyway), ``iterations`` the solver's own count.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor | None
    iterations: int


@dataclass(frozen=True)
class SymmetricProblem:
    """``M = diag(diagonal) + offdiagonal`` in CSR with an explicit diagonal entry per row.

    Attributes:
        crow, col: CSR structure (int32 when it fits), every row holding its diagonal.
        values: float64 values of ``M``.
        diag_pos: ``(n,)`` positions of the diagonal entries in ``values``.
        bound: an upper bound on the spectrum of ``M`` (``2`` for the normalized
            Laplacian, Gershgorin's ``2 max_i d_i`` for the combinatorial one).
        null_labels: ``(n,)`` the component (``0 .. c-1``) of each node.
        null_weights: ``(n,)`` the entries of the unit null vectors: the null vector of
            component ``j`` is ``null_weights * (null_labels == j)``.
        num_null: ``c``, the dimension of the null space.
    """

    crow: Tensor
    col: Tensor
    values: Tensor
    diag_pos: Tensor
    bound: float
    null_labels: Tensor
    null_weights: Tensor
    num_null: int

    @property
    def n(self) -> int:
        return self.diag_pos.numel()

    @property
    def device(self) -> torch.device:
        return self.values.device

    @classmethod
    def build(
        cls,
        row: Tensor,
        col: Tensor,
        offdiagonal: Tensor,
        diagonal: Tensor,
        bound: float,
        null_labels: Tensor,
        null_weights: Tensor,
        num_null: int,
    ) -> SymmetricProblem:
        """From coalesced off-diagonal entries (no self-loops) and the diagonal."""
        n = diagonal.numel()
        device = row.device
        nodes = torch.arange(n, device=device)
        # merge the diagonal into the (row, col)-sorted off-diagonal entries
        off_keys = row * n + col
        diag_keys = nodes * (n + 1)
        total = off_keys.numel() + n
        diag_pos = torch.searchsorted(off_keys, diag_keys) + nodes
        off_pos = torch.searchsorted(diag_keys, off_keys) + torch.arange(
            off_keys.numel(), device=device
        )
        vals = torch.empty(total, dtype=torch.float64, device=device)
        vals[off_pos] = offdiagonal.to(torch.float64)
        vals[diag_pos] = diagonal.to(torch.float64)
        cols = torch.empty(total, dtype=torch.long, device=device)
        cols[off_pos] = col
        cols[diag_pos] = nodes
        index_dtype = torch.int32 if total < 2**31 - 1 else torch.int64
        crow = row_pointers(row, n) + torch.arange(n + 1, device=device)  # + the diagonal
        return cls(
            crow=crow.to(index_dtype),
            col=cols.to(index_dtype),
            values=vals,
            diag_pos=diag_pos,
            bound=float(bound),
            null_labels=null_labels,
            null_weights=null_weights.to(torch.float64),
            num_null=int(num_null),
        )

    # -- products ---------------------------------------------------------------------

    def matrix(self, dtype: torch.dtype = torch.float64, shift: float = 0.0) -> Tensor:
        """``M - shift I`` as a CSR tensor of ``dtype`` (``M`` itself built once per dtype:
        a solve asks for it at every Rayleigh-Ritz step)."""
        if shift == 0.0:
            cache = self.__dict__.setdefault("_matrix_cache", {})
            if dtype not in cache:
                cache[dtype] = csr_tensor(self.crow, self.col, self.values.to(dtype), self.n)
            return cache[dtype]
        values = self.values.clone()
        values[self.diag_pos] -= shift
        return csr_tensor(self.crow, self.col, values.to(dtype), self.n)

    def matmul(self, x: Tensor, chunk: int | None = None) -> Tensor:
        """``M x`` in float64, ``chunk`` columns at a time (cache-sized sparse products)."""
        m = self.matrix()
        if chunk is None or x.shape[1] <= chunk:
            return m @ x
        return torch.cat([m @ x[:, j : j + chunk] for j in range(0, x.shape[1], chunk)], 1)

    # -- the null space -----------------------------------------------------------------

    def _weights(self, dtype: torch.dtype) -> Tensor:
        if dtype == torch.float64:
            return self.null_weights
        cache = self.__dict__.setdefault("_weights_cache", {})
        if dtype not in cache:
            cache[dtype] = self.null_weights.to(dtype)
        return cache[dtype]

    def deflate(self, x: Tensor) -> Tensor:
        """``x - Z Z^T x``: remove the null-space components of the columns of ``x``."""
        if self.num_null == 0:
            return x
        w = self._weights(x.dtype)
        if self.num_null == 1:
            return torch.addmm(x, w[:, None], (w @ x)[None], alpha=-1.0)
        coeff = torch.zeros(self.num_null, x.shape[1], dtype=x.dtype, device=x.device)
        coeff.index_add_(0, self.null_labels, w[:, None] * x)
        return x - w[:, None] * coeff[self.null_labels]

    def deflate_(self, x: Tensor) -> Tensor:
        """In-place :meth:`deflate` (one fused pass when the graph is connected).

        The rank-one update is a GEMM of ``(n, 1) @ (1, k)``, not ``addr_``: BLAS's
        rank-one kernel took 0.94 ms on a 1e5 x 16 float32 block, the GEMM 0.32 ms.
        """
        if self.num_null == 0:
            return x
        if self.num_null == 1:
            w = self._weights(x.dtype)
            return x.addmm_(w[:, None], (w @ x)[None], alpha=-1.0)
        return x.copy_(self.deflate(x))

    def to_scipy(self):
        """``M`` as a ``scipy.sparse.csr_matrix`` (float64, on the CPU)."""
        import scipy.sparse as sp

        return sp.csr_matrix(
            (
                self.values.cpu().numpy(),
                self.col.cpu().numpy().astype("int64"),
                self.crow.cpu().numpy().astype("int64"),
            ),
            shape=(self.n, self.n),
        )


# ---------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------


def _start_block(
    problem: SymmetricProblem, p: int, generator: torch.Generator | None, initial: Tensor | None
) -> Tensor:
    """``p`` orthonormal float64 columns orthogonal to the null space.

    The warm start ``initial`` fills the first columns; the rest are Gaussian, drawn from
    ``generator`` (on the generator's device, then moved).
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    x = torch.randn(problem.n, p, generator=generator, dtype=torch.float64, device=gen_device)
    x = x.to(problem.device)
    if initial is not None:
        q = min(p, initial.shape[1])
        x[:, :q] = initial[:, :q].to(device=problem.device, dtype=torch.float64)
    return _orthonormalize(problem.deflate(x))


def _orthonormalize(x: Tensor, *, drop: bool = False) -> Tensor:
    """Orthonormal basis of the span of the columns: SVQB (Stathopoulos & Wu, 2002), twice.

    The columns are scaled to unit norm, then rotated and scaled by the eigenvectors and
    eigenvalues of their Gram matrix: every output column is a combination of the input
    columns, so the result stays orthogonal to the null space when the input is (a
    Householder QR would complete a rank-deficient block with arbitrary directions). All
    work is matrix-matrix products. Directions whose Gram eigenvalue is below ``1e-12``
    of the largest are dropped (``drop=True``, the block may shrink) or kept at that
    floor (``drop=False``).
    """
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(2):
        gram = x.mT @ x
        scale = gram.diagonal().clamp_min(tiny).rsqrt()
        lam, u = torch.linalg.eigh(gram * scale[:, None] * scale[None, :])
        floor = 1e-12 * lam[-1].clamp_min(tiny)
        if drop:
            keep = lam > floor
            lam, u = lam[keep], u[:, keep]
        else:
            lam = lam.clamp_min(floor)
        x = x @ (scale[:, None] * u * lam.rsqrt())
    return x


def _column_norms(x: Tensor) -> Tensor:
    """Euclidean norms of the columns (a row-major reduction: one pass over ``x``)."""
    return (x * x).sum(0).sqrt()


def _rayleigh_ritz(x: Tensor, mx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Ritz values and rotated ``(X W, M X W)`` for orthonormal ``x``."""
    h = x.mT @ mx
    theta, w = torch.linalg.eigh((h + h.mT) / 2)
    return theta, x @ w, mx @ w


def _spectrum_top(
    problem: SymmetricProblem, generator: torch.Generator | None, steps: int = 24
) -> float:
    """An upper estimate of the largest eigenvalue: ``steps`` Lanczos steps, then
    ``theta_max + 2 |residual| + 1e-3 bound`` (Zhou & Saad's safeguard, with margin),
    capped by the hard bound. A tight upper end widens the relative gap the Chebyshev
    filter sees (15 % fewer products on small-world graphs than the bound 2).
    """
    n = problem.n
    steps = min(steps, n)
    if steps < 2:
        return problem.bound
    m = problem.matrix()
    gen_device = generator.device if generator is not None else torch.device("cpu")
    q = torch.randn(n, 1, generator=generator, dtype=torch.float64, device=gen_device)
    q = problem.deflate(q.to(problem.device))
    q = q / q.norm()
    basis = [q]
    alphas, betas = [], []
    for j in range(steps):
        w = m @ basis[-1]
        alphas.append(float(basis[-1].mT @ w))
        stacked = torch.cat(basis, 1)
        w = w - stacked @ (stacked.mT @ w)  # full reorthogonalization: steps is small
        w = problem.deflate(w)
        beta = float(w.norm())
        if beta <= 1e-12 * problem.bound or j == steps - 1:
            betas.append(beta)
            break
        betas.append(beta)
        basis.append(w / beta)
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(t)
    residual = abs(betas[k - 1] * float(s[-1, -1]))
    return min(problem.bound, float(theta[-1]) + 2.0 * residual + 1e-3 * problem.bound)


def _ritz_pairs(
    name: str, theta: Tensor, x: Tensor, res: Tensor, iterations: int, tol: float
) -> SolverResult:
    """The result of a block solver: its last Ritz pairs (with their residuals ``res``),
    and a warning when they are not converged."""
    if not bool((res <= tol).all()):
        _not_converged(name, iterations, float(res.max()), tol)
    return SolverResult(theta, x, res, iterations)


def _not_converged(name: str, iterations: int, worst: float, tol: float) -> None:
    warnings.warn(
        f"{name} stopped after {iterations} iterations with a largest residual "
        f"{worst:.3g} above the tolerance {tol:.3g}; the eigenpairs are returned with "
        "their residuals (raise max_iter, loosen tol, or try another method)",
        RuntimeWarning,
        stacklevel=4,
    )


# ---------------------------------------------------------------------------------------
# Chebyshev-filtered subspace iteration
# ---------------------------------------------------------------------------------------


def _chebyshev_filter(
    matrix: Tensor,
    problem: SymmetricProblem,
    x: Tensor,
    degree: int,
    lower: float,
    upper: float,
    deflate_every: int,
) -> Tensor:
    """``p(M) x`` with ``p`` the degree-``degree`` Chebyshev polynomial of ``[lower, upper]``.

    ``matrix`` is ``M - c I`` with ``c`` the centre of ``[lower, upper]``. ``p`` is scaled
    so that ``p(0) = 1`` (Zhou & Saad's scaled recurrence: no overflow); it is at most 1
    in magnitude on ``[lower, upper]`` and grows fast below ``lower``. Each step is one
    fused ``addmm`` into the spent block of two steps before (the three-term recurrence
    needs only two live blocks; a fresh multi-MiB block per step was page-faulted every
    time). The null space (eigenvalue 0, the most amplified point) is projected
    out every ``deflate_every`` steps, before its rounding noise can grow.
    """
    half_width = (upper - lower) / 2
    centre = (upper + lower) / 2
    sigma = half_width / (0.0 - centre)
    tau = 2.0 / sigma
    y_prev = x
    y = torch.mm(matrix, x).mul_(sigma / half_width)
    for step in range(2, degree + 1):
        sigma_next = 1.0 / (tau - sigma)
        beta, alpha = -sigma * sigma_next, 2.0 * sigma_next / half_width
        if y_prev is x:  # the caller's block is read, never written
            y_next = torch.addmm(y_prev, matrix, y, beta=beta, alpha=alpha)
        else:  # ours and spent: overwritten in place, no fresh n x k block per step
            y_next = y_prev.addmm_(matrix, y, beta=beta, alpha=alpha)
        if step % deflate_every == 0 or step == degree:
            problem.deflate_(y_next)
        y_prev, y, sigma = y, y_next, sigma_next
    return y


def chebyshev_eigs(
    problem: SymmetricProblem,
    nev: int,
    *,
    tol: float,
    generator: torch.Generator | None,
    initial: Tensor | None = None,
    max_iter: int = 500,
    filter_dtype: torch.dtype = torch.float32,
) -> SolverResult:
    """Chebyshev-filtered subspace iteration for the ``nev`` smallest non-null eigenpairs.

    A block of ``p = nev + max(8, nev // 2)`` vectors is filtered by a Chebyshev polynomial
    that damps ``[a, bound]``, where ``a`` is the largest current Ritz value (an upper
    bound on the ``p``-th eigenvalue), then orthonormalized and rotated by Rayleigh-Ritz.
    The wanted eigenvalues converge at a rate set by their gap to the ``p + 1``-th
    eigenvalue, so the guard vectors make clustered spectra (the bottom of the spectrum
    of large small-world graphs) tractable. The degree of each filter is capped so that no
    component is amplified more than ``_MAX_GROWTH`` over another within one pass.

    Converged when the ``nev`` wanted residuals are at most ``tol * bound``.
    """
    free = problem.n - problem.num_null
    p = min(free, nev + max(8, nev // 2))
    upper = (
        _spectrum_top(problem, generator) if problem.n >= _TOP_ESTIMATE_MIN_NODES else problem.bound
    )
    x = _start_block(problem, p, generator, initial)
    tol_abs = tol * problem.bound

    # whole block at once where it fits in cache (or on GPUs), else cache-line-wide blocks
    def chunk_of(dtype: torch.dtype) -> int:
        whole = problem.n * p * dtype.itemsize <= _CACHE_BYTES or problem.device.type != "cpu"
        return p if whole else _CHUNK[dtype]

    chunk, product_chunk = chunk_of(filter_dtype), chunk_of(torch.float64)
    max_growth = math.log(_MAX_GROWTH[filter_dtype])
    for iteration in range(1, max_iter + 1):
        theta, x, mx = _rayleigh_ritz(x, problem.matmul(x, product_chunk))
        res = _column_norms(mx[:, :nev] - x[:, :nev] * theta[:nev])
        if iteration == max_iter or bool((res <= tol_abs).all()):
            break
        lower = float(theta[-1])
        if not lower < upper:  # the whole block sits at the top: nothing left to damp
            lower = 0.5 * upper
        half_width, centre = (upper - lower) / 2, (upper + lower) / 2
        # growth rates per degree: of the smallest Ritz value, and of the null space
        rate_min = math.acosh(max((centre - float(theta[0])) / half_width, 1.0 + 1e-12))
        rate_null = math.acosh(centre / half_width)
        degree = int(min(_MAX_DEGREE, max(4, max_growth // rate_min)))
        # the null space grows by e^rate_null per step against the least amplified column;
        # it is projected out before its rounding noise grows tenfold (every 2 steps on
        # small-world graphs; letting it grow 1e3-fold stalled float32 filters at 1e-5)
        deflate_every = max(1, int(math.log(10.0) // rate_null))
        matrix = problem.matrix(filter_dtype, shift=centre)
        xf = x.to(filter_dtype)
        filtered = [
            _chebyshev_filter(
                matrix,
                problem,
                xf[:, j : j + chunk].contiguous(),
                degree,
                lower,
                upper,
                deflate_every,
            )
            for j in range(0, p, chunk)
        ]
        x = _orthonormalize(problem.deflate(torch.cat(filtered, 1).to(torch.float64)))
    return _ritz_pairs("chebyshev", theta[:nev], x[:, :nev], res, iteration, tol_abs)


# ---------------------------------------------------------------------------------------
# LOBPCG
# ---------------------------------------------------------------------------------------


def _orthogonalize_against(
    w: Tensor, mw: Tensor | None, bases: list[Tensor], mbases: list[Tensor]
) -> tuple[Tensor, Tensor | None]:
    """Classical Gram-Schmidt twice against orthonormal ``bases``; ``mw`` follows along."""
    for _ in range(2):
        for b, mb in zip(bases, mbases, strict=True):
            c = b.mT @ w
            w = w - b @ c
            if mw is not None:
                mw = mw - mb @ c
    return w, mw


def lobpcg_eigs(
    problem: SymmetricProblem,
    nev: int,
    *,
    tol: float,
    generator: torch.Generator | None,
    initial: Tensor | None = None,
    max_iter: int = _LOBPCG_MAX_ITER,
    precondition: Callable[[Tensor], Tensor] | None = None,
) -> SolverResult:
    """Block LOBPCG for the ``nev`` smallest non-null eigenpairs.

    Block size ``nev + max(4, nev // 2)``; the search space ``[X, W, P]`` is kept
    orthonormal explicitly (Hetmaniuk & Lehoucq, 2006), residual directions ``W`` are
    formed only for the unconverged columns (soft locking), preconditioned by
    ``precondition`` (a symmetric positive definite ``T``: ``W = T R``; none by default),
    and ``M X`` is recomputed each iteration so that the reported residuals are exact.
    Converged when the wanted residuals are at most ``tol * bound``.
    """
    free = problem.n - problem.num_null
    p = min(free, nev + max(4, nev // 2))
    tol_abs = tol * problem.bound
    x = _start_block(problem, p, generator, initial)
    chunk = _CHUNK[torch.float64]
    p_dir: Tensor | None = None
    mp_dir: Tensor | None = None
    for iteration in range(1, max_iter + 1):
        theta, x, mx = _rayleigh_ritz(x, problem.matmul(x, chunk))
        r = mx - x * theta
        norms = _column_norms(r)
        res = norms[:nev]
        if iteration == max_iter or bool((res <= tol_abs).all()):
            break
        active = norms > tol_abs
        w = r[:, active] / norms[active]
        if precondition is not None:
            w = precondition(w)
        w = problem.deflate(w)
        w, _ = _orthogonalize_against(w, None, [x], [mx])
        w = _orthonormalize(w, drop=True)
        mw = problem.matmul(w, chunk)
        blocks, mblocks = [x, w], [mx, mw]
        if p_dir is not None and mp_dir is not None:
            p_dir, mp_dir = _orthogonalize_against(p_dir, mp_dir, blocks, mblocks)
            q, rr = torch.linalg.qr(p_dir)
            diag = rr.diagonal().abs()
            # a (nearly) dependent P block is dropped: LOBPCG restarts as steepest descent
            if bool(diag.min() > 1e-8 * diag.max().clamp_min(1e-300)):
                mp_dir = torch.linalg.solve_triangular(rr, mp_dir, upper=True, left=False)
                blocks.append(q)
                mblocks.append(mp_dir)
        s = torch.cat(blocks, 1)
        ms = torch.cat(mblocks, 1)
        h = s.mT @ ms
        _, c = torch.linalg.eigh((h + h.mT) / 2)
        c = c[:, :p]
        x = _orthonormalize(s @ c)
        p_dir, mp_dir = s[:, p:] @ c[p:], ms[:, p:] @ c[p:]
    return _ritz_pairs("lobpcg", theta[:nev], x[:, :nev], res, iteration, tol_abs)


# ---------------------------------------------------------------------------------------
# ARPACK (SciPy, CPU)
# ---------------------------------------------------------------------------------------


def _deflate_numpy(problem: SymmetricProblem, locked=None):
    """A NumPy version of :meth:`SymmetricProblem.deflate` for one vector; the span of
    ``locked`` (orthonormal columns orthogonal to the null space, or ``None``) is
    projected out too."""
    import numpy as np

    labels = problem.null_labels.cpu().numpy()
    weights = problem.null_weights.cpu().numpy()
    c = problem.num_null

    def deflate(v):
        v = np.asarray(v).reshape(-1)
        if c == 1:
            v = v - weights * (weights @ v)
        elif c > 1:
            coeff = np.bincount(labels, weights=weights * v, minlength=c)
            v = v - weights * coeff[labels]
        if locked is not None:
            v = v - locked @ (locked.T @ v)
        return v

    return deflate


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """SciPy's BLAS on one thread while ARPACK and SuperLU run, when threadpoolctl is
    installed (it comes with scikit-learn).

    Their BLAS calls are small (vector operations and thin matrix-vector products on
    ``ncv`` vectors), and OpenBLAS's threads cost more than they save on them: the
    shift-invert solve on a 1e5-node grid took 2.1 s with two BLAS threads against 1.2 s
    with one on a 2-core machine.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _start_vector(problem: SymmetricProblem, generator: torch.Generator | None):
    gen_device = generator.device if generator is not None else torch.device("cpu")
    v = torch.randn(problem.n, generator=generator, dtype=torch.float64, device=gen_device)
    return _deflate_numpy(problem)(v.cpu().numpy())


def _ncv(problem: SymmetricProblem, nev: int, *, shift_invert: bool = False, locked=None) -> int:
    """ARPACK's ``ncv`` for ``nev`` pairs outside the null space and ``locked``'s span.

    ARPACK's default 2 nev + 1 restarts over and over on clustered spectra; after
    shift-invert the wanted eigenvalues are well separated and 2 nev + 1 is fastest
    (1.23 s against 1.34 s with nev + 32 on a 316 x 316 grid). The check for missed copies
    (:func:`_checked_lanczos`, ``nev = 1`` with ``locked``) seeks the bottom of what is
    left, a cluster: with shift-invert 16 vectors took 25 solves on grids and 137 on a
    Barabasi-Albert graph, against 52 and 1789 with 3.
    """
    least = 2 * nev + 1
    if not shift_invert:
        ncv = max(least, nev + 32)
    else:
        ncv = least if locked is None else max(least, 16)
    free = problem.n - problem.num_null - (0 if locked is None else locked.shape[1])
    return min(free, ncv)


def _from_numpy(problem: SymmetricProblem, values, vectors, iterations: int) -> SolverResult:
    import numpy as np

    order = np.argsort(values)
    theta = torch.from_numpy(np.ascontiguousarray(values[order])).to(problem.device)
    x = torch.from_numpy(np.ascontiguousarray(vectors[:, order])).to(problem.device)
    return SolverResult(theta, x, None, iterations)


def _unconverged_pairs(
    name: str,
    problem: SymmetricProblem,
    nev: int,
    converged,
    iterations: int,
    tol: float,
    generator: torch.Generator | None,
) -> SolverResult:
    """``nev`` pairs after ARPACK stopped at ``max_iter``: it hands back only the pairs that
    converged (possibly none), so the block of those vectors, completed by random ones, is
    rotated by Rayleigh-Ritz; warns with the largest residual of the result."""
    initial = torch.from_numpy(converged) if converged.shape[1] else None
    x = _start_block(problem, nev, generator, initial)
    theta, x, mx = _rayleigh_ritz(x, problem.matmul(x))
    residuals = _column_norms(mx - x * theta)
    _not_converged(name, iterations, float(residuals.max()), tol * problem.bound)
    return SolverResult(theta, x, residuals, iterations)


def _checked_lanczos(
    name: str,
    problem: SymmetricProblem,
    nev: int,
    smallest: Callable,
    count: list[int],
    *,
    tol: float,
    generator: torch.Generator | None,
    max_iter: int | None,
    precondition: Callable[[Tensor], Tensor] | None = None,
) -> SolverResult:
    """ARPACK's ``nev`` smallest non-null eigenpairs, checked for missed copies of a
    repeated eigenvalue. ``smallest(k, locked, v0)`` runs ARPACK from ``v0`` for the ``k``
    smallest eigenpairs outside the null space and the span of ``locked`` (``None``: no
    more); ``count`` holds its operator applications.

    The Krylov space of one start vector holds one direction of each eigenspace: further
    copies of a repeated eigenvalue enter only through rounding, and ARPACK can converge
    without them, with larger eigenvalues in their place and tiny residuals (on a spider
    of 8 legs of 60 nodes, plain ARPACK returned 1 of the 7 copies of the first non-zero
    eigenvalue, shift-invert 5). So one more run, from a fresh start vector, finds the
    smallest eigenvalue outside the span of the found vectors: Lanczos finds an extreme
    eigenvalue reliably, and one copy of a missed eigenvalue is enough to tell. If it lies
    below the largest found eigenvalue by more than the tolerance, block LOBPCG
    (preconditioned by ``precondition``) solves again: its block holds every copy.
    """
    from scipy.sparse.linalg import ArpackNoConvergence

    with _one_blas_thread():
        try:
            values, vectors = smallest(nev, None, _start_vector(problem, generator))
        except ArpackNoConvergence as err:
            return _unconverged_pairs(
                name, problem, nev, err.eigenvectors, count[0], tol, generator
            )
        try:
            outside, _ = smallest(1, vectors, _start_vector(problem, generator))
            missed = bool(outside[0] < values.max() - tol * problem.bound)
        except ArpackNoConvergence:
            missed = True  # not verified: the block solver decides
    if not missed:
        return _from_numpy(problem, values, vectors, count[0])
    return lobpcg_eigs(
        problem,
        nev,
        tol=tol,
        generator=generator,
        max_iter=max_iter or _LOBPCG_MAX_ITER,
        precondition=precondition,
    )


def arpack_eigs(
    problem: SymmetricProblem,
    nev: int,
    *,
    tol: float,
    generator: torch.Generator | None,
    max_iter: int | None = None,
) -> SolverResult:
    """ARPACK's implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``), on the CPU.

    Runs on ``bound I - (M + bound Z Z^T)``, whose largest eigenvalues are the wanted
    ones: the null space is pushed to the other end, and ARPACK's relative tolerance
    becomes an absolute one on ``M``. The start vector comes from ``generator`` (ARPACK's
    own random start made run times vary 11x), and ``ncv = max(2 nev + 1, nev + 32)``.
    The result is checked for missed copies of repeated eigenvalues
    (:func:`_checked_lanczos`).
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    a = problem.to_scipy()
    bound = problem.bound
    count = [0]

    def smallest(k, locked, v0):
        deflate = _deflate_numpy(problem, locked)

        def matvec(v):
            count[0] += 1
            v = v.reshape(-1)
            return bound * deflate(v) - a @ v

        op = LinearOperator(a.shape, matvec=matvec, dtype=a.dtype)
        ncv = _ncv(problem, k, locked=locked)
        values, vectors = eigsh(
            op, k=k, which="LA", v0=deflate(v0), ncv=ncv, tol=tol, maxiter=max_iter
        )
        return bound - values, vectors

    return _checked_lanczos(
        "arpack", problem, nev, smallest, count, tol=tol, generator=generator, max_iter=max_iter
    )


def shift_invert_eigs(
    problem: SymmetricProblem,
    nev: int,
    *,
    tol: float,
    generator: torch.Generator | None,
    max_iter: int | None = None,
) -> SolverResult:
    """ARPACK in shift-invert mode around ``sigma = -1e-5 bound``, on the CPU.

    ``M - sigma I`` is symmetric positive definite; SuperLU factors it with a minimum
    degree ordering of ``M + M^T`` in symmetric mode. The operator
    ``P (M - sigma I)^-1 P`` (``P`` projects out the null space, an invariant subspace)
    maps the wanted eigenvalues to the largest ``1 / (lambda - sigma)`` and the null space
    to 0. Fast when the factors stay sparse (meshes, road networks); small-world graphs
    fill them in. The result is checked for missed copies of repeated eigenvalues
    (:func:`_checked_lanczos`); the factors precondition the block solver that repairs it.
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import LinearOperator, eigsh, splu

    a = problem.to_scipy()
    sigma = -1e-5 * problem.bound
    count = [0]
    with _one_blas_thread():
        lu = splu(
            (a - sigma * sp.identity(problem.n, format="csr")).tocsc(),
            permc_spec="MMD_AT_PLUS_A",
            options={"SymmetricMode": True},
        )

    def smallest(k, locked, v0):
        deflate = _deflate_numpy(problem, locked)

        def solve(v):
            count[0] += 1
            return deflate(lu.solve(deflate(v)))

        op_inv = LinearOperator(a.shape, matvec=solve, dtype=a.dtype)
        return eigsh(
            a,
            k=k,
            sigma=sigma,
            which="LM",
            OPinv=op_inv,
            v0=deflate(v0),
            ncv=_ncv(problem, k, shift_invert=True, locked=locked),
            tol=tol,
            maxiter=max_iter,
        )

    def precondition(r: Tensor) -> Tensor:
        with _one_blas_thread():
            return torch.from_numpy(lu.solve(r.cpu().numpy())).to(r.device)

    return _checked_lanczos(
        "shift_invert",
        problem,
        nev,
        smallest,
        count,
        tol=tol,
        generator=generator,
        max_iter=max_iter,
        precondition=precondition,
    )


def looks_mesh_like(problem: SymmetricProblem) -> bool:
    """Whether the graph is mesh-like: a breadth-first search needs many levels.

    From the node of largest degree, look for a node more than ``4 log2(n) + 10`` hops
    away (Dijkstra with unit weights, cut off at that distance, so small-world graphs
    cost one shallow search). Meshes, road networks and other graphs of large diameter
    have small separators, so their sparse LU factors stay sparse and shift-invert wins;
    small-world graphs (diameter ``O(log n)``) fill the factors in.
    """
    import numpy as np
    import scipy.sparse as sp
    from scipy.sparse.csgraph import dijkstra

    crow = problem.crow.cpu().numpy().astype(np.int64)
    col = problem.col.cpu().numpy().astype(np.int64)
    pattern = sp.csr_matrix((np.ones(col.size), col, crow), shape=(problem.n, problem.n))
    limit = 4.0 * math.log2(max(problem.n, 2)) + 10.0
    degree = np.diff(crow)
    dist = dijkstra(pattern, indices=int(np.argmax(degree)), unweighted=True, limit=limit + 1)
    return bool(np.isfinite(dist).any() and dist[np.isfinite(dist)].max() > limit)
