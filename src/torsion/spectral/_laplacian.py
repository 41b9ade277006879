"""Graph Laplacians and their smallest eigenpairs, for one large graph or many small ones.

Conventions (shared by :func:`laplacian`, :func:`laplacian_eigs` and the positional
encodings):

* ``A[i, j]`` is the sum of the weights of all edges ``i -> j`` (multi-edges are
  summed); self-loops are dropped, as in :func:`torch_geometric.utils.get_laplacian`.
  A loop would add its weight to both ``D[i, i]`` and ``A[i, i]``, so it cannot change
  ``L = D - A``; the normalized Laplacians use the same loop-free degrees.
* ``d_i = sum_j A[i, j]``. ``L = D - A``; ``L_sym = D^+1/2 L D^+1/2``;
  ``L_rw = D^+ L``, where ``D^+`` inverts the positive degrees and keeps the zeros. So an
  isolated node has an all-zero row and column in every normalization: it is a connected
  component of its own, with null vector ``e_i``, and the multiplicity of the eigenvalue 0
  equals the number of connected components in all three. (PyG puts ``L_sym[i, i] = 1``
  at isolated nodes, which gives them the eigenvalue 1 instead.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch_geometric.utils import coalesce, remove_self_loops

from torsion.spectral._eigensolvers import (
    SolverResult,
    SymmetricProblem,
    arpack_eigs,
    chebyshev_eigs,
    lobpcg_eigs,
    looks_mesh_like,
    row_pointers,
    shift_invert_eigs,
)

__all__ = ["LaplacianEigs", "laplacian", "laplacian_eigs"]

Normalization = Literal["sym", "rw"] | None
Method = Literal["auto", "dense", "chebyshev", "lobpcg", "arpack", "shift_invert"]

_NORMALIZATIONS = (None, "sym", "rw")
_METHODS = ("auto", "dense", "chebyshev", "lobpcg", "arpack", "shift_invert")
_DEFAULT_TOL = 1e-6
#: Graphs with more edges find their components with SciPy on the CPU, smaller ones by
#: pointer jumping (measured: 49 us against SciPy's 190 us on a 30-node molecule, 190 us
#: against 235 us at 2,300 edges, even near 4,000; most of SciPy's time is its matrix).
_SCIPY_MIN_EDGES = 4096
#: Graphs with at most this many edges find their components by a union-find in Python
#: on the CPU: 14 us against pointer jumping's 55 us on a 30-node molecule (its rounds
#: are ~15 tensor ops each); the loop costs about 0.2 us an edge.
_UNION_FIND_MAX_EDGES = 256


class LaplacianEigs(NamedTuple):
    """The ``k`` smallest eigenpairs of the Laplacian of each graph (:func:`laplacian_eigs`).

    ``eigenvalues`` ascend, with ``0`` where ``mask`` is ``False``. ``eigenvectors`` hold
    one column per eigenvalue, rows in the input node order: unit norm for ``None`` and
    ``"sym"``, ``D``-orthonormal (``v^T D v = 1``, isolated nodes counting ``d = 1``) for
    ``"rw"``, zero columns where ``mask`` is ``False``. ``mask`` is ``True`` for a real
    eigenpair and ``False`` for padding (a graph with fewer than ``k`` eigenpairs to
    give). ``residuals`` are ``||L v - lambda v|| / ||v||`` in the requested
    normalization (``0`` for padding). ``num_components`` counts the connected components
    of each graph: the multiplicity of the eigenvalue 0 (isolated nodes are components).

    Shapes:
        Without ``batch``: ``eigenvalues``, ``mask``, ``residuals``: ``(k,)``;
        ``num_components``: ``()``. With ``batch`` (``B`` graphs): ``(B, k)`` and
        ``(B,)``. ``eigenvectors``: ``(N, k)`` in both cases.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    mask: Tensor
    residuals: Tensor
    num_components: Tensor


class _Graph(NamedTuple):
    """Validated, coalesced, loop-free edges."""

    row: Tensor
    col: Tensor
    weight: Tensor
    num_nodes: int
    degree: Tensor


# ---------------------------------------------------------------------------------------
# Validation and preparation
# ---------------------------------------------------------------------------------------


def _resolve_dtype(edge_weight: Tensor | None, dtype: torch.dtype | None, name: str) -> torch.dtype:
    if dtype is None:
        dtype = edge_weight.dtype if edge_weight is not None else torch.get_default_dtype()
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def check_graph_inputs(
    edge_index: Tensor, num_nodes: int, edge_weight: Tensor | None, name: str
) -> None:
    """Raise a clear error for a malformed ``edge_index``, ``num_nodes`` or ``edge_weight``.

    ``edge_index`` must be a ``(2, E)`` integer tensor with nodes in ``[0, num_nodes)``;
    ``edge_weight`` ``None`` or a finite non-negative floating ``(E,)`` tensor on the same
    device.
    """
    if not isinstance(edge_index, Tensor):
        raise TypeError(
            f"{name}: edge_index must be a torch.Tensor, got {type(edge_index).__name__}"
        )
    if (
        edge_index.dtype.is_floating_point
        or edge_index.dtype.is_complex
        or edge_index.dtype == torch.bool
    ):
        raise TypeError(f"{name}: edge_index must have an integer dtype, got {edge_index.dtype}")
    if edge_index.ndim != 2 or edge_index.shape[0] != 2:
        raise ValueError(
            f"{name}: edge_index must have shape (2, E), got {tuple(edge_index.shape)}"
        )
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int):
        raise TypeError(f"{name}: num_nodes must be an int, got {type(num_nodes).__name__}")
    if num_nodes < 0:
        raise ValueError(f"{name}: num_nodes must be >= 0, got {num_nodes}")
    num_edges = edge_index.shape[1]
    if num_edges > 0:
        low, high = int(edge_index.min()), int(edge_index.max())
        if low < 0 or high >= num_nodes:
            raise ValueError(
                f"{name}: edge_index holds node {low if low < 0 else high}, outside "
                f"[0, num_nodes) = [0, {num_nodes})"
            )
    if edge_weight is not None:
        if not isinstance(edge_weight, Tensor) or not edge_weight.dtype.is_floating_point:
            raise TypeError(f"{name}: edge_weight must be a floating-point tensor")
        if edge_weight.shape != (num_edges,):
            raise ValueError(
                f"{name}: edge_weight must have shape (E,) = ({num_edges},), "
                f"got {tuple(edge_weight.shape)}"
            )
        if edge_weight.device != edge_index.device:
            raise ValueError(
                f"{name}: edge_weight is on {edge_weight.device} but edge_index on "
                f"{edge_index.device}"
            )
        if num_edges > 0:
            if not bool(torch.isfinite(edge_weight).all()):
                raise ValueError(f"{name}: edge_weight has non-finite entries (NaN or Inf)")
            if bool((edge_weight < 0).any()):
                raise ValueError(
                    f"{name}: edge_weight has negative entries; a graph Laplacian needs "
                    "non-negative weights"
                )


def _prepare(
    edge_index: Tensor,
    num_nodes: int,
    edge_weight: Tensor | None,
    dtype: torch.dtype,
    name: str,
) -> _Graph:
    """Check the inputs and return coalesced loop-free edges with their degrees."""
    check_graph_inputs(edge_index, num_nodes, edge_weight, name)
    if edge_weight is not None:
        weight = edge_weight.to(dtype)
    else:
        weight = torch.ones(edge_index.shape[1], dtype=dtype, device=edge_index.device)
    index, weight = remove_self_loops(edge_index.long(), weight)
    keys = index[0] * num_nodes + index[1]
    if not bool((keys[1:] > keys[:-1]).all()):  # PyG's batches usually come coalesced
        index, weight = coalesce(index, weight, num_nodes=num_nodes, reduce="sum")
    row, col = index[0], index[1]
    degree = torch.zeros(num_nodes, dtype=dtype, device=edge_index.device)
    degree.index_add_(0, row, weight)
    return _Graph(row, col, weight, num_nodes, degree)


def _check_undirected(graph: _Graph, name: str) -> None:
    """Raise unless every edge of nonzero weight has its reverse with the same weight (an
    edge of weight 0 connects nothing, as on the single-graph route's dense matrix)."""
    n, row, col, weight = graph.num_nodes, graph.row, graph.col, graph.weight
    present = weight != 0
    if not bool(present.all()):
        row, col, weight = row[present], col[present], weight[present]
    if row.numel() == 0:
        return
    # coalesced edges are sorted by (row, col); the reversed edges must sort the same way
    perm = torch.argsort(col * n + row)
    same = bool(torch.equal(row[perm], col)) and bool(torch.equal(col[perm], row))
    if not (same and _same_weights(weight[perm], weight)):
        raise _not_undirected(name)


def _same_weights(a: Tensor, b: Tensor) -> bool:
    """Equal up to the rounding of summed multi-edges (100 eps relative)."""
    tol = 100 * torch.finfo(a.dtype).eps
    return bool(torch.equal(a, b)) or bool(torch.allclose(a, b, rtol=tol, atol=0.0))


def needs_gradient(weight: Tensor) -> bool:
    """Whether autograd will differentiate the result in the weights."""
    return weight.requires_grad and torch.is_grad_enabled()


def dense_adjacency(
    edge_index: Tensor, num_nodes: int, edge_weight: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``row, col, weight, A`` of a checked graph, ``A[i, j]`` the sum of the weights
    (ones when ``edge_weight`` is ``None``) of the edges ``i -> j``, self-loops included:
    the dense routes for one small graph start from it."""
    row, col = edge_index.long()
    if edge_weight is None:
        weight = torch.ones(row.shape, dtype=dtype, device=edge_index.device)
    else:
        weight = edge_weight.to(dtype)
    a = torch.zeros(num_nodes, num_nodes, dtype=dtype, device=edge_index.device)
    return row, col, weight, a.index_put_((row, col), weight, accumulate=True)


def _not_undirected(name: str) -> ValueError:
    return ValueError(
        f"{name} needs an undirected graph: every edge (i, j) must come with (j, i) "
        "and the same weight (torch_geometric.utils.to_undirected makes a graph "
        "undirected)"
    )


def _dense_max_nodes(device: torch.device) -> int:
    """The largest graph ``method="auto"`` solves by dense ``eigh`` (exact).

    Measured for ``k = 16`` on the CPU: on one thread ``eigh`` and the Chebyshev solver
    cross at about 330 nodes (5.8 against 6.1 ms at 320 nodes, 8.6 against 6.5 ms at 384,
    on a Barabasi-Albert graph); on two, which ``eigh`` uses and the filter's small sparse
    products hardly do, at about 400 (6.6 against 7.3 ms at 384). At 1024 nodes ``eigh``
    takes 102 ms against 16 ms.
    """
    return 320 if device.type == "cpu" and torch.get_num_threads() == 1 else 384


def _inv_sqrt_degree(degree: Tensor) -> Tensor:
    """``d^-1/2`` where ``d > 0``, else ``0`` (the pseudo-inverse square root)."""
    positive = degree > 0
    return torch.where(positive, degree.clamp_min(torch.finfo(degree.dtype).tiny).rsqrt(), 0.0)


# ---------------------------------------------------------------------------------------
# laplacian
# ---------------------------------------------------------------------------------------


def laplacian(
    edge_index: Tensor,
    num_nodes: int,
    edge_weight: Tensor | None = None,
    normalization: Normalization = None,
) -> Tensor:
    """The graph Laplacian as a sparse COO tensor.

    ``None``: ``L = D - A``; ``"sym"``: ``I' - D^-1/2 A D^-1/2``; ``"rw"``:
    ``I' - D^-1 A``, where ``I'`` has ones at the nodes of positive degree and the
    inverses are pseudo-inverses (``0`` at isolated nodes, whose rows and columns are
    zero in every normalization). ``A[i, j]`` sums the weights of all edges ``i -> j``
    (multi-edges add up), self-loops are ignored (see the module notes) and ``d_i`` is
    the row sum of ``A``. For an undirected graph store each edge in both directions,
    as PyG does; directed input gives ``A`` as is (and a non-symmetric ``L``).

    The result is a coalesced COO tensor: it lives on any device, supports autograd
    with respect to ``edge_weight`` and ``L @ x``; call ``.to_sparse_csr()`` for faster
    repeated products on the CPU. Zero diagonal entries are not stored (an isolated node
    has no entry at all); an edge of weight 0 keeps its zero entry, through which the
    gradient reaches its weight.

    Args:
        edge_index: ``(2, E)`` integer node indices in ``[0, num_nodes)``.
        num_nodes: ``N``.
        edge_weight: ``(E,)`` finite non-negative weights; ones if ``None``.
        normalization: ``None`` (default), ``"sym"`` or ``"rw"``.

    Returns:
        Sparse COO ``(N, N)`` in the dtype of ``edge_weight`` (else the default dtype), on
        the device of ``edge_index``.

    Example:
        >>> edge_index = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
        >>> laplacian(edge_index, 3).to_dense()
        tensor([[ 1., -1.,  0.],
                [-1.,  2., -1.],
                [ 0., -1.,  1.]])
    """
    if normalization not in _NORMALIZATIONS:
        raise ValueError(
            f"laplacian: normalization must be None, 'sym' or 'rw', got {normalization!r}"
        )
    dtype = _resolve_dtype(edge_weight, None, "laplacian")
    graph = _prepare(edge_index, num_nodes, edge_weight, dtype, "laplacian")
    row, col, w, d = graph.row, graph.col, graph.weight, graph.degree
    nodes = torch.arange(num_nodes, device=row.device)
    if normalization is None:
        off, diag = -w, d
    else:
        inv = _inv_sqrt_degree(d) if normalization == "sym" else _inv_sqrt_degree(d) ** 2
        off = -w * inv[row] * (inv[col] if normalization == "sym" else 1.0)
        diag = (d > 0).to(dtype)
    keep = diag != 0
    index = torch.cat([torch.stack([row, col]), torch.stack([nodes[keep], nodes[keep]])], 1)
    values = torch.cat([off, diag[keep]])
    return torch.sparse_coo_tensor(
        index, values, (num_nodes, num_nodes), check_invariants=False
    ).coalesce()


# ---------------------------------------------------------------------------------------
# Connected components and the null space
# ---------------------------------------------------------------------------------------


def _component_roots(row: Tensor, col: Tensor, num_nodes: int) -> Tensor:
    """For each node, the smallest node index in its connected component.

    On the CPU: :func:`_host_component_roots` for small graphs (at most
    ``_UNION_FIND_MAX_EDGES`` edges) and large ones (more than ``_SCIPY_MIN_EDGES``). In
    between, and on other devices, hooking and pointer jumping (Shiloach-Vishkin style,
    ``O(log N)`` rounds of scatters in practice). Edges are read as undirected.
    """
    device = row.device
    if num_nodes == 0 or row.numel() == 0:
        return torch.arange(num_nodes, device=device)
    if device.type == "cpu" and not _UNION_FIND_MAX_EDGES < row.numel() <= _SCIPY_MIN_EDGES:
        return torch.from_numpy(_host_component_roots(row.numpy(), col.numpy(), num_nodes))
    return _component_roots_torch(row, col, num_nodes)


def _host_component_roots(row: np.ndarray, col: np.ndarray, num_nodes: int) -> np.ndarray:
    """:func:`_component_roots` in NumPy: union-find with path halving for at most
    ``_UNION_FIND_MAX_EDGES`` edges, SciPy's ``connected_components`` above (below,
    building SciPy's matrix costs more than the search).

    A union hangs the larger root under the smaller, so every node's parent is at most
    the node itself and a root is its set's least node; then one pass in node order
    finds every root."""
    if row.size > _UNION_FIND_MAX_EDGES:
        import scipy.sparse as sp
        from scipy.sparse.csgraph import connected_components

        ones = np.ones(row.size, dtype=np.int8)
        graph = sp.csr_matrix((ones, (row, col)), shape=(num_nodes, num_nodes))
        _, labels = connected_components(graph, directed=False)
        roots = np.full(int(labels.max()) + 1, num_nodes)
        np.minimum.at(roots, labels, np.arange(num_nodes))
        return roots[labels]
    parent = list(range(num_nodes))
    for i, j in zip(row.tolist(), col.tolist(), strict=True):
        while parent[i] != i:
            parent[i] = i = parent[parent[i]]
        while parent[j] != j:
            parent[j] = j = parent[parent[j]]
        if i < j:
            parent[j] = i
        elif j < i:
            parent[i] = j
    for i in range(num_nodes):
        parent[i] = parent[parent[i]]  # the parent's root, already found
    return np.array(parent, dtype=np.int64)


def _component_roots_torch(row: Tensor, col: Tensor, num_nodes: int) -> Tensor:
    """Device-side :func:`_component_roots`: hooking to the smaller label, then jumping."""
    src = torch.cat([row, col])
    dst = torch.cat([col, row])
    labels = torch.arange(num_nodes, device=row.device)
    while True:
        neighbour = labels[dst]
        new = labels.scatter_reduce(0, src, neighbour, reduce="amin")
        # hook the whole tree of each endpoint, not just the endpoint
        new = new.scatter_reduce(0, labels[src], neighbour, reduce="amin")
        while True:
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, labels):
            return labels
        labels = new


def _connecting_edges(row: Tensor, col: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """The edges that connect their endpoints: those of positive weight. An edge of weight
    0 adds nothing to ``L``, so counting it would merge two components of the graph
    whose null vectors stay separate (a zero eigenvalue would pass as non-trivial)."""
    if weight is None or bool((weight > 0).all()):
        return row, col
    positive = weight > 0
    return row[positive], col[positive]


class _Components(NamedTuple):
    """Per-node component data, numbered within each graph."""

    local: Tensor  # (N,) component index within its graph, ordered by smallest node
    count: Tensor  # (B,) components per graph
    null_weights: Tensor  # (N,) entries of the unit null vectors of the symmetric problem


def _components(
    row: Tensor,
    col: Tensor,
    weight: Tensor | None,
    degree: Tensor,
    normalization: Normalization,
    ptr: Tensor | None = None,
    batch: Tensor | None = None,
) -> _Components:
    """The components of one graph (``ptr`` ``None``) or of each graph of a batch, from
    the edges of positive weight (``weight`` ``None``: all of them)."""
    n = degree.numel()
    roots = _component_roots(*_connecting_edges(row, col, weight), n)
    nodes = torch.arange(n, device=roots.device)
    is_root = roots == nodes
    rank = torch.cumsum(is_root, 0) - 1  # global rank of each root
    if ptr is None:
        local, count = rank[roots], rank[-1:] + 1
    else:
        first = rank[ptr[:-1].clamp_max(max(n - 1, 0))] if n > 0 else ptr[:-1]
        local = rank[roots] - first[batch] if n > 0 else nodes
        count = torch.zeros(ptr.numel() - 1, dtype=torch.long, device=roots.device)
        count.index_add_(0, batch, is_root.long())
    return _Components(local, count, _unit_null_vectors(degree, roots, normalization))


def _unit_null_vectors(degree: Tensor, groups: Tensor, normalization: Normalization) -> Tensor:
    """The entries of the unit null vectors of the symmetric problem: ``D~^1/2 1_C`` (sym
    and rw; isolated nodes count ``d = 1``) or ``1_C`` (None), normalized over each
    component ``C``, the nodes of one value of ``groups`` (values in ``[0, n)``)."""
    if normalization is None:
        u = torch.ones_like(degree)
    else:
        u = torch.where(degree > 0, degree, 1.0).sqrt()
    mass = torch.zeros_like(u).index_add_(0, groups, u * u)
    return u / mass[groups].sqrt()


# torch's CUDA eigh solves a batch of matrices of at most 32 rows in one call (cuSOLVER's
# batched Jacobi) and larger ones one matrix at a time: on an H100, 100 matrices of 33-40
# rows took 68-72 ms there, 11-13 ms on the host's 16 threads, and 0.3 ms at 32 rows.
_CUDA_BATCHED_EIGH_MAX_ROWS = 32


def _eigh_on_host(device: torch.device, count: int, rows: int) -> bool:
    """Whether ``count`` symmetric ``rows x rows`` matrices on ``device`` are solved faster
    on the host: a batch that CUDA would solve one matrix at a time."""
    return device.type == "cuda" and count > 1 and rows > _CUDA_BATCHED_EIGH_MAX_ROWS


def _batched_eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`torch.linalg.eigh` of ``(b, s, s)`` matrices, on the host where
    :func:`_eigh_on_host` says so (differentiable either way)."""
    if _eigh_on_host(m.device, m.shape[0], m.shape[-1]):
        values, vectors = torch.linalg.eigh(m.cpu())
        return values.to(m.device), vectors.to(m.device)
    return torch.linalg.eigh(m)


def _deflated_eigh(
    m: Tensor, labels: Tensor, weights: Tensor, count: Tensor, bound: Tensor
) -> tuple[Tensor, Tensor]:
    """``eigh`` of ``M + sum_j s_j z_j z_j^T`` for ``(b, s, s)`` matrices, ``z_j`` the unit
    null vector of component ``j`` of each graph (``labels``, ``weights``: ``(b, s)``;
    ``count`` ``(b,)`` components per graph) and ``s_j = bound + 1 + j / count``: the null
    space moves above the spectrum (``bound`` ``(b,)`` bounds it), so the non-null pairs
    come first, exactly.

    The shifts are distinct: with one shift for all, ``eigh``'s backward divided by the
    zero gaps between the null copies (0 / 0, NaN gradients on every graph of two or more
    components, although only non-null pairs are used). They stay below ``bound + 2``,
    so the matrix's norm does not grow with the number of components (shifts
    ``bound + 1 + j`` made the float32 eigenvalues of a graph of 101 components 5x less
    accurate).
    """
    dtype = m.dtype
    shift = bound[:, None] + 1.0 + labels.to(dtype) / count.to(dtype)[:, None]
    scaled = weights * shift.sqrt()
    width = int(count.max())
    z = (labels[:, :, None] == torch.arange(width, device=m.device)) * scaled[:, :, None]
    # not baddbmm: its fused multiply-add rounds differently from the one-graph route's
    # m + z @ z.T (each entry of z z^T is one product: a row of z has one non-zero), and
    # a repeated eigenvalue's basis follows the last bit of the matrix
    return _batched_eigh(m + z @ z.mT)


# ---------------------------------------------------------------------------------------
# laplacian_eigs
# ---------------------------------------------------------------------------------------


def laplacian_eigs(
    edge_index: Tensor,
    num_nodes: int,
    k: int,
    normalization: Normalization = "sym",
    method: Method = "auto",
    batch: Tensor | None = None,
    *,
    edge_weight: Tensor | None = None,
    skip_null_space: bool = False,
    tol: float | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    max_iter: int | None = None,
    num_graphs: int | None = None,
) -> LaplacianEigs:
    """The ``k`` smallest eigenpairs of the Laplacian of one graph or of each graph in a batch.

    **Many small graphs** (``batch`` given, PyG style): the graphs are grouped by size and
    each group is solved by one batched dense :func:`torch.linalg.eigh` on the device of
    the inputs (on CUDA, groups of more than 32 nodes go to the host: CUDA's ``eigh``
    solves those one matrix at a time, several times slower). **One large graph**: an
    iterative solver with tolerance ``tol``:

    * ``"chebyshev"``: Chebyshev-filtered subspace iteration (Zhou & Saad, 2007) on the
      input device, with ``k + max(8, k // 2)`` vectors so that clustered eigenvalues (the
      bottom of the spectrum of large small-world graphs) converge at the rate of their
      gap to the guard vectors; float32 filtering over cache-sized column blocks,
      float64 Rayleigh-Ritz.
    * ``"shift_invert"``: ARPACK (SciPy, CPU) on ``(L - sigma I)^-1`` through a sparse
      LU; the fastest on mesh-like graphs (grids, meshes, road networks), whose wanted
      eigenvalues are tiny, and very slow on small-world graphs, whose LU factors fill in.
    * ``"arpack"``: plain ARPACK Lanczos (SciPy, CPU) with a start vector from
      ``generator`` and ``ncv = max(2k + 1, k + 32)``.

      Lanczos from one start vector sees one direction of each eigenspace and can miss
      copies of a repeated eigenvalue; both ARPACK methods check their result with one
      more run for the smallest eigenvalue outside the span of what they found, and when
      it lies below the ``k``-th, solve again by block LOBPCG (preconditioned by the LU
      with ``"shift_invert"``).
    * ``"lobpcg"``: block LOBPCG on the input device (no preconditioner).
    * ``"auto"``: dense for graphs of at most 384 nodes (320 on one CPU thread); larger
      graphs use ``"shift_invert"`` on the CPU when a breadth-first search finds the
      graph mesh-like (more than ``4 log2 N + 10`` hops across), and ``"chebyshev"``
      otherwise and on every other device.

    The SciPy methods run on the CPU by nature (the graph is copied there and the results
    back); all other work stays on the device of ``edge_index``. Graphs too small for
    the block methods (fewer non-null eigenpairs than twice the block) are solved exactly
    by dense ``eigh`` whatever the method.

    **Gradients.** The dense path is differentiable with respect to ``edge_weight``
    (through ``eigh``: the eigenvalues, and the eigenvectors of distinct eigenvalues).
    The iterative solvers are not: with an ``edge_weight`` that requires a gradient
    (under grad mode), a graph that would go to one raises ``NotImplementedError``.

    **The null space.** The eigenvalue 0 has one eigenvector per connected component (an
    isolated node is a component; an edge of weight 0 connects nothing). Its
    multiplicity is computed combinatorially (``num_components``) and the null space is
    deflated exactly in every solver. Its eigenvectors are returned in a fixed basis: one
    per component, ordered by the smallest node index of the component, ``D^1/2 1_C``
    (sym), ``1_C`` (None) or the constant ``1_C`` (rw), normalized. With
    ``skip_null_space=True`` they are left out and the ``k`` smallest non-zero eigenpairs
    are returned.

    Args:
        edge_index: ``(2, E)``; the graph must be undirected (each edge in both
            directions, with the same weight).
        num_nodes: ``N`` (all graphs together when ``batch`` is given).
        k: eigenpairs per graph, ``k >= 0``. A graph with fewer than ``k`` to give is
            padded (see ``mask``).
        normalization: ``"sym"`` (default), ``None`` or ``"rw"``. ``"rw"`` has the
            eigenvalues of ``"sym"`` and the eigenvectors ``D^-1/2 v``.
        method: ``"auto"`` (default), ``"dense"``, ``"chebyshev"``, ``"lobpcg"``,
            ``"arpack"`` or ``"shift_invert"``.
        batch: ``(N,)`` sorted graph index of each node
            (``torch_geometric.data.Batch.batch``); edges must not cross graphs.
        edge_weight: ``(E,)`` finite non-negative weights.
        skip_null_space: leave out the eigenvalue-0 eigenpairs.
        tol: iterative methods stop when ``||L v - lambda v|| <= tol * ||L||_bound`` for
            all ``k`` pairs, with ``||L||_bound = 2`` for the normalized Laplacians and
            ``2 max_i d_i`` for ``L``. Default ``1e-6``; below it the Chebyshev filter
            runs in float64. The dense path is exact to rounding.
        generator: draws the start vectors of the iterative methods; ``None`` uses a
            fixed seed, so results are reproducible either way.
        dtype: of the results; ``None`` (default): that of ``edge_weight``, else the
            default dtype. The dense path computes in it; the iterative ones in float64
            from the weights as given (filters in float32).
        max_iter: iteration cap of the iterative methods (in their own unit), ``>= 1``; a
            ``RuntimeWarning`` reports a solver that stops before ``tol`` (the block
            solvers return their last Ritz pairs).
        num_graphs: ``B`` with ``batch`` (default ``batch.max() + 1``; larger values add
            empty graphs at the end, as in a PyG ``Batch`` whose last graphs have no
            nodes).

    Returns:
        :class:`LaplacianEigs` ``(eigenvalues, eigenvectors, mask, residuals,
        num_components)``.

    Shapes:
        See :class:`LaplacianEigs`: ``(k,)`` per-graph fields for one graph, ``(B, k)``
        with ``batch``; eigenvectors ``(N, k)``.

    Example:
        A 4-cycle has the normalized spectrum ``0, 1, 1, 2``:

        >>> ring = torch.tensor([[0, 1, 2, 3, 1, 2, 3, 0], [1, 2, 3, 0, 0, 1, 2, 3]])
        >>> eig = laplacian_eigs(ring, 4, k=4, dtype=torch.float64)
        >>> eig.eigenvalues.round(decimals=8)
        tensor([0., 1., 1., 2.], dtype=torch.float64)
    """
    name = "laplacian_eigs"
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name}: k must be an int, got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"{name}: k must be >= 0, got {k}")
    if normalization not in _NORMALIZATIONS:
        raise ValueError(
            f"{name}: normalization must be None, 'sym' or 'rw', got {normalization!r}"
        )
    if method not in _METHODS:
        raise ValueError(f"{name}: method must be one of {_METHODS}, got {method!r}")
    if tol is None:
        tol = _DEFAULT_TOL
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"{name}: tol must be a positive finite number, got {tol!r}")
    if max_iter is not None and (
        isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1
    ):
        raise ValueError(f"{name}: max_iter must be None or an int >= 1, got {max_iter!r}")
    dtype = _resolve_dtype(edge_weight, dtype, name)
    dense_max = _dense_max_nodes(edge_index.device)
    dense = method == "dense" or (method == "auto" and num_nodes <= dense_max)
    one_host_graph = edge_index.device.type == "cpu" and not (
        edge_weight is not None and needs_gradient(edge_weight)
    )
    if batch is None and dense and k > 0 and num_nodes > 0 and one_host_graph:
        return _one_dense_graph(
            edge_index, num_nodes, edge_weight, k, normalization, skip_null_space, dtype, name
        )
    graph = _prepare(edge_index, num_nodes, edge_weight, dtype, name)
    _check_undirected(graph, name)
    device = edge_index.device
    single = batch is None
    batch, ptr = _check_batch(batch, num_nodes, graph, device, name, num_graphs)
    num_graphs = ptr.numel() - 1
    comps = _components(graph.row, graph.col, graph.weight, graph.degree, normalization, ptr, batch)

    values = torch.zeros(num_graphs, k, dtype=dtype, device=device)
    vectors = torch.zeros(num_nodes, k, dtype=dtype, device=device)
    mask = torch.zeros(num_graphs, k, dtype=torch.bool, device=device)
    residuals = torch.zeros(num_graphs, k, dtype=dtype, device=device)
    if k > 0 and num_nodes > 0:
        sizes = ptr[1:] - ptr[:-1]
        count = comps.count
        want = torch.minimum(
            torch.full_like(count, k) if skip_null_space else (k - count).clamp_min(0),
            sizes - count,
        )
        dense = _dense_mask(method, sizes, count, want, dense_max)
        if needs_gradient(graph.weight) and not bool(dense.all()):
            raise NotImplementedError(
                f"{name}: gradients with respect to edge_weight flow through dense eigh "
                "only, and a graph here goes to an iterative solver; pass method='dense', "
                "or edge_weight.detach() (or run under torch.no_grad()) for values alone"
            )
        out = (values, vectors, mask, residuals)
        chosen = torch.nonzero(dense).squeeze(1)
        if chosen.numel() > 0:
            _dense_eigs(graph, ptr, batch, comps, chosen, k, normalization, skip_null_space, out)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        for g in torch.nonzero(~dense).squeeze(1).tolist():
            _sparse_eigs(
                graph,
                ptr,
                batch,
                comps,
                g,
                k,
                normalization,
                skip_null_space,
                method,
                tol,
                gen,
                max_iter,
                out,
            )
    if single:
        return LaplacianEigs(values[0], vectors, mask[0], residuals[0], comps.count[0])
    return LaplacianEigs(values, vectors, mask, residuals, comps.count)


def _one_dense_graph(
    edge_index: Tensor,
    num_nodes: int,
    edge_weight: Tensor | None,
    k: int,
    normalization: Normalization,
    skip: bool,
    dtype: torch.dtype,
    name: str,
) -> LaplacianEigs:
    """:func:`laplacian_eigs` of one graph on the CPU by dense ``eigh``, in NumPy: the route
    of a transform applied graph by graph (a data set's ``transform=``), without gradients.

    The batched route's edge-list steps (coalescing, the sorted symmetry check, size
    groups, gathers) cost several times the ``eigh`` of a molecule, and so do the ~100
    small torch ops of the same work done densely (2-7 us each, against under 1 us in
    NumPy). Here the adjacency is assembled densely on the host, the symmetry check,
    degrees, components and matrix come from it, and the results are cut by slices. The
    matrix and its null-space deflation are the batched route's (a test holds the two
    routes to each other).
    """
    check_graph_inputs(edge_index, num_nodes, edge_weight, name)
    n, real = num_nodes, np.float32 if dtype == torch.float32 else np.float64
    row, col = edge_index.numpy().astype(np.int64)
    flat = row * n + col
    if edge_weight is None:
        a, connecting = np.bincount(flat, minlength=n * n), (row, col)
    else:
        weight = edge_weight.detach().numpy()
        a, positive = np.bincount(flat, weights=weight, minlength=n * n), weight > 0
        connecting = (row[positive], col[positive])
    a = a.reshape(n, n).astype(real)
    np.fill_diagonal(a, 0)  # self-loops are ignored
    tol = 100 * np.finfo(real).eps  # _same_weights
    if not (np.array_equal(a, a.T) or np.allclose(a, a.T, rtol=tol, atol=0.0)):
        raise _not_undirected(name)
    degree = a.sum(1)
    # components, numbered by their least node, and their unit null vectors
    roots = _host_component_roots(*connecting, n)
    rank = np.cumsum(roots == np.arange(n)) - 1
    labels, c = rank[roots], int(rank[-1]) + 1
    root = np.sqrt(np.where(degree > 0, degree, 1))  # D~^1/2, isolated nodes counting 1
    u = np.ones(n, real) if normalization is None else root
    mass = np.zeros(n, real)
    np.add.at(mass, roots, u * u)  # index_add_'s order: the batched route's rounding
    null = u / np.sqrt(mass[roots])
    if normalization is None:
        m = np.diag(degree) - a
        bound = 2.0 * max(float(degree.max()), 0.5)
    else:
        inv = np.divide(1.0, np.sqrt(degree), out=np.zeros_like(degree), where=degree > 0)
        m = a * -inv[:, None] * inv
        m[np.diag_indices(n)] += degree > 0
        bound = 2.0
    shift = real(bound + 1.0) + labels.astype(real) / real(c)  # _deflated_eigh's, op for op
    z = (labels[:, None] == np.arange(c)) * (null * np.sqrt(shift))[:, None]
    # _deflated_eigh (the null space moves up), solved by torch's eigh: the batched
    # route's LAPACK on the same matrix, bit for bit, so a repeated eigenvalue gets the
    # same basis graph by graph as in a batch (NumPy's LAPACK gave another one)
    theta, v = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(m + z @ z.T)))
    # _assemble's work by slices: null vectors (unless skipped), non-null pairs, padding
    nulls = 0 if skip else min(c, k)
    last = nulls + min(k - nulls, n - c)
    values = np.zeros(k, real)
    values[nulls:last] = theta[: last - nulls]
    vectors = np.zeros((n, k), real)
    vectors[:, nulls:last] = v[:, : last - nulls]
    vectors[:, :nulls] = (labels[:, None] == np.arange(nulls)) * null[:, None]
    residual = m @ vectors - vectors * values
    if normalization == "rw":
        scale = 1.0 / root[:, None]  # as the batched route: a product with rsqrt
        vectors, residual = vectors * scale, residual * scale
    norms = np.maximum(np.linalg.norm(vectors, axis=0), np.finfo(real).tiny)
    residuals = np.linalg.norm(residual, axis=0) / norms  # padding: 0
    return LaplacianEigs(
        torch.from_numpy(values),
        torch.from_numpy(vectors),
        torch.arange(k) < last,
        torch.from_numpy(residuals),
        torch.tensor(c),
    )


def _check_batch(
    batch: Tensor | None,
    num_nodes: int,
    graph: _Graph,
    device: torch.device,
    name: str,
    num_graphs: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The batch vector (all zeros for one graph) and the ``ptr`` offsets of the graphs."""
    if batch is None:
        ptr = torch.tensor([0, num_nodes], device=device)
        return torch.zeros(num_nodes, dtype=torch.long, device=device), ptr
    if not isinstance(batch, Tensor) or batch.dtype.is_floating_point or batch.dtype == torch.bool:
        raise TypeError(f"{name}: batch must be an integer tensor")
    if batch.shape != (num_nodes,):
        raise ValueError(
            f"{name}: batch must have shape (num_nodes,) = ({num_nodes},), got {tuple(batch.shape)}"
        )
    batch = batch.to(device=device, dtype=torch.long)
    least = int(batch[-1]) + 1 if num_nodes > 0 else 0
    if num_graphs is None:
        num_graphs = least
    if isinstance(num_graphs, bool) or not isinstance(num_graphs, int) or num_graphs < least:
        raise ValueError(f"{name}: num_graphs must be an int >= batch.max() + 1 = {least}")
    if num_nodes > 0 and (bool((batch[1:] < batch[:-1]).any()) or int(batch[0]) < 0):
        raise ValueError(f"{name}: batch must be sorted and non-negative (PyG's Batch.batch is)")
    ptr = row_pointers(batch, num_graphs)
    if graph.row.numel() > 0 and not bool(torch.equal(batch[graph.row], batch[graph.col])):
        raise ValueError(f"{name}: an edge connects two different graphs of the batch")
    return batch, ptr


def _dense_mask(method: str, sizes: Tensor, count: Tensor, want: Tensor, dense_max: int) -> Tensor:
    """Which graphs go to the dense path: all with ``method="dense"``; those with nothing
    to solve; those too small for a block method (fewer non-null pairs than twice the
    block); and with ``"auto"`` those of at most ``dense_max`` nodes."""
    if method == "dense":
        return torch.ones_like(sizes, dtype=torch.bool)
    free = sizes - count
    block = want + (want // 2).clamp_min(8)
    dense = (want == 0) | (free < 2 * block)
    if method == "auto":
        dense |= sizes <= dense_max
    return dense


def _gather_graphs(ptr: Tensor, graphs: Tensor, size: int) -> Tensor:
    """``(b, size)`` node indices of same-size graphs."""
    return ptr[graphs][:, None] + torch.arange(size, device=ptr.device)


def _size_groups(
    row: Tensor, ptr: Tensor, sizes: Tensor, chosen: Tensor
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """The ``chosen`` graphs grouped by size: ``(size, members, edges)`` per size, with
    ``edges`` the positions of the members' edges.

    The edges of each graph are contiguous (sorted by row, graphs by node range): they
    are listed graph by graph with the graphs ordered by size, without sorting the edges.
    """
    device = row.device
    edge_ptr = torch.searchsorted(row, ptr)
    group_sizes = sizes[chosen]
    by_size = chosen[torch.argsort(group_sizes, stable=True)]
    counts = edge_ptr[by_size + 1] - edge_ptr[by_size]
    offsets = torch.cumsum(counts, 0) - counts
    order = torch.arange(int(counts.sum()), device=device) - torch.repeat_interleave(
        offsets - edge_ptr[by_size], counts
    )
    edge_bounds = torch.cat([offsets.new_zeros(1), torch.cumsum(counts, 0)])
    sorted_sizes = sizes[by_size]
    for size in torch.unique(group_sizes).tolist():
        if size == 0:
            continue
        lo, hi = (
            int(i)
            for i in torch.searchsorted(sorted_sizes, torch.tensor([size, size + 1], device=device))
        )
        yield size, by_size[lo:hi], order[int(edge_bounds[lo]) : int(edge_bounds[hi])]


def _dense_eigs(
    graph: _Graph,
    ptr: Tensor,
    batch: Tensor,
    comps: _Components,
    chosen: Tensor,
    k: int,
    normalization: Normalization,
    skip: bool,
    out: tuple[Tensor, Tensor, Tensor, Tensor],
) -> None:
    """One batched ``eigh`` per group of same-size graphs; writes into ``out``.

    Each graph's symmetric matrix is assembled densely from its (normalized) edges; its
    null space, spanned by the known component vectors, is moved above the spectrum
    (:func:`_deflated_eigh`) so that the non-null pairs come first in
    ``eigh``'s ascending order, exactly.
    """
    device, dtype = graph.degree.device, graph.degree.dtype
    row, col, degree = graph.row, graph.col, graph.degree
    sizes = ptr[1:] - ptr[:-1]
    if normalization is None:
        off, diagonal = -graph.weight, degree
    else:
        inv = _inv_sqrt_degree(degree)
        off, diagonal = -graph.weight * inv[row] * inv[col], (degree > 0).to(dtype)
    slot = torch.full((sizes.numel(),), -1, dtype=torch.long, device=device)
    for size, members, edges in _size_groups(row, ptr, sizes, chosen):
        b = members.numel()
        slot[members] = torch.arange(b, device=device)
        g = batch[row[edges]]
        first = ptr[g]
        flat = (slot[g] * size + (row[edges] - first)) * size + (col[edges] - first)
        values = off[edges]
        nodes = _gather_graphs(ptr, members, size)  # (b, s)
        m = torch.zeros(b * size * size, dtype=dtype, device=device)
        m = m.index_add_(0, flat, values).view(b, size, size)
        m.diagonal(dim1=1, dim2=2).add_(diagonal[nodes])
        if normalization is None:
            bound = 2.0 * degree[nodes].amax(1).clamp_min(0.5)
        else:
            bound = torch.full((b,), 2.0, dtype=dtype, device=device)
        labels = comps.local[nodes]
        weights = comps.null_weights[nodes]
        count = comps.count[members]
        theta, v = _deflated_eigh(m, labels, weights, count, bound)
        _assemble(
            theta,
            v,
            size - count,
            labels,
            weights,
            count,
            m.__matmul__,
            degree[nodes],
            k,
            normalization,
            skip,
            members,
            nodes.reshape(-1),
            out,
        )


def _sparse_eigs(
    graph: _Graph,
    ptr: Tensor,
    batch: Tensor,
    comps: _Components,
    g: int,
    k: int,
    normalization: Normalization,
    skip: bool,
    method: str,
    tol: float,
    generator: torch.Generator,
    max_iter: int | None,
    out: tuple[Tensor, Tensor, Tensor, Tensor],
) -> None:
    """An iterative solve of graph ``g``; writes into ``out``."""
    device, dtype = graph.degree.device, graph.degree.dtype
    start, stop = int(ptr[g]), int(ptr[g + 1])
    n = stop - start
    if ptr.numel() > 2:
        lo = torch.searchsorted(graph.row, torch.tensor([start, stop], device=device))
        row = graph.row[lo[0] : lo[1]] - start
        col = graph.col[lo[0] : lo[1]] - start
        w = graph.weight[lo[0] : lo[1]]
    else:
        row, col, w = graph.row, graph.col, graph.weight
    degree = graph.degree[start:stop]
    labels = comps.local[start:stop]
    c = int(comps.count[g])
    nev = min(k if skip else max(k - c, 0), n - c)
    # isolated nodes have zero rows and columns: they are their own null vectors and are
    # left out of the iterative problem
    kept = torch.nonzero(degree > 0).squeeze(1)
    if kept.numel() < n:
        remap = torch.full((n,), -1, dtype=torch.long, device=device)
        remap[kept] = torch.arange(kept.numel(), device=device)
        row, col = remap[row], remap[col]
        # a node of degree 0 can still have edges, of weight 0: they go with it
        inside = (row >= 0) & (col >= 0)
        row, col, w = row[inside], col[inside], w[inside]
    # the problem is built in float64 from the weights as given: built in float32 (for
    # float32 weights), its values, degrees and null vectors were rounded, and the solvers
    # stalled at residuals of ~6e-9 of the float64 problem (tol=1e-9 was out of reach)
    w = w.to(torch.float64)
    sub_degree = torch.zeros(kept.numel(), dtype=torch.float64, device=device)
    sub_degree.index_add_(0, row, w)
    sub_labels = torch.unique(labels[kept], return_inverse=True)[1]
    sub_c = int(sub_labels.max()) + 1 if kept.numel() > 0 else 0
    null_weights = _unit_null_vectors(sub_degree, sub_labels, normalization)
    if normalization is None:
        off, diag = -w, sub_degree
        bound = 2.0 * max(float(sub_degree.max()), 0.5)
    else:
        inv = _inv_sqrt_degree(sub_degree)
        off, diag = -w * inv[row] * inv[col], torch.ones_like(sub_degree)
        bound = 2.0
    problem = SymmetricProblem.build(row, col, off, diag, bound, sub_labels, null_weights, sub_c)
    result = _solve(problem, nev, method, tol, generator, max_iter)
    v = torch.zeros(1, n, nev, dtype=dtype, device=device)
    v[0, kept] = result.eigenvectors.to(dtype)
    theta = result.eigenvalues.to(dtype)[None]

    def apply(u: Tensor) -> Tensor:
        mu = torch.zeros(u.shape, dtype=torch.float64, device=device)
        mu[0, kept] = problem.matmul(u[0, kept].to(torch.float64), 64)
        return mu.to(u.dtype)

    members = torch.tensor([g], device=device)
    available = torch.tensor([nev], device=device)
    _assemble(
        theta,
        v,
        available,
        labels[None],
        comps.null_weights[None, start:stop],
        comps.count[members],
        apply,
        degree[None],
        k,
        normalization,
        skip,
        members,
        slice(start, stop),
        out,
    )


def _solve(
    problem: SymmetricProblem,
    nev: int,
    method: str,
    tol: float,
    generator: torch.Generator,
    max_iter: int | None,
) -> SolverResult:
    if method == "auto":
        mesh = problem.device.type == "cpu" and looks_mesh_like(problem)
        method = "shift_invert" if mesh else "chebyshev"
    if method == "chebyshev":
        filter_dtype = torch.float32 if tol >= _DEFAULT_TOL else torch.float64
        return chebyshev_eigs(
            problem,
            nev,
            tol=tol,
            generator=generator,
            filter_dtype=filter_dtype,
            max_iter=max_iter or 500,
        )
    if method == "lobpcg":
        return lobpcg_eigs(problem, nev, tol=tol, generator=generator, max_iter=max_iter or 2000)
    if method == "arpack":
        return arpack_eigs(problem, nev, tol=tol, generator=generator, max_iter=max_iter)
    return shift_invert_eigs(problem, nev, tol=tol, generator=generator, max_iter=max_iter)


def _assemble(
    theta: Tensor,
    v: Tensor,
    available: Tensor,
    labels: Tensor,
    weights: Tensor,
    count: Tensor,
    apply: Callable[[Tensor], Tensor],
    degree: Tensor,
    k: int,
    normalization: Normalization,
    skip: bool,
    members: Tensor,
    rows: Tensor | slice,
    out: tuple[Tensor, Tensor, Tensor, Tensor],
) -> None:
    """Put null vectors and non-null eigenpairs in order, pad, transform, write ``out``.

    ``theta`` ``(b, r)`` and ``v`` ``(b, s, r)`` hold the non-null pairs of the
    symmetric problem (the first ``available`` of each graph are real); ``apply``
    multiplies ``(b, s, k)`` vectors by the symmetric matrix of each graph; ``rows`` are
    the ``b * s`` rows of the graphs' nodes in ``out``'s eigenvectors.
    """
    values, vectors, mask, residuals = out
    b, s, r = v.shape
    j = torch.arange(k, device=theta.device)
    src = j.expand(b, k) if skip else j - count[:, None]
    valid = (src >= 0) & (src < available[:, None])  # the non-null pairs
    src = src.clamp(0, max(r - 1, 0))
    zero = torch.zeros((), dtype=theta.dtype, device=theta.device)
    if r > 0:
        lam = torch.where(valid, theta.gather(1, src), zero)
        u = torch.where(valid[:, None, :], v.gather(2, src[:, None, :].expand(b, s, k)), zero)
    else:
        lam = torch.zeros(b, k, dtype=theta.dtype, device=theta.device)
        u = torch.zeros(b, s, k, dtype=theta.dtype, device=theta.device)
    if not skip:  # the null vectors first
        is_null = j < count[:, None]
        null_vectors = (labels[:, :, None] == j) * weights[:, :, None]
        u = torch.where(is_null[:, None, :], null_vectors, u)
        valid = valid | is_null
    r_vec = apply(u) - u * lam[:, None, :]
    if normalization == "rw":
        scale = torch.where(degree > 0, degree, 1.0).rsqrt()[:, :, None]
        u, r_vec = u * scale, r_vec * scale
    norm = (u * u).sum(1).sqrt()
    res = (r_vec * r_vec).sum(1).sqrt() / torch.where(valid, norm, 1.0)
    values[members] = lam
    mask[members] = valid
    residuals[members] = torch.where(valid, res, zero)
    vectors[rows] = u.reshape(b * s, k)
