"""EquivariantConv against an unfused e3nn pipeline; equivariance, permutations, backends,
input validation."""

import pytest
import torch
from e3nn import o3
from e3nn.nn import FullyConnectedNet
from e3nn.util.test import assert_equivariant
from torch_geometric.nn import MessagePassing

from tests.equivariant._helpers import BACKENDS, F64, default_float64, e3nn_float64, randn
from torsion.equivariant import (
    EquivariantConv,
    Linear,
    RadialBasis,
    RadialMLP,
    SphericalHarmonics,
)

IRREPS_IN = "4x0e + 3x1o + 2x2e"
IRREPS_SH = "0e + 1o + 2e"
IRREPS_OUT = "5x0e + 3x1o + 2x1e + 2x2e + 1x3o"
NUM_RADIAL = 6


def _graph(generator, num_nodes=7, num_edges=20):
    """Random edges with a duplicate, a self-loop and an isolated node (the last)."""
    src = torch.randint(0, num_nodes - 1, (num_edges,), generator=generator)
    dst = torch.randint(0, num_nodes - 1, (num_edges,), generator=generator)
    src[1], dst[1] = src[0], dst[0]
    dst[2] = src[2]
    x = randn(generator, num_nodes, o3.Irreps(IRREPS_IN).dim)
    edge_attr = randn(generator, num_edges, o3.Irreps(IRREPS_SH).dim)
    edge_radial = randn(generator, num_edges, NUM_RADIAL)
    return x, torch.stack([src, dst]), edge_attr, edge_radial


def _conv(backend="auto", **kwargs):
    return EquivariantConv(
        IRREPS_IN, IRREPS_SH, IRREPS_OUT, NUM_RADIAL, 8, backend=backend, dtype=F64, **kwargs
    )


def _unfused(conv, x, edge_index, edge_attr, edge_radial):
    """gather -> e3nn.o3.TensorProduct per edge -> index_add, the layer's math spelled out."""
    tp = e3nn_float64(conv.descriptor.to_e3nn, shared_weights=False, internal_weights=False)
    src, dst = edge_index
    messages = tp(conv.linear_in(x)[src], edge_attr, conv.radial(edge_radial))
    summed = messages.new_zeros(x.shape[0], messages.shape[1]).index_add(0, dst, messages)
    out = conv.linear_out(summed * conv.message_scale)
    if conv.self_connection is not None:
        out = out + conv.self_connection(x)
    return out


@pytest.mark.parametrize("self_connection", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_matches_the_unfused_e3nn_pipeline(backend, self_connection, generator):
    conv = _conv(backend, avg_num_neighbors=3.0, self_connection=self_connection)
    assert isinstance(conv, MessagePassing)
    inputs = _graph(generator)
    torch.testing.assert_close(conv(*inputs), _unfused(conv, *inputs), atol=1e-10, rtol=1e-10)


def test_conv_without_edges_is_the_self_connection(generator):
    conv = _conv()
    x = randn(generator, 4, conv.irreps_node_in.dim)
    empty = torch.zeros(2, 0, dtype=torch.long)
    out = conv(x, empty, randn(generator, 0, 9), randn(generator, 0, NUM_RADIAL))
    torch.testing.assert_close(out, conv.self_connection(x), atol=0, rtol=0)


def test_conv_backends_agree_with_gradients(generator):
    if len(BACKENDS) < 2:
        pytest.skip("only the reference backend is registered")
    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in _graph(generator)]
    reference = _conv("reference")
    results = []
    for backend in BACKENDS:
        conv = _conv(backend)
        conv.load_state_dict(reference.state_dict())
        out = conv(*inputs)
        grads = torch.autograd.grad(out.pow(2).sum(), [inputs[0], inputs[2], inputs[3]])
        results.append((out, *grads))
    for other in results[1:]:
        for ours, theirs in zip(results[0], other, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_is_equivariant(backend, generator):
    conv = _conv(backend)
    x, edge_index, edge_attr, edge_radial = _graph(generator)
    with default_float64():
        assert_equivariant(
            lambda x, edge_attr: conv(x, edge_index, edge_attr, edge_radial),
            args_in=[x, edge_attr],
            irreps_in=[conv.irreps_node_in, conv.irreps_edge_attr],
            irreps_out=[conv.irreps_node_out],
            tolerance=1e-10,
        )


def test_conv_is_permutation_equivariant(generator):
    conv = _conv()
    x, edge_index, edge_attr, edge_radial = _graph(generator)
    nodes = torch.randperm(x.shape[0], generator=generator)
    edges = torch.randperm(edge_index.shape[1], generator=generator)
    relabel = torch.empty_like(nodes)
    relabel[nodes] = torch.arange(len(nodes))
    permuted = conv(x[nodes], relabel[edge_index[:, edges]], edge_attr[edges], edge_radial[edges])
    torch.testing.assert_close(permuted, conv(x, edge_index, edge_attr, edge_radial)[nodes])


def test_radial_mlp_is_e3nns_fully_connected_net(generator):
    mlp = RadialMLP([6, 16, 16, 10], dtype=F64)
    theirs = e3nn_float64(FullyConnectedNet, [6, 16, 16, 10], torch.nn.functional.silu)
    with torch.no_grad():
        for theirs_weight, ours_weight in zip(theirs.parameters(), mlp.weights, strict=True):
            theirs_weight.copy_(ours_weight)
    x = randn(generator, 30, 6)
    torch.testing.assert_close(mlp(x), theirs(x), atol=1e-12, rtol=1e-12)
    assert not mlp(torch.zeros(3, 6, dtype=F64)).any()  # bias-free: nothing beyond the cutoff
    with pytest.raises(ValueError, match="sizes"):
        RadialMLP([4])


def test_conv_rejects_bad_input(generator):
    conv = _conv("reference")
    x, edge_index, edge_attr, edge_radial = _graph(generator)
    with pytest.raises(ValueError, match="x has shape"):
        conv(x[:, :-1], edge_index, edge_attr, edge_radial)
    with pytest.raises(ValueError, match="edge_attr has shape"):
        conv(x, edge_index, edge_attr[:, :-1], edge_radial)
    with pytest.raises(ValueError, match=r"edge_index must have shape \(2, E\)"):
        conv(x, edge_index[0], edge_attr, edge_radial)
    with pytest.raises(TypeError, match="edge_index must be int64 or int32"):
        conv(x, edge_index.double(), edge_attr, edge_radial)
    with pytest.raises(ValueError, match=r"edge_attr must have shape \(19, 9\)"):
        conv(x, edge_index[:, 1:], edge_attr, edge_radial)
    with pytest.raises(ValueError, match=r"edge_radial must have shape \(20, 6\)"):
        conv(x, edge_index, edge_attr, edge_radial[:, 1:])
    bad = edge_index.clone()
    bad[0, 3] = x.shape[0]
    with pytest.raises(ValueError, match="edge_src holds indices"):
        conv(x, bad, edge_attr, edge_radial)
    with pytest.raises(ValueError, match="edge_attr is on meta, but x is on cpu"):
        conv(x, edge_index, edge_attr.to("meta"), edge_radial)
    with pytest.raises(ValueError, match="avg_num_neighbors"):
        _conv(avg_num_neighbors=0.0)
    assert isinstance(conv.linear_in, Linear)
    assert not x.isnan().any()


def test_conv_rejects_irreps_that_no_path_reaches():
    with pytest.raises(ValueError, match=r"no tensor-product path .*'4x0e'.*'1x0e'.*'4x1o'"):
        EquivariantConv("4x0e", "0e", "4x1o", num_radial=4, radial_hidden=8)


# -- self-loops: an edge vector identically 0 --------------------------------------------------

#: Edges 0 <-> 1, 1 <-> 2 and the self-loop 2 -> 2 (edge 2).
LOOP_EDGES = torch.tensor([[0, 1, 2, 1, 2], [1, 0, 2, 2, 1]])


def _lengths(vectors):
    """``|v|`` with finite derivatives of every order at ``v = 0`` (``Tensor.norm``'s second
    derivative is NaN there), so that only the harmonics are under test."""
    squared = vectors.pow(2).sum(-1)
    nonzero = squared > 0
    return torch.where(nonzero, torch.where(nonzero, squared, 1.0).sqrt(), 0.0)


def _self_loop_energy(dtype, generator):
    """``pos -> E`` of a conv on spherical harmonics and a radial basis of the edge vectors,
    and ``pos -> E`` with the self-loop's vector detached: the loop's message does not
    depend on the positions, so both have the same forces and Hessian."""
    sh = SphericalHarmonics("0e + 1o + 2e")
    radial = RadialBasis(4, cutoff=3.0, dtype=dtype)
    conv = EquivariantConv("2x0e", sh.irreps_out, "2x0e + 1x1o", 4, 4, dtype=dtype)
    h = randn(generator, 3, 2, dtype=dtype)
    loop = (LOOP_EDGES[0] == LOOP_EDGES[1])[:, None]

    def energy(pos, detach_loop=False):
        vectors = pos[LOOP_EDGES[0]] - pos[LOOP_EDGES[1]]
        if detach_loop:
            vectors = torch.where(loop, vectors.detach(), vectors)
        return conv(h, LOOP_EDGES, sh(vectors), radial(_lengths(vectors))).pow(2).sum()

    return energy


def _forces(energy, pos, **kwargs):
    pos = pos.detach().requires_grad_()
    return -torch.autograd.grad(energy(pos, **kwargs), pos, create_graph=True)[0], pos


def test_self_loop_forces_are_those_of_the_detached_loop_in_float32(generator):
    """e3nn's normalization gave the zero vector a gradient of order 1e12; the loop's two ends (one
    node) cancelled it only to float32 rounding, which wiped out the node's force."""
    energy = _self_loop_energy(torch.float32, generator)
    pos = randn(generator, 3, 3, dtype=torch.float32)
    live, _ = _forces(energy, pos)
    detached, _ = _forces(energy, pos, detach_loop=True)
    torch.testing.assert_close(live, detached)


def test_self_loop_hessian_vector_product_is_the_finite_difference_of_forces(generator):
    """Double backward (force training, Hessians) through a self-loop: e3nn's normalization
    made it NaN. Oracle: central differences of the forces along ``direction``."""
    energy = _self_loop_energy(F64, generator)
    pos, direction = randn(generator, 3, 3), randn(generator, 3, 3)
    forces, leaf = _forces(energy, pos)
    (hvp,) = torch.autograd.grad(forces, leaf, direction)
    eps = 1e-6
    fd = (_forces(energy, pos + eps * direction)[0] - _forces(energy, pos - eps * direction)[0]) / (
        2 * eps
    )
    torch.testing.assert_close(hvp, fd.detach(), atol=1e-7, rtol=1e-6)


@pytest.mark.slow
def test_conv_compiles_without_graph_breaks(generator):
    """One graph (``fullgraph=True``) for the whole layer, forward and backward, equal to
    eager; ``torch.compile`` used to fail building its guards on the layer's e3nn Irreps."""
    torch._dynamo.reset()
    conv = _conv(avg_num_neighbors=3.0)
    x, edge_index, edge_attr, edge_radial = _graph(generator)
    inputs = [x.requires_grad_(), edge_index, edge_attr.requires_grad_(), edge_radial]
    wrt = [x, edge_attr, *conv.parameters()]
    eager = torch.autograd.grad(conv(*inputs).sin().sum(), wrt)
    compiled_conv = torch.compile(conv, fullgraph=True, backend="aot_eager")
    compiled = torch.autograd.grad(compiled_conv(*inputs).sin().sum(), wrt)
    torch.testing.assert_close(compiled, eager, atol=1e-12, rtol=1e-10)
    torch._dynamo.reset()
