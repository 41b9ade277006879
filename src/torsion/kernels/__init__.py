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
  (:class:`TorchBackend`, the fast path in plain PyTorch, registered by default with a
  higher priority, so ``"auto"`` picks it on CPU and CUDA: all paths of a convolution
  merged into one per-edge matrix product, fused chunked message passing
  (:func:`torch_conv`), and ``torch.library`` custom ops whose backward and double
  backward are explicit tensor products; see :mod:`torsion.kernels._torch` for the
  force-training recipe under ``torch.compile``). The CUDA backend ``triton``
  (:mod:`torsion.kernels.triton`, triton itself imported lazily) is registered too, with
  the highest priority, and ``"auto"`` picks it for the CUDA requests it supports:
  generated Triton kernels for channelwise message passing (with ``TRITON_INTERPRET=1``
  they also run on CPU tensors, when named);
* :func:`convert_layout` between the ``mul_ir`` and ``ir_mul`` tensor layouts.
"""

from torsion.kernels._checks import REDUCTIONS
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
from torsion.kernels.triton._backend import TritonBackend

register_backend(ReferenceBackend())
register_backend(TorchBackend())
register_backend(TritonBackend())

__all__ = [
    "KERNEL_OPS",
    "REDUCTIONS",
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
