"""The reference backend against e3nn.o3.TensorProduct, an explicit edge loop, symmetry and
autograd; and its input validation."""

import contextlib
import itertools
import random

import pytest
import torch
from e3nn import o3
from e3nn.util.test import assert_equivariant

from tests.reps._random import MODES, random_problem
from torsion import kernels
from torsion.kernels import convert_layout, reference_conv, reference_tensor_product
from torsion.reps import IRREP_NORMALIZATIONS, LAYOUTS, PATH_NORMALIZATIONS, TPDescriptor

F64 = torch.float64
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
NORMALIZATIONS = list(itertools.product(IRREP_NORMALIZATIONS, PATH_NORMALIZATIONS))


@contextlib.contextmanager
def _default_float64():
    """e3nn's constants follow the default dtype: a module built in float32 and cast keeps
    float32-rounded Wigner 3j buffers, and ``D_from_matrix`` loses digits the same way."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _e3nn(build, *args, **kwargs):
    with _default_float64():
        return build(*args, **kwargs)


def _randn(generator, *shape, dtype=F64):
    return torch.randn(*shape, generator=generator, dtype=dtype)


def _to(layout, x, irreps):
    return convert_layout(x, irreps, "mul_ir", layout)


def _from(layout, x, irreps):
    return convert_layout(x, irreps, layout, "mul_ir")


def _run(descriptor, layout, x1, x2, weight):
    """Our result for mul_ir inputs, evaluated in ``layout`` and converted back."""
    d = descriptor.with_layout(layout)
    out = reference_tensor_product(
        d, _to(layout, x1, d.irreps_in1), _to(layout, x2, d.irreps_in2), weight
    )
    return _from(layout, out, d.irreps_out)


def _assert_matches_e3nn(descriptor, tp, generator, batch=(4,)):
    """Both dtypes, both layouts, shared and per-sample weights, against one e3nn module
    built with ``shared_weights=False`` (shared weights are passed to it expanded)."""
    for dtype in (torch.float64, torch.float32):
        tp = tp.to(dtype)
        x1 = _randn(generator, *batch, descriptor.irreps_in1.dim, dtype=dtype)
        x2 = _randn(generator, *batch, descriptor.irreps_in2.dim, dtype=dtype)
        per_sample = _randn(generator, *batch, descriptor.weight_numel, dtype=dtype)
        shared = per_sample[(0,) * len(batch)]
        for weight, e3nn_weight in (
            (per_sample, per_sample),
            (shared, shared.expand_as(per_sample)),
        ):
            expected = tp(x1, x2, e3nn_weight)
            for layout in LAYOUTS:
                got = _run(descriptor, layout, x1, x2, weight)
                tol = TOLERANCE[dtype]
                torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    ("modes", "muls"),
    [(("uvw",), (2, 3)), (("uvu",), (2, 3)), (("uuu",), (3,)), (MODES, (2, 3))],
    ids=["uvw", "uvu", "uuu", "mixed"],
)
def test_matches_e3nn_on_random_irreps(modes, muls, seed, generator):
    rng = random.Random(seed)
    irreps1, irreps2, irreps_out, instructions = random_problem(rng, modes, muls=muls)
    irrep_normalization, path_normalization = NORMALIZATIONS[(3 * seed + len(modes)) % 9]
    kwargs = {"irrep_normalization": irrep_normalization, "path_normalization": path_normalization}
    tp = _e3nn(
        o3.TensorProduct, irreps1, irreps2, irreps_out, instructions, shared_weights=False, **kwargs
    )
    d = TPDescriptor.from_instructions(irreps1, irreps2, irreps_out, instructions, **kwargs)
    assert {p.mode.value for p in d.paths} <= set(modes)
    _assert_matches_e3nn(d, tp, generator)


def test_matches_e3nn_on_channelwise_problem_with_l4_and_odd_parities(generator):
    d = TPDescriptor.channelwise("4x0e+3x1o+2x2e+2x3o+2x4e+2x1e", "0e+1o+2e+3o+4e", "0e+1o+2e+4e")
    tp = _e3nn(d.to_e3nn, shared_weights=False, internal_weights=False)
    _assert_matches_e3nn(d, tp, generator, batch=(2, 3))


def test_matches_e3nn_with_zero_multiplicities_and_unreached_outputs(generator):
    # in1 and out have empty blocks (one path runs between them); out block 2x1o is unreached
    irreps = ("3x1o+0x2e+3x2e", "2x1o+1x3o", "3x0e+2x1o+0x2o+2x4o")
    instructions = [(0, 0, 0, "uvu", True), (1, 0, 2, "uvw", True), (2, 1, 3, "uvw", True)]
    tp = _e3nn(o3.TensorProduct, *irreps, instructions, shared_weights=False)
    d = TPDescriptor.from_instructions(*irreps, instructions)
    _assert_matches_e3nn(d, tp, generator)
    x1, x2 = _randn(generator, 2, d.irreps_in1.dim), _randn(generator, 2, d.irreps_in2.dim)
    out = reference_tensor_product(d, x1, x2, _randn(generator, d.weight_numel))
    assert out.shape == (2, 27)
    torch.testing.assert_close(out[:, 3:9], torch.zeros(2, 6, dtype=F64), atol=0, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_path_list_gives_zeros_like_e3nn(layout, generator):
    d = TPDescriptor("2x1o+3x0e", "1o", "2x1e+0e", layout=layout)
    tp = _e3nn(o3.TensorProduct, d.irreps_in1, d.irreps_in2, d.irreps_out, [])
    x1, x2 = _randn(generator, 5, 9), _randn(generator, 5, 3)
    out = reference_tensor_product(d, x1, x2)
    assert out.shape == (5, 7) and out.dtype == F64
    torch.testing.assert_close(out, tp.to(F64)(x1, x2))
    empty_out = TPDescriptor("2x1o", "1o", "")
    assert reference_tensor_product(empty_out, x1[:, :6], x2).shape == (5, 0)


def test_leading_dimensions_broadcast_like_e3nn(generator):
    d = TPDescriptor.channelwise("3x0e+2x1o", "0e+1o", "0e+1o")
    x1 = _randn(generator, 3, 1, d.irreps_in1.dim)
    x2 = _randn(generator, 1, 5, d.irreps_in2.dim)
    w = _randn(generator, 5, d.weight_numel)
    out = reference_tensor_product(d, x1, x2, w)
    assert out.shape == (3, 5, d.irreps_out.dim)
    expected = reference_tensor_product(
        d, x1.expand(3, 5, -1), x2.expand(3, 5, -1), w.expand(3, 5, -1)
    )
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    one = reference_tensor_product(d, x1[0, 0], x2[0, 0], w[0])  # no batch dimension at all
    torch.testing.assert_close(one, out[0, 0])


def _mixed_descriptor(layout="mul_ir"):
    return TPDescriptor.from_instructions(
        "2x0e+2x1o+2x2e",
        "2x0e+2x1o",
        "2x0e+2x1o+3x1e+2x2e",
        [
            (0, 1, 1, "uvu", True),
            (1, 1, 0, "uvw", True),
            (1, 1, 2, "uvw", True),
            (2, 1, 1, "uuu", True),
            (1, 0, 1, "uuu", False),
            (1, 1, 3, "uvu", False),
            (2, 0, 3, "uvu", True),
        ],
        layout=layout,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_is_equivariant_under_rotations_and_parity(layout, generator):
    d = _mixed_descriptor(layout)
    w = _randn(generator, 6, d.weight_numel)

    def tp(x1, x2):
        return _run(d, layout, x1, x2, w)

    args = [_randn(generator, 6, d.irreps_in1.dim), _randn(generator, 6, d.irreps_in2.dim)]
    with _default_float64():
        assert_equivariant(
            tp,
            args_in=args,
            irreps_in=[d.irreps_in1, d.irreps_in2],
            irreps_out=[d.irreps_out],
            tolerance=1e-10,
        )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_and_gradgradcheck(layout, generator):
    d = _mixed_descriptor(layout)
    x1 = _randn(generator, 2, d.irreps_in1.dim).requires_grad_()
    x2 = _randn(generator, 2, d.irreps_in2.dim).requires_grad_()
    w = _randn(generator, 2, d.weight_numel).requires_grad_()
    inputs = (x1, x2, w)

    def fn(*args):
        return reference_tensor_product(d, *args)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


def test_exact_gradgradcheck_on_a_small_product(generator):
    d = TPDescriptor.from_instructions(
        "2x0e+1x1o",
        "1x1o",
        "2x1o+1x1e+1x0e",
        [(0, 0, 0, "uvu", True), (1, 0, 1, "uvw", True), (1, 0, 2, "uuu", True)],
    )
    inputs = (
        _randn(generator, 2, d.irreps_in1.dim).requires_grad_(),
        _randn(generator, 2, d.irreps_in2.dim).requires_grad_(),
        _randn(generator, d.weight_numel).requires_grad_(),
    )

    def fn(*args):
        return reference_tensor_product(d, *args)

    assert torch.autograd.gradgradcheck(fn, inputs)


# -- conv ---------------------------------------------------------------------------------


def _loop_conv(tp, x_node, edge_attr, edge_weight, edge_src, edge_dst, num_nodes):
    """The oracle: e3nn's tensor product edge by edge, summed into a Python list of rows."""
    rows = [x_node.new_zeros(tp.irreps_out.dim) for _ in range(num_nodes)]
    for e in range(edge_attr.shape[0]):
        w = edge_weight if tp.shared_weights else edge_weight[e : e + 1]
        src, dst = int(edge_src[e]), int(edge_dst[e])
        rows[dst] = rows[dst] + tp(x_node[src : src + 1], edge_attr[e : e + 1], w)[0]
    return torch.stack(rows) if rows else x_node.new_zeros(0, tp.irreps_out.dim)


def _graph(generator, num_nodes, num_edges):
    src = torch.randint(0, num_nodes, (num_edges,), generator=generator)
    dst = torch.randint(0, num_nodes, (num_edges,), generator=generator)
    return src, dst


GRAPHS = {
    "random-order-with-duplicates-and-self-loops": (
        torch.tensor([3, 0, 2, 2, 4, 0, 3, 3]),
        torch.tensor([1, 1, 2, 0, 0, 3, 1, 1]),  # node 5 isolated, (3 -> 1) twice, 2 -> 2
        6,
    ),
    "no-edges": (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 4),
    "one-edge": (torch.tensor([2]), torch.tensor([0]), 3),
    "no-nodes": (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0),
}


@pytest.mark.parametrize("shared", [False, True], ids=["per-edge", "shared"])
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_conv_equals_the_explicit_edge_loop(graph, shared, generator):
    src, dst, num_nodes = GRAPHS[graph]
    d = TPDescriptor.channelwise("3x0e+3x1o+2x2e", "0e+1o+2e", "0e+1o+2e")
    tp = _e3nn(d.to_e3nn, shared_weights=shared, internal_weights=False)
    x = _randn(generator, max(num_nodes, 1), d.irreps_in1.dim, dtype=F64)
    attr = _randn(generator, src.shape[0], d.irreps_in2.dim)
    w = (
        _randn(generator, d.weight_numel)
        if shared
        else _randn(generator, src.shape[0], d.weight_numel)
    )
    out = reference_conv(d, x, attr, w, src, dst, num_nodes)
    assert out.shape == (num_nodes, d.irreps_out.dim)
    torch.testing.assert_close(
        out, _loop_conv(tp, x, attr, w, src, dst, num_nodes), atol=1e-10, rtol=0
    )


def test_conv_layouts_index_dtypes_and_gradients_agree(generator):
    d = _mixed_descriptor()
    src, dst = _graph(generator, 7, 30)
    x = _randn(generator, 7, d.irreps_in1.dim).requires_grad_()
    attr = _randn(generator, 30, d.irreps_in2.dim).requires_grad_()
    w = _randn(generator, 30, d.weight_numel).requires_grad_()
    tp = _e3nn(d.to_e3nn, shared_weights=False, internal_weights=False)
    out = reference_conv(d, x, attr, w, src, dst, 9)  # nodes 7, 8 only receive
    expected = _loop_conv(tp, x, attr, w, src, dst, 9)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    probe = _randn(generator, *out.shape)
    grads = torch.autograd.grad((out * probe).sum(), (x, attr, w))
    expected_grads = torch.autograd.grad((expected * probe).sum(), (x, attr, w))
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=0)
    ir_mul = d.with_layout("ir_mul")
    out_ir_mul = reference_conv(
        ir_mul,
        _to("ir_mul", x, d.irreps_in1),
        _to("ir_mul", attr, d.irreps_in2),
        w,
        src.int(),
        dst.int(),
        9,
    )
    torch.testing.assert_close(_from("ir_mul", out_ir_mul, d.irreps_out), out, atol=1e-12, rtol=0)


def test_conv_gradgradcheck(generator):
    d = _mixed_descriptor()
    src, dst = torch.tensor([0, 2, 1, 1]), torch.tensor([1, 1, 0, 2])
    inputs = (
        _randn(generator, 3, d.irreps_in1.dim).requires_grad_(),
        _randn(generator, 4, d.irreps_in2.dim).requires_grad_(),
        _randn(generator, 4, d.weight_numel).requires_grad_(),
    )

    def fn(x, attr, w):
        return reference_conv(d, x, attr, w, src, dst, 3)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


def test_dispatch_runs_the_reference(generator):
    d = _mixed_descriptor()
    x1, x2 = _randn(generator, 3, d.irreps_in1.dim), _randn(generator, 3, d.irreps_in2.dim)
    w = _randn(generator, d.weight_numel)
    expected = reference_tensor_product(d, x1, x2, w)
    # "auto" picks the fast torch backend on CPU; it agrees to rounding
    torch.testing.assert_close(kernels.tensor_product(d, x1, x2, w), expected)
    torch.testing.assert_close(
        kernels.tensor_product(d, x1, x2, w, backend="reference"), expected, atol=0, rtol=0
    )
    src, dst = torch.tensor([0, 1, 2]), torch.tensor([1, 1, 0])
    torch.testing.assert_close(
        kernels.conv(d, x1, x2, w, src, dst, 2, backend="reference"),
        reference_conv(d, x1, x2, w, src, dst, 2),
    )


# -- bad input ------------------------------------------------------------------------------


def _tp_inputs(generator):
    d = _mixed_descriptor()
    x1 = _randn(generator, 3, d.irreps_in1.dim)
    x2 = _randn(generator, 3, d.irreps_in2.dim)
    w = _randn(generator, 3, d.weight_numel)
    return d, x1, x2, w


def test_tensor_product_rejects_bad_input(generator):
    d, x1, x2, w = _tp_inputs(generator)
    cases = [
        (
            (d, x1[:, :-1], x2, w),
            ValueError,
            r"x1 has shape \(3, 17\), but irreps_in1 .* needs a last dimension of 18",
        ),
        ((d, x1, x2[:, 1:], w), ValueError, r"x2 has shape .* irreps_in2 '2x0e\+2x1o' needs"),
        ((d, x1, x2, w[:, :-1]), ValueError, rf"weight must have shape \({d.weight_numel},\)"),
        ((d, x1, x2, None), ValueError, f"has {d.weight_numel} weights"),
        ((d, x1, x2[:2], w), ValueError, "do not broadcast"),
        ((d, x1, x2, w[:2]), ValueError, "do not broadcast"),
        ((d, x1, x2.float(), w), TypeError, "x2 has dtype torch.float32, but x1 has torch.float64"),
        ((d, x1, x2, w.float()), TypeError, "weight has dtype"),
        ((d, x1.long(), x2, w), TypeError, "x1 must have a floating dtype"),
        ((d, x1.numpy(), x2, w), TypeError, "x1 must be a torch.Tensor"),
        (("uvu", x1, x2, w), TypeError, "descriptor must be a torsion.reps.TPDescriptor"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            reference_tensor_product(*args)
        with pytest.raises(error, match=message):
            kernels.tensor_product(*args)


def test_tensor_product_rejects_mismatched_devices(generator):
    d, x1, x2, w = _tp_inputs(generator)
    with pytest.raises(ValueError, match="x2 is on meta, but x1 is on cpu"):
        reference_tensor_product(d, x1, x2.to("meta"), w)
    with pytest.raises(ValueError, match="weight is on meta"):
        reference_tensor_product(d, x1, x2, w.to("meta"))


def test_conv_rejects_bad_input(generator):
    d, x, attr, w = _tp_inputs(generator)
    src, dst = torch.tensor([0, 1, 2]), torch.tensor([1, 1, 0])
    cases = [
        (
            (d, x, attr, w, src, torch.tensor([1, 3, 0]), 3),
            ValueError,
            r"edge_dst holds indices in \[0, 3\], outside \[0, 3\)",
        ),
        (
            (d, x, attr, w, torch.tensor([0, -1, 2]), dst, 3),
            ValueError,
            r"edge_src holds indices in \[-1, 2\], outside \[0, 3\)",
        ),
        ((d, x[:2], attr, w, src, dst, 3), ValueError, r"edge_src holds indices in \[0, 2\]"),
        ((d, x, attr, w, src[:2], dst, 3), ValueError, r"edge_src must have shape \(3,\)"),
        ((d, x, attr, w, src.float(), dst, 3), TypeError, "edge_src must have dtype int64"),
        ((d, x, attr, w, src, dst.to("meta"), 3), ValueError, "edge_dst is on meta"),
        ((d, x, attr, w[:2], src, dst, 3), ValueError, r"edge_weight must have shape"),
        ((d, x, attr, w, src, dst, -1), ValueError, "num_nodes must be >= 0"),
        ((d, x, attr, w, src, dst, 3.0), TypeError, "num_nodes must be an int"),
        ((d, x[None], attr, w, src, dst, 3), ValueError, "x_node must have shape"),
        ((d, x, attr[:, :-1], w, src, dst, 3), ValueError, "edge_attr has shape"),
        ((d, x, attr.to("meta"), w, src, dst, 3), ValueError, "edge_attr is on meta"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            reference_conv(*args)


def test_inputs_are_not_modified(generator):
    d, x1, x2, w = _tp_inputs(generator)
    copies = [t.clone() for t in (x1, x2, w)]
    reference_tensor_product(d, x1, x2, w)
    reference_conv(d, x1, x2, w, torch.tensor([0, 1, 2]), torch.tensor([1, 1, 0]), 3)
    for t, c in zip((x1, x2, w), copies, strict=True):
        torch.testing.assert_close(t, c, atol=0, rtol=0)


def test_convert_layout_round_trips_and_matches_the_definition(generator):
    irreps = o3.Irreps("2x0e+3x1o+0x2e+2x2e")
    x = _randn(generator, 4, irreps.dim)
    y = convert_layout(x, irreps, "mul_ir", "ir_mul")
    # 3x1o block: mul_ir index u * 3 + i -> ir_mul index i * 3 + u
    torch.testing.assert_close(y[:, 2:11].reshape(4, 3, 3), x[:, 2:11].reshape(4, 3, 3).mT)
    torch.testing.assert_close(convert_layout(y, irreps, "ir_mul", "mul_ir"), x, atol=0, rtol=0)
    assert convert_layout(x, irreps, "mul_ir", "mul_ir") is x
    with pytest.raises(ValueError, match="target must be one of"):
        convert_layout(x, irreps, "mul_ir", "channels_last")
    with pytest.raises(ValueError, match="need a last dimension of 21"):
        convert_layout(x[:, 1:], irreps, "mul_ir", "ir_mul")
