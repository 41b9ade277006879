"""``torch.linalg.eigh`` on a batch, spread over the CPU's intra-op threads.

On the CPU torch solves a batch of small symmetric eigenproblems one matrix after the
other on one thread (LAPACK ``syevd`` per matrix; ``torch.set_num_threads`` does not
change that), so a batch of 10,000 SPD(30) matrices or graph Laplacians keeps one core
busy and leaves the others idle. :func:`eigh` splits the batch into one contiguous part
per intra-op thread and runs the parts in a thread pool (torch releases the GIL inside
the op). Every matrix is still solved by the same LAPACK routine on its own, so the
result is bit-for-bit the one of ``torch.linalg.eigh``.

The split only happens where it is safe and pays: a plain CPU tensor (no ``torch.func``
wrapper, no tensor subclass), outside ``torch.compile``, with no autograd graph to
record, more than one intra-op thread and at least :data:`MIN_MATRICES_PER_THREAD`
matrices per thread. Everything else is ``torch.linalg.eigh`` itself.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

__all__ = ["MIN_MATRICES_PER_THREAD", "eigh"]

#: Smallest batch share worth a thread: below it the hand-off (tens of microseconds)
#: costs more than the matrices it saves.
MIN_MATRICES_PER_THREAD = 64


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="torsion-eigh")


def _splits(a: Tensor) -> int:
    """How many parts to solve in parallel (1: call ``torch.linalg.eigh`` directly)."""
    if (
        a.device.type != "cpu"
        or a.dim() < 3
        or type(a) is not torch.Tensor
        or torch.compiler.is_compiling()
        or torch._C._functorch.is_functorch_wrapped_tensor(a)
        or (a.requires_grad and torch.is_grad_enabled())
    ):
        return 1
    batch = a.shape[:-2].numel()
    return max(1, min(torch.get_num_threads(), batch // MIN_MATRICES_PER_THREAD))


def eigh(a: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and orthonormal eigenvectors of symmetric ``a`` ``(..., n, n)``.

    The same result as ``torch.linalg.eigh(a)``, bit for bit, with the batch solved
    by ``torch.get_num_threads()`` threads on the CPU where that is safe (see the module
    docstring). Use ``torch.linalg.eigh`` for anything that must be differentiated: with
    a graph to record this is ``torch.linalg.eigh``.
    """
    parts = _splits(a)
    if parts == 1:
        return torch.linalg.eigh(a)
    n = a.shape[-1]
    chunks = a.reshape(-1, n, n).tensor_split(parts)

    def solve(m: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():  # grad mode is per thread: a worker's would be on
            return torch.linalg.eigh(m)

    results = list(_pool(parts).map(solve, chunks))
    values = torch.cat([r[0] for r in results]).reshape(a.shape[:-1])
    vectors = torch.cat([r[1] for r in results]).reshape(a.shape)
    return values, vectors
