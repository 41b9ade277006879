"""Shared pieces of the equivariant layers: input validation (metadata only, no host
syncs) and e3nn's second-moment-normalized activations."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from e3nn import o3
from torch import Tensor, nn

__all__ = [
    "NormalizedActivation",
    "as_irreps",
    "check_features",
]


def as_irreps(value: Any, name: str) -> o3.Irreps:
    """``o3.Irreps(value)``, or a ``ValueError`` that names the argument."""
    try:
        return o3.Irreps(value)
    except (ValueError, TypeError, AssertionError) as error:
        raise ValueError(f"{name} is not a valid e3nn Irreps: {value!r} ({error})") from None


def check_features(x: Any, dim: int, irreps_text: str, owner: str, name: str = "x") -> Tensor:
    """Raise unless ``x`` is a floating tensor whose last dimension is ``dim``.

    Takes the dimension and the irreps as a string (not the ``Irreps``), so that
    ``torch.compile`` guards on plain values.

    Args:
        x: the features.
        dim: the expected last dimension (``irreps.dim``).
        irreps_text: the irreps, for the message.
        owner: the layer, for the message (``"Linear"``).
        name: the argument, for the message.

    Returns:
        ``x``.

    Raises:
        TypeError: for a non-tensor or a non-floating dtype.
        ValueError: for a last dimension other than ``dim``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{owner}: {name} must have a floating dtype, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != dim:
        raise ValueError(
            f"{owner}: {name} has shape {tuple(x.shape)}, but its irreps '{irreps_text}' need a "
            f"last dimension of {dim}"
        )
    return x


def _second_moment_scale(act: Callable[[Tensor], Tensor]) -> float:
    """e3nn's ``normalize2mom`` constant ``E[act(z)^2]^(-1/2)``, ``z ~ N(0, 1)``.

    The same one million float64 samples (seed 0) as e3nn, so the constant is e3nn's. Each
    evaluation costs tens of milliseconds and models build many gates, so the constant is
    cached per activation; an activation that cannot be hashed (a dataclass with the
    default ``eq=True``, say) is evaluated every time, as e3nn always does.
    """
    try:
        hash(act)
    except TypeError:
        return _evaluate_second_moment_scale(act)
    return _cached_second_moment_scale(act)


def _evaluate_second_moment_scale(act: Callable[[Tensor], Tensor]) -> float:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(1_000_000, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        return act(z).pow(2).mean().pow(-0.5).item()


_cached_second_moment_scale = functools.lru_cache(maxsize=64)(_evaluate_second_moment_scale)


class NormalizedActivation(nn.Module):
    """``act(x) * c`` with ``c`` making the second moment 1 under a standard normal input.

    Equals e3nn's ``e3nn.math.normalize2mom(act)`` (the factor is dropped when it is within
    1e-4 of one, as e3nn does).

    Args:
        act: an elementwise function.
    """

    def __init__(self, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.act = act
        scale = _second_moment_scale(act)
        self.scale = None if abs(scale - 1.0) < 1e-4 else scale

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(x)
        return y if self.scale is None else y * self.scale
