"""Positional-encoding transforms: Laplacian eigenvectors and random-walk return probabilities.

Both are :class:`torch_geometric.transforms.BaseTransform`: they work on a ``Data`` or a
whole ``Batch`` (all graphs in one call), return a shallow copy with new attributes and
never modify their input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform
from torch_geometric.utils import coalesce

from torsion._dtypes import tie_tolerance
from torsion.spectral._eigensolvers import csr_tensor, row_pointers
from torsion.spectral._laplacian import (
    _METHODS,
    _NORMALIZATIONS,
    Method,
    Normalization,
    _resolve_dtype,
    _same_weights,
    check_graph_inputs,
    dense_adjacency,
    laplacian_eigs,
    needs_gradient,
)

__all__ = ["AddLaplacianPE", "AddRandomWalkPE"]

SignRule = Literal["canonical", "random"] | None
_SIGN_RULES = ("canonical", "random", None)
_MOMENTS = (3, 5, 7)
_NUMPY_DTYPES = (torch.float32, torch.float64)
# Columns of the identity pushed through the random walk at once: the block of
# ``N x width`` values stays near 2**21 entries (8 MB in float32), cache-friendly.
_BLOCK_ENTRIES = 2**21
# One graph of at most this many nodes takes dense powers (walk length 20, Barabasi-Albert
# graphs, one thread: 0.23 against 0.70 ms for the blocked sparse walk at 64 nodes, 1.30
# against 1.42 ms at 160, 2.29 against 1.76 ms at 200, where the n^3 products dominate;
# two threads cross above 200), if its powers fit in _BLOCK_ENTRIES.
_DENSE_WALK_MAX_NODES = 160


def _graph_tensors(
    data: Data, name: str
) -> tuple[Tensor, int, Tensor | None, Tensor | None, int | None]:
    """``edge_index, num_nodes, edge_weight, batch, num_graphs`` of a ``Data``/``Batch``."""
    num_nodes = data.num_nodes
    if num_nodes is None:
        raise ValueError(f"{name}: the data object has no nodes (num_nodes is None)")
    edge_index = data.edge_index
    if edge_index is None:
        device = data.x.device if getattr(data, "x", None) is not None else None
        edge_index = torch.empty(2, 0, dtype=torch.long, device=device)
    edge_weight = data.edge_weight if "edge_weight" in data else None
    batch = data.batch if "batch" in data else None
    num_graphs = getattr(data, "num_graphs", None) if batch is not None else None
    return edge_index, int(num_nodes), edge_weight, batch, num_graphs


def _set_encodings(
    data: Data, node_level: dict[str, Tensor], graph_level: dict[str, Tensor]
) -> None:
    """Store the encodings on ``data``. On a PyG ``Batch``, also record how each splits
    into graphs (node rows by ``ptr``, graph rows one each), so that ``to_data_list()``
    and ``batch[i]`` return them: PyG separates only the attributes it collated and
    drops the others silently. The caller's ``Batch`` keeps its own split tables."""
    for name, value in (*node_level.items(), *graph_level.items()):
        data[name] = value
    slices = getattr(data, "_slice_dict", None)
    increments = getattr(data, "_inc_dict", None)
    ptr = getattr(data, "ptr", None)
    if slices is None or increments is None or ptr is None:
        return
    slices, increments = dict(slices), dict(increments)
    ptr = ptr.cpu()
    num_graphs = ptr.numel() - 1
    graph_rows = torch.arange(num_graphs + 1)
    for names, rows in ((node_level, ptr), (graph_level, graph_rows)):
        for name in names:
            slices[name] = rows
            increments[name] = torch.zeros(num_graphs, dtype=torch.long)
    data._slice_dict, data._inc_dict = slices, increments


def _graph_sums(batch: Tensor | None, num_graphs: int, like: Tensor) -> Callable[[Tensor], Tensor]:
    """``values (N, k) -> (B, k)``: the sums of the node rows over each graph.

    A product with the ``(B, N)`` 0/1 membership matrix in CSR, 3-7x cheaper on the CPU
    than ``index_add_`` over the same rows, where torch has sparse products for the dtype
    of ``like`` (float32, float64); ``index_add_`` otherwise.
    """
    if batch is None:
        return lambda values: values.sum(0, keepdim=True)
    if like.dtype not in (torch.float32, torch.float64):
        return lambda values: values.new_zeros((num_graphs, values.shape[1])).index_add_(
            0, batch, values
        )
    crow = row_pointers(batch, num_graphs)
    if bool((batch[1:] >= batch[:-1]).all()):  # PyG's batches are sorted: no sort needed
        nodes = torch.arange(batch.numel(), device=batch.device)
    else:
        nodes = torch.argsort(batch, stable=True)
    ones = torch.ones(batch.numel(), dtype=like.dtype, device=like.device)
    indicator = csr_tensor(crow, nodes, ones, (num_graphs, batch.numel()))
    return lambda values: indicator @ values


def canonical_signs(vectors: Tensor, batch: Tensor | None = None, num_graphs: int = 1) -> Tensor:
    """The canonical sign of each eigenvector of each graph, ``+1`` or ``-1``.

    For an eigenvector ``v`` (its entries on one graph) the sign makes the first
    non-negligible odd moment ``m_p = sum_i v_i^p``, ``p = 3, 5, 7``, positive;
    non-negligible means ``|m_p| > tau * sum_i |v_i|^p`` with ``tau = eps^(1/3)`` of the
    dtype (6e-6 in float64, 5e-3 in float32). The moments are invariant under node
    permutations, so the rule commutes with relabelling the nodes, and continuous in
    ``v`` away from their zeros: a small perturbation of a graph flips no sign unless a
    moment was near zero.

    All three moments vanish when the entries of ``v`` are (to ``tau``) symmetric under
    ``v -> -v``, for example the antisymmetric eigenvectors of a path or of any graph
    with an automorphism mapping ``v`` to ``-v``. Then no permutation-invariant rule can
    choose, and the fallback makes the largest-magnitude entry positive, ties (within
    ``tau``) going to the lowest node index: deterministic, but dependent on node order.
    All-zero (padding) columns get ``+1``.

    Args:
        vectors: ``(N, k)`` eigenvectors.
        batch: ``(N,)`` graph of each node (``None``: one graph).
        num_graphs: ``B``.

    Returns:
        ``(B, k)`` of ``+1`` / ``-1`` in the dtype of ``vectors``, without gradient (the
        signs are piecewise constant).
    """
    tau = tie_tolerance(vectors.dtype)
    vectors = vectors.detach()  # the signs are piecewise constant: no gradient, no graph
    if batch is None and vectors.device.type == "cpu" and vectors.dtype in _NUMPY_DTYPES:
        # one graph on the host (a transform applied graph by graph): the same rule in
        # NumPy, whose small ops cost a fraction of torch's
        return torch.from_numpy(_one_graph_signs(vectors.numpy(), tau))
    b, k = num_graphs, vectors.shape[1]
    sign, decided = _moment_signs(vectors, _graph_sums(batch, b, vectors), tau)
    if bool(decided.all()):
        return sign
    # fallback: largest magnitude, lowest index among ties; read on the rows of the graphs
    # with an undecided column only (full-size passes were 8 % of a batch of molecules)
    n = vectors.shape[0]
    graph = batch if batch is not None else vectors.new_zeros(n, dtype=torch.long)
    rows = torch.nonzero((~decided).any(1)[graph]).squeeze(1)
    magnitude, graph = vectors[rows].abs(), graph[rows]
    index = graph[:, None].expand(-1, k)
    peak = torch.zeros(b, k, dtype=vectors.dtype, device=vectors.device)
    peak = peak.scatter_reduce_(0, index, magnitude, "amax")
    candidate = (magnitude >= (1 - tau) * peak[graph]) & (magnitude > 0)
    first = torch.full((b, k), n, dtype=torch.long, device=vectors.device)
    first = first.scatter_reduce_(0, index, torch.where(candidate, rows[:, None], n), "amin")
    entry = vectors.gather(0, first.clamp_max(max(n - 1, 0)))
    fallback = torch.where(first < n, torch.sign(entry), 1.0)
    return torch.where(decided, sign, fallback)


def _one_graph_signs(vectors: np.ndarray, tau: float) -> np.ndarray:
    """:func:`canonical_signs` of the ``(N, k)`` eigenvectors of one graph, in NumPy."""
    sign, decided = _moment_signs(vectors, lambda values: values.sum(0, keepdims=True), tau)
    if decided.all():
        return sign
    magnitude = np.abs(vectors)
    candidate = (magnitude >= (1 - tau) * magnitude.max(0, initial=0.0)) & (magnitude > 0)
    first = candidate.argmax(0)  # the lowest index among ties
    entry = vectors[first, np.arange(vectors.shape[1])]
    fallback = np.where(candidate.any(0), np.sign(entry), 1).astype(vectors.dtype)
    return np.where(decided, sign, fallback[None])


def _moment_signs(vectors, graph_sums: Callable, tau: float):
    """The signs :func:`canonical_signs` reads off the odd moments, and where they decide
    (all-zero columns too, with ``+1``): ``(B, k)`` each. ``vectors`` is a tensor or a
    NumPy array (one graph on the host), ``graph_sums`` sums its rows over each graph."""
    xp = np if isinstance(vectors, np.ndarray) else torch
    square = vectors * vectors
    power = vectors * square  # v^3, then v^5 and v^7 in place: few full-size temporaries
    norm = graph_sums(square)
    sign, decided = xp.ones_like(norm), norm == 0
    for p in _MOMENTS:
        if p > _MOMENTS[0]:
            # the higher moments only matter where the lower ones vanished (rare): skip
            # them, and their host synchronisation, when every sign is settled
            if bool(decided.all()):
                break
            power *= square
        moment, scale = graph_sums(power), graph_sums(abs(power))
        clear = (abs(moment) > tau * scale) & ~decided
        sign = xp.where(clear, xp.sign(moment), sign)
        decided |= clear
    return sign, decided


class AddLaplacianPE(BaseTransform):
    """Laplacian eigenvector positional encodings, with eigenvalues, deterministic signs.

    Adds to each graph the ``k`` smallest **non-trivial** eigenpairs of its Laplacian
    (:func:`~torsion.spectral.laplacian_eigs` with ``skip_null_space=True``):

    * ``data[attr_name]``: ``(N, k)`` eigenvectors;
    * ``data[attr_name + "_eigvals"]``: ``(1, k)`` eigenvalues per graph (``(B, k)`` for a
      ``Batch``; PyG's collation concatenates the per-graph rows);
    * ``data[attr_name + "_mask"]``: ``(1, k)`` / ``(B, k)`` booleans, ``False`` where a
      graph has fewer than ``k`` non-trivial eigenpairs (those columns are zero, their
      eigenvalues 0).

    **The null space.** The eigenvalue 0 has one eigenvector per connected component
    (constant on the component, up to ``D^1/2``), which says which component a node is
    in and nothing about where it sits. On a disconnected graph any basis of that space
    is as valid as another, so PyG's transform returns arbitrary mixtures of component
    indicators as "positions". Here all of them are skipped: the encoding starts at the
    first non-zero eigenvalue of the graph, whatever its number of components.

    **Signs.** ``"canonical"`` (default) applies :func:`canonical_signs`: the first
    non-negligible odd moment ``sum_i v_i^p`` (``p = 3, 5, 7``) of each eigenvector is made
    positive, a rule invariant to node relabelling and ambiguous only when the entries
    of ``v`` are symmetric under ``v -> -v``, where it falls back to the largest entry
    (lowest index among ties). ``"random"`` flips each eigenvector of each graph with
    probability 1/2, drawn from ``generator`` (data augmentation, as in PyG, but
    reproducible); ``None`` keeps the solver's signs. Signs never fix the rotation
    ambiguity of repeated eigenvalues: use a basis-invariant encoder (``BasisNet``,
    ``SPE``) for that.

    Args:
        k: eigenpairs per graph.
        attr_name: default ``"lap_pe"``.
        normalization: of the Laplacian: ``"sym"`` (default), ``None`` or ``"rw"``.
        sign: ``"canonical"`` (default), ``"random"`` or ``None``.
        generator: for ``sign="random"`` (``None``: the global RNG) and the start vectors
            of iterative solvers (``None``: a fixed seed).
        method: passed to :func:`~torsion.spectral.laplacian_eigs`.
        tol: passed to :func:`~torsion.spectral.laplacian_eigs`.

    Shapes:
        Adds ``(N, k)``, ``(1, k)`` and ``(1, k)`` to a ``Data``; ``(N, k)``, ``(B, k)``
        and ``(B, k)`` to a ``Batch`` of ``B`` graphs.

    Example:
        >>> from torch_geometric.data import Data
        >>> ring = torch.tensor([[0, 1, 2, 3, 1, 2, 3, 0], [1, 2, 3, 0, 0, 1, 2, 3]])
        >>> out = AddLaplacianPE(k=2)(Data(edge_index=ring, num_nodes=4))
        >>> out.lap_pe.shape, out.lap_pe_eigvals.round(decimals=5)
        (torch.Size([4, 2]), tensor([[1., 1.]]))
    """

    def __init__(
        self,
        k: int,
        attr_name: str = "lap_pe",
        normalization: Normalization = "sym",
        sign: SignRule = "canonical",
        generator: torch.Generator | None = None,
        *,
        method: Method = "auto",
        tol: float | None = None,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"AddLaplacianPE: k must be an int >= 0, got {k!r}")
        if not isinstance(attr_name, str) or not attr_name:
            raise TypeError(f"AddLaplacianPE: attr_name must be a non-empty str, got {attr_name!r}")
        if sign not in _SIGN_RULES:
            raise ValueError(
                f"AddLaplacianPE: sign must be 'canonical', 'random' or None, got {sign!r}"
            )
        if normalization not in _NORMALIZATIONS:
            raise ValueError(
                f"AddLaplacianPE: normalization must be None, 'sym' or 'rw', got {normalization!r}"
            )
        if method not in _METHODS:
            raise ValueError(f"AddLaplacianPE: method must be one of {_METHODS}, got {method!r}")
        self.k = k
        self.attr_name = attr_name
        self.normalization = normalization
        self.sign = sign
        self.generator = generator
        self.method = method
        self.tol = tol

    def forward(self, data: Data) -> Data:
        edge_index, num_nodes, edge_weight, batch, num_graphs = _graph_tensors(
            data, "AddLaplacianPE"
        )
        eig = laplacian_eigs(
            edge_index,
            num_nodes,
            self.k,
            self.normalization,
            self.method,
            batch,
            edge_weight=edge_weight,
            skip_null_space=True,
            tol=self.tol,
            generator=self.generator,
            num_graphs=num_graphs,
        )
        values, mask = eig.eigenvalues, eig.mask
        if batch is None:
            values, mask = values[None], mask[None]
        vectors = eig.eigenvectors
        if self.sign == "canonical":
            signs = canonical_signs(vectors, batch, values.shape[0])
        elif self.sign == "random":
            gen_device = self.generator.device if self.generator is not None else "cpu"
            draw = torch.randint(0, 2, values.shape, generator=self.generator, device=gen_device)
            signs = (2 * draw - 1).to(device=vectors.device, dtype=vectors.dtype)
        else:
            signs = torch.ones_like(values)
        if self.sign is not None:
            vectors = vectors * (signs[batch] if batch is not None else signs)
        graph_level = {f"{self.attr_name}_eigvals": values, f"{self.attr_name}_mask": mask}
        _set_encodings(data, {self.attr_name: vectors}, graph_level)
        return data

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(k={self.k}, attr_name={self.attr_name!r}, "
            f"normalization={self.normalization!r}, sign={self.sign!r})"
        )


# ---------------------------------------------------------------------------------------
# Random-walk encodings
# ---------------------------------------------------------------------------------------


def _validate_walk_inputs(
    edge_index: Tensor, num_nodes: int, edge_weight: Tensor | None, name: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Coalesced ``(row, col, weight)`` with self-loops kept (they are part of the walk)."""
    check_graph_inputs(edge_index, num_nodes, edge_weight, name)
    dtype = _resolve_dtype(edge_weight, None, name)  # sparse CPU products: float32/64 only
    if edge_weight is None:
        weight = torch.ones(edge_index.shape[1], dtype=dtype, device=edge_index.device)
    else:
        weight = edge_weight
    index, weight = coalesce(edge_index.long(), weight, num_nodes=num_nodes, reduce="sum")
    return index[0], index[1], weight


def _csr(row: Tensor, col: Tensor, values: Tensor, n: int) -> Tensor:
    crow = row_pointers(row, n)
    small = row.numel() < 2**31 - 1
    return csr_tensor(crow.int() if small else crow, col.int() if small else col, values, n)


def random_walk_return_probabilities(
    edge_index: Tensor,
    num_nodes: int,
    walk_length: int,
    edge_weight: Tensor | None = None,
    batch: Tensor | None = None,
) -> Tensor:
    """``[P^t]_ii`` for ``t = 1 .. walk_length``, with ``P = D^-1 A`` (row-stochastic).

    Exact, by blocked sparse x dense products: blocks of columns of the identity are
    pushed through the walk, never a sparse x sparse power (those fill in on small-world
    graphs). Graphs of a batch are disjoint, so column ``j`` of a block carries the
    ``j``-th node of every graph at once: the work grows with the largest graph, not with
    the batch. When ``A`` is symmetric, ``P^t`` is similar to ``S^t`` with
    ``S = D^-1/2 A D^-1/2``, so ``[P^t]_ii = ||S^s e_i||^2`` (``t = 2s``) or
    ``<S^s e_i, S^(s+1) e_i>`` (``t = 2s + 1``): half the products (not taken when
    ``edge_weight`` needs a gradient, whose derivative along asymmetric perturbations
    that shortcut would get wrong). One graph of at most ``_DENSE_WALK_MAX_NODES`` nodes
    takes dense powers instead (:func:`_dense_walk`).

    ``A[i, j]`` sums the weights of the edges ``i -> j`` (self-loops included: a loop is a
    step that stays; multi-edges add up), ``d_i`` is its row sum and rows with ``d_i = 0``
    are zero. PyG's transform agrees on unweighted graphs without repeated edges; with
    weights it puts ``1 / d_i`` on every edge (dropping ``w_ij``, so its ``P`` is not
    stochastic), and its dense path keeps one copy of a repeated edge.

    Shapes:
        ``edge_index`` ``(2, E)``, ``edge_weight`` ``(E,)``, ``batch`` ``(N,)`` (sorted);
        output ``(N, walk_length)`` in the dtype of ``edge_weight`` (else the default).
    """
    name = "AddRandomWalkPE"
    dense_entries = walk_length * num_nodes**2  # the dense route's powers, at most
    small = 0 < num_nodes <= _DENSE_WALK_MAX_NODES and 0 < dense_entries <= _BLOCK_ENTRIES
    if batch is None and small:
        check_graph_inputs(edge_index, num_nodes, edge_weight, name)
        return _dense_walk(edge_index, num_nodes, walk_length, edge_weight, name)
    row, col, weight = _validate_walk_inputs(edge_index, num_nodes, edge_weight, name)
    device, dtype = weight.device, weight.dtype
    out = torch.zeros(num_nodes, walk_length, dtype=dtype, device=device)
    if num_nodes == 0 or walk_length == 0:
        return out
    degree = torch.zeros(num_nodes, dtype=dtype, device=device).index_add_(0, row, weight)
    positive = degree > 0
    inv = torch.where(positive, 1.0 / degree.clamp_min(torch.finfo(dtype).tiny), 0.0)
    perm = torch.argsort(col * num_nodes + row)
    symmetric = (
        # the shortcut holds only on a symmetric A: its derivative along a perturbation
        # that breaks the symmetry would be wrong, so not when a gradient is needed
        not needs_gradient(weight)
        and bool(torch.equal(row[perm], col))
        and bool(torch.equal(col[perm], row))
        and _same_weights(weight[perm], weight)
    )
    if symmetric:
        root = inv.sqrt()
        matrix = _csr(row, col, weight * root[row] * root[col], num_nodes)
    else:
        matrix = _csr(row, col, weight * inv[row], num_nodes)
    # the probe column of each node: its index within its graph
    nodes = torch.arange(num_nodes, device=device)
    if batch is None:
        local, width, num_graphs = nodes, num_nodes, 1
    else:
        batch = batch.to(device=device, dtype=torch.long)
        if batch.shape != (num_nodes,):
            raise ValueError(
                f"{name}: batch must have shape ({num_nodes},), got {tuple(batch.shape)}"
            )
        if bool((batch[1:] < batch[:-1]).any()) or bool((batch < 0).any()):
            raise ValueError(
                f"{name}: batch must be sorted and non-negative (PyG's Batch.batch is)"
            )
        if not bool(torch.equal(batch[row], batch[col])):
            raise ValueError(f"{name}: an edge connects two different graphs of the batch")
        counts = torch.bincount(batch)
        ptr = torch.cumsum(counts, 0) - counts
        local, width, num_graphs = nodes - ptr[batch], int(counts.max()), counts.numel()
    block = max(1, min(width, _BLOCK_ENTRIES // num_nodes))
    graph_sums = _graph_sums(batch, num_graphs, weight) if symmetric else None
    for start in range(0, width, block):
        stop = min(width, start + block)
        inside = (local >= start) & (local < stop)
        who = nodes[inside]
        graph = batch[who] if batch is not None else torch.zeros_like(who)
        column = local[inside] - start
        probe = torch.zeros(num_nodes, stop - start, dtype=dtype, device=device)
        probe[who, column] = 1.0
        if symmetric:
            _symmetric_walk(matrix, probe, walk_length, who, column, graph, graph_sums, out)
        else:
            y = probe
            for t in range(walk_length):
                y = torch.mm(matrix, y)
                out[who, t] = y[who, column]
    return out


def _dense_walk(
    edge_index: Tensor, num_nodes: int, walk_length: int, edge_weight: Tensor | None, name: str
) -> Tensor:
    """:func:`random_walk_return_probabilities` of one small graph, from dense powers.

    The graph by graph route (a data set's ``transform=``): the powers are stacked and
    all their diagonals read at the end, a few tensor operations in all. When
    ``A`` is symmetric, half the powers of ``S = D^-1/2 A D^-1/2`` suffice, as in
    :func:`_symmetric_walk`: ``[S^2s]_ii = sum_j (S^s)_ij^2`` and
    ``[S^(2s+1)]_ii = sum_j (S^s)_ij (S^(s+1))_ij``.
    """
    dtype = _resolve_dtype(edge_weight, None, name)
    device, n = edge_index.device, num_nodes
    *_, a = dense_adjacency(edge_index, n, edge_weight, dtype)  # loops stay: a step that stays
    degree = a.sum(1)
    inverse = torch.where(degree > 0, degree.clamp_min(torch.finfo(dtype).tiny).reciprocal(), 0)
    symmetric = not needs_gradient(a) and _same_weights(a, a.mT)
    if symmetric:
        root = inverse.sqrt()
        step = a.mul_(root[:, None]).mul_(root)  # S
        count = walk_length // 2 + 1
    else:
        step = a.mul_(inverse[:, None])  # P
        count = walk_length
    powers = [step]
    for _ in range(1, count):
        powers.append(powers[-1] @ step)
    powers = torch.stack(powers)
    if not symmetric:
        return powers.diagonal(dim1=1, dim2=2).T.contiguous()
    out = torch.empty(n, walk_length, dtype=dtype, device=device)
    out[:, 0] = step.diagonal()
    even = (powers * powers).sum(2)  # row i: [S^(2i + 2)]_jj
    odd = (powers[:-1] * powers[1:]).sum(2)  # row i: [S^(2i + 3)]_jj
    out[:, 1::2] = even[: walk_length // 2].T
    out[:, 2::2] = odd[: (walk_length - 1) // 2].T
    return out


def _symmetric_walk(
    matrix: Tensor,
    y: Tensor,
    walk_length: int,
    who: Tensor,
    column: Tensor,
    graph: Tensor,
    graph_sums: Callable[[Tensor], Tensor],
    out: Tensor,
) -> None:
    """``[S^t]_ii`` from half the powers: squared norms and inner products of ``S^s e_i``.

    Node ``who[j]`` of graph ``graph[j]`` is probed in column ``column[j]`` of ``y``.
    """

    def read(products: Tensor) -> Tensor:
        return graph_sums(products)[graph, column]

    for s in range(walk_length // 2 + 1):
        nxt = torch.mm(matrix, y) if 2 * s + 1 <= walk_length else None
        if s >= 1:
            out[who, 2 * s - 1] = read(y * y)
        if nxt is not None:
            out[who, 2 * s] = read(y * nxt)
            y = nxt


class AddRandomWalkPE(BaseTransform):
    """Random-walk positional encodings: return probabilities ``[P^t]_ii``, ``t <= walk_length``.

    Exact, computed with blocked sparse x
    dense products (never sparse x sparse powers, which fill in on small-world graphs);
    on undirected graphs half the products suffice. Agrees with
    :class:`torch_geometric.transforms.AddRandomWalkPE` (to rounding) on unweighted
    graphs without repeated edges; on weighted graphs this one is the random walk
    ``P = D^-1 A`` and PyG's is not (it drops ``w_ij``). On a
    ``Batch`` all graphs are done at once, at the cost of the largest graph.

    Args:
        walk_length: number of steps ``>= 1``.
        attr_name: default ``"rw_pe"``; ``None`` concatenates the encoding to ``data.x``.

    Shapes:
        Adds ``(N, walk_length)``.

    Example:
        On a 4-cycle a walk returns only after an even number of steps:

        >>> from torch_geometric.data import Data
        >>> ring = torch.tensor([[0, 1, 2, 3, 1, 2, 3, 0], [1, 2, 3, 0, 0, 1, 2, 3]])
        >>> AddRandomWalkPE(4)(Data(edge_index=ring, num_nodes=4)).rw_pe[0]
        tensor([0.0000, 0.5000, 0.0000, 0.5000])
    """

    def __init__(self, walk_length: int, attr_name: str | None = "rw_pe") -> None:
        if isinstance(walk_length, bool) or not isinstance(walk_length, int) or walk_length < 1:
            raise ValueError(
                f"AddRandomWalkPE: walk_length must be an int >= 1, got {walk_length!r}"
            )
        self.walk_length = walk_length
        self.attr_name = attr_name

    def forward(self, data: Data) -> Data:
        edge_index, num_nodes, edge_weight, batch, _ = _graph_tensors(data, "AddRandomWalkPE")
        pe = random_walk_return_probabilities(
            edge_index, num_nodes, self.walk_length, edge_weight, batch
        )
        name = "x" if self.attr_name is None else self.attr_name
        x = getattr(data, "x", None) if self.attr_name is None else None
        if x is not None:
            x = x.view(-1, 1) if x.dim() == 1 else x
            pe = torch.cat([x, pe.to(x.device, x.dtype)], dim=-1)
        _set_encodings(data, {name: pe}, {})
        return data

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(walk_length={self.walk_length}, attr_name={self.attr_name!r})"
        )
