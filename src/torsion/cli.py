"""The ``torsion`` command: ``--version``, ``info`` and ``tour``."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time
from pathlib import Path

import torsion

__all__ = ["kernel_environment", "main"]

DEPENDENCIES = ["torch", "geoopt", "e3nn", "torch_geometric", "numpy", "scipy", "triton"]


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def kernel_environment() -> dict[str, str]:
    """The registered tensor-product backends and what a Triton backend would need.

    ``registry`` lists each backend of :mod:`torsion.kernels` with its devices and dtypes
    (imported here, lazily: it imports e3nn); the rest are facts: whether Triton imports,
    whether CUDA is available and whether ``TRITON_INTERPRET`` is set.
    """
    import torch

    from torsion.kernels import backend_info

    try:
        import triton
    except Exception as error:  # a broken triton install raises more than ImportError
        triton_state = (
            "not installed"
            if isinstance(error, ModuleNotFoundError) and error.name == "triton"
            else f"installed but not importable ({type(error).__name__}: {error})"
        )
    else:
        triton_state = f"importable ({triton.__version__})"
    registry = "; ".join(
        f"{info.name} ({', '.join(info.devices)}; {', '.join(info.dtypes)})"
        for info in backend_info()
    )
    return {
        "registry": registry,
        "triton": triton_state,
        "cuda": "available" if torch.cuda.is_available() else "unavailable",
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset"),
    }


def _info() -> int:
    import torch

    print(f"torsion {torsion.__version__} ({Path(torsion.__file__).parent})")
    print(f"python {sys.version.split()[0]}")
    for name in DEPENDENCIES:
        print(f"{name:16s}{_version(name)}")
    print(f"threads         {torch.get_num_threads()}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [
            f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())
        ]
    print(f"devices         {', '.join(devices)}")
    print("kernel backends")
    for key, value in kernel_environment().items():
        print(f"  {key:18s}{value}")
    return 0


def _examples_dir() -> Path:
    examples = Path(torsion.__file__).resolve().parents[2] / "examples"
    if not examples.is_dir():
        raise SystemExit(
            f"torsion tour needs the examples/ folder of a source checkout; none at {examples}. "
            "Install from a clone with `pip install -e .`."
        )
    return examples


def _tour(args: argparse.Namespace) -> int:
    from torsion._tour import STAGES, run_tour, write_summary

    examples = _examples_dir()
    if args.list:
        for stage in STAGES:
            for path in stage.examples:
                print(examples / path)
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    print(f"torsion tour ({mode}): {len(STAGES)} stages; plots, logs and summary.md in {out}")
    start = time.perf_counter()
    results = run_tour(examples, out, quick=args.quick, stages=STAGES)
    seconds = time.perf_counter() - start
    import torch

    runs = [run for _, stage_runs in results for run in stage_runs]
    failed = [run for run in runs if not run.ok]
    header = [
        f"torsion {torsion.__version__}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPU cores, {mode} mode: {len(runs) - len(failed)} of {len(runs)} "
        f"examples ran in {seconds:.0f} s.",
    ]
    if args.quick:
        header.append(
            "Quick mode shrinks every problem to check that the examples run: its numbers "
            "do not support the claims the examples make, which are about the full runs "
            "(`torsion tour` without `--quick`)."
        )
    summary = write_summary(results, examples, out, header=header)
    for run in failed:
        print(f"FAILED: examples/{run.path} (exit {run.exit_code}); its log: {run.log}")
    print(
        f"tour: {len(runs) - len(failed)} of {len(runs)} examples ran in {seconds:.0f} s; "
        f"summary in {summary}"
    )
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torsion", description=torsion.__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"torsion {torsion.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, devices and kernel backends")
    tour = commands.add_parser("tour", help="run the three used-by flows from the examples")
    tour.add_argument("--list", action="store_true", help="list the examples and exit")
    tour.add_argument("--quick", action="store_true", help="shrink every example's problem")
    tour.add_argument(
        "--out", default="torsion-tour", help="folder for the plots, logs and summary.md"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        return _info()
    return _tour(args)


if __name__ == "__main__":
    sys.exit(main())
