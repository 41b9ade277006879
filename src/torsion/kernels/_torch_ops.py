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
* ``torsion::conv_slot_pair(...)``: the sum of two evaluations of one slot in one pass (the
  second-order backward adds such pairs; their shared gathers are done once).

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

from torsion.kernels._torch_plan import SLOT_OUT, SLOT_W, SLOT_X1, SLOT_X2, TPPlan, plan_for
from torsion.reps import TPDescriptor

__all__ = ["conv_grads", "conv_slot", "conv_slot_pair", "plan_handle", "tp_slot"]

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
    chunk = tp.chunk_size()
    if batch <= chunk:
        if batch == 0:
            return anchor.new_zeros(_slot_shape(tp, target, batch, batched))
        return tp.slot(target, x1, x2, w, g, per_sample, weighted_only)
    shared_sum = not batched
    result = (anchor.new_zeros if shared_sum else anchor.new_empty)(
        _slot_shape(tp, target, batch, batched)
    )
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
    terms = [(weighted_only, x_node, edge_attr, w, g)]
    return _conv_terms(
        _PLANS[plan], target, terms, per_edge, deterministic, edge_src, edge_dst, num_src, num_dst
    )


def _conv_terms(
    tp: TPPlan,
    target: int,
    terms: list[tuple[bool, Tensor | None, Tensor | None, Tensor | None, Tensor | None]],
    per_edge: bool,
    deterministic: bool,
    edge_src: Tensor,
    edge_dst: Tensor,
    num_src: int,
    num_dst: int,
) -> Tensor:
    """The sum over ``terms`` (``(weighted_only, x_node, edge_attr, w, g)``, the target's
    place ``None``) of slot ``target``, in one pass over the edges: each distinct tensor is
    gathered once per chunk and the terms are summed before one scatter."""
    first = terms[0]
    anchor = next(t for t in first[1:] if t is not None and t.dim() == 2)
    num_edges = edge_src.shape[0]
    scatter = {SLOT_OUT: edge_dst, SLOT_X1: edge_src}.get(target)
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
    order = None
    if scatter is not None and deterministic:
        order = torch.argsort(scatter, stable=True)
    chunk = tp.chunk_size()
    for start in range(0, num_edges, chunk):
        stop = min(start + chunk, num_edges)
        rows = slice(start, stop) if order is None else order[start:stop]
        src, dst = _take(edge_src, rows), _take(edge_dst, rows)
        cache: dict[tuple[int, int], Tensor] = {}
        part = None
        for weighted_only, x_node, edge_attr, w, g in terms:
            term = tp.slot(
                target,
                _gather(cache, x_node, SLOT_X1, src),
                _gather(cache, edge_attr, SLOT_X2, rows),
                w if not per_edge else _gather(cache, w, SLOT_W, rows),
                _gather(cache, g, SLOT_OUT, dst),
                per_edge,
                weighted_only,
            )
            part = term if part is None else part.add_(term)
        if target == SLOT_OUT:
            _reduce_into(result, dst, part, deterministic)
        elif target == SLOT_X1:
            _reduce_into(result, src, part, deterministic)
        elif target == SLOT_W and not per_edge:
            result += part
        else:
            _store_rows(result, rows, part)
    return result


def _gather(
    cache: dict[tuple[int, int], Tensor], t: Tensor | None, slot: int, rows: slice | Tensor
) -> Tensor | None:
    """``t``'s rows for this chunk, gathered once per distinct tensor."""
    if t is None:
        return None
    key = (id(t), slot)
    if key not in cache:
        cache[key] = _take(t, rows)
    return cache[key]


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
    chunk = tp.chunk_size()
    for start in range(0, num_edges, chunk):
        stop = min(start + chunk, num_edges)
        rows = slice(start, stop) if order is None else order[start:stop]

        def take(t: Tensor, rows: slice | Tensor = rows) -> Tensor:
            return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)

        src, dst = take(edge_src), take(edge_dst)
        parts = tp.gradients(
            targets,
            x_node.index_select(0, src),
            take(edge_attr),
            take(w) if (w is not None and per_edge) else w,
            g.index_select(0, dst),
            per_edge,
            weighted_only,
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
    """Each output is a ``conv_slot`` of the inputs; its derivatives are ``conv_slot`` ops
    with the incoming gradient in that output's place, summed over the outputs."""
    plan, per_edge, weighted_only, deterministic, num_src, num_dst = ctx.args
    x, attr, w, g, src, dst = ctx.saved_tensors
    terms: list[list[tuple]] = [[] for _ in range(4)]  # per input slot: (only, *slots)
    for source, incoming, needed in zip(
        (SLOT_X1, SLOT_X2, SLOT_W), (grad_x, grad_attr, grad_w), ctx.need, strict=True
    ):
        if incoming is None or not needed or (w is None and source == SLOT_W):
            continue
        slots = [x, attr, w, g]
        slots[source] = incoming
        only = weighted_only or source == SLOT_W
        for slot in range(4):
            if slot == source or not ctx.needs_input_grad[4 + slot] or slots[slot] is None:
                continue
            args = list(slots)
            args[slot] = None
            terms[slot].append((only, *args))
    total: list[Tensor | None] = [None] * 4
    common = (src, dst, num_src, num_dst)
    for slot, pending in enumerate(terms):
        while len(pending) >= 2:
            a, b = pending.pop(), pending.pop()
            term = conv_slot_pair(plan, slot, per_edge, deterministic, *a, *b, *common)
            total[slot] = term if total[slot] is None else total[slot] + term
        if pending:
            only, *args = pending.pop()
            term = conv_slot(plan, slot, per_edge, only, deterministic, *args, *common)
            total[slot] = term if total[slot] is None else total[slot] + term
    return (None,) * 4 + tuple(total) + (None,) * 7


conv_grads.register_autograd(_grads_backward, setup_context=_grads_setup)


# -- two terms of one slot, summed in one pass ------------------------------------------------


@torch.library.custom_op("torsion::conv_slot_pair", mutates_args=())
def conv_slot_pair(
    plan: int,
    target: int,
    per_edge: bool,
    deterministic: bool,
    weighted_only_a: bool,
    x_node_a: Tensor | None,
    edge_attr_a: Tensor | None,
    w_a: Tensor | None,
    g_a: Tensor | None,
    weighted_only_b: bool,
    x_node_b: Tensor | None,
    edge_attr_b: Tensor | None,
    w_b: Tensor | None,
    g_b: Tensor | None,
    edge_src: Tensor,
    edge_dst: Tensor,
    num_src: int,
    num_dst: int,
) -> Tensor:
    """``conv_slot(target, a) + conv_slot(target, b)`` in one pass over the edges (what the
    second-order backward needs: the gathers they share are done once)."""
    terms = [
        (weighted_only_a, x_node_a, edge_attr_a, w_a, g_a),
        (weighted_only_b, x_node_b, edge_attr_b, w_b, g_b),
    ]
    return _conv_terms(
        _PLANS[plan], target, terms, per_edge, deterministic, edge_src, edge_dst, num_src, num_dst
    )


@conv_slot_pair.register_fake
def _conv_slot_pair_fake(plan, target, per_edge, deterministic, *rest):
    wo_a, xa, aa, wa, ga, wo_b, xb, ab, wb, gb, src, dst, num_src, num_dst = rest
    _conv_slot_fake(plan, target, per_edge, wo_b, deterministic, xb, ab, wb, gb, src, dst,
                    num_src, num_dst)  # fmt: skip
    return _conv_slot_fake(
        plan, target, per_edge, wo_a, deterministic, xa, aa, wa, ga, src, dst, num_src, num_dst
    )


def _pair_setup(ctx, inputs, output) -> None:
    plan, target, per_edge, deterministic = inputs[:4]
    wo_a, wo_b = inputs[4], inputs[9]
    src, dst, num_src, num_dst = inputs[14:]
    ctx.args = (plan, target, per_edge, deterministic, wo_a, wo_b, num_src, num_dst)
    ctx.save_for_backward(*inputs[5:9], *inputs[10:14], src, dst)


def _pair_backward(ctx, grad):
    plan, target, per_edge, deterministic, wo_a, wo_b, num_src, num_dst = ctx.args
    saved = ctx.saved_tensors
    src, dst = saved[8], saved[9]
    total: list[Tensor | None] = [None] * 8
    for offset, needs_offset, weighted_only, slots in (
        (0, 5, wo_a, list(saved[0:4])),
        (4, 10, wo_b, list(saved[4:8])),
    ):
        slots[target] = grad
        only = weighted_only or target == SLOT_W
        for slot in range(4):
            if slot == target or not ctx.needs_input_grad[needs_offset + slot]:
                continue
            args = list(slots)
            args[slot] = None
            total[offset + slot] = conv_slot(
                plan, slot, per_edge, only, deterministic, *args, src, dst, num_src, num_dst
            )
    return (None,) * 5 + tuple(total[:4]) + (None,) + tuple(total[4:]) + (None,) * 4


conv_slot_pair.register_autograd(_pair_backward, setup_context=_pair_setup)
