"""Curvature operators of a model, a loss and data: Hessian, GGN and empirical Fisher.

All three act on the flat vector of the selected parameters (or on pytrees keyed by
parameter name) and share these rules:

* **Data.** ``data`` is one ``(inputs, targets)`` batch or an iterable of such batches
  (materialised into a list at construction). ``loss_fn(outputs, targets)`` returns the
  *mean* loss of a batch, so the full-data loss is ``sum_b (n_b / N) L_b`` with ``n_b``
  the batch size (``len(targets)``) and ``N = sum_b n_b``. Products are weighted the same
  way, so they do not depend on how the data is split (for per-sample losses).
  ``inputs`` is a tensor or a tuple of tensors (positional arguments of the model).
* **Mode.** The model is evaluated with *eval* semantics: BatchNorm uses its running
  statistics and dropout is off. This makes the operator deterministic, symmetric and
  separable over samples (hence split-invariant). It is done by setting each submodule's
  ``training`` flag to ``False`` for the duration of a product and restoring every flag
  afterwards (not thread-safe with concurrent use of the same model); the caller's mode
  is unchanged after every call.
* **Purity.** Products go through :func:`torch.func.functional_call` with detached
  parameters and buffers: parameters, buffers and ``.grad`` are never written.
  Parameter values are read at product time (detached tensors share storage), except
  where a graph is cached (single-batch :class:`HessianOperator`): build a new operator
  after changing the parameters.
* **Distributed.** Under an initialised :mod:`torch.distributed` process group with more
  than one rank, each rank passes its own shard of the data (an empty one too: no
  batches, or batches of zero samples); the weights become ``n_b / N`` with ``N`` the
  batch sizes summed over all ranks, and every product is all-reduced (one
  ``all_reduce`` per product, plus one of the gradient for Riemannian operators). A
  product on rank ``r`` is therefore ``sum_s H_s v_s``, every rank's shard operator
  applied to *that rank's* input: it is the full-data product ``H v`` only when ``v`` is
  the same on every rank. The probes in :mod:`torsion.curvature` draw their random vectors
  on rank 0 and broadcast them, so they return identical results on every rank; an input
  of your own to ``@``, ``matvec`` or ``matmat`` must be identical on every rank too
  (broadcast it). The ranks must select the same parameters (names, shapes, dtype;
  checked at construction, with one ``all_gather_object``) and make the same calls.
  ``distributed=False`` keeps an operator local to its rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torsion.curvature._hvp import (
    GGN_METHODS,
    GGNMethod,
    GradientGraph,
    autograd_gradient,
    ggn_vp_and_method,
    hvp_and_method,
    not_transformable,
)
from torsion.curvature._linop import LinearOperator, TangentSpace

__all__ = ["EmpiricalFisherOperator", "GGNOperator", "HessianOperator"]

OperatorMethod = Literal[
    "auto", "graph_reuse", "double_backward", "forward_over_reverse", "reverse_over_reverse"
]
_OPERATOR_METHODS = (
    "auto",
    "graph_reuse",
    "double_backward",
    "forward_over_reverse",
    "reverse_over_reverse",
)


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _eval_semantics(model: nn.Module) -> Iterator[None]:
    """Eval semantics for the duration of the block; every module's flag is restored."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _as_batches(data: Any, allow_empty: bool) -> tuple[list[tuple[Any, Tensor]], list[int]]:
    """Batches and their sizes ``n_b`` (the length of the targets).

    With ``allow_empty`` (a distributed operator: one rank's shard may hold no sample) no
    batches, or batches of zero samples, are accepted, and the empty batches are dropped;
    the caller checks that the ranks hold some sample together.
    """
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], Tensor):
        batches = [data]
    elif isinstance(data, Iterable) and not isinstance(data, Tensor):
        batches = list(data)
    else:
        raise TypeError(
            f"data must be an (inputs, targets) batch or an iterable of batches, got {type(data)}"
        )
    if not batches and not allow_empty:
        raise ValueError("data is empty: need at least one (inputs, targets) batch")
    kept, sizes = [], []
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"batch {i} must be an (inputs, targets) pair, got {type(batch)}")
        targets = batch[1]
        if not isinstance(targets, Tensor) or targets.ndim == 0:
            raise ValueError(f"batch {i}: targets must be a tensor with a batch dim")
        if targets.shape[0] == 0:
            if allow_empty:
                continue
            raise ValueError(f"batch {i}: targets must be a tensor with a non-empty batch dim")
        kept.append(tuple(batch))
        sizes.append(targets.shape[0])
    return kept, sizes


def _use_distributed(distributed: bool | None) -> bool:
    """Whether products are all-reduced: ``None`` means "when there are several ranks"."""
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        return initialised and dist.get_world_size() > 1
    if distributed and not initialised:
        raise RuntimeError(
            "distributed=True needs an initialised torch.distributed process group "
            "(call torch.distributed.init_process_group first)"
        )
    return bool(distributed)


def _select_params(model: nn.Module, params: Any) -> dict[str, nn.Parameter]:
    """The selected parameters by name, in ``model.named_parameters()`` order.

    The flat layout follows the model, not the caller: a set of tensors (as collected for
    FSDP's ``ignored_params``) iterates in an order that depends on object addresses, so it
    would give each process, and each rank of a distributed operator, its own layout.
    """
    named = dict(model.named_parameters())
    if params is None:
        return _checked_selection({n: p for n, p in named.items() if p.requires_grad})
    if isinstance(params, (str, Tensor)):
        params = [params]
    chosen = set()
    by_id = {id(p): n for n, p in named.items()}
    for item in params:
        if isinstance(item, str):
            if item not in named:
                raise ValueError(f"parameter {item!r} is not a parameter of the model")
            chosen.add(item)
        elif isinstance(item, Tensor):
            if id(item) not in by_id:
                raise ValueError(
                    f"a tensor of shape {tuple(item.shape)} in params is not a parameter "
                    "of the model"
                )
            chosen.add(by_id[id(item)])
        else:
            raise TypeError(f"params must hold names or tensors, got {type(item)}")
    return _checked_selection({n: p for n, p in named.items() if n in chosen})


def _checked_selection(selected: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """``selected``, checked to be non-empty and to share one dtype and device."""
    if not selected:
        raise ValueError("no parameters selected (none requires grad?)")
    dtypes = {(p.dtype, p.device) for p in selected.values()}
    if len(dtypes) != 1:
        raise ValueError(f"selected parameters must share one dtype and device, got {dtypes}")
    return selected


def _layout_of(params: dict[str, Tensor]) -> list[tuple[str, str]]:
    """Each selected parameter's name with its shape and dtype: what the ranks must share."""
    return [(n, f"shape {tuple(p.shape)}, {p.dtype}") for n, p in params.items()]


def _layout_mismatch(layouts: Sequence[list[tuple[str, str]]]) -> str | None:
    """How the ranks' parameter layouts differ from rank 0's (``None`` when they agree)."""
    first = dict(layouts[0])
    differences = []
    for rank, layout in enumerate(layouts[1:], start=1):
        if layout == layouts[0]:
            continue
        own = dict(layout)
        differing = [
            f"{name!r}: {first.get(name, 'not selected')} on rank 0, "
            f"{own.get(name, 'not selected')} on rank {rank}"
            for name in dict.fromkeys([*first, *own])
            if first.get(name) != own.get(name)
        ]
        differences += differing or [f"rank {rank} orders the parameters differently"]
    return "; ".join(differences) or None


def _check_same_layout(params: dict[str, Tensor]) -> None:
    """Raise on every rank when the ranks flatten different parameters.

    A product is all-reduced entry by entry, so ranks with different layouts would add up
    entries of different parameters (silently, when the sizes agree) or fail inside the
    backend. One ``all_gather_object`` at construction lets every rank see every layout and
    raise the same error.
    """
    layouts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, _layout_of(params))
    mismatch = _layout_mismatch(layouts)
    if mismatch is not None:
        raise ValueError(
            "a distributed operator needs the same parameters (names, shapes, dtype) on "
            f"every rank: {mismatch}"
        )


def _call_args(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


class _ModelOperator(LinearOperator):
    """Shared state of the model operators: model, loss, batches, selected parameters."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Any,
        params: Any,
        distributed: bool | None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model)}")
        selected = _select_params(model, params)
        self._model = model
        self._loss_fn = loss_fn
        self._params = {n: p.detach().as_subclass(Tensor) for n, p in selected.items()}
        self._manifolds = {n: getattr(p, "manifold", None) for n, p in selected.items()}
        first = next(iter(self._params.values()))
        n = sum(p.numel() for p in self._params.values())
        super().__init__(
            (n, n),
            first.dtype,
            first.device,
            param_shapes={k: p.shape for k, p in self._params.items()},
            symmetric=True,
        )
        self.distributed = _use_distributed(distributed)
        if self.distributed:
            _check_same_layout(self._params)
        self._batches, sizes = _as_batches(data, allow_empty=self.distributed)
        self._total = self._all_reduce(torch.tensor(sum(sizes), device=self.device)).item()
        if self._total == 0:  # only reached by a distributed operator: raised on every rank
            raise ValueError("data is empty on every rank: need at least one sample in all")
        self._weights = [size / self._total for size in sizes]

    def _all_reduce(self, x: Tensor) -> Tensor:
        """Sum of ``x`` over the ranks (``x`` itself when the operator is local)."""
        if not self.distributed:
            return x
        x = x.contiguous()
        dist.all_reduce(x)
        return x

    def _frozen(self) -> dict[str, Tensor]:
        """Detached unselected parameters and all buffers, read now.

        Each tensor appears once, under its first name: ``functional_call`` gives a tied
        alias (``decoder.weight = encoder.weight``) the value of the name it is tied to,
        and refuses two values for one tied tensor.
        """
        frozen = {n: p.detach() for n, p in self._model.named_parameters() if n not in self._params}
        frozen.update({n: b.detach() for n, b in self._model.named_buffers()})
        return frozen

    def _outputs_fn(self, inputs: Any) -> Callable[[dict[str, Tensor]], Any]:
        frozen, args = self._frozen(), _call_args(inputs)

        def outputs(params: dict[str, Tensor]) -> Any:
            return torch.func.functional_call(self._model, {**frozen, **params}, args)

        return outputs

    def _loss_of_outputs(self, targets: Tensor) -> Callable[[Any], Tensor]:
        def loss(outputs: Any) -> Tensor:
            value = self._loss_fn(outputs, targets)
            if not isinstance(value, Tensor) or value.ndim != 0:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"loss_fn must return a scalar (0-dim) tensor, got {got}")
            return value

        return loss

    def _loss_fn_of_params(self, batch: tuple[Any, Tensor]) -> Callable[[dict], Tensor]:
        outputs, loss = self._outputs_fn(batch[0]), self._loss_of_outputs(batch[1])
        return lambda params: loss(outputs(params))


# ----------------------------------------------------------------------------- operators


class HessianOperator(_ModelOperator):
    """Hessian of the full-data loss with respect to the selected parameters.

    Args:
        model: the network (never modified; see the module notes on eval semantics).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` mean loss of a batch.
        data: one ``(inputs, targets)`` batch or an iterable of batches.
        params: ``None`` (all parameters with ``requires_grad``), or an iterable (a
            list, a set) of parameter names or of parameter tensors of ``model``. The flat
            layout follows ``model.named_parameters()``, whatever the order of ``params``.
        riemannian: for selected parameters with a ``manifold`` attribute (e.g.
            ``geoopt.ManifoldParameter``) satisfying
            :class:`~torsion.curvature._linop.TangentSpace`, give the Riemannian Hessian
            ``ehess2rhess(x, egrad, H u, u)`` with ``u = proju(x, v)`` (``H`` the joint
            Euclidean Hessian, ``egrad`` the full-data gradient); Euclidean parameters get
            ``(H u)`` unchanged. The result is tangent; with an embedded metric the
            operator is symmetric on the tangent space.
        method: ``"auto"`` (default): one batch -> ``"graph_reuse"`` (the gradient graph is
            built once, at the first product, and every product is one more backward,
            ~1.35x a gradient); several batches -> :func:`~torsion.curvature._hvp.hvp`'s
            automatic choice per batch (memory bounded: no graph is kept; for a model that
            torch.func cannot transform, such as a loss on forces or the fused kernels,
            double backward, chosen at the first product and kept). Any
            :func:`~torsion.curvature._hvp.hvp` method can be forced; ``"graph_reuse"``
            needs a single batch.
        distributed: ``None`` (default): all-reduce products over the ranks when an
            initialised :mod:`torch.distributed` group has more than one rank (each rank
            passes its shard of the data; see the module notes); ``True``: require that;
            ``False``: stay local to this rank.

    Shapes:
        ``(n, n)`` with ``n`` the number of selected parameter entries; pytrees are dicts
        keyed by parameter name.

    Raises:
        ValueError: empty data (on every rank, for a distributed operator), parameters not
            in the model, ranks selecting different parameters (raised on every rank),
            non-scalar loss (at the first product), unknown method.
        RuntimeError: ``distributed=True`` without an initialised process group.
        TypeError: ``riemannian=True`` and a parameter's manifold lacks ``proju`` or
            ``ehess2rhess``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        data: Any,
        params: Any = None,
        *,
        riemannian: bool = False,
        method: OperatorMethod = "auto",
        distributed: bool | None = None,
    ):
        super().__init__(model, loss_fn, data, params, distributed)
        if method not in _OPERATOR_METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {_OPERATOR_METHODS}")
        if method == "auto" and len(self._batches) == 1:
            method = "graph_reuse"
        if method == "graph_reuse" and len(self._batches) > 1:
            raise ValueError(
                f"method='graph_reuse' keeps one batch's gradient graph; data has "
                f"{len(self._batches)} batches (use 'auto' or another method)"
            )
        self.method = method
        self._batch_method: str = method
        self.riemannian = riemannian
        self._tangent: dict[str, TangentSpace] = {}
        if riemannian:
            for name, manifold in self._manifolds.items():
                if manifold is None:
                    continue
                if not isinstance(manifold, TangentSpace):
                    raise TypeError(
                        f"parameter {name!r} has manifold {type(manifold).__name__}, which lacks "
                        "proju/ehess2rhess (the TangentSpace protocol)"
                    )
                self._tangent[name] = manifold
        self._graph: GradientGraph | None = None
        self._egrad: dict[str, Tensor] | None = None
        self._egrad_versions: tuple[int, ...] = ()

    def _euclidean(self, V: Tensor) -> Tensor:
        """Flat Euclidean Hessian products of a flat block ``(n, k)``, summed over the ranks.

        With graph reuse a product is one backward through the cached graph: no pytree,
        no eval-mode switch (the graph was recorded in eval mode; a backward runs no
        module code), one copy of the block (:meth:`GradientGraph.hvp_flat`).
        """
        if self.method == "graph_reuse" and self._batches:
            if self._graph is None:
                with _eval_semantics(self._model):
                    f = self._loss_fn_of_params(self._batches[0])
                    self._graph = GradientGraph(f, self._params)
            return self._all_reduce(self._scaled(self._graph.hvp_flat(V)))
        tree = self.unflatten(V)
        local = torch.zeros_like(V)  # also a rank's share without batches
        with _eval_semantics(self._model):
            for batch, w in zip(self._batches, self._weights, strict=True):
                f = self._loss_fn_of_params(batch)
                product, used = hvp_and_method(
                    f, self._params, tree, method=self._batch_method, block=True
                )
                if used == "double_backward":
                    # "auto" fell back (torch.func cannot run this model): skip the
                    # failing attempt in every later product.
                    self._batch_method = used
                local = local + w * self.flatten(product)
        return self._all_reduce(local)

    def _scaled(self, x: Tensor) -> Tensor:
        """A single batch's mean product, weighted by its share of all ranks' samples."""
        w = self._weights[0]
        return x if w == 1 else w * x

    def _gradient(self) -> dict[str, Tensor]:
        """The full-data gradient at the current parameter values: recomputed when a
        parameter was modified in place since the last one (an optimizer step). The
        graph-reuse path reads it from its graph, which holds the values it was recorded
        at, but still all-reduces it anew, so that the ranks of a distributed operator join
        the same collectives whichever path each takes (a rank without data has no graph).
        """
        versions = tuple(p._version for p in self._params.values())
        if versions != self._egrad_versions:
            self._egrad = None
        if self._egrad is None:
            self._egrad_versions = versions
            with _eval_semantics(self._model):
                if self._graph is not None:
                    local = self._scaled(self.flatten(self._graph.gradient))
                else:
                    local = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
                    for batch, w in zip(self._batches, self._weights, strict=True):
                        g = autograd_gradient(self._loss_fn_of_params(batch), self._params)
                        local = local + w * self.flatten(g)
            self._egrad = self.unflatten(self._all_reduce(local))
        return self._egrad

    def _matmat(self, V: Tensor) -> Tensor:
        if not self._tangent:
            return self._euclidean(V)
        tree = self.unflatten(V)
        for name, manifold in self._tangent.items():
            x = self._params[name]
            tree[name] = torch.stack([manifold.proju(x, u) for u in tree[name]])
        ehess = self.unflatten(self._euclidean(self.flatten(tree)))
        egrad = self._gradient()
        for name, manifold in self._tangent.items():
            x, g = self._params[name], egrad[name]
            ehess[name] = torch.stack(
                [
                    manifold.ehess2rhess(x, g, h, u)
                    for h, u in zip(ehess[name], tree[name], strict=True)
                ]
            )
        return self.flatten(ehess)


class GGNOperator(_ModelOperator):
    """Generalized Gauss-Newton matrix ``sum_b (n_b/N) J_b^T H_loss,b J_b`` of the data.

    ``J_b`` is the Jacobian of the model outputs on batch ``b`` with respect to the
    selected parameters, ``H_loss,b`` the Hessian of ``loss_fn(., targets_b)`` at the
    outputs (see :func:`~torsion.curvature._hvp.ggn_vp`). Positive semi-definite for
    convex losses (MSE, cross-entropy). Arguments (``distributed`` included) as in
    :class:`HessianOperator`, and:

    Args:
        method: ``"auto"`` (default): torch.func (forward mode, vmapped over blocks), or
            plain autograd when torch.func cannot run the model (forces, custom ops
            without functorch rules; chosen at the first product and kept: the
            ``method`` attribute then reads ``"autograd"``); ``"torch_func"`` or
            ``"autograd"`` to insist.

    Shapes:
        ``(n, n)``; pytrees keyed by parameter name.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Any,
        params: Any = None,
        *,
        method: GGNMethod = "auto",
        distributed: bool | None = None,
    ):
        super().__init__(model, loss_fn, data, params, distributed)
        _check_method(method)
        self.method = method

    def _matmat(self, V: Tensor) -> Tensor:
        tree = self.unflatten(V)
        total = torch.zeros_like(V)
        with _eval_semantics(self._model):
            for (inputs, targets), w in zip(self._batches, self._weights, strict=True):
                out, used = ggn_vp_and_method(
                    self._outputs_fn(inputs),
                    self._loss_of_outputs(targets),
                    self._params,
                    tree,
                    block=True,
                    method=self.method,
                )
                if used == "autograd":
                    self.method = used  # "auto" fell back: skip torch.func from now on
                total = total + w * self.flatten(out)
        return self._all_reduce(total)


class EmpiricalFisherOperator(_ModelOperator):
    """Empirical Fisher ``F = (1/N) sum_i g_i g_i^T`` over all ``N`` samples.

    ``g_i`` is the gradient of the per-sample loss ``l_i = loss_fn(model(x_i), y_i)``,
    evaluated on a batch of one sample, so that for a mean-reduced loss the full-data loss
    is ``(1/N) sum_i l_i`` (curvlinops' convention for ``reduction="mean"``). Per-sample
    gradients come one batch at a time (memory ``n_b * n`` per batch). Arguments
    (``distributed`` included) as in :class:`HessianOperator`; ``inputs`` and ``targets``
    must have the sample dimension first; and:

    Args:
        method: ``"auto"`` (default): ``vmap(grad)`` over the samples of a batch, or one
            autograd backward per sample when torch.func cannot run the model (chosen at
            the first product and kept: the ``method`` attribute then reads
            ``"autograd"``); ``"torch_func"`` or ``"autograd"`` to insist.

    Shapes:
        ``(n, n)``; pytrees keyed by parameter name.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Any,
        params: Any = None,
        *,
        method: GGNMethod = "auto",
        distributed: bool | None = None,
    ):
        super().__init__(model, loss_fn, data, params, distributed)
        _check_method(method)
        self.method = method

    def _per_sample_gradients(self, inputs: Any, targets: Tensor) -> Tensor:
        """The gradients ``g_i`` of a batch as the columns of ``(n, n_b)``."""
        args = _call_args(inputs)
        if self.method != "autograd":
            try:
                return self._vmapped_gradients(args, targets)
            except RuntimeError as error:
                if not not_transformable(error):
                    raise
                if self.method == "torch_func":
                    raise RuntimeError(
                        f"EmpiricalFisherOperator(method='torch_func') runs the model under "
                        f"vmap(grad), which it does not support: {error}; use "
                        "method='autograd' (the same operator)"
                    ) from error
                self.method = "autograd"  # "auto" fell back: skip torch.func from now on
        columns = []
        for i in range(targets.shape[0]):
            sample = (tuple(a[i : i + 1] for a in args), targets[i : i + 1])
            gradient = autograd_gradient(self._loss_fn_of_params(sample), self._params)
            columns.append(self.flatten(gradient))
        return torch.stack(columns, dim=1)

    def _vmapped_gradients(self, args: tuple, targets: Tensor) -> Tensor:
        frozen = self._frozen()

        def sample_loss(params: dict[str, Tensor], x: Sequence[Tensor], y: Tensor) -> Tensor:
            state = {**frozen, **params}
            out = torch.func.functional_call(self._model, state, tuple(a.unsqueeze(0) for a in x))
            return self._loss_of_outputs(y.unsqueeze(0))(out)

        grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(
            self._params, args, targets
        )
        return self.flatten(grads)  # (n, n_b)

    def _matmat(self, V: Tensor) -> Tensor:
        total = torch.zeros_like(V)
        with _eval_semantics(self._model):
            for inputs, targets in self._batches:
                G = self._per_sample_gradients(inputs, targets)
                total = total + G @ (G.mT @ V)
        return self._all_reduce(total) / self._total


def _check_method(method: str) -> None:
    if method not in GGN_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {GGN_METHODS}")
