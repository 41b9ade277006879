"""Run every ``benchmarks/bench_*.py`` in its own subprocess; fail if any fails.

CI calls ``python benchmarks/run_all.py --quick`` so that every benchmark runs on a tiny
problem and cannot rot. Options other than the ones below are passed through to each
benchmark (for example ``--threads 1``).

    python benchmarks/run_all.py [--quick] [--out DIR] [--only linalg,...] [extra args]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny problems (CI)")
    parser.add_argument("--out", type=Path, default=None, help="output directory for all")
    parser.add_argument("--only", default=None, help="comma-separated names, e.g. linalg")
    args, extra = parser.parse_known_args(argv)

    scripts = sorted(BENCH_DIR.glob("bench_*.py"))
    if args.only:
        wanted = {name.strip().removeprefix("bench_") for name in args.only.split(",")}
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    if not scripts:
        print("no benchmarks found", file=sys.stderr)
        return 1

    flags = [*(["--quick"] if args.quick else []), *extra]
    if args.out is not None:
        flags += ["--out", str(args.out)]

    failed = []
    for script in scripts:
        print(f"=== {script.name} {' '.join(flags)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run([sys.executable, str(script), *flags], cwd=BENCH_DIR.parent).returncode
        elapsed = time.perf_counter() - start
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        print(f"=== {script.name}: {status} in {elapsed:.1f} s", flush=True)
        if rc != 0:
            failed.append(script.name)

    print(f"\n{len(scripts) - len(failed)}/{len(scripts)} benchmarks passed")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
