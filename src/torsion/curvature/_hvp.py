"""The one Hessian-vector-product engine: ``hvp``, ``jvp``, ``vjp`` and ``ggn_vp``.

Parameter pytrees are a ``dict`` of tensors, a ``tuple``/``list`` of tensors, or a single
tensor. A *block* of ``k`` vectors is the same pytree with a leading ``k`` on every leaf.

No method wins everywhere (TARGETS.md section 4; one gradient = 1.0 on a CPU MLP):

=============================================  ======  =====================================
method                                          cost    used by ``method="auto"`` for
=============================================  ======  =====================================
double backward, reusing the gradient graph     1.35x   :class:`GradientGraph` (probe loops)
``"double_backward"`` (fresh graph)             2.4x    one vector on the CPU
``"reverse_over_reverse"`` (``torch.func``)     2.7x    blocks on the CPU (vmapped)
``"forward_over_reverse"`` (``torch.func``)     3.5x    everything on CUDA (frugal memory)
=============================================  ======  =====================================

All methods compute the same product and agree to float tolerance (tested in float64).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["GGNMethod", "GradientGraph", "HVPMethod", "ggn_vp", "hvp", "jvp", "vjp"]

HVPMethod = Literal["auto", "double_backward", "forward_over_reverse", "reverse_over_reverse"]
_METHODS = ("auto", "double_backward", "forward_over_reverse", "reverse_over_reverse")


# ------------------------------------------------------------------------------ pytrees


def _leaves(tree: Any, name: str) -> tuple[list[Tensor], Callable[[list[Tensor]], Any]]:
    """Leaves of a pytree and a function that rebuilds the same structure from new leaves."""
    if isinstance(tree, Tensor):
        return [tree], lambda leaves: leaves[0]
    if isinstance(tree, Mapping):
        keys = list(tree)
        leaves = [tree[k] for k in keys]
        rebuild: Callable[[list[Tensor]], Any] = lambda new: dict(zip(keys, new, strict=True))  # noqa: E731
    elif isinstance(tree, (tuple, list)):
        leaves = list(tree)
        kind = type(tree) if type(tree) in (tuple, list) else tuple
        rebuild = lambda new: kind(new)  # noqa: E731
    else:
        raise TypeError(
            f"{name} must be a tensor, a dict or a tuple/list of tensors, got {type(tree)}"
        )
    if not leaves or not all(isinstance(leaf, Tensor) for leaf in leaves):
        raise TypeError(f"{name} must hold at least one tensor and only tensors")
    return leaves, rebuild


def _structure(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return "tensor"
    if isinstance(tree, Mapping):
        return ("dict", tuple(sorted(tree)))
    return ("seq", len(tree))


def _check_like(params: Any, v: Any, block: bool, name: str = "v") -> int | None:
    """Check that ``v`` has the structure of ``params`` (leaves with a leading ``k`` when
    ``block``); return ``k`` or ``None``."""
    p_leaves, _ = _leaves(params, "params")
    v_leaves, _ = _leaves(v, name)
    if _structure(params) != _structure(v):
        raise ValueError(
            f"{name} must have the structure of params: got {_structure(v)}, "
            f"expected {_structure(params)}"
        )
    if isinstance(params, Mapping):
        v_leaves = [v[k] for k in params]
    k = v_leaves[0].shape[0] if (block and v_leaves[0].ndim > 0) else None
    for p, x in zip(p_leaves, v_leaves, strict=True):
        want = (k, *p.shape) if block else tuple(p.shape)
        if tuple(x.shape) != want:
            kind = "a block (leading k on every leaf) shaped like" if block else "shaped like"
            raise ValueError(
                f"{name} must be {kind} params: leaf of shape {tuple(x.shape)} "
                f"against parameter of shape {tuple(p.shape)}"
            )
    return k


def _align(params: Any, v: Any) -> Any:
    """``v`` with the key order and sequence type of ``params`` (torch.func compares dict
    key order, and a list against a tuple as different structures)."""
    if isinstance(params, Mapping) and isinstance(v, Mapping):
        return {key: v[key] for key in params}
    if type(params) in (tuple, list) and isinstance(v, (tuple, list)):
        return type(params)(v)
    return v


def _scalar(f: Callable[[Any], Tensor], what: str = "f") -> Callable[[Any], Tensor]:
    """Wrap ``f`` so a non-scalar output raises a ``ValueError`` naming it (a shape check,
    no host synchronisation; works under ``torch.func`` transforms)."""

    def wrapped(params: Any) -> Tensor:
        out = f(params)
        if not isinstance(out, Tensor) or out.ndim != 0:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{what} must return a scalar (0-dim) tensor, got {got}")
        return out

    return wrapped


def _fresh(leaves: list[Tensor]) -> list[Tensor]:
    """Detached leaves that require grad: the caller's tensors are never touched."""
    return [leaf.detach().requires_grad_(True) for leaf in leaves]


def _grad_or_zeros(outputs: list[Tensor], inputs: list[Tensor], grad_outputs, **kw) -> list[Tensor]:
    """``torch.autograd.grad`` that returns zeros for inputs an output does not depend on."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(
        [o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True, **kw
    )
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]


# ------------------------------------------------------------------------------ engine

#: Elements per chunk of a transposing copy on the CPU (512 KiB in float32, about an L2
#: cache): a (1.1M, 8) float32 block transposes in 5.9 ms in 16K-row chunks against 13.1 ms
#: in one copy (2-core Xeon, one thread).
_TRANSPOSE_CHUNK_ELEMENTS = 1 << 17


class GradientGraph:
    """The gradient of ``f`` at ``params``, kept with its graph for repeated products.

    One forward and one backward with ``create_graph=True`` build the gradient; each
    :meth:`hvp` is then one more backward through that graph (``retain_graph=True``),
    about 1.35x a gradient on the CPU: the cheapest way to feed a probe loop (Lanczos,
    Hutchinson) on one batch. The graph holds the activations of the batch, so memory
    is that of one training step; build one per batch.

    Args:
        f: maps a parameter pytree to a scalar tensor.
        params: the point; a dict, tuple/list of tensors, or a tensor (not modified;
            ``.grad`` is never written).

    Attributes:
        value: ``f(params)``, detached.
        gradient: the gradient as a pytree like ``params``, detached.

    Shapes:
        ``v``: a pytree like ``params``, or a block (leading ``k`` on every leaf).
    """

    def __init__(self, f: Callable[[Any], Tensor], params: Any):
        leaves, rebuild = _leaves(params, "params")
        self._params = params
        self._rebuild = rebuild
        self._inputs = _fresh(leaves)
        with torch.enable_grad():
            value = _scalar(f)(rebuild(self._inputs))
            self._grads = _grad_or_zeros([value], self._inputs, [None], create_graph=True)
        self.value = value.detach()
        self.gradient = rebuild([g.detach() for g in self._grads])
        self._shapes = [x.shape for x in self._inputs]
        self._numels = [x.numel() for x in self._inputs]
        self._size = sum(self._numels)
        self._rows: Tensor | None = None  # hvp_flat's transposed block, reused

    def hvp(self, v: Any, *, block: bool = False) -> Any:
        """Hessian-vector product with ``v`` (or with each vector of a block)."""
        k = _check_like(self._params, v, block)
        v_leaves, _ = _leaves(_align(self._params, v), "v")
        if not block:
            return self._rebuild(self._product(v_leaves))
        if k == 0:  # an empty block: empty products
            return self._rebuild([torch.zeros_like(x) for x in v_leaves])
        columns = [self._product([x[i] for x in v_leaves]) for i in range(k)]
        return self._rebuild([torch.stack(c) for c in zip(*columns, strict=True)])

    def hvp_flat(self, V: Tensor) -> Tensor:
        """Hessian products with the columns of a flat block, for probe loops.

        The flat layout concatenates the flattened leaves of ``params`` in order (dict
        insertion order). No pytree is built: each column is split into views of the
        leaves, each product is written straight into a row of one output buffer, and the
        result is its transpose. A block whose columns are contiguous (``V.mT`` row-major,
        as :func:`~torsion.curvature.eigsh` passes) is split without a copy; any other is
        transposed once, into a buffer this graph keeps for the next block of the same
        shape (a fresh one page-faults on first touch, which on a CPU costs as much as the
        transposing copy itself) and, on a CPU, in cache-sized row chunks (a whole-block
        transposing copy runs at a fraction of the memory bandwidth).

        Args:
            V: the block, one vector per column, in the flat layout of ``params``.

        Returns:
            The ``k`` Hessian-vector products, one per column.

        Shapes:
            ``V``: ``(n, k)`` with ``n`` the total number of parameter entries; the result
            ``(n, k)`` (a transposed view of a contiguous ``(k, n)`` buffer).

        Raises:
            ValueError: ``V`` is not ``(n, k)``.
        """
        if V.ndim != 2 or V.shape[0] != self._size:
            raise ValueError(f"V must have shape ({self._size}, k), got {tuple(V.shape)}")
        # One transposing copy when the vectors are columns of a column-major block: a
        # strided row would touch every cache line of the block in each product.
        rows = V.mT if V.mT.is_contiguous() else self._transposed(V)
        out = torch.empty(rows.shape, dtype=V.dtype, device=V.device)
        for row, target in zip(rows, out, strict=True):
            pieces = row.split(self._numels)
            leaves = [p.view(s) for p, s in zip(pieces, self._shapes, strict=True)]
            grads = self._product(leaves)
            torch.cat([g.reshape(-1) for g in grads], out=target)
        return out.mT

    def _transposed(self, V: Tensor) -> Tensor:
        """``V.mT`` copied into the reused row-major buffer."""
        rows = self._rows
        if (
            rows is None
            or rows.shape != V.mT.shape
            or rows.dtype != V.dtype
            or rows.device != V.device
        ):
            rows = self._rows = torch.empty(V.mT.shape, dtype=V.dtype, device=V.device)
        if V.device.type != "cpu":
            return rows.copy_(V.mT)
        step = max(1, _TRANSPOSE_CHUNK_ELEMENTS // max(V.shape[1], 1))
        for start in range(0, V.shape[0], step):
            rows[:, start : start + step].copy_(V[start : start + step].mT)
        return rows

    def _product(self, v_leaves: list[Tensor]) -> list[Tensor]:
        return _grad_or_zeros(self._grads, self._inputs, v_leaves, retain_graph=True)


def autograd_gradient(f: Callable[[Any], Tensor], params: Any) -> Any:
    """The gradient of ``f`` at ``params`` by one backward (no graph kept).

    Plain autograd rather than ``torch.func.grad``, so it works for every ``f`` autograd
    can differentiate, including forwards that call ``torch.autograd.grad`` themselves
    (forces) and custom ops without functorch support.
    """
    leaves, rebuild = _leaves(params, "params")
    inputs = _fresh(leaves)
    with torch.enable_grad():
        value = _scalar(f)(rebuild(inputs))
        grads = _grad_or_zeros([value], inputs, [None])
    return rebuild(grads)


def _auto_method(params: Any, block: bool) -> str:
    device = _leaves(params, "params")[0][0].device
    if device.type == "cuda":
        return "forward_over_reverse"
    return "reverse_over_reverse" if block else "double_backward"


def hvp(
    f: Callable[[Any], Tensor],
    params: Any,
    v: Any,
    *,
    method: HVPMethod = "auto",
    block: bool = False,
) -> Any:
    """Hessian-vector product ``(d^2 f / d params^2) v`` over parameter pytrees.

    Args:
        f: maps a parameter pytree to a scalar tensor. Must be functional for the
            ``torch.func`` methods (no in-place updates of captured tensors).
        params: the point: a dict, tuple/list of tensors, or a tensor (never modified).
        v: a pytree like ``params``; with ``block=True``, a block of ``k`` vectors (every
            leaf with a leading ``k``).
        method: ``"auto"`` (default), ``"double_backward"``, ``"forward_over_reverse"``
            or ``"reverse_over_reverse"``. ``"auto"``: on CUDA forward-over-reverse (least
            memory), on the CPU double backward for one vector and vmapped
            reverse-over-reverse for blocks (the measured fastest there). For repeated
            products at one point use :class:`GradientGraph`, the cheapest of all.
            When forward-over-reverse hits torch bug pytorch/pytorch#123996 (``F.mse_loss``
            with ``reduction="mean"``), ``"auto"`` redoes the product by
            reverse-over-reverse; an explicit ``"forward_over_reverse"`` raises. When ``f``
            cannot run under torch.func at all (its forward calls ``torch.autograd.grad``,
            as force training does; or it runs custom ops or ``autograd.Function`` s
            without functorch support, as the ``torch`` kernel backend, the spectral
            filters' sparse products and the SPD layers' matrix functions do), ``"auto"``
            redoes the product by double backward, which needs only autograd (a loss on
            forces is then differentiated three times, which every registered kernel
            backend supports): any ``RuntimeError`` of a torch.func method makes
            ``"auto"`` retry by double backward, where a genuine error of ``f`` is raised
            again. An explicit torch.func method raises a ``RuntimeError`` that names the
            cause and the way out.
        block: treat ``v`` as a block of vectors; the torch.func methods vmap over it,
            double backward builds the gradient graph once and reuses it.

    Returns:
        A pytree like ``v``.

    Shapes:
        ``params`` leaves ``s_i``; ``v`` and the result leaves ``s_i`` or ``(k, *s_i)``.

    Raises:
        ValueError: ``f`` is not scalar-valued, ``v`` does not match ``params``, or the
            method is unknown.
        RuntimeError: an explicit torch.func method on an ``f`` that torch.func cannot
            transform (see ``method``).

    Example:
        >>> x = torch.tensor([1.0, 2.0])
        >>> hvp(lambda p: (p**3).sum(), x, torch.ones(2))  # diag(6 x) @ 1
        tensor([ 6., 12.])
    """
    return hvp_and_method(f, params, v, method=method, block=block)[0]


def hvp_and_method(
    f: Callable[[Any], Tensor],
    params: Any,
    v: Any,
    *,
    method: HVPMethod = "auto",
    block: bool = False,
) -> tuple[Any, str]:
    """:func:`hvp`, and the method that computed it (``"auto"`` resolved, fallbacks
    included), so that a caller repeating products on the same ``f`` can skip a torch.func
    attempt that failed once."""
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {_METHODS}")
    k = _check_like(params, v, block)
    v = _align(params, v)
    auto = method == "auto"
    if auto:
        method = _auto_method(params, block)
    if k == 0:  # an empty block: empty products (vmap cannot map over zero vectors)
        leaves, rebuild = _leaves(v, "v")
        return rebuild([torch.zeros_like(x) for x in leaves]), method
    if method == "double_backward":
        return GradientGraph(f, params).hvp(v, block=block), method
    try:
        if method == "forward_over_reverse":
            try:
                return _forward_over_reverse(f, params, v, block), method
            except RuntimeError as error:
                if "ZeroTensors are immutable" not in str(error):
                    raise
                if not auto:
                    raise RuntimeError(_ZERO_TENSOR_BUG) from error
                # same product, other exact method (see _ZERO_TENSOR_BUG)
        return _reverse_over_reverse(f, params, v, block), "reverse_over_reverse"
    except RuntimeError as error:
        if auto:
            # torch.func could not run f (see _NOT_TRANSFORMABLE_MARKERS for the known
            # causes): autograd alone computes the same product; an error of f itself
            # is raised again from there.
            return GradientGraph(f, params).hvp(v, block=block), "double_backward"
        if not_transformable(error):
            raise RuntimeError(_NOT_TRANSFORMABLE.format(method=method, error=error)) from error
        raise


# torch bug pytorch/pytorch#123996 (open; fix proposed in #197723, still present in torch
# 2.13-2.15): forward-over-reverse through ``F.mse_loss(..., reduction="mean")`` with
# targets that carry no tangent fails with this error.
_ZERO_TENSOR_BUG = (
    "forward_over_reverse hit torch bug pytorch/pytorch#123996 ('ZeroTensors are "
    "immutable', e.g. F.mse_loss with reduction='mean'); use method='reverse_over_reverse' "
    "or 'double_backward' (same product), or write the loss as ((out - y) ** 2).mean()"
)


# What torch says when ``f`` cannot run under torch.func transforms: a forward that calls
# ``torch.autograd.grad`` or ``requires_grad_`` (forces as ``-dE/dpos`` by
# :func:`torsion.equivariant.energy_and_forces`); a ``torch.library`` custom op or an
# ``autograd.Function`` without functorch support (torsion's ``torch`` kernel backend, the
# spectral filters' sparse product); sparse CSR tensors; ``.data`` under ``vmap`` (the
# guarded third derivative of :mod:`torsion.linalg`'s matrix functions).
_NOT_TRANSFORMABLE_MARKERS = (
    "being transformed by a functorch transform",
    "must override the setup_context staticmethod",
    "appears to not have been used in the graph",
    "Sparse CSR tensors do not have strides",
    "under vmap transform is not allowed",
    "data-dependent control flow",  # vmap of a loss or model that branches on a value
    "must implement the jvp function",  # an autograd.Function without forward mode (OrthMap)
)
_NOT_TRANSFORMABLE = (
    "method={method!r} runs f under torch.func transforms, which f does not support: "
    "{error} (this happens when the model calls torch.autograd.grad in its forward, e.g. "
    "forces by energy_and_forces, or runs torch.library custom ops without functorch "
    "support, e.g. the 'torch' kernel backend); use method='double_backward' (the same "
    "product by autograd; method='auto' switches to it by itself)"
)


def not_transformable(error: RuntimeError) -> bool:
    """Whether ``error`` says that ``f`` cannot run under torch.func transforms."""
    return any(marker in str(error) for marker in _NOT_TRANSFORMABLE_MARKERS)


def _forward_over_reverse(f: Callable[[Any], Tensor], params: Any, v: Any, block: bool) -> Any:
    grad_f = torch.func.grad(_scalar(f))

    def one(u: Any) -> Any:
        return torch.func.jvp(grad_f, (params,), (u,))[1]

    return torch.func.vmap(one)(v) if block else one(v)


def _reverse_over_reverse(f: Callable[[Any], Tensor], params: Any, v: Any, block: bool) -> Any:
    _, pullback = torch.func.vjp(torch.func.grad(_scalar(f)), params)

    def one_rr(u: Any) -> Any:
        return pullback(u)[0]

    return torch.func.vmap(one_rr)(v) if block else one_rr(v)


def jvp(f: Callable[[Any], Any], params: Any, v: Any) -> tuple[Any, Any]:
    """Jacobian-vector product: ``(f(params), J v)`` by forward mode.

    Shapes:
        ``v`` like ``params``; ``J v`` like ``f(params)``.
    """
    _check_like(params, v, block=False)
    v = _align(params, v)
    return torch.func.jvp(f, (params,), (v,))


def vjp(f: Callable[[Any], Any], params: Any, u: Any) -> tuple[Any, Any]:
    """Vector-Jacobian product: ``(f(params), J^T u)`` by reverse mode.

    Shapes:
        ``u`` like ``f(params)``; ``J^T u`` like ``params``.
    """
    out, pullback = torch.func.vjp(f, params)
    _check_like(out, u, block=False, name="u")
    u = _align(out, u)
    return out, pullback(u)[0]


GGNMethod = Literal["auto", "torch_func", "autograd"]
GGN_METHODS = ("auto", "torch_func", "autograd")


def ggn_vp(
    model_fn: Callable[[Any], Any],
    loss_fn: Callable[[Any], Tensor],
    params: Any,
    v: Any,
    *,
    block: bool = False,
    method: GGNMethod = "auto",
) -> Any:
    """Generalized Gauss-Newton product ``J^T H_loss J v``.

    ``J`` is the Jacobian of ``model_fn`` (params -> outputs) at ``params``, ``H_loss`` the
    Hessian of ``loss_fn`` (outputs -> scalar) at the outputs. Two ways, same product:

    * ``"torch_func"``: ``J v`` by forward mode, ``H_loss`` reverse-over-reverse on the
      outputs and ``J^T`` one pullback; the linearisations are built once and vmapped over
      a block;
    * ``"autograd"``: plain autograd, for models torch.func cannot transform (a forward
      that calls ``torch.autograd.grad``, e.g. forces; custom ops without functorch rules).
      ``u -> J^T u`` is linear, so ``J v`` is the gradient of ``<J^T u, v>`` with respect to
      ``u`` (the double-vjp trick); then ``H_loss J v`` by double backward at the outputs
      and ``J^T`` by one more backward. The graphs are built once per call; each vector
      costs three backwards.

    ``"auto"`` (default) takes ``"torch_func"`` and falls back to ``"autograd"`` when
    torch.func cannot run the model.

    Args:
        model_fn: parameter pytree -> outputs (a tensor or pytree).
        loss_fn: outputs -> scalar tensor (targets closed over).
        params: the point (never modified).
        v: a pytree like ``params``, or a block with ``block=True``.
        block: treat ``v`` as a block of vectors (leading ``k`` on every leaf).
        method: ``"auto"``, ``"torch_func"`` or ``"autograd"``.

    Shapes:
        ``v`` and the result like ``params`` (with a leading ``k`` for a block).

    Raises:
        ValueError: ``loss_fn`` is not scalar-valued, ``v`` does not match ``params``, or
            an unknown ``method``.
        RuntimeError: ``method="torch_func"`` on a model torch.func cannot transform.
    """
    return ggn_vp_and_method(model_fn, loss_fn, params, v, block=block, method=method)[0]


def ggn_vp_and_method(
    model_fn: Callable[[Any], Any],
    loss_fn: Callable[[Any], Tensor],
    params: Any,
    v: Any,
    *,
    block: bool = False,
    method: GGNMethod = "auto",
) -> tuple[Any, str]:
    """:func:`ggn_vp`, and the method that computed it (``"auto"`` resolved), so that a
    caller repeating products can skip a torch.func attempt that failed once."""
    if method not in GGN_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {GGN_METHODS}")
    _check_like(params, v, block)
    v = _align(params, v)
    if method == "autograd":
        return _autograd_ggn_vp(model_fn, loss_fn, params, v, block), method
    try:
        return _torch_func_ggn_vp(model_fn, loss_fn, params, v, block), "torch_func"
    except RuntimeError as error:
        if not not_transformable(error):
            raise
        if method == "auto":
            return _autograd_ggn_vp(model_fn, loss_fn, params, v, block), "autograd"
        raise RuntimeError(
            f"ggn_vp(method='torch_func') runs the model under torch.func transforms, which "
            f"it does not support: {error}; use method='autograd' (the same product)"
        ) from error


def _torch_func_ggn_vp(model_fn, loss_fn, params, v, block: bool) -> Any:
    outputs, pullback = torch.func.vjp(model_fn, params)
    _, loss_pullback = torch.func.vjp(torch.func.grad(_scalar(loss_fn, "loss_fn")), outputs)

    def one(u: Any) -> Any:
        _, ju = torch.func.jvp(model_fn, (params,), (u,))
        return pullback(loss_pullback(ju)[0])[0]

    return torch.func.vmap(one)(v) if block else one(v)


def _autograd_ggn_vp(model_fn, loss_fn, params, v, block: bool) -> Any:
    leaves, rebuild = _leaves(params, "params")
    inputs = _fresh(leaves)
    with torch.enable_grad():
        outputs, rebuild_outputs = _leaves(model_fn(rebuild(inputs)), "model outputs")
        probes = [torch.zeros_like(o, requires_grad=True) for o in outputs]
        pulled = _grad_or_zeros(outputs, inputs, probes, create_graph=True)  # J^T u
        points = _fresh(outputs)
        loss = _scalar(loss_fn, "loss_fn")(rebuild_outputs(points))
        loss_grads = _grad_or_zeros([loss], points, [None], create_graph=True)

        def one(u: list[Tensor]) -> list[Tensor]:
            ju = _grad_or_zeros(pulled, probes, u, retain_graph=True)
            hju = _grad_or_zeros(loss_grads, points, ju, retain_graph=True)
            return _grad_or_zeros(outputs, inputs, hju, retain_graph=True)

        v_leaves, _ = _leaves(v, "v")
        if not block:
            return rebuild([g.detach() for g in one(v_leaves)])
        columns = [one([x[i] for x in v_leaves]) for i in range(v_leaves[0].shape[0])]
        return rebuild([torch.stack(c).detach() for c in zip(*columns, strict=True)])
