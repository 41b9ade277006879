"""Riemannian trust regions with a truncated conjugate-gradient inner solver.

Absil, Baker & Gallivan (2007), as implemented in Manopt's ``trustregions`` and pymanopt's
``TrustRegions`` (same defaults and rules, without preconditioner or random start):

* the model ``m(eta) = f(x) + <g, eta> + <eta, H eta> / 2`` on ``T_x M`` is minimized in the
  ball ``|eta| <= radius`` by Steihaug-Toint truncated CG, which stops at negative
  curvature, at the boundary, when the model stops decreasing, or when the residual is
  below ``|g| min(|g|^theta, kappa)`` (``theta = 1``: quadratic local convergence);
* ``rho = (f(x) - f(retr(x, eta))) / (m(0) - m(eta))``, both sides shifted by
  ``1e3 eps max(1, |f(x)|)`` (Conn, Gould & Toint 2000, sec. 17.4.2) so that ``rho -> 1``
  where the decrease is lost in rounding;
* the radius shrinks by 4 when ``rho < 1/4``, doubles (up to ``radius_max``) when
  ``rho > 3/4`` and the inner solver stopped at the boundary; the step is accepted when
  ``rho > rho_prime`` and the model decreased.

``H`` is the Riemannian Hessian: Euclidean products from :mod:`torsion.curvature` (one
gradient graph per accepted point, reused by every inner iteration) through the
manifold's ``ehess2rhess``.

Host synchronisation: one per inner iteration (its curvature, model value and residual
read back together) and one per outer iteration (the ratio ``rho``).
"""

from __future__ import annotations

import enum
import math
import typing
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from torsion.curvature import HVPMethod
from torsion.optim._objective import Objective, Point, check_count, dimension, typical_distance

__all__ = ["InnerStop", "truncated_cg", "trust_region"]


class InnerStop(enum.Enum):
    """Why truncated CG stopped."""

    NEGATIVE_CURVATURE = "negative curvature"
    EXCEEDED_RADIUS = "exceeded trust region"
    LINEAR_TARGET = "reached target residual-kappa (linear)"
    SUPERLINEAR_TARGET = "reached target residual-theta (superlinear)"
    MAX_INNER = "maximum inner iterations"
    MODEL_INCREASED = "model increased"
    NOT_FINITE = "Hessian-vector product not finite"


def truncated_cg(
    objective: Objective,
    point: Point,
    hessian: Callable[[Tensor], Tensor],
    radius: float,
    *,
    theta: float,
    kappa: float,
    min_inner: int,
    max_inner: int,
) -> tuple[Tensor, Tensor, int, InnerStop]:
    """Steihaug-Toint truncated CG for ``min m(eta)`` in ``|eta|_x <= radius``, from 0.

    Returns:
        ``(eta, H eta, inner iterations, reason)``.
    """
    x, g = point.x, point.grad
    inner = objective.inner
    eta = torch.zeros_like(g)
    h_eta = torch.zeros_like(g)
    r = g
    r_r = point.grad_norm.square().item()
    norm_r0 = math.sqrt(r_r)
    z_r = r_r  # no preconditioner: z = r
    delta = -r
    e_pe, e_pd, d_pd = 0.0, 0.0, z_r  # |eta|^2, <eta, delta>, |delta|^2
    model_value = 0.0
    stop = InnerStop.MAX_INNER
    j = 0
    for j in range(max_inner):
        h_delta = hessian(delta)
        d_hd_t = inner(x, delta, h_delta)
        # Speculative CG step; read back with the curvature in one synchronisation.
        alpha_t = z_r / d_hd_t
        new_eta = eta + alpha_t * delta
        new_h_eta = h_eta + alpha_t * h_delta
        new_r = r + alpha_t * h_delta
        new_model_t = inner(x, new_eta, g) + 0.5 * inner(x, new_eta, new_h_eta)
        d_hd, new_model, new_r_r = torch.stack(
            [d_hd_t, new_model_t, inner(x, new_r, new_r)]
        ).tolist()
        if not math.isfinite(d_hd):
            stop = InnerStop.NOT_FINITE
            break
        alpha = z_r / d_hd if d_hd != 0 else 0.0
        e_pe_new = e_pe + 2.0 * alpha * e_pd + alpha * alpha * d_pd
        if d_hd <= 0 or e_pe_new >= radius * radius:
            # Step to the boundary along delta: |eta + tau delta| = radius.
            tau = (-e_pd + math.sqrt(e_pd * e_pd + d_pd * (radius * radius - e_pe))) / d_pd
            eta = eta + tau * delta
            h_eta = h_eta + tau * h_delta
            stop = InnerStop.NEGATIVE_CURVATURE if d_hd <= 0 else InnerStop.EXCEEDED_RADIUS
            break
        e_pe = e_pe_new
        if new_model >= model_value:
            stop = InnerStop.MODEL_INCREASED
            break
        eta, h_eta, model_value = new_eta, new_h_eta, new_model
        r, r_r = new_r, new_r_r
        norm_r = math.sqrt(max(r_r, 0.0))
        # j counts from 0, Manopt's from 1. An exactly solved model (r = 0, e.g. a
        # quadratic whose gradient is an eigenvector of the Hessian) stops whatever
        # min_inner says: there is no residual to continue from (it divided by zero).
        if norm_r == 0 or (j + 1 >= min_inner and norm_r <= norm_r0 * min(norm_r0**theta, kappa)):
            linear = kappa < norm_r0**theta
            stop = InnerStop.LINEAR_TARGET if linear else InnerStop.SUPERLINEAR_TARGET
            break
        z_r_old, z_r = z_r, r_r
        beta = z_r / z_r_old
        delta = objective.manifold.proju(x, -r + beta * delta)
        e_pd = beta * (e_pd + alpha * d_pd)
        d_pd = z_r + beta * beta * d_pd
    return eta, h_eta, j, stop


def trust_region(
    objective: Objective,
    x0: Tensor,
    *,
    radius_max: float | None = None,
    radius_init: float | None = None,
    kappa: float = 0.1,
    theta: float = 1.0,
    rho_prime: float = 0.1,
    rho_regularization: float = 1e3,
    min_inner: int = 1,
    max_inner: int | None = None,
    hvp_method: str | None = None,
) -> Iterator[Point]:
    """Riemannian trust regions; yields the start, then the point after each outer iteration
    (unchanged after a rejected step). See the module notes for the rules."""
    dim = dimension(objective.manifold, x0)
    radius_max = typical_distance(objective.manifold, x0) if radius_max is None else radius_max
    radius_init = radius_max / 8 if radius_init is None else radius_init
    max_inner = max(dim, 1) if max_inner is None else check_count(max_inner, "max_inner", 1)
    min_inner = check_count(min_inner, "min_inner", 0)
    if hvp_method is not None and hvp_method not in typing.get_args(HVPMethod):
        raise ValueError(
            f"unknown hvp_method {hvp_method!r}; expected None (graph reuse) or one of "
            f"{typing.get_args(HVPMethod)}"
        )
    if not 0 < radius_init <= radius_max < math.inf:
        raise ValueError(
            "trust region needs 0 < radius_init <= radius_max < inf, got "
            f"{radius_init}, {radius_max}"
        )
    if not (0 < kappa < 1 and 0 < theta < math.inf and 0 <= rho_prime < 0.25):
        raise ValueError(
            f"trust region needs 0 < kappa < 1, theta > 0 and 0 <= rho_prime < 1/4; got "
            f"kappa={kappa}, theta={theta}, rho_prime={rho_prime}"
        )
    if not 0 <= rho_regularization < math.inf:
        raise ValueError(
            f"trust region needs a finite rho_regularization >= 0, got {rho_regularization}"
        )
    return _trust_region_iterates(
        objective,
        x0,
        radius_max=float(radius_max),
        radius=float(radius_init),
        kappa=kappa,
        theta=theta,
        rho_prime=rho_prime,
        rho_regularization=rho_regularization,
        min_inner=min_inner,
        max_inner=max_inner,
        hvp_method=hvp_method,
    )


def _trust_region_iterates(
    objective: Objective,
    x0: Tensor,
    *,
    radius_max: float,
    radius: float,
    kappa: float,
    theta: float,
    rho_prime: float,
    rho_regularization: float,
    min_inner: int,
    max_inner: int,
    hvp_method: str | None,
) -> Iterator[Point]:
    eps = torch.finfo(x0.dtype).eps
    point, hessian = objective.second_order(x0, hvp_method)
    yield point
    while True:
        eta, h_eta, _, stop = truncated_cg(
            objective,
            point,
            hessian,
            radius,
            theta=theta,
            kappa=kappa,
            min_inner=min_inner,
            max_inner=max_inner,
        )
        if stop is InnerStop.NOT_FINITE:
            return "the Hessian-vector product is not finite at the current point"
        x = point.x
        proposal = objective.manifold.retr(x, eta)
        proposal_value = objective.value(proposal)
        model_decrease = -objective.inner(x, point.grad, eta) - 0.5 * objective.inner(x, eta, h_eta)
        value, new_value, denominator = torch.stack(
            [point.value, proposal_value, model_decrease]
        ).tolist()
        shift = max(1.0, abs(value)) * eps * rho_regularization
        numerator = value - new_value + shift
        denominator = denominator + shift
        model_decreased = denominator >= 0
        rho = numerator / denominator if denominator != 0 else math.nan
        if not rho >= 0.25 or not model_decreased:  # also when rho is NaN
            radius /= 4
        elif rho > 0.75 and stop in (InnerStop.NEGATIVE_CURVATURE, InnerStop.EXCEEDED_RADIUS):
            radius = min(2 * radius, radius_max)
        if model_decreased and rho > rho_prime:
            point, hessian = objective.second_order(proposal, hvp_method)
        yield point
