"""The kernel registry: backends declare what they run, :func:`resolve` picks one.

A backend is a :class:`Backend` with a name, a priority and a :class:`BackendSupport`
declaring the ops (:data:`KERNEL_OPS`), device types, dtypes, layouts and derivative order
it handles. ``resolve(..., backend="auto")`` returns the available backend of highest
priority that supports the request; an explicitly named backend that cannot run it raises
:class:`UnsupportedBackendError` naming what is missing. There is no silent fallback from
a named backend to a slower one.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from torsion.kernels._checks import check_descriptor
from torsion.reps import TPDescriptor

__all__ = [
    "KERNEL_OPS",
    "Backend",
    "BackendInfo",
    "BackendSupport",
    "UnsupportedBackendError",
    "available_backends",
    "backend_info",
    "get_backend",
    "register_backend",
    "resolve",
    "unregister_backend",
]

#: The ops a backend may implement: the tensor product itself, and the message-passing op
#: (gather -> tensor product -> scatter-sum over edges).
KERNEL_OPS: tuple[str, ...] = ("tensor_product", "conv")


class UnsupportedBackendError(ValueError):
    """A named backend cannot run the request (op, device, dtype, layout, derivatives), or
    no backend can."""


@dataclass(frozen=True)
class BackendSupport:
    """What a backend declares it can run.

    Args:
        ops: op names from :data:`KERNEL_OPS`.
        devices: device types (``"cpu"``, ``"cuda"``, ...); ``None`` means any device.
        dtypes: floating dtypes.
        layouts: tensor layouts (``"mul_ir"``, ``"ir_mul"``).
        max_derivative_order: highest derivative order its outputs support (``2`` for
            double backward, i.e. force training); ``None`` means any order.
        auto_devices: the device types on which ``resolve(backend="auto")`` may pick it;
            ``None`` (default) means every device it supports. A backend that can also
            run elsewhere only slowly (Triton's CPU interpreter) is then used there only
            when named.
    """

    ops: frozenset[str]
    devices: frozenset[str] | None
    dtypes: frozenset[torch.dtype]
    layouts: frozenset[str]
    max_derivative_order: int | None
    auto_devices: frozenset[str] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.ops) - set(KERNEL_OPS)
        if unknown:
            raise ValueError(f"unknown ops {sorted(unknown)}; known ops are {KERNEL_OPS}")


class BackendInfo(NamedTuple):
    """One row of :func:`backend_info`: ``(name, devices, dtypes)`` as strings.

    ``devices`` is ``("any",)`` for a backend that runs on every device type; dtypes are
    named without the ``torch.`` prefix (``"float32"``).
    """

    name: str
    devices: tuple[str, ...]
    dtypes: tuple[str, ...]


class Backend(ABC):
    """A way to execute :class:`~torsion.reps.TPDescriptor` objects.

    Subclasses set the class attributes :attr:`name`, :attr:`support` and
    :attr:`priority` and implement both ops. They may refine :meth:`unsupported_reason`
    (for descriptor-specific limits, calling ``super()`` first) and
    :meth:`unavailable_reason` (for a missing optional dependency).

    Attributes:
        name: the registry key.
        support: what it declares it can run.
        priority: ``resolve(backend="auto")`` prefers higher values; the reference is 0.
    """

    name: ClassVar[str]
    support: ClassVar[BackendSupport]
    priority: ClassVar[int] = 0

    def unavailable_reason(self) -> str | None:
        """Why the backend cannot run in this process at all (e.g. a missing package), or
        ``None``."""
        return None

    def unsupported_reason(
        self,
        descriptor: TPDescriptor,
        device: torch.device,
        dtype: torch.dtype,
        op: str,
        derivative_order: int,
    ) -> str | None:
        """What of the request the backend does not support, in words, or ``None``."""
        support = self.support
        missing = []
        if op not in support.ops:
            missing.append(f"op {op!r} (it runs {sorted(support.ops)})")
        if support.devices is not None and device.type not in support.devices:
            missing.append(f"device {device.type!r} (it runs on {sorted(support.devices)})")
        if dtype not in support.dtypes:
            names = sorted(_dtype_name(d) for d in support.dtypes)
            missing.append(f"dtype {_dtype_name(dtype)} (it runs {names})")
        if descriptor.layout not in support.layouts:
            missing.append(f"layout {descriptor.layout!r} (it runs {sorted(support.layouts)})")
        top = support.max_derivative_order
        if top is not None and derivative_order > top:
            missing.append(f"derivatives of order {derivative_order} (it stops at order {top})")
        return "; ".join(missing) or None

    @abstractmethod
    def tensor_product(
        self, descriptor: TPDescriptor, x1: Tensor, x2: Tensor, weight: Tensor | None = None
    ) -> Tensor:
        """Evaluate the tensor product (see :func:`torsion.kernels.tensor_product`)."""

    @abstractmethod
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
        """Message passing: scatter-sum of edge tensor products (see
        :func:`torsion.kernels.conv`)."""

    def __repr__(self) -> str:
        return f"<torsion backend {self.name!r}>"


_BACKENDS: dict[str, Backend] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Add ``backend`` to the registry under ``backend.name``.

    Args:
        backend: an instance of a :class:`Backend` subclass.
        replace: allow replacing a backend registered under the same name.

    Returns:
        ``backend``.

    Raises:
        TypeError: if ``backend`` is not a :class:`Backend`.
        ValueError: if the name is taken and ``replace`` is false.
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"expected a torsion.kernels.Backend, got {type(backend).__name__}")
    if backend.name == "auto":
        raise ValueError("'auto' is reserved for resolve(); pick another backend name")
    if backend.name in _BACKENDS and not replace:
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend
    return backend


def unregister_backend(name: str) -> Backend:
    """Remove and return the backend registered as ``name`` (``KeyError`` if none)."""
    return _BACKENDS.pop(name)


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``.

    Raises:
        ValueError: for an unknown name (the message lists the registered ones).
    """
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; registered backends: {sorted(_BACKENDS)}"
        ) from None


def _by_priority() -> list[Backend]:
    return sorted(_BACKENDS.values(), key=lambda b: (-b.priority, b.name))


def available_backends() -> tuple[str, ...]:
    """Names of the registered backends that can run in this process, in ``"auto"`` order."""
    return tuple(b.name for b in _by_priority() if b.unavailable_reason() is None)


def backend_info() -> list[BackendInfo]:
    """``(name, devices, dtypes)`` of every available backend, in ``"auto"`` order.

    This is what ``torsion info`` reports.
    """
    rows = []
    for backend in _by_priority():
        if backend.unavailable_reason() is not None:
            continue
        devices = backend.support.devices
        rows.append(
            BackendInfo(
                backend.name,
                ("any",) if devices is None else tuple(sorted(devices)),
                tuple(sorted(_dtype_name(d) for d in backend.support.dtypes)),
            )
        )
    return rows


def resolve(
    descriptor: TPDescriptor,
    device: torch.device | str,
    dtype: torch.dtype,
    op: str = "tensor_product",
    backend: str = "auto",
    *,
    derivative_order: int = 1,
) -> Backend:
    """Pick the backend that runs ``op`` for ``descriptor`` on ``device`` in ``dtype``.

    Args:
        descriptor: the tensor product (its ``layout`` is part of the request).
        device: where the tensors live (``torch.device`` or a string such as ``"cuda:0"``).
        dtype: their floating dtype.
        op: ``"tensor_product"`` (default) or ``"conv"``.
        backend: ``"auto"`` (default) for the available backend of highest priority that
            supports the request (and lists the device type in its ``auto_devices``),
            or a registered name to insist on that backend.
        derivative_order: how many times the caller will differentiate the output: ``0``
            (inference), ``1`` (training; default) or ``2`` (forces in the loss, i.e.
            double backward).

    Returns:
        The backend; call ``backend.tensor_product(...)`` or ``backend.conv(...)`` on it.

    Raises:
        UnsupportedBackendError: if the named backend is unavailable or does not support
            the request (the message names the op, device type, dtype, layout or derivative
            order it lacks), or, for ``"auto"``, if no backend does.
        ValueError: for an unknown backend name or op, or a negative ``derivative_order``.
        TypeError: if ``descriptor`` is not a ``TPDescriptor`` or ``dtype`` not a
            ``torch.dtype``.
    """
    check_descriptor(descriptor)
    device = torch.device(device)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if op not in KERNEL_OPS:
        raise ValueError(f"unknown op {op!r}; known ops are {KERNEL_OPS}")
    derivative_order = _non_negative_int(derivative_order, "derivative_order")
    if backend == "auto":
        reasons = []
        for candidate in _by_priority():
            reason = candidate.unavailable_reason()
            if reason is None:
                reason = candidate.unsupported_reason(
                    descriptor, device, dtype, op, derivative_order
                )
            auto_devices = candidate.support.auto_devices
            if reason is None and auto_devices is not None and device.type not in auto_devices:
                reason = f"'auto' picks it only on {sorted(auto_devices)} (name it to use it)"
            if reason is None:
                return candidate
            reasons.append(f"{candidate.name}: {reason}")
        request = _describe_request(descriptor, device, dtype, op, derivative_order)
        raise UnsupportedBackendError(
            f"no registered backend can run {request}: "
            + (" | ".join(reasons) or "none registered")
        )
    chosen = get_backend(backend)
    reason = chosen.unavailable_reason()
    if reason is not None:
        raise UnsupportedBackendError(f"backend {backend!r} is unavailable here: {reason}")
    reason = chosen.unsupported_reason(descriptor, device, dtype, op, derivative_order)
    if reason is not None:
        request = _describe_request(descriptor, device, dtype, op, derivative_order)
        raise UnsupportedBackendError(
            f"backend {backend!r} cannot run {request}: it does not support {reason}. "
            "Pick another backend (or backend='auto'); torsion never falls back silently."
        )
    return chosen


def _describe_request(
    descriptor: TPDescriptor,
    device: torch.device,
    dtype: torch.dtype,
    op: str,
    derivative_order: int,
) -> str:
    return (
        f"op {op!r} on device {device.type!r} in {_dtype_name(dtype)} with layout "
        f"{descriptor.layout!r} and derivatives of order {derivative_order}"
    )


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    value = operator.index(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value
