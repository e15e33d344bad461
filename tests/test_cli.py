"""Smoke tests of the `kanfast` command (short schedules, tiny sizes)."""

import re
import subprocess
import sys

import pytest

from kanfast.cli import main


def test_help_lists_the_jobs(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for job in ("bench", "validate", "fit"):
        assert job in out


def test_validate_torch_backend_quick(capsys):
    assert main(["validate", "--backends", "torch", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "OK: every backend matches the reference" in out
    assert re.search(r"torch: worst relative error \d", out)


def test_validate_reports_a_broken_backend(capsys, monkeypatch):
    """The check can fail: a backend that is off by a little is a mismatch (exit 1)."""
    import kanfast.ops as ops

    real = ops.kan_linear_op  # the layer's entry to the fast backends (registered ops)

    def off(*args, **kw):
        return real(*args, **kw) * (1 + 1e-6)

    monkeypatch.setattr("kanfast.layer.kan_linear_op", off)
    assert main(["validate", "--backends", "torch", "--quick"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_fit_digits_short_schedule(capsys):
    assert main(["fit", "digits", "--epochs", "10"]) == 0
    out = capsys.readouterr().out
    kan_acc = float(re.search(r"KAN\(\[64, 32, 10\]\).*test accuracy ([0-9.]+)", out).group(1))
    mlp_acc = float(re.search(r"MLP\(.*test accuracy ([0-9.]+)", out).group(1))
    assert kan_acc >= 0.93, out
    assert mlp_acc > 0.5, out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "kanfast.cli", "validate", "--backends", "torch", "--quick"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--out", "4"],  # --out is the JSON path, not out_features
        ["bench", "--threads", "-1"],
        ["validate", "--device", "foo"],
        ["validate", "--device", "cuda:99"] if not __import__("torch").cuda.is_available() else ["validate", "--device", "foo"],
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, capsys):
    assert main(argv) == 2
    assert "kanfast" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["bench", "--batch", "0"], ["validate", "--backends", "foo"], ["fit", "toy", "--n-train", "0"]])
def test_bad_arguments_rejected_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
