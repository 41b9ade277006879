"""Line-search methods: steepest descent, nonlinear conjugate gradients and L-BFGS.

The three share one loop (:func:`line_search_descent`): take a search direction from a
*direction rule*, fall back to ``-grad`` if it is not a descent direction, search along
the retraction curve (:mod:`torsion.optim._linesearch`), move, and let the rule carry its
memory to the new point by vector transport (``manifold.transp``). The rules are thin
classes holding that memory:

* :class:`SteepestDirection`: ``-grad`` (no memory);
* :class:`ConjugateDirection`: ``-grad + beta T(d_prev)`` with the Fletcher-Reeves,
  Polak-Ribiere+, Hestenes-Stiefel or Dai-Yuan ``beta`` (Sato 2016, 2022; Absil, Mahony &
  Sepulchre 2008, sec. 8.3);
* :class:`LBFGSDirection`: the two-loop recursion over the last ``m`` transported pairs
  ``(s, y)``, with the cautious update of Li & Fukushima (2001) as in Manopt's RLBFGS
  (Huang, Absil & Gallivan 2018).

No direction rule reads a value back to the host: ``beta``, the curvature ratios and the
cautious-update decision stay tensors. Each iteration synchronises once to test for
descent and pick the first trial step, and once per line-search trial.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from torsion.optim._linesearch import LINE_SEARCHES, armijo, cost_noise, initial_step, strong_wolfe
from torsion.optim._objective import Objective, Point, check_count

__all__ = [
    "BETA_RULES",
    "ConjugateDirection",
    "LBFGSDirection",
    "SteepestDirection",
    "conjugate_gradient",
    "lbfgs",
    "line_search_descent",
    "steepest_descent",
]

BETA_RULES = ("hestenes-stiefel", "polak-ribiere+", "fletcher-reeves", "dai-yuan")


def _safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` where the denominator is positive, else 0 (a restart)."""
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1.0), 0.0)


class SteepestDirection:
    """``d = -grad f(x)``."""

    quasi_newton = False

    def direction(self, objective: Objective, point: Point) -> Tensor:
        return -point.grad

    def advance(self, objective: Objective, old: Point, new: Point, step: Tensor) -> None:
        pass

    def reset(self) -> None:
        pass


class ConjugateDirection:
    """``d_k = -g_k + beta_k T(d_{k-1})``, ``T`` the vector transport to ``x_k``.

    With ``y = g_k - T(g_{k-1})`` and inner products at ``x_k`` unless marked:

    * ``"fletcher-reeves"``: ``|g_k|^2 / |g_{k-1}|^2``;
    * ``"polak-ribiere+"``: ``max(0, <g_k, y> / |g_{k-1}|^2)``;
    * ``"hestenes-stiefel"``: ``max(0, <g_k, y> / <T(d_{k-1}), y>)`` (as pymanopt);
    * ``"dai-yuan"``: ``|g_k|^2 / (<g_k, T(d_{k-1})> - <g_{k-1}, d_{k-1}>_{x_{k-1}})``
      (Sato 2016, which needs no isometric transport).

    A non-positive denominator gives ``beta = 0`` (a restart along ``-g_k``).
    """

    quasi_newton = False

    def __init__(self, beta: str, transport: str = "transp"):
        self.beta = beta
        self.transport = transport
        self._memory: tuple[Tensor, ...] | None = None
        self._last_direction: Tensor | None = None

    def direction(self, objective: Objective, point: Point) -> Tensor:
        if self._memory is None:
            d = -point.grad
        else:
            beta = self._beta(objective, point, *self._memory)
            d = -point.grad + beta * self._memory[1]
        self._last_direction = d
        return d

    def _beta(self, objective, point, old_grad, old_direction, old_sq_norm, old_slope) -> Tensor:
        x, g = point.x, point.grad
        sq_norm = point.grad_norm.square()
        if self.beta == "fletcher-reeves":
            return _safe_ratio(sq_norm, old_sq_norm)
        y = g - old_grad
        if self.beta == "polak-ribiere+":
            return _safe_ratio(objective.inner(x, g, y), old_sq_norm).clamp_min(0)
        if self.beta == "hestenes-stiefel":
            hestenes_stiefel = _safe_ratio(
                objective.inner(x, g, y), objective.inner(x, old_direction, y)
            )
            return hestenes_stiefel.clamp_min(0)
        return _safe_ratio(sq_norm, objective.inner(x, g, old_direction) - old_slope)

    def advance(self, objective: Objective, old: Point, new: Point, step: Tensor) -> None:
        d = self._last_direction
        moved = objective.transport(old.x, new.x, torch.stack([old.grad, d]), self.transport)
        self._memory = (
            moved[0],
            moved[1],
            old.grad_norm.square(),
            objective.inner(old.x, old.grad, d),
        )

    def reset(self) -> None:
        self._memory = None


class LBFGSDirection:
    """Riemannian L-BFGS (Huang, Absil & Gallivan 2018; Manopt's ``rlbfgs``).

    Stores the last ``memory`` pairs ``s = T(t d)``, ``y = g_new - T(g_old)`` at the
    current point, transporting all of them one step further after each iteration (one
    ``transp`` call on the stacked pairs). The direction is the two-loop recursion with the
    initial scaling ``<s, y> / <y, y>`` of the newest accepted pair.

    Cautious update (Li & Fukushima 2001): a pair enters the recursion only if
    ``<s, y> / <s, s> >= 1e-4 |g_old|``. A refused pair keeps its slot with weight
    ``rho = 0`` (it then contributes nothing), so that the decision stays on the device;
    Manopt drops it instead.
    """

    quasi_newton = True

    def __init__(self, memory: int, cautious: bool = True, transport: str = "transp"):
        self.memory = memory
        self.transport = transport
        self.cautious = cautious
        self.reset()

    def reset(self) -> None:
        self._s: Tensor | None = None
        self._y: Tensor | None = None
        self._rho: Tensor | None = None
        self._scale: Tensor | None = None

    def direction(self, objective: Objective, point: Point) -> Tensor:
        if self._s is None:
            return -point.grad
        x, q = point.x, point.grad
        count = self._s.shape[0]
        alphas = []
        for i in reversed(range(count)):
            alpha = self._rho[i] * objective.inner(x, self._s[i], q)
            q = q - alpha * self._y[i]
            alphas.append(alpha)
        r = self._scale * q
        for i, alpha in zip(range(count), reversed(alphas), strict=True):
            beta = self._rho[i] * objective.inner(x, self._y[i], r)
            r = r + (alpha - beta) * self._s[i]
        return -r

    def advance(self, objective: Objective, old: Point, new: Point, step: Tensor) -> None:
        # One transport call for the new pair and every stored pair that stays.
        start = 0 if self._s is None else max(0, self._s.shape[0] - (self.memory - 1))
        stored = [] if self._s is None else [self._s[start:], self._y[start:]]
        moved = objective.transport(
            old.x, new.x, torch.cat([step[None], old.grad[None], *stored]), self.transport
        )
        s, y = moved[0], new.grad - moved[1]
        sy, yy, ss = (objective.inner(new.x, a, b) for a, b in ((s, y), (y, y), (s, s)))
        accepted = sy > 0
        if self.cautious:
            accepted = accepted & (sy >= 1e-4 * old.grad_norm * ss)
        rho = _safe_ratio(torch.ones_like(sy), sy) * accepted
        scale = _safe_ratio(sy, yy)
        if self._s is None:
            self._s, self._y, self._rho = s[None], y[None], rho[None]
            self._scale = torch.where(accepted, scale, torch.ones_like(scale))
            return
        kept = self._s.shape[0] - start  # the oldest pairs drop out
        self._s = torch.cat([moved[2 : 2 + kept], s[None]])
        self._y = torch.cat([moved[2 + kept :], y[None]])
        self._rho = torch.cat([self._rho[start:], rho[None]])
        self._scale = torch.where(accepted, scale, self._scale)


def line_search_descent(
    objective: Objective,
    x0: Tensor,
    rule,
    *,
    line_search: str,
    c1: float,
    c2: float,
    max_line_evals: int,
) -> Iterator[Point]:
    """The loop shared by ``sd``, ``cg`` and ``lbfgs``: yields the start, then each iterate.

    Returns (as the generator's value) the reason it stopped on its own.
    """
    point = objective.first_order(x0)
    yield point
    previous_value = previous_step = None
    while True:
        direction = rule.direction(objective, point)
        slope = objective.inner(point.x, point.grad, direction)
        numbers = [point.value, slope, objective.norm(point.x, direction), point.grad_norm]
        value, slope_value, direction_norm, gradient_norm = torch.stack(numbers).tolist()
        if not slope_value < 0:  # not a descent direction (or not finite): restart
            rule.reset()
            direction = rule.direction(objective, point)  # -grad after a reset
            slope_value, direction_norm = -(gradient_norm**2), gradient_norm
        if rule.quasi_newton and previous_step is not None:
            step = 1.0
        else:
            step = initial_step(
                value=value,
                previous_value=previous_value,
                slope=slope_value,
                direction_norm=direction_norm,
                previous_step=previous_step,
                noise=cost_noise(value, point.x.dtype),
            )
        search_options = {"value": value, "slope": slope_value, "step": step, "c1": c1}
        if line_search == "armijo":
            found = armijo(objective, point, direction, max_evals=max_line_evals, **search_options)
        else:
            found = strong_wolfe(
                objective, point, direction, c2=c2, max_evals=max_line_evals, **search_options
            )
        if found is None:
            return (
                f"the {line_search} line search found no acceptable step in "
                f"{max_line_evals} evaluations"
            )
        accepted_step, new_point = found
        rule.advance(objective, point, new_point, accepted_step * direction)
        previous_value, previous_step = value, accepted_step
        point = new_point
        yield point


TRANSPORTS = ("transp", "projection")


def _transport_checked(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; expected one of {TRANSPORTS}")


def _options_checked(line_search: str, c1: float, c2: float, max_line_evals: int) -> None:
    if line_search not in LINE_SEARCHES:
        raise ValueError(f"unknown line_search {line_search!r}; expected one of {LINE_SEARCHES}")
    if not 0 < c1 < c2 < 1:
        raise ValueError(f"the line search needs 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
    check_count(max_line_evals, "max_line_evals", 1)


def steepest_descent(
    objective: Objective,
    x0: Tensor,
    *,
    line_search: str = "armijo",
    c1: float = 1e-4,
    c2: float = 0.9,
    max_line_evals: int = 25,
) -> Iterator[Point]:
    """Riemannian steepest descent: ``x <- retr(x, -t grad f(x))``, ``t`` by line search."""
    _options_checked(line_search, c1, c2, max_line_evals)
    return line_search_descent(
        objective,
        x0,
        SteepestDirection(),
        line_search=line_search,
        c1=c1,
        c2=c2,
        max_line_evals=max_line_evals,
    )


def conjugate_gradient(
    objective: Objective,
    x0: Tensor,
    *,
    beta: str = "hestenes-stiefel",
    transport: str = "transp",
    line_search: str = "strong-wolfe",
    c1: float = 1e-4,
    c2: float = 0.25,
    max_line_evals: int = 25,
) -> Iterator[Point]:
    """Riemannian nonlinear conjugate gradients with the ``beta`` rule named."""
    if beta not in BETA_RULES:
        raise ValueError(f"unknown beta rule {beta!r}; expected one of {BETA_RULES}")
    _transport_checked(transport)
    _options_checked(line_search, c1, c2, max_line_evals)
    return line_search_descent(
        objective,
        x0,
        ConjugateDirection(beta, transport),
        line_search=line_search,
        c1=c1,
        c2=c2,
        max_line_evals=max_line_evals,
    )


def lbfgs(
    objective: Objective,
    x0: Tensor,
    *,
    memory: int = 30,
    cautious: bool = True,
    transport: str = "transp",
    line_search: str = "strong-wolfe",
    c1: float = 1e-4,
    c2: float = 0.9,
    max_line_evals: int = 25,
) -> Iterator[Point]:
    """Riemannian L-BFGS with ``memory`` transported pairs and the cautious update."""
    memory = check_count(memory, "memory", 1)
    _transport_checked(transport)
    _options_checked(line_search, c1, c2, max_line_evals)
    return line_search_descent(
        objective,
        x0,
        LBFGSDirection(memory, bool(cautious), transport),
        line_search=line_search,
        c1=c1,
        c2=c2,
        max_line_evals=max_line_evals,
    )


SOLVER_FUNCTIONS: dict[str, Callable[..., Iterator[Point]]] = {
    "cg": conjugate_gradient,
    "lbfgs": lbfgs,
    "sd": steepest_descent,
}
