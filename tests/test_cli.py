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
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "kanfast" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["bench", "--batch", "0"], ["validate", "--backends", "foo"], ["fit", "toy", "--n-train", "0"]])
def test_bad_arguments_rejected_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


# ------------------------------------------------------------ every argument checked before any work
@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Run in an empty folder; the first step of real work in any command raises instead."""
    import kanfast.tasks
    import kanfast.toy
    import kanfast.validate
    from kanfast.benchmarks import bench

    def work(*args, **kw):
        raise AssertionError("work started before the arguments were checked")

    for mod, name in ((bench, "_run_shape"), (bench, "_first_call"), (kanfast.tasks, "load_digits_split"),
                      (kanfast.tasks, "train_classifier"), (kanfast.toy, "toy_workflow"),
                      (kanfast.validate, "_run_dtype")):
        monkeypatch.setattr(mod, name, work)
    try:  # the same machine for every run of the tests: 8 GiB available
        import kanfast.cli_checks as cc
    except ImportError:  # (code without the checks: the tests below then fail on their assertions)
        cc = None
    if cc is not None:
        monkeypatch.setattr(cc, "available_memory", lambda: 8 * 2**30)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    return tmp_path


TINY_BENCH = ["--batch", "16", "--in", "4", "--grid", "3", "--repeats", "1", "--warmup", "0", "--peers", "none",
              "--no-progress", "--quiet", "--no-first-call", "--device", "cpu"]

BAD = [
    # (argv, words the message must contain)
    (["fit", "digits", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["fit", "digits", "--grid-size", "0"], ["--grid-size", ">= 1"]),
    (["fit", "digits", "--epochs", "-1"], ["--epochs", ">= 1"]),
    (["fit", "digits", "--epochs", "0"], ["--epochs", ">= 1"]),
    (["fit", "digits", "--backend", "cuda"], ["--backend", "cuda"]),
    (["fit", "digits", "--backend", "triton"], ["--backend triton", "CUDA"]),
    (["fit", "digits", "--lr", "nan"], ["--lr"]),
    (["fit", "digits", "--lr", "0"], ["--lr"]),
    (["fit", "digits", "--threads", "-1"], ["--threads"]),
    (["fit", "digits", "--seed", "-1"], ["--seed"]),
    (["fit", "digits", "--grid-size", "100000", "--batch-size", "2000"], ["memory", "--grid-size"]),
    (["fit", "toy", "--steps", "-1"], ["--steps"]),
    (["fit", "toy", "--lamb", "inf"], ["--lamb"]),
    (["fit", "toy", "--lib", "x,nosuchfn"], ["--lib", "nosuchfn"]),
    (["fit", "toy", "--width", "3,1"], ["--width"]),
    (["fit", "toy", "--plot", "adir"], ["--plot", "folder"]),
    (["fit", "toy", "--plot", "missing/p.png"], ["--plot", "does not exist"]),
    (["fit", "toy", "--n-train", "1e9"], ["memory", "--n-train"]),
    (["bench", "--out", "res.csv"], ["--out", "res.json"]),
    (["bench", "--out", "adir"], ["--out", "folder"]),
    (["bench", "--out", "missing/r.json"], ["--out", "does not exist"]),
    (["bench", "--plot", "/nonexistent-kanfast-dir/p.png"], ["--plot", "does not exist"]),
    (["bench", "--plot", "p.xyz"], ["--plot", ".xyz"]),
    (["bench", "--out", "r.png", "--plot", "r.png"], ["--plot", "distinct"]),
    (["bench", "--repeats", "0"], ["--repeats"]),
    (["bench", "--device", "meta"], ["--device"]),
    (["bench", "--batch", "1e8", "--in", "1000"], ["memory", "batch=100000000"]),
    (["bench", "--batch", "100000000", "--in", "1000"], ["memory", "batch=100000000"]),
    (["bench", "--sweep", "grid", "--sweep", "batch"], ["--sweep grid", "separately"]),
    (["bench", "--small", "--sweep", "grid"], ["--small", "--sweep"]),
    (["bench", "--layers", "64x64x64"], ["--layers", "--sweep grid"]),
    (["bench", "--sweep", "grid", "--layers", "64x0x64"], ["--layers", "64x0x64"]),
    (["bench", "--sweep", "grid", "--layers", "64x64"], ["--layers", "BATCHxINxOUT"]),
    (["bench", "--sweep", "grid", "--layers", "10000000x1000x1000"], ["memory", "batch=10000000"]),
    (["bench", "--sweep", "grid", "--time-budget", "0"], ["--time-budget", "> 0"]),
    (["bench", "--sweep", "grid", "--max-step-s", "nan"], ["--max-step-s"]),
    (["bench", "--small", "--case-seconds", "-1"], ["--case-seconds"]),
    (["validate", "--device", "meta"], ["--device"]),
]


@pytest.mark.parametrize("argv,words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_stops_before_any_work(argv, words, no_work, capsys):
    """Exit status 2 and one error line naming the problem, before any work (no_work raises
    on the first step of a run) and with no file written."""
    with pytest.raises(SystemExit) as exc:
        main(argv[:1] + (TINY_BENCH if argv[0] == "bench" else []) + argv[1:])  # argv's options win
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert sorted(p.name for p in no_work.iterdir()) == ["adir"]


def test_memory_estimate_against_available_memory(no_work, monkeypatch, capsys):
    """A shape that would fit a big machine is refused when the memory available is smaller."""
    import kanfast.cli_checks as cc
    from kanfast.benchmarks import bench

    shape = (65536, 256, 256, 50, 3)
    need = bench.estimate_bytes(shape, 4)
    # the basis matrix of the dense floor alone: batch x in*(G+k+1) floats
    assert need > 65536 * 256 * 54 * 4
    monkeypatch.setattr(cc, "available_memory", lambda: int(need * 0.8))
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--batch", "65536", "--in", "256", "--grid", "50", *TINY_BENCH[6:]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "available" in err
    monkeypatch.setattr(cc, "available_memory", lambda: int(need * 2))
    cc.check_memory(need, "x")  # fits: no error


def test_available_memory_reads_the_machine():
    import kanfast.cli_checks as cc

    avail = cc.available_memory()
    if sys.platform.startswith("linux"):
        with open("/proc/meminfo") as fh:
            total = next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("MemTotal:"))
        assert avail is not None and 0 < avail <= total


def test_existing_outputs_are_kept_without_force(tmp_path, monkeypatch, capsys):
    """An existing JSON or CSV (the sibling) is neither overwritten nor half-written without --force."""
    monkeypatch.chdir(tmp_path)
    for existing, other in (("r.json", "r.csv"), ("r.csv", "r.json")):
        for p in tmp_path.iterdir():
            p.unlink()
        (tmp_path / existing).write_text("keep me")
        with pytest.raises(SystemExit) as exc:
            main(["bench", "--out", "r.json", *TINY_BENCH])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"{existing!r} exists" in err and "--force" in err, err
        assert (tmp_path / existing).read_text() == "keep me"
        assert not (tmp_path / other).exists()
    (tmp_path / "r.json").write_text("keep me")
    assert main(["bench", "--out", "r.json", "--force", *TINY_BENCH]) == 0
    import json

    assert json.loads((tmp_path / "r.json").read_text())["results"]
    assert (tmp_path / "r.csv").read_text().startswith("batch,in,out,G,k,impl")


@pytest.mark.parametrize("argv,module,pip_name", [
    (["fit", "digits"], "sklearn", "scikit-learn"),
    (["fit", "digits"], "tqdm", "tqdm"),
    (["fit", "toy"], "sympy", "sympy"),
    (["bench", "--out", "r.json"], "tqdm", "tqdm"),
    (["bench", "--out", "r.json", "--plot", "p.png"], "matplotlib", "matplotlib"),
])
def test_missing_extra_names_the_install_command(argv, module, pip_name, no_work, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and pip_name in err and "pip install 'kanfast[cli]'" in err, err


# --------------------------------------------------------------------------------- help and start-up
@pytest.mark.parametrize("argv,defaults", [
    (["fit", "digits"], ["(default: 30)", "(default: 64)", "(default: 5)", "(default: auto)", "--threads"]),
    (["fit", "toy"], ["(default: 50)", "(default: 20)", "(default: 1000)"]),
    (["bench"], ["(default: 5)", "(default: 2)", "default 2048"]),
    (["validate"], ["(default: cpu)", "(default: 0)"]),
])
def test_help_shows_defaults(argv, defaults, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for d in defaults:
        assert d in out, (d, out)


def test_digits_threads_and_progress_labels(monkeypatch, capsys):
    """--threads sets torch's threads for the run; the progress bars say KAN and MLP."""
    import torch
    import tqdm

    labels = []
    real = tqdm.tqdm

    def recording(*args, **kw):
        labels.append(kw.get("desc"))
        return real(*args, **kw)

    monkeypatch.setattr(tqdm, "tqdm", recording)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["fit", "digits", "--epochs", "1", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "threads=1" in capsys.readouterr().out
    assert labels == ["KAN", "MLP"]


def _run_python(code: str):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"]])
def test_help_imports_no_torch(argv):
    """The top-level help needs no torch (its import alone takes over a second)."""
    code = (
        "import sys\n"
        "from kanfast.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('HEAVY', sorted(m for m in ('torch', 'numpy', 'triton', 'sympy', 'sklearn') if m in sys.modules))\n"
    )
    res = _run_python(code)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout, res.stdout
    assert "COMMAND" in res.stdout or "TASK" in res.stdout


def test_format_formula_rounds_to_significant_digits():
    sympy = pytest.importorskip("sympy")
    from kanfast.toy import format_formula

    x = sympy.Symbol("x_2")
    f = sympy.Float(0.996339797973633) * x**2 + sympy.Float(1.23456789e-5) * sympy.sin(sympy.Float(3.14159265) * x) \
        + sympy.Float(123.456789)
    text = format_formula(f)
    assert "0.9963*x_2**2" in text and "3.142*x_2" in text and "123.5" in text
    assert "1.235e-5" in text  # a small coefficient is rounded, not dropped
    # what `fit toy` recovers: an offset far below the rounding of its sum goes, 1.0 is 1
    x1 = sympy.Symbol("x_1")
    F = sympy.Float
    g = F(0.99971234) * sympy.exp(F(0.0123456) * (F(-9.0) * x - F(1.0812e-6)) ** 2
                                  + F(1.0000001) * sympy.sin(F(3.14159) * x1 + F(0.00011123))) + F(0.00026361)
    assert format_formula(g) == "0.9997*exp(x_2**2 + sin(3.142*x_1)) + 0.0002636"
    assert format_formula(F(2.5) * x + F(3.0)) == "2.5*x_2 + 3"


def test_fit_toy_prints_a_rounded_formula(capsys):
    rc = main(["fit", "toy", "--function", "sin", "--width", "1,1", "--no-prune", "--grids", "3,5",
               "--steps", "5", "--symbolic-steps", "5", "--n-train", "200", "--n-test", "200", "--lib", "x,sin,x^2"])
    assert rc == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("formula:"))
    numbers = re.findall(r"\d+\.\d+(?:e[-+]?\d+)?", line)
    assert numbers, line
    for n in numbers:
        mantissa = n.split("e")[0].replace(".", "").lstrip("0")
        assert len(mantissa) <= 4, (n, line)
