"""The cost function on a manifold, as the solvers of :func:`~torsion.optim.minimize` see it.

One place evaluates ``fun``, its Riemannian gradient and Riemannian Hessian-vector
products, and counts the evaluations. Solvers never call ``fun`` or autograd themselves.

A batched point ``(*batch, *point_shape)`` is **one point of the product manifold**
``M^batch``: inner products and norms are summed over the batch dimensions, and ``fun``
maps the whole batch to one scalar (a sum of independent costs is solved jointly, with one
step size or trust region for all of them).

Hessian-vector products come from :mod:`torsion.curvature` (:class:`GradientGraph`, one
gradient graph reused by every product at a point, or :func:`hvp` with an explicit
method) and are turned into Riemannian ones with the manifold's ``ehess2rhess``; there is
no second HVP implementation here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import geoopt
import torch
from torch import Tensor

from torsion.curvature import GradientGraph, hvp
from torsion.manifolds import Grassmann, Manifold, Stiefel

__all__ = ["Objective", "Point", "check_count", "dimension", "typical_distance"]


class Point(NamedTuple):
    """An iterate with what the solvers need at it (all detached).

    Attributes:
        x: the point, ``(*batch, *point_shape)``.
        value: ``fun(x)``, a 0-dim tensor.
        grad: the Riemannian gradient at ``x``, shaped like ``x``.
        grad_norm: its Riemannian norm (summed over the batch), a 0-dim tensor.
    """

    x: Tensor
    value: Tensor
    grad: Tensor
    grad_norm: Tensor


def _checked(value: object) -> Tensor:
    """``value`` if it is a real 0-dim tensor, else a ``ValueError`` naming what it is."""
    if not isinstance(value, Tensor):
        raise ValueError(f"fun must return a scalar (0-dim) tensor, got {type(value).__name__}")
    if value.ndim != 0:
        raise ValueError(
            f"fun must return a scalar (0-dim) tensor, got shape {tuple(value.shape)}; "
            "sum a batch of costs into one scalar"
        )
    if not value.dtype.is_floating_point:
        raise ValueError(f"fun must return a real floating tensor, got dtype {value.dtype}")
    return value


def check_count(value: object, name: str, minimum: int) -> int:
    """``value`` as an ``int``, if it is a whole number (``10`` or ``10.0``) ``>= minimum``;
    a ``ValueError`` naming the option otherwise (also for ``inf`` and ``nan``)."""
    whole = (
        isinstance(value, numbers.Real)  # NumPy's integers and floats too
        and not isinstance(value, bool)
        and math.isfinite(value)
        and int(value) == value
    )
    if not whole or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _ehess2rhess(manifold, x: Tensor, egrad: Tensor, ehess: Tensor, u: Tensor) -> Tensor:
    """The Riemannian Hessian-vector product from Euclidean derivatives, for any manifold.

    torsion manifolds have ``ehess2rhess``; geoopt's ``ProductManifold`` is handled part by
    part, ``Euclidean`` is the identity and ``Sphere`` gets the Weingarten term
    ``proju(x, ehess) - <x, egrad> u`` (Absil, Mahony & Sepulchre 2008, sec. 5.5).
    """
    if hasattr(manifold, "ehess2rhess"):
        return manifold.ehess2rhess(x, egrad, ehess, u)
    if isinstance(manifold, geoopt.ProductManifold):
        parts = []
        for i, part in enumerate(manifold.manifolds):
            pieces = [manifold.take_submanifold_value(t, i) for t in (x, egrad, ehess, u)]
            product = _ehess2rhess(part, *pieces)
            parts.append(product.reshape(*x.shape[:-1], -1))
        return torch.cat(parts, dim=-1)
    if isinstance(manifold, geoopt.Euclidean):
        return ehess
    if isinstance(manifold, geoopt.Sphere):
        return manifold.proju(x, ehess) - (x * egrad).sum(dim=-1, keepdim=True) * u
    raise TypeError(
        f"method='trust-region' needs Riemannian Hessians: {type(manifold).__name__} has no "
        "ehess2rhess (torsion manifolds, geoopt's ProductManifold of them, Euclidean and "
        "Sphere do); use method='cg', 'lbfgs' or 'sd', which need only gradients"
    )


def _batch_count(x: Tensor, ndim: int) -> int:
    return math.prod(x.shape[: x.dim() - ndim])


def dimension(manifold, x: Tensor) -> int:
    """Dimension of the (product) manifold the point ``x`` lives on.

    torsion manifolds know theirs (``dim``) and geoopt's ``ProductManifold`` sums its
    parts; for any other manifold it is the number of entries of ``x`` (an upper bound).
    """
    if isinstance(manifold, geoopt.ProductManifold):
        return sum(
            dimension(part, manifold.take_submanifold_value(x, i))
            for i, part in enumerate(manifold.manifolds)
        )
    if isinstance(manifold, Manifold):
        point_shape = tuple(x.shape[x.dim() - manifold.ndim :])
        return manifold.dim(point_shape) * _batch_count(x, manifold.ndim)
    return x.numel()


def typical_distance(manifold, x: Tensor) -> float:
    """A length scale of the manifold: the default maximal trust-region radius.

    ``sqrt(p * batch)`` on Stiefel and Grassmann (the scale of their diameter), otherwise
    ``sqrt(dim)``: the ``typical_dist`` of Manopt and pymanopt.
    """
    if isinstance(manifold, (Stiefel, Grassmann)):
        return math.sqrt(max(x.shape[-1] * _batch_count(x, 2), 1))
    return math.sqrt(max(dimension(manifold, x), 1))


class _Trial:
    """``fun`` evaluated at a point with its autograd graph kept, the gradient on demand."""

    def __init__(self, objective: Objective, x: Tensor):
        self._objective = objective
        self._x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            self._value = objective.call(self._x)
        self.value = self._value.detach()

    def euclidean_gradient(self) -> Tensor:
        """The Euclidean gradient at the point (one backward pass)."""
        return self._objective.euclidean_gradient(self._value, self._x)

    def point(self, egrad: Tensor | None = None) -> Point:
        """The point with its Riemannian gradient (from ``egrad`` if it is given)."""
        egrad = self.euclidean_gradient() if egrad is None else egrad
        return self._objective.point(self._x.detach(), self.value, egrad)


class Objective:
    """``fun`` on ``manifold``: values, Riemannian gradients and Hessian products, counted.

    Args:
        fun: maps a point to a scalar tensor.
        manifold: a geoopt-compatible manifold.

    Attributes:
        nfev: evaluations of ``fun`` (with or without a gradient), not counting those
            inside Hessian-vector products.
        nhvp: Hessian-vector products.
    """

    def __init__(self, fun: Callable[[Tensor], Tensor], manifold):
        self.fun = fun
        self.manifold = manifold
        self.nfev = 0
        self.nhvp = 0

    # -- evaluations -------------------------------------------------------------------------

    def call(self, x: Tensor) -> Tensor:
        """``fun(x)``, checked to be a real scalar, and counted."""
        self.nfev += 1
        return _checked(self.fun(x))

    def euclidean_gradient(self, value: Tensor, x: Tensor) -> Tensor:
        """The gradient of ``value`` with respect to ``x`` (zeros where it does not depend)."""
        if not value.requires_grad:
            return torch.zeros_like(x)
        (grad,) = torch.autograd.grad(value, x, allow_unused=True)
        return torch.zeros_like(x) if grad is None else grad

    def point(self, x: Tensor, value: Tensor, egrad: Tensor) -> Point:
        """A :class:`Point` from the value and the Euclidean gradient at ``x``."""
        grad = self.manifold.egrad2rgrad(x, egrad)
        return Point(x, value, grad, self.norm(x, grad))

    def value(self, x: Tensor) -> Tensor:
        """``fun(x)`` without a gradient (detached, 0-dim)."""
        with torch.no_grad():
            return self.call(x.detach())

    def trial(self, x: Tensor) -> _Trial:
        """``fun(x)`` with its graph kept, so that ``.point()`` costs one backward pass."""
        return _Trial(self, x)

    def first_order(self, x: Tensor) -> Point:
        """The point ``x`` with its value and Riemannian gradient."""
        return self.trial(x).point()

    def along(self, x: Tensor, direction: Tensor, step: float) -> tuple[Tensor, Tensor, Point]:
        """``phi(t) = fun(retr(x, t d))`` and its exact derivative at ``t = step``.

        One forward and one backward pass through the retraction give both ``phi'(step)``
        and the gradient at the new point.

        Returns:
            ``(phi(step), phi'(step), point)``, the first two 0-dim tensors.
        """
        # torch.full fills on the device: no host-to-device copy that would wait for it.
        t = torch.full((), step, dtype=x.dtype, device=x.device, requires_grad=True)
        with torch.enable_grad():
            y = self.manifold.retr(x, t * direction)
            value = self.call(y)
            if value.requires_grad:
                egrad, slope = torch.autograd.grad(value, (y, t), allow_unused=True)
            else:
                egrad = slope = None
        egrad = torch.zeros_like(y) if egrad is None else egrad
        slope = torch.zeros_like(t) if slope is None else slope
        y = y.detach()
        return value.detach(), slope.detach(), self.point(y, value.detach(), egrad)

    def second_order(
        self, x: Tensor, hvp_method: str | None = None
    ) -> tuple[Point, Callable[[Tensor], Tensor]]:
        """The point ``x`` and its Riemannian Hessian ``u -> Hess f(x)[u]``.

        The Euclidean product is :class:`torsion.curvature.GradientGraph` (``hvp_method``
        ``None``: the gradient graph built once here, one more backward per product) or
        :func:`torsion.curvature.hvp` with the method named (each product afresh); the
        manifold's ``ehess2rhess`` turns it into the Riemannian one.
        """
        x = x.detach()
        if hvp_method is None:
            self.nfev += 1
            graph = GradientGraph(lambda p: _checked(self.fun(p)), x)
            egrad, euclidean_product = graph.gradient, graph.hvp
            point = self.point(x, graph.value, egrad)
        else:
            trial = self.trial(x)
            egrad = trial.euclidean_gradient()
            point = trial.point(egrad)

            def euclidean_product(u: Tensor) -> Tensor:
                return hvp(lambda p: _checked(self.fun(p)), x, u, method=hvp_method)

        def hessian(u: Tensor) -> Tensor:
            self.nhvp += 1
            return _ehess2rhess(self.manifold, x, egrad, euclidean_product(u), u)

        return point, hessian

    # -- the metric and transport of the (product) manifold -----------------------------------

    def transport(self, x: Tensor, y: Tensor, v: Tensor, kind: str = "transp") -> Tensor:
        """Vector transport of ``v`` (tangent at ``x``, possibly a stack) to ``y``.

        ``kind="transp"``: the manifold's own ``transp`` (parallel transport where torsion
        has it: Grassmann and three SPD metrics); ``kind="projection"``: ``proju(y, v)``,
        the projection transport of Manopt and pymanopt (the identity on SPD), which is
        cheaper and valid on every manifold whose tangent spaces are subspaces of the
        ambient space.
        """
        if kind == "projection":
            return self.manifold.proju(y, v)
        return self.manifold.transp(x, y, v)

    # -- the metric of the (product) manifold ------------------------------------------------

    def inner(self, x: Tensor, u: Tensor, v: Tensor) -> Tensor:
        """``<u, v>_x`` summed over the batch: a 0-dim tensor."""
        return self.manifold.inner(x, u, v).sum()

    def norm(self, x: Tensor, u: Tensor) -> Tensor:
        """``sqrt(<u, u>_x)`` over the whole batch: a 0-dim tensor."""
        return self.inner(x, u, u).clamp_min(0).sqrt()
