"""The `torsion` command: version, info, and the tour over the real examples."""

import json
import subprocess
import sys
import textwrap

import pytest

import torsion
from torsion import cli
from torsion.cli import TOUR, main


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


def test_tour_lists_existing_examples(capsys):
    assert main(["tour", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert len(listed) == len(TOUR) >= 1
    assert all(path.endswith(TOUR[i]) for i, path in enumerate(listed))


def _fake_examples(tmp_path, monkeypatch, scripts):
    examples = tmp_path / "examples"
    examples.mkdir()
    for name, body in scripts.items():
        (examples / name).write_text(textwrap.dedent(body))
    monkeypatch.setattr(cli, "_examples_dir", lambda: examples)
    monkeypatch.setattr(cli, "TOUR", list(scripts))
    return examples


def test_tour_passes_environment_and_reports_failures(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("TORSION_QUICK", raising=False)
    record = """
        import json, os, pathlib
        keys = ["MPLBACKEND", "TORSION_OUT", "TORSION_QUICK"]
        out = pathlib.Path(os.environ["TORSION_OUT"])
        (out / "env.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))
        print("hello from the example")
    """
    _fake_examples(tmp_path, monkeypatch, {"records.py": record, "fails.py": "raise SystemExit(3)"})
    out = tmp_path / "plots"
    assert main(["tour", "--quick", "--out", str(out)]) == 1
    env = json.loads((out / "env.json").read_text())
    assert env == {"MPLBACKEND": "Agg", "TORSION_OUT": str(out.resolve()), "TORSION_QUICK": "1"}
    printed = capfd.readouterr().out
    assert "== records.py\n" in printed and "hello from the example" in printed
    assert "records.py: ok in" in printed and "fails.py: FAILED (exit 3)" in printed
    assert "1 of 2 examples ran" in printed

    main(["tour", "--out", str(out)])
    assert json.loads((out / "env.json").read_text())["TORSION_QUICK"] is None


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
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(TOUR)} of {len(TOUR)} examples ran" in result.stdout
    assert len(list(tmp_path.glob("*.png"))) >= len(TOUR)


def test_unknown_command_fails():
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code != 0
