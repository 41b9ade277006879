"""Batches of parameters that one tensor operation can update.

The training optimizers update every parameter of a batch with one call of each manifold
map on the stacked ``(B, *shape)`` tensor instead of ``B`` calls in a Python loop. A
batch holds parameters with the same shape, dtype and device and equal manifolds:

* a plain tensor, or a :class:`geoopt.ManifoldParameter` on :class:`geoopt.Euclidean`,
  is Euclidean; those go to :mod:`torch.optim`'s multi-tensor (``foreach``) kernels;
* two manifolds are equal when they are the same object, or when they have the same type
  and the same configuration (:func:`manifold_key`), so the many ``Stiefel()`` instances
  that layers create for themselves still share one batch.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

import geoopt
import torch
from torch import Tensor, nn

__all__ = ["Batch", "Workspace", "manifold_key", "manifold_of", "split_into_batches", "write_back"]

# Attributes every nn.Module carries (hooks, registries, the training flag): not configuration.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
# Working set of one batched update on a CPU (about an L2 cache); see _cache_sized.
CPU_BATCH_BYTES = 512 * 1024
_PLAIN = (bool, int, float, complex, str, bytes, type(None), enum.Enum, torch.dtype)


def manifold_of(param: Tensor) -> geoopt.Manifold | None:
    """The manifold a parameter lives on, or ``None`` for a Euclidean parameter."""
    if isinstance(param, geoopt.ManifoldTensor) and type(param.manifold) is not geoopt.Euclidean:
        return param.manifold
    return None


def _plain_value(value: object) -> bool:
    if isinstance(value, (tuple, frozenset)):
        return all(_plain_value(item) for item in value)
    return isinstance(value, _PLAIN)


def manifold_key(manifold: nn.Module) -> Hashable:
    """A key that two manifolds share exactly when they compute the same maps.

    The key is the type, the plain attributes (numbers, strings, flags, enums and tuples of
    them: ``metric``, ``retraction``, ``ndim``, ...) and the keys of the submodules. A
    manifold that holds tensors (a learnable curvature, a scale buffer) or any attribute
    whose equality is not plain gets a key of its own identity, so it shares a batch only
    with itself.
    """
    if any(t is not None for t in manifold._parameters.values()) or any(
        t is not None for t in manifold._buffers.values()
    ):
        return ("object", id(manifold))
    config = []
    for name, value in sorted(vars(manifold).items()):
        if name in _MODULE_INTERNALS:
            continue
        if not _plain_value(value):
            return ("object", id(manifold))
        config.append((name, value))
    children = tuple((name, manifold_key(child)) for name, child in manifold._modules.items())
    return (type(manifold), tuple(config), children)


@dataclass
class Batch:
    """Parameters updated together: one manifold, one shape, dtype and device.

    Attributes:
        manifold: the shared manifold (the first parameter's instance).
        params: the parameters, in the order of their parameter group.
    """

    manifold: geoopt.Manifold
    params: list[Tensor] = field(default_factory=list)


def split_into_batches(
    params: Iterable[Tensor],
    *,
    batched: bool,
    key: Callable[[geoopt.Manifold], Hashable] = manifold_key,
) -> tuple[list[Tensor], list[Batch]]:
    """Split parameters into the Euclidean ones and batches of manifold parameters.

    Args:
        params: parameters, in group order (the order of the batches is that of their first
            member, so it is deterministic).
        batched: ``False`` gives every manifold parameter a batch of its own (the
            one-at-a-time reference path). CPU batches are cut to about
            ``CPU_BATCH_BYTES`` each (:func:`_cache_sized`).
        key: the manifold part of the batch key; ``manifold_key`` by default.

    Returns:
        ``(euclidean, batches)``.
    """
    euclidean: list[Tensor] = []
    # first by shape, dtype and device; a manifold key (a walk over the manifold's
    # attributes) is computed only where two parameters could share a batch
    candidates: dict[Hashable, list[Tensor]] = {}
    position: dict[int, int] = {}
    for index, param in enumerate(params):
        position[id(param)] = index
        if manifold_of(param) is None:
            euclidean.append(param)
        elif batched:
            candidates.setdefault((param.shape, param.dtype, param.device), []).append(param)
        else:
            candidates[("param", id(param))] = [param]
    batches: dict[Hashable, Batch] = {}
    keys: dict[int, Hashable] = {}  # one key computation per manifold object and call
    for group_key, members in candidates.items():
        for param in members:
            manifold = manifold_of(param)
            if len(members) == 1:
                batch_key: Hashable = group_key
            else:
                if id(manifold) not in keys:
                    keys[id(manifold)] = key(manifold)
                batch_key = (group_key, keys[id(manifold)])
            batches.setdefault(batch_key, Batch(manifold)).params.append(param)
    ordered = sorted(batches.values(), key=lambda batch: position[id(batch.params[0])])
    return euclidean, [chunk for batch in ordered for chunk in _cache_sized(batch)]


def _cache_sized(batch: Batch) -> list[Batch]:
    """A CPU batch cut into chunks of about ``CPU_BATCH_BYTES``; other devices whole.

    Each batched update streams its tensors through a dozen operations. On a CPU a
    chunk that stays in cache between them is faster than one big batch that goes to
    memory and back each time (200 St(256, 32) parameters: chunks of 16 took 80 ms per Adam
    step, one batch of 200 took 120-135 ms, one at a time 160 ms). GPUs want the whole
    batch in one launch.
    """
    first = batch.params[0]
    if first.device.type != "cpu":
        return [batch]
    size = max(1, CPU_BATCH_BYTES // max(1, first.numel() * first.element_size()))
    if len(batch.params) <= size:
        return [batch]
    return [
        Batch(batch.manifold, batch.params[i : i + size]) for i in range(0, len(batch.params), size)
    ]


class Workspace:
    """Stacking buffers that the chunks of a batched update reuse, on a CPU.

    :meth:`stack` copies the parameters (gradients, moments) of a chunk into one
    ``(B, *shape)`` tensor, which the update then works on in place without touching the
    inputs. A fresh tensor of a few hundred KiB comes from glibc's ``mmap`` and is
    page-faulted on first touch, every chunk and every step: on 200 St(256, 32)
    parameters, where a chunk's tensors are 512 KiB, that was a third of the Adam step
    (40 ms with fresh stacks, 26 ms with reused ones; glibc tuned never to return memory:
    also 26 ms). So on a CPU each role (``"x"``, ``"grad"``, ...) keeps one buffer per shape
    and dtype, as large as the largest chunk seen (about ``CPU_BATCH_BYTES``), and every
    chunk stacks into a prefix of it. Other devices allocate through their own caching
    allocators, so there :meth:`stack` is ``torch.stack``.

    A batch of one tensor (a parameter whose shape no other shares, the common case in a
    model with a few manifold layers) is not stacked at all: its "stack" is the tensor
    itself, without a leading batch dimension (manifold maps treat leading dimensions as a
    batch, so the update is the same code; it reads per-point shapes from the trailing
    dimensions). In-place work on it reaches the tensor. The optimizers write in place only
    to their own state and to the parameters they overwrite anyway, and ask for a
    ``private`` copy of anything else they write to (a gradient to which weight decay is
    added). On a small parameter the copies, the write-backs and the batched matrix
    products of a ``(1, n, p)`` stack (``bmm`` behind ``expand`` and ``reshape``) were
    40 % of the step.

    A stacked tensor is valid until the next :meth:`stack` of the same role and shape:
    an update must finish with one chunk (write it back) before stacking the next.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}

    def stack(self, tensors: list[Tensor], role: str, *, private: bool = False) -> Tensor:
        """``torch.stack(tensors)`` into the reused buffer of ``role`` (CPU), or fresh; a
        single tensor itself (a copy if ``private``).

        Called under ``torch.no_grad()`` by the optimizers, so no graph is recorded.
        """
        first = tensors[0]
        if len(tensors) == 1:
            return first.clone() if private else first
        if first.device.type != "cpu":
            return torch.stack(tensors)
        key = (role, first.shape, first.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape[0] < len(tensors):
            buffer = torch.empty((len(tensors), *first.shape), dtype=first.dtype)
            self._buffers[key] = buffer
        return torch.stack(tensors, out=buffer[: len(tensors)])


def write_back(targets: list[Tensor], stacked: Tensor) -> None:
    """Copy the slices of ``stacked`` into ``targets`` (one multi-tensor copy), or the
    unstacked result of a batch of one into its target, unless it is the target."""
    if len(targets) == 1 and stacked.shape == targets[0].shape:  # unstacked (Workspace.stack)
        if stacked is not targets[0]:
            targets[0].copy_(stacked)
        return
    torch._foreach_copy_(targets, list(stacked.unbind(0)))
