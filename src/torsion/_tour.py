"""``torsion tour``: the three used-by flows, run from the examples, with a summary.

The tour runs the gallery examples stage by stage. Each example runs in its own process,
forked from a server that has already imported torch and the library (the imports cost
more than most quick examples), with its output captured to ``logs/<name>.txt``. Every
stage draws a progress bar; at the end ``summary.md`` collects, per stage, each example's
status, time, printed results and plots.
"""

from __future__ import annotations

import ast
import multiprocessing
import os
import runpy
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

__all__ = ["STAGES", "ExampleRun", "Stage", "run_tour", "write_summary"]


@dataclass(frozen=True)
class Stage:
    """One used-by flow: a title, what it shows, and its examples (paths under examples/)."""

    title: str
    shows: str
    examples: tuple[str, ...]


STAGES = (
    Stage(
        "A manifold-valued model",
        "SPD matrices as data and as parameters: matrix logarithms with stable gradients, "
        "Frechet means under four metrics, and an SPDNet trained with a Riemannian optimizer.",
        (
            "linalg/plot_spd_log_gradients.py",
            "manifolds/plot_spd_frechet_means.py",
            "nn/plot_spdnet_digits.py",
        ),
    ),
    Stage(
        "A GNN with positional encodings",
        "Laplacian eigenvector encodings (SignNet, SPE, BasisNet) and spectral filters on "
        "molecules, then an E(3)-equivariant message-passing potential trained on energies "
        "and forces.",
        ("spectral/plot_molecular_pe.py", "equivariant/plot_emt_potential.py"),
    ),
    Stage(
        "Riemannian optimization and curvature",
        "Riemannian solvers on Stiefel and SPD problems, then the curvature probes: the "
        "edge of stability, the Hessian's spectral density, and sharpness while training "
        "with a Riemannian optimizer.",
        (
            "optim/plot_riemannian_solvers.py",
            "curvature/plot_edge_of_stability.py",
            "curvature/plot_hessian_spectral_density.py",
            "curvature/plot_equivariant_sharpness.py",
        ),
    ),
)

# Imported once by the fork server, so that no example pays for them.
PRELOAD = [
    "torch",
    "numpy",
    "scipy.linalg",
    "matplotlib.pyplot",
    "geoopt",
    "e3nn.o3",
    "torch_geometric",
    "torsion.nn",
    "torsion.optim",
    "torsion.curvature",
    "torsion.spectral",
    "torsion.equivariant",
]
PLOT_SUFFIXES = (".png", ".svg", ".pdf")
BAR_WIDTH = 24


@dataclass
class ExampleRun:
    """What one example did: its path, exit code, wall time, log and new plots."""

    path: str
    exit_code: int
    seconds: float
    log: Path
    plots: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def _run_example(script: str, log: str, environment: dict[str, str | None]) -> None:
    """The body of one example's process: its output goes to ``log``, it runs as __main__.

    ``environment`` is set first (``None``: unset the variable).
    """
    for key, value in environment.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    with open(log, "w") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        sys.argv = [script]
        sys.path.insert(0, str(Path(script).parent))
        runpy.run_path(script, run_name="__main__")
        sys.stdout.flush()
        sys.stderr.flush()


def _process_context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


def _title(script: Path) -> str:
    """The first line of an example's docstring: its gallery title."""
    docstring = ast.get_docstring(ast.parse(script.read_text())) or script.stem
    return docstring.strip().splitlines()[0]


def _last_line(log: Path) -> str:
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - 400))
            lines = handle.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _bar(stage: int, stages: int, title: str, done: int, total: int, detail: str) -> str:
    filled = BAR_WIDTH * done // total
    return (
        f"[{stage}/{stages}] {title} |{'#' * filled}{'.' * (BAR_WIDTH - filled)}| "
        f"{done}/{total} {detail}"
    )


class _Progress:
    """One bar per stage: redrawn in place on a terminal, one line per event otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.width = shutil.get_terminal_size().columns - 1

    def update(self, line: str) -> None:
        if self.live:
            self.stream.write("\r" + line[: self.width].ljust(self.width))
            self.stream.flush()

    def event(self, line: str) -> None:
        if self.live:
            self.update(line)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def end_stage(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def _plots(out: Path) -> dict[str, float]:
    return {
        path.name: path.stat().st_mtime
        for path in out.iterdir()
        if path.is_file() and path.suffix in PLOT_SUFFIXES
    }


def run_tour(
    examples: Path,
    out: Path,
    *,
    quick: bool,
    stages: tuple[Stage, ...] = STAGES,
    stream: TextIO | None = None,
    poll_seconds: float = 0.5,
) -> list[tuple[Stage, list[ExampleRun]]]:
    """Run every stage's examples in order; return what each did.

    Args:
        examples: the examples/ folder of a source checkout.
        out: folder for plots, logs and the summary (created).
        quick: set ``TORSION_QUICK=1`` so that every example shrinks its problem.
        stages: the flows to run.
        stream: where the progress bars go (default: standard output).
        poll_seconds: how often a running example's bar is redrawn.

    Returns:
        For each stage, the :class:`ExampleRun` of each of its examples.
    """
    progress = _Progress(stream or sys.stdout)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    environment = {"MPLBACKEND": "Agg", "TORSION_OUT": str(out), "TORSION_QUICK": None}
    if quick:
        environment["TORSION_QUICK"] = "1"
    # The fork server inherits the environment of its first use: the backend matters
    # already when matplotlib.pyplot is preloaded.
    os.environ["MPLBACKEND"] = "Agg"
    context = _process_context()
    results = []
    for number, stage in enumerate(stages, 1):
        runs: list[ExampleRun] = []
        for path in stage.examples:
            script = examples / path
            log = logs / f"{Path(path).stem}.txt"
            before = _plots(out)
            start = time.perf_counter()
            process = context.Process(
                target=_run_example, args=(str(script), str(log), environment)
            )
            process.start()
            while process.is_alive():
                elapsed = time.perf_counter() - start
                detail = f"{Path(path).stem} {elapsed:5.1f} s  {_last_line(log)}"
                progress.update(
                    _bar(number, len(stages), stage.title, len(runs), len(stage.examples), detail)
                )
                process.join(poll_seconds)
            after = _plots(out)
            new = sorted(name for name, stamp in after.items() if before.get(name) != stamp)
            run = ExampleRun(path, process.exitcode, time.perf_counter() - start, log, new)
            runs.append(run)
            status = "ok" if run.ok else f"FAILED (exit {run.exit_code}; log {log})"
            progress.event(
                _bar(
                    number,
                    len(stages),
                    stage.title,
                    len(runs),
                    len(stage.examples),
                    f"{Path(path).stem} {status} in {run.seconds:.1f} s",
                )
            )
        progress.end_stage()
        results.append((stage, runs))
    return results


def _log_excerpt(log: Path, max_lines: int) -> str:
    try:
        lines = log.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "(no output)"
    if len(lines) > max_lines:
        earlier = f"... ({len(lines) - max_lines} earlier lines in logs/{log.name})"
        lines = [earlier, *lines[-max_lines:]]
    return "\n".join(lines)


def write_summary(
    results: list[tuple[Stage, list[ExampleRun]]],
    examples: Path,
    out: Path,
    *,
    header: list[str],
    max_log_lines: int = 40,
) -> Path:
    """Write ``summary.md``: per stage, each example's status, time, output and plots."""
    lines = ["# torsion tour", "", *header, ""]
    for number, (stage, runs) in enumerate(results, 1):
        lines += [f"## {number}. {stage.title}", "", stage.shows, ""]
        for run in runs:
            status = "ok" if run.ok else f"**FAILED** (exit {run.exit_code})"
            lines += [
                f"### {_title(examples / run.path)}",
                "",
                f"`examples/{run.path}`: {status} in {run.seconds:.1f} s",
                "",
                "```text",
                _log_excerpt(run.log, max_log_lines),
                "```",
                "",
            ]
            lines += [f"![{name}]({name})" for name in run.plots]
            lines += [""] if run.plots else []
    summary = out / "summary.md"
    summary.write_text("\n".join(lines).rstrip() + "\n")
    return summary
