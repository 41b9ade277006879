"""Batched symmetric eigendecomposition, spread over the intra-op threads on CPU.

torch's CPU ``eigh`` loops over a batch on one thread: each small matrix is a separate
LAPACK call, too small for LAPACK's own threading. Splitting the batch into one chunk
per intra-op thread (``torch.get_num_threads()``) and decomposing the chunks in a
thread pool runs those calls side by side (``eigh`` releases the GIL). Each matrix goes
through the same LAPACK call as before, so results are bitwise identical.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

__all__ = ["eigh"]

# Small matrices only: LAPACK threads large ones itself, and splitting those would
# oversubscribe the cores.
_MAX_PARALLEL_SIZE = 128
_MIN_CHUNK = 16

_lock = threading.Lock()
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    # Keyed by process id: a forked child inherits the pool object but not its threads.
    key = (os.getpid(), workers)
    with _lock:
        if key not in _pools:
            _pools[key] = ThreadPoolExecutor(workers, thread_name_prefix="torsion-eigh")
        return _pools[key]


def _eigh_chunk(chunk: Tensor) -> tuple[Tensor, Tensor]:
    with torch.no_grad():  # grad mode is thread-local; never record a graph here
        return torch.linalg.eigh(chunk)


def eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh(x)`` (ascending eigenvalues), batch-parallel for small CPU matrices.

    Not differentiable: callers supply their own backward. Falls back to one
    ``torch.linalg.eigh`` call on other devices, under ``torch.compile``, with one
    intra-op thread, or when the batch is too small to split.
    """
    if torch.compiler.is_compiling() or x.device.type != "cpu":
        return torch.linalg.eigh(x)
    n = x.shape[-1]
    workers = min(torch.get_num_threads(), x.numel() // max(1, n * n) // _MIN_CHUNK)
    if workers < 2 or n > _MAX_PARALLEL_SIZE:
        return torch.linalg.eigh(x)
    flat = x.reshape(-1, n, n)
    parts = list(_pool(workers).map(_eigh_chunk, flat.chunk(workers)))
    eigenvalues = torch.cat([lam for lam, _ in parts]).reshape(x.shape[:-1])
    eigenvectors = torch.cat([q for _, q in parts]).reshape(x.shape)
    return eigenvalues, eigenvectors
