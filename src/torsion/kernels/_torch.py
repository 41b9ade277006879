"""The ``torch`` backend: the tensor product in plain PyTorch, restructured for speed.

Each path works in the ``ir_mul`` (channels-contiguous) block layout internally, blocks
shaped ``(..., ir.dim, mul)``, converting at the boundary. The Clebsch-Gordan (Wigner 3j)
coefficients are contracted with the second input once per sample and shared by all
channels (``A[..., v, i, k] = C[i, j, k] x2[..., v, j]``), after which a path is one batched
matrix product with the channels. The intermediate is ``(..., v, k, u)``: output-sized when
the second input has multiplicity 1 (channelwise convolutions), a ``(u, v)`` outer product
otherwise (``uvw`` and ``uvu`` with ``v > 1``). The coefficients are cached per
``(l1, l2, l_out, dtype, device)``.

Message passing (:func:`torch_conv`) gathers senders, evaluates the tensor product and
scatter-sums into receivers with ``index_add_``, in chunks of edges so that the per-edge
intermediates stay bounded.

Derivatives (any order, so forces and force training work) come from autograd through
these operations; explicit backward/double-backward custom ops are not written yet. Measured
on a shared 2-core CPU this path is not yet faster than e3nn's unfused pipeline.
"""

from __future__ import annotations

import functools

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

__all__ = ["TorchBackend", "torch_conv", "torch_tensor_product"]

#: Edges per chunk of :func:`torch_conv` is ``_CHUNK_ELEMENTS // (row width)``.
_CHUNK_ELEMENTS = 1 << 24


@functools.lru_cache(maxsize=512)
def _cg(l1: int, l2: int, l_out: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Wigner 3j block ``(2 l1 + 1, 2 l2 + 1, 2 l_out + 1)``, computed in float64 and cast."""
    return o3.wigner_3j(l1, l2, l_out, dtype=torch.float64).to(dtype=dtype, device=device)


def _path_output(
    path: Path, x1: Tensor, x2: Tensor, weight: Tensor | None, cg: Tensor, per_sample: bool
) -> Tensor:
    """One path's contribution, channels contiguous.

    ``x1``: ``(B, i, u)``, ``x2``: ``(B, j, v)``, ``cg``: ``(i, j, k)``, ``weight``: the
    path's block ``path_shape`` or ``(B, *path_shape)``. Returns ``(B, k, u or w)``.
    """
    # CG contracted with x2 once per sample, shared by all channels of x1.
    a = torch.einsum("ijk,bjv->bvik", cg, x2)
    if path.mode is PathMode.uuu:
        out = torch.einsum("biu,buik->bku", x1, a)
        if weight is not None:
            out = out * (weight[:, None, :] if per_sample else weight)
    else:
        # (B, v, k, u): one batched matmul A^T x1 per sample.
        pair = torch.matmul(a.transpose(-1, -2), x1[:, None])
        if path.mode is PathMode.uvw:
            eq = "bvku,buvw->bkw" if per_sample else "bvku,uvw->bkw"
            out = torch.einsum(eq, pair, weight)
        elif weight is not None:
            eq = "bvku,buv->bku" if per_sample else "bvku,uv->bku"
            out = torch.einsum(eq, pair, weight)
        else:
            out = pair.sum(dim=1)
    return path.path_weight * out


def _flat_tensor_product(
    descriptor: TPDescriptor, x1: Tensor, x2: Tensor, weight: Tensor | None, per_sample: bool
) -> Tensor:
    """The tensor product of 2-D inputs ``(B, dim)`` (weights ``(B, numel)`` or ``(numel,)``)."""
    batch = x1.shape[0]
    blocks1 = [
        b.transpose(-1, -2) for b in split_blocks(x1, descriptor.irreps_in1, descriptor.layout)
    ]
    blocks2 = [
        b.transpose(-1, -2) for b in split_blocks(x2, descriptor.irreps_in2, descriptor.layout)
    ]
    contributions: list[Tensor | None] = [None] * len(descriptor.irreps_out)
    for path, shape, where in zip(
        descriptor.paths, descriptor.path_shapes, descriptor.weight_slices, strict=True
    ):
        path_weight = None
        if where is not None:
            path_weight = weight[..., where].reshape(*weight.shape[:-1], *shape)
        cg = _cg(
            descriptor.irreps_in1[path.in1].ir.l,
            descriptor.irreps_in2[path.in2].ir.l,
            descriptor.irreps_out[path.out].ir.l,
            x1.dtype,
            x1.device,
        )
        term = _path_output(path, blocks1[path.in1], blocks2[path.in2], path_weight, cg, per_sample)
        previous = contributions[path.out]
        contributions[path.out] = term if previous is None else previous + term
    out_blocks = []
    for (mul, ir), block in zip(descriptor.irreps_out, contributions, strict=True):
        if block is None:
            block = x1.new_zeros((batch, ir.dim, mul))
        out_blocks.append(block.transpose(-1, -2))
    return join_blocks(out_blocks, descriptor.layout, like=x1)


def torch_tensor_product(
    descriptor: TPDescriptor, x1: Tensor, x2: Tensor, weight: Tensor | None = None
) -> Tensor:
    """Evaluate ``descriptor`` with the fast path; same contract as
    :func:`torsion.kernels.reference_tensor_product`.

    Args:
        descriptor: the tensor product; ``x1``, ``x2`` and the result are in its layout.
        x1: first input.
        x2: second input.
        weight: ``(weight_numel,)`` shared or ``(..., weight_numel)`` per sample; ``None``
            when ``weight_numel == 0``.

    Returns:
        The tensor product.

    Raises:
        TypeError, ValueError: as :func:`torsion.kernels.tensor_product` documents.

    Shapes:
        ``x1``: ``(..., irreps_in1.dim)``, ``x2``: ``(..., irreps_in2.dim)``; leading shapes
        broadcast. Output: ``(..., irreps_out.dim)``.
    """
    batch, per_sample = check_tensor_product_inputs(descriptor, x1, x2, weight)
    x1 = x1.expand(*batch, x1.shape[-1]).reshape(-1, x1.shape[-1])
    x2 = x2.expand(*batch, x2.shape[-1]).reshape(-1, x2.shape[-1])
    if per_sample:
        weight = weight.expand(*batch, weight.shape[-1]).reshape(-1, weight.shape[-1])
    out = _flat_tensor_product(descriptor, x1, x2, weight, per_sample)
    return out.reshape(*batch, descriptor.irreps_out.dim)


def torch_conv(
    descriptor: TPDescriptor,
    x_node: Tensor,
    edge_attr: Tensor,
    edge_weight: Tensor | None,
    edge_src: Tensor,
    edge_dst: Tensor,
    num_nodes: int,
) -> Tensor:
    """Fused message passing: gather senders, tensor product, ``index_add`` into receivers.

    Same contract as :func:`torsion.kernels.reference_conv`; edges are processed in chunks
    so that per-edge intermediates stay bounded. The edge indices are checked against their
    ranges (one host sync). ``index_add_`` is the scatter (atomic on CUDA, so the float
    summation order there is not deterministic).

    Args:
        descriptor: the tensor product applied on every edge.
        x_node: node features, in ``descriptor.layout``.
        edge_attr: edge attributes.
        edge_weight: ``(E, weight_numel)``, ``(weight_numel,)`` or ``None``.
        edge_src: sender of each edge.
        edge_dst: receiver of each edge.
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
    per_edge = edge_weight is not None and edge_weight.dim() == 2
    num_edges = edge_src.shape[0]
    width = descriptor.irreps_in1.dim + descriptor.irreps_out.dim + max(descriptor.weight_numel, 1)
    chunk = max(1, _CHUNK_ELEMENTS // width)
    out = x_node.new_zeros((num_nodes, descriptor.irreps_out.dim))
    for start in range(0, num_edges, chunk):
        stop = min(start + chunk, num_edges)
        weight = edge_weight[start:stop] if per_edge else edge_weight
        messages = _flat_tensor_product(
            descriptor,
            x_node.index_select(0, edge_src[start:stop]),
            edge_attr[start:stop],
            weight,
            per_edge,
        )
        out = out.index_add(0, edge_dst[start:stop], messages)
    return out


class TorchBackend(Backend):
    """The ``torch`` backend: every descriptor (all path modes), CPU and CUDA, any layout,
    float32/float64, derivatives of order 2 (autograd through the fast path)."""

    name = "torch"
    priority = 10
    support = BackendSupport(
        ops=frozenset({"tensor_product", "conv"}),
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.float64}),
        layouts=frozenset(LAYOUTS),
        max_derivative_order=2,
    )

    def tensor_product(
        self, descriptor: TPDescriptor, x1: Tensor, x2: Tensor, weight: Tensor | None = None
    ) -> Tensor:
        """See :func:`torch_tensor_product`."""
        return torch_tensor_product(descriptor, x1, x2, weight)

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
        """See :func:`torch_conv`."""
        return torch_conv(descriptor, x_node, edge_attr, edge_weight, edge_src, edge_dst, num_nodes)
