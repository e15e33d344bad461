"""The core install (torch, numpy, triton) is enough for the layer: ``import kanfast``,
building and training a layer import none of the packages of the ``kanfast[cli]`` extra."""

import subprocess
import sys

CLI_ONLY = ("rich", "tqdm", "sklearn", "matplotlib", "sympy")

# a KAN layer's everyday life: build, forward, backward, grid update, state_dict round trip
USE_A_LAYER = """
import torch
import kanfast
from kanfast import KAN, FastKANLayer
layer = FastKANLayer(4, 3)
x = torch.rand(16, 4) * 2 - 1
layer(x).sum().backward()
model = KAN([4, 5, 2], grid_size=4)
model(x, update_grid=True).pow(2).mean().backward()
FastKANLayer(4, 3).load_state_dict(layer.state_dict())
"""


def _run(code: str):
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_layer_works_without_the_cli_packages():
    """With the extra's packages made unimportable, the layer still imports, trains and updates its grid."""
    code = (
        "import sys\n"
        f"BLOCKED = {CLI_ONLY!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        + USE_A_LAYER
        + "print('OK')\n"
    )
    assert "OK" in _run(code)


def test_kanfast_imports_none_of_the_cli_packages():
    """Modules that kanfast itself brings in (beyond what torch imports on its own: torch.hub
    imports tqdm when it is installed) include none of the extra's packages."""
    code = (
        "import sys\n"
        "import torch\n"
        "before = set(sys.modules)\n"
        + USE_A_LAYER
        + f"new = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in {CLI_ONLY!r})\n"
        "print('NEW', new)\n"
    )
    out = _run(code)
    assert "NEW []" in out, out


def test_core_dependencies_are_the_layer_s():
    """pyproject: the core install is torch, numpy, scipy (the layer's initial banded fit), triton;
    the command's packages are the cli extra, and the test extra (what CI installs) holds them too."""
    import re
    from pathlib import Path

    tomllib = __import__("pytest").importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[ <>=;\[!~]", r, maxsplit=1)[0].lower() for r in reqs}

    assert names(meta["dependencies"]) == {"torch", "numpy", "scipy", "triton"}
    extras = meta["optional-dependencies"]
    cli = {"tqdm", "rich", "scikit-learn", "matplotlib", "sympy"}
    assert names(extras["cli"]) == cli
    assert cli | {"pytest", "scipy"} <= names(extras["test"])


def test_lazy_package_keeps_its_names():
    """``import kanfast`` loads no torch; the public names, the submodules and ``kanfast.plot``
    (the function, also after ``import kanfast.plot`` or ``import kanfast.toy``) are all there."""
    code = (
        "import sys\n"
        "import kanfast\n"
        "print('TORCH', 'torch' in sys.modules)\n"
        "import kanfast.toy, kanfast.plot\n"
        "assert callable(kanfast.plot) and kanfast.plot.__module__ == 'kanfast.plot', kanfast.plot\n"
        "from kanfast import FastKANLayer, KAN, kanify, plot\n"
        "assert plot is kanfast.plot and FastKANLayer.__module__ == 'kanfast.layer'\n"
        "assert kanfast.workflow.prune and kanfast.ops.kan_linear_op\n"
        "assert set(kanfast.__all__) <= set(dir(kanfast))\n"
        "try:\n"
        "    kanfast.no_such_name\n"
        "except AttributeError:\n"
        "    print('OK')\n"
    )
    out = _run(code)
    assert "TORCH False" in out and "OK" in out, out
