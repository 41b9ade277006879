"""Shared benchmark harness: timing, correctness checks, peak memory, environment, output.

Every ``benchmarks/bench_*.py`` is a script that imports this module
(``from _harness import ...``; the script's own directory is on ``sys.path``) and
follows the same shape::

    args = parse_args(__doc__)                 # --quick, --out, --repeats, --warmup, ...
    env = setup(args)                          # applies --threads, returns the environment
    check_close("torsion forward", out, ref, rtol=..., atol=...)   # before any timing
    timings = compare_passes(                  # torsion and anchors, interleaved
        {"torsion": loss_torsion, "eigh": loss_eigh}, [x],
        warmup=args.warmup, repeats=args.repeats,
    )
    table = render_table(headers, rows)        # ratio(anchor_ms, torsion_ms) per cell
    write_results("linalg", args, env, records, table)

Rules the harness encodes (design: ARCHITECTURE.md section 7, Benchmarks):

* warm-up runs, then ``repeats`` timed runs; report median, min and max. Candidates
  compared with each other are timed round-robin, so machine drift hits all alike;
* correctness against a reference is checked before anything is timed, and a failure
  raises instead of producing a number;
* forward, forward+backward and double backward are timed separately;
* peak memory is measured in a fresh ``spawn`` subprocess, so earlier work in the
  benchmark process does not pollute the high-water mark;
* every number is reported next to the anchor measured in the same run, as a ratio
  ``anchor_time / torsion_time`` (> 1 means torsion is faster).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = [
    "BENCH_DIR",
    "CorrectnessError",
    "Timing",
    "check_close",
    "compare_passes",
    "environment",
    "environment_line",
    "fmt_ms",
    "fmt_ratio",
    "nonfinite_matrices",
    "parse_args",
    "pass_fns",
    "peak_memory",
    "ratio",
    "render_table",
    "setup",
    "synchronize",
    "time_fn",
    "time_fns",
    "time_passes",
    "write_results",
]

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "out"
K = TypeVar("K", bound=Hashable)


# ---------------------------------------------------------------------------------------
# Command line and environment
# ---------------------------------------------------------------------------------------


def parse_args(
    description: str | None = None,
    argv: Sequence[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The command line every benchmark shares (``extra`` adds a script's own options).

    ``--quick``: a tiny problem, so CI can run every benchmark in seconds.
    ``--out DIR``: where JSON and markdown go (default ``benchmarks/out/``, gitignored).
    ``--repeats N`` / ``--warmup N``: timed and untimed runs per measurement
        (defaults 20 / 3, or 3 / 1 with ``--quick``).
    ``--threads N``: ``torch.set_num_threads(N)``; by default torch's setting is left alone.
    ``--device``: ``cpu`` (default) or ``cuda``.
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny problem (CI smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (default 3)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: leave as is)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    return args


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Apply ``--threads`` (to torch, and to the BLAS and OpenMP pools of NumPy and SciPy,
    which the anchors use: pymanopt, ARPACK) and return the :func:`environment` block for
    ``args.device``."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # then only torch's threads follow --threads
            pass
        else:
            threadpool_limits(args.threads)
    return environment(args.device)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=BENCH_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _blas_threads() -> int | None:
    """The largest thread count of the BLAS pools NumPy and SciPy load (``None`` without
    threadpoolctl): what pymanopt's and ARPACK's linear algebra runs on."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    counts = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    return max(counts, default=None)


def environment(device: str = "cpu") -> dict[str, Any]:
    """What the numbers depend on: versions, threads, hardware, git SHA and date."""
    dev = torch.device(device)
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "blas_threads": _blas_threads(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": str(dev),
        "device_name": _cpu_name(),
        "platform": platform.platform(),
        "git_sha": _git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if dev.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(dev)
        env["cuda"] = torch.version.cuda
    return env


def environment_line(env: dict[str, Any]) -> str:
    """One-line summary of :func:`environment`, for tables and ``RESULTS.md``."""
    return (
        f"torch {env['torch']}, Python {env['python']}, {env['device']} "
        f"({env['device_name']}), {env['threads']} threads / {env['cpu_count']} CPUs, "
        f"BLAS threads {env.get('blas_threads') or 'unknown'}, "
        f"git {env['git_sha'] or 'unknown'}, {env['date']}"
    )


# ---------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------


class CorrectnessError(AssertionError):
    """A candidate disagrees with its reference; raised before any timing happens."""


def check_close(
    name: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float,
    atol: float,
) -> float:
    """Raise :class:`CorrectnessError` unless ``|actual - expected| <= atol + rtol |expected|``.

    Both are compared in float64 (``expected`` is usually a float64 reference while
    ``actual`` may be float32). Non-finite entries in ``actual`` always fail.

    Returns:
        The largest violation ratio ``|a - e| / (atol + rtol |e|)`` (<= 1 on success),
        handy to log how much headroom the tolerance has.
    """
    if actual.shape != expected.shape:
        raise CorrectnessError(
            f"{name}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
        )
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(a).all()):
        bad = int((~torch.isfinite(a)).sum())
        raise CorrectnessError(f"{name}: {bad} non-finite entries")
    if a.numel() == 0:
        return 0.0
    worst = float(((a - e).abs() / (atol + rtol * e.abs())).max())
    if worst > 1.0:
        err = float((a - e).abs().max())
        raise CorrectnessError(
            f"{name}: max abs error {err:.3g} exceeds tolerance "
            f"(rtol={rtol:g}, atol={atol:g}; {worst:.3g}x over)"
        )
    return worst


def nonfinite_matrices(t: torch.Tensor) -> int:
    """How many matrices in a ``(..., n, n)`` batch contain any NaN or Inf."""
    return int((~torch.isfinite(t)).flatten(-2).any(-1).sum())


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Wall-clock statistics over ``repeats`` runs after warm-up, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued CUDA work on ``device`` (a no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    repeats: int = 10,
    device: torch.device | str | None = "cpu",
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Each timed call is bracketed by :func:`synchronize` so CUDA kernels are counted.
    """
    return time_fns({"fn": fn}, warmup=warmup, repeats=repeats, device=device)["fn"]


def time_fns(
    fns: Mapping[K, Callable[[], Any]],
    *,
    warmup: int = 3,
    repeats: int = 10,
    device: torch.device | str | None = "cpu",
) -> dict[K, Timing]:
    """Time several callables round-robin: repeat ``r`` runs each of them once, in an order
    shuffled anew each round (seeded, so runs repeat).

    Interleaving means a slow drift of the machine (frequency scaling, a noisy
    neighbour) hits every candidate alike, so ratios between them stay stable. The
    shuffle keeps any candidate from always following the same one: in a fixed order the
    candidate after the slowest one always started with caches that one had emptied, and
    the one after it with the caches warmed by a candidate of the same shapes (one
    optimizer step of five small layers: 608 against 454 us, the same code, first or
    second after geoopt's canonical Stiefel step). Each callable first gets ``warmup``
    untimed calls.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[K, list[float]] = {key: [] for key in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for key in order:
            fn = fns[key]
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[key].append((time.perf_counter() - start) * 1e3)
    return {
        key: Timing(statistics.median(s), min(s), max(s), repeats) for key, s in samples.items()
    }


def pass_fns(
    loss_fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    *,
    double_backward: bool = False,
) -> dict[str, Callable[[], None]]:
    """Zero-argument callables for each pass of ``loss_fn(*inputs)`` (a scalar).

    * ``"forward"``: the loss with grad enabled (graph built), as in training;
    * ``"forward_backward"``: forward, then ``torch.autograd.grad`` w.r.t. all ``inputs``;
    * ``"double_backward"`` (if asked): forward, first backward with ``create_graph``,
      then the gradient of ``<grad, 1>`` (a Hessian-vector product with an all-ones
      direction).
    """
    inputs = list(inputs)

    def forward() -> None:
        loss_fn(*inputs)

    def forward_backward() -> None:
        torch.autograd.grad(loss_fn(*inputs), inputs)

    def double() -> None:
        grads = torch.autograd.grad(loss_fn(*inputs), inputs, create_graph=True)
        torch.autograd.grad(sum(g.sum() for g in grads), inputs)

    passes = {"forward": forward, "forward_backward": forward_backward}
    if double_backward:
        passes["double_backward"] = double
    return passes


def time_passes(
    loss_fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    *,
    double_backward: bool = False,
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, Timing]:
    """Time forward, forward+backward and (optionally) double backward separately.

    See :func:`pass_fns` for what each pass runs. Returns ``{pass name: Timing}``.
    """
    fns = pass_fns(loss_fn, inputs, double_backward=double_backward)
    return time_fns(fns, warmup=warmup, repeats=repeats, device=inputs[0].device)


def compare_passes(
    loss_fns: Mapping[str, Callable[..., torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    *,
    double_backward: bool = False,
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, dict[str, Timing]]:
    """:func:`time_passes` for several implementations at once, interleaved.

    ``loss_fns`` maps a method name (``"torsion"``, an anchor) to its loss; all see the
    same ``inputs``. Every (method, pass) pair is timed round-robin by :func:`time_fns`.

    Returns:
        ``{method: {pass name: Timing}}``.
    """
    fns = {
        (method, name): fn
        for method, loss_fn in loss_fns.items()
        for name, fn in pass_fns(loss_fn, inputs, double_backward=double_backward).items()
    }
    timed = time_fns(fns, warmup=warmup, repeats=repeats, device=inputs[0].device)
    out: dict[str, dict[str, Timing]] = {method: {} for method in loss_fns}
    for (method, name), timing in timed.items():
        out[method][name] = timing
    return out


# ---------------------------------------------------------------------------------------
# Peak memory (fresh subprocess)
# ---------------------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` from ``/proc/self/status`` in bytes (Linux), else ``None``."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError):
        pass
    return None


def _reset_cpu_peak() -> bool:
    """Return freed heap pages to the OS and reset the peak-RSS mark, where possible.

    ``malloc_trim(0)`` (glibc) stops the workload from silently reusing pages that setup
    freed; writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0) resets ``VmHWM`` to
    the current RSS. Returns whether the reset worked.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def _maxrss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def _memory_child(make_workload, args, device, threads, queue) -> None:
    try:
        torch.set_num_threads(threads)
        workload = make_workload(*args)
        workload()  # once untimed: lazy initialisation and one-time caches are not counted
        synchronize(device)
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            workload()
            synchronize(device)
            peak, method = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
        elif _reset_cpu_peak():
            base = _proc_status_bytes("VmRSS")
            workload()
            peak, method = _proc_status_bytes("VmHWM"), "vmhwm"
        else:
            base = _maxrss_bytes()
            workload()
            peak, method = _maxrss_bytes(), "ru_maxrss"
        queue.put(("ok", (base, peak, method)))
    except BaseException as exc:  # report any failure to the parent instead of hanging
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def peak_memory(
    make_workload: Callable[..., Callable[[], Any]],
    *args: Any,
    device: str = "cpu",
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Peak memory of one workload, measured in a fresh ``spawn`` subprocess.

    ``make_workload(*args)`` runs in the child and builds the inputs, returning a
    zero-argument callable: the workload. It is run once unmeasured (lazy initialisation,
    one-time caches), then once measured; the baseline is taken just before the measured
    run, so neither input construction nor the interpreter counts in ``delta_mb``.

    ``make_workload`` must be a module-level function (it is pickled by reference; a
    benchmark script's own functions work as long as the script guards its entry point
    with ``if __name__ == "__main__"``).

    CPU: on Linux, freed heap pages are returned to the OS and the peak-RSS mark is reset
    before the measured run, then ``VmHWM`` is read (method ``"vmhwm"``). Elsewhere it
    falls back to ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (``"ru_maxrss"``), a
    process-lifetime high-water mark that can hide a workload smaller than the setup.
    CUDA: ``torch.cuda.max_memory_allocated`` (``"cuda_max_allocated"``).

    Returns:
        ``{"base_mb", "peak_mb", "delta_mb", "method"}``.
    """
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_memory_child,
        args=(make_workload, args, device, torch.get_num_threads(), queue),
    )
    proc.start()
    try:
        status, payload = queue.get(timeout=timeout)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status != "ok":
        raise RuntimeError(f"peak-memory subprocess failed: {payload}")
    base, peak, method = payload
    mb = 1024.0**2
    return {
        "base_mb": base / mb,
        "peak_mb": peak / mb,
        "delta_mb": (peak - base) / mb,
        "method": method,
    }


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------


def ratio(anchor_ms: float, torsion_ms: float) -> float:
    """``anchor_time / torsion_time``: above 1 means torsion is faster."""
    return anchor_ms / torsion_ms if torsion_ms > 0 else float("nan")


def fmt_ms(ms: float) -> str:
    """Milliseconds with three significant digits (``0.123``, ``12.3``, ``1234``)."""
    return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


def fmt_ratio(r: float) -> str:
    """A ratio as ``1.23x``."""
    return f"{r:.2f}x"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are ``str()``-ed, numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, expected {len(headers)}: {row}")
    numeric = [
        all(isinstance(row[i], (int, float)) or _looks_numeric(str(row[i])) for row in rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + ":" if num else "-" * (w + 2)
        for w, num in zip(widths, numeric, strict=True)
    )
    return "\n".join([line(headers), rule + "|", *map(line, cells)])


def _looks_numeric(s: str) -> bool:
    try:
        float(s.rstrip("x%"))
    except ValueError:
        return False
    return True


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_results(
    name: str,
    args: argparse.Namespace,
    env: dict[str, Any],
    records: list[dict[str, Any]],
    table: str,
) -> tuple[Path, Path]:
    """Write ``<out>/<name>.json`` (environment, settings, records, table) and ``<name>.md``.

    Files are overwritten on each run. Returns the two paths.
    """
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    payload = {
        "benchmark": name,
        "environment": env,
        "settings": settings,
        "records": records,
        "table": table,
    }
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    md_path.write_text(f"{table}\n\n{environment_line(env)}\n")
    return json_path, md_path
