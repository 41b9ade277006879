"""``minimize``: a :func:`scipy.optimize.minimize`-like entry point for Riemannian problems."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import geoopt
import torch
from torch import Tensor

from torsion.optim._descent import conjugate_gradient, lbfgs, steepest_descent
from torsion.optim._objective import Objective, Point, check_count
from torsion.optim._trust_region import trust_region

__all__ = ["METHODS", "OptimizeResult", "minimize"]

_SOLVERS: dict[str, Callable[..., Iterator[Point]]] = {
    "trust-region": trust_region,
    "cg": conjugate_gradient,
    "lbfgs": lbfgs,
    "sd": steepest_descent,
}
METHODS = tuple(_SOLVERS)


@dataclass(frozen=True)
class OptimizeResult:
    """The outcome of :func:`minimize` (also passed to the callback after each iteration).

    Attributes:
        x: the last iterate, on the manifold, shaped like ``x0``.
        fun: ``fun(x)``.
        grad_norm: the Riemannian norm of the gradient at ``x`` (summed over a batch).
        nit: iterations taken (for ``"trust-region"`` rejected steps count).
        nfev: evaluations of ``fun``, with or without a gradient (those inside
            Hessian-vector products are counted in ``nhvp`` only).
        nhvp: Hessian-vector products (``"trust-region"`` only; 0 otherwise).
        success: whether the gradient norm reached ``tol``.
        message: why the solver stopped.
        history: per iteration, starting with ``x0``: ``"fun"``, ``"grad_norm"`` and
            ``"time"`` (seconds since the start), lists of floats of length ``nit + 1``.
    """

    x: Tensor
    fun: float
    grad_norm: float
    nit: int
    nfev: int
    nhvp: int
    success: bool
    message: str
    history: dict[str, list[float]] = field(repr=False)


def _refuse_scaled(manifold) -> None:
    """``geoopt.Scaled`` (also inside a product) has no consistent model for a solver.

    It multiplies ``retr`` and ``expmap`` steps by ``1 / scale`` but leaves ``inner`` and
    ``egrad2rgrad`` alone, so the slope along a step is ``scale`` times what the gradient
    predicts (and the curvature ``scale^2`` times): line searches and trust-region ratios
    then work against a wrong model. Scaling the metric moves no minimizer.
    """
    if isinstance(manifold, geoopt.Scaled):
        raise TypeError(
            f"minimize does not take geoopt.Scaled (here of {type(manifold.base).__name__}): it "
            "rescales retraction steps by 1/scale but not gradients, which breaks the line "
            "searches' and trust regions' model of the cost; minimize on the unscaled "
            "manifold, whose minimizers are the same"
        )
    if isinstance(manifold, geoopt.ProductManifold):
        for part in manifold.manifolds:
            _refuse_scaled(part)


def _check_start(x0: object, manifold) -> Tensor:
    """``x0`` detached and copied, after checking it is a floating tensor on ``manifold``.

    The tolerance is ``sqrt(eps)`` of the dtype (absolute and relative), as torsion's
    manifolds use for their own ``check=True`` validation.
    """
    if not isinstance(x0, Tensor):
        raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
    _refuse_scaled(manifold)
    if x0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x0 must be float32 or float64, got {x0.dtype}")
    # A copy (the result never aliases the caller's tensor), as a plain tensor (not a
    # geoopt ManifoldTensor, whose subclass dispatch would follow every operation).
    x0 = x0.detach().clone().as_subclass(Tensor)
    ok, reason = manifold.check_point(x0, explain=True)
    if not ok:
        raise ValueError(f"x0 does not have the shape of a point of {manifold}: {reason}")
    tolerance = torch.finfo(x0.dtype).eps ** 0.5
    ok, reason = manifold.check_point_on_manifold(x0, explain=True, atol=tolerance, rtol=tolerance)
    if not ok:
        with torch.no_grad():
            gap = (x0 - manifold.projx(x0)).flatten(start_dim=x0.dim() - manifold.ndim)
            distance = (
                float(gap.norm(dim=-1).max()) if manifold.ndim > 0 else float(gap.abs().max())
            )
        raise ValueError(
            f"x0 is not on the manifold {manifold}: {reason}. Its distance to the manifold "
            f"is {distance:.3g} (the Frobenius norm of x0 - manifold.projx(x0), largest over "
            "the batch); start from manifold.projx(x0)"
        )
    return x0


def _check_options(method: str, options: dict) -> Callable[..., Iterator[Point]]:
    if method not in _SOLVERS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    solver = _SOLVERS[method]
    accepted = [
        name
        for name, parameter in inspect.signature(solver).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for method={method!r}; its options are {accepted}"
        )
    return solver


def minimize(
    fun: Callable[[Tensor], Tensor],
    x0: Tensor,
    manifold,
    method: str = "trust-region",
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
    callback: Callable[[OptimizeResult], object] | None = None,
    **options,
) -> OptimizeResult:
    """Minimize ``fun`` over a Riemannian manifold, like :func:`scipy.optimize.minimize`.

    The Euclidean gradient of ``fun`` comes from autograd and is turned into the Riemannian
    one by ``manifold.egrad2rgrad``. Hessian-vector products (``"trust-region"``) come from
    :mod:`torsion.curvature` (:class:`~torsion.curvature.GradientGraph`: one gradient graph
    per accepted point, reused by every product there), turned into Riemannian ones by the
    manifold's ``ehess2rhess``. The run stops when the Riemannian gradient norm is at most
    ``tol``, after ``max_iter`` iterations, when the callback raises ``StopIteration``, or
    when the solver can make no progress (a failed line search, a non-finite cost).

    Methods and their ``options``:

    * ``"trust-region"``: Riemannian trust regions with a truncated-CG (Steihaug-Toint)
      inner solver (Absil, Baker & Gallivan 2007), with Manopt's and pymanopt's rules and
      defaults. Options: ``radius_max`` (default ``sqrt(p * batch)`` on Stiefel and
      Grassmann, ``sqrt(dim)`` otherwise), ``radius_init`` (``radius_max / 8``),
      ``kappa`` (0.1), ``theta`` (1.0), ``rho_prime`` (0.1), ``rho_regularization``
      (1e3), ``min_inner`` (1), ``max_inner`` (the dimension), ``hvp_method`` (``None``:
      graph reuse; or a method of :func:`torsion.curvature.hvp`, e.g.
      ``"forward_over_reverse"``).
    * ``"cg"``: nonlinear conjugate gradients with vector transport. Options: ``beta``
      (``"hestenes-stiefel"`` (default), ``"polak-ribiere+"``, ``"fletcher-reeves"``,
      ``"dai-yuan"``), ``line_search`` (``"strong-wolfe"`` (default) or ``"armijo"``),
      ``transport`` (``"transp"``: the manifold's ``transp``, default; or
      ``"projection"``: ``proju`` at the new point, Manopt's and pymanopt's choice, cheaper
      where ``transp`` is parallel transport), ``c1`` (1e-4), ``c2`` (0.25),
      ``max_line_evals`` (25).
    * ``"lbfgs"``: Riemannian L-BFGS with vector transport and the cautious update, as
      Manopt's RLBFGS. Options: ``memory`` (30), ``cautious`` (True), ``transport``
      (as for ``"cg"``), ``line_search`` (``"strong-wolfe"``), ``c1`` (1e-4), ``c2``
      (0.9), ``max_line_evals`` (25).
    * ``"sd"``: steepest descent. Options: ``line_search`` (``"armijo"``, or
      ``"strong-wolfe"``), ``c1`` (1e-4), ``c2`` (0.9), ``max_line_evals`` (25).

    Batched points: ``x0`` of shape ``(*batch, *point_shape)`` is one point of the product
    manifold ``M^batch``. ``fun`` returns one scalar (e.g. a sum of independent costs);
    inner products, norms and the stopping test are over the whole batch, and one step
    size (or trust region) serves all of it. geoopt's ``ProductManifold`` of torsion
    manifolds works with every method (its Hessian is assembled part by part).

    Devices: everything stays on ``x0``'s device and dtype, with no NumPy. Values are read
    back to the host only for decisions: the stopping test (once per iteration), each
    line-search trial, and each inner iteration of truncated CG.

    Args:
        fun: maps a point (a tensor shaped like ``x0``) to a scalar tensor. Must be
            differentiable by autograd, twice for ``"trust-region"`` (double backward,
            or ``torch.func`` with ``hvp_method``).
        x0: the starting point, on the manifold (checked, to ``sqrt(eps)`` of its dtype).
            Never modified.
        manifold: a torsion manifold, or any geoopt manifold (``"trust-region"`` needs
            ``ehess2rhess``, see above).
        method: ``"trust-region"`` (default), ``"cg"``, ``"lbfgs"`` or ``"sd"``.
        tol: stop when the Riemannian gradient norm is at most ``tol``.
        max_iter: the most iterations.
        callback: called with an :class:`OptimizeResult` after every iteration (and once
            at ``x0``; its ``history`` is the live record, which keeps growing); raising
            ``StopIteration`` ends the run.
        **options: method options, listed above.

    Returns:
        An :class:`OptimizeResult`.

    Raises:
        ValueError: ``fun`` does not return a scalar; ``fun(x0)`` is not finite; ``x0`` is
            not on the manifold (the message gives its distance to it); unknown method;
            invalid option value.
        TypeError: ``x0`` is not a float tensor; an option the method does not take.

    Shapes:
        ``x0`` and ``result.x``: ``(*batch, *point_shape)``.

    Example:
        >>> from torsion.manifolds import Grassmann
        >>> a = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
        >>> x0 = Grassmann().random(6, 2, dtype=torch.float64,
        ...                          generator=torch.Generator().manual_seed(0))
        >>> result = minimize(lambda x: -torch.trace(x.mT @ a @ x), x0, Grassmann(), tol=1e-10)
        >>> result.success, round(result.fun, 8)  # -(6 + 5): the two largest eigenvalues
        (True, -11.0)
    """
    solver = _check_options(method, options)
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a non-negative number, got {tol!r}")
    max_iter = check_count(max_iter, "max_iter", 0)
    x0 = _check_start(x0, manifold)
    objective = Objective(fun, manifold)
    iterates = solver(objective, x0, **options)
    history: dict[str, list[float]] = {"fun": [], "grad_norm": [], "time": []}
    start = time.perf_counter()
    nit, point, success, message = -1, None, False, ""

    def result() -> OptimizeResult:
        return OptimizeResult(
            x=point.x.clone(),  # a callback that edits it must not move the solver's iterate
            fun=history["fun"][-1],
            grad_norm=history["grad_norm"][-1],
            nit=nit,
            nfev=objective.nfev,
            nhvp=objective.nhvp,
            success=success,
            message=message,
            history=history,
        )

    try:
        while True:
            try:
                point = next(iterates)
            except StopIteration as stop:
                message = stop.value or "the solver stopped"
                break
            nit += 1
            value, grad_norm = torch.stack([point.value, point.grad_norm]).tolist()
            if nit == 0 and not (math.isfinite(value) and math.isfinite(grad_norm)):
                raise ValueError(
                    f"fun(x0) = {value} with gradient norm {grad_norm}: the cost and its "
                    "gradient must be finite at the starting point"
                )
            history["fun"].append(value)
            history["grad_norm"].append(grad_norm)
            history["time"].append(time.perf_counter() - start)
            if not (math.isfinite(value) and math.isfinite(grad_norm)):
                message = "the cost or its gradient is not finite"
                break
            success = grad_norm <= tol
            if success:
                message = f"the gradient norm is at most tol={tol:g}"
            elif nit >= max_iter:
                message = f"reached max_iter={max_iter} iterations"
            if callback is not None:
                try:
                    callback(result())
                except StopIteration:
                    message = message or "stopped by the callback"
                    break
            if message:
                break
    finally:
        iterates.close()
    return result()
