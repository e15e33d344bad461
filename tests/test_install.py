"""kanfast imports and runs however it is laid out (issue 15, item 1), each case in a fresh
environment in a subprocess:

* a plain checkout on ``PYTHONPATH`` (no install at all), run from the folder that holds it;
* ``pip install .`` (a regular install), run from an unrelated folder;
* ``pip install -e .`` (editable), run from an unrelated folder, and from the parent folder of a
  clone named ``kanfast/`` (that clone must not shadow the package as an empty namespace package).

Each case imports ``KAN`` and ``FastKANLayer``, finds the C kernels' source in the imported
package, runs a forward and a backward, and checks that ``kanfast`` came from where it should
(not from an install of the process running the tests).

The environments are virtual environments without pip and without the system site-packages;
the dependencies (torch, numpy, ...) come from this interpreter's site-packages through a
``.pth`` file that names those folders. A ``.pth`` file does not run the ``.pth`` files of the
folders it names, so an editable install of kanfast in this interpreter stays invisible there.
pip runs from this interpreter (``pip --python``), with ``--no-deps`` and, when setuptools >= 64
(70.1+, or older with the wheel package) is importable here, ``--no-build-isolation``: no index
is needed. Without such a setuptools pip builds in isolation, which downloads setuptools; when no
index answers, the pip cases skip with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# what every case runs: imports, the C source in the imported package, a forward and a backward
PROBE = r"""
import json, os, sys
import torch
import kanfast
from kanfast import KAN, FastKANLayer
import kanfast.kernels, kanfast.benchmarks, kanfast.triton_backend
kdir = os.path.dirname(kanfast.kernels.__file__)
torch.manual_seed(0)
layer = FastKANLayer(5, 3, grid_size=4, spline_order=3, backend="torch")
x = torch.randn(7, 5, requires_grad=True)
y = layer(x)
y.sum().backward()
net = KAN([5, 4, 2])
z = net(torch.randn(3, 5))
print(json.dumps({
    "file": os.path.realpath(kanfast.__file__),
    "c_source": os.path.isfile(os.path.join(kdir, "cpu_spline.c")),
    "y_shape": list(y.shape), "z_shape": list(z.shape),
    "finite": bool(torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(z).all()),
    "grad_nonzero": bool(x.grad.abs().sum() > 0),
}))
"""


def _site_dirs() -> list:
    """The folders this interpreter imports its dependencies from (never a checkout)."""
    dirs = [p for p in sys.path if p and os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages")]
    return list(dict.fromkeys(os.path.realpath(d) for d in dirs if os.path.isdir(d)))


def make_env(path: Path) -> Path:
    """A venv without pip or system site-packages that sees this interpreter's dependencies
    (through a .pth naming their folders); returns its python."""
    venv.EnvBuilder(with_pip=False, system_site_packages=False, symlinks=os.name != "nt").create(path)
    py = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, env=clean_env()).stdout.strip()
    Path(site, "_kanfast_test_deps.pth").write_text("\n".join(_site_dirs()) + "\n")
    return py


def clean_env() -> dict:
    """This process's environment without what steers Python's imports (PYTHONPATH, a venv,
    the user site, Triton's interpreter switch); pip's own settings stay."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CONDA")) and k != "TRITON_INTERPRET"}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def copy_checkout(dest: Path) -> Path:
    """The project's files (no venv, caches or build output) copied to ``dest``."""
    ignore = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "*.egg-info", "build", "dist",
                                    ".pytest_cache", ".benchmarks", "results", "*.so", "*.whl")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _clone(dest: Path) -> Path:
    """A git clone of this repository at ``dest`` (a copy of the files where this is no git checkout)."""
    git = shutil.which("git")
    if git and (ROOT / ".git").exists():
        r = subprocess.run([git, "clone", "-q", str(ROOT), str(dest)], capture_output=True, text=True)
        if r.returncode == 0:
            # the clone has the committed tree; lay the working tree's project files over it, so
            # that the test checks what is being tested (uncommitted edits included)
            shutil.rmtree(dest / "kanfast")
            shutil.copytree(ROOT / "kanfast", dest / "kanfast", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
            shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
            return dest
    return copy_checkout(dest)


def _run_probe(py: Path, cwd: Path, extra_env: dict = None) -> dict:
    env = clean_env()
    env.update(extra_env or {})
    r = subprocess.run([str(py), "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"import/run failed in {cwd}:\n{r.stdout}\n{r.stderr}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["c_source"], f"kanfast/kernels/cpu_spline.c is missing next to {out['file']}"
    assert out["y_shape"] == [7, 3] and out["z_shape"] == [3, 2], out
    assert out["finite"] and out["grad_nonzero"], out
    return out


def _setuptools_here() -> bool:
    """Whether this interpreter can build kanfast without an index: setuptools >= 64 (editable
    installs by PEP 660) with its own bdist_wheel (70.1 and newer) or the wheel package."""
    try:
        import setuptools
    except ImportError:
        return False
    try:
        version = tuple(int(p) for p in setuptools.__version__.split(".")[:2])
    except ValueError:
        return False
    if version < (64, 0):
        return False
    if version >= (70, 1):
        return True
    import importlib.util

    return importlib.util.find_spec("wheel") is not None


def _pip_install(py: Path, *args: str) -> None:
    """``pip install --no-deps ARGS`` into the environment of ``py``, driven by this interpreter's pip."""
    cmd = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps"]
    if _setuptools_here():
        cmd.append("--no-build-isolation")
    r = subprocess.run(cmd + list(args), capture_output=True, text=True, env=clean_env(), timeout=600)
    if r.returncode != 0 and not _setuptools_here() and _index_unreachable(r.stdout + r.stderr):
        pytest.skip("pip needs setuptools from an index for an isolated build, and no index answered: "
                    + (r.stderr.strip().splitlines() or ["(no message)"])[-1])
    assert r.returncode == 0, f"{' '.join(cmd + list(args))} failed:\n{r.stdout}\n{r.stderr}"


def _index_unreachable(text: str) -> bool:
    words = ("No matching distribution found for setuptools", "Could not find a version that satisfies",
             "NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
             "connection broken", "Max retries exceeded")
    return any(w.lower() in text.lower() for w in words)


@pytest.fixture(scope="module")
def pip_available():
    r = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"this interpreter has no pip ({sys.executable}): {r.stderr.strip()[-200:]}")
    return True


def _inside(path: str, folder: Path) -> bool:
    return Path(path).is_relative_to(Path(os.path.realpath(folder)))


def test_plain_checkout_on_pythonpath(tmp_path):
    """No install: a checkout (named kanfast/) on PYTHONPATH, run from the folder that holds it."""
    src = copy_checkout(tmp_path / "kanfast")
    py = make_env(tmp_path / "env")
    out = _run_probe(py, cwd=tmp_path, extra_env={"PYTHONPATH": str(src)})
    assert _inside(out["file"], src / "kanfast"), out["file"]


def test_pip_install_regular(tmp_path, pip_available):
    """``pip install .``: the package and the C source land in the environment's site-packages."""
    src = copy_checkout(tmp_path / "src")
    env_dir = tmp_path / "env"
    py = make_env(env_dir)
    _pip_install(py, str(src))
    shutil.rmtree(src)  # a regular install must not need its source tree
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _run_probe(py, cwd=elsewhere)
    assert _inside(out["file"], env_dir), out["file"]


@pytest.fixture(scope="module")
def editable_clone(tmp_path_factory, pip_available):
    """A clone named kanfast/ installed with ``pip install -e``: (its parent folder, the env's python)."""
    base = tmp_path_factory.mktemp("editable")
    clone = _clone(base / "kanfast")
    py = make_env(base / "env")
    _pip_install(py, "-e", str(clone))
    return base, clone, py


def test_editable_install_is_a_static_path_entry(editable_clone):
    """pyproject's package-dir makes the editable install one plain path line (the clone's root), not
    an import-hook finder: static tools and every working directory see the same package."""
    base, clone, py = editable_clone
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, env=clean_env()).stdout.strip()
    pths = list(Path(site).glob("__editable__*kanfast*.pth"))
    assert len(pths) == 1, list(Path(site).iterdir())
    lines = [ln.strip() for ln in pths[0].read_text().splitlines() if ln.strip()]
    assert [os.path.realpath(ln) for ln in lines] == [os.path.realpath(clone)], lines


def test_pip_install_editable_elsewhere(editable_clone, tmp_path):
    base, clone, py = editable_clone
    out = _run_probe(py, cwd=tmp_path)
    assert _inside(out["file"], clone / "kanfast"), out["file"]


def test_editable_from_parent_of_clone_named_kanfast(editable_clone):
    """The folder holding a clone named kanfast/ is the current directory (first on sys.path, as
    the folder of a script run from there would be): the clone's root would be an empty namespace
    package; the installed package must win."""
    base, clone, py = editable_clone
    out = _run_probe(py, cwd=base)
    assert _inside(out["file"], clone / "kanfast"), out["file"]
