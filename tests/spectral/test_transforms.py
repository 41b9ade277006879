"""AddLaplacianPE and AddRandomWalkPE: oracles, PyG parity, batching, no mutation, signs."""

from __future__ import annotations

import copy
import doctest
import math
import warnings

import pytest
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.transforms import AddLaplacianEigenvectorPE
from torch_geometric.transforms import AddRandomWalkPE as PyGRandomWalkPE
from torch_geometric.utils import coalesce, remove_self_loops, to_undirected

import torsion.spectral._transforms as transforms_module
from torsion.spectral import AddLaplacianPE, AddRandomWalkPE, canonical_signs, laplacian_eigs

from .test_laplacian import connected_random_graph, cycle, dense_laplacian, symmetric_weights

F64 = torch.float64


def snapshot(data: Data) -> dict:
    return {key: value.clone() if torch.is_tensor(value) else value for key, value in data.items()}


def assert_unchanged(data: Data, before: dict) -> None:
    assert set(data.keys()) == set(before.keys())
    for key, value in before.items():
        if torch.is_tensor(value):
            assert torch.equal(data[key], value), key
        else:
            assert data[key] == value, key


def small_graphs(generator, sizes=(9, 14, 6, 14, 11)):
    return [Data(edge_index=connected_random_graph(n, 5, generator), num_nodes=n) for n in sizes]


# ---------------------------------------------------------------------------------------
# AddLaplacianPE
# ---------------------------------------------------------------------------------------


def test_laplacian_pe_is_the_nontrivial_eigenpairs(generator):
    n = 20
    edges = connected_random_graph(n, 12, generator)
    weight = symmetric_weights(edges, generator)
    data = Data(edge_index=edges, edge_weight=weight, num_nodes=n, x=torch.randn(n, 3))
    out = AddLaplacianPE(k=5)(data)
    assert out.lap_pe.shape == (n, 5) and out.lap_pe.dtype == F64
    assert out.lap_pe_eigvals.shape == (1, 5) and out.lap_pe_mask.all()
    lap = dense_laplacian(edges, n, weight, "sym")
    values, _ = torch.linalg.eigh(lap)
    torch.testing.assert_close(out.lap_pe_eigvals[0], values[1:6], rtol=0, atol=1e-10)
    residual = lap @ out.lap_pe - out.lap_pe * out.lap_pe_eigvals
    assert residual.abs().max() < 1e-10
    torch.testing.assert_close(out.lap_pe.T @ out.lap_pe, torch.eye(5, dtype=F64))


def test_laplacian_pe_does_not_mutate_input(generator):
    data = small_graphs(generator)[0]
    data.x = torch.randn(data.num_nodes, 2)
    before = snapshot(data)
    for sign in ("canonical", "random", None):
        AddLaplacianPE(k=4, sign=sign, generator=torch.Generator().manual_seed(0))(data)
    batch = Batch.from_data_list(small_graphs(generator))
    batch_before = snapshot(batch)
    AddLaplacianPE(k=4)(batch)
    assert_unchanged(data, before)
    assert_unchanged(batch, batch_before)


def test_laplacian_pe_skips_the_null_space_of_disconnected_graphs(generator):
    parts = [connected_random_graph(7, 3, generator), connected_random_graph(6, 2, generator) + 7]
    n = 15  # components of 7 and 6 nodes, two isolated nodes
    edges = torch.cat(parts, 1)
    out = AddLaplacianPE(k=4)(Data(edge_index=edges, num_nodes=n))
    lap = dense_laplacian(edges, n, None, "sym")
    values = torch.linalg.eigvalsh(lap)
    assert int((values.abs() < 1e-6).sum()) == 4
    torch.testing.assert_close(out.lap_pe_eigvals[0].double(), values[4:8], rtol=0, atol=1e-5)
    assert (out.lap_pe_eigvals > 1e-3).all()
    # orthogonal to every component indicator (weighted by sqrt(d))
    degree = torch.zeros(n).index_add_(0, edges[0], torch.ones(edges.shape[1]))
    for nodes in (range(7), range(7, 13), [13], [14]):
        indicator = torch.zeros(n)
        indicator[list(nodes)] = degree[list(nodes)].sqrt().clamp_min(1.0)
        assert (indicator @ out.lap_pe).abs().max() < 1e-5


def test_laplacian_pe_pads_small_graphs():
    out = AddLaplacianPE(k=6)(Data(edge_index=cycle(5), num_nodes=5))
    assert out.lap_pe_mask.tolist() == [[True] * 4 + [False] * 2]
    assert out.lap_pe[:, 4:].abs().sum() == 0 and out.lap_pe_eigvals[0, 4:].abs().sum() == 0


def test_laplacian_pe_on_a_batch_equals_per_graph(generator):
    graphs = small_graphs(generator)
    batch = Batch.from_data_list(graphs)
    out = AddLaplacianPE(k=4)(batch)
    assert out.lap_pe_eigvals.shape == (len(graphs), 4)
    singles = [AddLaplacianPE(k=4)(g) for g in graphs]
    torch.testing.assert_close(
        out.lap_pe, torch.cat([s.lap_pe for s in singles]), atol=2e-5, rtol=0
    )
    torch.testing.assert_close(
        out.lap_pe_eigvals, torch.cat([s.lap_pe_eigvals for s in singles]), atol=1e-5, rtol=0
    )
    # and collating per-graph results gives the batch's attributes
    collated = Batch.from_data_list(singles)
    assert collated.lap_pe_eigvals.shape == out.lap_pe_eigvals.shape


@pytest.mark.parametrize("n", [60, 130])
def test_repeated_eigenvalues_get_one_basis_graph_by_graph_and_in_a_batch(n):
    # a cycle's non-trivial eigenvalues 1 - cos(2 pi j / n) come in pairs; each route has
    # its own code (a NumPy route for one graph), and the basis of each pair must agree:
    # the same eigh on the same matrix, to the last bit (a fused multiply-add in the
    # batched route's deflation once broke it)
    ring = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    ring = torch.cat([ring, ring.flip(0)], 1)
    graph = Data(edge_index=ring, num_nodes=n)
    other = Data(edge_index=torch.tensor([[0, 1], [1, 0]]), num_nodes=2)  # not alone
    single = AddLaplacianPE(k=16)(graph)
    batched = AddLaplacianPE(k=16)(Batch.from_data_list([other, graph]))
    want = 1 - torch.cos(2 * math.pi * ((torch.arange(16) + 2) // 2) / n)
    torch.testing.assert_close(single.lap_pe_eigvals[0], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched.lap_pe_eigvals[1], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched.lap_pe[2:], single.lap_pe, rtol=0, atol=1e-5)


def test_encodings_of_a_batch_split_back_into_its_graphs(generator):
    """``to_data_list()`` and ``batch[i]`` return each graph's encodings (PyG drops the
    attributes it did not collate), and the caller's batch keeps its split tables."""
    graphs = small_graphs(generator)
    for g in graphs:
        g.x = torch.randn(g.num_nodes, 2, generator=generator)
    batch = Batch.from_data_list(graphs)
    tables = (dict(batch._slice_dict), dict(batch._inc_dict))
    out = AddRandomWalkPE(walk_length=3)(AddLaplacianPE(k=4)(batch))
    out = AddRandomWalkPE(walk_length=2, attr_name=None)(out)  # appended to x
    assert (batch._slice_dict, batch._inc_dict) == tables
    for i, (graph, split) in enumerate(zip(graphs, out.to_data_list(), strict=True)):
        single = AddRandomWalkPE(walk_length=3)(AddLaplacianPE(k=4)(graph))
        single = AddRandomWalkPE(walk_length=2, attr_name=None)(single)
        for name in ("lap_pe", "lap_pe_eigvals", "lap_pe_mask", "rw_pe", "x"):
            torch.testing.assert_close(split[name], single[name], atol=2e-5, rtol=0)
            torch.testing.assert_close(out[i][name], single[name], atol=2e-5, rtol=0)


def test_laplacian_pe_agrees_with_pyg_up_to_sign(generator):
    n = 30
    data = Data(edge_index=connected_random_graph(n, 20, generator), num_nodes=n)
    ours = AddLaplacianPE(k=6, sign=None)(data).lap_pe.double()
    theirs = AddLaplacianEigenvectorPE(k=6, is_undirected=True)(data).laplacian_eigenvector_pe
    signs = torch.sign((ours * theirs.double()).sum(0))
    torch.testing.assert_close(ours * signs, theirs.double(), atol=1e-4, rtol=0)


def test_canonical_signs_are_solver_independent_and_permutation_equivariant(generator):
    n = 25
    edges = connected_random_graph(n, 15, generator)
    data = Data(edge_index=edges, num_nodes=n)
    pe = AddLaplacianPE(k=5, normalization="sym")(data).lap_pe.double()
    # flipping the solver's signs changes nothing
    eig = laplacian_eigs(edges, n, 5, skip_null_space=True, dtype=F64)
    flips = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0], dtype=F64)
    signs_a = canonical_signs(eig.eigenvectors)
    signs_b = canonical_signs(eig.eigenvectors * flips)
    torch.testing.assert_close(signs_a * flips, signs_b)
    # relabelling the nodes permutes the encoding
    perm = torch.randperm(n, generator=generator)
    inverse = torch.argsort(perm)
    permuted = Data(edge_index=inverse[edges], num_nodes=n)
    pe_perm = AddLaplacianPE(k=5)(permuted).lap_pe.double()
    torch.testing.assert_close(pe_perm[inverse], pe, atol=1e-5, rtol=0)


def test_canonical_sign_rule_and_fallback():
    v = torch.tensor([[3.0, 1.0], [-1.0, -1.0], [-1.0, 0.0], [-1.0, 0.0]])
    # column 0: sum of cubes 27 - 3 > 0 keeps it; column 1 is antisymmetric: the largest
    # magnitude (a tie between rows 0 and 1) goes to the lowest index, row 0, positive
    assert canonical_signs(v).tolist() == [[1.0, 1.0]]
    assert canonical_signs(-v).tolist() == [[-1.0, -1.0]]
    # padding columns and per-graph decisions
    batch = torch.tensor([0, 0, 1, 1])
    w = torch.tensor([[-2.0, 0.0], [1.0, 0.0], [0.5, 0.0], [1.0, 0.0]])
    assert canonical_signs(w, batch, 2).tolist() == [[-1.0, 1.0], [1.0, 1.0]]
    # every floating dtype, the half precisions through their own per-graph sums; an
    # unsorted batch gives each graph the same signs as the sorted one
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        signs = canonical_signs(w.to(dtype), batch, 2)
        assert signs.dtype == dtype and signs.tolist() == [[-1.0, 1.0], [1.0, 1.0]]
    perm = torch.tensor([2, 0, 3, 1])
    assert canonical_signs(w[perm], batch[perm], 2).tolist() == [[-1.0, 1.0], [1.0, 1.0]]


def reference_sign(v: torch.Tensor) -> float:
    """The documented rule for one eigenvector on one graph, column by column."""
    tau = torch.finfo(v.dtype).eps ** (1 / 3)
    if not v.any():
        return 1.0
    for p in (3, 5, 7):
        moment = float((v**p).sum())
        if abs(moment) > tau * float((v.abs() ** p).sum()):
            return math.copysign(1.0, moment)
    peak = v.abs().max()
    first = int(torch.nonzero(v.abs() >= (1 - tau) * peak)[0])
    return math.copysign(1.0, float(v[first]))


def test_canonical_signs_match_the_rule_column_by_column(generator):
    # per graph: generic columns, antisymmetric ones (every odd moment vanishes), ones
    # whose cube moment vanishes but not the fifth (1 + 1 - (2^1/3)^3 = 0), zero padding
    sizes = [6, 9, 7]
    blocks, flips = [], []
    for n in sizes:
        generic = torch.randn(n, 2, generator=generator, dtype=F64)
        half = torch.randn(n // 2, 1, generator=generator, dtype=F64)
        anti = torch.cat([half, -half.flip(0), torch.zeros(n % 2, 1, dtype=F64)])
        cube_free = torch.zeros(n, 1, dtype=F64)
        cube_free[:3, 0] = torch.tensor([1.0, 1.0, -(2 ** (1 / 3))], dtype=F64)
        flip = float(torch.randint(0, 2, (), generator=generator) * 2 - 1)
        flips.append(flip)
        blocks.append(torch.cat([generic, anti, flip * cube_free, torch.zeros(n, 1)], 1))
    vectors = torch.cat(blocks)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    expected = [[reference_sign(block[:, j]) for j in range(5)] for block in blocks]
    assert canonical_signs(vectors, batch, len(sizes)).tolist() == expected
    for block, row in zip(blocks, expected, strict=True):
        assert canonical_signs(block).tolist() == [row]
    # sum of fifth powers 2 - 2^(5/3) < 0: the canonical sign undoes each flip, negated
    assert [row[3] for row in expected] == [-flip for flip in flips]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_one_graph_signs_equal_those_of_a_batch_of_one(dtype, generator):
    # one graph on the CPU takes a NumPy route (float32 / float64); the batched route is
    # its oracle, on generic, antisymmetric (the fallback) and all-zero columns
    half = torch.randn(4, 3, generator=generator, dtype=F64)
    vectors = torch.cat(
        [torch.randn(8, 3, generator=generator, dtype=F64), torch.cat([half, -half.flip(0)])], 1
    )
    vectors = torch.cat([vectors, torch.zeros(8, 1, dtype=F64)], 1).to(dtype)
    batched = canonical_signs(vectors, torch.zeros(8, dtype=torch.long), 1)
    one = canonical_signs(vectors)
    assert one.dtype == dtype and torch.equal(one, batched)
    assert one[0].tolist() == [reference_sign(vectors[:, j]) for j in range(7)]


def test_random_signs_are_reproducible_with_a_generator(generator):
    data = small_graphs(generator)[1]
    canonical = AddLaplacianPE(k=4)(data).lap_pe

    def run(seed):
        return AddLaplacianPE(k=4, sign="random", generator=torch.Generator().manual_seed(seed))(
            data
        ).lap_pe

    a, b = run(1), run(1)
    assert torch.equal(a, b)
    flips = {tuple(torch.sign((run(s) * canonical).sum(0)).tolist()) for s in range(8)}
    assert len(flips) > 1
    torch.testing.assert_close(a.abs(), canonical.abs())


def test_laplacian_pe_is_deterministic_without_a_generator(generator):
    data = small_graphs(generator)[2]
    assert torch.equal(AddLaplacianPE(k=3)(data).lap_pe, AddLaplacianPE(k=3)(data).lap_pe)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"k": -1}, ValueError),
        ({"k": 1.5}, ValueError),
        ({"k": 2, "sign": "flip"}, ValueError),
        ({"k": 2, "attr_name": None}, TypeError),
        ({"k": 2, "normalization": "l1"}, ValueError),
        ({"k": 2, "method": "eig"}, ValueError),
    ],
)
def test_laplacian_pe_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        AddLaplacianPE(**kwargs)


def test_laplacian_pe_rejects_directed_graphs():
    with pytest.raises(ValueError, match="undirected"):
        AddLaplacianPE(k=2)(Data(edge_index=torch.tensor([[0, 1], [1, 2]]), num_nodes=3))


# ---------------------------------------------------------------------------------------
# AddRandomWalkPE
# ---------------------------------------------------------------------------------------


def dense_return_probabilities(edges, n, weight, walk_length):
    a = torch.zeros(n, n, dtype=F64)
    w = torch.ones(edges.shape[1], dtype=F64) if weight is None else weight.double()
    a.index_put_((edges[0], edges[1]), w, accumulate=True)
    d = a.sum(1)
    p = torch.where(d > 0, 1.0 / d.clamp_min(1e-300), 0.0)[:, None] * a
    return torch.stack(
        [torch.linalg.matrix_power(p, t).diagonal() for t in range(1, walk_length + 1)], 1
    )


def pyg_random_walk_pe(data, walk_length):
    with warnings.catch_warnings():
        # PyG's own sparse construction warns on torch 2.13; not ours to fix
        warnings.simplefilter("ignore", UserWarning)
        return PyGRandomWalkPE(walk_length)(data).random_walk_pe


@pytest.mark.parametrize("kind", ["undirected", "self_loops", "directed", "weighted", "isolated"])
def test_random_walk_pe_matches_the_dense_oracle_and_pyg(kind, generator):
    n = 24
    edges = connected_random_graph(n, 14, generator)
    weight = None
    if kind == "self_loops":
        edges = torch.cat([edges, torch.tensor([[3, 7], [3, 7]])], 1)
    elif kind == "directed":
        edges = coalesce(torch.randint(0, n, (2, 70), generator=generator), num_nodes=n)
    elif kind == "weighted":
        weight = symmetric_weights(edges, generator).float() + 1.0
    elif kind == "isolated":
        edges = edges[:, (edges < n - 3).all(0)]
    data = Data(edge_index=edges, num_nodes=n)
    if weight is not None:
        data.edge_weight = weight
    ours = AddRandomWalkPE(walk_length=9)(data).rw_pe
    expected = dense_return_probabilities(edges, n, weight, 9)
    torch.testing.assert_close(ours.double(), expected, atol=1e-6, rtol=1e-5)
    pyg = pyg_random_walk_pe(data, 9)
    if kind == "weighted":
        # PyG puts 1 / d_i (weighted degree) on every edge, dropping w_ij: not a walk
        assert (ours - pyg).abs().max() > 1e-2
    else:
        torch.testing.assert_close(ours, pyg, atol=1e-6, rtol=1e-5)


def test_random_walk_pe_sums_multi_edges(generator):
    # a doubled edge doubles its weight (PyG's dense path would overwrite instead)
    edges = torch.tensor([[0, 0, 1, 1, 2, 0, 1], [1, 1, 0, 2, 1, 0, 0]])
    ours = AddRandomWalkPE(3)(Data(edge_index=edges, num_nodes=3)).rw_pe
    expected = dense_return_probabilities(edges, 3, None, 3)
    torch.testing.assert_close(ours.double(), expected)


def test_random_walk_pe_float64_and_blocks(monkeypatch, generator):
    n = 40
    edges = connected_random_graph(n, 30, generator)
    weight = symmetric_weights(edges, generator)
    monkeypatch.setattr(transforms_module, "_BLOCK_ENTRIES", 7 * n)  # blocks of 7 columns
    monkeypatch.setattr(transforms_module, "_DENSE_WALK_MAX_NODES", 0)  # the sparse route
    ours = transforms_module.random_walk_return_probabilities(edges, n, 12, weight)
    assert ours.dtype == F64
    torch.testing.assert_close(ours, dense_return_probabilities(edges, n, weight, 12))
    directed = torch.randint(0, n, (2, 120), generator=generator)
    ours = transforms_module.random_walk_return_probabilities(directed, n, 7, weight[:120])
    torch.testing.assert_close(ours, dense_return_probabilities(directed, n, weight[:120], 7))


@pytest.mark.parametrize("walk_length", [1, 2, 3, 8])
@pytest.mark.parametrize("directed", [False, True])
def test_random_walk_dense_and_sparse_routes_match_the_oracle(
    walk_length, directed, monkeypatch, generator
):
    # a small graph takes dense powers (half of them when A is symmetric), a large one or
    # a batch the blocked sparse walk: both against float64 matrix powers, odd and even
    # walk lengths, with a self-loop, a repeated edge and an isolated node
    n = 30
    edges = connected_random_graph(n - 1, 12, generator)
    weight = symmetric_weights(edges, generator)
    extra = torch.tensor([[4, 0, 1], [4, 1, 0]])
    edges = torch.cat([edges, extra], 1)
    weight = torch.cat([weight, torch.tensor([0.7, 0.2, 0.2], dtype=F64)])
    if directed:
        keep = torch.rand(edges.shape[1], generator=generator) < 0.7
        edges, weight = edges[:, keep], weight[keep]
    expected = dense_return_probabilities(edges, n, weight, walk_length)
    for dense_max in (160, 0):
        monkeypatch.setattr(transforms_module, "_DENSE_WALK_MAX_NODES", dense_max)
        ours = transforms_module.random_walk_return_probabilities(edges, n, walk_length, weight)
        assert ours.shape == (n, walk_length) and ours.dtype == F64
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dense_max", [160, 0])
def test_random_walk_pe_is_differentiable_in_the_edge_weights(dense_max, monkeypatch, generator):
    monkeypatch.setattr(transforms_module, "_DENSE_WALK_MAX_NODES", dense_max)
    edges = connected_random_graph(9, 5, generator)
    keys = torch.minimum(edges[0], edges[1]) * 9 + torch.maximum(edges[0], edges[1])
    pairs, pair = torch.unique(keys, return_inverse=True)
    start = torch.rand(pairs.numel(), generator=generator, dtype=F64) + 0.5
    # one weight per edge pair, then one per direction (at a symmetric point: the
    # symmetric shortcut's derivative would be wrong along asymmetric perturbations)
    for directed in (False, True):
        index = torch.arange(edges.shape[1]) if directed else pair
        w0 = start[pair] if directed else start

        def walk(w, index=index):
            return transforms_module.random_walk_return_probabilities(edges, 9, 5, w[index])

        assert torch.autograd.gradcheck(walk, (w0.clone().requires_grad_(),))


def test_random_walk_long_walks_keep_to_the_sparse_route(monkeypatch, generator):
    # the dense route's buffer holds walk_length n x n powers: bounded by _BLOCK_ENTRIES
    n, walk_length = 120, 150  # 2.2e6 entries
    edges = connected_random_graph(n, 60, generator)

    def refuse(*args):
        raise AssertionError("the dense route took a walk too long for its buffer")

    monkeypatch.setattr(transforms_module, "_dense_walk", refuse)
    ours = transforms_module.random_walk_return_probabilities(
        edges, n, walk_length, torch.ones(edges.shape[1], dtype=F64)
    )
    expected = dense_return_probabilities(edges, n, None, walk_length)
    torch.testing.assert_close(ours, expected)


def test_random_walk_pe_on_a_batch_equals_per_graph(generator):
    graphs = small_graphs(generator)
    graphs.append(Data(edge_index=torch.randint(0, 8, (2, 20), generator=generator), num_nodes=8))
    batch = Batch.from_data_list(graphs)
    out = AddRandomWalkPE(walk_length=6)(batch).rw_pe
    expected = torch.cat([AddRandomWalkPE(walk_length=6)(g).rw_pe for g in graphs])
    torch.testing.assert_close(out, expected)


def test_random_walk_pe_does_not_mutate_and_can_extend_x(generator):
    data = small_graphs(generator)[0]
    data.x = torch.randn(data.num_nodes, 3)
    before = snapshot(data)
    out = AddRandomWalkPE(walk_length=4, attr_name=None)(data)
    assert out.x.shape == (data.num_nodes, 7)
    torch.testing.assert_close(out.x[:, :3], before["x"])
    out = AddRandomWalkPE(walk_length=4)(copy.copy(data))
    assert out.rw_pe.shape == (data.num_nodes, 4)
    assert_unchanged(data, before)


def test_random_walk_pe_empty_and_errors():
    out = AddRandomWalkPE(3)(Data(edge_index=torch.empty(2, 0, dtype=torch.long), num_nodes=2))
    assert out.rw_pe.shape == (2, 3) and out.rw_pe.abs().sum() == 0
    with pytest.raises(ValueError, match="walk_length"):
        AddRandomWalkPE(0)
    with pytest.raises(ValueError, match="outside"):
        AddRandomWalkPE(2)(Data(edge_index=torch.tensor([[0, 5], [5, 0]]), num_nodes=3))
    bad = Data(edge_index=torch.tensor([[0, 1], [1, 0]]), edge_weight=torch.tensor([1.0, -2.0]))
    bad.num_nodes = 2
    with pytest.raises(ValueError, match="negative"):
        AddRandomWalkPE(2)(bad)
    for dtype in (torch.float16, torch.bfloat16):
        half = Data(
            edge_index=torch.tensor([[0, 1], [1, 0]]), edge_weight=torch.ones(2, dtype=dtype)
        )
        half.num_nodes = 2
        with pytest.raises(TypeError, match=r"float32 or torch\.float64"):
            AddRandomWalkPE(2)(half)


def test_random_walk_pe_handles_graphs_without_undirected_structure(generator):
    # a directed cycle returns exactly every n steps
    n = 5
    nodes = torch.arange(n)
    out = AddRandomWalkPE(10)(Data(edge_index=torch.stack([nodes, (nodes + 1) % n]), num_nodes=n))
    expected = torch.zeros(10)
    expected[[4, 9]] = 1.0
    torch.testing.assert_close(out.rw_pe, expected.expand(n, 10))
    # undirected version of a random graph keeps to the oracle too
    edges = to_undirected(remove_self_loops(torch.randint(0, 12, (2, 30), generator=generator))[0])
    out = AddRandomWalkPE(5)(Data(edge_index=edges, num_nodes=12)).rw_pe
    torch.testing.assert_close(
        out.double(), dense_return_probabilities(edges, 12, None, 5), atol=1e-6, rtol=1e-5
    )


def test_docstring_examples_run():
    result = doctest.testmod(transforms_module, extraglobs={"torch": torch}, verbose=False)
    assert result.failed == 0


def test_canonical_sign_reads_the_seventh_moment(generator):
    """A vector whose third and fifth moments vanish but not the seventh: the seventh
    decides (here negative), not the largest-entry fallback (here positive)."""
    positive = [1.0, 0.70431297, 0.92292578]
    negative = [-0.95637521, -0.36422144, -0.9869744120408623, -0.6308172702449802]
    v = torch.tensor([*positive, *negative], dtype=F64)
    tau = torch.finfo(F64).eps ** (1 / 3)
    for p in (3, 5):  # the fixture: both lower moments negligible, the seventh not
        assert abs(float((v**p).sum())) <= tau * float((v.abs() ** p).sum())
    assert float((v**7).sum()) < -tau * float((v.abs() ** 7).sum())
    assert float(v[v.abs().argmax()]) > 0  # the fallback would keep the sign
    column = torch.stack([v, torch.randn(7, generator=generator, dtype=F64)], 1)
    assert reference_sign(v) == -1.0
    expected = [[reference_sign(column[:, j]) for j in range(2)]]
    assert canonical_signs(column).tolist() == expected
    batch = torch.tensor([0] * 7 + [1] * 7)
    two = torch.cat([column, -column])
    assert canonical_signs(two, batch, 2).tolist() == [expected[0], [-s for s in expected[0]]]


@pytest.mark.parametrize("dense_max", [160, 0])
def test_random_walk_asymmetric_weights_on_symmetric_edges(dense_max, monkeypatch, generator):
    """Every edge has its reverse but ``w_ij != w_ji``: ``A`` is not symmetric, so the
    half-products shortcut (valid for a symmetric ``A`` only) must not be taken."""
    monkeypatch.setattr(transforms_module, "_DENSE_WALK_MAX_NODES", dense_max)
    n = 20
    edges = connected_random_graph(n, 10, generator)
    weight = torch.rand(edges.shape[1], generator=generator, dtype=F64) + 0.1
    ours = transforms_module.random_walk_return_probabilities(edges, n, 6, weight)
    torch.testing.assert_close(ours, dense_return_probabilities(edges, n, weight, 6))
