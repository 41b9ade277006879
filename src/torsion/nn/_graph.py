"""Message passing over SPD node features: the manifold layers inside a PyG graph layer."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter

from torsion.linalg import sym_expm, sym_invsqrtm, sym_logm, sym_sqrtm
from torsion.nn._spd import BiMap

__all__ = ["SPDConv"]

Aggregation = Literal["log_euclidean", "affine_invariant"]


def _weighted_mean(values: Tensor, weight: Tensor, index: Tensor, num_nodes: int) -> Tensor:
    """``sum_e w_e v_e / sum_e w_e`` per receiving node (zero where nothing arrives)."""
    total = scatter(weight[:, None, None] * values, index, dim=0, dim_size=num_nodes)
    mass = scatter(weight, index, dim=0, dim_size=num_nodes)
    return total / mass.clamp_min(torch.finfo(values.dtype).tiny)[:, None, None]


def _check_edge_range(edge_index: Tensor, num_nodes: int, error: Exception) -> None:
    """Raise a clear ``IndexError`` (from ``error``) if ``edge_index`` leaves ``[0, N)``."""
    if edge_index.numel() == 0:
        return
    low, high = int(edge_index.min()), int(edge_index.max())
    if low < 0 or high >= num_nodes:
        raise IndexError(
            f"SPDConv: edge_index has entries outside [0, {num_nodes}) for {num_nodes} nodes "
            f"(smallest {low}, largest {high})"
        ) from error


class SPDConv(MessagePassing):
    """Graph convolution of ``n x n`` SPD node features to ``m x m`` SPD node features.

    For node ``i`` with in-neighbours ``j`` (edges ``j -> i``, weights ``w_ji >= 0``):

    1. messages ``M_ji = BiMap(X_j)``;
    2. aggregation, the weighted Fréchet mean ``A_i`` of the messages: closed form
       ``exp(sum w log M / sum w)`` for ``"log_euclidean"``, or ``karcher_steps``
       affine-invariant Karcher steps from that mean for ``"affine_invariant"`` (a fixed
       count, so no host synchronisation);
    3. a residual combine by a geodesic step (in the aggregation's metric) from the
       root term ``R_i = BiMap_root(X_i)`` towards ``A_i``: ``gamma(R_i, A_i; t)`` with a
       learned ``t = step`` clamped to ``[0, 1]`` (initialised to ``1/2``). Nodes with no
       incoming edge return ``R_i``.

    Args:
        in_size: ``n``.
        out_size: ``m <= n``.
        aggregation: ``"log_euclidean"`` or ``"affine_invariant"``.
        karcher_steps: for ``"affine_invariant"``.
        dtype, device: of the parameters.

    Shapes:
        ``x``: ``(N, n, n)``; ``edge_index``: ``(2, E)`` (row 0 senders, row 1 receivers);
        ``edge_weight``: ``(E,)`` or ``None``; output ``(N, m, m)``.
    """

    def __init__(
        self,
        in_size: int,
        out_size: int,
        aggregation: Aggregation = "log_euclidean",
        *,
        karcher_steps: int = 2,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__(aggr=None, node_dim=0)
        if aggregation not in ("log_euclidean", "affine_invariant"):
            raise ValueError(
                "SPDConv: aggregation must be 'log_euclidean' or 'affine_invariant', "
                f"got {aggregation!r}"
            )
        if not (isinstance(karcher_steps, int) and karcher_steps >= 0):
            raise ValueError(f"SPDConv: karcher_steps must be an int >= 0, got {karcher_steps!r}")
        self.aggregation, self.karcher_steps = aggregation, karcher_steps
        self.message_map = BiMap(in_size, out_size, dtype=dtype, device=device)
        self.root_map = BiMap(in_size, out_size, dtype=dtype, device=device)
        self.step = nn.Parameter(torch.full((), 0.5, dtype=dtype, device=device))

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 3:
            raise ValueError(
                f"SPDConv expects node features (N, n, n), got {getattr(x, 'shape', x)}"
            )
        if edge_index.ndim != 2 or edge_index.shape[0] != 2:
            raise ValueError(
                f"SPDConv expects edge_index of shape (2, E), got {tuple(edge_index.shape)}"
            )
        if edge_weight is None:
            edge_weight = torch.ones(edge_index.shape[1], dtype=x.dtype, device=x.device)
        elif edge_weight.shape != (edge_index.shape[1],):
            raise ValueError(
                f"SPDConv: edge_weight must have shape ({edge_index.shape[1]},), "
                f"got {tuple(edge_weight.shape)}"
            )
        else:
            # PyG's edge_attr is float32 by default: in the features' dtype, a float64
            # layer's weighted sums (and their clamp to the dtype's tiny) stay float64
            edge_weight = edge_weight.to(x.dtype)
        root = self.root_map(x)
        try:
            mean_log, reached = self.propagate(edge_index, x=x, edge_weight=edge_weight)
        except (IndexError, RuntimeError) as error:
            # checked only on failure, so the happy path has no host synchronisation
            _check_edge_range(edge_index, x.shape[0], error)
            raise
        t = self.step.clamp(0, 1)
        if self.aggregation == "log_euclidean":
            combined = sym_expm((1 - t) * sym_logm(root) + t * mean_log)
        else:
            root_sqrt, root_inv_sqrt = sym_sqrtm(root), sym_invsqrtm(root)
            mean = sym_expm(mean_log)
            toward = sym_logm(root_inv_sqrt @ mean @ root_inv_sqrt)
            combined = root_sqrt @ sym_expm(t * toward) @ root_sqrt
        return torch.where(reached[:, None, None], combined, root)

    def message(self, x_j: Tensor) -> Tensor:
        return self.message_map(x_j)

    def aggregate(
        self,
        inputs: Tensor,
        index: Tensor,
        ptr: Tensor | None = None,
        dim_size: int | None = None,
        edge_weight: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The log of the weighted Fréchet mean per node, and which nodes received any."""
        num_nodes = int(dim_size)
        mass = scatter(edge_weight, index, dim=0, dim_size=num_nodes)
        logs = sym_logm(inputs)
        mean_log = _weighted_mean(logs, edge_weight, index, num_nodes)
        if self.aggregation == "affine_invariant" and self.karcher_steps:
            mean_log = sym_logm(self._karcher(inputs, edge_weight, index, sym_expm(mean_log)))
        return mean_log, mass > 0

    def _karcher(self, messages: Tensor, weight: Tensor, index: Tensor, mean: Tensor) -> Tensor:
        for _ in range(self.karcher_steps):
            root, inv_root = sym_sqrtm(mean), sym_invsqrtm(mean)
            inv_root_e = inv_root[index]
            tangent = sym_logm(inv_root_e @ messages @ inv_root_e)
            step = _weighted_mean(tangent, weight, index, mean.shape[0])
            mean = root @ sym_expm(step) @ root
        return mean

    def update(self, inputs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return inputs

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message_map.in_size}, {self.message_map.out_size}, "
            f"aggregation={self.aggregation!r})"
        )
