"""``examples/distributed_train.py`` under ``torchrun --nproc_per_node=2`` at a tiny size.

One launch trains ``2 N`` steps and checkpoints at step ``N``; a second launch resumes from
that checkpoint in fresh processes. The resumed losses must equal the uninterrupted ones
bit for bit (CPU, gloo, float64) and every rank must end with the same parameters.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "distributed_train.py"
HALF = 4  # N
TIMEOUT = 120  # seconds per launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, cwd: Path) -> str:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(SCRIPT),
        "--tiny",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # its own session, so that on a timeout the ranks are killed with the launcher
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{stderr[-4000:]}"
    return stdout


def _digests(directory: Path) -> list[str]:
    records = [json.loads((directory / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in records] == [2, 2]
    return [r["sha256"] for r in records]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed_train")
    full = _torchrun(
        f"--steps={2 * HALF}",
        f"--checkpoint={root / 'ckpt-{step}.pt'}",
        f"--checkpoint-every={HALF}",
        f"--loss-log={root / 'full.json'}",
        f"--digest-dir={root / 'full'}",
        cwd=root,
    )
    (root / "full.out").write_text(full)
    _torchrun(
        f"--steps={2 * HALF}",
        f"--resume={root / f'ckpt-{HALF}.pt'}",
        f"--loss-log={root / 'resumed.json'}",
        f"--digest-dir={root / 'resumed'}",
        cwd=root,
    )
    return root


def test_resumed_training_repeats_the_uninterrupted_losses_exactly(runs):
    full = json.loads((runs / "full.json").read_text())
    resumed = json.loads((runs / "resumed.json").read_text())
    assert full["steps"] == list(range(1, 2 * HALF + 1))
    assert resumed["steps"] == list(range(HALF + 1, 2 * HALF + 1))
    assert resumed["losses"] == full["losses"][HALF:]  # floats compared exactly
    assert len(set(full["losses"])) == len(full["losses"])  # training moved


def test_every_rank_ends_with_the_same_parameters(runs):
    full, resumed = _digests(runs / "full"), _digests(runs / "resumed")
    assert full[0] == full[1]
    assert resumed == full


def test_the_example_reports_its_progress(runs):
    out = (runs / "full.out").read_text()
    assert f"step {2 * HALF:5d}" in out
    assert "test accuracy" in out
    assert (runs / f"ckpt-{2 * HALF}.pt").exists()
