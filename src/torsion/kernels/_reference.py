"""The ``reference`` backend: plain PyTorch, one readable einsum chain per path.

It is the oracle every other backend is tested against, so it favours clarity over speed:
it splits the inputs into blocks shaped ``(..., mul, ir.dim)``, evaluates each path with
e3nn's Wigner 3j symbols and sums the paths into their output blocks. Message passing is
the unfused gather -> tensor product -> ``index_add``. Everything is differentiable by
autograd to any order (double backward gives forces' derivatives).
"""

from __future__ import annotations

import torch
from e3nn import o3
from torch import Tensor

from torsion.kernels._checks import (
    check_conv_inputs,
    check_edge_indices_in_range,
    check_tensor_product_inputs,
)
from torsion.kernels._layout import join_blocks, split_blocks
from torsion.kernels._registry import Backend, BackendSupport
from torsion.reps import LAYOUTS, Path, PathMode, TPDescriptor

__all__ = ["ReferenceBackend", "reference_conv", "reference_tensor_product"]


def _path_output(
    path: Path,
    x1: Tensor,
    x2: Tensor,
    weight: Tensor | None,
    cg: Tensor,
    weights_per_sample: bool,
) -> Tensor:
    """One path's contribution to its output block.

    ``x1``: ``(..., u, i)``, ``x2``: ``(..., v, j)``, ``cg``: ``(i, j, k)``; ``weight`` is
    the path's block, ``path_shape`` or ``(..., *path_shape)``. Returns ``(..., u or w, k)``.
    """
    w = "..." if weights_per_sample else ""
    if path.mode is PathMode.uuu:
        x2_cg = torch.einsum("...uj,ijk->...uik", x2, cg)
        out = torch.einsum("...ui,...uik->...uk", x1, x2_cg)
        if weight is not None:
            out = weight[..., None] * out
    else:
        x2_cg = torch.einsum("...vj,ijk->...vik", x2, cg)
        pair = torch.einsum("...ui,...vik->...uvk", x1, x2_cg)
        if path.mode is PathMode.uvw:
            out = torch.einsum(f"{w}uvw,...uvk->...wk", weight, pair)
        elif weight is not None:
            out = torch.einsum(f"{w}uv,...uvk->...uk", weight, pair)
        else:
            out = pair.sum(dim=-2)
    return path.path_weight * out


def reference_tensor_product(
    descriptor: TPDescriptor, x1: Tensor, x2: Tensor, weight: Tensor | None = None
) -> Tensor:
    """Evaluate ``descriptor`` on ``x1`` and ``x2`` with plain einsums.

    Args:
        descriptor: the tensor product; ``x1``, ``x2`` and the result are in its layout.
        x1: first input.
        x2: second input.
        weight: flat weights in e3nn's order: ``(weight_numel,)`` shared by all samples or
            ``(..., weight_numel)`` per sample; ``None`` when ``weight_numel == 0``.

    Returns:
        The tensor product. Output blocks that no path reaches are zero.

    Raises:
        TypeError: for non-tensors or mismatched/non-floating dtypes.
        ValueError: for shapes that do not match the irreps or weights, mismatched devices
            or leading shapes that do not broadcast.

    Shapes:
        ``x1``: ``(..., irreps_in1.dim)``, ``x2``: ``(..., irreps_in2.dim)``, per-sample
        ``weight``: ``(..., weight_numel)``; leading shapes broadcast. Output:
        ``(..., irreps_out.dim)``.
    """
    batch, per_sample = check_tensor_product_inputs(descriptor, x1, x2, weight)
    x1 = x1.expand(*batch, x1.shape[-1])
    x2 = x2.expand(*batch, x2.shape[-1])
    if per_sample:
        weight = weight.expand(*batch, weight.shape[-1])
    blocks1 = split_blocks(x1, descriptor.irreps_in1, descriptor.layout)
    blocks2 = split_blocks(x2, descriptor.irreps_in2, descriptor.layout)

    contributions: list[list[Tensor]] = [[] for _ in descriptor.irreps_out]
    for path, shape, where in zip(
        descriptor.paths, descriptor.path_shapes, descriptor.weight_slices, strict=True
    ):
        path_weight = None
        if where is not None:
            path_weight = weight[..., where].reshape(*weight.shape[:-1], *shape)
        l1 = descriptor.irreps_in1[path.in1].ir.l
        l2 = descriptor.irreps_in2[path.in2].ir.l
        l_out = descriptor.irreps_out[path.out].ir.l
        cg = o3.wigner_3j(l1, l2, l_out, dtype=x1.dtype, device=x1.device)
        contributions[path.out].append(
            _path_output(path, blocks1[path.in1], blocks2[path.in2], path_weight, cg, per_sample)
        )

    out_blocks = []
    for (mul, ir), terms in zip(descriptor.irreps_out, contributions, strict=True):
        block = x1.new_zeros((*batch, mul, ir.dim))
        for term in terms:
            block = block + term
        out_blocks.append(block)
    return join_blocks(out_blocks, descriptor.layout, like=x1)


def reference_conv(
    descriptor: TPDescriptor,
    x_node: Tensor,
    edge_attr: Tensor,
    edge_weight: Tensor | None,
    edge_src: Tensor,
    edge_dst: Tensor,
    num_nodes: int,
) -> Tensor:
    """Message passing with the tensor product, unfused: gather, tensor product, ``index_add``.

    ``out[n] = sum over edges e with edge_dst[e] == n of
    TP(x_node[edge_src[e]], edge_attr[e], edge_weight[e])``. Nodes without incoming edges
    get zeros. The edge indices are checked against their ranges (one host sync).

    Args:
        descriptor: the tensor product applied on every edge.
        x_node: node features, in ``descriptor.layout``.
        edge_attr: edge attributes (e.g. spherical harmonics of the edge vectors).
        edge_weight: ``(E, weight_numel)`` per edge (e.g. from a radial MLP),
            ``(weight_numel,)`` shared, or ``None`` when ``weight_numel == 0``.
        edge_src: sender of each edge, int64 or int32.
        edge_dst: receiver of each edge, int64 or int32.
        num_nodes: number of output rows.

    Returns:
        The summed messages per receiver.

    Raises:
        TypeError, ValueError: as :func:`torsion.kernels.conv` documents.

    Shapes:
        ``x_node``: ``(N, irreps_in1.dim)``, ``edge_attr``: ``(E, irreps_in2.dim)``,
        ``edge_src``, ``edge_dst``: ``(E,)``; output ``(num_nodes, irreps_out.dim)``.
    """
    num_nodes = check_conv_inputs(
        descriptor, x_node, edge_attr, edge_weight, edge_src, edge_dst, num_nodes
    )
    check_edge_indices_in_range(edge_src, edge_dst, x_node.shape[0], num_nodes)
    messages = reference_tensor_product(
        descriptor, x_node.index_select(0, edge_src), edge_attr, edge_weight
    )
    out = messages.new_zeros((num_nodes, descriptor.irreps_out.dim))
    return out.index_add(0, edge_dst, messages)


class ReferenceBackend(Backend):
    """The ``reference`` backend: every descriptor, op, layout, device, and derivative order.

    Slow by design (it materialises per-path outer products and does not fuse message
    passing); the oracle in tests and the backend of last resort under ``"auto"``.
    """

    name = "reference"
    priority = 0
    support = BackendSupport(
        ops=frozenset({"tensor_product", "conv"}),
        devices=None,
        dtypes=frozenset({torch.float32, torch.float64}),
        layouts=frozenset(LAYOUTS),
        max_derivative_order=None,
    )

    def tensor_product(
        self, descriptor: TPDescriptor, x1: Tensor, x2: Tensor, weight: Tensor | None = None
    ) -> Tensor:
        """See :func:`reference_tensor_product`."""
        return reference_tensor_product(descriptor, x1, x2, weight)

    def conv(
        self,
        descriptor: TPDescriptor,
        x_node: Tensor,
        edge_attr: Tensor,
        edge_weight: Tensor | None,
        edge_src: Tensor,
        edge_dst: Tensor,
        num_nodes: int,
    ) -> Tensor:
        """See :func:`reference_conv`."""
        return reference_conv(
            descriptor, x_node, edge_attr, edge_weight, edge_src, edge_dst, num_nodes
        )
