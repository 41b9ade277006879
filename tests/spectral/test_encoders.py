"""SignNet, BasisNet and SPE: their symmetries, SPE's stability bound, batching, errors.

Eigenpairs come from a dense float64 ``eigh`` of the normalized Laplacian of small graphs
with repeated eigenvalues (cycles: pairs; the 3-cube: multiplicities 1, 3, 3, 1).
"""

from __future__ import annotations

import pytest
import torch

from tests.spectral._eigen_graphs import (
    DTYPE,
    cycle,
    eigenspaces,
    haar_orthogonal,
    hypercube,
    normalized_laplacian,
    path,
    random_graph,
    rotate_eigenspaces,
)
from torsion.spectral import SPE, BasisNet, SignNet

K = 7  # eigenpairs per graph: every test graph has an eigenvalue gap after the 7th
OUT = 5


def _eig(edge_index, n):
    lam, vecs = torch.linalg.eigh(normalized_laplacian(edge_index, n))
    return lam, vecs


def _make(name: str, k: int = K) -> torch.nn.Module:
    torch.manual_seed(0)  # module initialisation draws from the global generator
    enc = {
        "signnet": lambda: SignNet(OUT, hidden_channels=16),
        "spe": lambda: SPE(OUT, num_partitions=6, hidden_channels=16),
        "basisnet": lambda: BasisNet(k, OUT, hidden_channels=16),
    }[name]()
    return enc.double()


ENCODERS = ["signnet", "spe", "basisnet"]


class EigenBatch:
    """Graphs with their first ``K`` eigenpairs, NaN-padded, concatenated PyG-style."""

    def __init__(self, graphs, generator=None, rotate=False, k=K):
        vecs, vals, batch, edges, offset = [], [], [], [], 0
        self.spaces = []
        for g, (edge_index, n) in enumerate(graphs):
            lam, v = _eig(edge_index, n)
            if rotate:
                v = rotate_eigenspaces(v, lam, generator)
            m = min(n, k)
            pv = torch.full((n, k), float("nan"), dtype=DTYPE)
            pl = torch.full((k,), float("nan"), dtype=DTYPE)
            pv[:, :m], pl[:m] = v[:, :m], lam[:m]
            vecs.append(pv)
            vals.append(pl)
            batch.append(torch.full((n,), g, dtype=torch.long))
            edges.append(edge_index + offset)
            offset += n
        self.eigvecs = torch.cat(vecs)
        self.eigvals = torch.stack(vals)  # (B, k)
        self.batch = torch.cat(batch)
        self.edge_index = torch.cat(edges, dim=1)

    def run(self, enc, *, edges=False, **overrides):
        args = {"eigvecs": self.eigvecs, "eigvals": self.eigvals, "batch": self.batch}
        args.update(overrides)
        kw = {"edge_index": self.edge_index} if edges else {}
        return enc(args["eigvecs"], args["eigvals"], args["batch"], **kw)


def _graphs():
    # Cycle C_8 (pairs), hypercube Q_3 (1, 3, 3, 1), path P_5 (fewer nodes than K: padded).
    return [(cycle(8), 8), (hypercube(3), 8), (path(5), 5), (cycle(10), 10)]


# ---------------------------------------------------------------------------------------
# Invariances
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("edges", [False, True])
def test_signnet_sign_invariance_is_exact(edges, generator):
    enc = _make("signnet")
    data = EigenBatch(_graphs())
    out = data.run(enc, edges=edges)
    for _ in range(3):
        signs = torch.randint(0, 2, (K,), generator=generator).to(DTYPE) * 2 - 1
        assert torch.equal(data.run(enc, edges=edges, eigvecs=data.eigvecs * signs), out)


@pytest.mark.parametrize("name", ["spe", "basisnet"])
@pytest.mark.parametrize("edges", [False, True])
def test_basis_invariance_within_eigenspaces(name, edges, generator):
    enc = _make(name)
    out = EigenBatch(_graphs()).run(enc, edges=edges)
    for _ in range(2):
        rotated = EigenBatch(_graphs(), generator, rotate=True)
        torch.testing.assert_close(rotated.run(enc, edges=edges), out, rtol=0, atol=1e-10)


def test_signnet_is_not_basis_invariant(generator):
    """The basis test has teeth: a sign-only network does see the rotations."""
    enc = _make("signnet")
    out = EigenBatch(_graphs()).run(enc)
    rotated = EigenBatch(_graphs(), generator, rotate=True).run(enc)
    assert (rotated - out).abs().max() > 1e-3


def test_rotation_test_graphs_have_repeated_eigenvalues():
    lam, _ = _eig(hypercube(3), 8)
    assert [len(s) for s in eigenspaces(lam)] == [1, 3, 3, 1]
    lam, _ = _eig(cycle(8), 8)
    assert [len(s) for s in eigenspaces(lam)] == [1, 2, 2, 2, 1]


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("edges", [False, True])
def test_permutation_equivariance(name, edges, generator):
    """Relabel all nodes of a batch at random (the batch vector becomes unsorted)."""
    enc = _make(name)
    data = EigenBatch(_graphs())
    out = data.run(enc, edges=edges)
    n = data.batch.numel()
    perm = torch.randperm(n, generator=generator)
    inv = torch.argsort(perm)
    moved = EigenBatch(_graphs())
    moved.eigvecs, moved.batch = data.eigvecs[perm], data.batch[perm]
    moved.edge_index = inv[data.edge_index]
    torch.testing.assert_close(moved.run(enc, edges=edges), out[perm], rtol=0, atol=1e-11)


@pytest.mark.parametrize("name", ENCODERS)
def test_eigenpair_order_does_not_matter(name, generator):
    enc = _make(name)
    data = EigenBatch(_graphs())
    order = torch.randperm(K, generator=generator)
    out = data.run(enc, eigvecs=data.eigvecs[:, order], eigvals=data.eigvals[:, order])
    torch.testing.assert_close(out, data.run(enc), rtol=0, atol=1e-11)


# ---------------------------------------------------------------------------------------
# SPE stability (Huang et al. 2024, Theorem 3.1) against raw eigenvectors
# ---------------------------------------------------------------------------------------


def _mlp_lipschitz(mlp) -> float:
    """Upper bound on the Lipschitz constant: product of the layers' spectral norms."""
    bound = 1.0
    for layer in mlp.layers:
        bound *= float(torch.linalg.matrix_norm(layer.weight.detach(), ord=2))
    return bound


def _spe_bound(enc: SPE, n: int) -> float:
    """``||SPE(L') - SPE(L)||_F <= bound * ||L' - L||_F`` with all ``n`` eigenpairs.

    ``W_l = psi_l(L)`` is a matrix function, Lipschitz in Frobenius norm with the constant
    of the scalar ``psi_l`` (Kittaneh 1985), so ``||dW||_F <= sqrt(m) Lip(psi) ||dL||_F``.
    ``phi`` acts on every pair, the row sum costs ``sqrt(n)`` and the diagonal 1, then ``rho``.
    """
    m = enc.num_partitions
    return (
        _mlp_lipschitz(enc.rho)
        * (n**0.5 + 1.0)
        * _mlp_lipschitz(enc.phi)
        * m**0.5
        * _mlp_lipschitz(enc.psi)
    )


def _perturbed(lap, eps, generator):
    e = torch.randn(lap.shape, generator=generator, dtype=DTYPE)
    e = (e + e.T) / 2
    return lap + eps * e / torch.linalg.matrix_norm(e)


@pytest.mark.parametrize("graph", ["cycle", "random"])
def test_spe_is_stable_under_laplacian_perturbations(graph, generator):
    n = 10
    edge_index = cycle(n) if graph == "cycle" else random_graph(n, 0.3, generator)
    lap = normalized_laplacian(edge_index, n)
    enc = _make("spe")
    bound = _spe_bound(enc, n)
    lam, vecs = torch.linalg.eigh(lap)
    out = enc(vecs, lam)
    for eps in (1e-1, 1e-3, 1e-6):
        for _ in range(3):
            lam2, vecs2 = torch.linalg.eigh(_perturbed(lap, eps, generator))
            change = torch.linalg.matrix_norm(enc(vecs2, lam2) - out)
            assert change <= bound * eps * (1 + 1e-9) + 1e-12


def test_raw_eigenvectors_jump_where_spe_does_not(generator):
    """On the cycle (eigenvalue pairs) a 1e-8 perturbation rotates eigenvectors by O(1),
    even after the best sign alignment; SPE moves by O(1e-8)."""
    n, eps = 10, 1e-8
    lap = normalized_laplacian(cycle(n), n)
    enc = _make("spe")
    lam, vecs = torch.linalg.eigh(lap)
    with torch.no_grad():
        out = enc(vecs, lam)
    worst_vec, worst_spe = 0.0, 0.0
    for _ in range(5):
        lam2, vecs2 = torch.linalg.eigh(_perturbed(lap, eps, generator))
        aligned = vecs2 * torch.sign((vecs2 * vecs).sum(0))
        worst_vec = max(worst_vec, float(torch.linalg.matrix_norm(aligned - vecs)) / eps)
        with torch.no_grad():
            change = float(torch.linalg.matrix_norm(enc(vecs2, lam2) - out))
        worst_spe = max(worst_spe, change / eps)
    assert worst_vec > 1e6  # ||dV|| / ||dL||: unbounded as eps -> 0
    assert worst_spe < _spe_bound(enc, n)
    assert worst_spe * 1e3 < worst_vec


# ---------------------------------------------------------------------------------------
# Batching, padding, input formats
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("edges", [False, True])
def test_batch_equals_graphs_one_by_one(name, edges):
    enc = _make(name)
    graphs = _graphs()
    data = EigenBatch(graphs)
    out = data.run(enc, edges=edges)
    rows = 0
    for graph in graphs:
        single = EigenBatch([graph])
        n = single.batch.numel()
        got = single.run(enc, edges=edges, batch=None, eigvals=single.eigvals[0])
        torch.testing.assert_close(got, out[rows : rows + n], rtol=0, atol=1e-12)
        rows += n


@pytest.mark.parametrize("name", ["signnet", "spe"])
def test_padding_equals_fewer_eigenpairs(name):
    """A NaN-padded eigenpair contributes nothing: P_5 padded to k = 7 equals its 5 pairs."""
    enc = _make(name)
    lam, vecs = _eig(path(5), 5)
    padded = EigenBatch([(path(5), 5)])
    full = enc(padded.eigvecs, padded.eigvals[0])
    torch.testing.assert_close(full, enc(vecs, lam), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ENCODERS)
def test_eigenvalue_layouts_agree(name):
    enc = _make(name)
    data = EigenBatch(_graphs())
    per_graph = data.run(enc)
    per_node = data.run(enc, eigvals=data.eigvals[data.batch])
    torch.testing.assert_close(per_node, per_graph, rtol=0, atol=0)
    single = EigenBatch([(hypercube(3), 8)])
    one_row = single.run(enc, batch=None, eigvals=single.eigvals)
    torch.testing.assert_close(single.run(enc, batch=None, eigvals=single.eigvals[0]), one_row)


@pytest.mark.parametrize("name", ENCODERS)
def test_empty_input(name):
    enc = _make(name)
    vecs, vals = torch.empty(0, K, dtype=DTYPE), torch.zeros(K, dtype=DTYPE)
    assert enc(vecs, vals).shape == (0, OUT)
    empty_batch = torch.empty(0, dtype=torch.long)
    assert enc(vecs, vals, empty_batch).shape == (0, OUT)
    assert enc(vecs, vals.unsqueeze(0)[:0], empty_batch).shape == (0, OUT)


@pytest.mark.parametrize("name", ENCODERS)
def test_float32_matches_float64(name):
    enc = _make(name)
    data = EigenBatch(_graphs())
    out64 = data.run(enc)
    out32 = data.run(enc.float(), eigvecs=data.eigvecs.float(), eigvals=data.eigvals.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ENCODERS)
def test_gradcheck(name, generator):
    """Gradients with respect to eigenvectors and eigenvalues, on a tiny batch."""
    enc = _make(name, k=3)
    n = 5
    vecs = torch.linalg.qr(torch.randn(n, 3, generator=generator, dtype=DTYPE))[0]
    vals = torch.tensor([[0.3, 0.9, 1.4], [0.1, 0.6, float("nan")]], dtype=DTYPE)
    batch = torch.tensor([0, 0, 0, 1, 1])
    vecs[3:, 2] = float("nan")
    edge_index = torch.tensor([[0, 1, 1, 2, 3, 4], [1, 0, 2, 1, 4, 3]])
    vecs.requires_grad_()
    finite = vals.nan_to_num(0.5).requires_grad_()

    def f(v, lam):
        lam = torch.where(torch.isnan(vals), vals, lam)
        return enc(v, lam, batch, edge_index=edge_index)

    assert torch.autograd.gradcheck(lambda lam: f(vecs.detach().nan_to_num(0.0), lam), (finite,))
    v0 = vecs.detach().nan_to_num(0.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: f(v, finite.detach()), (v0,))


def test_inputs_are_not_modified():
    data = EigenBatch(_graphs())
    saved = (data.eigvecs.clone(), data.eigvals.clone(), data.batch.clone())
    for name in ENCODERS:
        data.run(_make(name), edges=True)
    assert torch.equal(data.eigvecs.isnan(), saved[0].isnan())
    assert torch.equal(data.eigvecs.nan_to_num(), saved[0].nan_to_num())
    assert torch.equal(data.eigvals.nan_to_num(), saved[1].nan_to_num())
    assert torch.equal(data.batch, saved[2])


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ENCODERS)
def test_bad_input(name):
    enc = _make(name)
    data = EigenBatch(_graphs())
    v, lam, b = data.eigvecs, data.eigvals, data.batch
    with pytest.raises(ValueError, match="eigvecs of shape"):
        enc(v[:, 0], lam, b)
    with pytest.raises(ValueError, match="k=7 eigenvectors"):
        enc(v, lam[:, :-1], b)
    with pytest.raises(ValueError, match="one entry per node"):
        enc(v, lam, b[:-1])
    with pytest.raises(ValueError, match="integer tensor"):
        enc(v, lam, b.double())
    with pytest.raises(ValueError, match="share dtype"):
        enc(v, lam.float(), b)
    with pytest.raises(ValueError, match="without batch"):
        enc(v, lam, None)
    with pytest.raises(TypeError, match="float64 parameters"):
        enc(v.float(), lam.float(), b)
    with pytest.raises(ValueError, match="edge_index of shape"):
        enc(v, lam, b, edge_index=data.edge_index.T)
    # graph ids outside the rows: a negative id wrapped around to the last graph
    with pytest.raises(ValueError, match=r"graph ids in \[-1, .*\] but eigvals has"):
        enc(v, lam, torch.where(b == b.max(), -1, b))
    with pytest.raises(ValueError, match="graph ids in"):
        enc(v, lam[:1], b)


@pytest.mark.parametrize("name", ["signnet", "spe"])  # BasisNet is built for k = 7
def test_per_graph_eigenvalues_with_an_empty_graph(name):
    """As many graphs as nodes (an empty graph in the batch): AddLaplacianPE's per-graph
    rows were read as per-node rows, so a node got another graph's eigenvalues."""
    from torch_geometric.data import Batch, Data

    from torsion.spectral import AddLaplacianPE

    torch.manual_seed(0)
    enc = _make(name)
    empty = torch.zeros(2, 0, dtype=torch.long)
    graphs = [
        Data(edge_index=torch.tensor([[0, 1], [1, 0]]), num_nodes=2),
        Data(edge_index=empty, num_nodes=0),
        Data(edge_index=empty, num_nodes=1),
    ]
    transform = AddLaplacianPE(k=2)
    batch = transform(Batch.from_data_list(graphs))
    out = enc(batch.lap_pe.double(), batch.lap_pe_eigvals.double(), batch.batch,
              mask=batch.lap_pe_mask)  # fmt: skip
    alone = transform(graphs[0])
    expected = enc(alone.lap_pe.double(), alone.lap_pe_eigvals.double(), mask=alone.lap_pe_mask)
    torch.testing.assert_close(out[:2], expected, rtol=0, atol=1e-12)


def test_bad_construction():
    with pytest.raises(ValueError, match="out_channels"):
        SignNet(0)
    with pytest.raises(ValueError, match="at least one layer"):
        SPE(4, phi_layers=0)
    with pytest.raises(ValueError, match="num_partitions"):
        SPE(4, num_partitions=0)
    with pytest.raises(ValueError, match="eigval_tol"):
        BasisNet(4, 4, eigval_tol=-1.0)
    enc = BasisNet(4, 3).double()
    data = EigenBatch(_graphs())
    with pytest.raises(ValueError, match="built for k=4"):
        data.run(enc)


def test_basisnet_groups_by_tolerance(generator):
    """Eigenvalues within the tolerance form one space (rotations inside are invisible);
    a wider tolerance merges spaces, so rotating across them is then invisible too."""
    n = 6
    q = haar_orthogonal(n, generator)
    lam = torch.tensor([0.0, 0.5, 0.5 + 1e-9, 1.0, 1.3, 1.3 + 1e-3], dtype=DTYPE)
    enc = _make("basisnet", k=n)
    mix = torch.eye(n, dtype=DTYPE)
    mix[4:, 4:] = haar_orthogonal(2, generator)
    out = enc(q, lam)
    assert (enc(q @ mix, lam) - out).abs().max() > 1e-6  # 1e-3 apart: two spaces
    enc.eigval_tol = 1e-2
    torch.testing.assert_close(enc(q @ mix, lam), enc(q, lam), rtol=0, atol=1e-12)
    mix = torch.eye(n, dtype=DTYPE)
    mix[1:3, 1:3] = haar_orthogonal(2, generator)
    enc.eigval_tol = None
    torch.testing.assert_close(enc(q @ mix, lam), out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ENCODERS)
def test_mask_equals_nan_padding_and_reads_add_laplacian_pe(name):
    """``mask=False`` drops a pair exactly like a NaN eigenvalue, and the transform's
    zero-padded output with its mask gives what the NaN-padded eigenpairs give."""
    enc = _make(name)
    data = EigenBatch(_graphs())
    missing = torch.isnan(data.eigvals)
    zero_padded = data.run(enc, eigvals=data.eigvals.nan_to_num(0.0), eigvecs=data.eigvecs)
    masked = enc(
        data.eigvecs.nan_to_num(0.0), data.eigvals.nan_to_num(0.0), data.batch, mask=~missing
    )
    torch.testing.assert_close(masked, data.run(enc), rtol=0, atol=1e-12)
    assert missing.any()
    if name != "spe":  # zero vectors add nothing to SPE's V diag(psi) V^T; the others see
        # a zero-padded pair as a real eigenpair with eigenvalue 0 unless it is masked
        assert not torch.allclose(zero_padded, masked)
    with pytest.raises(ValueError, match="mask must be a bool tensor shaped like eigvals"):
        enc(data.eigvecs, data.eigvals, data.batch, mask=~missing[:, :2])


# ---------------------------------------------------------------------------------------
# Dense references of the documented formulas
# ---------------------------------------------------------------------------------------


def _dense_mlp(mlp, h, adjacency=None):
    """``_MLP`` written out: a GIN layer adds ``A h`` (``A[i, j]`` counts edges ``j -> i``)
    along the node dimension (the first) before each linear map, ReLU between layers."""
    layers = list(mlp.layers)
    for i, layer in enumerate(layers):
        if adjacency is not None:
            h = h + torch.einsum("ij,j...->i...", adjacency, h)
        h = layer(h)
        if i < len(layers) - 1:
            h = torch.relu(h)
    return h


def test_signnet_gin_sums_in_neighbours_on_a_directed_graph(generator):
    """``phi`` as a GIN: each layer adds the sum over the *in*-neighbours ``j -> i`` to
    the node's own features; checked against a dense adjacency on a directed graph,
    where in- and out-neighbours differ."""
    enc = _make("signnet")
    n, k = 6, 3
    vecs = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=DTYPE))[0]
    lam = torch.tensor([0.3, 0.8, 1.2], dtype=DTYPE)
    edge_index = torch.tensor([[0, 0, 1, 2, 3, 5, 5], [1, 2, 2, 3, 4, 4, 0]])
    adjacency = torch.zeros(n, n, dtype=DTYPE)
    adjacency.index_put_((edge_index[1], edge_index[0]), torch.ones(7, dtype=DTYPE), True)
    assert not torch.equal(adjacency, adjacency.T)
    h = 0
    for i in range(k):
        for s in (1.0, -1.0):
            x = torch.stack([s * vecs[:, i], lam[i].expand(n)], -1)  # (n, 2)
            h = h + _dense_mlp(enc.phi, x, adjacency)
    expected = _dense_mlp(enc.rho, h)
    got = enc(vecs, lam, edge_index=edge_index)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # no edges at all: the GIN is the node-wise MLP (the self term is kept)
    empty = torch.empty(2, 0, dtype=torch.long)
    torch.testing.assert_close(enc(vecs, lam, edge_index=empty), enc(vecs, lam), rtol=0, atol=0)


def test_basisnet_matches_a_dense_reference_of_its_eigenspaces(generator):
    """BasisNet on one graph against its documented formula: each eigenspace ``s``
    enters as pair features ``(P_s[i, j], lambda_s, d_s)``, pooled to ``[sum_j, diagonal]``
    and placed in the slot of its first eigenpair; other slots (the rest of a repeated
    space, a missing pair) stay zero."""
    n, k = 6, 5
    enc = _make("basisnet", k=k)
    vecs = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=DTYPE))[0]
    lam = torch.tensor([0.2, 0.4, 0.4, 0.9, float("nan")], dtype=DTYPE)
    vecs[:, 4] = float("nan")
    spaces = {0: [0], 1: [1, 2], 3: [3]}  # leader slot -> its eigenpairs
    hidden = enc.phi.layers[-1].out_features
    slots = torch.zeros(n, k, 2 * hidden, dtype=DTYPE)
    for leader, members in spaces.items():
        v = vecs[:, members]
        feats = torch.stack(
            [
                v @ v.T,
                lam[leader].expand(n, n),
                torch.full((n, n), float(len(members)), dtype=DTYPE),
            ],
            -1,
        )
        h = _dense_mlp(enc.phi, feats)  # (n, n, hidden)
        slots[:, leader] = torch.cat([h.sum(1), h.diagonal(dim1=0, dim2=1).T], -1)
    expected = _dense_mlp(enc.rho, slots.flatten(1))
    torch.testing.assert_close(enc(vecs, lam), expected, rtol=0, atol=1e-12)


def test_basisnet_tolerance_is_absolute_below_one(generator):
    """Eigenvalues closer than ``eigval_tol * max(1, |lambda|)`` share a space: near 0 the
    tolerance is absolute (6e-6 in float64), so 0.01 and 0.01 + 1e-6 are one space
    and rotations inside it are invisible; 1e-4 apart they are two."""
    n = 5
    q = haar_orthogonal(n, generator)
    enc = _make("basisnet", k=n)
    mix = torch.eye(n, dtype=DTYPE)
    mix[:2, :2] = haar_orthogonal(2, generator)
    lam = torch.tensor([0.01, 0.01 + 1e-6, 0.5, 1.0, 1.5], dtype=DTYPE)
    torch.testing.assert_close(enc(q @ mix, lam), enc(q, lam), rtol=0, atol=1e-12)
    lam[1] = 0.01 + 1e-4
    assert (enc(q @ mix, lam) - enc(q, lam)).abs().max() > 1e-6


def test_basisnet_zero_tolerance_still_groups_exact_repeats(generator):
    """``eigval_tol=0``: exactly equal eigenvalues are one space (basis invariant),
    eigenvalues 1e-12 apart are two."""
    n = 5
    q = haar_orthogonal(n, generator)
    torch.manual_seed(0)
    enc = BasisNet(n, OUT, hidden_channels=16, eigval_tol=0.0).double()
    mix = torch.eye(n, dtype=DTYPE)
    mix[1:3, 1:3] = haar_orthogonal(2, generator)
    lam = torch.tensor([0.2, 0.6, 0.6, 1.0, 1.5], dtype=DTYPE)
    torch.testing.assert_close(enc(q @ mix, lam), enc(q, lam), rtol=0, atol=1e-12)
    lam[2] = 0.6 + 1e-12
    assert (enc(q @ mix, lam) - enc(q, lam)).abs().max() > 1e-6


@pytest.mark.parametrize("name", ENCODERS)
def test_masked_pair_ignores_its_eigenvector_entries(name, generator):
    """``mask=False`` drops the whole pair: whatever its eigenvector column holds (the
    transform stores zeros, a caller may not), the output is that of a zero column."""
    enc = _make(name)
    data = EigenBatch(_graphs())
    vecs, vals = data.eigvecs.nan_to_num(0.0), data.eigvals.nan_to_num(0.0)
    mask = torch.ones_like(vals, dtype=torch.bool)
    mask[1, 2] = False  # the hypercube's third pair
    rows = data.batch == 1
    garbage = vecs.clone()
    garbage[rows, 2] = torch.randn(int(rows.sum()), generator=generator, dtype=DTYPE)
    zeroed = vecs.clone()
    zeroed[rows, 2] = 0.0
    expected = enc(zeroed, vals, data.batch, mask=mask)
    got = enc(garbage, vals, data.batch, mask=mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
