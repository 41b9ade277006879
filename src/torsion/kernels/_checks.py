"""Input validation shared by every backend.

The shape, dtype and device checks read only metadata and never synchronise with the
device, so fast backends can call them on every step. :func:`check_edge_indices_in_range`
reads values (one host sync) and is meant for the reference backend and for opt-in checks.
"""

from __future__ import annotations

import operator
from typing import Any, Literal

import torch
from e3nn import o3
from torch import Tensor

from torsion._dtypes import check_floating
from torsion.reps import TPDescriptor

__all__ = [
    "REDUCTIONS",
    "Reduction",
    "check_conv_inputs",
    "check_descriptor",
    "check_edge_indices_in_range",
    "check_reduction",
    "check_tensor_product_inputs",
]

#: How every backend's message passing sums messages into receivers: ``"sorted"``
#: (receiver-sorted segment sums, bitwise reproducible on every device), ``"scatter"``
#: (scatter-add in edge order: ``index_add_`` in torch, ``tl.atomic_add`` in Triton;
#: deterministic on a CPU, not bitwise reproducible on a GPU) or ``"auto"`` (the
#: backend's choice, documented with it).
Reduction = Literal["auto", "sorted", "scatter"]
REDUCTIONS: tuple[str, ...] = ("auto", "sorted", "scatter")


def check_reduction(reduction: object) -> None:
    """Raise a ``ValueError`` unless ``reduction`` is one of :data:`REDUCTIONS`."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


_INDEX_DTYPES = (torch.int32, torch.int64)


def check_descriptor(descriptor: Any) -> TPDescriptor:
    """Raise ``TypeError`` unless ``descriptor`` is a :class:`~torsion.reps.TPDescriptor`."""
    if not isinstance(descriptor, TPDescriptor):
        raise TypeError(
            f"descriptor must be a torsion.reps.TPDescriptor, got {type(descriptor).__name__}"
        )
    return descriptor


def _require_tensor(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_features(x: Any, name: str, irreps: o3.Irreps, irreps_name: str) -> Tensor:
    x = _require_tensor(x, name)
    check_floating(x, name)
    if x.ndim < 1 or x.shape[-1] != irreps.dim:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, but {irreps_name} '{irreps}' needs a last "
            f"dimension of {irreps.dim}"
        )
    return x


def _check_like(x: Tensor, name: str, anchor: Tensor, anchor_name: str) -> None:
    if x.dtype != anchor.dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, but {anchor_name} has {anchor.dtype}")
    if x.device != anchor.device:
        raise ValueError(f"{name} is on {x.device}, but {anchor_name} is on {anchor.device}")


def _check_weight(descriptor: TPDescriptor, weight: Any, anchor: Tensor, anchor_name: str) -> bool:
    """Validate the flat weights; return whether they are per sample (``ndim > 1``)."""
    numel = descriptor.weight_numel
    if weight is None:
        if numel > 0:
            raise ValueError(
                f"this tensor product has {numel} weights: pass weight of shape ({numel},) "
                f"(shared) or (..., {numel}) (one set per sample)"
            )
        return False
    weight = _require_tensor(weight, "weight")
    if weight.ndim == 0 or weight.shape[-1] != numel:
        raise ValueError(
            f"weight must have shape ({numel},) (shared) or (..., {numel}) (one set per "
            f"sample), got {tuple(weight.shape)}"
        )
    _check_like(weight, "weight", anchor, anchor_name)
    return weight.ndim > 1


def check_tensor_product_inputs(
    descriptor: TPDescriptor, x1: Any, x2: Any, weight: Any
) -> tuple[torch.Size, bool]:
    """Validate the inputs of a tensor product; no host synchronisation.

    Args:
        descriptor: the tensor product.
        x1: first input, ``(..., irreps_in1.dim)`` in ``descriptor.layout``.
        x2: second input, ``(..., irreps_in2.dim)``.
        weight: ``None`` (only when ``weight_numel == 0``), ``(weight_numel,)`` shared, or
            ``(..., weight_numel)`` per sample.

    Returns:
        ``(batch_shape, per_sample)``: the broadcast leading shape of ``x1``, ``x2`` and
        per-sample weights, and whether the weights are per sample.

    Raises:
        TypeError: for non-tensors, non-floating dtypes or mismatched dtypes.
        ValueError: for a last dimension that does not match the irreps, a weight of the
            wrong shape, mismatched devices or leading shapes that do not broadcast.
    """
    check_descriptor(descriptor)
    x1 = _check_features(x1, "x1", descriptor.irreps_in1, "irreps_in1")
    x2 = _check_features(x2, "x2", descriptor.irreps_in2, "irreps_in2")
    _check_like(x2, "x2", x1, "x1")
    per_sample = _check_weight(descriptor, weight, x1, "x1")
    shapes = [x1.shape[:-1], x2.shape[:-1]]
    if per_sample:
        shapes.append(weight.shape[:-1])
    try:
        batch_shape = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        names = "x1, x2 and weight" if per_sample else "x1 and x2"
        raise ValueError(
            f"the leading shapes of {names} do not broadcast: {[tuple(s) for s in shapes]}"
        ) from None
    return batch_shape, per_sample


def _check_index_tensor(index: Any, name: str, num_edges: int, anchor: Tensor) -> None:
    index = _require_tensor(index, name)
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must have dtype int64 or int32, got {index.dtype}")
    if index.ndim != 1 or index.shape[0] != num_edges:
        raise ValueError(
            f"{name} must have shape ({num_edges},) (one entry per edge of edge_attr), "
            f"got {tuple(index.shape)}"
        )
    if index.device != anchor.device:
        raise ValueError(f"{name} is on {index.device}, but x_node is on {anchor.device}")


def check_conv_inputs(
    descriptor: TPDescriptor,
    x_node: Any,
    edge_attr: Any,
    edge_weight: Any,
    edge_src: Any,
    edge_dst: Any,
    num_nodes: Any,
) -> int:
    """Validate the inputs of the message-passing op; no host synchronisation.

    Args:
        descriptor: the tensor product applied on every edge.
        x_node: node features ``(N, irreps_in1.dim)``.
        edge_attr: edge attributes ``(E, irreps_in2.dim)``.
        edge_weight: ``None`` (only when ``weight_numel == 0``), ``(weight_numel,)`` shared
            or ``(E, weight_numel)`` per edge.
        edge_src: ``(E,)`` int64/int32 sender of each edge (a row of ``x_node``).
        edge_dst: ``(E,)`` int64/int32 receiver of each edge (a row of the output).
        num_nodes: number of output rows, an int ``>= 0``.

    Returns:
        ``num_nodes`` as an ``int``.

    Raises:
        TypeError: for non-tensors, wrong dtypes or mismatched dtypes, or a non-integer
            ``num_nodes``.
        ValueError: for wrong shapes, mismatched devices or a negative ``num_nodes``.
    """
    check_descriptor(descriptor)
    x_node = _check_features(x_node, "x_node", descriptor.irreps_in1, "irreps_in1")
    edge_attr = _check_features(edge_attr, "edge_attr", descriptor.irreps_in2, "irreps_in2")
    if x_node.ndim != 2:
        raise ValueError(
            f"x_node must have shape (N, {x_node.shape[-1]}), got {tuple(x_node.shape)}"
        )
    if edge_attr.ndim != 2:
        raise ValueError(
            f"edge_attr must have shape (E, {edge_attr.shape[-1]}), got {tuple(edge_attr.shape)}"
        )
    _check_like(edge_attr, "edge_attr", x_node, "x_node")
    num_edges = edge_attr.shape[0]
    per_edge = _check_weight(descriptor, edge_weight, x_node, "x_node")
    if per_edge and tuple(edge_weight.shape) != (num_edges, descriptor.weight_numel):
        raise ValueError(
            f"edge_weight must have shape ({descriptor.weight_numel},) (shared) or "
            f"({num_edges}, {descriptor.weight_numel}) (per edge), got {tuple(edge_weight.shape)}"
        )
    _check_index_tensor(edge_src, "edge_src", num_edges, x_node)
    _check_index_tensor(edge_dst, "edge_dst", num_edges, x_node)
    if isinstance(num_nodes, bool):
        raise TypeError("num_nodes must be an int, got bool")
    try:
        num_nodes = operator.index(num_nodes)
    except TypeError:
        raise TypeError(f"num_nodes must be an int, got {type(num_nodes).__name__}") from None
    if num_nodes < 0:
        raise ValueError(f"num_nodes must be >= 0, got {num_nodes}")
    return num_nodes


def check_edge_indices_in_range(
    edge_src: Tensor, edge_dst: Tensor, num_senders: int, num_receivers: int
) -> None:
    """Raise ``ValueError`` if an edge index lies outside its node range (one host sync).

    Args:
        edge_src: ``(E,)`` senders, valid in ``[0, num_senders)``.
        edge_dst: ``(E,)`` receivers, valid in ``[0, num_receivers)``.
        num_senders: rows of ``x_node``.
        num_receivers: rows of the output (``num_nodes``).
    """
    for name, index, bound, what in (
        ("edge_src", edge_src, num_senders, "x_node rows"),
        ("edge_dst", edge_dst, num_receivers, "num_nodes"),
    ):
        if index.numel() == 0:
            continue
        low, high = torch.aminmax(index)
        low, high = int(low), int(high)
        if low < 0 or high >= bound:
            raise ValueError(
                f"{name} holds indices in [{low}, {high}], outside [0, {bound}) ({what} = {bound})"
            )
