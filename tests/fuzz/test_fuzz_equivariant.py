"""Fuzz the tensor products, the fused convolution and ``EquivariantConv``.

Random irreps (l <= 2, small multiplicities), batch shapes including empty ones, graphs
with ``E = 0``, ``E = 1``, isolated nodes and repeated edges. Oracles: e3nn's
``TensorProduct`` built from the same descriptor (float64), the reference backend, and
the unfused gather -> tensor product -> scatter spelled out per edge.
"""

from __future__ import annotations

import pytest
import torch
from e3nn import o3
from hypothesis import given
from hypothesis import strategies as st

from tests.equivariant._helpers import BACKENDS, e3nn_float64
from tests.fuzz._strategies import assert_finite, assert_unchanged, clones, fuzz_settings
from torsion.equivariant import EquivariantConv, TensorProduct
from torsion.kernels import conv
from torsion.reps import TPDescriptor

F64 = torch.float64


@st.composite
def irreps(draw, max_terms: int = 3, max_mul: int = 3, max_l: int = 2):
    terms = draw(
        st.lists(
            st.tuples(st.integers(1, max_mul), st.integers(0, max_l), st.sampled_from(["e", "o"])),
            min_size=1,
            max_size=max_terms,
        )
    )
    return o3.Irreps("+".join(f"{mul}x{l}{p}" for mul, l, p in terms))


def _descriptor(kind, in1, in2, out):
    if kind == "channelwise":
        return TPDescriptor.channelwise(in1, in2)
    return TPDescriptor.fully_connected(in1, in2, out)


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(40)
@given(
    in1=irreps(),
    in2=irreps(max_mul=1),
    out=irreps(),
    kind=st.sampled_from(["channelwise", "fully_connected"]),
    batch=st.lists(st.integers(0, 3), max_size=2).map(tuple),
    seed=st.integers(0, 2**31 - 1),
)
def test_tensor_product_matches_e3nn(backend, in1, in2, out, kind, batch, seed):
    descriptor = _descriptor(kind, in1, in2, out)
    gen = torch.Generator().manual_seed(seed)
    tp = TensorProduct(descriptor, backend=backend, dtype=F64)
    x1 = torch.randn(*batch, descriptor.irreps_in1.dim, dtype=F64, generator=gen)
    x2 = torch.randn(*batch, descriptor.irreps_in2.dim, dtype=F64, generator=gen)
    before = clones(x1=x1, x2=x2)
    y = tp(x1, x2)
    assert_unchanged(before, {"x1": x1, "x2": x2})
    assert y.shape == (*batch, descriptor.irreps_out.dim)
    assert_finite(y, "TensorProduct")
    if tp.weight is None or descriptor.irreps_out.dim == 0:
        assert not y.any()
        return
    reference = e3nn_float64(descriptor.to_e3nn)
    with torch.no_grad():
        reference.weight.copy_(tp.weight)
    torch.testing.assert_close(y, reference(x1, x2), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(40)
@given(
    num_nodes=st.integers(0, 6),
    num_edges=st.integers(0, 8),
    in1=irreps(),
    seed=st.integers(0, 2**31 - 1),
    isolated=st.booleans(),
)
def test_conv_matches_unfused_message_passing(backend, num_nodes, num_edges, in1, seed, isolated):
    descriptor = TPDescriptor.channelwise(in1, "0e + 1o + 2e")
    gen = torch.Generator().manual_seed(seed)
    num_edges = num_edges if num_nodes else 0
    span = max(num_nodes - 1, 1) if isolated else max(num_nodes, 1)  # last node isolated
    edge_src = torch.randint(0, span, (num_edges,), generator=gen)
    edge_dst = torch.randint(0, span, (num_edges,), generator=gen)
    x = torch.randn(num_nodes, descriptor.irreps_in1.dim, dtype=F64, generator=gen)
    attr = torch.randn(num_edges, descriptor.irreps_in2.dim, dtype=F64, generator=gen)
    weight = torch.randn(num_edges, descriptor.weight_numel, dtype=F64, generator=gen)
    tensors = {"x": x, "attr": attr, "weight": weight, "src": edge_src, "dst": edge_dst}
    before = clones(**tensors)
    y = conv(descriptor, x, attr, weight, edge_src, edge_dst, num_nodes, backend=backend)
    assert_unchanged(before, tensors)
    assert y.shape == (num_nodes, descriptor.irreps_out.dim)
    assert_finite(y, "conv")
    tp = TensorProduct(
        descriptor, shared_weights=False, internal_weights=False, backend="reference", dtype=F64
    )
    messages = tp(x[edge_src], attr, weight)
    expected = messages.new_zeros(y.shape).index_add(0, edge_dst, messages)
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(25)
@given(
    num_nodes=st.integers(1, 5),
    bad=st.sampled_from(["dst_high", "src_high", "negative"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_equivariant_conv_rejects_bad_graphs_with_clear_errors(backend, num_nodes, bad, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = EquivariantConv(
        "2x0e + 1x1o", "0e + 1o", "2x0e + 1x1o", 3, 4, backend=backend, dtype=F64
    )
    x = torch.randn(num_nodes, 5, dtype=F64, generator=gen)
    edge_index = torch.zeros(2, 1, dtype=torch.long)
    if bad == "dst_high":
        edge_index[1, 0] = num_nodes
    elif bad == "src_high":
        edge_index[0, 0] = num_nodes + 3
    else:
        edge_index[0, 0] = -1
    attr = torch.randn(1, 4, dtype=F64, generator=gen)
    radial = torch.randn(1, 3, dtype=F64, generator=gen)
    with pytest.raises(ValueError, match="outside"):
        layer(x, edge_index, attr, radial)
    with pytest.raises(ValueError, match="last dimension"):
        layer(torch.randn(num_nodes, 6, dtype=F64), edge_index.clamp(0, 0), attr, radial)
    with pytest.raises(ValueError, match="edge_radial"):
        layer(x, edge_index.clamp(0, 0), attr, radial[:, :2])
    with pytest.raises(TypeError, match="dtype"):
        layer(x.float(), edge_index.clamp(0, 0), attr, radial)
    # E = 0 and E = 1 are ordinary graphs
    for e in (0, 1):
        out = layer(x, torch.zeros(2, e, dtype=torch.long), attr[:e], radial[:e])
        assert out.shape == (num_nodes, 5)
        assert_finite(out, f"EquivariantConv with E = {e}")
