r"""Riemannian SGD and Adam that update same-shape manifold parameters in batched calls.

Both optimizers follow geoopt's algorithms (``geoopt.optim.RiemannianSGD`` and
``RiemannianAdam``), so for the same manifold their iterates agree with geoopt's to
rounding; on plain parameters they are :class:`torch.optim.SGD` and
:class:`torch.optim.Adam` / ``AdamW``. What differs is how the work is organised:

* parameters are split (:func:`~torsion.optim._grouping.split_into_batches`) into the
  Euclidean ones, which go to torch's multi-tensor (``foreach``) kernels, and batches of
  manifold parameters with equal manifolds, shape, dtype and device. A batch is stacked
  into one ``(B, *shape)`` tensor and each manifold map (``egrad2rgrad``,
  ``component_inner``, ``retr_transp``) is called once on it: torsion's and geoopt's
  manifolds treat leading dimensions as a batch. geoopt calls them once per parameter.
  On a CPU a batch is cut into chunks of about 512 KiB, which stay in cache between the
  dozen operations of an update;
* where the step is a multiple of the vector it carries along (Adam's first moment,
  heavy-ball momentum), the retraction and transport go through the manifold's
  ``retr_transp_direction`` when it has one (:func:`retr_transp_direction`): on
  :class:`~torsion.manifolds.SPDAffineInvariant` that transport needs no matrix square
  root. Adam's step is also bounded in norm by ``lr`` times a function of its betas
  (:func:`adam_direction_bound`), which it hands to retractions that can use it: on
  :class:`~torsion.manifolds.Stiefel` one pass of Cholesky QR instead of Householder QR;
* no step reads a device value back to the host; step counts live on the CPU, as in
  :class:`torch.optim.Adam`;
* the optimizer state is keyed per parameter exactly as torch's
  (``state_dict()["state"][i]`` holds ``step``, ``exp_avg``, ... of parameter ``i``), so
  ``state_dict`` / ``load_state_dict`` round-trip and training resumes bit for bit;
* nothing the caller owns is modified except the parameters and the optimizer's state
  (geoopt adds the weight decay into ``param.grad`` in place).

Cayley SGD and Cayley Adam (Li, Yang, Zhong & Lin, ICLR 2020) need no class of their own:
they are these optimizers on ``Stiefel(retraction="cayley")``; the class docstrings give
the argument and the two differences of Cayley Adam.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import geoopt
import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam

from torsion.linalg._orthonormal import reads_freely
from torsion.manifolds import Manifold, trusted_inputs
from torsion.optim._grouping import (
    Batch,
    Workspace,
    manifold_key,
    manifold_of,
    split_into_batches,
    write_back,
)

__all__ = ["RiemannianAdam", "RiemannianSGD"]


# ---------------------------------------------------------------------------------------
# Validation (messages as torch.optim's)
# ---------------------------------------------------------------------------------------


def _check_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not math.isfinite(value):  # torch.optim accepts NaN, which makes every parameter NaN
        raise ValueError(f"Invalid {name} value: {value} (must be finite)")
    return float(value)


def _check_lr(lr: Any) -> None:
    if _check_number(lr, "lr") < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")


def _check_non_negative(value: Any, what: str) -> None:
    if _check_number(value, what) < 0.0:
        raise ValueError(f"Invalid {what} value: {value}")


def _check_stabilize(stabilize: Any) -> None:
    if stabilize is None:
        return
    if isinstance(stabilize, bool) or not isinstance(stabilize, int) or stabilize < 1:
        raise ValueError(
            f"Invalid stabilize value: {stabilize!r} (None, or re-project every k >= 1 steps)"
        )


def _scalar_dtype() -> torch.dtype:
    """The dtype of torch's CPU ``step`` counters."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """A ``(B,)`` vector shaped to scale the ``(B, *shape)`` tensor ``like``."""
    return values.to(dtype=like.dtype, device=like.device, non_blocking=True).reshape(
        values.shape + (1,) * (like.dim() - 1)
    )


def _adam_scale(steps: list[Tensor], second: Tensor, group: dict[str, Any]) -> Tensor | float:
    """Adam's step scale ``-lr / (bias_correction1 * (sqrt(v / bias_correction2) + eps))``
    of each point, shaped as the second moments ``v`` (``second``).

    The bias corrections ``1 - beta^t`` come from the step counts, which live on the CPU
    (no host sync). For one point with one second moment on the CPU the scale is a plain
    number: reading ``v`` there costs nothing, and the half-dozen tensor operations on a
    one-element tensor were a tenth of a small parameter's step.
    """
    beta1, beta2 = group["betas"]
    lr, eps = group["lr"], group["eps"]
    if len(steps) == 1:
        t = steps[0].item()
        correction1, correction2 = 1 - beta1**t, 1 - beta2**t
        if second.numel() == 1 and reads_freely(second):
            return -lr / (correction1 * (math.sqrt(second.item() / correction2) + eps))
    else:
        t = torch.stack(steps).to(torch.float64)
        correction1 = _per_sample(1 - beta1**t, second)
        correction2 = _per_sample(1 - beta2**t, second)
    denominator = second.div(correction2).sqrt_().add_(eps)
    return denominator.mul_(correction1).reciprocal_().mul_(-lr)


# ---------------------------------------------------------------------------------------
# The shared machinery
# ---------------------------------------------------------------------------------------


class _BatchedRiemannianOptimizer(torch.optim.Optimizer):
    """Step loop, batching and stabilization shared by the training optimizers.

    Subclasses set ``_momentum_keys`` (the state entries that are tangent vectors) and
    implement ``_check_group``, ``_update_euclidean`` and ``_update_batch``.
    """

    _momentum_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        _check_stabilize(defaults.get("stabilize"))
        super().__init__(params, defaults)
        self._workspace = Workspace()
        self._splits: dict[tuple, tuple[list[Tensor], list[Batch]]] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._workspace = Workspace()  # scratch, never pickled or copied
        self._splits = {}
        for group in self.param_groups:
            group.setdefault("stabilize", None)
            group.setdefault("foreach", True)
            group.setdefault("step", 0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("step", 0)  # steps taken by the group, for ``stabilize``
        try:
            _check_stabilize(group["stabilize"])
            self._check_group(group)
            _check_parameter_shapes(type(self).__name__, group["params"])
        except (TypeError, ValueError):
            self.param_groups.pop()  # a refused group is not kept
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _batch_key(self, manifold: geoopt.Manifold) -> Hashable:
        return manifold_key(manifold)

    def _batches(self, params: list[Tensor], group: dict[str, Any]):
        """:func:`split_into_batches`, remembered while the parameters (those with a
        gradient), their shapes, dtypes, devices and manifolds stay the same: the split
        cost 3 % of a step of a few small layers. The ids are safe keys, since the
        remembered batches hold their parameters; a manifold's configuration is read
        when its split is first made."""
        signature = (
            group["foreach"],
            *((id(p), p.shape, p.dtype, p.device, getattr(p, "manifold", None)) for p in params),
        )
        split = self._splits.get(signature)
        if split is None:
            if len(self._splits) >= 8:  # a few live splits: each group's, stabilize's
                self._splits.clear()
            split = split_into_batches(params, batched=group["foreach"], key=self._batch_key)
            self._splits[signature] = split
        return split

    def _stack(self, tensors: list[Tensor], role: str, *, private: bool = False) -> Tensor:
        """The tensors of one chunk stacked, in the reused buffer of ``role`` (on a CPU),
        or a single tensor itself, copied if ``private`` (see
        :class:`~torsion.optim._grouping.Workspace`)."""
        return self._workspace.stack(tensors, role, private=private)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one optimization step.

        Under ``torch.compile`` (a compiled ``optimizer.step`` or a compiled training step
        that calls it) the step runs eagerly, as a graph break: dynamo traces a
        :class:`geoopt.ManifoldParameter` as a plain ``Parameter`` and would take every
        manifold parameter for a Euclidean one. Only a traced call goes through
        ``torch.compiler.disable``, whose wrapper cost an eager step of five small
        parameters 5 % (round-robin with other work, as in training).

        Args:
            closure: re-evaluates the model and returns the loss (optional, as in
                :mod:`torch.optim`); it runs with gradients enabled.

        Returns:
            the closure's loss, or ``None``.
        """
        if torch.compiler.is_compiling():
            return self._eager_step(closure)
        return self._step(closure)

    @torch.compiler.disable
    def _eager_step(self, closure: Callable[[], Any] | None) -> Any:
        return self._step(closure)

    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            euclidean, batches = self._batches(params, group)
            if euclidean:
                self._update_euclidean(group, euclidean)
            # shapes were checked when the parameters were added, the state's when it was
            # loaded, and a gradient has its parameter's (torch enforces it)
            with trusted_inputs():
                for batch in batches:
                    try:
                        self._update_batch(group, batch)
                    except torch.linalg.LinAlgError as error:
                        # checked only on failure (no host sync in a normal step): a NaN or
                        # Inf gradient makes eigh fail with a message that does not say so
                        _raise_on_non_finite_gradients(type(self).__name__, batch.params, error)
                        raise
                group["step"] += 1
                if group["stabilize"] is not None and group["step"] % group["stabilize"] == 0:
                    self._stabilize_group(group)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """:meth:`torch.optim.Optimizer.load_state_dict`, refusing state whose shapes do not
        fit the parameters (torch's would load it, and the next step would broadcast it)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for index, param in enumerate(group["params"]):
                for key, value in self.state.get(param, {}).items():
                    if key != "step" and isinstance(value, Tensor):
                        _check_state_shape(type(self).__name__, param, index, key, value)

    def _update_euclidean(self, group: dict[str, Any], params: list[Tensor]) -> None:
        raise NotImplementedError

    def _update_batch(self, group: dict[str, Any], batch: Batch) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def stabilize(self) -> None:
        """Re-project every manifold parameter (``projx``) and its momenta (``proju``)."""
        for group in self.param_groups:
            self._stabilize_group(group)

    def _stabilize_group(self, group: dict[str, Any]) -> None:
        _, batches = self._batches(list(group["params"]), group)
        for batch in batches:
            points = batch.manifold.projx(self._stack(batch.params, "x"))
            write_back(batch.params, points)
            for key in self._momentum_keys:
                held = [  # .get: no empty state entry for a parameter that never stepped
                    i
                    for i, p in enumerate(batch.params)
                    if self.state.get(p, {}).get(key) is not None
                ]
                if not held:
                    continue
                at = points if len(held) == len(batch.params) else points[held]
                momenta = [self.state[batch.params[i]][key] for i in held]
                write_back(momenta, batch.manifold.proju(at, self._stack(momenta, key)))


def _check_parameter_shapes(owner: str, params: list[Tensor]) -> None:
    """Raise the manifold's own error for a parameter whose type or shape it does not take
    (steps trust the shapes: :func:`~torsion.manifolds.trusted_inputs`)."""
    for index, param in enumerate(params):
        manifold = manifold_of(param)
        if isinstance(manifold, Manifold):
            manifold.check_inputs(f"{owner}: parameter {index} on {manifold.name}", param=param)


def _check_state_shape(owner: str, param: Tensor, index: int, key: str, value: Tensor) -> None:
    """A state tensor is shaped as its parameter, or (second moments of a manifold
    parameter, one per point or per component) broadcasts to it with as many dimensions."""
    shape = param.shape
    if value.shape == shape:
        return
    if manifold_of(param) is not None and key in ("exp_avg_sq", "max_exp_avg_sq"):
        sizes = zip(value.shape, shape, strict=False)
        if value.dim() == param.dim() and all(a in (1, b) for a, b in sizes):
            return
    raise ValueError(
        f"{owner}.load_state_dict: state {key!r} of parameter {index} has shape "
        f"{tuple(value.shape)}, which does not fit the parameter's shape {tuple(shape)}"
    )


def _raise_on_non_finite_gradients(owner: str, params: list[Tensor], error: Exception) -> None:
    """Raise a ``ValueError`` (from ``error``) naming the parameters with non-finite grads."""
    bad = [tuple(p.shape) for p in params if not bool(torch.isfinite(p.grad).all())]
    if bad:
        raise ValueError(
            f"{owner}.step: {len(bad)} of {len(params)} batched manifold parameters have NaN "
            f"or infinite gradients (shapes {bad}); the step's decomposition failed on them"
        ) from error


def retr_transp_direction(
    manifold: geoopt.Manifold,
    x: Tensor,
    direction: Tensor,
    t: Tensor | float,
    step_bound: float | None = None,
) -> tuple[Tensor, Tensor]:
    """``manifold.retr_transp(x, t * direction, direction)``: a step along a tangent vector
    that is itself transported to the new point (Adam's first moment, heavy-ball momentum).

    A manifold may provide a fused ``retr_transp_direction(x, direction, t)`` that uses
    the step being parallel to the transported vector (with it,
    :class:`~torsion.manifolds.SPDAffineInvariant` needs no matrix square root); any other
    manifold gets ``retr_transp``.

    ``step_bound`` (a bound on the spectral norm of every step ``t * direction``, known
    in advance) is passed on to a manifold whose ``retr_transp`` takes it
    (``retr_transp_takes_step_bound``): :class:`~torsion.manifolds.Stiefel` then takes one
    pass of Cholesky QR instead of Householder QR.

    Shapes:
        ``x``, ``direction``: ``(B, *shape)``; ``t``: a number or a tensor broadcasting
        against ``direction`` (one step length per point).
    """
    fused = getattr(manifold, "retr_transp_direction", None)
    if fused is not None:
        return fused(x, direction, t)
    if step_bound is not None and getattr(manifold, "retr_transp_takes_step_bound", False):
        return manifold.retr_transp(x, t * direction, direction, step_bound=step_bound)
    return manifold.retr_transp(x, t * direction, direction)


@functools.lru_cache(maxsize=64)
def adam_direction_bound(beta1: float, beta2: float) -> float | None:
    """A bound on ``||m_hat|| / sqrt(v_hat)`` in Riemannian Adam with one second moment per
    point (``v`` averages ``||r||^2``), whatever the gradients; ``None`` when there is none
    (``beta1^2 >= beta2``).

    With zero initial moments, ``m_t = sum_k (1 - b1) b1^k r_k`` (each term transported,
    which does not lengthen it) and ``v_t >= sum_k (1 - b2) b2^k ||r_k||^2``, so by
    Cauchy-Schwarz ``||m_t|| / sqrt(v_t) <= (1 - b1) / sqrt(1 - b2) * sqrt(sum_{k<t}
    rho^k)`` with ``rho = b1^2 / b2``; the bias corrections multiply it by
    ``sqrt(1 - b2^t) / (1 - b1^t)``. AMSGrad's larger ``v`` and ``eps`` only shrink it. The
    bound is the largest value over ``t`` (7.27 at the default betas).
    """
    if beta2 == 0.0:  # v is the last ||r||^2 alone: bounded only without momentum
        return 1.0 if beta1 == 0.0 else None
    rho = beta1 * beta1 / beta2
    if rho >= 1.0:
        return None
    scale = (1.0 - beta1) / math.sqrt(1.0 - beta2)

    def at(t: int) -> float:
        correction = math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        return scale * math.sqrt((1.0 - rho**t) / (1.0 - rho)) * correction

    return max([scale / math.sqrt(1.0 - rho), *map(at, range(1, 10_001))])


def _momentum_buffers(state: dict, params: list[Tensor]) -> tuple[list[Tensor], list[int]]:
    """Each parameter's ``momentum_buffer`` (created, empty, where it has none yet) and the
    indices of the parameters that already had one."""
    buffers, held = [], []
    for index, param in enumerate(params):
        entry = state[param]
        if entry.get("momentum_buffer") is None:
            entry["momentum_buffer"] = torch.empty_like(param, memory_format=torch.preserve_format)
        else:
            held.append(index)
        buffers.append(entry["momentum_buffer"])
    return buffers, held


def _accumulate(
    stack: Callable[[list[Tensor], str], Tensor],
    buffers: list[Tensor],
    held: list[int],
    r: Tensor,
    momentum: float,
    dampening: float,
) -> Tensor:
    """``momentum * m + (1 - dampening) * r``, stacked (by ``stack``); ``r`` itself where
    ``m`` is new.

    As in :class:`torch.optim.SGD`, a buffer starts at the first gradient.
    """
    if len(held) == len(buffers):
        return stack(buffers, "momentum_buffer").mul_(momentum).add_(r, alpha=1 - dampening)
    stacked = r.clone()
    if held:  # a fresh stack (also of one buffer): the rows of r[held]
        previous = torch.stack([buffers[i] for i in held])
        stacked[held] = previous.mul_(momentum).add_(r[held], alpha=1 - dampening)
    return stacked


# ---------------------------------------------------------------------------------------
# Riemannian SGD
# ---------------------------------------------------------------------------------------


class RiemannianSGD(_BatchedRiemannianOptimizer):
    r"""Riemannian stochastic gradient descent with momentum, batched over parameters.

    For a parameter ``x`` on a manifold with gradient ``g`` (its ``.grad``), one step is
    geoopt's::

        r = egrad2rgrad(x, g + weight_decay * x)
        m = momentum * m + (1 - dampening) * r       # m = r on the first step
        d = r + momentum * m  if nesterov  else  m   # d = r without momentum
        x, m = retr_transp(x, -lr * d, m)            # m moves to the new point

    Plain tensors (and parameters on :class:`geoopt.Euclidean`) take exactly the update of
    :class:`torch.optim.SGD`. Parameters that are :class:`geoopt.ManifoldParameter` use
    their manifold's ``egrad2rgrad``, ``retr`` and ``transp`` (``retr_transp``), so both
    torsion's and geoopt's manifolds work. Manifold parameters with equal manifolds and the
    same shape, dtype and device are stacked and updated by one call of each map.

    The momentum buffer starts at the first Riemannian gradient, as in
    :class:`torch.optim.SGD` (geoopt starts it at the raw gradient, which matches only when
    the buffer is pre-set to zero and ``dampening = 0``).

    **Cayley SGD.** With ``Stiefel(retraction="cayley")`` (Euclidean metric) this is the
    Cayley SGD with momentum of Li, Yang, Zhong & Lin (ICLR 2020). They form the skew
    matrix ``W = W^ - W^T``, ``W^ = M X^T - X X^T M X^T / 2``, from the ambient momentum
    ``M``; ``W`` depends only on the tangent part of ``M``, ``W X`` is its Euclidean-metric
    projection ``r``, and their update ``(I - W/2)^-1 (I + W/2) X`` is the Cayley retraction
    of ``r`` (solved here through a ``2p x 2p`` system, :func:`torsion.linalg.cayley_retraction`).
    Their re-projection of ``M`` at the next point is the manifold's projection transport.
    Solving the transform exactly makes their step cap ``min(lr, 2q / ||W||)``, which only
    makes their fixed-point approximation converge, unnecessary. The test suite checks the
    iterates against a transcription of their Algorithm 1.

    Args:
        params: parameters or parameter groups, as for :mod:`torch.optim`.
        lr: learning rate (``>= 0``).
        momentum: momentum factor (``>= 0``; default 0).
        dampening: dampening of the momentum (default 0).
        weight_decay: L2 penalty added to the Euclidean gradient (``>= 0``; default 0).
        nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening = 0``.
        stabilize: every ``stabilize`` steps of a group, re-project its manifold
            parameters with ``projx`` and their momentum with ``proju`` (default ``None``:
            never). :meth:`stabilize` does it on demand.
        foreach: batch same-shape manifold parameters and use multi-tensor kernels for
            Euclidean ones (default). ``False`` updates one parameter at a time, the
            reference path.

    Raises:
        ValueError: for a negative ``lr``, ``momentum`` or ``weight_decay``, Nesterov
            momentum without momentum or with dampening, or a ``stabilize`` that is not a
            positive integer.

    Example:
        >>> from geoopt import ManifoldParameter
        >>> from torsion.manifolds import Stiefel
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> stiefel = Stiefel()
        >>> w = ManifoldParameter(stiefel.random(5, 2, dtype=torch.float64), manifold=stiefel)
        >>> a = torch.diag(torch.arange(5.0, dtype=torch.float64))
        >>> optimizer = RiemannianSGD([w], lr=0.1, momentum=0.5)
        >>> for _ in range(300):
        ...     optimizer.zero_grad()
        ...     (-(w.mT @ a @ w).trace()).backward()
        ...     optimizer.step()
        >>> w = w.detach()
        >>> round(float((w.mT @ a @ w).trace()), 6)  # the two largest eigenvalues, 4 + 3
        7.0
    """

    _momentum_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        stabilize: int | None = None,
        *,
        foreach: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            stabilize=stabilize,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_lr(group["lr"])
        _check_non_negative(group["momentum"], "momentum")
        _check_number(group["dampening"], "dampening")
        _check_non_negative(group["weight_decay"], "weight_decay")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _update_euclidean(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """torch.optim.SGD's multi-tensor update, without writing into ``.grad``."""
        lr, momentum = group["lr"], group["momentum"]
        grads = [p.grad for p in params]
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        if momentum != 0:
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            old = [i for i, b in enumerate(buffers) if b is not None]
            if old:
                held = [buffers[i] for i in old]
                torch._foreach_mul_(held, momentum)
                torch._foreach_add_(held, [grads[i] for i in old], alpha=1 - group["dampening"])
            for i, buffer in enumerate(buffers):
                if buffer is None:
                    buffers[i] = self.state[params[i]]["momentum_buffer"] = grads[i].clone()
            if group["nesterov"]:
                grads = torch._foreach_add(grads, buffers, alpha=momentum)
            else:
                grads = buffers
        torch._foreach_add_(params, grads, alpha=-lr)

    def _update_batch(self, group: dict[str, Any], batch: Batch) -> None:
        manifold, params = batch.manifold, batch.params
        lr, momentum = group["lr"], group["momentum"]
        x = self._stack(params, "x")
        decay = group["weight_decay"] != 0
        g = self._stack([p.grad for p in params], "grad", private=decay)
        if decay:
            g.add_(x, alpha=group["weight_decay"])
        r = manifold.egrad2rgrad(x, g)
        if momentum == 0:
            write_back(params, manifold.retr(x, -lr * r))
            return
        buffers, held = _momentum_buffers(self.state, params)
        buffer = _accumulate(self._stack, buffers, held, r, momentum, group["dampening"])
        if group["nesterov"]:
            x, buffer = manifold.retr_transp(x, r.add(buffer, alpha=momentum).mul_(-lr), buffer)
        else:
            x, buffer = retr_transp_direction(manifold, x, buffer, -lr)
        write_back(params, x)
        write_back(buffers, buffer)


# ---------------------------------------------------------------------------------------
# Riemannian Adam
# ---------------------------------------------------------------------------------------


class RiemannianAdam(_BatchedRiemannianOptimizer):
    r"""Riemannian Adam (Bécigneul & Ganea 2019), batched over parameters.

    For a parameter ``x`` on a manifold with gradient ``g``, step ``t`` is geoopt's::

        r = egrad2rgrad(x, g + weight_decay * x)           # L2 form of weight decay
        m = beta1 * m + (1 - beta1) * r
        v = beta2 * v + (1 - beta2) * component_inner(x, r)
        v_max = max(v_max, v)                              # amsgrad only
        d = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
        x, m = retr_transp(x, -lr * d, m)                  # m moves to the new point

    ``component_inner(x, r)`` is ``<r, r>_x`` of each matrix (each point) for torsion's
    manifolds and most of geoopt's, so ``v`` is one number per point; for
    :class:`geoopt.ProductManifold` it is one per component. (The first moment is updated
    as ``m.lerp_(r, 1 - beta1)``, torch's form of the same average, and the step is formed
    on the small shape of ``v``; the iterates agree with geoopt's to rounding.)

    With ``decoupled_weight_decay=True`` the decay bypasses the adaptive scaling, as in
    :class:`torch.optim.AdamW`: the step becomes
    ``retr_transp(x, -lr * (d + weight_decay * egrad2rgrad(x, x)), m)``, the retraction of
    the Riemannian gradient of ``weight_decay * ||x||_F^2 / 2`` added to the Adam direction.
    On plain tensors that is AdamW's ``x * (1 - lr * weight_decay) - lr * d``; on Stiefel
    it vanishes (``||x||_F`` is constant there).

    Plain tensors (and parameters on :class:`geoopt.Euclidean`) take exactly the update of
    :class:`torch.optim.Adam` (``AdamW`` with decoupled decay), through
    :func:`torch.optim.adam.adam`. Manifold parameters with equal manifolds and the same
    shape, dtype and device are stacked and updated by one call of each manifold map.

    The state per parameter has torch's keys: ``step`` (a CPU scalar tensor), ``exp_avg``,
    ``exp_avg_sq`` and, with AMSGrad, ``max_exp_avg_sq``. On a plain parameter every entry
    has the parameter's shape, as in torch. On a manifold parameter the second moments have
    the shape of ``component_inner`` for that parameter: ``(1, 1)`` for an ``n x p`` matrix
    on a matrix manifold, ``(k, 1, 1)`` for a ``(k, n, p)`` batch of them. geoopt stores the
    same numbers broadcast to the parameter's shape; the small shape saves one
    parameter-sized buffer and most of the arithmetic.

    **Non-finite gradients.** As in :mod:`torch.optim`, a step checks nothing (no host
    synchronisation): a NaN or infinite gradient makes that parameter (and its moments)
    NaN, never the other parameters stacked with it. Where a manifold map's decomposition
    fails on it instead (an ``eigh`` on SPD), the step raises a ``ValueError`` naming the
    parameters with non-finite gradients. Guard the step yourself (e.g. with
    :func:`torch.nn.utils.clip_grad_norm_` and ``error_if_nonfinite=True``) to refuse such
    steps.

    **Cayley Adam.** With ``Stiefel(retraction="cayley")`` (Euclidean metric) this is the
    Cayley Adam of Li, Yang, Zhong & Lin (ICLR 2020), solved exactly (see
    :class:`RiemannianSGD`), with two deliberate differences: ``v`` averages the squared
    norm of the Riemannian gradient (geoopt's choice, intrinsic to the manifold) where they
    use the Euclidean gradient's, and ``eps`` is added after the square root, as in Adam,
    rather than under it. The test suite checks the iterates against their Algorithm 2 with
    exactly these two substitutions.

    Args:
        params: parameters or parameter groups, as for :mod:`torch.optim`.
        lr: learning rate (``>= 0``; default ``1e-3``).
        betas: decay rates of the first and second moments, each in ``[0, 1)``.
        eps: added to the denominator (``>= 0``; default ``1e-8``).
        weight_decay: weight decay (``>= 0``; default 0).
        amsgrad: use the maximum of the second moments (Reddi, Kale & Kumar 2018).
        decoupled_weight_decay: apply the decay outside the adaptive scaling (AdamW).
        stabilize: every ``stabilize`` steps of a group, re-project its manifold
            parameters with ``projx`` and their first moments with ``proju`` (default
            ``None``: never). :meth:`stabilize` does it on demand.
        foreach: batch same-shape manifold parameters and use multi-tensor kernels for
            Euclidean ones (default). ``False`` updates one parameter at a time, the
            reference path.

    Raises:
        ValueError: for a negative ``lr``, ``eps`` or ``weight_decay``, a beta outside
            ``[0, 1)``, or a ``stabilize`` that is not a positive integer.

    Example:
        >>> from geoopt import ManifoldParameter
        >>> from torsion.manifolds import SPDAffineInvariant
        >>> spd = SPDAffineInvariant()
        >>> target = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
        >>> x = ManifoldParameter(torch.eye(2, dtype=torch.float64), manifold=spd)
        >>> optimizer = RiemannianAdam([x], lr=0.1)
        >>> for _ in range(200):
        ...     optimizer.zero_grad()
        ...     spd.dist2(x, target).backward()
        ...     optimizer.step()
        >>> torch.allclose(x.detach(), target, atol=1e-3)
        True
    """

    _momentum_keys = ("exp_avg",)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        decoupled_weight_decay: bool = False,
        stabilize: int | None = None,
        foreach: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            decoupled_weight_decay=decoupled_weight_decay,
            stabilize=stabilize,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("decoupled_weight_decay", False)

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_lr(group["lr"])
        if _check_number(group["eps"], "eps") < 0.0:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of numbers, got {betas!r}")
        for index, beta in enumerate(betas):
            if not 0.0 <= _check_number(beta, f"betas[{index}]") < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        _check_non_negative(group["weight_decay"], "weight_decay")

    def _state(self, param: Tensor, amsgrad: bool, moment_shape=None) -> dict[str, Tensor]:
        """The parameter's state, created at its first step.

        ``moment_shape`` is the shape of the second moments: the parameter's own for a
        Euclidean parameter, that of ``component_inner`` for one point otherwise.
        """
        state = self.state[param]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        for key in ("exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg_sq",):
            if key not in state:
                state[key] = (
                    torch.zeros_like(param, memory_format=torch.preserve_format)
                    if moment_shape is None
                    else param.new_zeros(moment_shape)
                )
        return state

    def _update_euclidean(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """torch.optim.Adam's update (its functional form, multi-tensor when ``foreach``)."""
        amsgrad = group["amsgrad"]
        states = [self._state(p, amsgrad) for p in params]
        beta1, beta2 = group["betas"]
        torch_adam(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
            [s["step"] for s in states],
            foreach=group["foreach"],
            has_complex=any(torch.is_complex(p) for p in params),
            decoupled_weight_decay=group["decoupled_weight_decay"],
            amsgrad=amsgrad,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _update_batch(self, group: dict[str, Any], batch: Batch) -> None:
        manifold, params = batch.manifold, batch.params
        amsgrad = group["amsgrad"]
        beta1, beta2 = group["betas"]
        weight_decay = group["weight_decay"]

        x = self._stack(params, "x")
        decay = weight_decay != 0 and not group["decoupled_weight_decay"]
        g = self._stack([p.grad for p in params], "grad", private=decay)
        if decay:
            g.add_(x, alpha=weight_decay)
        r = manifold.egrad2rgrad(x, g)
        square = manifold.component_inner(x, r)  # (B, 1, 1) for one number per matrix
        # one point's: the trailing dimensions (a batch of one comes unstacked)
        moment_shape = square.shape[square.dim() - params[0].dim() :]
        states = [self._state(p, amsgrad, moment_shape) for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)

        exp_avg = self._stack([s["exp_avg"] for s in states], "exp_avg").lerp_(r, 1 - beta1)
        exp_avg_sq = self._stack([s["exp_avg_sq"] for s in states], "exp_avg_sq")
        exp_avg_sq.mul_(beta2).add_(square, alpha=1 - beta2)
        if amsgrad:
            max_exp_avg_sq = self._stack([s["max_exp_avg_sq"] for s in states], "max_exp_avg_sq")
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)

        # the scale has the small shape of the moments (or is a number)
        scale = _adam_scale(steps, max_exp_avg_sq if amsgrad else exp_avg_sq, group)
        if weight_decay != 0 and group["decoupled_weight_decay"]:
            step = (exp_avg * scale).add_(
                manifold.egrad2rgrad(x, x), alpha=-group["lr"] * weight_decay
            )
            x, exp_avg = manifold.retr_transp(x, step, exp_avg)
        else:
            bound = None
            if math.prod(moment_shape) == 1:  # one second moment per point
                direction_bound = adam_direction_bound(beta1, beta2)
                if direction_bound is not None:
                    bound = group["lr"] * direction_bound
            x, exp_avg = retr_transp_direction(manifold, x, exp_avg, scale, bound)

        write_back(params, x)
        write_back([s["exp_avg"] for s in states], exp_avg)
        write_back([s["exp_avg_sq"] for s in states], exp_avg_sq)
        if amsgrad:
            write_back([s["max_exp_avg_sq"] for s in states], max_exp_avg_sq)
