"""Line searches along a retraction curve, shared by steepest descent, CG and L-BFGS.

Both searches work on ``phi(t) = f(retr(x, t d))`` with ``phi'(0) = <grad f(x), d>_x < 0``:

* :func:`armijo`: backtracking until ``phi(t) <= phi(0) + c1 t phi'(0)``; evaluates ``f``
  only (the gradient is taken once, at the accepted point, from the graph of that
  evaluation);
* :func:`strong_wolfe`: also asks ``|phi'(t)| <= c2 |phi'(0)|``. ``phi'(t)`` is the exact
  derivative along the retraction curve, ``<grad f(y), D retr(x)[t d][d]>``, from one
  backward pass through ``retr`` and ``f`` (Ring & Wirth 2012; Sato 2016), not a
  vector-transport approximation; the same pass gives the gradient at ``y``.

Near a minimizer ``phi(t) - phi(0)`` sinks below the rounding error of ``f`` (for
``||grad f|| = 1e-8`` the decrease is about ``1e-16``, while ``f`` is computed to about
``eps |f|``), so a plain sufficient-decrease test fails on noise. Both searches accept a
cost within ``noise = 100 eps |phi(0)|`` of the sufficient-decrease target: Armijo only if
the gradient norm decreases, Wolfe only together with
``phi'(t) <= (2 c1 - 1) phi'(0)``, the "approximate Wolfe" conditions of Hager & Zhang
(2005), exact for quadratics and immune to cancellation.

Every trial reads its value (and slope) back to the host once: accepting a step is a
decision.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torsion.optim._objective import Objective, Point

__all__ = ["LINE_SEARCHES", "armijo", "cost_noise", "initial_step", "strong_wolfe"]

LINE_SEARCHES = ("armijo", "strong-wolfe")

# Rounding allowance on cost comparisons, in units of eps * |f(x)|.
_NOISE_ULPS = 100.0


def cost_noise(value: float, dtype: torch.dtype) -> float:
    """Cost changes below this are rounding noise: ``100 eps |value|``."""
    return _NOISE_ULPS * torch.finfo(dtype).eps * abs(value)


def initial_step(
    *,
    value: float,
    previous_value: float | None,
    slope: float,
    direction_norm: float,
    previous_step: float | None,
    noise: float,
    optimism: float = 2.0,
) -> float:
    """First trial step for steepest descent and CG.

    ``optimism * 2 (f_prev - f) / |phi'(0)|``: the step that would repeat the last
    decrease on a quadratic (Nocedal & Wright 2006, eq. 3.60; Manopt's and pymanopt's
    backtracking use the same rule), capped at ``optimism`` times the previously accepted
    step: when the gradient shrinks fast (near a nondegenerate minimizer) the last decrease
    overestimates the next one by orders of magnitude. When the last decrease is lost in
    rounding noise it says nothing, and the previously accepted step is reused; on the
    first iteration the step moves a unit distance, ``1 / ||d||``.
    """
    if previous_step is None:
        return 1.0 / direction_norm if direction_norm > 0 else 1.0
    if previous_value is not None and previous_value - value > noise:
        guess = optimism * 2.0 * (previous_value - value) / -slope
        if math.isfinite(guess) and guess > 0:
            return min(guess, optimism * previous_step)
    return previous_step


def armijo(
    objective: Objective,
    point: Point,
    direction: Tensor,
    *,
    value: float,
    slope: float,
    step: float,
    c1: float = 1e-4,
    contraction: float = 0.5,
    max_evals: int = 25,
) -> tuple[float, Point] | None:
    """Backtracking: the first of ``step, contraction * step, ...`` with sufficient decrease.

    Args:
        objective: the cost.
        point: the current point ``x`` (value and gradient).
        direction: a descent direction ``d`` at ``x``.
        value: ``f(x)`` as a float.
        slope: ``phi'(0) = <grad f(x), d>_x`` (negative).
        step: the first trial step.
        c1: sufficient-decrease constant.
        contraction: factor applied to the step after each rejection.
        max_evals: cost evaluations allowed.

    Returns:
        ``(t, new_point)``, or ``None`` when no step was accepted.
    """
    noise = cost_noise(value, point.x.dtype)
    for _ in range(max_evals):
        trial = objective.trial(objective.manifold.retr(point.x, step * direction))
        target = value + c1 * step * slope
        trial_value = trial.value.item()
        if trial_value <= target:  # False for NaN
            return step, trial.point()
        if trial_value <= target + noise:
            # The cost cannot tell: accept only a step that reduces the gradient norm.
            new = trial.point()
            if bool(new.grad_norm < point.grad_norm):
                return step, new
        step *= contraction
    return None


def _cubic_minimizer(a: float, fa: float, da: float, b: float, fb: float, db: float) -> float:
    """Minimizer of the cubic interpolating ``(f, f')`` at ``a`` and ``b``, kept well inside
    ``[a, b]`` (at least a tenth of the width from either end); the midpoint if the cubic
    has no minimizer there or a value is not finite."""
    low, high = min(a, b), max(a, b)
    margin = 0.1 * (high - low)
    midpoint = 0.5 * (low + high)
    d1 = da + db - 3.0 * (fa - fb) / (a - b)
    square = d1 * d1 - da * db
    if not all(math.isfinite(v) for v in (fa, da, fb, db, d1, square)) or square < 0:
        return midpoint
    d2 = math.copysign(math.sqrt(square), b - a)
    denominator = db - da + 2.0 * d2
    if denominator == 0:
        return midpoint
    t = b - (b - a) * (db + d2 - d1) / denominator
    if not math.isfinite(t):
        return midpoint
    return min(max(t, low + margin), high - margin)


def strong_wolfe(
    objective: Objective,
    point: Point,
    direction: Tensor,
    *,
    value: float,
    slope: float,
    step: float,
    c1: float = 1e-4,
    c2: float = 0.9,
    expansion: float = 4.0,
    max_evals: int = 25,
) -> tuple[float, Point] | None:
    """A step satisfying the strong Wolfe (or approximate Wolfe) conditions.

    Bracketing then sectioning by safeguarded cubic interpolation (Nocedal & Wright 2006,
    alg. 3.5-3.6), with the interval updates of Hager & Zhang (2005) that follow the sign
    of ``phi'`` so that they stay sound when costs are within rounding noise.

    Args:
        objective: the cost.
        point: the current point ``x``.
        direction: a descent direction ``d`` at ``x``.
        value: ``f(x)`` as a float.
        slope: ``phi'(0)`` (negative).
        step: the first trial step.
        c1: sufficient-decrease constant.
        c2: curvature constant, ``c1 < c2 < 1`` (0.1 is usual for CG, 0.9 for L-BFGS).
        expansion: growth of the step while ``phi`` still decreases.
        max_evals: evaluations of ``f`` (each with its gradient) allowed.

    Returns:
        ``(t, new_point)``; when the budget runs out, the last bracketing point with a
        negative slope and a cost not above ``f(x)`` (if any), else ``None``.
    """
    noise = cost_noise(value, point.x.dtype)

    def evaluate(t: float) -> tuple[float, float, Point]:
        phi, dphi, new = objective.along(point.x, direction, t)
        phi_value, dphi_value = torch.stack([phi, dphi]).tolist()
        return phi_value, dphi_value, new

    def acceptable(t: float, phi: float, dphi: float) -> bool:
        decrease = phi <= value + c1 * t * slope or (
            phi <= value + noise and dphi <= (2.0 * c1 - 1.0) * slope
        )
        return decrease and abs(dphi) <= -c2 * slope

    def descends(phi: float, dphi: float) -> bool:
        return dphi < 0 and phi <= value + noise

    low = (0.0, value, slope, None)  # (t, phi, phi', point): descending side of the bracket
    high = None
    t = step
    for _ in range(max_evals):
        phi, dphi, new = evaluate(t)
        if acceptable(t, phi, dphi):
            return t, new
        if descends(phi, dphi):
            low = (t, phi, dphi, new)
        else:  # phi' >= 0, or phi above phi(0): a minimizer lies in (low, t)
            high = (t, phi, dphi, new)
        if high is None:
            t = expansion * t
        else:
            t = _cubic_minimizer(low[0], low[1], low[2], high[0], high[1], high[2])
    return (low[0], low[3]) if low[3] is not None else None
