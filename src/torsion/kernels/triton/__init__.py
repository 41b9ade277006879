"""Triton kernels for the channelwise tensor product and fused message passing.

* :func:`triton_conv`: gather -> tensor product -> scatter-sum in one kernel, with a
  ``"sorted"`` (receiver-sorted CSR) or ``"scatter"`` (atomic) reduction (the vocabulary
  of every backend, :data:`torsion.kernels.REDUCTIONS`), differentiable to any order
  (every derivative is another fused kernel);
* :func:`triton_tensor_product`: the tensor product itself, on the same kernels;
* :class:`TritonBackend`: the ``triton`` registry backend, registered by
  :mod:`torsion.kernels` at import; ``backend="auto"`` picks it for the CUDA requests it
  supports. :func:`register_triton_backend` swaps in another reduction;
* :func:`kernel_source_path`, :func:`cache_dir`: the generated kernel source of a
  descriptor, cached on disk across runs.

The kernels run ``uvu`` descriptors whose ``irreps_in2`` blocks have multiplicity 1 (the
NequIP/MACE convolution), in float32 and float64 and either layout, on CUDA tensors; with
``TRITON_INTERPRET=1`` in the environment (read when a descriptor's kernels are first
loaded, not when triton is imported) they also run on CPU tensors through Triton's
interpreter, which is how the test suite checks them without a GPU. This package imports
without triton installed: triton is imported when kernels are first loaded.
"""

from torsion.kernels.triton._backend import TritonBackend, register_triton_backend
from torsion.kernels.triton._codegen import cache_dir, generate_source, kernel_source_path
from torsion.kernels.triton._ops import triton_conv, triton_tensor_product

__all__ = [
    "TritonBackend",
    "cache_dir",
    "generate_source",
    "kernel_source_path",
    "register_triton_backend",
    "triton_conv",
    "triton_tensor_product",
]
