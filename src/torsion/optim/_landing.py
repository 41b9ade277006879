r"""The landing method: optimization under orthogonality constraints without retractions.

Ablin & Peyré (2022) replace the retraction of Riemannian gradient descent on the
orthogonal group by a field that follows the Riemannian gradient along the manifold and
pulls the iterate back to it, so that one step costs a few matrix products. Ablin, Vary,
Gao & Absil (2023) extend it to rectangular ``n x p`` Stiefel matrices. With ``G`` the
Euclidean gradient at ``X`` the landing field is

    ``Lambda(X) = psi(X) + lambda X (X^T X - I)``,  ``psi(X) = skew(G X^T) X``,

where ``psi(X) = (G X^T X - X G^T X) / 2`` is the relative gradient (on the manifold, half
the Riemannian gradient of the canonical metric) and the second term is the gradient of the
penalty ``N(X) = ||X^T X - I||_F^2 / 4``. The two terms are orthogonal, and ``Lambda``
vanishes exactly at the critical points of ``f`` on the manifold. The step is
``X <- X - eta Lambda(X)``.

**Safe step.** With ``Delta = X^T X - I``, ``d = ||Delta||_F`` and ``g = ||Lambda||_F``,
``X^T psi`` is skew (for any ``X``), so
``X~^T X~ - I = Delta (I - 2 eta lambda (I + Delta)) + eta^2 Lambda^T Lambda``. While
``2 eta lambda (1 + d) <= 1`` every eigenvalue ``delta`` of ``Delta`` is mapped to
``delta (1 - 2 eta lambda (1 + delta))``, of size at most ``|delta| (1 - 2 eta lambda (1 - d))``,
hence

    ``||X~^T X~ - I||_F <= d - 2 eta lambda d (1 - d) + eta^2 g^2``.

The right side is at most ``eps`` for ``eta`` up to the positive root of
``g^2 eta^2 - 2 lambda d (1 - d) eta + (d - eps) = 0``, the rule of Ablin et al. (2023):
``eta* = (lambda d (1 - d) + sqrt(lambda^2 d^2 (1 - d)^2 - g^2 (d - eps))) / g^2``. Each
matrix takes ``min(lr, eta*, 1 / (2 lambda (1 + d)))``; the last cap is the condition of the
bound, which the authors' published code omits. Where no step can reach ``eps``
(``d > eps``, a start off the manifold) the root is complex and the step minimizing the
bound, ``lambda d (1 - d) / g^2``, is used (the published code takes the square root of a
negative number there); at ``d >= 1`` the bound says nothing and only the cap applies.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

import geoopt
import torch
from torch import Tensor

from torsion.manifolds import Stiefel
from torsion.optim._grouping import Batch, manifold_of, write_back
from torsion.optim._riemannian import (
    _accumulate,
    _BatchedRiemannianOptimizer,
    _check_lr,
    _check_non_negative,
    _check_number,
    _momentum_buffers,
)

__all__ = ["Landing"]


def _is_stiefel(manifold: object) -> bool:
    return isinstance(manifold, (Stiefel, geoopt.Stiefel))


def landing_field(
    x: Tensor, relative_gradient: Tensor, lambda_regul: float
) -> tuple[Tensor, Tensor]:
    """``(field, distance)``: the landing field and ``||X^T X - I||_F`` of each matrix.

    Args:
        x: points (near) the Stiefel manifold.
        relative_gradient: ``psi(X) = skew(G X^T) X``.
        lambda_regul: weight of the normal term ``X (X^T X - I)``.

    Shapes:
        ``x``, ``relative_gradient``, ``field``: ``(..., n, p)``; ``distance``: ``(...)``.
    """
    gap = x.mT @ x
    gap.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return relative_gradient + lambda_regul * (x @ gap), torch.linalg.matrix_norm(gap)


def relative_gradient(x: Tensor, grad: Tensor) -> Tensor:
    """``psi(X) = skew(G X^T) X = (G X^T X - X G^T X) / 2`` without an ``n x n`` matrix."""
    return 0.5 * (grad @ (x.mT @ x) - x @ (grad.mT @ x))


def landing_safe_step(
    distance: Tensor, field_norm: Tensor, lambda_regul: float, tolerance: float
) -> Tensor:
    """The largest step keeping ``||X^T X - I||_F <= tolerance`` by the bound in the module
    notes (capped by its own condition ``1 / (2 lambda (1 + d))``).

    Args:
        distance: ``d = ||X^T X - I||_F``.
        field_norm: ``g = ||Lambda(X)||_F``.
        lambda_regul: ``lambda > 0``.
        tolerance: ``eps`` in ``(0, 1)``.

    Shapes:
        all ``(...)``.
    """
    d, g2 = distance, field_norm.square()
    pull = lambda_regul * d * (1 - d)
    discriminant = pull.square() - g2 * (d - tolerance)
    positive = g2 > 0
    safe_g2 = torch.where(positive, g2, 1.0)
    root = (pull + discriminant.clamp_min(0.0).sqrt()) / safe_g2
    step = torch.where(discriminant >= 0, root, pull / safe_g2)
    step = torch.where(positive, step, torch.inf)  # a zero field: any step is safe
    step = torch.where(d < 1, step, torch.inf)
    return torch.minimum(step, 1.0 / (2 * lambda_regul * (1 + d)))


class Landing(_BatchedRiemannianOptimizer):
    r"""The landing method for Stiefel parameters, square or rectangular, batched.

    Retraction-free optimization on ``St(n, p) = {X: X^T X = I}`` (Ablin & Peyré 2022;
    rectangular matrices as in Ablin, Vary, Gao & Absil 2023). One step of each matrix is

    ::

        m = momentum * m + (1 - dampening) * G      # m = G on the first step
        D = G + momentum * m  if nesterov  else  m  # D = G without momentum
        psi = skew(D X^T) X = (D X^T X - X D^T X) / 2
        Lambda = psi + lambda_regul * X (X^T X - I)
        X = X - eta * Lambda,  eta = min(lr, safe step)

    only matrix products, no QR, SVD or solve. The iterates are not exactly orthonormal;
    the normal term draws them to the manifold, and the safe step keeps
    ``||X^T X - I||_F`` below ``safe_step``. Fixed points are the critical points of ``f``
    on the manifold. The relative gradient ``psi`` is half the canonical-metric Riemannian
    gradient there, so ``lr`` plays the role of twice a Riemannian step size.

    The momentum accumulates Euclidean gradients and the relative gradient is taken at
    the current point, as Li et al. (2020) do for Cayley SGD. (The authors' square-matrix
    code accumulates the relative gradients ``skew(G X^T)`` instead, which are ``n x n``.)
    This keeps ``X^T psi`` skew, so the safe-step bound holds with momentum too; a momentum
    of ``psi`` from earlier points would break it.

    **Safe step.** With ``d = ||X^T X - I||_F`` and ``g = ||Lambda||_F`` the next iterate
    satisfies ``||X~^T X~ - I||_F <= d - 2 eta lambda d (1 - d) + eta^2 g^2`` whenever
    ``2 eta lambda (1 + d) <= 1`` (because ``X^T psi`` is skew). Each matrix steps with
    ``eta = min(lr, eta*, 1 / (2 lambda (1 + d)))``, ``eta*`` the positive root of
    ``bound = safe_step`` (Ablin et al. 2023); where ``d > safe_step`` already, ``eta*`` is
    the step that decreases the bound most. The derivation is in the source.

    Every parameter must be a :class:`geoopt.ManifoldParameter` on a Stiefel manifold
    (:class:`torsion.manifolds.Stiefel` or :class:`geoopt.Stiefel`); the manifold's
    metric and retraction are not used (``stabilize`` uses its ``projx``). Parameters of
    the same shape, dtype and device are updated together; batch dimensions of a parameter
    (``(..., n, p)``) are independent matrices with a step size each.

    Args:
        params: Stiefel parameters or parameter groups.
        lr: learning rate, the largest step (``>= 0``).
        lambda_regul: weight ``lambda > 0`` of the attraction to the manifold (default 1).
        safe_step: tolerance ``eps`` in ``(0, 1)`` on ``||X^T X - I||_F`` enforced by the
            step size, or ``None`` for the fixed step ``lr`` (default 0.5, as the authors).
        momentum: momentum factor on the gradient (``>= 0``; default 0).
        dampening: dampening of the momentum (default 0).
        nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening = 0``.
        stabilize: every ``stabilize`` steps, replace each matrix by its orthogonal polar
            factor (``projx``) (default ``None``: never; the method does not need it).
        foreach: batch same-shape parameters (default); ``False`` updates one at a time.

    Raises:
        TypeError: for a parameter that is not on a Stiefel manifold.
        ValueError: for a negative ``lr`` or ``momentum``, ``lambda_regul <= 0``,
            ``safe_step`` outside ``(0, 1)``, or Nesterov momentum without momentum.

    Shapes:
        parameters ``(..., n, p)`` with ``n >= p``.

    Example:
        >>> from geoopt import ManifoldParameter
        >>> from torsion.manifolds import Stiefel
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> m = torch.randn(6, 3, dtype=torch.float64)
        >>> x = ManifoldParameter(Stiefel().random(6, 3, dtype=torch.float64), manifold=Stiefel())
        >>> optimizer = Landing([x], lr=0.2)
        >>> for _ in range(500):
        ...     optimizer.zero_grad()
        ...     (-(x * m).sum()).backward()  # orthogonal Procrustes: max tr(X^T M)
        ...     optimizer.step()
        >>> u, _, vh = torch.linalg.svd(m, full_matrices=False)
        >>> torch.allclose(x.detach(), u @ vh, atol=1e-6)
        True
    """

    _momentum_keys = ()  # the momentum is a Euclidean gradient, not a tangent vector

    def __init__(
        self,
        params: Iterable,
        lr: float,
        lambda_regul: float = 1.0,
        safe_step: float | None = 0.5,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        stabilize: int | None = None,
        *,
        foreach: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            lambda_regul=lambda_regul,
            safe_step=safe_step,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            stabilize=stabilize,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_lr(group["lr"])
        if _check_number(group["lambda_regul"], "lambda_regul") <= 0.0:
            raise ValueError(f"Invalid lambda_regul value: {group['lambda_regul']} (must be > 0)")
        safe_step = group["safe_step"]
        if safe_step is not None and not 0.0 < _check_number(safe_step, "safe_step") < 1.0:
            raise ValueError(
                f"Invalid safe_step value: {safe_step} (a tolerance on ||X^T X - I||_F in "
                "(0, 1), or None)"
            )
        _check_non_negative(group["momentum"], "momentum")
        _check_number(group["dampening"], "dampening")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        for index, param in enumerate(group["params"]):
            manifold = manifold_of(param)
            if not _is_stiefel(manifold):
                where = (
                    "a plain tensor"
                    if manifold is None
                    else f"a ManifoldParameter on {type(manifold).__name__}"
                )
                raise TypeError(
                    f"Landing optimizes Stiefel parameters only (geoopt.ManifoldParameter on "
                    f"torsion.manifolds.Stiefel or geoopt.Stiefel); parameter {index} of group "
                    f"{len(self.param_groups) - 1} is {where} of shape {tuple(param.shape)}. "
                    "Give the other parameters to RiemannianSGD or RiemannianAdam."
                )
            if param.dim() < 2 or param.shape[-2] < param.shape[-1]:
                raise ValueError(
                    f"Landing needs (..., n, p) parameters with n >= p; parameter {index} has "
                    f"shape {tuple(param.shape)}"
                )

    def _batch_key(self, manifold: geoopt.Manifold) -> Hashable:
        return "stiefel"  # the landing step uses no manifold map: any Stiefel batches

    def _update_euclidean(self, group: dict[str, Any], params: list[Tensor]) -> None:
        raise AssertionError("unreachable: Landing rejects non-Stiefel parameters")

    def _update_batch(self, group: dict[str, Any], batch: Batch) -> None:
        params = batch.params
        momentum = group["momentum"]
        x = self._stack(params, "x")
        gradient = self._stack([p.grad for p in params], "grad")
        if momentum != 0:
            buffers, held = _momentum_buffers(self.state, params)
            buffer = _accumulate(self._stack, buffers, held, gradient, momentum, group["dampening"])
            write_back(buffers, buffer)
            gradient = gradient.add(buffer, alpha=momentum) if group["nesterov"] else buffer
        psi = relative_gradient(x, gradient)
        field, distance = landing_field(x, psi, group["lambda_regul"])
        lr = group["lr"]
        if group["safe_step"] is None:
            write_back(params, x.sub_(field, alpha=lr))
            return
        safe = landing_safe_step(
            distance, torch.linalg.matrix_norm(field), group["lambda_regul"], group["safe_step"]
        )
        step = safe.clamp_max(lr)
        write_back(params, x.sub_(step[..., None, None] * field))
