"""The ``triton`` registry backend (registered by :mod:`torsion.kernels` at import)."""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from torsion.kernels._checks import Reduction, check_reduction
from torsion.kernels._registry import Backend, BackendSupport, get_backend, register_backend
from torsion.kernels.triton._codegen import interpreter_enabled, unsupported_descriptor_reason
from torsion.kernels.triton._ops import triton_conv, triton_tensor_product
from torsion.reps import LAYOUTS, TPDescriptor

__all__ = ["TritonBackend", "register_triton_backend"]

#: Oldest NVIDIA architecture Triton compiles for (Volta); older GPUs go to ``torch``.
_MIN_CAPABILITY = (7, 0)


class TritonBackend(Backend):
    """The ``triton`` backend: generated Triton kernels for the channelwise convolution.

    Runs descriptors made of ``uvu`` paths whose ``irreps_in2`` blocks have multiplicity 1
    (NequIP/MACE message passing), in float32 and float64, in both layouts, to any
    derivative order, on CUDA devices. With ``TRITON_INTERPRET=1`` set it also accepts
    CPU tensors (Triton's interpreter; slow, for tests), but only when named:
    ``backend="auto"`` picks it for CUDA tensors alone. See :func:`triton_conv`.

    :mod:`torsion.kernels` registers one with ``reduction="auto"`` at import (unavailable,
    and skipped by ``"auto"``, when triton is not installed);
    :func:`register_triton_backend` swaps in another reduction.

    Args:
        reduction: the scatter-sum of :meth:`conv`, ``"auto"`` (default, ``"sorted"``),
            ``"sorted"`` or ``"scatter"`` (see :func:`triton_conv`).
        check_indices: check the edge indices of every :meth:`conv` against their ranges
            (default ``True``: one host synchronisation a call, skipped under
            ``torch.compile``). The kernels do not bound-check their loads and stores, so
            an index out of range would read and write out of bounds; the other backends
            raise on it at no cost. ``False`` saves the synchronisation for graphs known
            to be valid.

    Raises:
        ValueError: for an unknown ``reduction``.
    """

    name = "triton"
    priority = 20
    support = BackendSupport(
        ops=frozenset({"tensor_product", "conv"}),
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float32, torch.float64}),
        layouts=frozenset(LAYOUTS),
        max_derivative_order=None,
        auto_devices=frozenset({"cuda"}),
    )

    def __init__(self, reduction: Reduction = "auto", check_indices: bool = True) -> None:
        check_reduction(reduction)
        self.reduction = reduction
        self.check_indices = bool(check_indices)

    def unavailable_reason(self) -> str | None:
        """``"triton is not installed"`` when it cannot be imported, else ``None``."""
        try:
            found = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):  # a broken or blocked install
            found = False
        return None if found else "triton is not installed (pip install triton)"

    def unsupported_reason(
        self,
        descriptor: TPDescriptor,
        device: torch.device,
        dtype: torch.dtype,
        op: str,
        derivative_order: int,
    ) -> str | None:
        """The registry's checks (CPU counts as supported under ``TRITON_INTERPRET=1``),
        the GPU's compute capability (7.0 or newer), then the descriptor's paths (``uvu``,
        ``irreps_in2`` multiplicity 1)."""
        if device.type == "cpu" and interpreter_enabled():
            device = torch.device("cuda")
        reason = super().unsupported_reason(descriptor, device, dtype, op, derivative_order)
        if reason is not None:
            return reason
        if device.type == "cuda" and torch.cuda.is_available():
            capability = torch.cuda.get_device_capability(device)
            if capability < _MIN_CAPABILITY:
                return (
                    f"a GPU of compute capability {capability[0]}.{capability[1]} (Triton "
                    f"needs {_MIN_CAPABILITY[0]}.{_MIN_CAPABILITY[1]} or newer)"
                )
        return unsupported_descriptor_reason(descriptor)

    def tensor_product(
        self, descriptor: TPDescriptor, x1: Tensor, x2: Tensor, weight: Tensor | None = None
    ) -> Tensor:
        """See :func:`triton_tensor_product`."""
        return triton_tensor_product(descriptor, x1, x2, weight)

    def conv(
        self,
        descriptor: TPDescriptor,
        x_node: Tensor,
        edge_attr: Tensor,
        edge_weight: Tensor | None,
        edge_src: Tensor,
        edge_dst: Tensor,
        num_nodes: int,
    ) -> Tensor:
        """See :func:`triton_conv` (with this backend's ``reduction``)."""
        return triton_conv(
            descriptor,
            x_node,
            edge_attr,
            edge_weight,
            edge_src,
            edge_dst,
            num_nodes,
            reduction=self.reduction,
            check_indices=self.check_indices,
        )

    def __repr__(self) -> str:
        checks = "" if self.check_indices else ", check_indices=False"
        return f"<torsion backend 'triton' (reduction={self.reduction!r}{checks})>"


def register_triton_backend(
    reduction: Reduction = "auto", *, check_indices: bool = True, replace: bool = False
) -> TritonBackend:
    """Register the ``triton`` backend with the given reduction.

    :mod:`torsion.kernels` already registers one with ``reduction="auto"``; this swaps
    it for one with another reduction (a :class:`TritonBackend` already registered is
    replaced, or returned as it is when its reduction matches). ``backend="triton"``
    selects it, and ``backend="auto"`` prefers it (priority 20, above ``torch``) for the
    CUDA requests it supports.

    Args:
        reduction: ``"auto"`` (default, ``"sorted"``), ``"sorted"`` or ``"scatter"``.
        check_indices: see :class:`TritonBackend`.
        replace: replace a backend of another class registered as ``"triton"``.

    Returns:
        The registered backend.

    Raises:
        ValueError: for an unknown ``reduction``, or when a backend of another class is
            registered as ``"triton"`` and ``replace`` is false.
    """
    backend = TritonBackend(reduction, check_indices)
    try:
        existing = get_backend("triton")
    except ValueError:
        existing = None
    if isinstance(existing, TritonBackend):
        if (existing.reduction, existing.check_indices) == (reduction, bool(check_indices)):
            return existing
    elif existing is not None and not replace:
        raise ValueError(
            f"a 'triton' backend is already registered ({existing!r}); pass replace=True"
        )
    return register_backend(backend, replace=True)
