"""The Triton kernels against the reference backend, on the CPU through Triton's interpreter.

``TRITON_INTERPRET`` is read by ``@triton.jit`` when a kernel is decorated, i.e. when
torsion imports a descriptor's generated module, not when triton is imported. A fixture
sets it (and a private kernel cache directory) for this module only; triton is imported
here first *without* it, so the tests also check that the interpreted kernels do not
depend on import order. torsion caches the imported kernels per interpreter mode.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction

from tests.kernels.test_reference import _default_float64
from torsion import kernels
from torsion.kernels import (
    REDUCTIONS,
    UnsupportedBackendError,
    reference_conv,
    reference_tensor_product,
)
from torsion.kernels.triton import (
    TritonBackend,
    _codegen,
    _ops,
    cache_dir,
    kernel_source_path,
    register_triton_backend,
    triton_conv,
    triton_tensor_product,
)
from torsion.kernels.triton._ops import (
    LaunchSettings,
    conv_edge_attr,
    conv_edge_grads,
    conv_edge_weight,
    conv_node,
    descriptor_handle,
    launch_settings,
)
from torsion.reps import TPDescriptor

F64 = torch.float64
F32 = torch.float32
TOLERANCE = {F64: 1e-10, F32: 2e-5}


@pytest.fixture(scope="module", autouse=True)
def interpreter(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        patch.setenv("TORSION_CACHE_DIR", str(tmp_path_factory.mktemp("torsion_cache")))
        yield


def _small(layout="ir_mul", weighted=True):
    """Four paths, two channel counts, two paths into one output irrep."""
    with _default_float64():
        return TPDescriptor.channelwise(
            "3x0e+2x1o", "0e+1o", "0e+1o", weighted=weighted, layout=layout
        )


def _l2(layout):
    """Eleven paths up to l = 2, three channel counts (MACE's shape, tiny)."""
    with _default_float64():
        return TPDescriptor.channelwise("4x0e+3x1o+2x2e", "0e+1o+2e", "0e+1o+2e", layout=layout)


def _graph(generator, num_nodes, num_edges, order="unsorted"):
    """Random edges with a duplicated edge and node ``num_nodes - 1`` isolated (it neither
    sends nor receives)."""
    src = torch.randint(0, num_nodes - 1, (num_edges,), generator=generator)
    dst = torch.randint(0, num_nodes - 1, (num_edges,), generator=generator)
    if num_edges >= 2:
        src[-1], dst[-1] = src[0], dst[0]
    if order == "sorted":
        dst, permutation = torch.sort(dst, stable=True)
        src = src[permutation]
    return src, dst


def _inputs(descriptor, generator, num_nodes, num_edges, dtype, shared_weight=False):
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=F64).to(dtype).requires_grad_()

    x = randn(num_nodes, descriptor.irreps_in1.dim)
    a = randn(num_edges, descriptor.irreps_in2.dim)
    numel = descriptor.weight_numel
    w = None if numel == 0 else randn(numel) if shared_weight else randn(num_edges, numel)
    return x, a, w


def _assert_close(actual, expected, dtype):
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOLERANCE[dtype] * scale)


def _check_conv(descriptor, generator, dtype, reduction, num_nodes, num_edges, order="unsorted",
                shared_weight=False, double_backward=False):  # fmt: skip
    src, dst = _graph(generator, num_nodes, num_edges, order)
    x, a, w = _inputs(descriptor, generator, num_nodes, num_edges, dtype, shared_weight)
    leaves = [t for t in (x, a, w) if t is not None]
    expected = reference_conv(descriptor, x, a, w, src, dst, num_nodes)
    actual = triton_conv(descriptor, x, a, w, src, dst, num_nodes, reduction=reduction)
    _assert_close(actual, expected, dtype)
    cotangent = torch.randn(expected.shape, generator=generator, dtype=F64).to(dtype)
    # Without create_graph the backward fuses both per-edge gradients into one launch.
    grads_expected = torch.autograd.grad(expected, leaves, cotangent, create_graph=double_backward)
    grads_actual = torch.autograd.grad(actual, leaves, cotangent, create_graph=double_backward)
    for got, want in zip(grads_actual, grads_expected, strict=True):
        _assert_close(got, want, dtype)
    if not double_backward:
        return
    directions = [
        torch.randn(g.shape, generator=generator, dtype=F64).to(dtype) for g in grads_expected
    ]

    def second(grads):
        total = sum((g * v).sum() for g, v in zip(grads, directions, strict=True))
        return torch.autograd.grad(total, leaves)

    for got, want in zip(second(grads_actual), second(grads_expected), strict=True):
        _assert_close(got, want, dtype)


# -- message passing ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("order", ["unsorted", "sorted"])
def test_conv_forward_backward_against_reference(generator, dtype, reduction, order):
    """Duplicate edges, an isolated node, sorted or unsorted receivers."""
    _check_conv(_small(), generator, dtype, reduction, num_nodes=7, num_edges=19, order=order)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_conv_double_backward_against_reference(generator, reduction):
    _check_conv(_small(), generator, F64, reduction, 6, 15, double_backward=True)


def test_conv_double_backward_float32(generator):
    _check_conv(_small("mul_ir"), generator, F32, "scatter", 5, 9, double_backward=True)


@pytest.mark.parametrize("layout", ["ir_mul", "mul_ir"])
def test_conv_up_to_l2_both_layouts(generator, layout):
    reduction = "sorted" if layout == "ir_mul" else "scatter"
    _check_conv(_l2(layout), generator, F64, reduction, num_nodes=5, num_edges=11)
    _check_conv(_l2(layout), generator, F32, reduction, 4, 9, double_backward=True)


@pytest.mark.parametrize("num_edges", [0, 1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_conv_without_edges_and_with_one_edge(generator, num_edges, reduction):
    _check_conv(_small(), generator, F64, reduction, num_nodes=3, num_edges=num_edges)


def test_descriptor_without_paths_gives_zeros(generator):
    d = TPDescriptor("2x0e", "0e", "3x0e", paths=(), layout="ir_mul")
    x = torch.randn(3, 2, generator=generator, dtype=F64, requires_grad=True)
    src, dst = _graph(generator, 3, 5)
    out = triton_conv(d, x, torch.randn(5, 1, dtype=F64), None, src, dst, 4)
    assert torch.equal(out, torch.zeros(4, 3, dtype=F64))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))


def test_conv_shared_weights_and_unweighted_paths(generator):
    _check_conv(_small(), generator, F64, "sorted", 5, 12, shared_weight=True)
    _check_conv(_small(weighted=False), generator, F64, "scatter", 5, 12)


@pytest.mark.parametrize("reduction", REDUCTIONS[1:])
def test_second_derivatives_through_the_weights_with_unweighted_paths(generator, reduction):
    """Weighted and unweighted paths in one descriptor: the form is affine in the
    weights, so derivatives through the weight slot must drop the unweighted paths (they
    kept their implicit weight 1: errors of 5 on values of 16)."""
    with _default_float64():
        d = TPDescriptor.from_instructions(
            "2x0e+2x1o", "0e+1o+2e", "2x0e+2x1o",
            [(0, 0, 0, "uvu", True), (1, 1, 0, "uvu", False), (0, 1, 1, "uvu", True),
             (1, 0, 1, "uvu", True), (1, 2, 1, "uvu", False)],
        )  # fmt: skip
    _check_conv(d, generator, F64, reduction, 4, 9, double_backward=True)


def test_conv_int32_indices_and_no_receivers(generator):
    d = _small()
    x, a, w = _inputs(d, generator, 4, 6, F64)
    src, dst = _graph(generator, 4, 6)
    out = triton_conv(d, x, a, w, src.int(), dst.int(), 4, reduction="scatter")
    _assert_close(out, reference_conv(d, x, a, w, src, dst, 4), F64)
    empty = triton_conv(d, x, a[:0], w[:0], src[:0], dst[:0], 0)
    assert empty.shape == (0, d.irreps_out.dim)


@pytest.mark.parametrize("reduction", REDUCTIONS[1:])
def test_strided_inputs_and_gradients_to_second_order(reduction, generator):
    """Inputs as models hand them over: node features sliced from wider rows, edge
    attributes and per-edge weights column-major (a transposed radial MLP output), and a
    strided output gradient; forward, first and second derivatives equal the reference."""
    d, num_nodes, num_edges = _l2("mul_ir"), 7, 20
    x, a, w = (t.detach() for t in _inputs(d, generator, num_nodes, num_edges, F64))
    # the rows of an edge_index built from (sender, receiver) pairs have stride 2
    src, dst = torch.stack(_graph(generator, num_nodes, num_edges), dim=1).T
    assert src.stride() == (2,)
    wide = torch.randn(num_nodes, x.shape[1] + 5, generator=generator, dtype=F64)
    wide[:, 2 : 2 + x.shape[1]] = x
    strided = [
        wide[:, 2 : 2 + x.shape[1]],
        torch.empty(a.shape[1], num_edges, dtype=F64).T.copy_(a),
        torch.empty(w.shape[1], num_edges, dtype=F64).T.copy_(w),
    ]
    assert not any(t.is_contiguous() for t in strided)
    cotangent = torch.randn(num_nodes, 2 * d.irreps_out.dim, generator=generator, dtype=F64)
    cotangent = cotangent[:, ::2]

    def reference(*t):
        return reference_conv(d, *t, src, dst, num_nodes)

    want = _three_orders(reference, (x, a, w), cotangent)
    got = _three_orders(
        lambda *t: triton_conv(d, *t, src, dst, num_nodes, reduction=reduction), strided, cotangent
    )
    for actual, expected in zip(got, want, strict=True):
        _assert_close(actual, expected, F64)


def _three_orders(run, inputs, cotangent):
    """``run``'s output, its gradients along ``cotangent`` and the gradient of their summed
    squares (the force-training double backward), with respect to ``inputs``."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = run(*inputs)
    first = torch.autograd.grad(out, inputs, cotangent, create_graph=True)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in first), inputs)
    return [out, *first, *second]


@pytest.mark.parametrize(
    "changes",
    [
        {"block_e_csr": 1, "block_n": 3, "block_e": 1},
        {"block_e_csr": 4, "block_n": 2, "block_e": 8, "max_block_c": 2},
        {"block_e_csr": 32, "few_warps": 1, "warps": 4},
    ],
)
@pytest.mark.parametrize("reduction", REDUCTIONS[1:])
def test_every_launch_setting_computes_the_same_function(changes, reduction, generator):
    """Tile sizes a GPU sweep may pick (one edge per step, several rows per program, fewer
    channels per program than a block has): all three derivative orders are unchanged."""
    d, num_nodes, num_edges = _l2("ir_mul"), 7, 30
    inputs = [t.detach() for t in _inputs(d, generator, num_nodes, num_edges, F64)]
    src, dst = _graph(generator, num_nodes, num_edges)
    cotangent = torch.randn(num_nodes, d.irreps_out.dim, generator=generator, dtype=F64)
    want = _three_orders(lambda *t: reference_conv(d, *t, src, dst, num_nodes), inputs, cotangent)
    with launch_settings(**changes) as settings:
        assert all(getattr(settings, key) == value for key, value in changes.items())
        got = _three_orders(
            lambda *t: triton_conv(d, *t, src, dst, num_nodes, reduction=reduction),
            inputs,
            cotangent,
        )
    assert _ops._SETTINGS == LaunchSettings()  # restored
    for actual, expected in zip(got, want, strict=True):
        _assert_close(actual, expected, F64)


def test_conv_does_not_modify_inputs(generator):
    d = _small()
    x, a, w = _inputs(d, generator, 4, 8, F64)
    src, dst = _graph(generator, 4, 8)
    before = [t.detach().clone() for t in (x, a, w, src, dst)]
    triton_conv(d, x, a, w, src, dst, 4).sum().backward()
    for tensor, copy in zip((x, a, w, src, dst), before, strict=True):
        assert torch.equal(tensor.detach(), copy)


def test_custom_ops_pass_opcheck(generator):
    """Schemas, fake implementations (what torch.compile traces) and the registered
    derivatives of the four ops."""
    d = _small()
    x, a, w = _inputs(d, generator, 4, 7, F64)
    src, dst = _graph(generator, 4, 7)
    g = torch.randn(4, d.irreps_out.dim, generator=generator, dtype=F64)
    handle = descriptor_handle(d)
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    for op, args in (
        (conv_node, (handle, False, False, x, a, w, src, dst, 4)),
        (conv_node, (handle, True, True, g, a, w, src, dst, 4)),
        (conv_edge_attr, (handle, False, x, w, g, src, dst)),
        (conv_edge_weight, (handle, True, x, a, g, src, dst)),
        (conv_edge_grads, (handle, x, a, w, g, src, dst)),
    ):
        torch.library.opcheck(op, args, test_utils=checks)


@pytest.mark.slow
def test_compiles_without_graph_breaks(generator):
    torch._dynamo.reset()
    d = _small()
    x, a, w = _inputs(d, generator, 5, 9, F64)
    src, dst = _graph(generator, 5, 9)

    def model(x, a, w):
        return triton_conv(d, x, a, w, src, dst, 5).sin() + triton_tensor_product(
            d, x, a[:5], w[:5]
        )

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    expected = model(x, a, w)
    actual = compiled(x, a, w)
    _assert_close(actual, expected, F64)
    for got, want in zip(
        torch.autograd.grad(actual.sum(), (x, a, w)),
        torch.autograd.grad(expected.sum(), (x, a, w)),
        strict=True,
    ):
        _assert_close(got, want, F64)
    torch._dynamo.reset()


# -- the plain tensor product -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, F32])
def test_tensor_product_broadcasting_against_reference(generator, dtype):
    d = _small("mul_ir")

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=F64).to(dtype).requires_grad_()

    x1, x2 = randn(2, 1, d.irreps_in1.dim), randn(3, d.irreps_in2.dim)
    for weight in (randn(2, 3, d.weight_numel), randn(d.weight_numel)):
        expected = reference_tensor_product(d, x1, x2, weight)
        actual = triton_tensor_product(d, x1, x2, weight)
        assert actual.shape == (2, 3, d.irreps_out.dim)
        _assert_close(actual, expected, dtype)
        cotangent = torch.randn(expected.shape, generator=generator, dtype=F64).to(dtype)
        leaves = (x1, x2, weight)
        for got, want in zip(
            torch.autograd.grad(actual, leaves, cotangent),
            torch.autograd.grad(expected, leaves, cotangent),
            strict=True,
        ):
            _assert_close(got, want, dtype)


# -- code generation and its cache --------------------------------------------------------


def test_generated_source_is_cached_on_disk_and_reused(monkeypatch):
    d = _small("mul_ir")
    path = kernel_source_path(d, F64)
    assert path.parent == cache_dir() and path.exists()
    assert str(cache_dir()).startswith(os.environ["TORSION_CACHE_DIR"])
    source = path.read_text()
    assert "@triton.jit" in source and "tl.float64" in source and "tl.int64" in source
    assert "tl.atomic_add" in source
    stamp = path.stat().st_mtime_ns

    # A fresh process (simulated: the in-memory module cache emptied) imports the same
    # file and never regenerates it.
    def no_generation(*args, **kwargs):
        raise AssertionError("the cached source should have been reused")

    monkeypatch.setattr(_codegen, "_MODULES", {})
    monkeypatch.setattr(_codegen, "generate_source", no_generation)
    module = _codegen.kernel_module(d, F64)
    assert module.__file__ == str(path)
    assert isinstance(module.node_csr, InterpretedFunction)
    assert path.stat().st_mtime_ns == stamp
    assert _codegen.kernel_module(d, F64) is module
    # Another dtype, layout or descriptor is another file.
    others = {kernel_source_path(d, F32), kernel_source_path(_small("ir_mul"), F64)}
    assert path not in others and len(others) == 2


def test_float64_constants_are_not_rounded_to_float32():
    source = _codegen.generate_source(_l2("ir_mul"), F64)
    assert "tl.full((), 0.7071067811865475, tl.float64)" in source


def _signature(kernel, dtype, constants):
    pointer = "*fp64" if dtype == F64 else "*fp32"
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            index_pointer = name in ("gather_ptr", "scatter_ptr", "order_ptr", "rowptr_ptr")
            signature[name] = "*i64" if index_pointer or name in ("src_ptr", "dst_ptr") else pointer
        else:
            signature[name] = "i64" if name.startswith("stride") else "i32"
    return signature


@pytest.mark.slow
def test_generated_kernels_compile_for_an_h100_without_a_gpu(monkeypatch, tmp_path):
    """The compiled (not interpreted) path: every kernel goes through Triton's compiler down
    to an sm_90 cubin, which needs no GPU; the launches themselves need one."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    dtype = F64  # float64 atomics and constants are the less common path
    module = _codegen.kernel_module(_l2("ir_mul"), dtype)
    tiles = {"BLOCK_E": 16, "BLOCK_C": 4}
    for name, constants in (
        ("node_csr", {"BLOCK_N": 4, **tiles}),
        ("node_atomic_transposed", tiles),
        ("edge_grads", {"NEED_ATTR": True, "NEED_W": True, **tiles}),
    ):
        kernel = getattr(module, name)
        assert not isinstance(kernel, InterpretedFunction)
        source = ASTSource(
            kernel,
            _signature(kernel, dtype, constants),
            constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()},
        )
        compiled = triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": True}
        )
        assert compiled.asm["cubin"]


def test_launch_settings_follow_the_live_register_tiles():
    """Live tiles = irrep components gathered + weighted paths + message components (the
    uvu output has one block per path); few warps only for CSR kernels of small programs."""
    from torsion.kernels.triton._codegen import live_tiles
    from torsion.kernels.triton._ops import _launch_options

    with _default_float64():
        mace, l3 = (
            TPDescriptor.channelwise(
                "+".join(f"8x{l}{'eo'[l % 2]}" for l in range(lmax + 1)),
                "+".join(f"{l}{'eo'[l % 2]}" for l in range(lmax + 1)),
                "+".join(f"{l}{'eo'[l % 2]}" for l in range(lmax + 1)),
                layout="ir_mul",
            )
            for lmax in (2, 3)
        )
    for d in (mace, l3, _small()):
        components = sum(ir.dim for _, ir in d.irreps_in1)
        weighted = sum(p.weighted for p in d.paths)
        messages = sum(ir.dim for _, ir in d.irreps_out)
        assert live_tiles(d) == components + weighted + messages
    assert live_tiles(mace) == 55 and live_tiles(l3) == 138
    assert _launch_options(mace, csr=True)["num_warps"] == 2
    assert _launch_options(mace, csr=False)["num_warps"] == 8
    assert _launch_options(l3, csr=True)["num_warps"] == 8


# -- the registry backend and errors ------------------------------------------------------


def test_auto_picks_triton_for_cuda_requests_only(monkeypatch):
    """Registered at import: ``"auto"`` takes it for the CUDA requests it supports (resolving
    needs no GPU), never for CPU tensors, even with the interpreter on."""
    d = _small()
    default = kernels.get_backend("triton")
    assert isinstance(default, TritonBackend) and default.reduction == "auto"
    assert kernels.available_backends()[0] == "triton"
    for layout in ("ir_mul", "mul_ir"):
        for op in kernels.KERNEL_OPS:
            for order in (0, 1, 2, 3):
                chosen = kernels.resolve(
                    d.with_layout(layout), "cuda:0", F32, op, derivative_order=order
                )
                assert chosen is default
    uvw = TPDescriptor.fully_connected("2x0e", "0e", "2x0e")
    assert kernels.resolve(uvw, "cuda", F32, "conv").name == "torch"
    with pytest.raises(UnsupportedBackendError, match="triton: dtype float16"):
        kernels.resolve(d, "cuda", torch.float16, "conv")
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        assert kernels.resolve(d, "cpu", F64, "conv").name == "torch"
    torch_backend = kernels.unregister_backend("torch")
    try:
        reference = kernels.unregister_backend("reference")
        try:
            with pytest.raises(UnsupportedBackendError, match=r"picks it only on \['cuda'\]"):
                kernels.resolve(d, "cpu", F64, "conv")
        finally:
            kernels.register_backend(reference)
    finally:
        kernels.register_backend(torch_backend)


def test_auto_leaves_gpus_older_than_volta_to_the_torch_backend(monkeypatch):
    d = _small()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    assert kernels.resolve(d, "cuda", F32, "conv").name == "torch"
    with pytest.raises(UnsupportedBackendError, match=r"compute capability 6\.0"):
        kernels.resolve(d, "cuda", F32, "conv", "triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert kernels.resolve(d, "cuda", F32, "conv").name == "triton"


def test_backend_reduction_swaps_and_runs_through_conv(generator):
    d = _small()
    default = kernels.get_backend("triton")
    backend = register_triton_backend("scatter")
    try:
        assert isinstance(backend, TritonBackend) and backend.reduction == "scatter"
        assert kernels.get_backend("triton") is backend
        assert register_triton_backend("scatter") is backend
        chosen = kernels.resolve(d, "cpu", F64, "conv", "triton", derivative_order=2)
        assert chosen is backend
        x, a, w = _inputs(d, generator, 4, 7, F64)
        src, dst = _graph(generator, 4, 7)
        _assert_close(
            kernels.conv(d, x, a, w, src, dst, 4, backend="triton"),
            reference_conv(d, x, a, w, src, dst, 4),
            F64,
        )
        uvw = TPDescriptor.fully_connected("2x0e", "0e", "2x0e")
        # the backend checks the indices (its kernels do not bound-check)
        with pytest.raises(ValueError, match="edge_dst holds indices"):
            kernels.conv(d, x, a, w, src, dst + 4, 4, backend="triton")
        unchecked = register_triton_backend("scatter", check_indices=False)
        assert unchecked is not backend and not unchecked.check_indices
        assert "check_indices=False" in repr(unchecked)
        with pytest.raises(UnsupportedBackendError, match="uvu"):
            kernels.resolve(uvw, "cpu", F64, "conv", "triton")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TRITON_INTERPRET", "0")
            with pytest.raises(UnsupportedBackendError, match="device 'cpu'"):
                kernels.resolve(d, "cpu", F64, "conv", "triton")
        # a foreign backend under the name is replaced only on request
        kernels.register_backend(_Impostor(), replace=True)
        with pytest.raises(ValueError, match="already registered"):
            register_triton_backend("sorted")
        assert register_triton_backend("sorted", replace=True).reduction == "sorted"
    finally:
        kernels.register_backend(default, replace=True)


class _Impostor(kernels.ReferenceBackend):
    name = "triton"


def test_errors_name_the_problem(generator, monkeypatch):
    d = _small()
    x, a, w = _inputs(d, generator, 3, 4, F64)
    src, dst = _graph(generator, 3, 4)
    with pytest.raises(ValueError, match="reduction must be one of"):
        triton_conv(d, x, a, w, src, dst, 3, reduction="deterministic")  # the old name
    with pytest.raises(ValueError, match="reduction must be one of"):
        TritonBackend("atomic")
    with pytest.raises(UnsupportedBackendError, match="mode 'uvw'"):
        uvw = TPDescriptor.fully_connected("2x0e", "0e", "2x0e")
        triton_tensor_product(uvw, x.new_zeros(2), x.new_zeros(1), x.new_zeros(4))
    with pytest.raises(UnsupportedBackendError, match="multiplicity 2"):
        wide = TPDescriptor.channelwise("2x0e", "2x0e")
        triton_tensor_product(wide, x.new_zeros(2), x.new_zeros(2), x.new_zeros(4))
    with pytest.raises(ValueError, match="edge_src"):
        triton_conv(d, x, a, w, src[:2], dst, 3)
    with pytest.raises(ValueError, match="edge_dst holds indices"):
        triton_conv(d, x, a, w, src, dst + 3, 3, check_indices=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UnsupportedBackendError, match="TRITON_INTERPRET=1"):
        triton_conv(d, x, a, w, src, dst, 3)


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torsion.kernels.triton as t\n"
        "print(t.TritonBackend().unavailable_reason())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert "triton is not installed" in result.stdout


def _check_contention(device, num_nodes, num_edges, channels, repeats):
    """Every edge runs from one of two senders into one of two receivers: the most atomic
    adds on the same addresses (the forward, and the transposed program of the ``x``
    gradient). Every reduction agrees with the reference on every run, and the sorted one
    gives the same bits each time."""
    generator = torch.Generator().manual_seed(3)
    with _default_float64():
        d = TPDescriptor.channelwise(
            f"{channels}x0e+{channels}x1o", "0e+1o", "0e+1o", layout="ir_mul"
        )
    leaves = [
        t.detach().to(device).requires_grad_()
        for t in _inputs(d, generator, num_nodes, num_edges, F64)
    ]
    src, dst = (torch.randint(0, 2, (num_edges,), generator=generator).to(device) for _ in "sd")
    expected = reference_conv(d, *leaves, src, dst, num_nodes)
    cotangent = torch.randn(expected.shape, generator=generator, dtype=F64).to(device)
    want = [expected, *torch.autograd.grad(expected, leaves, cotangent)]
    for reduction in REDUCTIONS:
        runs = []
        for _ in range(repeats):
            out = triton_conv(d, *leaves, src, dst, num_nodes, reduction=reduction)
            runs.append([out, *torch.autograd.grad(out, leaves, cotangent)])
        for run in runs:
            for got, ref in zip(run, want, strict=True):
                _assert_close(got, ref, F64)
        if reduction != "scatter":
            for run in runs[1:]:
                assert all(torch.equal(p, q) for p, q in zip(run, runs[0], strict=True))


def test_contended_receivers_and_senders():
    _check_contention("cpu", num_nodes=5, num_edges=40, channels=4, repeats=2)


# -- on a GPU -----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F64, F32])
def test_compiled_kernels_on_cuda_large_graph(dtype, monkeypatch):
    """Compiled (not interpreted) kernels: a large random graph against the reference,
    and the deterministic reduction reproducible bit for bit."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    generator = torch.Generator().manual_seed(0)
    with _default_float64():
        d = TPDescriptor.channelwise("32x0e+32x1o+32x2e", "0e+1o+2e", "0e+1o+2e", layout="ir_mul")
    num_nodes, num_edges = 5000, 200_000
    x, a, w = (
        t.detach().cuda().requires_grad_()
        for t in _inputs(d, generator, num_nodes, num_edges, dtype)
    )
    src, dst = (t.cuda() for t in _graph(generator, num_nodes, num_edges))
    expected = reference_conv(d, x, a, w, src, dst, num_nodes)
    first = triton_conv(d, x, a, w, src, dst, num_nodes)
    second = triton_conv(d, x, a, w, src, dst, num_nodes)
    assert torch.equal(first, second)
    atomic = triton_conv(d, x, a, w, src, dst, num_nodes, reduction="scatter")
    tolerance = 1e-9 if dtype == F64 else 1e-3
    torch.testing.assert_close(first, expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(atomic, expected, rtol=tolerance, atol=tolerance)
    cotangent = torch.randn_like(expected)
    for got, want in zip(
        torch.autograd.grad(first, (x, a, w), cotangent),
        torch.autograd.grad(expected, (x, a, w), cotangent),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.gpu
def test_contended_receivers_and_senders_on_cuda(monkeypatch):
    """Races: 200,000 edges into two receivers from two senders, three runs each."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _check_contention("cuda", num_nodes=100, num_edges=200_000, channels=32, repeats=3)


def _check_tail_edges(d, num_edges, tail, device, reduction, dtype=F32):
    """Only the last ``tail`` edges send into the last node: its output row and those
    edges' weight gradients equal the reference on the tail alone, and no other edge's
    weight gradient is touched (the cotangent is zero elsewhere)."""
    num_nodes = 64
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    x, a = randn(num_nodes, d.irreps_in1.dim), randn(num_edges, d.irreps_in2.dim)
    w = randn(num_edges, d.weight_numel).requires_grad_()
    src = torch.randint(0, num_nodes, (num_edges,), generator=generator, device=device)
    dst = torch.randint(0, num_nodes - 1, (num_edges,), generator=generator, device=device)
    dst[-tail:] = num_nodes - 1
    out = triton_conv(d, x, a, w, src, dst, num_nodes, reduction=reduction)
    cotangent = torch.zeros_like(out)
    cotangent[-1] = randn(out.shape[1])
    (grad_w,) = torch.autograd.grad(out, w, cotangent)
    w_tail = w[-tail:].detach().requires_grad_()
    last = torch.zeros(tail, dtype=torch.long, device=device)
    expected = reference_conv(d, x, a[-tail:], w_tail, src[-tail:], last, 1)
    (expected_grad,) = torch.autograd.grad(expected, w_tail, cotangent[-1:])
    torch.testing.assert_close(out[-1:], expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grad_w[-tail:], expected_grad, rtol=1e-4, atol=1e-4)
    assert not bool(grad_w[:-tail].any())


@pytest.mark.parametrize("reduction", REDUCTIONS[1:])
def test_tail_edges_check(reduction):
    """The large-offset check below, on a tiny graph through the interpreter."""
    _check_tail_edges(_l2("ir_mul"), num_edges=40, tail=5, device="cpu", reduction=reduction)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS[1:])
def test_weight_offsets_beyond_int32_on_cuda(reduction, monkeypatch):
    """Per-edge weights of more than 2**31 elements (MACE's 1408 per edge, 1.53M edges),
    where other kernels' large-index bugs appeared: the last edges, whose weight offsets
    would wrap in int32, give the reference's messages and weight gradients."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with 40 GiB")
    with _default_float64():
        d = TPDescriptor.channelwise(
            "128x0e+128x1o+128x2e", "0e+1o+2e", "0e+1o+2e", layout="ir_mul"
        )
    tail = 1000
    num_edges = 2**31 // d.weight_numel + tail
    assert (num_edges - tail) * d.weight_numel < 2**31 < num_edges * d.weight_numel
    _check_tail_edges(d, num_edges, tail, "cuda", reduction)


@pytest.mark.gpu
def test_potential_on_cuda_runs_triton_through_auto(monkeypatch):
    """A model left at ``backend="auto"`` runs these kernels on CUDA: energy, forces and the
    force-training gradient equal the same model's on the CPU (``torch`` backend)."""
    from torsion.equivariant import EquivariantPotential

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = EquivariantPotential(num_species=2, channels=4).double()
    conv = next(m for m in model.modules() if hasattr(m, "descriptor"))
    assert kernels.resolve(conv.descriptor, "cuda", F64, "conv", derivative_order=2).name == (
        "triton"
    )
    pos = torch.randn(40, 3, generator=generator, dtype=F64) * 2
    species = torch.randint(0, 2, (40,), generator=generator)
    batch = torch.arange(4).repeat_interleave(10)
    state = model.state_dict()
    want = _potential_outputs("torch", state, pos, species, batch)
    cuda = [t.cuda() for t in (pos, species, batch)]
    got = _potential_outputs("auto", state, *cuda)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-10)


def _potential_outputs(backend, state, pos, species, batch):
    """Energy, forces and the force-training gradient of a small potential on the
    device of ``pos``."""
    from torsion.equivariant import EquivariantPotential

    model = EquivariantPotential(num_species=2, channels=4, backend=backend)
    model = model.double().to(pos.device)
    model.load_state_dict(state)
    pos = pos.clone().requires_grad_()
    energy = model(pos=pos, species=species, batch=batch)
    (forces,) = torch.autograd.grad(-energy.sum(), pos, create_graph=True)
    loss = energy.square().sum() + forces.square().sum()
    return [energy, forces, *torch.autograd.grad(loss, list(model.parameters()))]


@pytest.mark.slow
def test_potential_force_training_matches_the_torch_backend(generator):
    """The whole force-training step of ``EquivariantPotential`` (energy, forces = -dE/dpos,
    gradient of an energy + force loss) through the interpreted kernels equals the
    ``torch`` backend's."""
    from torsion.equivariant import EquivariantPotential

    torch.manual_seed(0)
    state = EquivariantPotential(num_species=2, channels=4).double().state_dict()
    pos = torch.randn(12, 3, generator=generator, dtype=F64) * 2
    species = torch.randint(0, 2, (12,), generator=generator)
    batch = torch.arange(2).repeat_interleave(6)
    want = _potential_outputs("torch", state, pos, species, batch)
    got = _potential_outputs("triton", state, pos, species, batch)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
