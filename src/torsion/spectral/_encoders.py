"""Positional-encoding networks that respect the symmetries of Laplacian eigenvectors.

Eigenvectors of a graph Laplacian are not unique: each can flip its sign, and inside an
eigenspace of dimension ``d`` any orthonormal basis is as good as another (a point on the
Stiefel manifold whose span, a point on the Grassmannian, is what the graph determines).
Feeding raw eigenvectors to a network makes its output depend on the eigensolver's
arbitrary choices. The encoders here are invariant to exactly those choices:

* :class:`SignNet` to sign flips (Lim et al. 2022);
* :class:`BasisNet` to any orthogonal change of basis inside each eigenspace (Lim et al.
  2022), for small ``k``;
* :class:`SPE` to the same basis changes, and moreover *stable*: its output moves by at
  most a constant times the perturbation of the Laplacian (Huang et al. 2024).

All three are permutation-equivariant: relabelling the nodes permutes the output rows.

Calling convention (shared by the three)::

    enc(eigvecs, eigvals, batch=None, *, edge_index=None, mask=None) -> (N, out_channels)

* ``eigvecs``: ``(N, k)``, node-major, as PyG stores ``data.lap_pe``: row ``i`` holds node
  ``i``'s entries of ``k`` eigenvectors of its own graph, each unit-norm over that graph.
* ``eigvals``: ``(k,)`` (one graph, or the same eigenvalues for all), ``(B, k)`` (one row
  per graph of the batch) or ``(N, k)`` (one row per node, repeated within a graph). A 2-D
  ``eigvals`` with ``N`` rows is read per node, unless ``batch`` also has ``N`` graphs whose
  ids are not ``0, ..., N - 1`` in order (an empty graph in the batch): then it is read per
  graph, as :class:`~torsion.spectral.AddLaplacianPE` stores it.
* ``batch``: PyG's node-to-graph vector ``(N,)``, or ``None`` for a single graph. It does
  not have to be sorted.
* Missing eigenpairs (a graph with fewer than ``k`` nodes) are marked by NaN: a NaN
  eigenvalue drops that eigenpair for the whole graph, a NaN eigenvector entry drops that
  entry (it is read as 0). This is the GraphGPS padding convention. Alternatively pass
  ``mask`` (keyword, bool, shaped like ``eigvals``; ``False`` drops the pair), which is
  what :class:`~torsion.spectral.AddLaplacianPE` stores: ``enc(data.lap_pe,
  data.lap_pe_eigvals, data.batch, mask=data.lap_pe_mask)``.
* ``edge_index`` (optional, keyword): when given, the per-eigenvector network ``phi``
  becomes a GIN (each layer adds the sum over in-neighbours before its linear map), as in
  the papers; without it ``phi`` acts on each node alone (a DeepSets-style encoder).

Manifold constraint. All three take ``weight_manifold="stiefel"``, which makes the last
linear layer of the readout ``rho`` an orthonormal projection: a learned orthonormal
frame, a :class:`geoopt.ManifoldParameter` on :class:`torsion.manifolds.Stiefel` trained
by :mod:`torsion.optim`. ``rho`` only sees features that are already invariant, so every
invariance above holds unchanged. The constraint is not put on the eigenvectors' side: an
orthonormal mixing of the ``k`` eigenvector channels ``V -> V Q`` combines eigenvectors of
different eigenvalues, which are not interchangeable, and would break the sign and basis
invariances; the symmetric group of the eigenvectors is exactly what the encoders
quotient out.

Devices and host synchronisation: everything runs on the inputs' device. :class:`SignNet`
never synchronises. :class:`SPE` and :class:`BasisNet` pad each graph to the largest graph
of the batch, which needs the batch size and that maximum on the host (at most two
synchronisations per call, none without ``batch``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import geoopt
import torch
from torch import Tensor, nn

from torsion._dtypes import tie_tolerance
from torsion.manifolds import Stiefel, check_weight_manifold

__all__ = ["SPE", "BasisNet", "SignNet"]


# ---------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Eigenpairs:
    """Eigenpairs per node, NaN padding removed.

    ``vecs`` and ``vals`` are ``(N, k)`` with missing entries set to zero; ``present``
    ``(N, k)`` marks eigenpairs whose eigenvalue is given (the NaN-eigenvalue padding);
    ``num_graphs`` is the batch size when ``eigvals`` came one row per graph.
    """

    vecs: Tensor
    vals: Tensor
    present: Tensor
    num_graphs: int | None


def _per_graph_rows(eigvals: Tensor, batch: Tensor) -> bool:
    """Whether ``N`` rows of ``eigvals`` (``N`` nodes) are one per graph rather than one
    per node. Both fit the shape only when the batch could hold ``N`` graphs, some empty
    (:class:`~torsion.spectral.AddLaplacianPE` stores one row per graph, so a batch with an
    empty graph and as many graphs as nodes has ``N`` rows). Rows per node repeat within a
    graph; rows that do not are read per graph. Reading that costs one host
    synchronisation, paid only by callers that pass ``N`` rows with ``batch`` (one row per
    graph avoids it)."""
    n = batch.shape[0]
    index = batch.long()
    nodes = torch.arange(n, device=batch.device)
    first = torch.full((n,), n, device=batch.device).scatter_reduce(0, index, nodes, "amin")
    reference = eigvals[first[index]]
    same = (reference == eigvals) | (torch.isnan(reference) & torch.isnan(eigvals))
    return not bool(same.all())


def _rows_of_graphs(eigvals: Tensor, batch: Tensor, name: str) -> Tensor:
    """``eigvals[batch]`` for per-graph rows; a graph id outside the rows (a negative one
    would wrap around with plain indexing) raises a ``ValueError`` naming ``batch``."""
    try:
        return torch.index_select(eigvals, 0, batch.long())
    except (IndexError, RuntimeError) as error:
        low, high = int(batch.min()), int(batch.max())
        raise ValueError(
            f"{name}: batch holds graph ids in [{low}, {high}] but eigvals has "
            f"{eigvals.size(0)} rows (one per graph)"
        ) from error


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return f"a {type(t).__name__}"


def _eigenpairs(
    module: nn.Module,
    eigvecs: Tensor,
    eigvals: Tensor,
    batch: Tensor | None,
    mask: Tensor | None = None,
) -> _Eigenpairs:
    """Validate the calling convention and bring eigenvalues to one row per node."""
    name = type(module).__name__
    if not isinstance(eigvecs, Tensor) or not eigvecs.dtype.is_floating_point or eigvecs.dim() != 2:
        raise ValueError(
            f"{name} expects eigvecs of shape (num_nodes, k) with a floating dtype, got "
            f"{_describe(eigvecs)}"
        )
    n, k = eigvecs.shape
    if not isinstance(eigvals, Tensor) or eigvals.dim() not in (1, 2):
        raise ValueError(
            f"{name} expects eigvals of shape (k,), (num_graphs, k) or (num_nodes, k), got "
            f"{_describe(eigvals)}"
        )
    if eigvals.dtype != eigvecs.dtype or eigvals.device != eigvecs.device:
        raise ValueError(
            f"{name}: eigvals ({eigvals.dtype}, {eigvals.device}) and eigvecs "
            f"({eigvecs.dtype}, {eigvecs.device}) must share dtype and device"
        )
    if eigvals.size(-1) != k:
        raise ValueError(
            f"{name}: eigvecs has k={k} eigenvectors (shape {tuple(eigvecs.shape)}) but eigvals "
            f"has {eigvals.size(-1)} eigenvalues per graph (shape {tuple(eigvals.shape)})"
        )
    params = next(module.parameters(), None)
    if params is not None and params.dtype != eigvecs.dtype:
        raise TypeError(
            f"{name} has {params.dtype} parameters but got {eigvecs.dtype} eigenvectors; "
            f"convert one of them (e.g. module.to({eigvecs.dtype}))"
        )
    if batch is not None:
        if not isinstance(batch, Tensor) or batch.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} expects batch as an integer tensor, got {_describe(batch)}")
        if batch.shape != (n,):
            raise ValueError(
                f"{name}: batch must have one entry per node, shape ({n},), got "
                f"{tuple(batch.shape)}"
            )
        if batch.device != eigvecs.device:
            raise ValueError(f"{name}: batch is on {batch.device} but eigvecs on {eigvecs.device}")

    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != eigvals.shape:
            raise ValueError(
                f"{name}: mask must be a bool tensor shaped like eigvals "
                f"{tuple(eigvals.shape)}, got {_describe(mask)}"
            )
        eigvals = eigvals.masked_fill(~mask, math.nan)
    num_graphs = None
    if eigvals.dim() == 1:
        vals = eigvals.expand(n, k)
    elif batch is None:
        if eigvals.size(0) not in (1, n):
            raise ValueError(
                f"{name}: without batch (a single graph), eigvals must have shape ({k},), "
                f"(1, {k}) or ({n}, {k}), got {tuple(eigvals.shape)}"
            )
        vals = eigvals.expand(n, k)
    elif eigvals.size(0) == n and not _per_graph_rows(eigvals, batch):
        vals = eigvals
    else:
        num_graphs = eigvals.size(0)
        vals = _rows_of_graphs(eigvals, batch, name)
    present = ~torch.isnan(vals)
    kept = present & ~torch.isnan(eigvecs)
    return _Eigenpairs(
        vecs=torch.where(kept, eigvecs, 0.0),
        vals=torch.where(present, vals, 0.0),
        present=present,
        num_graphs=num_graphs,
    )


def _check_edge_index(name: str, edge_index: Tensor | None, like: Tensor) -> None:
    if edge_index is None:
        return
    if (
        not isinstance(edge_index, Tensor)
        or edge_index.dtype not in (torch.int64, torch.int32)
        or edge_index.dim() != 2
        or edge_index.size(0) != 2
    ):
        raise ValueError(
            f"{name} expects edge_index of shape (2, num_edges) with an integer dtype, got "
            f"{_describe(edge_index)}"
        )
    if edge_index.device != like.device:
        raise ValueError(
            f"{name}: edge_index is on {edge_index.device} but eigvecs on {like.device}"
        )


@dataclass(frozen=True)
class _GraphRows:
    """For every node, the eigenvector rows of all nodes of its graph, zero-padded.

    ``rows[i, j]`` is the row of the ``j``-th node of node ``i``'s graph (``(N, n_max, k)``),
    ``mask[i, j]`` says whether that node exists (``(N, n_max)``) and ``pos[i]`` is node
    ``i``'s own index inside its graph, so ``rows[i, pos[i]]`` is node ``i``'s row.
    """

    rows: Tensor
    mask: Tensor
    pos: Tensor


def _graph_rows(vecs: Tensor, batch: Tensor | None, num_graphs: int | None) -> _GraphRows:
    n, k = vecs.shape
    device = vecs.device
    if batch is None:
        return _GraphRows(
            rows=vecs.unsqueeze(0).expand(n, n, k),
            mask=torch.ones(n, n, dtype=torch.bool, device=device),
            pos=torch.arange(n, device=device),
        )
    batch = batch.long()
    if num_graphs is None:
        num_graphs = int(batch.max()) + 1 if n else 0  # host sync
    counts = torch.zeros(num_graphs, dtype=torch.long, device=device)
    counts.scatter_add_(0, batch, torch.ones_like(batch))
    n_max = int(counts.max()) if num_graphs else 0  # host sync
    # Position of each node inside its graph, for any (also unsorted) batch vector.
    order = torch.argsort(batch, stable=True)
    start = torch.cumsum(counts, 0) - counts
    ranked = torch.arange(n, device=device) - start[batch[order]]
    pos = torch.empty_like(ranked).scatter_(0, order, ranked)
    dense = vecs.new_zeros(num_graphs * n_max, k).index_copy(0, batch * n_max + pos, vecs)
    dense = dense.view(num_graphs, n_max, k)
    mask = torch.arange(n_max, device=device) < counts[batch].unsqueeze(-1)
    return _GraphRows(rows=dense[batch], mask=mask, pos=pos)


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------


def _neighbour_sum(h: Tensor, edge_index: Tensor) -> Tensor:
    """``out[i] = sum over edges j -> i of h[j]`` along the first (node) dimension."""
    src, dst = edge_index[0].long(), edge_index[1].long()
    return torch.zeros_like(h).index_add(0, dst, h[src])


class _OrthonormalLinear(nn.Module):
    """``h -> h W + b`` with ``W`` an orthonormal ``(in_features, out_features)`` projection.

    ``weight`` is a :class:`geoopt.ManifoldParameter` on ``Stiefel`` stored tall, like
    :class:`torsion.equivariant.Linear`'s Stiefel weights: the ``(in, out)`` matrix itself
    when ``in >= out`` (``W^T W = I``: ``h -> h W`` is the orthogonal projection onto the
    span of ``W``'s columns, in their coordinates, so it never increases norms), its
    ``(out, in)`` transpose otherwise (``W W^T = I``: an isometric embedding). Initialised
    Haar-random from the global RNG (:meth:`torsion.manifolds.Stiefel.random`); the bias is
    a free parameter starting at zero.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.transposed = in_features < out_features
        shape = (max(in_features, out_features), min(in_features, out_features))
        self.weight = geoopt.ManifoldParameter(torch.empty(shape), manifold=Stiefel())
        self.bias = nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.weight.manifold.random(*self.weight.shape))
            self.bias.zero_()

    def forward(self, h: Tensor) -> Tensor:
        weight = self.weight.mT if self.transposed else self.weight
        return h @ weight + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, on stiefel"


class _MLP(nn.Module):
    """Linear layers with ReLU between them, on the last dimension.

    With ``edge_index``, every layer first adds the sum over in-neighbours along the node
    dimension (a GIN layer with ``eps = 0``); all other dimensions are batch dimensions.
    With ``orthonormal_last=True`` the last layer is an :class:`_OrthonormalLinear`.
    """

    def __init__(self, dims: Sequence[int], orthonormal_last: bool = False) -> None:
        super().__init__()
        pairs = list(itertools.pairwise(dims))
        last = len(pairs) - 1
        self.layers = nn.ModuleList(
            _OrthonormalLinear(a, b) if orthonormal_last and i == last else nn.Linear(a, b)
            for i, (a, b) in enumerate(pairs)
        )

    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()

    def forward(self, h: Tensor, edge_index: Tensor | None = None) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if edge_index is not None:
                h = h + _neighbour_sum(h, edge_index)
            h = layer(h)
            if i < last:
                h = torch.relu(h)
        return h


def _dims(first: int, hidden: int, last: int, layers: int, what: str) -> list[int]:
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"{what} needs at least one layer, got {layers!r}")
    return [first] + [hidden] * (layers - 1) + [last]


def _check_positive(name: str, **values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} expects a positive integer {key}, got {value!r}")


def _pool_pairs(h: Tensor, graph: _GraphRows) -> Tensor:
    """Pool ``h[i, j, ...]`` over the nodes ``j`` of ``i``'s graph: ``[sum_j h_ij, h_ii]``.

    The two linear equivariant maps from pair features to node features that survive on
    symmetric input (row sum and diagonal, Maron et al. 2019).

    Shapes:
        ``h``: ``(N, n_max, *, c)``; output ``(N, *, 2 c)``.
    """
    mask = graph.mask.view(*graph.mask.shape, *([1] * (h.dim() - 2)))
    summed = (h * mask).sum(1)
    diagonal = h[torch.arange(h.size(0), device=h.device), graph.pos]
    return torch.cat([summed, diagonal], dim=-1)


# ---------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------


class SignNet(nn.Module):
    """Sign-invariant encoder of Laplacian eigenvectors.

    ``SignNet(V, lambda) = rho(sum_i [phi(v_i, lambda_i) + phi(-v_i, lambda_i)])``: ``phi``
    maps each eigenvector (with its eigenvalue as an extra input on every node) to node
    features, the two signs are summed so flipping ``v_i`` changes nothing, and a sum over
    the eigenvectors (a DeepSets ``rho``) makes the output independent of their order too.
    ``phi`` is a GIN over the graph when ``edge_index`` is passed, otherwise an MLP on each
    node's entries. Invariance is exact: ``SignNet(V S) == SignNet(V)`` bit for bit for any
    diagonal sign matrix ``S``.

    Reference: D. Lim, J. Robinson, L. Zhao, T. Smidt, S. Sra, H. Maron, S. Jegelka, "Sign
    and Basis Invariant Networks for Spectral Graph Representation Learning", ICLR 2023.

    Args:
        out_channels: output features per node.
        hidden_channels: width of ``phi`` and ``rho``. Default 32.
        phi_layers: linear layers in ``phi``. Default 2.
        rho_layers: linear layers in ``rho``. Default 2.
        weight_manifold: ``None`` (default: a free readout) or ``"stiefel"``: the last
            linear layer of ``rho`` is an orthonormal projection (a
            :class:`geoopt.ManifoldParameter` on :class:`torsion.manifolds.Stiefel`, stored
            tall: ``(in, out)`` when ``in >= out``, else its transpose; Haar-random
            initialisation, bias at zero). Train it with :mod:`torsion.optim`. The
            invariances are unchanged: ``rho`` only sees invariant features.

    Raises:
        ValueError: for non-positive sizes or layer counts, or a ``weight_manifold`` other
            than ``None`` or ``"stiefel"``.

    Shapes:
        ``eigvecs``: ``(N, k)``; ``eigvals``: ``(k,)``, ``(B, k)`` or ``(N, k)``; ``batch``:
        ``(N,)``; ``edge_index``: ``(2, E)``; output ``(N, out_channels)``. See the module
        documentation for the calling and NaN-padding conventions.
    """

    def __init__(
        self,
        out_channels: int,
        hidden_channels: int = 32,
        phi_layers: int = 2,
        rho_layers: int = 2,
        *,
        weight_manifold: str | None = None,
    ) -> None:
        super().__init__()
        _check_positive("SignNet", out_channels=out_channels, hidden_channels=hidden_channels)
        #: ``None`` or ``"stiefel"``: the constraint on the readout's last layer.
        self.weight_manifold = check_weight_manifold(weight_manifold, "SignNet")
        self.out_channels = out_channels
        self.phi = _MLP(_dims(2, hidden_channels, hidden_channels, phi_layers, "SignNet phi"))
        self.rho = _MLP(
            _dims(hidden_channels, hidden_channels, out_channels, rho_layers, "rho"),
            orthonormal_last=weight_manifold == "stiefel",
        )

    def reset_parameters(self) -> None:
        self.phi.reset_parameters()
        self.rho.reset_parameters()

    def forward(
        self,
        eigvecs: Tensor,
        eigvals: Tensor,
        batch: Tensor | None = None,
        *,
        edge_index: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        pairs = _eigenpairs(self, eigvecs, eigvals, batch, mask)
        _check_edge_index("SignNet", edge_index, eigvecs)
        v, lam = pairs.vecs, pairs.vals
        signed = torch.stack([torch.stack([v, lam], -1), torch.stack([-v, lam], -1)], 1)
        h = self.phi(signed, edge_index).sum(1)  # (N, k, hidden): phi(v) + phi(-v)
        h = (h * pairs.present.unsqueeze(-1)).sum(1)
        return self.rho(h)


class SPE(nn.Module):
    """Stable and expressive positional encoding (SPE).

    SPE replaces the hard partition of the spectrum into eigenspaces by ``m`` learned soft
    partitions: for ``l = 1 .. m`` it forms the ``N_g x N_g`` matrix
    ``W_l = V diag(psi_l(lambda)) V^T`` of each graph, with ``psi = (psi_1 .. psi_m)`` an
    MLP applied to every eigenvalue, then reads the ``m`` channels of the pair features
    ``W[i, j, :]`` out with a permutation-equivariant network ``phi`` (an MLP on every pair,
    a GIN over the rows when ``edge_index`` is given) pooled over ``j`` (row sum and
    diagonal) and a final MLP ``rho``.

    ``W_l`` depends on the eigenvectors only through the spectral projectors of each
    eigenvalue, so SPE is invariant to sign flips and to any orthogonal change of basis in
    an eigenspace, and since ``psi`` is Lipschitz and continuous across eigenvalues,
    ``W_l`` (hence the output) moves by at most a constant times ``||L - L'||`` when the
    Laplacian is perturbed (Huang et al., Theorem 3.1; with all eigenpairs, or with a gap
    after the ``k``-th eigenvalue). Raw eigenvectors, by contrast, can rotate by ``O(1)``
    under an arbitrarily small perturbation of nearly repeated eigenvalues.

    Reference: Y. Huang, W. Lu, J. Robinson, Y. Yang, M. Zhang, S. Jegelka, P. Li, "On the
    Stability of Expressive Positional Encodings for Graphs", ICLR 2024.

    Args:
        out_channels: output features per node.
        num_partitions: number ``m`` of soft partitions (channels of ``W``). Default 16.
        hidden_channels: width of ``psi``, ``phi`` and ``rho``. Default 32.
        psi_layers: linear layers in ``psi``. Default 2.
        phi_layers: linear layers in ``phi``. Default 2.
        rho_layers: linear layers in ``rho``. Default 2.
        weight_manifold: ``None`` (default: a free readout) or ``"stiefel"``: the last
            linear layer of ``rho`` is an orthonormal projection (a
            :class:`geoopt.ManifoldParameter` on :class:`torsion.manifolds.Stiefel`, stored
            tall: ``(in, out)`` when ``in >= out``, else its transpose; Haar-random
            initialisation, bias at zero). Train it with :mod:`torsion.optim`. The
            invariances are unchanged: ``rho`` only sees invariant features.

    Raises:
        ValueError: for non-positive sizes or layer counts, or a ``weight_manifold`` other
            than ``None`` or ``"stiefel"``.

    Shapes:
        ``eigvecs``: ``(N, k)``; ``eigvals``: ``(k,)``, ``(B, k)`` or ``(N, k)``; ``batch``:
        ``(N,)``; ``edge_index``: ``(2, E)``; output ``(N, out_channels)``. Memory
        ``O(N * n_max * hidden_channels)`` for the largest graph size ``n_max``.
    """

    def __init__(
        self,
        out_channels: int,
        num_partitions: int = 16,
        hidden_channels: int = 32,
        psi_layers: int = 2,
        phi_layers: int = 2,
        rho_layers: int = 2,
        *,
        weight_manifold: str | None = None,
    ) -> None:
        super().__init__()
        _check_positive(
            "SPE",
            out_channels=out_channels,
            num_partitions=num_partitions,
            hidden_channels=hidden_channels,
        )
        #: ``None`` or ``"stiefel"``: the constraint on the readout's last layer.
        self.weight_manifold = check_weight_manifold(weight_manifold, "SPE")
        self.out_channels = out_channels
        self.num_partitions = num_partitions
        h = hidden_channels
        self.psi = _MLP(_dims(1, h, num_partitions, psi_layers, "SPE psi"))
        self.phi = _MLP(_dims(num_partitions, h, h, phi_layers, "SPE phi"))
        self.rho = _MLP(
            _dims(2 * h, h, out_channels, rho_layers, "SPE rho"),
            orthonormal_last=weight_manifold == "stiefel",
        )

    def reset_parameters(self) -> None:
        for net in (self.psi, self.phi, self.rho):
            net.reset_parameters()

    def _partitions(self, pairs: _Eigenpairs, graph: _GraphRows) -> Tensor:
        """``W[i, j, l] = sum_k V_ik psi_l(lambda_k) V_jk``: node ``i``'s row of every ``W_l``."""
        z = self.psi(pairs.vals.unsqueeze(-1))  # (N, k, m)
        return graph.rows @ (pairs.vecs.unsqueeze(-1) * z)  # (N, n_max, m)

    def forward(
        self,
        eigvecs: Tensor,
        eigvals: Tensor,
        batch: Tensor | None = None,
        *,
        edge_index: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        pairs = _eigenpairs(self, eigvecs, eigvals, batch, mask)
        _check_edge_index("SPE", edge_index, eigvecs)
        graph = _graph_rows(pairs.vecs, batch, pairs.num_graphs)
        w = self._partitions(pairs, graph)
        return self.rho(_pool_pairs(self.phi(w, edge_index), graph))


class BasisNet(nn.Module):
    """Basis-invariant encoder of the eigenspaces among the first ``k`` eigenpairs.

    Eigenpairs are sorted by eigenvalue and grouped into eigenspaces: consecutive
    eigenvalues within ``eigval_tol * max(1, |lambda|)`` of each other (exact repeats too,
    also at ``eigval_tol = 0``) belong to the same space. Each eigenspace ``V_s`` (of
    dimension ``d_s``) enters only through its orthogonal projector ``P_s = V_s V_s^T``,
    which does not depend on the basis chosen inside the space. A
    permutation-equivariant network ``phi`` reads every projector as pair features
    ``(P_s[i, j], lambda_s, d_s)`` (an MLP on every pair, a GIN over rows when
    ``edge_index`` is given), pooled over ``j`` (row sum and diagonal); the resulting node
    features of the eigenspaces, placed in ``k`` slots in eigenvalue order (a space
    occupies the slot of its first eigenpair, the others stay empty), are mixed by an MLP
    ``rho``.

    Lim et al. use one network ``phi_d`` per dimension ``d``; here one ``phi`` takes ``d`` as
    an input, which keeps the parameter count independent of the multiplicities. BasisNet
    is invariant to basis changes but not stable: the grouping jumps when eigenvalues cross
    the tolerance (use :class:`SPE` when that matters). Its memory grows like
    ``N * n_max * k * hidden_channels``, hence "for small ``k``".

    Reference: D. Lim, J. Robinson, L. Zhao, T. Smidt, S. Sra, H. Maron, S. Jegelka, "Sign
    and Basis Invariant Networks for Spectral Graph Representation Learning", ICLR 2023.

    Args:
        k: number of eigenpairs per graph (``eigvecs`` must have ``k`` columns).
        out_channels: output features per node.
        hidden_channels: width of ``phi`` and ``rho``. Default 32.
        phi_layers: linear layers in ``phi``. Default 2.
        rho_layers: linear layers in ``rho``. Default 2.
        eigval_tol: relative tolerance for equal eigenvalues; default
            ``eps(dtype) ** (1/3)`` (6e-6 in float64, 5e-3 in float32).
        weight_manifold: ``None`` (default: a free readout) or ``"stiefel"``: the last
            linear layer of ``rho`` is an orthonormal projection (a
            :class:`geoopt.ManifoldParameter` on :class:`torsion.manifolds.Stiefel`, stored
            tall: ``(in, out)`` when ``in >= out``, else its transpose; Haar-random
            initialisation, bias at zero). Train it with :mod:`torsion.optim`. The
            invariances are unchanged: ``rho`` only sees invariant features.

    Raises:
        ValueError: for non-positive sizes or layer counts, a negative ``eigval_tol``,
            or a ``weight_manifold`` other than ``None`` or ``"stiefel"``.

    Shapes:
        ``eigvecs``: ``(N, k)``; ``eigvals``: ``(k,)``, ``(B, k)`` or ``(N, k)``; ``batch``:
        ``(N,)``; ``edge_index``: ``(2, E)``; output ``(N, out_channels)``.
    """

    def __init__(
        self,
        k: int,
        out_channels: int,
        hidden_channels: int = 32,
        phi_layers: int = 2,
        rho_layers: int = 2,
        eigval_tol: float | None = None,
        *,
        weight_manifold: str | None = None,
    ) -> None:
        super().__init__()
        _check_positive("BasisNet", k=k, out_channels=out_channels, hidden_channels=hidden_channels)
        if eigval_tol is not None and not eigval_tol >= 0.0:
            raise ValueError(f"BasisNet expects eigval_tol >= 0, got {eigval_tol}")
        #: ``None`` or ``"stiefel"``: the constraint on the readout's last layer.
        self.weight_manifold = check_weight_manifold(weight_manifold, "BasisNet")
        self.k = k
        self.out_channels = out_channels
        self.eigval_tol = eigval_tol
        h = hidden_channels
        self.phi = _MLP(_dims(3, h, h, phi_layers, "BasisNet phi"))
        self.rho = _MLP(
            _dims(2 * h * k, h, out_channels, rho_layers, "BasisNet rho"),
            orthonormal_last=weight_manifold == "stiefel",
        )

    def reset_parameters(self) -> None:
        self.phi.reset_parameters()
        self.rho.reset_parameters()

    def forward(
        self,
        eigvecs: Tensor,
        eigvals: Tensor,
        batch: Tensor | None = None,
        *,
        edge_index: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        pairs = _eigenpairs(self, eigvecs, eigvals, batch, mask)
        _check_edge_index("BasisNet", edge_index, eigvecs)
        if eigvecs.size(1) != self.k:
            raise ValueError(
                f"BasisNet was built for k={self.k} eigenpairs, got eigvecs with "
                f"{eigvecs.size(1)} columns (shape {tuple(eigvecs.shape)})"
            )
        vecs, vals, same, leader = self._eigenspaces(pairs)
        graph = _graph_rows(vecs, batch, pairs.num_graphs)
        # P[i, j, s] = sum_t [t in space of s] V_it V_jt: the projector of slot s's space.
        proj = graph.rows @ (vecs.unsqueeze(1) * same).mT  # (N, n_max, k)
        dim = same.sum(-1)  # (N, k) dimension of each slot's space
        n_max = proj.size(1)
        feats = torch.stack(
            [
                proj,
                vals.unsqueeze(1).expand(-1, n_max, -1),
                dim.unsqueeze(1).expand(-1, n_max, -1),
            ],
            dim=-1,
        )  # (N, n_max, k, 3)
        node = _pool_pairs(self.phi(feats, edge_index), graph)  # (N, k, 2h)
        node = node * leader.unsqueeze(-1)
        return self.rho(node.flatten(1))

    def _eigenspaces(self, pairs: _Eigenpairs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Sort eigenpairs per node row and group equal eigenvalues.

        Returns sorted ``vecs`` and ``vals`` (``(N, k)``), ``same`` (``(N, k, k)``,
        float: ``1`` where two slots share an eigenspace, both present) and ``leader``
        (``(N, k)``, float: ``1`` on the first slot of each eigenspace).
        """
        key = torch.where(pairs.present, pairs.vals, torch.inf)
        key, order = torch.sort(key, dim=1, stable=True)
        vecs = torch.gather(pairs.vecs, 1, order)
        present = torch.isfinite(key)
        vals = torch.where(present, key, 0.0)
        tol = self.eigval_tol if self.eigval_tol is not None else tie_tolerance(vals.dtype)
        lo, hi = vals[:, :-1], vals[:, 1:]
        scale = torch.maximum(torch.maximum(lo.abs(), hi.abs()), torch.ones_like(lo))
        new = (hi - lo > tol * scale) | ~present[:, 1:]
        new = torch.cat([torch.ones_like(present[:, :1]), new], dim=1)  # k = 1 included
        group = torch.cumsum(new.long(), dim=1)
        both = present.unsqueeze(-1) & present.unsqueeze(-2)
        same = (group.unsqueeze(-1) == group.unsqueeze(-2)) & both
        leader = new & present
        return vecs, vals, same.to(vals.dtype), leader.to(vals.dtype)
