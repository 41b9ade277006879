"""Kernels: backends that execute tensor-product descriptors behind one registry.

* ops: :func:`tensor_product` and the message-passing :func:`conv` (gather -> tensor
  product -> scatter-sum over edges), each dispatched by :func:`resolve` from the
  descriptor, device and dtype;
* the registry: :class:`Backend` subclasses declare a :class:`BackendSupport` (ops,
  devices, dtypes, layouts, derivative order) and are added with
  :func:`register_backend`; :func:`available_backends` and :func:`backend_info` list
  them. A named backend that cannot run a request raises
  :class:`UnsupportedBackendError`; there is no silent fallback;
* backends: ``reference`` (:class:`ReferenceBackend`, plain PyTorch einsums, every
  descriptor, any device and derivative order; the oracle in tests) and ``torch``
  (:class:`TorchBackend`, the fast path in plain PyTorch: channels-contiguous blocks, CG
  coefficients contracted with the second input once per sample, chunked fused message
  passing; correct to 1e-10 against the reference, but not registered by default
  because it is still slower than e3nn (0.4-0.7x on the MACE problem):
  ``register_backend(TorchBackend())`` enables it). The CUDA backend (``triton``,
  imported lazily) is planned;
* :func:`convert_layout` between the ``mul_ir`` and ``ir_mul`` tensor layouts.
"""

from torsion.kernels._dispatch import conv, tensor_product
from torsion.kernels._layout import convert_layout
from torsion.kernels._reference import ReferenceBackend, reference_conv, reference_tensor_product
from torsion.kernels._registry import (
    KERNEL_OPS,
    Backend,
    BackendInfo,
    BackendSupport,
    UnsupportedBackendError,
    available_backends,
    backend_info,
    get_backend,
    register_backend,
    resolve,
    unregister_backend,
)
from torsion.kernels._torch import TorchBackend, torch_conv, torch_tensor_product

register_backend(ReferenceBackend())

__all__ = [
    "KERNEL_OPS",
    "Backend",
    "BackendInfo",
    "BackendSupport",
    "ReferenceBackend",
    "TorchBackend",
    "UnsupportedBackendError",
    "available_backends",
    "backend_info",
    "conv",
    "convert_layout",
    "get_backend",
    "reference_conv",
    "reference_tensor_product",
    "register_backend",
    "resolve",
    "tensor_product",
    "torch_conv",
    "torch_tensor_product",
    "unregister_backend",
]
