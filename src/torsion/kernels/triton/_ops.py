"""Launch the generated Triton kernels as custom ops chained with autograd to any order.

The message-passing op is one slot of the multilinear form

    F(x, a, w, g) = sum_e <g[dst_e], TP(x[src_e], a_e, w_e)>

(``x``: node features, ``a``: edge attributes, ``w``: edge weights, ``g``: a gradient at
the receivers). The slots are ``torch.library`` custom ops with fake implementations and
registered derivatives:

* ``torsion::triton_conv_node`` with ``transposed=False``: ``out = d F / d g``, the
  convolution (forward program, reduced at the receivers); with ``transposed=True``:
  ``d F / d x`` (transposed program, reduced at the senders through the transpose
  permutation or atomics);
* ``torsion::triton_conv_edge_attr``, ``torsion::triton_conv_edge_weight``: ``d F / d a``
  and ``d F / d w``, per edge, no reduction (the ``edge_grads`` kernel);
* ``torsion::triton_conv_edge_grads``: both at once, for a first-order backward.

The derivative of any slot with respect to one of its inputs is another slot with the
incoming gradient substituted, so every backward is built from the same ops and can be
differentiated again: double backward (force training) and higher orders work.

The ops are opaque ``custom_op`` objects rather than ``triton_op``: ``torch.compile``
traces their fake implementations and calls them as they are, which works for compiled
and interpreted kernels alike (``wrap_triton`` would run the interpreter on fake
tensors). Descriptors reach the ops as integer handles (:func:`descriptor_handle`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torsion.kernels._checks import (
    Reduction,
    check_conv_inputs,
    check_edge_indices_in_range,
    check_reduction,
    check_tensor_product_inputs,
)
from torsion.kernels._registry import UnsupportedBackendError
from torsion.kernels.triton._codegen import (
    _next_power_of_two,
    interpreter_enabled,
    kernel_module,
    live_tiles,
    max_multiplicity,
    unsupported_descriptor_reason,
)
from torsion.reps import TPDescriptor

__all__ = ["triton_conv", "triton_tensor_product"]


@dataclass(frozen=True)
class LaunchSettings:
    """Tile sizes and warps of the kernel launches (the interpreter ignores the warps).

    Every irrep component of the inputs, weights and messages is a live
    ``BLOCK_E x BLOCK_C`` register tile. The defaults are the best of a sweep on an H100
    (E = 1e6, benchmarks/RESULTS.md): one row per CSR program was as fast as four, and 32
    edges per tile spilled and were slower than 16. Up to ``few_warps_max_tiles`` live
    tiles (MACE's l <= 2 problem has 55), the CSR kernels run ``few_warps`` warps per
    program: 2.6x (forward) and 1.2x (transposed) faster than eight. Beyond it (l = 3: 138
    tiles) two warps spill and eight are fastest. The atomic and per-edge gradient kernels
    were fastest with four to eight warps (two: 1.2x and 2x slower).

    Attributes:
        block_e: edges per program of the atomic and per-edge kernels.
        block_e_csr: edges per step of a CSR row.
        block_n: rows per CSR program.
        max_block_c: the most channels per program.
        few_warps, few_warps_max_tiles: the CSR warps of descriptors with at most that
            many live tiles (:func:`~torsion.kernels.triton._codegen.live_tiles`).
        warps: the warps of every other launch.
    """

    block_e: int = 16
    block_e_csr: int = 16
    block_n: int = 1
    max_block_c: int = 32
    few_warps: int = 2
    few_warps_max_tiles: int = 64
    warps: int = 8


_SETTINGS = LaunchSettings()


@contextlib.contextmanager
def launch_settings(**changes: int) -> Iterator[LaunchSettings]:
    """Run the kernels with some :class:`LaunchSettings` changed (benchmark sweeps, tests).

    Kernels compile per setting. Not thread-safe: the settings are process-wide.
    """
    global _SETTINGS
    previous = _SETTINGS
    _SETTINGS = dataclasses.replace(previous, **changes)
    try:
        yield _SETTINGS
    finally:
        _SETTINGS = previous


def _launch_options(descriptor: TPDescriptor, csr: bool) -> dict[str, Any]:
    """Launch options of a CSR kernel (``csr``) or of another kernel of ``descriptor``.

    Fused multiply-adds are stated so that triton does not fall back on, and warn about,
    its changing default."""
    few = csr and live_tiles(descriptor) <= _SETTINGS.few_warps_max_tiles
    return {"enable_fp_fusion": True, "num_warps": _SETTINGS.few_warps if few else _SETTINGS.warps}


_DESCRIPTORS: list[TPDescriptor] = []
_HANDLES: dict[TPDescriptor, int] = {}
_LOCK = threading.Lock()


@torch.compiler.assume_constant_result
def descriptor_handle(descriptor: TPDescriptor) -> int:
    """The integer handle of ``descriptor`` in the custom ops (which take no Python objects)."""
    handle = _HANDLES.get(descriptor)
    if handle is None:
        with _LOCK:
            handle = _HANDLES.get(descriptor)
            if handle is None:
                _DESCRIPTORS.append(descriptor)
                handle = _HANDLES[descriptor] = len(_DESCRIPTORS) - 1
    return handle


@functools.cache
def _weighted_paths_only(handle: int) -> int:
    """The handle of the descriptor without its unweighted paths (``handle`` itself when
    there are none).

    The form is affine, not linear, in the weights when some paths are unweighted, so a
    derivative taken through the weight slot, where a direction replaces the weights, must
    leave those paths out (the ``torch`` backend's ``weighted_only``). The weight layout
    is unchanged: unweighted paths own no weights.
    """
    d = _DESCRIPTORS[handle]
    if all(path.weighted for path in d.paths):
        return handle
    return descriptor_handle(dataclasses.replace(d, paths=tuple(p for p in d.paths if p.weighted)))


def _rows(t: Tensor) -> Tensor:
    """``t`` with unit stride along its last dimension (a copy only when needed)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _weight_argument(w: Tensor | None, placeholder: Tensor) -> tuple[Tensor, int]:
    """The weight pointer and row stride (0 for shared weights expanded over edges); a
    placeholder pointer, never read, for a descriptor without weights."""
    if w is None:
        return placeholder, 0
    w = _rows(w)
    return w, w.stride(0)


def _tiles(descriptor: TPDescriptor) -> tuple[int, int]:
    """``(BLOCK_C, number of channel blocks)``."""
    mul = max_multiplicity(descriptor)
    block_c = min(_next_power_of_two(mul), _SETTINGS.max_block_c)
    return block_c, -(-mul // block_c)


def _csr(key: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """``(order, rowptr)``: edges sorted stably by ``key`` and where each row's edges start;
    no host synchronisation."""
    order = torch.argsort(key, stable=True)
    positions = torch.arange(rows + 1, device=key.device, dtype=key.dtype)
    return order, torch.searchsorted(key[order], positions)


# -- the slots as custom ops ------------------------------------------------------------


@torch.library.custom_op("torsion::triton_conv_node", mutates_args=())
def conv_node(
    handle: int,
    transposed: bool,
    atomic: bool,
    gathered: Tensor,
    a: Tensor,
    w: Tensor | None,
    edge_src: Tensor,
    edge_dst: Tensor,
    num_rows: int,
) -> Tensor:
    """Scatter-sum of messages: the forward (``transposed=False``: gather ``gathered`` by
    sender, reduce at receivers; ``d F / d g``) or the ``x_node`` gradient (``True``:
    gather the output gradient by receiver, reduce at senders; ``d F / d x``)."""
    d = _DESCRIPTORS[handle]
    # the kernels read indices at unit stride (the rows of an edge_index are not)
    edge_src, edge_dst = edge_src.contiguous(), edge_dst.contiguous()
    if transposed:
        gather_index, scatter_index, width = edge_dst, edge_src, d.irreps_in1.dim
    else:
        gather_index, scatter_index, width = edge_src, edge_dst, d.irreps_out.dim
    gathered, a = _rows(gathered), _rows(a)
    out = gathered.new_zeros((num_rows, width))
    num_edges = edge_src.shape[0]
    if num_rows == 0 or width == 0 or not d.paths:
        return out
    kernels = kernel_module(d, gathered.dtype)
    w_arg, w_stride = _weight_argument(w, a)
    block_c, channel_blocks = _tiles(d)
    suffix = "_transposed" if transposed else ""
    if atomic:
        if num_edges == 0:
            return out
        grid = (-(-num_edges // _SETTINGS.block_e), channel_blocks)
        getattr(kernels, f"node_atomic{suffix}")[grid](
            gathered, a, w_arg, out, gather_index, scatter_index, num_edges,
            gathered.stride(0), a.stride(0), w_stride, out.stride(0),
            BLOCK_E=_SETTINGS.block_e, BLOCK_C=block_c, **_launch_options(d, csr=False),
        )  # fmt: skip
        return out
    order, rowptr = _csr(scatter_index, num_rows)
    grid = (-(-num_rows // _SETTINGS.block_n), channel_blocks)
    getattr(kernels, f"node_csr{suffix}")[grid](
        gathered, a, w_arg, out, gather_index, order, rowptr, num_rows,
        gathered.stride(0), a.stride(0), w_stride, out.stride(0),
        BLOCK_N=_SETTINGS.block_n, BLOCK_E=_SETTINGS.block_e_csr, BLOCK_C=block_c,
        **_launch_options(d, csr=True),
    )  # fmt: skip
    return out


def _edge_launch(
    handle: int,
    x: Tensor,
    a: Tensor | None,
    w: Tensor | None,
    g: Tensor,
    edge_src: Tensor,
    edge_dst: Tensor,
    need_attr: bool,
    need_weight: bool,
) -> tuple[Tensor, Tensor]:
    """Per-edge gradients of ``F`` with respect to the edge attributes and edge weights
    (an empty tensor for the one not asked for). ``a`` is read only for the weight
    gradient."""
    d = _DESCRIPTORS[handle]
    x, g = _rows(x), _rows(g)
    edge_src, edge_dst = edge_src.contiguous(), edge_dst.contiguous()  # read at unit stride
    num_edges = edge_src.shape[0]
    # Unread pointers get a real tensor as placeholder (CUDA launches check pointers).
    a = x if a is None else _rows(a)
    grad_a = x.new_zeros((num_edges if need_attr else 0, d.irreps_in2.dim))
    grad_w = x.new_zeros((num_edges if need_weight else 0, d.weight_numel))
    if num_edges == 0 or not d.paths or not (need_attr or need_weight):
        return grad_a, grad_w
    kernels = kernel_module(d, x.dtype)
    w_arg, w_stride = _weight_argument(w, a)
    ga_arg = grad_a if need_attr else x
    gw_arg = grad_w if need_weight else x
    block_c, _ = _tiles(d)
    grid = (-(-num_edges // _SETTINGS.block_e),)
    kernels.edge_grads[grid](
        x, a, w_arg, g, edge_src, edge_dst, ga_arg, gw_arg, num_edges,
        x.stride(0), a.stride(0), w_stride, g.stride(0), ga_arg.stride(0), gw_arg.stride(0),
        NEED_ATTR=need_attr, NEED_W=need_weight, BLOCK_E=_SETTINGS.block_e, BLOCK_C=block_c,
        **_launch_options(d, csr=False),
    )  # fmt: skip
    return grad_a, grad_w


@torch.library.custom_op("torsion::triton_conv_edge_attr", mutates_args=())
def conv_edge_attr(
    handle: int,
    atomic: bool,
    x: Tensor,
    w: Tensor | None,
    g: Tensor,
    edge_src: Tensor,
    edge_dst: Tensor,
) -> Tensor:
    """``d F / d a``: per edge, no reduction (``atomic`` is the reduction of the node
    gradients of its own derivatives)."""
    return _edge_launch(handle, x, None, w, g, edge_src, edge_dst, True, False)[0]


@torch.library.custom_op("torsion::triton_conv_edge_weight", mutates_args=())
def conv_edge_weight(
    handle: int,
    atomic: bool,
    x: Tensor,
    a: Tensor,
    g: Tensor,
    edge_src: Tensor,
    edge_dst: Tensor,
) -> Tensor:
    """``d F / d w``: per edge, no reduction (``atomic`` as in :func:`conv_edge_attr`)."""
    return _edge_launch(handle, x, a, None, g, edge_src, edge_dst, False, True)[1]


@torch.library.custom_op("torsion::triton_conv_edge_grads", mutates_args=())
def conv_edge_grads(
    handle: int,
    x: Tensor,
    a: Tensor,
    w: Tensor | None,
    g: Tensor,
    edge_src: Tensor,
    edge_dst: Tensor,
) -> tuple[Tensor, Tensor]:
    """``(d F / d a, d F / d w)`` in one launch: the first-order backward. It has no
    derivative of its own; differentiable backwards use the two ops above."""
    return _edge_launch(handle, x, a, w, g, edge_src, edge_dst, True, True)


def _node_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    handle, transposed, atomic, gathered, a, w, edge_src, edge_dst, _ = inputs
    ctx.static = (handle, transposed, atomic)
    ctx.save_for_backward(gathered, a, w, edge_src, edge_dst)


def _node_backward(ctx: Any, v: Tensor) -> tuple[Any, ...]:
    handle, transposed, atomic = ctx.static
    gathered, a, w, src, dst = ctx.saved_tensors
    _, _, _, need_gathered, need_a, need_w, *_ = ctx.needs_input_grad
    need_w = need_w and w is not None
    if transposed:  # gathered is the output gradient g, the output is d F / d x, v ~ x
        grad_gathered = (
            conv_node(handle, False, atomic, v, a, w, src, dst, gathered.shape[0])
            if need_gathered
            else None
        )
        grad_a = conv_edge_attr(handle, atomic, v, w, gathered, src, dst) if need_a else None
        grad_w = conv_edge_weight(handle, atomic, v, a, gathered, src, dst) if need_w else None
    else:  # gathered is x, the output is the convolution, v ~ g
        grad_gathered = (
            conv_node(handle, True, atomic, v, a, w, src, dst, gathered.shape[0])
            if need_gathered
            else None
        )
        if need_a and need_w and not torch.is_grad_enabled():
            grad_a, grad_w = conv_edge_grads(handle, gathered, a, w, v, src, dst)
        else:
            grad_a = conv_edge_attr(handle, atomic, gathered, w, v, src, dst) if need_a else None
            grad_w = conv_edge_weight(handle, atomic, gathered, a, v, src, dst) if need_w else None
    return None, None, None, grad_gathered, grad_a, grad_w, None, None, None


def _edge_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    handle, atomic, first, second, g, edge_src, edge_dst = inputs
    ctx.static = (handle, atomic)
    ctx.save_for_backward(first, second, g, edge_src, edge_dst)


def _edge_attr_backward(ctx: Any, v: Tensor) -> tuple[Any, ...]:
    handle, atomic = ctx.static
    x, w, g, src, dst = ctx.saved_tensors
    _, _, need_x, need_w, need_g, *_ = ctx.needs_input_grad
    grad_x = conv_node(handle, True, atomic, g, v, w, src, dst, x.shape[0]) if need_x else None
    grad_w = (
        conv_edge_weight(handle, atomic, x, v, g, src, dst) if need_w and w is not None else None
    )
    grad_g = conv_node(handle, False, atomic, x, v, w, src, dst, g.shape[0]) if need_g else None
    return None, None, grad_x, grad_w, grad_g, None, None


def _edge_weight_backward(ctx: Any, v: Tensor) -> tuple[Any, ...]:
    handle, atomic = ctx.static
    # with ``v`` in the weight slot, unweighted paths (implicit weight 1) drop out
    handle = _weighted_paths_only(handle)
    x, a, g, src, dst = ctx.saved_tensors
    _, _, need_x, need_a, need_g, *_ = ctx.needs_input_grad
    grad_x = conv_node(handle, True, atomic, g, a, v, src, dst, x.shape[0]) if need_x else None
    grad_a = conv_edge_attr(handle, atomic, x, v, g, src, dst) if need_a else None
    grad_g = conv_node(handle, False, atomic, x, a, v, src, dst, g.shape[0]) if need_g else None
    return None, None, grad_x, grad_a, grad_g, None, None


@conv_node.register_fake
def _conv_node_fake(
    handle: int,
    transposed: bool,
    atomic: bool,
    gathered: Tensor,
    a: Tensor,
    w: Tensor | None,
    edge_src: Tensor,
    edge_dst: Tensor,
    num_rows: int,
) -> Tensor:
    d = _DESCRIPTORS[handle]
    source, target = (d.irreps_out, d.irreps_in1) if transposed else (d.irreps_in1, d.irreps_out)
    _check_width(gathered, source.dim, "the gathered node features")
    _check_width(a, d.irreps_in2.dim, "edge_attr")
    if w is not None:
        _check_width(w, d.weight_numel, "edge_weight")
    return gathered.new_empty((num_rows, target.dim))


def _check_width(t: Tensor, width: int, name: str) -> None:
    """The shape check of the fake implementations (what ``torch.compile`` traces)."""
    if t.shape[-1] != width:
        raise ValueError(f"{name} needs a last dimension of {width}, got {tuple(t.shape)}")


@conv_edge_attr.register_fake
def _conv_edge_attr_fake(
    handle: int,
    atomic: bool,
    x: Tensor,
    w: Tensor | None,
    g: Tensor,
    edge_src: Tensor,
    edge_dst: Tensor,
) -> Tensor:
    return x.new_empty((edge_src.shape[0], _DESCRIPTORS[handle].irreps_in2.dim))


@conv_edge_weight.register_fake
def _conv_edge_weight_fake(
    handle: int,
    atomic: bool,
    x: Tensor,
    a: Tensor,
    g: Tensor,
    edge_src: Tensor,
    edge_dst: Tensor,
) -> Tensor:
    return x.new_empty((edge_src.shape[0], _DESCRIPTORS[handle].weight_numel))


@conv_edge_grads.register_fake
def _conv_edge_grads_fake(
    handle: int,
    x: Tensor,
    a: Tensor,
    w: Tensor | None,
    g: Tensor,
    edge_src: Tensor,
    edge_dst: Tensor,
) -> tuple[Tensor, Tensor]:
    d = _DESCRIPTORS[handle]
    num_edges = edge_src.shape[0]
    return (
        x.new_empty((num_edges, d.irreps_in2.dim)),
        x.new_empty((num_edges, d.weight_numel)),
    )


conv_node.register_autograd(_node_backward, setup_context=_node_setup)
conv_edge_attr.register_autograd(_edge_attr_backward, setup_context=_edge_setup)
conv_edge_weight.register_autograd(_edge_weight_backward, setup_context=_edge_setup)


# -- public entry points ------------------------------------------------------------------


def _check_runnable(descriptor: TPDescriptor, device: torch.device) -> None:
    reason = unsupported_descriptor_reason(descriptor)
    if reason is not None:
        raise UnsupportedBackendError(f"the Triton kernels cannot run this descriptor: {reason}")
    if device.type != "cuda" and not interpreter_enabled():
        raise UnsupportedBackendError(
            f"the Triton kernels run on CUDA tensors, got tensors on {device.type!r}; to run "
            "them on the CPU (slowly, for tests), set TRITON_INTERPRET=1 before triton is "
            "imported"
        )


def triton_conv(
    descriptor: TPDescriptor,
    x_node: Tensor,
    edge_attr: Tensor,
    edge_weight: Tensor | None,
    edge_src: Tensor,
    edge_dst: Tensor,
    num_nodes: int,
    *,
    reduction: Reduction = "auto",
    check_indices: bool = False,
) -> Tensor:
    """Fused message passing (gather -> tensor product -> scatter-sum) in Triton kernels.

    ``out[n] = sum_{e : edge_dst[e] = n} TP(x_node[edge_src[e]], edge_attr[e],
    edge_weight[e])``, as :func:`torsion.kernels.conv`, without materialising the
    messages. Differentiable with respect to ``x_node``, ``edge_attr`` and
    ``edge_weight`` to any order (each derivative is another fused kernel).

    Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before
    triton was imported (Triton's interpreter: slow, meant for tests on tiny graphs).

    Args:
        descriptor: ``uvu`` paths only, reading ``irreps_in2`` blocks of multiplicity 1
            (the NequIP/MACE convolution); either layout (the kernels are generated for
            it; ``"ir_mul"`` gives contiguous channel loads).
        x_node: node features, in ``descriptor.layout``.
        edge_attr: edge attributes.
        edge_weight: ``(E, weight_numel)`` per edge, ``(weight_numel,)`` shared, or
            ``None`` when ``weight_numel == 0``.
        edge_src: sender of each edge, int64 or int32.
        edge_dst: receiver of each edge, int64 or int32.
        num_nodes: number of output rows.
        reduction: ``"sorted"`` (edges sorted by receiver through a permutation, each
            program sums whole rows in registers, bitwise reproducible), ``"scatter"``
            (``tl.atomic_add`` on unsorted edges; the order of additions varies on a GPU)
            or ``"auto"`` (default: ``"sorted"``), the vocabulary of every backend
            (:data:`torsion.kernels.REDUCTIONS`). The ``x_node`` gradient uses the same
            reduction over senders.
        check_indices: check the edge indices against their ranges (one host sync);
            out-of-range indices otherwise read and write out of bounds. Default ``False``.

    Returns:
        The summed messages per receiver.

    Raises:
        UnsupportedBackendError: for a descriptor the kernels do not run, or CPU tensors
            without ``TRITON_INTERPRET=1``.
        TypeError, ValueError: as :func:`torsion.kernels.conv` documents; ``ValueError``
            also for an unknown ``reduction``.
        ImportError: if triton is not installed.

    Shapes:
        ``x_node``: ``(N, irreps_in1.dim)``, ``edge_attr``: ``(E, irreps_in2.dim)``,
        ``edge_src``, ``edge_dst``: ``(E,)``; output ``(num_nodes, irreps_out.dim)``.
    """
    check_reduction(reduction)
    if not torch.compiler.is_compiling():
        # Under torch.compile, dynamo sees the descriptor only through its constant handle,
        # and the ops' fake implementations check the shapes while tracing.
        num_nodes = check_conv_inputs(
            descriptor, x_node, edge_attr, edge_weight, edge_src, edge_dst, num_nodes
        )
        _check_runnable(descriptor, x_node.device)
        if check_indices:
            check_edge_indices_in_range(edge_src, edge_dst, x_node.shape[0], num_nodes)
    num_edges = edge_attr.shape[0]
    if edge_weight is not None and edge_weight.ndim == 1:
        edge_weight = edge_weight.expand(num_edges, edge_weight.shape[0])
    return conv_node(
        descriptor_handle(descriptor),
        False,
        reduction == "scatter",
        x_node,
        edge_attr,
        edge_weight,
        edge_src,
        edge_dst,
        num_nodes,
    )


def triton_tensor_product(
    descriptor: TPDescriptor, x1: Tensor, x2: Tensor, weight: Tensor | None = None
) -> Tensor:
    """The tensor product in the Triton kernels (each sample is one edge of its own).

    Differentiable to any order. Runs on CUDA tensors, or on CPU tensors under
    ``TRITON_INTERPRET=1`` (see :func:`triton_conv`). Broadcast leading dimensions of
    ``x1`` and ``x2`` are materialised; shared weights are not.

    Args:
        descriptor: as :func:`triton_conv` requires.
        x1: first input.
        x2: second input.
        weight: ``(weight_numel,)`` shared, ``(..., weight_numel)`` per sample, or
            ``None`` when ``weight_numel == 0``.

    Returns:
        The tensor product, equal to :func:`torsion.kernels.reference_tensor_product`.

    Raises:
        UnsupportedBackendError: as :func:`triton_conv`.
        TypeError, ValueError: as :func:`torsion.kernels.tensor_product` documents.

    Shapes:
        ``x1``: ``(..., irreps_in1.dim)``, ``x2``: ``(..., irreps_in2.dim)``, per-sample
        ``weight``: ``(..., weight_numel)``; output ``(..., irreps_out.dim)``.
    """
    if torch.compiler.is_compiling():
        per_sample = weight is not None and weight.dim() > 1
        leading = [x1.shape[:-1], x2.shape[:-1], *([weight.shape[:-1]] if per_sample else [])]
        batch = torch.broadcast_shapes(*leading)
    else:
        batch, per_sample = check_tensor_product_inputs(descriptor, x1, x2, weight)
        _check_runnable(descriptor, x1.device)
    rows = batch.numel()
    x1 = x1.expand(*batch, x1.shape[-1]).reshape(rows, x1.shape[-1])
    x2 = x2.expand(*batch, x2.shape[-1]).reshape(rows, x2.shape[-1])
    if per_sample:
        weight = weight.expand(*batch, weight.shape[-1]).reshape(rows, weight.shape[-1])
    elif weight is not None:
        weight = weight.expand(rows, weight.shape[-1])
    index = torch.arange(rows, device=x1.device)
    # One edge per row: the atomic kernel adds once into each address, so it is exact and
    # deterministic here, and skips the sort.
    handle = descriptor_handle(descriptor)
    out = conv_node(handle, False, True, x1, x2, weight, index, index, rows)
    return out.reshape(*batch, out.shape[-1])
