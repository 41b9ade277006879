"""The `torsion` command: version, info, and the tour over the real examples."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import torsion
from torsion import _tour, cli
from torsion._tour import STAGES, Stage
from torsion.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"torsion {torsion.__version__}"


def test_info_reports_versions_and_devices(capsys):
    import geoopt
    import numpy
    import scipy
    import torch

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for module in (torch, geoopt, numpy, scipy):
        assert f"{module.__name__:16s}{module.__version__}" in out
    assert f"threads         {torch.get_num_threads()}" in out
    assert "devices         cpu" in out
    for key in ("registry", "triton", "cuda", "TRITON_INTERPRET"):
        assert f"  {key} " in out
    assert "reference (any; float32, float64)" in out  # the kernels' registry


def test_info_reports_triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli.kernel_environment()["TRITON_INTERPRET"] == "1"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert cli.kernel_environment()["TRITON_INTERPRET"] == "unset"


def _tour_paths(stages):
    return [path for stage in stages for path in stage.examples]


def test_tour_lists_existing_examples(capsys):
    assert main(["tour", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    expected = _tour_paths(STAGES)
    assert len(listed) == len(expected) >= 3
    assert all(path.endswith(expected[i]) for i, path in enumerate(listed))
    assert all(Path(path).is_file() for path in listed)


def test_tour_covers_the_three_flows():
    # The three used-by flows, each as a stage with real examples.
    titles = [stage.title.lower() for stage in STAGES]
    assert len(STAGES) == 3
    assert "manifold-valued" in titles[0] and "nn/plot_spdnet_digits.py" in STAGES[0].examples
    assert "positional encodings" in titles[1]
    assert "spectral/plot_molecular_pe.py" in STAGES[1].examples
    assert "riemannian optimization" in titles[2]
    assert any(path.startswith("curvature/") for path in STAGES[2].examples)


def _fake_examples(tmp_path, monkeypatch, stages):
    examples = tmp_path / "examples"
    examples.mkdir()
    fake = []
    for title, scripts in stages.items():
        for name, body in scripts.items():
            (examples / name).write_text(textwrap.dedent(body))
        fake.append(Stage(title, f"what {title} shows", tuple(scripts)))
    monkeypatch.setattr(cli, "_examples_dir", lambda: examples)
    monkeypatch.setattr(_tour, "STAGES", tuple(fake))
    return examples


RECORDS = """
    \"\"\"Records its environment.

    More text.
    \"\"\"
    import json, os, pathlib
    keys = ["MPLBACKEND", "TORSION_OUT", "TORSION_QUICK"]
    out = pathlib.Path(os.environ["TORSION_OUT"])
    (out / "env.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))
    (out / "records.png").write_bytes(b"not really a png")
    print("hello from the example")
"""


def test_tour_passes_environment_writes_summary_and_reports_failures(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("TORSION_QUICK", raising=False)
    stages = {
        "First flow": {"records.py": RECORDS},
        "Second flow": {"fails.py": "print('about to fail')\nraise SystemExit(3)"},
    }
    _fake_examples(tmp_path, monkeypatch, stages)
    out = tmp_path / "tour"
    assert main(["tour", "--quick", "--out", str(out)]) == 1
    env = json.loads((out / "env.json").read_text())
    assert env == {"MPLBACKEND": "Agg", "TORSION_OUT": str(out.resolve()), "TORSION_QUICK": "1"}
    printed = capfd.readouterr().out
    assert "[1/2] First flow |" in printed and "records ok in" in printed
    assert "[2/2] Second flow |" in printed and "fails FAILED (exit 3" in printed
    assert "1 of 2 examples ran" in printed
    assert "hello from the example" not in printed  # captured in the example's log
    assert (out / "logs" / "records.txt").read_text() == "hello from the example\n"

    summary = (out / "summary.md").read_text()
    assert "## 1. First flow" in summary and "what First flow shows" in summary
    assert "### Records its environment." in summary
    assert "hello from the example" in summary and "![records.png](records.png)" in summary
    assert "## 2. Second flow" in summary and "**FAILED** (exit 3)" in summary
    assert "about to fail" in summary
    assert "1 of 2 examples ran" in summary

    monkeypatch.setenv("TORSION_QUICK", "1")  # a full tour unsets it for its examples
    assert main(["tour", "--out", str(out)]) == 1
    assert json.loads((out / "env.json").read_text())["TORSION_QUICK"] is None


def test_tour_summary_lists_only_plots_an_example_wrote(tmp_path, monkeypatch):
    stages = {"Flow": {"quiet.py": "print('no plot')", "records.py": RECORDS}}
    _fake_examples(tmp_path, monkeypatch, stages)
    out = tmp_path / "tour"
    out.mkdir()
    (out / "stale.png").write_bytes(b"from an earlier run")
    assert main(["tour", "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert "stale.png" not in summary
    assert summary.count("![records.png](records.png)") == 1


def test_tour_without_examples_folder_says_so(tmp_path, monkeypatch):
    # As installed from a wheel: no examples/ folder two levels above the package.
    monkeypatch.setattr(torsion, "__file__", str(tmp_path / "lib" / "torsion" / "__init__.py"))
    with pytest.raises(SystemExit, match="examples/ folder of a source checkout"):
        main(["tour"])


@pytest.mark.slow
def test_tour_runs_every_example(tmp_path):
    # A subprocess, as a user runs it: every example must exit 0 and write its plot.
    result = subprocess.run(
        [sys.executable, "-m", "torsion.cli", "tour", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    total = len(_tour_paths(STAGES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{total} of {total} examples ran" in result.stdout
    assert len(list(tmp_path.glob("*.png"))) >= total
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"## {i}. {stage.title}" in summary for i, stage in enumerate(STAGES, 1))
    assert "FAILED" not in summary


def test_unknown_command_fails():
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code != 0
