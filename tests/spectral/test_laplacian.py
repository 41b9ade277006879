"""Laplacians and laplacian_eigs against dense definitions and dense eigh (float64)."""

from __future__ import annotations

import doctest
import itertools
import math
import sys
import warnings

import pytest
import torch
from torch_geometric.utils import get_laplacian, remove_self_loops, to_undirected

import torsion.spectral._eigensolvers as eigensolvers
import torsion.spectral._laplacian as laplacian_module
from torsion.spectral import LaplacianEigs, laplacian, laplacian_eigs
from torsion.spectral._laplacian import _component_roots, _component_roots_torch

F64 = torch.float64
METHODS = ("chebyshev", "lobpcg", "arpack", "shift_invert")


# ---------------------------------------------------------------------------------------
# Graphs and dense oracles
# ---------------------------------------------------------------------------------------


def random_graph(n: int, m: int, generator: torch.Generator, offset: int = 0) -> torch.Tensor:
    """An undirected random graph with ``m`` random edges (multi-edges and loops dropped)."""
    edges = torch.randint(0, n, (2, m), generator=generator)
    edges, _ = remove_self_loops(edges)
    return to_undirected(edges, num_nodes=n) + offset


def connected_random_graph(n: int, extra: int, generator: torch.Generator) -> torch.Tensor:
    """A random tree plus ``extra`` random edges: connected, with distinct eigenvalues."""
    parents = (torch.rand(n - 1, generator=generator) * torch.arange(1, n)).long()
    tree = torch.stack([torch.arange(1, n), parents])
    more = torch.randint(0, n, (2, extra), generator=generator)
    edges, _ = remove_self_loops(torch.cat([tree, more], 1))
    return to_undirected(edges, num_nodes=n)


def cycle(n: int) -> torch.Tensor:
    nodes = torch.arange(n)
    return to_undirected(torch.stack([nodes, (nodes + 1) % n]), num_nodes=n)


def hypercube(d: int) -> torch.Tensor:
    nodes = torch.arange(2**d)
    edges = [torch.stack([nodes, nodes ^ (1 << b)]) for b in range(d)]
    return to_undirected(torch.cat(edges, 1), num_nodes=2**d)


def grid(h: int, w: int) -> torch.Tensor:
    idx = torch.arange(h * w).view(h, w)
    right = torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)])
    down = torch.stack([idx[:-1, :].reshape(-1), idx[1:, :].reshape(-1)])
    return to_undirected(torch.cat([right, down], 1), num_nodes=h * w)


def symmetric_weights(edges: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random positive weights, equal on (i, j) and (j, i)."""
    n = int(edges.max()) + 1
    keys = edges[0] * n + edges[1]
    order = torch.argsort(keys)
    reverse = order[torch.searchsorted(keys[order], edges[1] * n + edges[0])]
    weight = torch.rand(edges.shape[1], generator=generator, dtype=F64) + 0.1
    return (weight + weight[reverse]) / 2


def dense_adjacency(edge_index, n, weight=None, dtype=F64):
    a = torch.zeros(n, n, dtype=dtype)
    w = torch.ones(edge_index.shape[1], dtype=dtype) if weight is None else weight.to(dtype)
    a.index_put_((edge_index[0], edge_index[1]), w, accumulate=True)
    a.fill_diagonal_(0.0)  # self-loops are ignored
    return a


def dense_laplacian(edge_index, n, weight=None, normalization=None):
    """The module's definitions, written densely with pseudo-inverses."""
    a = dense_adjacency(edge_index, n, weight)
    d = a.sum(1)
    lap = torch.diag(d) - a
    if normalization is None:
        return lap
    pinv = torch.where(d > 0, 1.0 / d.clamp_min(1e-300), 0.0)
    if normalization == "sym":
        return pinv.sqrt()[:, None] * lap * pinv.sqrt()[None, :]
    return pinv[:, None] * lap


def eigenspace_mismatch(values, vectors, ref_values, ref_vectors, tol=1e-6) -> float:
    """Largest distance of computed eigenvectors from the reference eigenspace of their
    eigenvalue, and of full computed eigenspaces from the reference ones (projectors).

    Eigenvectors of repeated eigenvalues are defined up to a rotation, so each computed
    vector is compared with the projector onto the reference eigenspace of its eigenvalue.
    """
    worst = 0.0
    for j in range(values.numel()):
        close = (ref_values - values[j]).abs() < tol
        basis = ref_vectors[:, close]
        v = vectors[:, j]
        worst = max(worst, float((v - basis @ (basis.T @ v)).norm()))
    return worst


def projector_mismatch(vectors, ref_vectors) -> float:
    p = vectors @ vectors.T
    q = ref_vectors @ ref_vectors.T
    return float((p - q).abs().max())


# ---------------------------------------------------------------------------------------
# laplacian
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", [None, "sym", "rw"])
def test_laplacian_matches_dense_definition(normalization, generator):
    n = 12
    edges = random_graph(n, 20, generator)
    # a multi-edge (summed), a self-loop (ignored), and isolated nodes 10, 11
    edges = edges[:, (edges < 10).all(0)]
    edges = torch.cat([edges, torch.tensor([[0, 1, 3], [1, 0, 3]])], 1)
    weight = torch.rand(edges.shape[1], generator=generator, dtype=F64) + 0.1
    lap = laplacian(edges, n, weight, normalization)
    assert lap.layout == torch.sparse_coo and lap.is_coalesced()
    expected = dense_laplacian(edges, n, weight, normalization)
    torch.testing.assert_close(lap.to_dense(), expected, rtol=1e-12, atol=1e-12)
    assert lap.to_dense()[10:].abs().sum() == 0  # isolated nodes: zero rows


@pytest.mark.parametrize("normalization", [None, "sym"])
def test_laplacian_matches_pyg_without_isolated_nodes(normalization, generator):
    n = 15
    edges = connected_random_graph(n, 10, generator)
    weight = torch.rand(edges.shape[1], generator=generator, dtype=F64) + 0.1
    index, value = get_laplacian(edges, weight, normalization=normalization, num_nodes=n)
    ours = laplacian(edges, n, weight, normalization).to_dense()
    pyg = torch.sparse_coo_tensor(index, value, (n, n), check_invariants=True).to_dense()
    torch.testing.assert_close(ours, pyg, rtol=1e-12, atol=1e-12)


def test_laplacian_directed_input_is_taken_as_is():
    edges = torch.tensor([[0, 1], [1, 2]])
    expected = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(laplacian(edges, 3).to_dense(), expected)


def test_laplacian_gradient_flows_to_edge_weight(generator):
    edges = connected_random_graph(6, 3, generator)
    weight = (torch.rand(edges.shape[1], generator=generator, dtype=F64) + 0.5).requires_grad_()
    x = torch.randn(6, dtype=F64, generator=generator)

    def energy(w):
        return x @ (laplacian(edges, 6, w, "sym") @ x)

    assert torch.autograd.gradcheck(energy, (weight,))


def test_laplacian_empty_graphs():
    assert laplacian(torch.empty(2, 0, dtype=torch.long), 0).shape == (0, 0)
    lap = laplacian(torch.empty(2, 0, dtype=torch.long), 3, normalization="sym")
    assert lap.to_dense().abs().sum() == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"edge_index": torch.tensor([[0, 3], [1, 0]])}, ValueError, "outside"),
        ({"edge_index": torch.tensor([[0, -1], [1, 0]])}, ValueError, "outside"),
        ({"edge_index": torch.tensor([0, 1])}, ValueError, "shape"),
        ({"edge_index": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}, TypeError, "integer"),
        ({"edge_weight": torch.tensor([1.0, float("nan")])}, ValueError, "non-finite"),
        ({"edge_weight": torch.tensor([1.0, float("inf")])}, ValueError, "non-finite"),
        ({"edge_weight": torch.tensor([1.0, -1.0])}, ValueError, "negative"),
        ({"edge_weight": torch.tensor([1.0])}, ValueError, "shape"),
        ({"normalization": "symmetric"}, ValueError, "normalization"),
        ({"num_nodes": -1}, ValueError, "num_nodes"),
        ({"num_nodes": 3.0}, TypeError, "num_nodes"),
    ],
)
def test_laplacian_rejects_bad_input(kwargs, error, match):
    args = {"edge_index": torch.tensor([[0, 1], [1, 0]]), "num_nodes": 3, **kwargs}
    with pytest.raises(error, match=match):
        laplacian(**args)


def test_inputs_are_not_modified(generator):
    edges = connected_random_graph(30, 10, generator)
    weight = symmetric_weights(edges, generator)
    edges_copy, weight_copy = edges.clone(), weight.clone()
    laplacian(edges, 30, weight, "sym")
    laplacian_eigs(edges, 30, 5, edge_weight=weight)
    assert torch.equal(edges, edges_copy) and torch.equal(weight, weight_copy)


# ---------------------------------------------------------------------------------------
# laplacian_eigs: dense path against eigh
# ---------------------------------------------------------------------------------------


def reference(edges, n, normalization, weight=None):
    lap = dense_laplacian(edges, n, weight, "sym" if normalization == "rw" else normalization)
    return torch.linalg.eigh(lap)


@pytest.mark.parametrize("normalization", [None, "sym", "rw"])
@pytest.mark.parametrize(
    "graph",
    ["random", "disconnected", "cycle", "hypercube"],
)
def test_dense_path_matches_eigh(graph, normalization, generator):
    weight = None
    if graph == "random":
        n = 40
        edges = connected_random_graph(n, 30, generator)
        weight = symmetric_weights(edges, generator)
    elif graph == "disconnected":
        n = 30  # two components of 13 and 14 nodes, three isolated nodes
        edges = torch.cat(
            [
                connected_random_graph(13, 5, generator),
                connected_random_graph(14, 6, generator) + 13,
            ],
            1,
        )
    elif graph == "cycle":
        n, edges = 12, cycle(12)
    else:
        n, edges = 16, hypercube(4)
    k = 10
    ref_values, ref_vectors = reference(edges, n, normalization, weight)
    eig = laplacian_eigs(edges, n, k, normalization, edge_weight=weight, dtype=F64)
    assert isinstance(eig, LaplacianEigs)
    torch.testing.assert_close(eig.eigenvalues, ref_values[:k], rtol=0, atol=1e-10)
    assert eig.mask.all()
    assert eig.residuals.max() < 1e-10
    vectors = eig.eigenvectors
    if normalization == "rw":
        # D-orthonormal eigenvectors of L_rw: D^1/2 v are the sym ones
        a = dense_adjacency(edges, n, weight)
        d = a.sum(1)
        d_tilde = torch.where(d > 0, d, 1.0)
        lap_rw = dense_laplacian(edges, n, weight, "rw")
        residual = lap_rw @ vectors - vectors * eig.eigenvalues
        assert residual.abs().max() < 1e-10
        torch.testing.assert_close(
            vectors.T @ (d_tilde[:, None] * vectors), torch.eye(k, dtype=F64)
        )
        vectors = d_tilde.sqrt()[:, None] * vectors
    assert eigenspace_mismatch(eig.eigenvalues, vectors, ref_values, ref_vectors) < 1e-8


def test_regular_graphs_repeated_eigenvalues_full_eigenspaces():
    # Q_4: eigenvalues 2j/4 with multiplicities binom(4, j): 1, 4, 6, 4, 1
    edges = hypercube(4)
    eig = laplacian_eigs(edges, 16, 11, dtype=F64)
    expected = torch.tensor([0.0] + [0.5] * 4 + [1.0] * 6, dtype=F64)
    torch.testing.assert_close(eig.eigenvalues, expected, rtol=0, atol=1e-12)
    _, ref_vectors = reference(edges, 16, "sym")
    for lo, hi in ((1, 5), (5, 11)):  # complete eigenspaces: projectors must agree
        assert projector_mismatch(eig.eigenvectors[:, lo:hi], ref_vectors[:, lo:hi]) < 1e-10
    # cycle C_12: eigenvalues 1 - cos(2 pi j / 12), each nonzero one (except j = 6) twice
    eig = laplacian_eigs(cycle(12), 12, 12, dtype=F64)
    angles = 2 * math.pi * torch.arange(12, dtype=F64) / 12
    expected, _ = torch.sort(1 - torch.cos(angles))
    torch.testing.assert_close(eig.eigenvalues, expected, rtol=0, atol=1e-12)


def test_null_space_multiplicity_and_canonical_basis(generator):
    parts = [connected_random_graph(8, 4, generator), connected_random_graph(5, 2, generator) + 9]
    edges = torch.cat(parts, 1)  # components {0..7}, {8} isolated, {9..13}, {14}, {15}
    n = 16
    ref_values, _ = reference(edges, n, "sym")
    eig = laplacian_eigs(edges, n, 7, dtype=F64)
    num_zero = int((ref_values.abs() < 1e-9).sum())
    assert int(eig.num_components) == num_zero == 5
    torch.testing.assert_close(eig.eigenvalues[:5], torch.zeros(5, dtype=F64))
    d = dense_adjacency(edges, n).sum(1)
    sqrt_d = torch.where(d > 0, d, 1.0).sqrt()
    members = [range(8), [8], range(9, 14), [14], [15]]  # ordered by smallest node
    for j, nodes in enumerate(members):
        expected = torch.zeros(n, dtype=F64)
        expected[list(nodes)] = sqrt_d[list(nodes)]
        torch.testing.assert_close(eig.eigenvectors[:, j], expected / expected.norm())
    assert eig.eigenvalues[5] > 1e-3
    skipped = laplacian_eigs(edges, n, 2, dtype=F64, skip_null_space=True)
    torch.testing.assert_close(skipped.eigenvalues, ref_values[5:7], rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["dense", "lobpcg", "batched"])
def test_zero_weight_edges_do_not_connect_components(method, generator):
    """Two pieces joined only by edges of weight 0 are two components: L has two null
    vectors, and skip_null_space must not return the second as a 'non-trivial' pair."""
    a, b = 40, 50
    edges = torch.cat(
        [connected_random_graph(a, 20, generator), connected_random_graph(b, 25, generator) + a], 1
    )
    bridge = torch.tensor([[0, a, 5, a + 7], [a, 0, a + 7, 5]])
    weight = torch.cat([symmetric_weights(edges, generator), torch.zeros(4, dtype=F64)])
    edges, n, k = torch.cat([edges, bridge], 1), a + b, 4
    ref_values, _ = reference(edges, n, "sym", weight)
    assert int((ref_values.abs() < 1e-10).sum()) == 2

    def solve(skip: bool) -> tuple[int, torch.Tensor]:
        if method != "batched":
            eig = laplacian_eigs(
                edges, n, k, edge_weight=weight, method=method, tol=1e-10, skip_null_space=skip
            )
            return int(eig.num_components), eig.eigenvalues
        # the same graph as the second of a batch
        batch = torch.repeat_interleave(torch.tensor([0, 1]), torch.tensor([5, n]))
        eig = laplacian_eigs(
            torch.cat([cycle(5), edges + 5], 1),
            n + 5,
            k,
            edge_weight=torch.cat([torch.ones(10, dtype=F64), weight]),
            batch=batch,
            skip_null_space=skip,
        )
        return int(eig.num_components[1]), eig.eigenvalues[1]

    for skip, expected in ((False, ref_values[:k]), (True, ref_values[2 : 2 + k])):
        components, values = solve(skip)
        assert components == 2
        torch.testing.assert_close(values, expected, rtol=0, atol=1e-8)


def test_combinatorial_null_vectors_are_normalized_indicators():
    edges = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]])
    eig = laplacian_eigs(edges, 5, 5, None, dtype=F64)
    assert int(eig.num_components) == 3
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[s, 0, 0], [s, 0, 0], [0, s, 0], [0, s, 0], [0, 0, 1.0]], dtype=F64)
    torch.testing.assert_close(eig.eigenvectors[:, :3], expected)
    torch.testing.assert_close(eig.eigenvalues, torch.tensor([0, 0, 0, 2, 2], dtype=F64))


def test_k_at_least_n_is_padded_with_a_mask():
    eig = laplacian_eigs(cycle(5), 5, 8, dtype=F64)
    assert eig.mask.tolist() == [True] * 5 + [False] * 3
    assert eig.eigenvalues[5:].abs().sum() == 0 and eig.residuals[5:].abs().sum() == 0
    assert eig.eigenvectors[:, 5:].abs().sum() == 0
    skipped = laplacian_eigs(cycle(5), 5, 8, dtype=F64, skip_null_space=True)
    assert skipped.mask.sum() == 4


def test_empty_inputs():
    none = torch.empty(2, 0, dtype=torch.long)
    eig = laplacian_eigs(none, 0, 3)
    assert eig.eigenvalues.shape == (3,) and eig.eigenvectors.shape == (0, 3)
    assert not eig.mask.any()
    eig = laplacian_eigs(cycle(4), 4, 0)
    assert eig.eigenvalues.shape == (0,) and eig.eigenvectors.shape == (4, 0)
    eig = laplacian_eigs(none, 3, 2, dtype=F64)  # three isolated nodes
    assert int(eig.num_components) == 3
    torch.testing.assert_close(eig.eigenvectors, torch.eye(3, 2, dtype=F64))


def test_default_dtype_and_weights_dtype():
    assert laplacian_eigs(cycle(6), 6, 3).eigenvalues.dtype == torch.get_default_dtype()
    weight = torch.ones(12, dtype=F64)
    assert laplacian_eigs(cycle(6), 6, 3, edge_weight=weight).eigenvectors.dtype == F64


# ---------------------------------------------------------------------------------------
# Batched path
# ---------------------------------------------------------------------------------------


def test_batched_matches_per_graph(generator):
    sizes = [7, 12, 7, 3, 12, 20, 9]
    parts, offset = [], 0
    for i, n in enumerate(sizes):
        if i == 1:  # a disconnected member: two pieces and an isolated node
            e = torch.cat(
                [
                    connected_random_graph(5, 2, generator),
                    connected_random_graph(6, 2, generator) + 5,
                ],
                1,
            )
        else:
            e = connected_random_graph(n, 4, generator)
        parts.append(e + offset)
        offset += n
    edges = torch.cat(parts, 1)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    k = 8
    for skip in (False, True):
        eig = laplacian_eigs(edges, offset, k, batch=batch, dtype=F64, skip_null_space=skip)
        assert eig.eigenvalues.shape == (len(sizes), k)
        assert eig.eigenvectors.shape == (offset, k)
        start = 0
        for g, n in enumerate(sizes):
            local = parts[g] - start
            single = laplacian_eigs(local, n, k, dtype=F64, skip_null_space=skip)
            torch.testing.assert_close(eig.eigenvalues[g], single.eigenvalues, rtol=0, atol=1e-10)
            assert torch.equal(eig.mask[g], single.mask)
            assert int(eig.num_components[g]) == int(single.num_components)
            ref_values, ref_vectors = reference(local, n, "sym")
            rows = eig.eigenvectors[start : start + n]
            valid = eig.mask[g]
            null = (eig.eigenvalues[g] == 0) & valid
            torch.testing.assert_close(rows[:, null], single.eigenvectors[:, null])
            mismatch = eigenspace_mismatch(
                eig.eigenvalues[g][valid & ~null], rows[:, valid & ~null], ref_values, ref_vectors
            )
            assert mismatch < 1e-8
            start += n


def test_batches_that_cuda_solves_one_matrix_at_a_time_go_to_the_host():
    """CUDA's eigh batches matrices of at most 32 rows; larger batches go to the host, a
    single matrix and every CPU batch stay where they are."""
    on_host = laplacian_module._eigh_on_host
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert on_host(cuda, 100, 33) and on_host(cuda, 2, 384)
    assert not on_host(cuda, 100, 32) and not on_host(cuda, 1, 300)
    assert not on_host(cpu, 100, 40)


@pytest.mark.gpu
def test_cuda_batch_above_32_nodes_matches_cpu(generator):
    """Graphs of 20-40 nodes on CUDA (groups on both sides of 32 rows) give the CPU's
    eigenpairs, on the CUDA device."""
    sizes = [20, 32, 33, 40, 33, 25]
    parts, offset = [], 0
    for n in sizes:
        parts.append(connected_random_graph(n, 4, generator) + offset)
        offset += n
    edges = torch.cat(parts, 1)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    want = laplacian_eigs(edges, offset, 8, batch=batch, dtype=F64)
    got = laplacian_eigs(edges.cuda(), offset, 8, batch=batch.cuda(), dtype=F64)
    assert got.eigenvectors.is_cuda
    torch.testing.assert_close(got.eigenvalues.cpu(), want.eigenvalues, rtol=0, atol=1e-10)
    start = 0
    for g, n in enumerate(sizes):
        ref_values, ref_vectors = reference(parts[g] - start, n, "sym")
        rows = got.eigenvectors[start : start + n].cpu()
        null = want.eigenvalues[g] == 0
        torch.testing.assert_close(rows[:, null], want.eigenvectors[start : start + n, null])
        values = got.eigenvalues[g].cpu()
        assert eigenspace_mismatch(values[~null], rows[:, ~null], ref_values, ref_vectors) < 1e-8
        start += n


@pytest.mark.parametrize("normalization", [None, "sym", "rw"])
@pytest.mark.parametrize("skip", [False, True])
def test_one_graph_route_matches_the_batched_route(normalization, skip, generator):
    """A single graph takes its own dense route; the batched route is its oracle, on
    messy input: multi-edges, self-loops, isolated nodes, random weights, int32 indices."""
    n, k = 23, 20  # 5 components: with skip_null_space, 18 pairs and 2 padded
    edges = torch.cat([connected_random_graph(15, 8, generator), cycle(5) + 16], 1)
    weight = symmetric_weights(edges, generator)
    extra = torch.tensor([[0, 1, 3, 17], [1, 0, 3, 17]])  # a repeated edge, two loops
    edges = torch.cat([edges, extra], 1).int()
    weight = torch.cat([weight, torch.tensor([0.3, 0.3, 2.0, 5.0], dtype=F64)])
    single = laplacian_eigs(edges, n, k, normalization, edge_weight=weight, skip_null_space=skip)
    other = cycle(4).int()  # a first graph of another size puts ours on the batched route
    batch = torch.repeat_interleave(torch.tensor([0, 1]), torch.tensor([4, n]))
    batched = laplacian_eigs(
        torch.cat([other, edges + 4], 1),
        n + 4,
        k,
        normalization,
        batch=batch,
        edge_weight=torch.cat([torch.ones(8, dtype=F64), weight]),
        skip_null_space=skip,
    )
    assert int(single.num_components) == int(batched.num_components[1]) == 5
    assert torch.equal(single.mask, batched.mask[1])
    assert single.mask.sum() == (n - 5 if skip else k)
    torch.testing.assert_close(single.eigenvalues, batched.eigenvalues[1], rtol=0, atol=1e-12)
    assert single.residuals.max() < 1e-12
    # distinct eigenvalues (random weights): the vectors agree up to sign
    theirs = batched.eigenvectors[4:]
    signs = torch.where((single.eigenvectors * theirs).sum(0) < 0, -1.0, 1.0).to(F64)
    torch.testing.assert_close(single.eigenvectors * signs, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("normalization", [None, "sym", "rw"])
def test_eigenvalues_are_differentiable_in_the_edge_weights(normalization, generator):
    # the dense routes assemble the matrix with in-place ops: gradients must survive them
    edges = connected_random_graph(7, 4, generator)
    weight = symmetric_weights(edges, generator)
    keys = torch.minimum(edges[0], edges[1]) * 7 + torch.maximum(edges[0], edges[1])
    pairs, pair = torch.unique(keys, return_inverse=True)  # one free weight per edge pair
    start = torch.zeros(pairs.numel(), dtype=F64).scatter_(0, pair, weight)  # symmetric
    batch = torch.tensor([0] * 3 + [1] * 7)

    def single(w):
        return laplacian_eigs(edges, 7, 3, normalization, edge_weight=w[pair]).eigenvalues

    def batched(w):
        eig = laplacian_eigs(
            torch.cat([cycle(3), edges + 3], 1),
            10,
            3,
            normalization,
            batch=batch,
            edge_weight=torch.cat([torch.ones(6, dtype=F64), w[pair]]),
        )
        return eig.eigenvalues[1]

    for fn in (single, batched):
        assert torch.autograd.gradcheck(fn, (start.clone().requires_grad_(),))


@pytest.mark.parametrize("normalization", [None, "sym", "rw"])
@pytest.mark.parametrize("batched", [False, True])
def test_eigenvectors_are_differentiable_on_graphs_of_several_components(normalization, batched):
    """A weighted path and two isolated nodes (3 components, simple non-null spectrum):
    the null vectors all moved to one eigenvalue, whose zero gaps made eigh's backward
    divide 0 by 0, so the gradient of any eigenvector was NaN."""
    edges = torch.tensor([[0, 1, 2, 1, 2, 3], [1, 2, 3, 0, 1, 2]])
    n = 6
    batch = torch.zeros(n, dtype=torch.long) if batched else None

    def loss(w):
        eig = laplacian_eigs(
            edges,
            n,
            2,
            normalization,
            batch=batch,
            edge_weight=torch.cat([w, w]),
            skip_null_space=True,
        )
        return (eig.eigenvectors**4).sum(0)  # sign-invariant, one per eigenvector

    w = torch.tensor([0.7, 1.3, 0.9], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (w,))


@pytest.mark.parametrize("method", ["auto", "chebyshev", "lobpcg", "arpack", "shift_invert"])
def test_iterative_solvers_refuse_weights_that_need_a_gradient(method, large_graph):
    # they used to crash in SciPy (arpack, shift_invert) or record autograd through every
    # iteration (chebyshev, lobpcg); without grad the same call returns plain values
    edges, n, _, _ = large_graph
    weight = torch.ones(edges.shape[1], dtype=F64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="method='dense'"):
        laplacian_eigs(edges, n, 4, edge_weight=weight, method=method)
    with torch.no_grad():
        eig = laplacian_eigs(edges, n, 4, edge_weight=weight, method=method)
    assert not eig.eigenvalues.requires_grad and eig.residuals.max() < 1e-5


def test_batched_trailing_empty_graphs():
    edges = cycle(4)
    batch = torch.zeros(4, dtype=torch.long)
    eig = laplacian_eigs(edges, 4, 2, batch=batch, num_graphs=3)
    assert eig.eigenvalues.shape == (3, 2) and eig.num_components.tolist() == [1, 0, 0]
    assert eig.mask.tolist() == [[True, True], [False, False], [False, False]]


# ---------------------------------------------------------------------------------------
# Iterative solvers on a few-thousand-node graph
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_graph():
    """1600 nodes: a random graph of 1200 nodes, a 19 x 21 grid piece, and isolated nodes."""
    g = torch.Generator().manual_seed(7)
    random_part = connected_random_graph(1200, 1800, g)
    grid_part = grid(19, 21) + 1200
    n = 1200 + 19 * 21 + 1
    edges = torch.cat([random_part, grid_part], 1)
    values, vectors = reference(edges, n, "sym")
    return edges, n, values, vectors


@pytest.mark.parametrize("method", METHODS)
def test_iterative_methods_match_eigh(method, large_graph):
    edges, n, ref_values, ref_vectors = large_graph
    k, tol = 12, 1e-9
    eig = laplacian_eigs(edges, n, k, method=method, dtype=F64, tol=tol)
    assert int(eig.num_components) == 3
    # eigenvalues to ~ residual^2 / gap; residuals within the tolerance
    torch.testing.assert_close(eig.eigenvalues, ref_values[:k], rtol=0, atol=1e-8)
    assert eig.residuals.max() <= 2 * tol * 2
    assert eigenspace_mismatch(eig.eigenvalues, eig.eigenvectors, ref_values, ref_vectors) < 1e-6
    orth = eig.eigenvectors.T @ eig.eigenvectors
    torch.testing.assert_close(orth, torch.eye(k, dtype=F64), rtol=0, atol=1e-10)


@pytest.fixture(scope="module")
def square_grid():
    """A square grid: the eigenvalues of modes (i, j) and (j, i) coincide."""
    edges, n = grid(36, 36), 36 * 36
    return edges, n, *reference(edges, n, "sym")


@pytest.mark.parametrize("method", METHODS)
def test_iterative_methods_find_both_copies_of_repeated_eigenvalues(method, square_grid):
    edges, n, ref_values, ref_vectors = square_grid
    assert (ref_values[1] - ref_values[2]).abs() < 1e-12  # the first pair
    eig = laplacian_eigs(edges, n, 13, method=method, dtype=F64, tol=1e-9)
    torch.testing.assert_close(eig.eigenvalues, ref_values[:13], rtol=0, atol=1e-10)
    assert eigenspace_mismatch(eig.eigenvalues, eig.eigenvectors, ref_values, ref_vectors) < 1e-6


def spider(legs: int, length: int) -> tuple[torch.Tensor, int]:
    """Paths of ``length`` nodes hanging from one centre: the antisymmetric combinations of
    the legs give each leg eigenvalue ``legs - 1`` copies."""
    pairs = [
        (0 if step == 0 else 1 + leg * length + step - 1, 1 + leg * length + step)
        for leg in range(legs)
        for step in range(length)
    ]
    edges = torch.tensor(pairs).T
    return torch.cat([edges, edges.flip(0)], 1), 1 + legs * length


def disjoint_cycles(count: int, length: int) -> tuple[torch.Tensor, int]:
    """``count`` copies of a cycle: every eigenvalue ``2 count`` times (0 and 2: ``count``)."""
    edges = torch.cat([cycle(length) + length * j for j in range(count)], 1)
    return edges, count * length


@pytest.mark.parametrize("graph", ["spider", "cycles"])
@pytest.mark.parametrize("normalization", [None, "sym"])
@pytest.mark.parametrize("method", ("auto", *METHODS))
def test_eigenvalues_of_high_multiplicity_are_all_found(graph, normalization, method):
    """Single-vector Lanczos sees one direction per eigenspace: ARPACK returned 1 (plain)
    or 5 (shift-invert) of the 7 copies of the spider's first eigenvalue, and larger
    eigenvalues in place of the others, with tiny residuals and no warning. ``auto`` sends
    the spider (481 nodes, 120 hops across) to shift-invert."""
    edges, n = spider(8, 60) if graph == "spider" else disjoint_cycles(10, 30)
    c = 1 if graph == "spider" else 10
    k = 10
    values, vectors = reference(edges, n, normalization)
    assert values[c + 1] - values[c] < 1e-12  # the first non-zero eigenvalue is repeated
    eig = laplacian_eigs(
        edges, n, k, normalization, method, dtype=F64, skip_null_space=True, tol=1e-9
    )
    torch.testing.assert_close(eig.eigenvalues, values[c : c + k], rtol=0, atol=1e-10)
    assert eigenspace_mismatch(eig.eigenvalues, eig.eigenvectors, values, vectors) < 1e-5


def test_chebyshev_default_tolerance_float32_filter(large_graph):
    edges, n, ref_values, _ = large_graph
    eig = laplacian_eigs(edges, n, 12, method="chebyshev", skip_null_space=True)
    assert eig.eigenvalues.dtype == torch.float32
    assert eig.residuals.max() <= 2e-6 * 1.01
    torch.testing.assert_close(eig.eigenvalues.double(), ref_values[3:15], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["chebyshev", "lobpcg", "arpack", "shift_invert"])
def test_iterative_methods_are_deterministic(method, large_graph):
    edges, n, _, _ = large_graph
    runs = [
        laplacian_eigs(
            edges,
            n,
            6,
            method=method,
            dtype=F64,
            skip_null_space=True,
            generator=torch.Generator().manual_seed(3),
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0].eigenvectors, runs[1].eigenvectors)
    again = laplacian_eigs(edges, n, 6, method=method, dtype=F64, skip_null_space=True)
    torch.testing.assert_close(again.eigenvalues, runs[0].eigenvalues, rtol=0, atol=1e-9)


def test_auto_picks_shift_invert_on_meshes_and_chebyshev_elsewhere(monkeypatch, generator):
    calls = []
    for name in ("chebyshev_eigs", "shift_invert_eigs"):
        original = getattr(laplacian_module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(laplacian_module, name, spy)
    laplacian_eigs(grid(40, 30), 1200, 4)
    laplacian_eigs(connected_random_graph(1200, 2400, generator), 1200, 4)
    laplacian_eigs(cycle(200), 200, 4)  # small: dense
    assert calls == ["shift_invert_eigs", "chebyshev_eigs"]


@pytest.mark.parametrize("method", ["arpack", "shift_invert"])
def test_scipy_solvers_run_blas_on_one_thread(monkeypatch, method):
    """Inside ARPACK's callbacks SciPy's BLAS runs one thread (with threadpoolctl)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    seen = []
    original = eigensolvers._deflate_numpy

    def spying_deflate(problem, locked=None):
        deflate = original(problem, locked)

        def wrapped(v):
            seen.extend(
                p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"
            )
            return deflate(v)

        return wrapped

    monkeypatch.setattr(eigensolvers, "_deflate_numpy", spying_deflate)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        eig = laplacian_eigs(grid(40, 30), 1200, 4, method=method, dtype=F64)
        after = [
            p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"
        ]
    assert seen and set(seen) == {1}
    assert after and min(after) == 2  # the caller's limit is back
    assert eig.residuals.max() < 1e-5


def test_scipy_solvers_work_without_threadpoolctl(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import raises ImportError
    eig = laplacian_eigs(grid(40, 30), 1200, 4, method="shift_invert", dtype=F64)
    assert eig.residuals.max() < 1e-5


@pytest.mark.parametrize("method", ["chebyshev", "arpack", "shift_invert"])
def test_non_convergence_warns_and_still_returns_every_pair(method, large_graph):
    """ARPACK hands back only its converged pairs (none, this early): the rest are
    completed, and the warning reports the largest residual of what is returned."""
    edges, n, _, _ = large_graph
    with pytest.warns(RuntimeWarning, match="largest residual") as caught:
        eig = laplacian_eigs(edges, n, 8, method=method, max_iter=1, dtype=F64)
    assert eig.mask.all() and torch.isfinite(eig.eigenvalues).all()
    worst = eig.residuals.max()
    assert worst > 0
    message = str(caught[0].message)
    assert "inf" not in message.split("residual")[1][:12]


@pytest.mark.parametrize("method", ["chebyshev", "lobpcg"])
@pytest.mark.parametrize("max_iter", [1, 2])
def test_block_solvers_stopped_early_return_their_ritz_pairs(method, max_iter, large_graph):
    """At max_iter the block solvers returned the Ritz values of one block with the
    vectors of the next (filtered or expanded, not yet rotated): pairs whose eigenvalues
    were not the vectors' Rayleigh quotients, worse than the warning said."""
    edges, n, _, _ = large_graph
    with pytest.warns(RuntimeWarning, match="largest residual") as caught:
        eig = laplacian_eigs(edges, n, 8, method=method, max_iter=max_iter, dtype=F64)
    warned = float(str(caught[0].message).split("largest residual ")[1].split()[0])
    lap = dense_laplacian(edges, n, normalization="sym")
    v, lam = eig.eigenvectors, eig.eigenvalues
    rayleigh = torch.einsum("ik,ij,jk->k", v, lap, v)
    torch.testing.assert_close(lam, rayleigh, rtol=0, atol=1e-12)
    residuals = (lap @ v - v * lam).norm(dim=0)
    assert residuals.max() <= warned * 1.01  # the warning rounds to 3 digits


@pytest.mark.parametrize("method", ["chebyshev", "lobpcg"])
def test_float32_weights_give_a_float64_problem(method, large_graph, generator):
    """The iterative problem is float64 whatever the weights: its values, degrees and
    null vectors were rounded to float32 first, and tol=1e-9 was out of reach."""
    edges, n, _, _ = large_graph
    weight = symmetric_weights(edges, generator).float()
    values = torch.linalg.eigvalsh(dense_laplacian(edges, n, weight.double(), "sym"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # converges
        eig = laplacian_eigs(edges, n, 6, method=method, edge_weight=weight, tol=1e-9)
    assert eig.eigenvalues.dtype == torch.float32
    torch.testing.assert_close(eig.eigenvalues.double(), values[:6], rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_node_whose_only_edges_have_weight_zero_is_isolated(method, large_graph):
    """The iterative path leaves out nodes of degree 0; their edges of weight 0 must go
    with them (they became index -1: SciPy raised, the torch solvers crashed)."""
    edges, n, values, _ = large_graph
    isolated = n - 1  # isolated in large_graph; now joined to node 0 by weight-0 edges
    extra = torch.tensor([[0, isolated], [isolated, 0]])
    weight = torch.cat([torch.ones(edges.shape[1], dtype=F64), torch.zeros(2, dtype=F64)])
    eig = laplacian_eigs(torch.cat([edges, extra], 1), n, 6, edge_weight=weight, method=method)
    torch.testing.assert_close(eig.eigenvalues, values[:6], rtol=0, atol=1e-5)


def test_component_roots_device_algorithm_matches_scipy(generator):
    # long paths and random forests: many pointer-jumping rounds
    path = torch.stack([torch.arange(499), torch.arange(1, 500)])
    pieces = [to_undirected(path), random_graph(300, 250, generator, offset=500), grid(7, 9) + 800]
    edges = torch.cat(pieces, 1)
    n = 900  # nodes 863..899 isolated
    perm = torch.randperm(n, generator=generator)
    edges = perm[edges]
    row, col = edges
    expected = _component_roots(row, col, n)
    torch.testing.assert_close(_component_roots_torch(row, col, n), expected)
    nodes = torch.arange(n)
    assert (expected <= nodes).all() and torch.equal(expected[expected], expected)


# ---------------------------------------------------------------------------------------
# Errors and docs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": -1}, ValueError, "k must be >= 0"),
        ({"k": 2.0}, TypeError, "k must be an int"),
        ({"method": "eigh"}, ValueError, "method"),
        ({"normalization": "l2"}, ValueError, "normalization"),
        ({"tol": 0.0}, ValueError, "tol"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"edge_index": torch.tensor([[0, 1], [1, 2]])}, ValueError, "undirected"),
        ({"edge_index": cycle(4), "edge_weight": torch.arange(1.0, 9.0)}, ValueError, "undirected"),
        ({"batch": torch.tensor([1, 0, 0, 1])}, ValueError, "sorted"),
        ({"batch": torch.tensor([0, 0, 1, 1])}, ValueError, "different graphs"),
        ({"batch": torch.tensor([0, 0, 1])}, ValueError, "shape"),
        ({"batch": torch.tensor([0, 0, 0, 0]), "num_graphs": 0}, ValueError, "num_graphs"),
        ({"dtype": torch.float16}, TypeError, "dtype"),
        ({"edge_index": torch.tensor([[0, 4], [4, 0]])}, ValueError, "outside"),
    ],
)
def test_laplacian_eigs_rejects_bad_input(kwargs, error, match):
    args = {"edge_index": cycle(4), "num_nodes": 4, "k": 2, **kwargs}
    with pytest.raises(error, match=match):
        laplacian_eigs(**args)


def test_docstring_examples_run():
    for module in (laplacian_module, eigensolvers):
        result = doctest.testmod(module, extraglobs={"torch": torch}, verbose=False)
        assert result.failed == 0


def test_all_normalizations_agree_on_eigenvalues(generator):
    edges = connected_random_graph(30, 20, generator)
    sym = laplacian_eigs(edges, 30, 8, "sym", dtype=F64)
    rw = laplacian_eigs(edges, 30, 8, "rw", dtype=F64)
    torch.testing.assert_close(sym.eigenvalues, rw.eigenvalues, rtol=0, atol=1e-12)
    # regular graph: L = d L_sym
    hyper = laplacian_eigs(hypercube(3), 8, 8, None, dtype=F64)
    sym = laplacian_eigs(hypercube(3), 8, 8, "sym", dtype=F64)
    torch.testing.assert_close(hyper.eigenvalues, 3 * sym.eigenvalues, rtol=0, atol=1e-12)


def test_matrix_function_of_all_pairs_is_the_laplacian(generator):
    # with k = n the eigenpairs reconstruct L_sym exactly
    edges = connected_random_graph(25, 15, generator)
    eig = laplacian_eigs(edges, 25, 25, dtype=F64)
    v, lam = eig.eigenvectors, eig.eigenvalues
    torch.testing.assert_close(v @ torch.diag(lam) @ v.T, dense_laplacian(edges, 25, None, "sym"))


@pytest.mark.parametrize(("n", "k"), list(itertools.product([3, 9], [1, 4])))
def test_small_graphs_all_sizes(n, k):
    eig = laplacian_eigs(cycle(n), n, k, dtype=F64, skip_null_space=True)
    assert int(eig.mask.sum()) == min(k, n - 1)


def test_row_pointers_count_entries_per_row_in_any_order():
    """CSR row pointers from unsorted rows, with empty rows at the start, middle and end."""
    from torsion.spectral._eigensolvers import row_pointers

    rows = torch.tensor([3, 1, 3, 1, 1, 5])
    expected = torch.tensor([0, 0, 3, 3, 5, 5, 6, 6])  # rows 0, 2, 4, 6 empty
    assert torch.equal(row_pointers(rows, 7), expected)
    assert torch.equal(row_pointers(rows.int(), 7), expected)
    assert torch.equal(row_pointers(rows[:0], 3), torch.zeros(4, dtype=torch.long))


def test_one_way_edge_of_weight_zero_is_no_edge_on_every_route():
    """An edge of weight 0 connects nothing, so it needs no reverse: the batched check of
    undirectedness agrees with the single graph's dense matrix (it refused it before)."""
    edges = torch.tensor([[0, 1, 1, 2, 0], [1, 0, 2, 1, 2]])
    weight = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0], dtype=F64)
    single = laplacian_eigs(edges, 3, 2, edge_weight=weight)
    one_batch = torch.zeros(3, dtype=torch.long)
    batched = laplacian_eigs(edges, 3, 2, edge_weight=weight, batch=one_batch)
    with_grad = laplacian_eigs(edges, 3, 2, edge_weight=weight.clone().requires_grad_())
    torch.testing.assert_close(batched.eigenvalues[0], single.eigenvalues)
    torch.testing.assert_close(with_grad.eigenvalues.detach(), single.eigenvalues)
    torch.testing.assert_close(single.eigenvalues, torch.tensor([0.0, 1.0], dtype=F64))
    weight[-1] = 0.5  # a one-way edge of nonzero weight is still refused
    with pytest.raises(ValueError, match="undirected"):
        laplacian_eigs(edges, 3, 2, edge_weight=weight, batch=one_batch)
