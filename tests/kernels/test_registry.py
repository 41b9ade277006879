"""The kernel registry: declared support, resolution order, and errors that name the gap."""

import pytest
import torch

from torsion import kernels
from torsion.kernels import (
    Backend,
    BackendInfo,
    BackendSupport,
    ReferenceBackend,
    UnsupportedBackendError,
    available_backends,
    backend_info,
    get_backend,
    reference_conv,
    reference_tensor_product,
    register_backend,
    resolve,
    unregister_backend,
)
from torsion.reps import TPDescriptor

DESCRIPTOR = TPDescriptor.channelwise("2x0e+2x1o", "0e+1o", "0e+1o")


class _FastCPUFloat32(Backend):
    """A stand-in fast backend: CPU, float32, mul_ir, tensor products, first derivatives."""

    name = "fast-test"
    priority = 10
    support = BackendSupport(
        ops=frozenset({"tensor_product"}),
        devices=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32}),
        layouts=frozenset({"mul_ir"}),
        max_derivative_order=1,
    )

    def __init__(self):
        self.calls = 0

    def tensor_product(self, descriptor, x1, x2, weight=None):
        self.calls += 1
        return reference_tensor_product(descriptor, x1, x2, weight)

    def conv(self, descriptor, x_node, edge_attr, edge_weight, edge_src, edge_dst, num_nodes):
        return reference_conv(
            descriptor, x_node, edge_attr, edge_weight, edge_src, edge_dst, num_nodes
        )


class _Unavailable(_FastCPUFloat32):
    name = "missing-test"
    priority = 20

    def unavailable_reason(self):
        return "the package 'imaginary' is not installed"


@pytest.fixture(autouse=True)
def _without_default_fast_backends():
    """These tests are about the registry itself: the default ``torch`` and ``triton``
    backends step aside."""
    defaults = [unregister_backend(name) for name in ("torch", "triton")]
    yield
    for backend in defaults:
        register_backend(backend)


@pytest.fixture
def fast():
    backend = register_backend(_FastCPUFloat32())
    register_backend(_Unavailable())
    yield backend
    unregister_backend("fast-test")
    unregister_backend("missing-test")


def test_reference_is_registered_and_reported():
    assert "reference" in available_backends()
    assert isinstance(get_backend("reference"), ReferenceBackend)
    row = next(r for r in backend_info() if r.name == "reference")
    assert row == BackendInfo("reference", ("any",), ("float32", "float64"))
    name, devices, dtypes = row  # a plain (name, devices, dtypes) tuple
    assert (name, devices, dtypes) == ("reference", ("any",), ("float32", "float64"))


def test_reference_runs_everything_on_any_device():
    for device in ("cpu", "cuda", "meta"):
        for layout in ("mul_ir", "ir_mul"):
            for op in kernels.KERNEL_OPS:
                backend = resolve(
                    DESCRIPTOR.with_layout(layout), device, torch.float64, op, derivative_order=3
                )
                assert backend.name == "reference"


def test_auto_prefers_the_supporting_backend_of_highest_priority(fast):
    assert available_backends()[0] == "fast-test"  # the unavailable one is not listed
    assert "missing-test" not in [row.name for row in backend_info()]
    assert resolve(DESCRIPTOR, "cpu", torch.float32) is fast
    # whatever the fast backend lacks, auto moves on to the reference
    assert resolve(DESCRIPTOR, "cpu", torch.float64).name == "reference"
    assert resolve(DESCRIPTOR, "cpu", torch.float32, "conv").name == "reference"
    assert resolve(DESCRIPTOR.with_layout("ir_mul"), "cpu", torch.float32).name == "reference"
    assert resolve(DESCRIPTOR, "cuda:0", torch.float32).name == "reference"
    assert resolve(DESCRIPTOR, "cpu", torch.float32, derivative_order=2).name == "reference"


def test_dispatch_goes_through_the_resolved_backend(fast, generator):
    x1 = torch.randn(3, DESCRIPTOR.irreps_in1.dim, generator=generator)
    x2 = torch.randn(3, DESCRIPTOR.irreps_in2.dim, generator=generator)
    w = torch.randn(DESCRIPTOR.weight_numel, generator=generator)
    kernels.tensor_product(DESCRIPTOR, x1, x2, w)
    kernels.tensor_product(DESCRIPTOR, x1, x2, w, backend="fast-test")
    assert fast.calls == 2
    kernels.tensor_product(DESCRIPTOR, x1.double(), x2.double(), w.double())
    assert fast.calls == 2


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"dtype": torch.float64}, r"dtype float64 \(it runs \['float32'\]\)"),
        ({"device": "cuda"}, r"device 'cuda' \(it runs on \['cpu'\]\)"),
        ({"op": "conv"}, r"op 'conv' \(it runs \['tensor_product'\]\)"),
        ({"layout": "ir_mul"}, r"layout 'ir_mul'"),
        ({"derivative_order": 2}, r"derivatives of order 2 \(it stops at order 1\)"),
    ],
)
def test_a_named_backend_that_cannot_run_says_what_is_missing(fast, request_, message):
    args = {"device": "cpu", "dtype": torch.float32, "op": "tensor_product"}
    args.update(request_)
    descriptor = DESCRIPTOR.with_layout(args.pop("layout", "mul_ir"))
    with pytest.raises(UnsupportedBackendError, match="backend 'fast-test' cannot run") as info:
        resolve(descriptor, backend="fast-test", **args)
    assert info.match(message) and info.match("never falls back silently")


def test_a_named_backend_never_falls_back(fast, generator):
    x = torch.randn(3, DESCRIPTOR.irreps_in1.dim, dtype=torch.float64, generator=generator)
    y = torch.randn(3, DESCRIPTOR.irreps_in2.dim, dtype=torch.float64, generator=generator)
    w = torch.randn(DESCRIPTOR.weight_numel, dtype=torch.float64, generator=generator)
    with pytest.raises(UnsupportedBackendError, match="dtype float64"):
        kernels.tensor_product(DESCRIPTOR, x, y, w, backend="fast-test")
    with pytest.raises(UnsupportedBackendError, match="op 'conv'"):
        kernels.conv(
            DESCRIPTOR,
            x.float(),
            y.float(),
            w.float(),
            torch.tensor([0]),
            torch.tensor([0]),
            1,
            backend="fast-test",
        )
    assert fast.calls == 0


def test_unavailable_and_unknown_backends(fast):
    with pytest.raises(UnsupportedBackendError, match="'imaginary' is not installed"):
        resolve(DESCRIPTOR, "cpu", torch.float32, backend="missing-test")
    with pytest.raises(ValueError, match=r"unknown backend 'triton'; registered backends: \["):
        resolve(DESCRIPTOR, "cpu", torch.float32, backend="triton")


def test_auto_without_any_supporting_backend_lists_every_reason():
    with pytest.raises(UnsupportedBackendError, match="no registered backend can run") as info:
        resolve(DESCRIPTOR, "cpu", torch.float16)
    assert info.match(r"reference: dtype float16")


def test_resolve_rejects_bad_requests():
    with pytest.raises(ValueError, match="unknown op 'gather'"):
        resolve(DESCRIPTOR, "cpu", torch.float32, "gather")
    with pytest.raises(TypeError, match=r"descriptor must be a torsion\.reps\.TPDescriptor"):
        resolve("uvu", "cpu", torch.float32)
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype"):
        resolve(DESCRIPTOR, "cpu", "float32")
    with pytest.raises(ValueError, match="derivative_order must be >= 0"):
        resolve(DESCRIPTOR, "cpu", torch.float32, derivative_order=-1)


def test_registration_rules(fast):
    with pytest.raises(ValueError, match="already registered"):
        register_backend(_FastCPUFloat32())
    replacement = register_backend(_FastCPUFloat32(), replace=True)
    assert get_backend("fast-test") is replacement
    with pytest.raises(TypeError, match=r"expected a torsion\.kernels\.Backend"):
        register_backend(object())
    with pytest.raises(ValueError, match="unknown ops"):
        BackendSupport(frozenset({"gather"}), None, frozenset(), frozenset(), None)

    class _Auto(_FastCPUFloat32):
        name = "auto"

    with pytest.raises(ValueError, match="'auto' is reserved"):
        register_backend(_Auto())
