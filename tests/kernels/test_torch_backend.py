"""The ``torch`` fast backend against the reference backend (the oracle): random
descriptors in every mode and layout, derivatives to second order, and fused message
passing with awkward edge lists."""

import random

import pytest
import torch

from tests.kernels.test_reference import _default_float64
from tests.reps._random import MODES, random_problem
from torsion import kernels
from torsion.kernels import (
    reference_conv,
    reference_tensor_product,
    torch_conv,
    torch_tensor_product,
)
from torsion.reps import LAYOUTS, TPDescriptor

F64 = torch.float64
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def _randn(generator, *shape, dtype=F64, requires_grad=False):
    x = torch.randn(*shape, generator=generator, dtype=F64).to(dtype)
    return x.requires_grad_(requires_grad)


def _descriptor(seed, modes, muls, layout):
    irreps1, irreps2, irreps_out, instructions = random_problem(
        random.Random(seed), modes, muls=muls
    )
    with _default_float64():
        return TPDescriptor.from_instructions(
            irreps1, irreps2, irreps_out, instructions, layout=layout
        )


def _assert_close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shared", [False, True], ids=["per_sample", "shared"])
@pytest.mark.parametrize(
    ("modes", "muls"),
    [(("uvw",), (2, 3)), (("uvu",), (2, 3)), (("uuu",), (3,)), (MODES, (2, 3))],
    ids=["uvw", "uvu", "uuu", "mixed"],
)
def test_tensor_product_matches_reference(modes, muls, shared, layout, dtype, generator):
    d = _descriptor(len(modes) + len(muls), modes, muls, layout)
    x1 = _randn(generator, 7, d.irreps_in1.dim, dtype=dtype)
    x2 = _randn(generator, 7, d.irreps_in2.dim, dtype=dtype)
    w = _randn(generator, *(() if shared else (7,)), d.weight_numel, dtype=dtype)
    w = w if d.weight_numel else None
    out = torch_tensor_product(d, x1, x2, w)
    assert out.dtype == dtype
    # float32 results are compared with the float64 oracle.
    expected = reference_tensor_product(
        d, x1.double(), x2.double(), None if w is None else w.double()
    )
    _assert_close(out.double(), expected, dtype)


def test_channelwise_l4_with_both_parities_and_broadcasting(generator):
    with _default_float64():
        d = TPDescriptor.channelwise(
            "4x0e+3x1o+2x2e+2x3o+2x4e+2x1e", "0e+1o+2e+3o+4e", "0e+1o+2e+4e", layout="ir_mul"
        )
    x1 = _randn(generator, 3, 1, d.irreps_in1.dim)
    x2 = _randn(generator, 1, 5, d.irreps_in2.dim)
    w = _randn(generator, 5, d.weight_numel)
    _assert_close(torch_tensor_product(d, x1, x2, w), reference_tensor_product(d, x1, x2, w), F64)


def test_empty_path_list_gives_zeros(generator):
    d = TPDescriptor("2x1o+3x0e", "1o", "2x1e+0e")
    out = torch_tensor_product(d, _randn(generator, 4, 9), _randn(generator, 4, 3))
    torch.testing.assert_close(out, torch.zeros(4, 7, dtype=F64), atol=0, rtol=0)


def test_first_and_second_derivatives_match_reference(generator):
    d = _descriptor(5, MODES, (2, 3), "ir_mul")
    x1 = _randn(generator, 4, d.irreps_in1.dim, requires_grad=True)
    x2 = _randn(generator, 4, d.irreps_in2.dim, requires_grad=True)
    w = _randn(generator, 4, d.weight_numel, requires_grad=True)
    probe = _randn(generator, 4, d.irreps_out.dim)

    def grads(fn):
        out = fn(d, x1, x2, w)
        g1, g2 = torch.autograd.grad((out * probe).sum(), (x1, x2), create_graph=True)
        # a force-training style second derivative: d/dw of a loss on the input gradients
        (gw,) = torch.autograd.grad((g1**2).sum() + (g2**2).sum(), (w,))
        return g1, g2, gw

    for ours, theirs in zip(
        grads(torch_tensor_product), grads(reference_tensor_product), strict=True
    ):
        _assert_close(ours, theirs, F64)


def test_gradcheck_and_gradgradcheck(generator):
    d = _descriptor(2, MODES, (2,), "mul_ir")
    x1 = _randn(generator, 2, d.irreps_in1.dim, requires_grad=True)
    x2 = _randn(generator, 2, d.irreps_in2.dim, requires_grad=True)
    w = _randn(generator, 2, d.weight_numel, requires_grad=True)

    def fn(a, b, c):
        return torch_tensor_product(d, a, b, c)

    assert torch.autograd.gradcheck(fn, (x1, x2, w))
    assert torch.autograd.gradgradcheck(fn, (x1, x2, w))


def _edges(generator, num_nodes, num_edges):
    src = torch.randint(0, num_nodes, (num_edges,), generator=generator)
    dst = torch.randint(0, max(num_nodes - 1, 1), (num_edges,), generator=generator)
    return src, dst


@pytest.mark.parametrize("num_edges", [0, 1, 40])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shared", [False, True], ids=["per_edge", "shared"])
def test_conv_matches_reference(num_edges, layout, shared, generator):
    d = _descriptor(1, MODES, (2, 3), layout)
    num_nodes = 6  # the last node receives nothing: isolated
    x = _randn(generator, num_nodes, d.irreps_in1.dim)
    attr = _randn(generator, num_edges, d.irreps_in2.dim)
    w = _randn(generator, *(() if shared else (num_edges,)), d.weight_numel)
    src, dst = _edges(generator, num_nodes, num_edges)
    if num_edges > 1:
        # duplicate edges and self-loops
        src = torch.cat([src, src[:3], torch.arange(3)])
        dst = torch.cat([dst, dst[:3], torch.arange(3)])
        attr = torch.cat([attr, attr[:3], attr[:3]])
        if not shared:
            w = torch.cat([w, w[:3], w[3:6]])
    args = (d, x, attr, w, src, dst, num_nodes)
    out = torch_conv(*args)
    assert out.shape == (num_nodes, d.irreps_out.dim)
    _assert_close(out, reference_conv(*args), F64)
    # the edge order does not matter
    perm = torch.randperm(src.shape[0], generator=generator)
    permuted = (d, x, attr[perm], w if shared else w[perm], src[perm], dst[perm], num_nodes)
    _assert_close(torch_conv(*permuted), out, F64)


def test_conv_chunks_and_int32_indices_and_double_backward(generator, monkeypatch):
    from torsion.kernels import _torch

    monkeypatch.setattr(_torch, "_CHUNK_ELEMENTS", 1)  # one edge per chunk
    d = _descriptor(3, ("uvu",), (2, 3), "ir_mul")
    x = _randn(generator, 5, d.irreps_in1.dim, requires_grad=True)
    attr = _randn(generator, 9, d.irreps_in2.dim, requires_grad=True)
    w = _randn(generator, 9, d.weight_numel, requires_grad=True)
    src, dst = _edges(generator, 5, 9)

    def energy_and_force_loss(fn, s, t):
        energy = fn(d, x, attr, w, s, t, 5).pow(2).sum()
        (force,) = torch.autograd.grad(energy, attr, create_graph=True)
        return torch.autograd.grad(force.pow(2).sum(), (x, w))

    expected = energy_and_force_loss(reference_conv, src, dst)
    for s, t in [(src, dst), (src.int(), dst.int())]:
        for ours, theirs in zip(energy_and_force_loss(torch_conv, s, t), expected, strict=True):
            _assert_close(ours, theirs, F64)


@pytest.fixture
def registered():
    backend = kernels.register_backend(kernels.TorchBackend())
    yield backend
    kernels.unregister_backend("torch")


def test_dispatch_prefers_torch_and_falls_back_to_nothing_silently(registered, generator):
    d = _descriptor(4, MODES, (2,), "mul_ir")
    assert kernels.resolve(d, "cpu", torch.float32).name == "torch"
    assert kernels.resolve(d, "cpu", torch.float64, derivative_order=2).name == "torch"
    with pytest.raises(kernels.UnsupportedBackendError, match="order 3"):
        kernels.resolve(d, "cpu", torch.float64, backend="torch", derivative_order=3)
    assert kernels.resolve(d, "cpu", torch.float64, derivative_order=3).name == "reference"
    x1 = _randn(generator, 3, d.irreps_in1.dim)
    x2 = _randn(generator, 3, d.irreps_in2.dim)
    w = _randn(generator, 3, d.weight_numel)
    _assert_close(
        kernels.tensor_product(d, x1, x2, w, backend="torch"),
        reference_tensor_product(d, x1, x2, w),
        F64,
    )


def test_inputs_are_validated_and_not_modified(generator):
    d = _descriptor(4, MODES, (2,), "mul_ir")
    x1 = _randn(generator, 3, d.irreps_in1.dim)
    x2 = _randn(generator, 3, d.irreps_in2.dim)
    with pytest.raises(ValueError, match="weight"):
        torch_tensor_product(d, x1, x2, _randn(generator, 3, d.weight_numel + 1))
    src = torch.tensor([0, 5])
    with pytest.raises(ValueError):
        torch_conv(
            d,
            x1,
            x2[:2],
            None if not d.weight_numel else x1.new_ones(d.weight_numel),
            src,
            torch.tensor([0, 1]),
            3,
        )
    copy = x1.clone()
    torch_tensor_product(d, x1, x2, _randn(generator, d.weight_numel))
    assert torch.equal(copy, x1)
