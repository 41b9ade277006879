r"""The Stiefel manifold ``St(n, p) = {X in R^{n x p}: X^T X = I}`` under two metrics.

One class, :class:`Stiefel`, with two metrics and four retractions (the metric changes
every geometric quantity, the retraction only ``retr``):

* ``metric="euclidean"``: the metric ``<U, V> = tr(U^T V)`` inherited from the
  embedding in ``R^{n x p}``;
* ``metric="canonical"``: ``<U, V>_X = tr(U^T (I - X X^T / 2) V)``, the metric of
  ``St(n, p)`` as the quotient ``O(n) / O(n - p)`` (Edelman, Arias & Smith 1998).

Every tangent vector is written ``U = X A + N`` with ``A = X^T U`` skew and ``X^T N = 0``.
Geodesics stay in ``span(X, N)``, so the exponential needs only a ``2p x 2p`` matrix
exponential; it is evaluated in the basis ``[X, N]`` (no QR of ``N``), which keeps it
smooth in ``(X, U)`` even where ``N`` is rank deficient (always when ``n < 2p``).

The logarithm has no closed form for either metric. Both are computed in the
``min(n, 2p)``-dimensional coordinates of ``span(X, Y)``, in float64 whatever the input
dtype:

* canonical metric: Zimmermann's (2017) algebraic algorithm, with the Sylvester-corrected
  update of Zimmermann & Hueper (2022) and a Procrustes-optimal start;
* Euclidean metric: no algebraic algorithm is known to converge as far; a Gauss-Newton
  shooting method on the exact geodesic endpoint equation, started from the canonical
  logarithm. (The fixed-point iteration of Mataigne, Zimmermann & Miolane (2025) was
  tried: on random pairs at distance 2.5 it failed for 8 to 50 % of them depending on
  the shape, at 2.8 for about 70 %; this method for none.)

Both iterations are local. On random draws they recover ``U`` from ``expmap(X, U)`` for
``||U||`` up to about ``2.8``; a pair that does not converge within ``max_iter``
iterations raises a ``RuntimeWarning`` naming the residual. Random Haar points on small
Stiefel manifolds are often farther apart than that, beyond the injectivity radius: there
``dist`` is the length of the geodesic found, not necessarily of the shortest one. The
formulas and their sources are collected in ``docs/manifolds_stiefel_grassmann.md``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from torsion.linalg import cayley_retraction, matrix_exp, polar, qr_unique
from torsion.linalg._orthonormal import reads_freely
from torsion.manifolds._base import Manifold
from torsion.manifolds._matrix import frobenius_inner, sym

__all__ = ["WEIGHT_MANIFOLDS", "Stiefel", "check_weight_manifold"]

#: The constraints torsion's layers accept for their ``weight_manifold`` option (``None``:
#: free weights): the mixing matrices of equivariant and spectral layers live on
#: :class:`Stiefel`.
WEIGHT_MANIFOLDS = ("stiefel",)


def check_weight_manifold(value: object, owner: str) -> str | None:
    """``value`` if it is ``None`` or one of :data:`WEIGHT_MANIFOLDS`; else a ``ValueError``
    that names ``owner``, the layer being built."""
    if value is None or (isinstance(value, str) and value in WEIGHT_MANIFOLDS):
        return value
    raise ValueError(f"{owner}: weight_manifold must be None or 'stiefel', got {value!r}")


_METRICS = ("euclidean", "canonical")

# Absolute floor of the logarithm's convergence test: the rounding level of the float64
# residuals (so a relative tolerance stays attainable as the distance goes to zero).
_RESIDUAL_FLOOR = 64 * torch.finfo(torch.float64).eps

# Below this distance the gradient of ``dist`` (a kink at ``x = y``) is set to zero: the
# logarithm is resolved only to about this absolute accuracy, so its direction is noise.
_DIST_KINK = 1e3 * torch.finfo(torch.float64).eps
_RETRACTIONS = ("qr", "polar", "cayley", "exp")


# ---------------------------------------------------------------------------------------
# Small matrix helpers (shared with the Grassmann manifold)
# ---------------------------------------------------------------------------------------


def _skew(a: Tensor) -> Tensor:
    return (a - a.mT) / 2


def _eye(k: int, like: Tensor) -> Tensor:
    return torch.eye(k, dtype=like.dtype, device=like.device)


def _bmv(scale: Tensor) -> Tensor:
    """A batch of scalars shaped to multiply a batch of matrices."""
    return scale[..., None, None]


def _block(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    return torch.cat([torch.cat([a, b], dim=-1), torch.cat([c, d], dim=-1)], dim=-2)


def _cholesky_qf(a: Tensor) -> Tensor:
    """The ``Q`` factor of ``a = Q R`` with ``diag(R) > 0`` (``qr_unique(a)[0]``) by one
    pass of Cholesky QR: ``R^T R = a^T a``, ``Q = a R^-1``.

    It loses orthogonality like ``eps cond(a)^2``, so it is used only where
    ``cond(a) <= sqrt(2)`` is known in advance: a retraction calls it on ``x + u`` with
    ``u`` tangent, whose singular values are ``sqrt(1 + s_i(u)^2)``, when ``||u||_2 <= 1``.
    (A second pass, CholeskyQR2, does not make it safe for any step: its Gram matrix loses
    the identity part of ``I + u^T u`` once ``eps ||u||_2^2`` nears 1. A rank-one float32
    step of norm 2e4 came back 6e7 away from orthonormal.) Only products and ``p x p``
    factorizations, which batch well on a CPU where Householder QR of tall-skinny
    matrices does not.

    Shapes:
        ``a``: ``(..., n, p)``, ``n >= p``, full column rank; output: ``(..., n, p)``.
    """
    factor, _ = torch.linalg.cholesky_ex(a.mT @ a)
    # a R^-1 as a product with the p x p inverse: a triangular solve with the n x p
    # right-hand side would copy it to and from LAPACK's column-major layout
    eye = _eye(a.shape[-1], a)
    return a @ torch.linalg.solve_triangular(factor, eye, upper=False).mT


def _tangent_part(x: Tensor, u: Tensor) -> Tensor:
    """``u - x sym(x^T u)``, the orthogonal projection onto the tangent space at ``x``.

    Written as ``u - (x (A + A^T)) / 2`` with ``A = x^T u``: the halving is exact, so this
    equals the textbook form bit for bit in one tensor operation fewer (it runs two or
    three times in every optimizer step).
    """
    xtu = x.mT @ u
    return torch.sub(u, x @ (xtu + xtu.mT), alpha=0.5)


def _orthonormal_polar(a: Tensor) -> Tensor:
    """``polar(a)`` passed through the sign-fixed QR, so that it is orthonormal for every
    ``a`` (``projx``).

    For ``a`` of full column rank the polar factor is orthonormal and the QR leaves it
    unchanged (``R = I`` to rounding). For a rank-deficient ``a`` (a zero initialisation,
    repeated columns) the closest orthonormal matrix is not unique and ``a (a^T a)^(-1/2)``
    maps the null directions to zero; the QR then completes the frame, which gives a point
    of the manifold (not necessarily a closest one) instead of a matrix off it. No rank
    test, so no host synchronisation.
    """
    # contiguous: QR's factor is column-major, and geoopt's ProductManifold views it
    return qr_unique(polar(a))[0].contiguous()


def _size(size: tuple) -> tuple[int, ...]:
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = tuple(size[0])
    return tuple(int(s) for s in size)


def _haar_frames(owner: str, size: tuple[int, ...], dtype, device, generator) -> Tensor:
    """Haar-distributed orthonormal ``(..., n, p)`` frames: the sign-fixed QR of a Gaussian.

    Drawn in float64 on the generator's device, then cast and moved.
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{owner}.random supports float32 and float64, not {dtype}")
    draw_device = generator.device if generator is not None else device
    gaussian = torch.randn(size, dtype=torch.float64, device=draw_device, generator=generator)
    # QR returns column-major factors; parameters get row-major strides like every fresh
    # tensor (a clone, since .contiguous() keeps the strides of (n, 1) frames).
    frame = qr_unique(gaussian)[0].to(dtype=dtype, device=device)
    return frame.clone(memory_format=torch.contiguous_format)


def _check_point_reason(x: Tensor, *, atol: float, rtol: float, name: str = "x"):
    """Readable reason why ``x`` does not have orthonormal columns (or ``None``)."""
    x = x.detach()  # a check, not part of any graph (and no warning on a parameter)
    if not bool(torch.isfinite(x).all()):
        return False, f"`{name}` has NaN or infinite entries"
    if x.numel() == 0:
        return True, None
    gram = x.mT @ x
    gap = (gram - _eye(x.shape[-1], x)).abs()
    worst = float(gap.amax())
    if worst > atol + rtol:
        return False, (
            f"`{name}` does not have orthonormal columns: {name}^T {name} deviates from the "
            f"identity by {worst:.3g} (largest entry of |{name}^T {name} - I|; "
            f"atol={atol:g}, rtol={rtol:g})"
        )
    return True, None


def _geodesic_frame(x: Tensor, u: Tensor, coefficient: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(normal, block, a)`` describing the curve ``t -> [x, normal] expm(t block)[:, :p]``.

    With ``a = skew(x^T u)`` and ``N = u - x x^T u`` (so ``x a + N = proju(x, u)``), the
    geodesic with initial velocity ``proju(x, u)`` is
    ``[x, N] expm(t [[c a, -N^T N], [I, 0]]) [I; 0]``: ``c = 1`` for the canonical metric;
    ``c = 2`` and a right factor ``expm(-t a)`` for the Euclidean one; ``c = 0`` (and
    ``a = 0``) for the horizontal Grassmann geodesic. Edelman, Arias & Smith (1998) and
    Zimmermann & Hueper (2022) write it with the thin QR ``N = Q R`` and the skew block
    ``[[c a, -R^T], [R, 0]]``; conjugating by ``diag(I, R)`` gives the form here, which needs
    no QR and stays smooth where ``N`` is rank deficient. ``N`` is divided by a scalar ``s``
    (and the block balanced to match) so the exponentiated matrix has the size of the
    angles; the curve does not depend on ``s``.
    """
    xtu = x.mT @ u
    a = _skew(xtu)
    normal = u - x @ xtu
    scale = torch.linalg.matrix_norm(normal).detach().clamp_min(1.0)
    normal = normal / _bmv(scale)
    gram = normal.mT @ normal * _bmv(scale)
    eye = _eye(a.shape[-1], a).expand_as(a)
    block = _block(coefficient * a, -gram, _bmv(scale) * eye, torch.zeros_like(a))
    return normal, block, a


def _stiefel_exp(x: Tensor, u: Tensor, canonical: bool) -> Tensor:
    """Geodesic endpoint ``Exp_x(proju(x, u))`` of the canonical or the Euclidean metric."""
    x, u = torch.broadcast_tensors(x, u)
    p = x.shape[-1]
    normal, block, a = _geodesic_frame(x, u, 1.0 if canonical else 2.0)
    e = matrix_exp(block)[..., :p]
    y = x @ e[..., :p, :] + normal @ e[..., p:, :]
    return y if canonical else y @ matrix_exp(-a)


def _stiefel_exp_velocity(x: Tensor, u: Tensor, canonical: bool) -> Tensor:
    """Velocity at ``t = 1`` of the geodesic ``t -> Exp_x(t u)``."""
    x, u = torch.broadcast_tensors(x, u)
    p = x.shape[-1]
    normal, block, a = _geodesic_frame(x, u, 1.0 if canonical else 2.0)
    e = matrix_exp(block)[..., :p]
    de = block @ e
    velocity = x @ de[..., :p, :] + normal @ de[..., p:, :]
    if canonical:
        return velocity
    y = x @ e[..., :p, :] + normal @ e[..., p:, :]
    rotation = matrix_exp(-a)
    return (velocity - y @ a) @ rotation


# ---------------------------------------------------------------------------------------
# The logarithm (float64, no autograd: derivatives are supplied by the Functions below)
# ---------------------------------------------------------------------------------------


def _log_special_orthogonal(v: Tensor) -> tuple[Tensor, Tensor]:
    """Real skew logarithm of special orthogonal matrices without the eigenvalue ``-1``,
    and where each has none.

    Through the Cayley transform ``K = (V + I)^-1 (V - I)``, which is skew with eigenvalues
    ``+-i tan(theta / 2)``: ``log V = 2 arctan(K) = K g(K^T K)`` with
    ``g(s) = 2 arctan(sqrt(s)) / sqrt(s)``, from one symmetric eigendecomposition. A ``V``
    with the eigenvalue ``-1`` (a half-turn, such as ``y = -x``: the cut locus) makes
    ``V + I`` singular; its logarithm comes out 0 and flagged, so that the caller reports
    that pair instead of failing the whole batch with a ``LinAlgError``.
    """
    eye = _eye(v.shape[-1], v)
    k, info = torch.linalg.solve_ex(v + eye, v - eye)
    regular = info == 0
    k = torch.where(regular[..., None, None], _skew(k), 0.0)
    lam, w = torch.linalg.eigh(k.mT @ k)
    root = lam.clamp_min(0.0).sqrt()
    safe = torch.where(root > 1e-150, root, torch.ones_like(root))
    factor = torch.where(root > 1e-150, 2.0 * torch.atan(safe) / safe, torch.full_like(root, 2.0))
    return _skew(k @ (w * factor[..., None, :]) @ w.mT), regular


def _sylvester_negative(s: Tensor, c: Tensor) -> Tensor:
    """Solve ``s X + X s = c`` for symmetric ``s`` with spectrum near ``-1/2``.

    Sums of eigenvalues are capped at ``-1/4`` so the step stays bounded far from the
    solution (where ``s`` could lose definiteness); near it they are about ``-1``.
    """
    mu, w = torch.linalg.eigh(s)
    denominator = (mu[..., :, None] + mu[..., None, :]).clamp_max(-0.25)
    return w @ ((w.mT @ c @ w) / denominator) @ w.mT


def _reduced_coordinates(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """An orthonormal ``q`` completing ``x`` to a basis of a space holding ``y``, and ``y``
    in the basis ``[x, q]``.

    For ``n >= 2p`` the Householder QR of ``[x, y - x x^T y]`` gives ``q`` (``n x p``,
    orthogonal to ``x`` even where ``y - x x^T y`` is rank deficient); for ``n < 2p`` the
    complete QR of ``x`` gives its whole orthogonal complement (``n x (n - p)``).
    """
    n, p = x.shape[-2:]
    xty = x.mT @ y
    if n >= 2 * p:
        q = torch.linalg.qr(torch.cat([x, y - x @ xty], dim=-1))[0][..., p:]
    else:
        q = torch.linalg.qr(x, mode="complete")[0][..., p:]
    return q, torch.cat([xty, q.mT @ y], dim=-2)


def _polar_svd(a: Tensor) -> Tensor:
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def _orthogonal_completion(yhat: Tensor) -> Tensor:
    """Columns completing ``yhat`` (``m x p``) to a matrix of ``SO(m)``.

    Of all completions, the one whose lower-right block is symmetric positive
    semi-definite (the "Procrustes preprocessing" of Zimmermann 2017, the completion
    closest to the identity), with one column flipped where the determinant would be -1.
    """
    p = yhat.shape[-1]
    complement = torch.linalg.qr(yhat, mode="complete")[0][..., p:]
    left, _, right_h = torch.linalg.svd(complement[..., p:, :])
    complement = complement @ (right_h.mT @ left.mT)
    determinant = torch.linalg.det(torch.cat([yhat, complement], dim=-1))
    last = left[..., :, -1:]
    flipped = complement - 2.0 * (complement @ last) @ last.mT
    return torch.where(_bmv(determinant < 0), flipped, complement)


def _converged(residual: Tensor, size: Tensor, tol: float) -> Tensor:
    """``residual <= tol * size + floor``: relative, down to what float64 resolves."""
    return residual <= tol * size + _RESIDUAL_FLOOR


def _canonical_log_reduced(
    yhat: Tensor, tol: float, max_iter: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Zimmermann's algorithm in reduced coordinates: ``yhat = expm([[A, -B^T], [B, 0]])[:, :p]``.

    Iterates on the completion ``C`` of ``V = [yhat, C]`` until the lower-right block of
    ``log V`` vanishes. The update ``C <- C expm(X)`` with ``S X + X S = L22`` and
    ``S = B B^T / 12 - I / 2`` is the Sylvester-corrected step of Zimmermann & Hueper (2022)
    (``X = -L22`` is the original 2017 step).

    Returns ``(A, B, residual, converged)``, ``residual = ||L22||_F``, converged where it
    is at most ``tol ||L||_F`` (plus a rounding floor).
    """
    m, p = yhat.shape[-2:]
    r = m - p
    if r == 0:
        log, regular = _log_special_orthogonal(yhat)
        residual = torch.where(regular, 0.0, math.inf).to(yhat.dtype)
        return _skew(log), yhat.new_zeros((*yhat.shape[:-2], 0, p)), residual, regular
    completion = _orthogonal_completion(yhat)
    eye = _eye(r, yhat)
    for iteration in range(max_iter + 1):
        log, regular = _log_special_orthogonal(torch.cat([yhat, completion], dim=-1))
        lower = log[..., p:, p:]
        residual = torch.where(regular, torch.linalg.matrix_norm(lower), math.inf)
        converged = _converged(residual, torch.linalg.matrix_norm(log), tol) & regular
        if iteration == max_iter or bool(converged.all()):
            break
        b = log[..., p:, :p]
        step = _sylvester_negative(b @ b.mT / 12.0 - 0.5 * eye, lower)
        completion = completion @ matrix_exp(_skew(step))
    return _skew(log[..., :p, :p]), log[..., p:, :p], residual, converged


def _euclidean_endpoint(a: Tensor, b: Tensor) -> Tensor:
    """``expm([[2A, -B^T], [B, 0]])[:, :p] expm(-A)``: the Euclidean geodesic endpoint."""
    p, r = a.shape[-1], b.shape[-2]
    zeros = a.new_zeros((*a.shape[:-2], r, r))
    e = matrix_exp(_block(2.0 * a, -b.mT, b, zeros))[..., :p]
    return e @ matrix_exp(-a)


def _conjugate_gradient(
    operator: Callable[..., tuple[Tensor, ...]],
    rhs: tuple[Tensor, ...],
    *,
    max_iter: int,
    rtol: float,
) -> tuple[Tensor, ...]:
    """Batched conjugate gradients on tuples of matrices (a symmetric PSD ``operator``).

    Each batch element has its own step sizes; the loop stops when every relative
    residual is below ``rtol`` (one host synchronisation per iteration).
    """

    def dot(u: tuple[Tensor, ...], v: tuple[Tensor, ...]) -> Tensor:
        return sum(frobenius_inner(a, b) for a, b in zip(u, v, strict=True))

    solution = tuple(torch.zeros_like(t) for t in rhs)
    residual = rhs
    direction = rhs
    rs = dot(residual, residual)
    threshold = rtol**2 * rs
    for _ in range(max_iter):
        if bool((rs <= threshold).all()):
            break
        image = operator(*direction)
        curvature = dot(direction, image)
        ok = (curvature > 0) & (rs > threshold)
        alpha = torch.where(ok, rs / torch.where(ok, curvature, 1.0), 0.0)
        solution = tuple(s + _bmv(alpha) * d for s, d in zip(solution, direction, strict=True))
        residual = tuple(r - _bmv(alpha) * q for r, q in zip(residual, image, strict=True))
        rs_new = dot(residual, residual)
        beta = torch.where(ok, rs_new / torch.where(rs > 0, rs, 1.0), 0.0)
        direction = tuple(r + _bmv(beta) * d for r, d in zip(residual, direction, strict=True))
        rs = rs_new
    return solution


# Up to this many unknowns (p <= 12 or so) the Gauss-Newton step uses the dense Jacobian
# (one vmapped forward-mode pass and a small least-squares solve); beyond, matrix-free
# conjugate gradients on the normal equations.
_DENSE_NEWTON_UNKNOWNS = 256


def _gauss_newton_step(yhat: Tensor, a: Tensor, b: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares solution ``(dA, dB)`` of ``J [dA, dB] = -value`` (``dA`` skew)."""
    p, r = a.shape[-1], b.shape[-2]
    upper = torch.triu_indices(p, p, 1, device=a.device)
    unknowns = upper.shape[1] + r * p
    if unknowns <= _DENSE_NEWTON_UNKNOWNS:

        def unpack(theta: Tensor) -> tuple[Tensor, Tensor]:
            strict = theta.new_zeros(p, p).index_put((upper[0], upper[1]), theta[: upper.shape[1]])
            return strict - strict.mT, theta[upper.shape[1] :].reshape(r, p)

        def endpoint(theta: Tensor) -> Tensor:
            return _euclidean_endpoint(*unpack(theta)).reshape(-1)

        batch = a.shape[:-2]
        theta = torch.cat([a[..., upper[0], upper[1]], b.flatten(-2)], dim=-1).reshape(-1, unknowns)
        jacobian = torch.func.vmap(torch.func.jacfwd(endpoint))(theta)
        rhs = -value.flatten(-2).reshape(-1, value.shape[-2] * p, 1)
        normal = jacobian.mT @ jacobian
        # A relative Levenberg-Marquardt shift of the order of eps keeps the solve defined at
        # (numerically) singular Jacobians (conjugate points) without changing a good step.
        shift = 1e-14 * normal.diagonal(dim1=-2, dim2=-1).amax(dim=-1)
        normal = normal + _bmv(shift) * _eye(unknowns, normal)
        delta = torch.linalg.solve(normal, jacobian.mT @ rhs)[..., 0].reshape(*batch, unknowns)
        da, db = torch.func.vmap(unpack)(delta.reshape(-1, unknowns))
        return da.reshape(*batch, p, p), db.reshape(*batch, r, p)

    def residual_of(a_: Tensor, b_: Tensor) -> Tensor:
        return _euclidean_endpoint(_skew(a_), b_) - yhat

    _, pullback = torch.func.vjp(residual_of, a, b)

    def normal_operator(da: Tensor, db: Tensor) -> tuple[Tensor, Tensor]:
        _, image = torch.func.jvp(residual_of, (a, b), (da, db))
        ga, gb = pullback(image)
        return _skew(ga), gb

    ga, gb = pullback(value)
    return _conjugate_gradient(
        normal_operator, (-_skew(ga), -gb), max_iter=2 * unknowns + 10, rtol=1e-10
    )


def _euclidean_log_reduced(
    yhat: Tensor, a: Tensor, b: Tensor, tol: float, max_iter: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gauss-Newton shooting for ``_euclidean_endpoint(A, B) = yhat`` from ``(A, B)``.

    Each step solves the linearized endpoint equation over skew ``A`` and free ``B`` in the
    least-squares sense, followed by a backtracking line search on the residual.
    Converges quadratically near a solution.
    """

    def size() -> Tensor:
        return (torch.linalg.matrix_norm(a) ** 2 + torch.linalg.matrix_norm(b) ** 2).sqrt()

    value = _euclidean_endpoint(a, b) - yhat
    residual = torch.linalg.matrix_norm(value)
    for iteration in range(max_iter + 1):
        converged = _converged(residual, size(), tol)
        if iteration == max_iter or bool(converged.all()):
            break
        da, db = _gauss_newton_step(yhat, a, b, value)
        step = torch.ones_like(residual)
        for _ in range(40):
            trial = _euclidean_endpoint(a + _bmv(step) * da, b + _bmv(step) * db) - yhat
            worse = (torch.linalg.matrix_norm(trial) >= residual) & ~converged
            if not bool(worse.any()):
                break
            step = torch.where(worse, step / 2, step)
        step = torch.where(worse, 0.0, step)
        a, b = a + _bmv(step) * da, b + _bmv(step) * db
        value = _euclidean_endpoint(a, b) - yhat
        residual = torch.linalg.matrix_norm(value)
    return _skew(a), b, residual, converged


def _length(a: Tensor, b: Tensor) -> Tensor:
    """``sqrt(||A||^2 + ||B||^2)``: the Frobenius norm of ``x A + Q B``."""
    return (torch.linalg.matrix_norm(a) ** 2 + torch.linalg.matrix_norm(b) ** 2).sqrt()


def _warn_if_longer(length: Tensor, bound: Tensor, converged: Tensor) -> None:
    """Warn where the Euclidean shooting converged to a geodesic longer than ``bound``.

    Shooting only drives the endpoint's residual down, and far apart it can land on a
    long geodesic that also reaches ``y`` (140 where a curve of length 3.8 joins the
    points, on St(5, 2)): a logarithm, but not the shortest one.
    """
    longer = converged & (length > bound * (1 + 1e-6))
    if bool(longer.any()):
        index = int(longer.nonzero()[0, 0]) if longer.dim() else 0
        found = float(length.reshape(-1)[index])
        shorter = float(bound.reshape(-1)[index])
        warnings.warn(
            f"Stiefel.logmap (euclidean metric): for {int(longer.sum())} of {longer.numel()} "
            f"point pairs the geodesic found is longer than the canonical geodesic joining "
            f"the same points (e.g. {found:.3g} against {shorter:.3g}): a logarithm, but "
            "not the shortest one; the points are far apart (see the Stiefel docs)",
            RuntimeWarning,
            stacklevel=4,
        )


def _stiefel_log(
    x: Tensor, y: Tensor, canonical: bool, tol: float, max_iter: int
) -> tuple[Tensor, Tensor]:
    """``(logmap(x, y), dist(x, y))`` in float64 (detached); warns where not converged."""
    with torch.no_grad():
        x64, y64 = (t.detach().to(torch.float64) for t in torch.broadcast_tensors(x, y))
        # the shooting iteration would run to max_iter on non-finite input (seconds per
        # call); this path synchronises anyway, so say what is wrong instead
        if not bool(torch.isfinite(x64).all() & torch.isfinite(y64).all()):
            raise ValueError("Stiefel.logmap: `x` or `y` has NaN or infinite entries")
        n, p = x64.shape[-2:]
        q, yhat = _reduced_coordinates(x64, y64)
        yhat = _polar_svd(yhat)
        if q.shape[-1] == 0:
            determinant = torch.linalg.det(yhat)
            if bool((determinant < 0).any()):
                count = int((determinant < 0).sum())
                raise ValueError(
                    f"St({n}, {p}) = O({p}) has two connected components and {count} point "
                    "pairs lie in different ones (det(x^T y) < 0): no geodesic joins them"
                )
        a, b, residual, converged = _canonical_log_reduced(yhat, tol, max_iter)
        if not canonical:
            # the canonical geodesic also joins x and y, with constant Euclidean speed
            # ||(a, b)||: its Euclidean length bounds the Euclidean distance
            bound = torch.where(converged, _length(a, b), math.inf)
            a, b, residual, converged = _euclidean_log_reduced(yhat, a, b, tol, max_iter)
            _warn_if_longer(_length(a, b), bound, converged)
        failed = ~converged
        if bool(failed.any()):
            worst = float(residual.nan_to_num(float("inf")).amax())
            warnings.warn(
                f"Stiefel.logmap ({'canonical' if canonical else 'euclidean'} metric) did not "
                f"converge in {max_iter} iterations for {int(failed.sum())} of "
                f"{failed.numel()} point pairs (largest residual {worst:.3g}, relative tol "
                f"{tol:g}). "
                "The iteration is local: the points are probably farther apart than about "
                "2.8, near or beyond the injectivity radius (see the Stiefel docs).",
                RuntimeWarning,
                stacklevel=4,
            )
        delta = x64 @ a + q @ b
        squared = (a * a).sum(dim=(-2, -1)) * (0.5 if canonical else 1.0) + (b * b).sum(
            dim=(-2, -1)
        )
    return delta.to(x.dtype), squared.sqrt().to(x.dtype)


def _lower_index(x: Tensor, v: Tensor, canonical: bool) -> Tensor:
    """The Euclidean gradient whose Riemannian gradient is the tangent vector ``v``:
    ``<lowered, w>_F = <v, w>_x`` for tangent ``w``."""
    return v - 0.5 * x @ (x.mT @ v) if canonical else v


class _StiefelLog(torch.autograd.Function):
    """``logmap`` with a backward by implicit differentiation of ``Exp_x(Log_x(y)) = y``.

    With ``J = D_u Exp_x(u)`` at ``u = Log_x(y)`` (a bijection ``T_x -> T_y``), the vjp of a
    cotangent ``G`` is ``grad_y = lam``, ``grad_x = -(D_x Exp)^T lam - Log_x(y) sym(x^T G)``
    where ``lam`` in ``T_y`` solves ``J^T lam = proj_x(G)``; it is found by conjugate
    gradients on ``J J^T lam = J proj_x(G)`` (the second term of ``grad_x`` keeps the
    output tangent to the moving ``x``). First order only.
    """

    @staticmethod
    def forward(ctx, x, y, canonical, tol, max_iter):
        delta, _ = _stiefel_log(x, y, canonical, tol, max_iter)
        ctx.save_for_backward(x, delta)
        ctx.canonical = canonical
        return delta

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, delta = ctx.saved_tensors
        canonical = ctx.canonical
        x64, d64, g64 = (t.to(torch.float64) for t in torch.broadcast_tensors(x, delta, grad))

        def exp_of(u: Tensor) -> Tensor:
            return _stiefel_exp(x64, u, canonical)

        target = g64 - x64 @ sym(x64.mT @ g64)
        _, pullback = torch.func.vjp(exp_of, d64)

        def forward_map(v: Tensor) -> Tensor:
            return torch.func.jvp(exp_of, (d64,), (v,))[1]

        (lam,) = _conjugate_gradient(
            lambda v: (forward_map(pullback(v)[0]),),
            (forward_map(target),),
            max_iter=4 * x.shape[-2] * x.shape[-1] + 10,
            rtol=1e-12,
        )
        grad_x = grad_y = None
        if ctx.needs_input_grad[0]:
            _, pullback_x = torch.func.vjp(lambda z: _stiefel_exp(z, d64, canonical), x64)
            grad_x = -pullback_x(lam)[0] - d64 @ sym(x64.mT @ g64)
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_y = lam.to(x.dtype)
        return grad_x, grad_y, None, None, None


class _StiefelDist(torch.autograd.Function):
    """``dist`` with the closed-form gradient of the Riemannian distance.

    ``grad_x d = -Log_x(y) / d`` and ``grad_y d = gamma'(1) / d`` (the geodesic's velocity
    at ``y``, which is ``-Log_y(x)``), returned as Euclidean gradients (index lowered by the
    metric, so ``egrad2rgrad`` maps them back). Zero where ``d = 0``. First order only.
    """

    @staticmethod
    def forward(ctx, x, y, canonical, tol, max_iter):
        delta, distance = _stiefel_log(x, y, canonical, tol, max_iter)
        ctx.save_for_backward(x, y, delta, distance)
        ctx.canonical = canonical
        return distance

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, y, delta, distance = ctx.saved_tensors
        canonical = ctx.canonical
        positive = distance > _DIST_KINK
        scale = _bmv(torch.where(positive, grad / torch.where(positive, distance, 1.0), 0.0))
        grad_x = grad_y = None
        if ctx.needs_input_grad[0]:
            grad_x = -_lower_index(x, delta, canonical) * scale
        if ctx.needs_input_grad[1]:
            velocity = _stiefel_exp_velocity(x, delta, canonical)
            grad_y = _lower_index(y, velocity, canonical) * scale
        return grad_x, grad_y, None, None, None


# ---------------------------------------------------------------------------------------
# The manifold
# ---------------------------------------------------------------------------------------


class _OrthonormalFrames(Manifold):
    """Shared checks of manifolds whose points are ``(..., n, p)`` orthonormal frames.

    Subclasses give the tangency residual (``x^T u + u^T x`` for Stiefel, ``x^T u`` for
    the horizontal space of Grassmann) and how to describe it.
    """

    _tangent_condition = ""

    def _tangent_residual(self, x: Tensor, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _check_shape(self, shape, name):
        if len(shape) < 2 or shape[-2] < shape[-1]:
            return False, (
                f"`{name}` must be a batch of tall matrices of shape (..., n, p) with "
                f"n >= p, got shape {tuple(shape)}"
            )
        return True, None

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        return _check_point_reason(x, atol=atol, rtol=rtol)

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5, name="u"):
        if not bool(torch.isfinite(u).all()):
            return False, f"`{name}` has NaN or infinite entries"
        if u.numel() == 0:
            return True, None
        worst = float(self._tangent_residual(x, u).abs().amax())
        if worst > atol + rtol * max(1.0, float(u.abs().amax())):
            condition = self._tangent_condition.replace("u", name)
            return False, (
                f"`{name}` is not {condition} should vanish, its largest entry is "
                f"{worst:.3g} (atol={atol:g}, rtol={rtol:g})"
            )
        return True, None

    def _point_reason(self, x, name):
        tolerance = torch.finfo(x.dtype).eps ** 0.5
        return _check_point_reason(x, atol=tolerance, rtol=0.0, name=name)

    def _vector_reason(self, x, u, name):
        tolerance = torch.finfo(x.dtype).eps ** 0.5
        return self._check_vector_on_tangent(x, u, atol=tolerance, rtol=tolerance, name=name)


class Stiefel(_OrthonormalFrames):
    r"""Matrices with orthonormal columns, ``St(n, p) = {X in R^{n x p}: X^T X = I}``.

    Shape-agnostic (``n >= p`` from the tensors) and batched over leading dimensions.
    Tangent vectors at ``X`` are ``U`` with ``X^T U`` skew. Formulas (Edelman, Arias &
    Smith 1998; Absil, Mahony & Sepulchre 2008), with ``sym(A) = (A + A^T) / 2``:

    * ``inner``: ``tr(U^T V)`` (Euclidean) or ``tr(U^T (I - X X^T / 2) V)`` (canonical);
    * ``proju(X, U) = U - X sym(X^T U)`` (orthogonal projection, both metrics);
    * ``egrad2rgrad(X, G)``: ``proju(X, G)`` (Euclidean) or ``G - X G^T X`` (canonical);
    * ``projx(X)``: the orthogonal polar factor ``X (X^T X)^(-1/2)``, the closest point
      (completed to an orthonormal frame when ``X`` is rank-deficient);
    * ``retr``: ``qr`` (``qf(X + U)``, sign-fixed), ``polar`` (``polar(X + U)``),
      ``cayley`` (Wen & Yin 2013, a ``2p x 2p`` solve) or ``exp`` (the exponential map);
    * ``expmap``: the geodesic of the chosen metric through a ``2p x 2p`` matrix
      exponential (Edelman et al. 1998, written in the basis ``[X, N]``);
    * ``logmap`` / ``dist``: iterative (Zimmermann 2017 for the canonical metric, Newton
      shooting from it for the Euclidean one), float64 inside, tolerance ``tol`` on the
      residual of the geodesic endpoint equation, at most ``max_iter`` iterations;
      ``dist`` has the closed-form gradient ``-Log_x(y) / d``;
    * ``transp(X, Y, V) = proju(Y, V)``: a vector transport, **not** parallel transport;
    * ``ehess2rhess``: ``proju(X, H - U sym(X^T G))`` (Euclidean) and, for the canonical
      metric, the Riesz representative of Edelman et al.'s Hessian form;
    * ``random``: Haar-distributed (sign-fixed QR of a Gaussian matrix);
    * ``frechet_mean``: Karcher flow (inherited).

    Args:
        metric: ``"euclidean"`` (default) or ``"canonical"``.
        retraction: ``"qr"`` (default), ``"polar"``, ``"cayley"`` or ``"exp"``.
        tol: relative convergence tolerance of ``logmap`` / ``dist``: the Frobenius norm of
            the residual (in reduced float64 coordinates) against that of the solution;
            default ``1e-11``.
        max_iter: iteration cap of ``logmap`` / ``dist``; default 100.
        check: validate points (orthonormal columns) and tangent vectors on every call
            (a host synchronisation); shapes are always validated.

    Shapes:
        points and tangent vectors ``(..., n, p)`` with ``n >= p``; scalars ``(...)``.

    Example:
        >>> st = Stiefel(metric="canonical", retraction="cayley")
        >>> x = torch.eye(4, 2, dtype=torch.float64)
        >>> u = st.proju(x, torch.ones(4, 2, dtype=torch.float64))
        >>> y = st.expmap(x, u)
        >>> torch.allclose(st.logmap(x, y), u)
        True
        >>> st.dim((4, 2))
        5
    """

    _point_description = "a point of the Stiefel manifold"
    _vector_description = "a tangent vector"
    _tangent_condition = "tangent: x^T u + u^T x"

    ndim = 2
    reversible = False

    def __init__(
        self,
        metric: str = "euclidean",
        retraction: str = "qr",
        *,
        tol: float = 1e-11,
        max_iter: int = 100,
        check: bool = False,
    ) -> None:
        super().__init__()
        if metric not in _METRICS:
            raise ValueError(f"Stiefel metric must be one of {_METRICS}, got {metric!r}")
        if retraction not in _RETRACTIONS:
            raise ValueError(
                f"Stiefel retraction must be one of {_RETRACTIONS}, got {retraction!r}"
            )
        if not (float(tol) > 0):
            raise ValueError(f"Stiefel tol must be a positive number, got {tol!r}")
        if int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"Stiefel max_iter must be a positive integer, got {max_iter!r}")
        self.metric = metric
        self.retraction = retraction
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.check = bool(check)

    @property
    def canonical(self) -> bool:
        return self.metric == "canonical"

    @property
    def name(self) -> str:  # geoopt uses it in its messages
        return "Stiefel"

    def extra_repr(self) -> str:
        text = f"metric={self.metric!r}, retraction={self.retraction!r}"
        return text + (", check=True" if self.check else "")

    # -- validation ------------------------------------------------------------------------

    def _tangent_residual(self, x, u):
        return 2.0 * sym(x.mT @ u)

    # -- metric ------------------------------------------------------------------------------

    def dim(self, shape) -> int:
        """``n p - p (p + 1) / 2``."""
        ok, reason = self._check_shape(tuple(shape), "shape")
        if not ok:
            raise ValueError(reason)
        n, p = shape[-2:]
        return n * p - p * (p + 1) // 2

    def inner(self, x: Tensor, u: Tensor, v: Tensor | None = None, *, keepdim: bool = False):
        """``tr(u^T v)`` (Euclidean) or ``tr(u^T v) - tr((x^T u)^T (x^T v)) / 2`` (canonical)."""
        self._validate("inner", {"x": x}, {"u": u} if v is None else {"u": u, "v": v})
        v = u if v is None else v
        value = frobenius_inner(u, v, keepdim)
        if self.canonical:
            value = value - 0.5 * frobenius_inner(x.mT @ u, x.mT @ v, keepdim)
        return value

    def norm(self, x: Tensor, u: Tensor, *, keepdim: bool = False) -> Tensor:
        return self.inner(x, u, keepdim=keepdim).clamp_min(0).sqrt()

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        """``u - x sym(x^T u)``: the orthogonal projection onto the tangent space."""
        self._validate("proju", {"x": x}, ambient={"u": u})
        return _tangent_part(x, u)

    def egrad2rgrad(self, x: Tensor, u: Tensor) -> Tensor:
        """``proju(x, u)`` (Euclidean) or ``u - x u^T x`` (canonical)."""
        self._validate("egrad2rgrad", {"x": x}, ambient={"u": u})
        if self.canonical:
            return u - x @ (u.mT @ x)
        return _tangent_part(x, u)

    def projx(self, x: Tensor) -> Tensor:
        """Closest point: the orthogonal polar factor ``x (x^T x)^(-1/2)``; for a
        rank-deficient ``x``, where it is not unique, an orthonormal completion
        (:func:`_orthonormal_polar`)."""
        self._validate("projx", {}, ambient={"x": x})
        return _orthonormal_polar(x)

    # -- retraction, exponential, logarithm -----------------------------------------------

    def retr(self, x: Tensor, u: Tensor) -> Tensor:
        """The retraction chosen at construction (``qr``, ``polar``, ``cayley`` or ``exp``)."""
        self._validate("retr", {"x": x}, {"u": u})
        if self.retraction == "qr":
            return qr_unique(x + u)[0]
        if self.retraction == "polar":
            return polar(x + u)
        if self.retraction == "cayley":
            return cayley_retraction(x, u)
        return _stiefel_exp(x, u, self.canonical)

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        """Geodesic endpoint of the chosen metric (of ``proju(x, u)`` for non-tangent ``u``)."""
        self._validate("expmap", {"x": x}, {"u": u})
        return _stiefel_exp(x, u, self.canonical)

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        """Riemannian logarithm by the local iteration of the metric (see the class notes).

        Differentiable (first order) by implicit differentiation of ``Exp_x(Log_x(y)) = y``.
        Warns with ``RuntimeWarning`` where the iteration did not converge.
        """
        self._validate("logmap", {"x": x, "y": y})
        x, y = torch.broadcast_tensors(x, y)
        return _StiefelLog.apply(x, y, self.canonical, self.tol, self.max_iter)

    def dist(self, x: Tensor, y: Tensor, *, keepdim: bool = False) -> Tensor:
        """Geodesic distance ``||Log_x(y)||_x``, with the closed-form (first-order) gradient."""
        self._validate("dist", {"x": x, "y": y})
        x, y = torch.broadcast_tensors(x, y)
        distance = _StiefelDist.apply(x, y, self.canonical, self.tol, self.max_iter)
        return distance[..., None, None] if keepdim else distance

    def dist2(self, x: Tensor, y: Tensor, *, keepdim: bool = False) -> Tensor:
        return self.dist(x, y, keepdim=keepdim) ** 2

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """Projection vector transport ``proju(y, v)``: tangent at ``y``, not isometric."""
        self._validate("transp", {"x": x, "y": y}, {"v": v})
        return _tangent_part(y, v)

    #: :meth:`retr_transp` takes ``step_bound`` (optimizers that know a bound pass it).
    retr_transp_takes_step_bound = True

    def retr_transp(
        self, x: Tensor, u: Tensor, v: Tensor, *, step_bound: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`retr` of ``u`` and :meth:`transp` of ``v`` to the new point, in one call.

        With the ``qr`` retraction and a bound of at most 1 on every ``||u||_2``,
        ``qf(x + u)`` is computed by one pass of Cholesky QR (:func:`_cholesky_qf`):
        ``p x p`` Gram matrices, matrix products and a ``p x p`` triangular inverse, equal
        to :meth:`retr`'s Householder QR to rounding (``x + u`` then has condition number at
        most ``sqrt(2)``) and about 2x faster than it on a CPU on batches of ``256 x 32``
        matrices. The bound is ``step_bound`` when given; on the CPU (outside
        ``torch.compile``) it is otherwise the largest ``||u||_F``, whose reading costs one
        reduction and no device synchronisation. Without a bound, or above 1, it is
        :meth:`retr`'s Householder QR, which stays orthonormal to rounding for any step.
        Other retractions are :meth:`retr`'s.

        Args:
            x: points.
            u: tangent steps.
            v: tangent vectors to transport.
            step_bound: a bound on every ``||u||_2`` known without reading ``u`` (an
                optimizer derives one from its hyperparameters, see
                :class:`~torsion.optim.RiemannianAdam`). Not checked; ``None`` (default):
                no bound.

        Shapes:
            ``x``, ``u``, ``v``: ``(..., n, p)``; outputs: ``(..., n, p)`` each.
        """
        self._validate("retr_transp", {"x": x}, {"u": u, "v": v})
        if self.retraction == "qr" and step_bound is None and reads_freely(u):
            norms = torch.linalg.matrix_norm(u)  # ||u||_F >= ||u||_2
            step_bound = float(norms.amax() if norms.dim() else norms)
        if self.retraction == "qr" and step_bound is not None and step_bound <= 1.0:
            y = _cholesky_qf(x + u)
        else:
            y = self.retr(x, u)
        return y, _tangent_part(y, v)

    # -- second order --------------------------------------------------------------------------

    def ehess2rhess(self, x: Tensor, egrad: Tensor, ehess: Tensor, u: Tensor) -> Tensor:
        """Riemannian Hessian-vector product from the Euclidean gradient and Hessian product.

        Euclidean metric: ``proju(x, ehess - u sym(x^T egrad))`` (Absil, Mahony & Sepulchre
        2008, ch. 5; the Weingarten map of the embedded submanifold). Canonical metric:
        the Hessian form of Edelman et al. (1998) for that metric,
        ``H(u, v) = <ehess, v> + tr((G^T u x^T + x^T u G^T) v) / 2
        - tr((x^T G + G^T x) u^T (I - x x^T) v) / 2``, turned into a tangent vector by the
        canonical Riesz map ``E -> E - x E^T x``.
        """
        self._validate("ehess2rhess", {"x": x}, {"u": u}, ambient={"egrad": egrad, "ehess": ehess})
        if not self.canonical:
            w = ehess - u @ sym(x.mT @ egrad)
            return w - x @ sym(x.mT @ w)
        xtg = x.mT @ egrad
        normal_u = u - x @ (x.mT @ u)
        form = (
            ehess
            + 0.5 * (x @ (u.mT @ egrad) + egrad @ (u.mT @ x))
            - 0.5 * normal_u @ (xtg + xtg.mT)
        )
        return form - x @ (form.mT @ x)

    # -- sampling ----------------------------------------------------------------------------

    def random(
        self,
        *size,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Haar-distributed points: the sign-fixed QR factor of a Gaussian matrix.

        Args:
            size: shape ``(..., n, p)`` with ``n >= p``, as integers or one tuple.
            dtype: float32 or float64; the default dtype when omitted.
            device: device of the result (the draw happens on the generator's device).
            generator: source of randomness.
        """
        size = _size(size)
        ok, reason = self._check_shape(size, "size")
        if not ok:
            raise ValueError(f"Stiefel.random: {reason}")
        return _haar_frames("Stiefel", size, dtype, device, generator)
