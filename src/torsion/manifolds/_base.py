"""The abstract manifold: geoopt's interface plus what Riemannian optimization needs."""

from __future__ import annotations

import abc
import contextvars
import math
import numbers
from typing import NamedTuple

import geoopt
import torch
from torch import Tensor

__all__ = ["FrechetMean", "Manifold", "trusted_inputs"]


class FrechetMean(NamedTuple):
    """Result of :meth:`Manifold.frechet_mean`.

    Attributes:
        mean: the weighted Frechet (Karcher) mean, shape ``(..., *point_shape)``.
        iterations: Karcher-flow iterations taken (0 for a closed form).
        converged: whether the Riemannian gradient norm fell below the tolerance,
            a bool tensor of the batch shape.
        gradient_norm: final norm of the Riemannian gradient of half the weighted sum of
            squared distances, shape ``(...)``.
    """

    mean: Tensor
    iterations: int
    converged: Tensor
    gradient_norm: Tensor


_FLOAT_DTYPES = (torch.float32, torch.float64)

# Set inside ``trusted_inputs()``: manifold maps skip their type and shape checks.
_INPUTS_TRUSTED = contextvars.ContextVar("torsion_manifold_inputs_trusted", default=False)


class trusted_inputs:  # lower case: used like a function, ``with trusted_inputs():``
    """Context manager under which manifold maps skip their type and shape checks; values
    are still checked on a manifold built with ``check=True``.

    For callers that pass only tensors a check has already accepted. The training
    optimizers check a manifold parameter's shape when it is added
    (:meth:`Manifold.check_inputs`) and load only state of matching shapes; a step then
    passes the parameter, its gradient (same shape and dtype: torch enforces it) and that
    state. The three checks of a Stiefel Adam step were 10 % of it on a small parameter.
    """

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _INPUTS_TRUSTED.set(True)

    def __exit__(self, *exc_info: object) -> None:
        _INPUTS_TRUSTED.reset(self._token)


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` (and no larger)."""
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _mean_tolerance(tol: float | None, max_iter: int, step: float, dtype: torch.dtype) -> float:
    """Check ``frechet_mean``'s options up front and return the tolerance (``sqrt(eps)`` by
    default): a bad one used to fail deep inside the loop (``max_iter=-1`` raised an
    ``AssertionError``, a NaN ``step`` a ``LinAlgError`` from ``eigh``) or not at all (a
    NaN ``tol`` ran ``max_iter`` iterations and reported no convergence)."""
    if not isinstance(max_iter, numbers.Integral) or isinstance(max_iter, bool) or max_iter < 0:
        raise ValueError(f"frechet_mean: max_iter must be an integer >= 0, got {max_iter!r}")
    if not _is_number(step) or not math.isfinite(step) or step <= 0:
        raise ValueError(f"frechet_mean: step must be a finite number > 0, got {step!r}")
    if tol is None:
        return torch.finfo(dtype).eps ** 0.5
    if not _is_number(tol) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"frechet_mean: tol must be a finite number >= 0, got {tol!r}")
    return float(tol)


class Manifold(geoopt.Manifold, metaclass=abc.ABCMeta):
    """Base class of torsion's manifolds: a :class:`geoopt.Manifold` with a Riemannian Hessian.

    Subclasses keep geoopt's verbs and point-first argument order ``(x, u, v)``, so
    ``geoopt.ManifoldParameter`` and geoopt's optimizers work unchanged. Added:

    * :meth:`ehess2rhess`: the Riemannian Hessian-vector product from Euclidean
      derivatives, for second-order optimizers and curvature probes;
    * :meth:`random_tangent`, :meth:`geodesic`, :meth:`frechet_mean` and :attr:`dim`.

    Manifolds are shape-agnostic: sizes come from the tensors. ``ndim`` trailing
    dimensions make one point; leading dimensions are batch dimensions.
    """

    ndim = 2
    reversible = False
    check = False  # validate values (a host sync) on every call; subclasses take check=
    _point_description = "a point of the manifold"
    _vector_description = "a tangent vector"

    @abc.abstractmethod
    def ehess2rhess(self, x: Tensor, egrad: Tensor, ehess: Tensor, u: Tensor) -> Tensor:
        """Riemannian Hessian of ``f`` at ``x`` applied to the tangent vector ``u``.

        Args:
            x: point.
            egrad: Euclidean gradient of ``f`` at ``x``.
            ehess: Euclidean Hessian-vector product ``D(grad f)(x)[u]``.
            u: tangent vector at ``x``.
        """

    @abc.abstractmethod
    def dim(self, shape: torch.Size | tuple[int, ...]) -> int:
        """Dimension of the manifold whose points have the trailing ``shape``."""

    def random_tangent(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """A random tangent vector at ``x``: a Gaussian ambient draw projected with ``proju``."""
        z = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        return self.proju(x, z)

    def geodesic(self, x: Tensor, y: Tensor, t: Tensor | float) -> Tensor:
        """Point at time ``t`` on the geodesic from ``x`` (``t = 0``) to ``y`` (``t = 1``).

        ``t`` is a number or a tensor broadcasting against the batch shape.
        """
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.reshape(t.shape + (1,) * self.ndim)
        return self.expmap(x, t * self.logmap(x, y))

    def frechet_mean(
        self,
        points: Tensor,
        weights: Tensor | None = None,
        *,
        tol: float | None = None,
        max_iter: int = 100,
        step: float = 1.0,
    ) -> FrechetMean:
        """Weighted Frechet mean of ``N`` points by Karcher flow.

        Iterates ``m <- expmap(m, step * sum_i w_i logmap(m, x_i))`` from the point with
        the largest weight until the Riemannian gradient norm is below ``tol`` for every
        batch element, or ``max_iter`` is reached. Subclasses override this with a
        closed form where one exists. The stopping test reads a value back to the host
        once per iteration; this is not a hot path.

        Args:
            points: ``N`` points along dimension ``-(ndim + 1)``.
            weights: non-negative weights of shape ``(..., N)``, normalized to sum to one;
                uniform by default.
            tol: gradient-norm tolerance; defaults to ``sqrt(eps)`` of the dtype.
            max_iter: iteration cap.
            step: Karcher-flow step size (1 is exact for flat metrics).

        Shapes:
            ``points``: ``(..., N, *point_shape)``; ``weights``: ``(..., N)``;
            ``mean``: ``(..., *point_shape)``.
        """
        points, weights = self._mean_inputs(points, weights)
        tol = _mean_tolerance(tol, max_iter, step, points.dtype)
        mean = self._take(points, weights.argmax(dim=-1))
        expand = (..., *([None] * self.ndim))
        for iteration in range(1, max_iter + 1):
            logs = self.logmap(mean.unsqueeze(-self.ndim - 1), points)
            direction = (weights[expand] * logs).sum(dim=-self.ndim - 1)
            gradient_norm = self.norm(mean, direction)
            converged = gradient_norm <= tol
            if bool(converged.all()):
                return FrechetMean(mean, iteration - 1, converged, gradient_norm)
            mean = self.expmap(mean, step * direction)
        logs = self.logmap(mean.unsqueeze(-self.ndim - 1), points)
        gradient_norm = self.norm(mean, (weights[expand] * logs).sum(dim=-self.ndim - 1))
        return FrechetMean(mean, max_iter, gradient_norm <= tol, gradient_norm)

    # -- helpers for subclasses -----------------------------------------------------------

    def _point_reason(self, x: Tensor, name: str) -> tuple[bool, str | None]:
        """Whether ``x`` is a point, at the dtype's validation tolerance, and why not."""
        raise NotImplementedError

    def _vector_reason(self, x: Tensor, u: Tensor, name: str) -> tuple[bool, str | None]:
        """Whether ``u`` is tangent at ``x``, at the dtype's validation tolerance, and why not."""
        raise NotImplementedError

    def _validate(
        self,
        method: str,
        points: dict,
        vectors: dict | None = None,
        *,
        ambient: dict | None = None,
    ) -> None:
        """Types, dtypes and matrix shapes always; values when ``self.check`` is set.

        Args:
            method: the public method's name, for the message.
            points: the point arguments by name; the first is the base point.
            vectors: the tangent-vector arguments by name.
            ambient: arguments that may be any matrix of the ambient space (the input of
                ``projx``): with ``check`` they only have to be finite.
        """
        # (dynamo cannot read a ContextVar; checks cost nothing in a compiled graph)
        trusted = not torch.compiler.is_compiling() and _INPUTS_TRUSTED.get()
        if not trusted and not self._inputs_fit((ambient, points, vectors)):
            self._raise_input_error(
                f"{type(self).__name__}.{method}", {**(ambient or {}), **points, **(vectors or {})}
            )
        if not self.check:
            return
        where = f"{type(self).__name__}.{method}"
        for name, value in (ambient or {}).items():
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{where}: `{name}` has NaN or infinite entries")
        for name, value in points.items():
            ok, reason = self._point_reason(value, name)
            if not ok:
                raise ValueError(f"{where} expects {self._point_description} `{name}`: {reason}")
        x = next(iter(points.values()), None)
        for name, value in (vectors or {}).items():
            ok, reason = self._vector_reason(x, value, name)
            if not ok:
                raise ValueError(f"{where} expects {self._vector_description} `{name}`: {reason}")

    def check_inputs(self, where: str, **tensors: Tensor) -> None:
        """Raise the ``TypeError`` / ``ValueError`` a map would raise on these tensors'
        types, dtypes and shapes (not their values); the message starts with ``where``."""
        if not self._inputs_fit((tensors,)):
            self._raise_input_error(where, tensors)

    def _inputs_fit(self, groups: tuple[dict | None, ...]) -> bool:
        """Whether every argument is a float32 or float64 tensor of one dtype, of a shape
        the manifold takes and of one matrix shape: the common case, checked without
        building any message (``_validate`` runs on every map call, inside training
        loops)."""
        dtype = matrix_shape = None
        for group in groups:
            for value in (group or {}).values():
                if not isinstance(value, Tensor):
                    return False
                shape = value.shape
                if not self._check_shape(shape, "")[0]:
                    return False
                if dtype is None:
                    dtype, matrix_shape = value.dtype, shape[-2:]
                    if dtype not in _FLOAT_DTYPES:
                        return False
                elif value.dtype != dtype or shape[-2:] != matrix_shape:
                    return False
        return True

    def _raise_input_error(self, where: str, arguments: dict) -> None:
        """Raise the error that names what is wrong with ``arguments`` (types, dtypes, shapes)."""
        matrix_shape = None
        first_dtype = None
        for name, value in arguments.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"{where} expects `{name}` to be a torch.Tensor")
            if value.dtype not in _FLOAT_DTYPES:
                raise TypeError(
                    f"{where} expects `{name}` in float32 or float64, got {value.dtype}"
                )
            if first_dtype is None:
                first_dtype = (name, value.dtype)
            elif value.dtype != first_dtype[1]:
                raise TypeError(
                    f"{where}: `{name}` has dtype {value.dtype} but `{first_dtype[0]}` has "
                    f"{first_dtype[1]}"
                )
            ok, reason = self._check_shape(value.shape, name)
            if not ok:
                raise ValueError(f"{where}: {reason}")
            if matrix_shape is None:
                matrix_shape = (name, tuple(value.shape[-2:]))
            elif tuple(value.shape[-2:]) != matrix_shape[1]:
                raise ValueError(
                    f"{where}: `{name}` has matrix shape {tuple(value.shape[-2:])} but "
                    f"`{matrix_shape[0]}` has {matrix_shape[1]}"
                )

    def _mean_inputs(self, points: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
        """Validate ``frechet_mean`` inputs and return normalized weights."""
        if points.dim() < self.ndim + 1:
            raise ValueError(
                f"frechet_mean expects points of shape (..., N, *point_shape) with the set of "
                f"N points before the last {self.ndim} dimensions, got shape {tuple(points.shape)}"
            )
        count = points.shape[-self.ndim - 1]
        if count == 0:
            raise ValueError("frechet_mean needs at least one point, got an empty set")
        batch = points.shape[: -self.ndim - 1]
        if weights is None:
            weights = points.new_full((*batch, count), 1.0 / count)
        else:
            if weights.shape[-1] != count:
                raise ValueError(f"frechet_mean got {weights.shape[-1]} weights for {count} points")
            if not _broadcasts_to(weights.shape[:-1], batch):
                raise ValueError(
                    f"frechet_mean: weights of shape {tuple(weights.shape)} do not broadcast "
                    f"to the points' batch shape {tuple(batch)} (points {tuple(points.shape)})"
                )
            weights = weights.to(points.dtype)
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
                raise ValueError("frechet_mean needs finite, non-negative weights")
            total = weights.sum(dim=-1, keepdim=True)
            if bool((total <= 0).any()):
                raise ValueError("frechet_mean needs weights with a positive sum")
            weights = (weights / total).expand(*batch, count)
        return points, weights

    def _take(self, points: Tensor, index: Tensor) -> Tensor:
        """``points[..., index[...], *point]``: one point per batch element."""
        index = index.reshape(*index.shape, 1, *([1] * self.ndim))
        index = index.expand(*index.shape[: -self.ndim], *points.shape[-self.ndim :])
        return points.gather(-self.ndim - 1, index).squeeze(-self.ndim - 1)
