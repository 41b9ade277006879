"""The `torsion` command: version, info, and the tour over the real examples."""

import subprocess
import sys

import pytest

import torsion
from torsion.cli import TOUR, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"torsion {torsion.__version__}"


def test_info_reports_versions_and_devices(capsys):
    import geoopt
    import torch

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out and geoopt.__version__ in out
    assert "devices" in out and "cpu" in out and "triton" in out


def test_tour_lists_existing_examples(capsys):
    assert main(["tour", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert len(listed) == len(TOUR) >= 1
    assert all(path.endswith(".py") for path in listed)


@pytest.mark.slow
def test_tour_runs_every_example(tmp_path):
    # A subprocess, as a user runs it: every example must exit 0 and write its plot.
    result = subprocess.run(
        [sys.executable, "-m", "torsion.cli", "tour", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(TOUR)} of {len(TOUR)} examples ran" in result.stdout
    assert list(tmp_path.glob("*.png"))


def test_unknown_command_fails():
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code != 0
