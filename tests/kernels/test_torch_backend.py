"""The ``torch`` fast backend against the reference backend (the oracle) and e3nn: random
descriptors in every mode and layout on both plans (merged and per-path), explicit
derivatives to third order, the custom ops (gradcheck, gradgradcheck, opcheck,
torch.compile), and fused message passing with awkward edge lists."""

import random

import pytest
import torch

from tests.kernels.test_reference import _default_float64
from tests.reps._random import MODES, random_problem
from torsion import kernels
from torsion.kernels import _torch_plan as plan_module
from torsion.kernels import (
    convert_layout,
    reference_conv,
    reference_tensor_product,
    torch_conv,
    torch_tensor_product,
)
from torsion.kernels._torch_ops import (
    conv_grads,
    conv_grads_backward,
    conv_slot,
    plan_handle,
    tp_slot,
)
from torsion.kernels._torch_plan import SLOT_OUT, SLOT_W, SLOT_X1, SLOT_X2, Scratch, plan_for
from torsion.reps import LAYOUTS, TPDescriptor

F64 = torch.float64
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def _randn(generator, *shape, dtype=F64, requires_grad=False):
    x = torch.randn(*shape, generator=generator, dtype=F64).to(dtype)
    return x.requires_grad_(requires_grad)


def _descriptor(seed, modes, muls, layout, lmax=4):
    irreps1, irreps2, irreps_out, instructions = random_problem(
        random.Random(seed), modes, muls=muls, lmax=lmax
    )
    with _default_float64():
        return TPDescriptor.from_instructions(
            irreps1, irreps2, irreps_out, instructions, layout=layout
        )


def _merged(layout, weighted=True):
    """A convolution descriptor the merged plan runs: uvu, edge attributes of multiplicity
    1, two channel counts (two merged groups), odd blocks order."""
    with _default_float64():
        return TPDescriptor.channelwise(
            "3x1o+4x0e+3x2e+4x1e", "0e+1o+2e", "0e+1o+2e+1e", weighted=weighted, layout=layout
        )


def _shared_outputs(layout):
    """Merged plan where several paths (weighted and not) add into the same output block."""
    instructions = [
        (0, 0, 0, "uvu", True),
        (1, 1, 0, "uvu", False),
        (0, 1, 1, "uvu", True),
        (1, 0, 1, "uvu", True),
        (1, 2, 1, "uvu", False),
    ]
    with _default_float64():
        return TPDescriptor.from_instructions(
            "3x0e+3x1o", "0e+1o+2e", "3x0e+3x1o", instructions, layout=layout
        )


DESCRIPTORS = {
    "uvw": lambda layout: _descriptor(3, ("uvw",), (2, 3), layout),
    "uvu": lambda layout: _descriptor(5, ("uvu",), (2, 3), layout),
    "uuu": lambda layout: _descriptor(4, ("uuu",), (3,), layout),
    "mixed": lambda layout: _descriptor(6, MODES, (2, 3), layout),
    "small_mixed": lambda layout: _descriptor(0, MODES, (2,), layout, lmax=2),
    "small_uvw": lambda layout: TPDescriptor.fully_connected(
        "2x0e+1x1o", "1x1o", "1x0e+2x1o", layout=layout
    ),
    "merged": _merged,
    "merged_unweighted": lambda layout: _merged(layout, weighted=False),
    "merged_shared_outputs": _shared_outputs,
}


def _assert_close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def test_merged_plan_is_used_exactly_for_convolutions():
    for name in ("merged", "merged_unweighted", "merged_shared_outputs"):
        assert plan_for(DESCRIPTORS[name]("ir_mul")).groups is not None
    assert len(plan_for(_merged("mul_ir")).groups) == 2  # multiplicities 3 and 4
    for name in ("uvw", "uvu", "uuu", "mixed", "small_mixed", "small_uvw"):
        assert plan_for(DESCRIPTORS[name]("ir_mul")).groups is None
    assert plan_for(TPDescriptor("2x1o", "1o", "2x0e")).groups is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shared", [False, True], ids=["per_sample", "shared"])
@pytest.mark.parametrize("name", list(DESCRIPTORS))
def test_tensor_product_matches_reference(name, shared, layout, dtype, generator):
    d = DESCRIPTORS[name](layout)
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mace_problem_matches_e3nn(dtype, generator):
    with _default_float64():
        d = TPDescriptor.channelwise("8x0e+8x1o+8x2e", "0e+1o+2e", "0e+1o+2e")
        tp = d.to_e3nn(shared_weights=False, internal_weights=False)
    tp = tp.to(dtype)
    x1 = _randn(generator, 5, d.irreps_in1.dim, dtype=dtype)
    x2 = _randn(generator, 5, d.irreps_in2.dim, dtype=dtype)
    w = _randn(generator, 5, d.weight_numel, dtype=dtype)
    expected = tp(x1, x2, w)
    _assert_close(torch_tensor_product(d, x1, x2, w), expected, dtype)
    fast = d.with_layout("ir_mul")
    out = torch_tensor_product(fast, convert_layout(x1, d.irreps_in1, "mul_ir", "ir_mul"), x2, w)
    _assert_close(convert_layout(out, d.irreps_out, "ir_mul", "mul_ir"), expected, dtype)


def test_channelwise_l4_with_both_parities_and_broadcasting(generator):
    with _default_float64():
        d = TPDescriptor.channelwise(
            "4x0e+3x1o+2x2e+2x3o+2x4e+2x1e", "0e+1o+2e+3o+4e", "0e+1o+2e+4e", layout="ir_mul"
        )
    x1 = _randn(generator, 3, 1, d.irreps_in1.dim)
    x2 = _randn(generator, 1, 5, d.irreps_in2.dim)
    w = _randn(generator, 5, d.weight_numel)
    _assert_close(torch_tensor_product(d, x1, x2, w), reference_tensor_product(d, x1, x2, w), F64)


def test_empty_path_list_and_empty_batch_give_zeros(generator):
    d = TPDescriptor("2x1o+3x0e", "1o", "2x1e+0e")
    out = torch_tensor_product(d, _randn(generator, 4, 9), _randn(generator, 4, 3))
    torch.testing.assert_close(out, torch.zeros(4, 7, dtype=F64), atol=0, rtol=0)
    m = _merged("ir_mul")
    x1 = _randn(generator, 0, m.irreps_in1.dim, requires_grad=True)
    out = torch_tensor_product(m, x1, _randn(generator, 0, 9), _randn(generator, m.weight_numel))
    assert out.shape == (0, m.irreps_out.dim)
    (grad,) = torch.autograd.grad(out.sum(), x1)
    assert grad.shape == x1.shape


@pytest.mark.parametrize("shared", [False, True], ids=["per_sample", "shared"])
@pytest.mark.parametrize("name", ["mixed", "merged", "merged_shared_outputs"])
def test_derivatives_to_third_order_match_reference(name, shared, generator):
    d = DESCRIPTORS[name]("ir_mul")
    x1 = _randn(generator, 4, d.irreps_in1.dim, requires_grad=True)
    x2 = _randn(generator, 4, d.irreps_in2.dim, requires_grad=True)
    w = _randn(generator, *(() if shared else (4,)), d.weight_numel, requires_grad=True)
    probe = _randn(generator, 4, d.irreps_out.dim)
    inputs = (x1, x2, w)

    def derivatives(fn):
        out = fn(d, x1, x2, w)
        first = torch.autograd.grad((out * probe).sum(), inputs, create_graph=True)
        # force training: a loss on the input gradients, differentiated again
        loss = sum((g**2).sum() for g in first)
        second = torch.autograd.grad(loss, inputs, create_graph=True)
        third = torch.autograd.grad(sum((g**3).sum() for g in second), inputs)
        return (*first, *second, *third)

    for ours, theirs in zip(
        derivatives(torch_tensor_product), derivatives(reference_tensor_product), strict=True
    ):
        _assert_close(ours, theirs, F64)


@pytest.mark.slow
@pytest.mark.parametrize("shared", [False, True], ids=["per_sample", "shared"])
@pytest.mark.parametrize("name", ["small_mixed", "small_uvw", "merged_shared_outputs"])
def test_gradcheck_and_gradgradcheck(name, shared, generator):
    d = DESCRIPTORS[name]("mul_ir")
    x1 = _randn(generator, 2, d.irreps_in1.dim, requires_grad=True)
    x2 = _randn(generator, 2, d.irreps_in2.dim, requires_grad=True)
    w = _randn(generator, *(() if shared else (2,)), d.weight_numel, requires_grad=True)

    def fn(a, b, c):
        return torch_tensor_product(d, a, b, c)

    assert torch.autograd.gradcheck(fn, (x1, x2, w))
    assert torch.autograd.gradgradcheck(fn, (x1, x2, w))


def _slot_args(d, generator, target, per_sample, batch=3):
    shapes = {
        SLOT_X1: (batch, d.irreps_in1.dim),
        SLOT_X2: (batch, d.irreps_in2.dim),
        SLOT_W: (batch, d.weight_numel) if per_sample else (d.weight_numel,),
        SLOT_OUT: (batch, d.irreps_out.dim),
    }
    return [
        None if slot == target else _randn(generator, *shapes[slot], requires_grad=True)
        for slot in range(4)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["small_mixed", "merged_shared_outputs"])
def test_tp_slot_op_passes_opcheck(name, generator):
    d = DESCRIPTORS[name]("ir_mul")
    for target in range(4):
        for per_sample in (True, False):
            args = _slot_args(d, generator, target, per_sample)
            torch.library.opcheck(tp_slot, (plan_handle(d), target, per_sample, False, *args))


@pytest.mark.slow
def test_conv_slot_op_passes_opcheck(generator):
    d = _shared_outputs("ir_mul")
    src = torch.tensor([0, 2, 2, 1, 0])
    dst = torch.tensor([1, 1, 0, 3, 3])
    for target in range(4):
        for per_edge in (True, False):
            x = _randn(generator, 3, d.irreps_in1.dim, requires_grad=True)
            attr = _randn(generator, 5, d.irreps_in2.dim, requires_grad=True)
            w = _randn(generator, *((5,) if per_edge else ()), d.weight_numel, requires_grad=True)
            g = _randn(generator, 4, d.irreps_out.dim, requires_grad=True)
            slots = [x, attr, w, g]
            slots[target] = None
            for deterministic in (False, True):
                args = (plan_handle(d), target, per_edge, False, deterministic, *slots)
                torch.library.opcheck(conv_slot, (*args, src, dst, 3, 4))
                if target == SLOT_OUT:
                    need = (True, True, True)
                    args = (plan_handle(d), per_edge, False, deterministic, x, attr, w, g)
                    torch.library.opcheck(conv_grads, (*args, src, dst, 3, 4, *need))
                    incoming = (
                        _randn(generator, 3, d.irreps_in1.dim, requires_grad=True),
                        _randn(generator, 5, d.irreps_in2.dim, requires_grad=True),
                        _randn(generator, *w.shape, requires_grad=True),
                    )
                    torch.library.opcheck(
                        conv_grads_backward, (*args, *incoming, src, dst, 3, 4, *need, True)
                    )


def _edges(generator, num_nodes, num_edges):
    src = torch.randint(0, num_nodes, (num_edges,), generator=generator)
    dst = torch.randint(0, max(num_nodes - 1, 1), (num_edges,), generator=generator)
    return src, dst


@pytest.mark.parametrize("reduction", kernels.REDUCTIONS)
@pytest.mark.parametrize("num_edges", [0, 1, 40])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shared", [False, True], ids=["per_edge", "shared"])
@pytest.mark.parametrize("name", ["mixed", "merged"])
def test_conv_matches_reference(name, shared, layout, num_edges, reduction, generator):
    d = DESCRIPTORS[name](layout)
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
    out = torch_conv(*args, reduction=reduction)
    assert out.shape == (num_nodes, d.irreps_out.dim)
    _assert_close(out, reference_conv(*args), F64)
    assert torch.equal(torch_conv(*args, reduction=reduction), out)  # deterministic
    # the edge order does not matter
    perm = torch.randperm(src.shape[0], generator=generator)
    permuted = (d, x, attr[perm], w if shared else w[perm], src[perm], dst[perm], num_nodes)
    _assert_close(torch_conv(*permuted, reduction=reduction), out, F64)


@pytest.mark.parametrize("reduction", ["sorted", "scatter"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_edge", "shared"])
@pytest.mark.parametrize("name", ["small_mixed", "merged_shared_outputs"])
def test_conv_derivatives_in_chunks_with_int32_indices(
    name, shared, reduction, generator, monkeypatch
):
    monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", 1)  # one edge per chunk
    d = DESCRIPTORS[name]("ir_mul")
    x = _randn(generator, 5, d.irreps_in1.dim, requires_grad=True)
    attr = _randn(generator, 9, d.irreps_in2.dim, requires_grad=True)
    w = _randn(generator, *(() if shared else (9,)), d.weight_numel, requires_grad=True)
    src, dst = _edges(generator, 5, 9)
    inputs = (x, attr, w)

    def energy_and_force_loss(fn, s, t, **kwargs):
        energy = fn(d, x, attr, w, s, t, 5, **kwargs).pow(2).sum()
        grads = torch.autograd.grad(energy, inputs, create_graph=True)
        return (*grads, *torch.autograd.grad(sum(g.pow(2).sum() for g in grads), inputs))

    expected = energy_and_force_loss(reference_conv, src, dst)
    for s, t in [(src, dst), (src.int(), dst.int())]:
        ours = energy_and_force_loss(torch_conv, s, t, reduction=reduction)
        for a, b in zip(ours, expected, strict=True):
            _assert_close(a, b, F64)


# the merged plans in every combination; the per-path plan (slower) and the unweighted
# descriptor (no weights to share) in fewer
THIRD_ORDER_CASES = [
    *(
        (name, shared, reduction, wrt)
        for name in ("merged", "merged_shared_outputs")
        for shared in (False, True)
        for reduction in ("sorted", "scatter")
        for wrt in ("all", "attr")
    ),
    *(("mixed", shared, "sorted", "all") for shared in (False, True)),
    ("mixed", False, "scatter", "attr"),
    *(("merged_unweighted", False, reduction, "all") for reduction in ("sorted", "scatter")),
    ("merged_unweighted", False, "scatter", "attr"),
]


@pytest.mark.parametrize(("name", "shared", "reduction", "wrt"), THIRD_ORDER_CASES)
def test_conv_derivatives_to_third_order_match_reference(
    name, shared, reduction, wrt, generator, monkeypatch
):
    """Force training through the fused second-order op (all input gradients, or only the
    edge attributes' as for forces), with an energy whose output gradient depends on the
    inputs, and one order more through the op's own backward; chunks of 4 edges, the last
    one shorter (its intermediates reuse the larger buffers of the first)."""
    monkeypatch.setattr(plan_module.TPPlan, "chunk_size", lambda self, device: 4)
    d = DESCRIPTORS[name]("ir_mul")
    x = _randn(generator, 5, d.irreps_in1.dim, requires_grad=True)
    attr = _randn(generator, 11, d.irreps_in2.dim, requires_grad=True)
    w = _randn(generator, *(() if shared else (11,)), d.weight_numel, requires_grad=True)
    probe = _randn(generator, 5, d.irreps_out.dim)
    src, dst = _edges(generator, 5, 11)
    inputs = (x, attr, w) if d.weight_numel else (x, attr)
    first_wrt = inputs if wrt == "all" else (attr,)

    def derivatives(fn, **kwargs):
        out = fn(d, x, attr, w if d.weight_numel else None, src, dst, 5, **kwargs)
        energy = (out * probe).sum() + out.pow(2).sum()
        first = torch.autograd.grad(energy, first_wrt, create_graph=True)
        second = torch.autograd.grad(sum((g**2).sum() for g in first), inputs, create_graph=True)
        third = torch.autograd.grad(sum((g**3).sum() for g in second), inputs)
        return (*first, *second, *third)

    expected = derivatives(reference_conv)
    for ours, theirs in zip(derivatives(torch_conv, reduction=reduction), expected, strict=True):
        _assert_close(ours, theirs, F64)


def test_scratch_reuses_one_buffer_per_name():
    scratch = Scratch()
    like = torch.zeros(1, dtype=F64)
    big = scratch("a", (4, 5), like)
    small = scratch("a", (2, 3), like)
    assert small.shape == (2, 3) and small.is_contiguous()
    assert small.data_ptr() == big.data_ptr()  # the same memory, not a new allocation
    assert scratch("b", (2, 3), like).data_ptr() != big.data_ptr()
    assert scratch("a", (5, 5), like).numel() == 25  # grows when too small
    assert scratch("a", (2,), like.float()).dtype == torch.float32


def test_conv_gradcheck_and_gradgradcheck(generator):
    d = _shared_outputs("mul_ir")
    x = _randn(generator, 3, d.irreps_in1.dim, requires_grad=True)
    attr = _randn(generator, 4, d.irreps_in2.dim, requires_grad=True)
    w = _randn(generator, 4, d.weight_numel, requires_grad=True)
    src, dst = torch.tensor([0, 1, 1, 2]), torch.tensor([2, 2, 0, 2])

    def fn(a, b, c):
        return torch_conv(d, a, b, c, src, dst, 3, reduction="sorted")

    assert torch.autograd.gradcheck(fn, (x, attr, w))
    assert torch.autograd.gradgradcheck(fn, (x, attr, w))


@pytest.mark.slow
def test_compiles_without_graph_breaks(generator):
    torch._dynamo.reset()
    d = _merged("ir_mul")
    x1 = _randn(generator, 6, d.irreps_in1.dim)
    x2 = _randn(generator, 6, d.irreps_in2.dim)
    w = _randn(generator, 6, d.weight_numel)
    src, dst = _edges(generator, 6, 6)

    def model(a, b, c):
        return torch_tensor_product(d, a, b, c).sin() + torch_conv(d, a, b, c, src, dst, 6)

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_close(compiled(x1, x2, w), model(x1, x2, w), F64)
    torch._dynamo.reset()


def test_backend_is_registered_and_picked_by_auto(generator):
    d = _descriptor(4, MODES, (2,), "mul_ir")
    assert "torch" in kernels.available_backends()
    assert kernels.resolve(d, "cpu", torch.float32).name == "torch"
    assert kernels.resolve(d, "cpu", torch.float64, "conv", derivative_order=2).name == "torch"
    assert kernels.resolve(d, "meta", torch.float64).name == "reference"
    x1 = _randn(generator, 3, d.irreps_in1.dim)
    x2 = _randn(generator, 3, d.irreps_in2.dim)
    w = _randn(generator, 3, d.weight_numel)
    _assert_close(
        kernels.tensor_product(d, x1, x2, w, backend="torch"),
        reference_tensor_product(d, x1, x2, w),
        F64,
    )
    assert kernels.get_backend("torch").reduction == "auto"
    assert kernels.TorchBackend("sorted").reduction == "sorted"
    with pytest.raises(ValueError, match="reduction must be one of"):
        kernels.TorchBackend("atomic")


def test_inputs_are_validated_and_not_modified(generator):
    d = _merged("mul_ir")
    x1 = _randn(generator, 3, d.irreps_in1.dim)
    x2 = _randn(generator, 3, d.irreps_in2.dim)
    w = _randn(generator, d.weight_numel)
    with pytest.raises(ValueError, match="weight"):
        torch_tensor_product(d, x1, x2, _randn(generator, 3, d.weight_numel + 1))
    with pytest.raises(ValueError, match="irreps_in2"):
        torch_tensor_product(d, x1, x1, w)
    with pytest.raises(ValueError, match=r"edge_src holds indices in \[0, 5\]"):
        torch_conv(d, x1, x2, w, torch.tensor([0, 5, 1]), torch.tensor([0, 1, 2]), 3)
    with pytest.raises(ValueError, match="reduction must be one of"):
        torch_conv(d, x1, x2, w, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]), 3, reduction="x")
    copies = [t.clone() for t in (x1, x2, w)]
    torch_tensor_product(d, x1, x2, w)
    torch_conv(d, x1, x2, w, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]), 3)
    for before, after in zip(copies, (x1, x2, w), strict=True):
        assert torch.equal(before, after)


@pytest.mark.parametrize("shared", [False, True], ids=["per_sample", "shared"])
@pytest.mark.parametrize("name", ["mace", "merged_shared_outputs", "small_mixed"])
def test_tensor_product_in_chunks_matches_reference(name, shared, generator, monkeypatch):
    monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", 1)  # one sample per chunk
    if name == "mace":  # written straight into the output, chunk by chunk
        d = TPDescriptor.channelwise("4x0e+4x1o+4x2e", "0e+1o+2e", "0e+1o+2e", layout="ir_mul")
        assert plan_for(d)._writes_output_directly()
    else:
        d = DESCRIPTORS[name]("ir_mul")
    x1 = _randn(generator, 5, d.irreps_in1.dim, requires_grad=True)
    x2 = _randn(generator, 5, d.irreps_in2.dim, requires_grad=True)
    w = _randn(generator, *(() if shared else (5,)), d.weight_numel, requires_grad=True)

    def outputs(fn):
        out = fn(d, x1, x2, w)
        return (out, *torch.autograd.grad(out.pow(2).sum(), (x1, x2, w)))

    for ours, theirs in zip(
        outputs(torch_tensor_product), outputs(reference_tensor_product), strict=True
    ):
        _assert_close(ours, theirs, F64)


def test_chunks_are_cpu_cache_sized_and_device_sized_elsewhere():
    """A chunk's largest intermediate is about CHUNK_ELEMENTS on a CPU and
    DEVICE_CHUNK_ELEMENTS on other devices (looked up by device type, no GPU needed)."""
    d = TPDescriptor.channelwise("128x0e+128x1o+128x2e", "0e+1o+2e", "0e+1o+2e", layout="ir_mul")
    plan = plan_module.plan_for(d)
    width = 35 * 128  # the merged group's rows x channels: the output per edge
    assert plan.chunk_size(torch.device("cpu")) == plan_module.CHUNK_ELEMENTS // width
    assert plan.chunk_size(torch.device("cuda")) == plan_module.DEVICE_CHUNK_ELEMENTS // width
    assert plan_module.DEVICE_CHUNK_ELEMENTS > 16 * plan_module.CHUNK_ELEMENTS
