"""Entry points that resolve a backend from the inputs and run the op on it."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from torsion._dtypes import check_floating
from torsion.kernels._registry import resolve
from torsion.reps import TPDescriptor

__all__ = ["conv", "tensor_product"]


def _anchor(x: Any, name: str) -> Tensor:
    """The tensor whose device and dtype pick the backend; the backend checks the rest."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_floating(x, name)
    return x


def tensor_product(
    descriptor: TPDescriptor,
    x1: Tensor,
    x2: Tensor,
    weight: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Evaluate the tensor product ``descriptor`` on the backend picked by :func:`resolve`.

    The backend is resolved from ``x1``'s device and dtype. The result equals
    ``e3nn.o3.TensorProduct``'s for the same irreps, instructions and flat weights.

    Args:
        descriptor: the tensor product; ``x1``, ``x2`` and the output are in its layout.
        x1: first input.
        x2: second input.
        weight: flat weights in e3nn's order, ``(weight_numel,)`` shared or
            ``(..., weight_numel)`` per sample; ``None`` when ``weight_numel == 0``.
        backend: ``"auto"`` or a registered backend name (see :func:`available_backends`).

    Returns:
        The tensor product.

    Raises:
        UnsupportedBackendError: if the named backend cannot run the request.
        TypeError: for non-tensors or mismatched/non-floating dtypes.
        ValueError: for shapes that do not match the irreps or the weights, mismatched
            devices or leading shapes that do not broadcast.

    Shapes:
        ``x1``: ``(..., irreps_in1.dim)``, ``x2``: ``(..., irreps_in2.dim)``, per-sample
        ``weight``: ``(..., weight_numel)``; leading shapes broadcast. Output:
        ``(..., irreps_out.dim)``.
    """
    x1 = _anchor(x1, "x1")
    chosen = resolve(descriptor, x1.device, x1.dtype, "tensor_product", backend)
    return chosen.tensor_product(descriptor, x1, x2, weight)


def conv(
    descriptor: TPDescriptor,
    x_node: Tensor,
    edge_attr: Tensor,
    edge_weight: Tensor | None,
    edge_src: Tensor,
    edge_dst: Tensor,
    num_nodes: int,
    *,
    backend: str = "auto",
) -> Tensor:
    """Message passing: the scatter-sum over edges of ``TP(x_node[src], edge_attr, edge_weight)``.

    ``out[n] = sum_{e : edge_dst[e] = n} TP(x_node[edge_src[e]], edge_attr[e],
    edge_weight[e])``; nodes without incoming edges get zeros. Duplicate edges count
    twice, self-loops are ordinary edges, and ``E = 0`` gives zeros.

    Args:
        descriptor: the tensor product applied on every edge.
        x_node: node features, in ``descriptor.layout``.
        edge_attr: edge attributes, in ``descriptor.layout``.
        edge_weight: ``(E, weight_numel)`` per edge, ``(weight_numel,)`` shared, or ``None``
            when ``weight_numel == 0``.
        edge_src: sender of each edge (a row of ``x_node``), int64 or int32.
        edge_dst: receiver of each edge (a row of the output), int64 or int32.
        num_nodes: number of output rows.
        backend: ``"auto"`` or a registered backend name.

    Returns:
        The summed messages per receiver.

    Raises:
        UnsupportedBackendError: if the named backend cannot run the request.
        TypeError: for non-tensors, wrong or mismatched dtypes, or a non-integer
            ``num_nodes``.
        ValueError: for wrong shapes, mismatched devices, a negative ``num_nodes`` or, on
            backends that check values (``reference`` always does), edge indices out of
            range.

    Shapes:
        ``x_node``: ``(N, irreps_in1.dim)``, ``edge_attr``: ``(E, irreps_in2.dim)``,
        ``edge_src``, ``edge_dst``: ``(E,)``; output ``(num_nodes, irreps_out.dim)``.
    """
    x_node = _anchor(x_node, "x_node")
    chosen = resolve(descriptor, x_node.device, x_node.dtype, "conv", backend)
    return chosen.conv(descriptor, x_node, edge_attr, edge_weight, edge_src, edge_dst, num_nodes)
