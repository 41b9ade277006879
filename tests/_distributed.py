"""Run a function on several CPU processes joined by a gloo process group.

``run_on_ranks(fn, *args)`` starts ``world_size`` fresh (spawned) processes, initialises
``torch.distributed`` with the gloo backend in each, calls ``fn(rank, world_size, *args)``
and returns the per-rank results in rank order. An exception on any rank is re-raised here
with that rank's traceback. ``fn`` and its arguments must be picklable (a module-level
function), because spawned processes import it afresh.
"""

from __future__ import annotations

import io
import queue as queue_module
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _to_bytes(value: Any) -> bytes:
    """Tensors in a queue travel by shared memory, which dies with the process: copy them."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _worker(
    fn: Callable, rank: int, world_size: int, init_method: str, results: Any, args: tuple
) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
        try:
            results.put((rank, True, _to_bytes(fn(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_on_ranks(fn: Callable, *args: Any, world_size: int = 2, timeout: float = 180.0) -> list:
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as directory:
        init_method = (Path(directory) / "rendezvous").as_uri()
        processes = [
            context.Process(target=_worker, args=(fn, rank, world_size, init_method, results, args))
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        collected: dict[int, Any] = {}
        try:
            for _ in range(world_size):
                rank, ok, value = results.get(timeout=timeout)
                if not ok:
                    raise RuntimeError(f"rank {rank} failed:\n{value}")
                collected[rank] = torch.load(io.BytesIO(value), weights_only=False)
        except queue_module.Empty:
            raise TimeoutError(
                f"{world_size - len(collected)} of {world_size} ranks did not finish "
                f"within {timeout} s"
            ) from None
        finally:
            for process in processes:
                process.join(timeout=10)
                if process.is_alive():
                    process.kill()
    return [collected[rank] for rank in range(world_size)]
