"""The ``torch`` backend's ``torch.library`` custom ops and their explicit derivatives.

Every op evaluates *slots* of the trilinear form ``F(x1, x2, w, g) = <g, TP(x1, x2, w)>``
(see :mod:`torsion.kernels._torch_plan`); the argument in the target slot's place is
``None``:

* ``torsion::tp_slot(plan, target, per_sample, weighted_only, x1, x2, w, g)``: one slot
  on a flat batch;
* ``torsion::conv_slot(plan, target, per_edge, weighted_only, deterministic, x_node,
  edge_attr, w, g, edge_src, edge_dst, num_src, num_dst)``: one slot of the
  message-passing form ``F = sum_e <g[dst_e], TP(x_node[src_e], edge_attr[e], w[e])>``,
  fused: per chunk of edges, gather, evaluate, scatter-sum;
* ``torsion::conv_grads(...)``: the ``x_node``, ``edge_attr`` and weight slots in one
  pass (the first-order backward of ``conv``: the gathered output gradient, the weighted
  rows and the per-edge matrix are shared);
* ``torsion::conv_grads_backward(...)``: the backward of ``conv_grads`` (the second-order
  pass of force training): every slot of the sum of terms it defines, in one pass that
  shares the gathers, the per-edge matrices and the products between them.

The gradient of a slot with respect to one of its inputs is the op for that input's slot
with the target's place taken by the incoming gradient, so every registered backward is
made of these same ops and can be differentiated again, to any order. ``weighted_only``
drops unweighted paths: the form is affine, not linear, in ``w`` when some paths have no
weights, so derivatives taken through the weight slot must leave them out. ``plan`` is an
integer handle to a cached :class:`~torsion.kernels._torch_plan.TPPlan` (custom ops take
no Python objects); under ``torch.compile`` it is a constant.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from torsion.kernels._torch_plan import (
    SLOT_OUT,
    SLOT_W,
    SLOT_X1,
    SLOT_X2,
    Scratch,
    TPPlan,
    plan_for,
)
from torsion.reps import TPDescriptor

__all__ = [
    "conv_grads",
    "conv_grads_backward",
    "conv_slot",
    "plan_handle",
    "tp_slot",
]

_PLANS: list[TPPlan] = []
_HANDLES: dict[TPDescriptor, int] = {}
_LOCK = threading.Lock()


@torch.compiler.assume_constant_result
def plan_handle(descriptor: TPDescriptor) -> int:
    """The integer handle of ``descriptor``'s plan (a constant under ``torch.compile``)."""
    handle = _HANDLES.get(descriptor)
    if handle is None:
        with _LOCK:
            handle = _HANDLES.get(descriptor)
            if handle is None:
                _PLANS.append(plan_for(descriptor))
                handle = _HANDLES[descriptor] = len(_PLANS) - 1
    return handle


def _check_slots(plan: TPPlan, slots: tuple[Tensor | None, ...], rows: tuple) -> None:
    """Shape checks of the fake implementations (what ``torch.compile`` traces), so a
    compiled call with a wrong shape fails with a message naming the irreps."""
    d = plan.descriptor
    names = (
        f"x1 (irreps_in1 '{d.irreps_in1}')",
        f"x2 (irreps_in2 '{d.irreps_in2}')",
        f"weight ({d.weight_numel} weights)",
        f"the output gradient (irreps_out '{d.irreps_out}')",
    )
    for slot, (tensor, name) in enumerate(zip(slots, names, strict=True)):
        if tensor is None:
            continue
        if tensor.shape[-1] != plan.slot_dim(slot):
            raise ValueError(
                f"{name} needs a last dimension of {plan.slot_dim(slot)}, got {tuple(tensor.shape)}"
            )
        if rows[slot] is not None and tensor.dim() == 2 and tensor.shape[0] != rows[slot]:
            raise ValueError(f"{name} has {tensor.shape[0]} rows, expected {rows[slot]}")


def _slot_shape(plan: TPPlan, target: int, rows: int, batched: bool) -> tuple[int, ...]:
    dim = plan.slot_dim(target)
    return (rows, dim) if batched else (dim,)


# -- the tensor product -------------------------------------------------------------------


@torch.library.custom_op("torsion::tp_slot", mutates_args=())
def tp_slot(
    plan: int,
    target: int,
    per_sample: bool,
    weighted_only: bool,
    x1: Tensor | None,
    x2: Tensor | None,
    w: Tensor | None,
    g: Tensor | None,
) -> Tensor:
    """Slot ``target`` of the tensor product of plan ``plan`` on flat ``(B, dim)`` inputs."""
    tp = _PLANS[plan]
    anchor = next(t for t in (x1, x2, g) if t is not None)
    batch = anchor.shape[0]
    batched = per_sample or target != SLOT_W
    chunk = tp.chunk_size(anchor.device)
    if batch <= chunk:
        if batch == 0:
            return anchor.new_zeros(_slot_shape(tp, target, batch, batched))
        return tp.slot(target, x1, x2, w, g, per_sample, weighted_only)
    shared_sum = not batched
    result = (anchor.new_zeros if shared_sum else anchor.new_empty)(
        _slot_shape(tp, target, batch, batched)
    )
    scratch = Scratch()
    for start in range(0, batch, chunk):
        rows = slice(start, min(start + chunk, batch))
        part = tp.slot(
            target,
            None if x1 is None else x1[rows],
            None if x2 is None else x2[rows],
            w[rows] if (w is not None and per_sample) else w,
            None if g is None else g[rows],
            per_sample,
            weighted_only,
            out=None if shared_sum else result[rows],
            scratch=scratch,
        )
        if shared_sum:
            result += part
    return result


@tp_slot.register_fake
def _tp_slot_fake(plan, target, per_sample, weighted_only, x1, x2, w, g):
    anchor = next(t for t in (x1, x2, g) if t is not None)
    batch = anchor.shape[0]
    _check_slots(_PLANS[plan], (x1, x2, w, g), (batch, batch, batch if per_sample else None, batch))
    batched = per_sample or target != SLOT_W
    return anchor.new_empty(_slot_shape(_PLANS[plan], target, anchor.shape[0], batched))


def _tp_setup(ctx, inputs, output) -> None:
    plan, target, per_sample, weighted_only, *slots = inputs
    ctx.args = (plan, target, per_sample, weighted_only)
    ctx.save_for_backward(*slots)


def _tp_backward(ctx, grad):
    plan, target, per_sample, weighted_only = ctx.args
    slots = list(ctx.saved_tensors)
    slots[target] = grad
    # Through the weight slot, ``w`` becomes a direction: unweighted paths drop out.
    weighted_only = weighted_only or target == SLOT_W
    grads: list[Tensor | None] = [None] * 4
    for slot in range(4):
        if slot == target or not ctx.needs_input_grad[4 + slot]:
            continue
        args = list(slots)
        args[slot] = None
        grads[slot] = tp_slot(plan, slot, per_sample, weighted_only, *args)
    return None, None, None, None, *grads


tp_slot.register_autograd(_tp_backward, setup_context=_tp_setup)


# -- fused message passing ----------------------------------------------------------------


def _reduce_into(result: Tensor, index: Tensor, values: Tensor, deterministic: bool) -> None:
    """``result[index[e]] += values[e]``; ``deterministic``: ``index`` is sorted and each
    receiver is summed by a segment reduction before one unique-index add."""
    if not deterministic:
        result.index_add_(0, index, values)
        return
    receivers, counts = torch.unique_consecutive(index, return_counts=True)
    sums = torch.segment_reduce(values, "sum", lengths=counts)
    result.index_add_(0, receivers, sums)


@torch.library.custom_op("torsion::conv_slot", mutates_args=())
def conv_slot(
    plan: int,
    target: int,
    per_edge: bool,
    weighted_only: bool,
    deterministic: bool,
    x_node: Tensor | None,
    edge_attr: Tensor | None,
    w: Tensor | None,
    g: Tensor | None,
    edge_src: Tensor,
    edge_dst: Tensor,
    num_src: int,
    num_dst: int,
) -> Tensor:
    """Slot ``target`` of the fused message-passing form of plan ``plan``.

    The ``x_node`` slot is ``(num_src, dim1)``, the ``g`` (output) slot ``(num_dst, dim_out)``,
    the edge slots ``(E, ...)``. Chunks of edges are gathered, evaluated and scattered
    (``index_add_``, or with ``deterministic`` a receiver-sorted segment reduction).
    """
    tp = _PLANS[plan]
    anchor = next(t for t in (x_node, edge_attr, g) if t is not None)
    num_edges = edge_src.shape[0]
    if target == SLOT_OUT:
        result = anchor.new_zeros((num_dst, tp.slot_dim(target)))
    elif target == SLOT_X1:
        result = anchor.new_zeros((num_src, tp.slot_dim(target)))
    elif target == SLOT_W and not per_edge:
        result = anchor.new_zeros((tp.slot_dim(target),))
    else:
        result = anchor.new_empty((num_edges, tp.slot_dim(target)))
    if num_edges == 0:
        return result.zero_()
    scatter = {SLOT_OUT: edge_dst, SLOT_X1: edge_src}.get(target)
    order = None
    if scatter is not None and deterministic:
        order = torch.argsort(scatter, stable=True)
    scratch = Scratch()
    chunk = tp.chunk_size(edge_src.device)
    for start in range(0, num_edges, chunk):
        stop = min(start + chunk, num_edges)
        rows = slice(start, stop) if order is None else order[start:stop]
        src, dst = _take(edge_src, rows), _take(edge_dst, rows)
        part = tp.slot(
            target,
            _gather(x_node, src, scratch, "x_node"),
            None if edge_attr is None else _take(edge_attr, rows),
            _take(w, rows) if (w is not None and per_edge) else w,
            _gather(g, dst, scratch, "g"),
            per_edge,
            weighted_only,
            scratch=scratch,
        )
        if target == SLOT_OUT:
            _reduce_into(result, dst, part, deterministic)
        elif target == SLOT_X1:
            _reduce_into(result, src, part, deterministic)
        elif target == SLOT_W and not per_edge:
            result += part
        else:
            _store_rows(result, rows, part)
    return result


def _gather(t: Tensor | None, index: Tensor, scratch: Scratch, name: str) -> Tensor | None:
    """``t[index]`` (node rows for this chunk's edges) in a reused buffer."""
    if t is None:
        return None
    out = scratch(name, (index.shape[0], t.shape[1]), t)
    return torch.index_select(t, 0, index, out=out)


def _take(t: Tensor, rows: slice | Tensor) -> Tensor:
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


@conv_slot.register_fake
def _conv_slot_fake(
    plan,
    target,
    per_edge,
    weighted_only,
    deterministic,
    x_node,
    edge_attr,
    w,
    g,
    src,
    dst,
    num_src,
    num_dst,
):
    tp = _PLANS[plan]
    anchor = next(t for t in (x_node, edge_attr, g) if t is not None)
    num_edges = src.shape[0]
    _check_slots(tp, (x_node, edge_attr, w, g), (num_src, num_edges, num_edges, num_dst))
    rows = {SLOT_X1: num_src, SLOT_OUT: num_dst}.get(target, num_edges)
    batched = per_edge or target != SLOT_W
    return anchor.new_empty(_slot_shape(tp, target, rows, batched))


def _conv_setup(ctx, inputs, output) -> None:
    plan, target, per_edge, weighted_only, deterministic, *slots, src, dst, num_src, num_dst = (
        inputs
    )
    ctx.args = (plan, target, per_edge, weighted_only, deterministic, num_src, num_dst)
    ctx.save_for_backward(*slots, src, dst)


def _conv_backward(ctx, grad):
    plan, target, per_edge, weighted_only, deterministic, num_src, num_dst = ctx.args
    *slots, src, dst = ctx.saved_tensors
    slots[target] = grad
    weighted_only = weighted_only or target == SLOT_W
    grads: list[Tensor | None] = [None] * 4
    wanted = [s for s in range(4) if s != target and ctx.needs_input_grad[5 + s]]
    if target == SLOT_OUT and len(wanted) > 1:
        # The first-order backward of the forward: one fused pass for all inputs.
        need = [s in wanted for s in (SLOT_X1, SLOT_X2, SLOT_W)]
        fused = conv_grads(
            plan, per_edge, weighted_only, deterministic, *slots[:3], grad, src, dst,
            num_src, num_dst, *need,
        )  # fmt: skip
        for slot, value in zip((SLOT_X1, SLOT_X2, SLOT_W), fused, strict=True):
            if slot in wanted:
                grads[slot] = value
        wanted = []
    for slot in wanted:
        args = list(slots)
        args[slot] = None
        grads[slot] = conv_slot(
            plan, slot, per_edge, weighted_only, deterministic, *args, src, dst, num_src, num_dst
        )
    return None, None, None, None, None, *grads, None, None, None, None


conv_slot.register_autograd(_conv_backward, setup_context=_conv_setup)


# -- the fused first-order backward of message passing -------------------------------------


@torch.library.custom_op("torsion::conv_grads", mutates_args=())
def conv_grads(
    plan: int,
    per_edge: bool,
    weighted_only: bool,
    deterministic: bool,
    x_node: Tensor,
    edge_attr: Tensor,
    w: Tensor | None,
    g: Tensor,
    edge_src: Tensor,
    edge_dst: Tensor,
    num_src: int,
    num_dst: int,
    need_x: bool,
    need_attr: bool,
    need_w: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``x_node``, ``edge_attr`` and weight slots of ``conv_slot`` in one pass over the
    edges (gathers, weighted rows and the per-edge matrix shared); a slot not asked for
    comes back empty."""
    tp = _PLANS[plan]
    num_edges = edge_src.shape[0]
    need = (need_x, need_attr, need_w and w is not None)
    grad_x = x_node.new_zeros((num_src, tp.slot_dim(SLOT_X1)) if need_x else (0,))
    grad_attr = x_node.new_empty((num_edges, tp.slot_dim(SLOT_X2)) if need_attr else (0,))
    if not need[2]:
        grad_w = x_node.new_empty((0,))
    elif per_edge:
        grad_w = x_node.new_empty((num_edges, tp.slot_dim(SLOT_W)))
    else:
        grad_w = x_node.new_zeros((tp.slot_dim(SLOT_W),))
    targets = tuple(t for t, n in zip((SLOT_X1, SLOT_X2, SLOT_W), need, strict=True) if n)
    if num_edges == 0 or not targets:
        return grad_x.zero_(), grad_attr.zero_(), grad_w.zero_()
    order = torch.argsort(edge_src, stable=True) if (need_x and deterministic) else None
    scratch = Scratch()
    chunk = tp.chunk_size(edge_src.device)
    for start in range(0, num_edges, chunk):
        stop = min(start + chunk, num_edges)
        rows = slice(start, stop) if order is None else order[start:stop]

        def take(t: Tensor, rows: slice | Tensor = rows) -> Tensor:
            return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)

        src, dst = take(edge_src), take(edge_dst)
        parts = tp.gradients(
            targets,
            _gather(x_node, src, scratch, "x_node"),
            take(edge_attr),
            take(w) if (w is not None and per_edge) else w,
            _gather(g, dst, scratch, "g"),
            per_edge,
            weighted_only,
            scratch=scratch,
        )
        for target, part in zip(targets, parts, strict=True):
            if target == SLOT_X1:
                _reduce_into(grad_x, src, part, deterministic)
            elif target == SLOT_X2:
                _store_rows(grad_attr, rows, part)
            elif per_edge:
                _store_rows(grad_w, rows, part)
            else:
                grad_w += part
    return grad_x, grad_attr, grad_w


def _store_rows(result: Tensor, rows: slice | Tensor, values: Tensor) -> None:
    if isinstance(rows, slice):
        result[rows] = values
    else:
        result.index_copy_(0, rows, values)


@conv_grads.register_fake
def _conv_grads_fake(
    plan,
    per_edge,
    weighted_only,
    deterministic,
    x_node,
    edge_attr,
    w,
    g,
    src,
    dst,
    num_src,
    num_dst,
    need_x,
    need_attr,
    need_w,
):
    tp = _PLANS[plan]
    num_edges = src.shape[0]
    _check_slots(tp, (x_node, edge_attr, w, g), (num_src, num_edges, num_edges, num_dst))
    grad_x = x_node.new_empty((num_src, tp.slot_dim(SLOT_X1)) if need_x else (0,))
    grad_attr = x_node.new_empty((num_edges, tp.slot_dim(SLOT_X2)) if need_attr else (0,))
    if not (need_w and w is not None):
        grad_w = x_node.new_empty((0,))
    else:
        grad_w = x_node.new_empty(
            (num_edges, tp.slot_dim(SLOT_W)) if per_edge else (tp.slot_dim(SLOT_W),)
        )
    return grad_x, grad_attr, grad_w


def _grads_setup(ctx, inputs, output) -> None:
    (plan, per_edge, weighted_only, deterministic, x, attr, w, g, src, dst, num_src, num_dst) = (
        inputs[:12]
    )
    ctx.args = (plan, per_edge, weighted_only, deterministic, num_src, num_dst)
    ctx.need = inputs[12:]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, attr, w, g, src, dst)


def _grads_backward(ctx, grad_x, grad_attr, grad_w):
    """Each output is a ``conv_slot`` of the inputs, so the derivative is a sum of
    ``conv_slot`` terms with the incoming gradients in the outputs' places, all evaluated
    in one pass by :func:`conv_grads_backward`."""
    plan, per_edge, weighted_only, deterministic, num_src, num_dst = ctx.args
    x, attr, w, g, src, dst = ctx.saved_tensors
    incoming = [
        d if (needed and d is not None) else None
        for d, needed in zip((grad_x, grad_attr, grad_w), ctx.need, strict=True)
    ]
    if w is None:
        incoming[2] = None
    # a slot receives a term from every incoming gradient but its own
    need = [
        ctx.needs_input_grad[4 + slot]
        and any(d is not None for source, d in enumerate(incoming) if source != slot)
        for slot in range(4)
    ]
    need[SLOT_W] = need[SLOT_W] and w is not None
    if not any(need) or all(d is None for d in incoming):
        return (None,) * 15
    outputs = conv_grads_backward(
        plan, per_edge, weighted_only, deterministic, x, attr, w, g, *incoming, src, dst,
        num_src, num_dst, *need,
    )  # fmt: skip
    total = [value if needed else None for value, needed in zip(outputs, need, strict=True)]
    return (None,) * 4 + tuple(total) + (None,) * 7


conv_grads.register_autograd(_grads_backward, setup_context=_grads_setup)


# -- the fused second-order backward of message passing ------------------------------------


@torch.library.custom_op("torsion::conv_grads_backward", mutates_args=())
def conv_grads_backward(
    plan: int,
    per_edge: bool,
    weighted_only: bool,
    deterministic: bool,
    x_node: Tensor,
    edge_attr: Tensor,
    w: Tensor | None,
    g: Tensor,
    grad_x: Tensor | None,
    grad_attr: Tensor | None,
    grad_w: Tensor | None,
    edge_src: Tensor,
    edge_dst: Tensor,
    num_src: int,
    num_dst: int,
    need_x: bool,
    need_attr: bool,
    need_w: bool,
    need_g: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward of :func:`conv_grads` (the second-order pass of force training) in one
    pass over the edges.

    ``grad_x``, ``grad_attr``, ``grad_w`` are the incoming gradients of ``conv_grads``'s
    outputs (``None``: none). Returns the ``x_node``, ``edge_attr``, weight and output
    gradient slots of the sum of the ``conv_slot`` terms they define (see
    :meth:`~torsion.kernels._torch_plan.TPPlan.second_order`); a slot not asked for comes
    back empty. Per chunk, every input is gathered once and the per-edge matrices and
    products are shared between the four results.
    """
    tp = _PLANS[plan]
    num_edges = edge_src.shape[0]
    need = {SLOT_X1: need_x, SLOT_X2: need_attr, SLOT_W: need_w and w is not None, SLOT_OUT: need_g}
    results = {
        SLOT_X1: x_node.new_zeros((num_src, tp.slot_dim(SLOT_X1)) if need_x else (0,)),
        SLOT_X2: x_node.new_empty((num_edges, tp.slot_dim(SLOT_X2)) if need_attr else (0,)),
        SLOT_W: x_node.new_empty((0,)),
        SLOT_OUT: x_node.new_zeros((num_dst, tp.slot_dim(SLOT_OUT)) if need_g else (0,)),
    }
    if need[SLOT_W]:
        results[SLOT_W] = (
            x_node.new_empty((num_edges, tp.slot_dim(SLOT_W)))
            if per_edge
            else x_node.new_zeros((tp.slot_dim(SLOT_W),))
        )
    targets = tuple(t for t in (SLOT_X1, SLOT_X2, SLOT_W, SLOT_OUT) if need[t])
    if num_edges == 0 or not targets:
        return tuple(r.zero_() for r in results.values())
    # A deterministic reduction sums in sorted order: by sender for the x_node slot, by
    # receiver for the output slot; when both are wanted they take one pass each.
    passes = [(targets, None)]
    if deterministic and need_x and need_g:
        passes = [
            (tuple(t for t in targets if t != SLOT_OUT), edge_src),
            ((SLOT_OUT,), edge_dst),
        ]
    elif deterministic and (need_x or need_g):
        passes = [(targets, edge_src if need_x else edge_dst)]
    scratch = Scratch()
    chunk = tp.chunk_size(edge_src.device)
    for pass_targets, sort_by in passes:
        order = None if sort_by is None else torch.argsort(sort_by, stable=True)
        for start in range(0, num_edges, chunk):
            stop = min(start + chunk, num_edges)
            rows = slice(start, stop) if order is None else order[start:stop]
            src, dst = _take(edge_src, rows), _take(edge_dst, rows)
            edge_w = _take(w, rows) if (w is not None and per_edge) else w
            parts = tp.second_order(
                pass_targets,
                _gather(x_node, src, scratch, "x_node"),
                _take(edge_attr, rows),
                edge_w,
                _gather(g, dst, scratch, "g"),
                _gather(grad_x, src, scratch, "grad_x"),
                None if grad_attr is None else _take(grad_attr, rows),
                grad_w if (grad_w is None or not per_edge) else _take(grad_w, rows),
                per_edge,
                weighted_only,
                scratch=scratch,
            )
            for target, part in zip(pass_targets, parts, strict=True):
                if target == SLOT_X1:
                    _reduce_into(results[target], src, part, deterministic)
                elif target == SLOT_OUT:
                    _reduce_into(results[target], dst, part, deterministic)
                elif target == SLOT_W and not per_edge:
                    results[target] += part
                else:
                    _store_rows(results[target], rows, part)
    return tuple(results.values())


@conv_grads_backward.register_fake
def _conv_grads_backward_fake(
    plan,
    per_edge,
    weighted_only,
    deterministic,
    x_node,
    edge_attr,
    w,
    g,
    grad_x,
    grad_attr,
    grad_w,
    src,
    dst,
    num_src,
    num_dst,
    need_x,
    need_attr,
    need_w,
    need_g,
):
    tp = _PLANS[plan]
    num_edges = src.shape[0]
    _check_slots(tp, (x_node, edge_attr, w, g), (num_src, num_edges, num_edges, num_dst))
    _check_slots(tp, (grad_x, grad_attr, grad_w, None), (num_src, num_edges, num_edges, None))
    out_x = x_node.new_empty((num_src, tp.slot_dim(SLOT_X1)) if need_x else (0,))
    out_attr = x_node.new_empty((num_edges, tp.slot_dim(SLOT_X2)) if need_attr else (0,))
    if need_w and w is not None:
        out_w = x_node.new_empty(
            (num_edges, tp.slot_dim(SLOT_W)) if per_edge else (tp.slot_dim(SLOT_W),)
        )
    else:
        out_w = x_node.new_empty((0,))
    out_g = x_node.new_empty((num_dst, tp.slot_dim(SLOT_OUT)) if need_g else (0,))
    return out_x, out_attr, out_w, out_g


def _grads_backward_setup(ctx, inputs, output) -> None:
    plan, per_edge, weighted_only, deterministic = inputs[:4]
    num_src, num_dst = inputs[13:15]
    ctx.args = (plan, per_edge, weighted_only, deterministic, num_src, num_dst)
    ctx.need = inputs[15:]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs[4:13])


def _grads_backward_backward(ctx, *grads):
    """The third order: every output of :func:`conv_grads_backward` is a sum of
    ``conv_slot`` terms, each differentiated like :func:`conv_slot` itself."""
    plan, per_edge, weighted_only, deterministic, num_src, num_dst = ctx.args
    x, attr, w, g, grad_x, grad_attr, grad_w, src, dst = ctx.saved_tensors
    incoming = {SLOT_X1: grad_x, SLOT_X2: grad_attr, SLOT_W: grad_w}
    needs = ctx.needs_input_grad
    # input position of the base slots (x, attr, w, g) and of the incoming gradients
    base_position, incoming_position = (4, 5, 6, 7), {SLOT_X1: 8, SLOT_X2: 9, SLOT_W: 10}
    total: list[Tensor | None] = [None] * 19
    common = (src, dst, num_src, num_dst)
    for target, (grad, needed) in enumerate(zip(grads, ctx.need, strict=True)):
        if grad is None or not needed:
            continue
        for source, d in incoming.items():
            if d is None or source == target:
                continue
            slots = [x, attr, w, g]
            slots[source] = d
            slots[target] = grad
            only = weighted_only or source == SLOT_W or target == SLOT_W
            for slot in range(4):
                position = incoming_position[source] if slot == source else base_position[slot]
                if slot == target or slots[slot] is None or not needs[position]:
                    continue
                args = list(slots)
                args[slot] = None
                term = conv_slot(plan, slot, per_edge, only, deterministic, *args, *common)
                total[position] = term if total[position] is None else total[position] + term
    return tuple(total)


conv_grads_backward.register_autograd(_grads_backward_backward, setup_context=_grads_backward_setup)
