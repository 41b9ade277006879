"""Shared helpers: e3nn modules built in float64, and the backends to check."""

from __future__ import annotations

import contextlib

import torch

from torsion.kernels import available_backends

F64 = torch.float64

#: Every backend is checked against the reference and e3nn; ``torch`` when it is registered.
BACKENDS = ["reference"] + (["torch"] if "torch" in available_backends() else [])


@contextlib.contextmanager
def default_float64():
    """e3nn stores its constants in the default dtype at construction; build in float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def e3nn_float64(build, *args, **kwargs):
    """``build(*args, **kwargs)`` with float64 as the default dtype."""
    with default_float64():
        return build(*args, **kwargs)


def randn(generator: torch.Generator, *shape: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=dtype)
