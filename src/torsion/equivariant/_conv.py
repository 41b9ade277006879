"""NequIP-style equivariant message passing on the fused ``torsion.kernels.conv`` op."""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing

from torsion.equivariant._checks import (
    NormalizedActivation,
    as_irreps,
    check_features,
)
from torsion.equivariant._linear import Linear
from torsion.kernels import conv
from torsion.manifolds import check_weight_manifold
from torsion.reps import TPDescriptor

__all__ = ["EquivariantConv", "RadialMLP"]


class RadialMLP(nn.Module):
    """A bias-free MLP with normalized SiLU: radial embeddings to per-edge weights.

    e3nn's ``FullyConnectedNet`` (same weights, same outputs): weights are standard normal,
    each layer divides by ``sqrt(fan_in)`` and the activation is rescaled to unit second
    moment, so outputs start with about unit variance. No bias, so a zero embedding (beyond
    the cutoff) gives zero weights and the message vanishes smoothly.

    Args:
        sizes: ``[in, hidden..., out]``.
        dtype: of the weights.
        device: of the weights.

    Raises:
        ValueError: for fewer than two sizes or a size below 1.

    Shapes:
        input ``(..., sizes[0])``, output ``(..., sizes[-1])``.
    """

    def __init__(
        self,
        sizes: list[int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if len(sizes) < 2 or any(not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"RadialMLP: sizes must be >= 2 ints >= 1, got {sizes!r}")
        self.sizes = list(sizes)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(a, b, dtype=dtype, device=device))
            for a, b in itertools.pairwise(sizes)
        )
        self.act = NormalizedActivation(nn.functional.silu)

    def forward(self, x: Tensor) -> Tensor:
        for index, weight in enumerate(self.weights):
            x = x @ weight / math.sqrt(weight.shape[0])
            if index < len(self.weights) - 1:
                x = self.act(x)
        return x

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


def _check_edges(
    edge_index: Any, edge_attr: Tensor, edge_radial: Tensor, x: Tensor, num_radial: int
) -> None:
    if not isinstance(edge_index, Tensor):
        raise TypeError(
            f"EquivariantConv: edge_index must be a torch.Tensor, got {type(edge_index).__name__}"
        )
    if edge_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"EquivariantConv: edge_index must be int64 or int32, got {edge_index.dtype}"
        )
    if edge_index.ndim != 2 or edge_index.shape[0] != 2:
        raise ValueError(
            f"EquivariantConv: edge_index must have shape (2, E), got {tuple(edge_index.shape)}"
        )
    num_edges = edge_index.shape[1]
    if edge_attr.ndim != 2 or edge_attr.shape[0] != num_edges:
        raise ValueError(
            f"EquivariantConv: edge_attr must have shape ({num_edges}, {edge_attr.shape[-1]}) "
            f"for the {num_edges} edges of edge_index, got {tuple(edge_attr.shape)}"
        )
    if not isinstance(edge_radial, Tensor) or tuple(edge_radial.shape) != (num_edges, num_radial):
        raise ValueError(
            f"EquivariantConv: edge_radial must have shape ({num_edges}, {num_radial}), got "
            f"{tuple(getattr(edge_radial, 'shape', ()))}"
        )
    for name, tensor in (
        ("edge_index", edge_index),
        ("edge_attr", edge_attr),
        ("edge_radial", edge_radial),
    ):
        if tensor.device != x.device:
            raise ValueError(
                f"EquivariantConv: {name} is on {tensor.device}, but x is on {x.device}"
            )


class EquivariantConv(MessagePassing):
    """An E(3)-equivariant graph convolution, NequIP's interaction block on a fused kernel.

    For receiver ``i`` with senders ``j`` (edges ``j -> i``):

    ``h_i' = Linear_out( sum_j TP(Linear_in(h)_j, Y(r_ij); R(e_ij)) / sqrt(avg_num_neighbors) )
    + SelfConnection(h_i)``

    where ``Y(r_ij)`` are the edge attributes (spherical harmonics of the edge vector),
    ``TP`` is the channelwise (``uvu``) tensor product
    (:meth:`torsion.reps.TPDescriptor.channelwise`, outputs filtered to the irreps of
    ``irreps_node_out``) whose per-edge weights come from a :class:`RadialMLP` of the radial
    embedding ``e_ij`` (e.g. :class:`RadialBasis`), and the gather -> tensor product ->
    scatter-sum runs as one op, :func:`torsion.kernels.conv` (PyG's ``propagate`` is not
    used: it would materialise every message). The self-connection is an equivariant
    :class:`Linear` (NequIP's is a tensor product with the one-hot species; embed the
    species in ``h`` to get the same effect). There are no biases, so zero radial
    embeddings (edges at the cutoff) give zero messages.

    Reference: Batzner et al. 2022, "E(3)-equivariant graph neural networks for
    data-efficient and accurate interatomic potentials", Nature Communications 13, 2453.

    Args:
        irreps_node_in: irreps of the node features.
        irreps_edge_attr: irreps of the edge attributes (e.g. ``"0e + 1o + 2e"``).
        irreps_node_out: irreps of the output (e.g. a :class:`Gate`'s ``irreps_in``).
        num_radial: size of the radial embedding of each edge.
        radial_hidden: width of the hidden layers of the radial MLP.
        radial_layers: number of hidden layers of the radial MLP (default 1).
        avg_num_neighbors: divide the summed messages by its square root (default ``None``:
            no division).
        self_connection: add a linear self-connection (default ``True``).
        backend: kernel backend, ``"auto"`` (default) or a name from
            :func:`torsion.kernels.available_backends`.
        weight_manifold: ``None`` (default: free weights) or ``"stiefel"``: the input,
            output and self-connection :class:`Linear` layers get orthonormal block weights
            on :class:`torsion.manifolds.Stiefel` (see :class:`Linear`); the radial MLP stays
            free.
        dtype: of the parameters.
        device: of the parameters.

    Raises:
        ValueError: for invalid irreps or sizes, irreps with no tensor-product path from
            ``irreps_node_in`` and ``irreps_edge_attr`` to ``irreps_node_out``, or an
            unknown ``weight_manifold``.

    Shapes:
        ``x``: ``(N, irreps_node_in.dim)``; ``edge_index``: ``(2, E)`` (row 0 senders, row 1
        receivers); ``edge_attr``: ``(E, irreps_edge_attr.dim)``; ``edge_radial``:
        ``(E, num_radial)``; output ``(N, irreps_node_out.dim)``.
    """

    def __init__(
        self,
        irreps_node_in: Any,
        irreps_edge_attr: Any,
        irreps_node_out: Any,
        num_radial: int,
        radial_hidden: int,
        *,
        radial_layers: int = 1,
        avg_num_neighbors: float | None = None,
        self_connection: bool = True,
        backend: str = "auto",
        weight_manifold: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(aggr="add", node_dim=0)
        #: ``None`` or ``"stiefel"``: the constraint on the equivariant linear layers.
        self.weight_manifold = check_weight_manifold(weight_manifold, "EquivariantConv")
        self.irreps_node_in = as_irreps(irreps_node_in, "irreps_node_in")
        self.irreps_edge_attr = as_irreps(irreps_edge_attr, "irreps_edge_attr")
        self.irreps_node_out = as_irreps(irreps_node_out, "irreps_node_out")
        # what forward checks, as plain values: torch.compile then guards on numbers and
        # strings, not on e3nn's Irreps (whose Irrep entries break its guard builder)
        self._x_check = (self.irreps_node_in.dim, str(self.irreps_node_in))
        self._attr_check = (self.irreps_edge_attr.dim, str(self.irreps_edge_attr))
        for name, value in (("num_radial", num_radial), ("radial_hidden", radial_hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EquivariantConv: {name} must be an int >= 1, got {value!r}")
        if not isinstance(radial_layers, int) or radial_layers < 0:
            raise ValueError(
                f"EquivariantConv: radial_layers must be an int >= 0, got {radial_layers!r}"
            )
        if avg_num_neighbors is not None and not avg_num_neighbors > 0:
            raise ValueError(
                f"EquivariantConv: avg_num_neighbors must be > 0 or None, got {avg_num_neighbors!r}"
            )
        factory = {"dtype": dtype, "device": device}
        linear = {"weight_manifold": weight_manifold, **factory}
        self.num_radial = num_radial
        self.backend = backend
        self.message_scale = 1.0 if avg_num_neighbors is None else avg_num_neighbors**-0.5
        self.linear_in = Linear(self.irreps_node_in, self.irreps_node_in, **linear)
        self.descriptor = TPDescriptor.channelwise(
            self.irreps_node_in, self.irreps_edge_attr, filter_irreps_out=self.irreps_node_out
        )
        if not self.descriptor.paths:
            products = TPDescriptor.channelwise(self.irreps_node_in, self.irreps_edge_attr)
            raise ValueError(
                f"EquivariantConv: no tensor-product path of irreps_node_in "
                f"'{self.irreps_node_in}' and irreps_edge_attr '{self.irreps_edge_attr}' "
                f"reaches irreps_node_out '{self.irreps_node_out}' (their products are "
                f"'{products.irreps_out}')"
            )
        self.radial = RadialMLP(
            [num_radial, *[radial_hidden] * radial_layers, self.descriptor.weight_numel],
            **factory,
        )
        self.linear_out = Linear(self.descriptor.irreps_out, self.irreps_node_out, **linear)
        self.self_connection = (
            Linear(self.irreps_node_in, self.irreps_node_out, **linear) if self_connection else None
        )

    def forward(
        self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, edge_radial: Tensor
    ) -> Tensor:
        """Run the convolution.

        Args:
            x: node features.
            edge_index: ``(2, E)`` senders and receivers (int64 or int32).
            edge_attr: edge attributes.
            edge_radial: radial embedding of each edge.

        Returns:
            The new node features.

        Raises:
            TypeError: for non-tensors or wrong dtypes.
            ValueError: for shapes that do not match the irreps or each other, mismatched
                devices, or (checked by the kernel backend) ``edge_index`` out of range.
        """
        check_features(x, *self._x_check, "EquivariantConv")
        check_features(edge_attr, *self._attr_check, "EquivariantConv", "edge_attr")
        if x.ndim != 2:
            raise ValueError(f"EquivariantConv: x must have shape (N, D), got {tuple(x.shape)}")
        _check_edges(edge_index, edge_attr, edge_radial, x, self.num_radial)
        edge_weight = self.radial(edge_radial)
        messages = conv(
            self.descriptor,
            self.linear_in(x),
            edge_attr,
            edge_weight,
            edge_index[0],
            edge_index[1],
            x.shape[0],
            backend=self.backend,
        )
        out = self.linear_out(messages * self.message_scale)
        if self.self_connection is not None:
            out = out + self.self_connection(x)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.irreps_node_in} x {self.irreps_edge_attr} -> {self.irreps_node_out}, "
            f"tp weights {self.descriptor.weight_numel} per edge, backend={self.backend!r}"
        )
