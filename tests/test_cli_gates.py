"""``harness gates list | check | plot``: exit codes, messages, and the figure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.gates import RATIO_CONTROL

ROOT = Path(__file__).resolve().parents[1]
KNOWN = ("sigmoid", "erf", "arctan", "softsign", "softsign_abs", "student", "clip")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _importable_tests(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


def test_check_admissible_builtins_exit_0(capsys):
    assert main(["gates", "check", "sigmoid", "erf", "arctan", "softsign"]) == 0
    out = capsys.readouterr().out
    for name in KNOWN[:4]:
        assert f"{name}: admissible" in out
    assert "FAIL" not in out and out.count("pass ") == 16


def test_check_clip_exit_1_and_names_failed_properties(capsys):
    assert main(["gates", "check", "clip"]) == 1
    out = capsys.readouterr().out
    assert "clip: NOT admissible" in out
    fails = [line.strip() for line in out.splitlines() if line.strip().startswith("FAIL")]
    assert [f.split()[1] for f in fails] == ["(i)", "(iv)"]


def test_check_mixed_list_exit_1(capsys):
    assert main(["gates", "check", "sigmoid", "clip", "erf"]) == 1
    out = capsys.readouterr().out
    assert "sigmoid: admissible" in out and "erf: admissible" in out and "clip: NOT admissible" in out


def test_check_unknown_exit_2_lists_known_names(capsys):
    assert main(["gates", "check", "sigmoid", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown gate 'nope'" in err
    assert "known gates are " + ", ".join(KNOWN) in err


def test_check_custom_gates_by_path(capsys):
    assert main(["gates", "check", "tests.custom_gate_module:F"]) == 0
    assert "tests.custom_gate_module:F: admissible" in capsys.readouterr().out
    assert main(["gates", "check", "tests.custom_gate_module:LINEAR"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  (iv)" in out and "FAIL  (i)" not in out


def test_list(capsys):
    assert main(["gates", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # the Student-t family once per default nu (1, 2, 4, 1000)
    assert [line.split()[0] for line in lines] == [*KNOWN[:5], *["student"] * 4, *RATIO_CONTROL]
    assert "1.76275" in lines[0] and lines[-1].endswith("= -")
    by_name = {" ".join(line.split()[:2]) if line.startswith("student") else line.split()[0]: line for line in lines}
    # nu = 1 is the Cauchy CDF, i.e. the arctan gate; nu -> inf tends to the Gaussian CDF (erf)
    assert by_name["student nu=1"].split()[-1] == by_name["arctan"].split()[-1]
    assert abs(float(by_name["student nu=1000"].split()[-1]) - float(by_name["erf"].split()[-1])) < 1e-3


def test_cli_subprocess_exit_code():
    """The installed console script as a user runs it: a non-zero verdict must reach the shell."""
    exe = Path(sys.executable).with_name("harness")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "harness.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*cmd, "gates", "check", "clip"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "clip: NOT admissible" in proc.stdout and proc.stderr == ""


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_writes_png_one_column_per_tau(tmp_path, capsys):
    one, three = tmp_path / "one.png", tmp_path / "sub" / "three.png"
    assert main(["gates", "plot", "--tau", "1", "--out", str(one)]) == 0
    assert main(["gates", "plot", "--tau", "1", "4", "10", "--width", "hwhm", "--out", str(three),
                 "--gates", "sigmoid", "clip", "tests.custom_gate_module:F"]) == 0
    assert f"wrote {three}" in capsys.readouterr().out
    (w1, h1), (w3, h3) = _png_size(one), _png_size(three)
    # a column per τ, same height (4.4 in each; one column is widened to 6.4 in to fit the title and legend)
    assert h1 == h3 and w3 == pytest.approx(w1 * 3 * 4.4 / 6.4, rel=0.02)
    assert one.stat().st_size > 10_000  # something was drawn


def test_plot_unknown_gate_exit_2_and_no_file(tmp_path, capsys):
    out = tmp_path / "g.png"
    assert main(["gates", "plot", "--gates", "sigmoid", "nope", "--out", str(out)]) == 2
    assert "known gates are" in capsys.readouterr().err
    assert not out.exists()


def test_plot_requires_out():
    with pytest.raises(SystemExit) as exc:
        main(["gates", "plot", "--tau", "1"])
    assert exc.value.code == 2


def test_unknown_subcommand_exit_2(capsys):
    assert main(["nosuchcommand"]) == 2
    assert "unknown subcommand" in capsys.readouterr().err
