"""kanfast's modules import downward only: no import cycle, and every import goes to a lower
layer of the declared stack (README, "Layout").

The imports are read from the source with ``ast``, not by importing: module level and inside
functions (``if TYPE_CHECKING:`` blocks too), ``import kanfast.x``, ``from . import x``,
``from .x import y``, ``from ..x import y``, and ``from kanfast import X``, resolved through
the package's lazy ``_EXPORTS`` table to the module that defines ``X``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1] / "kanfast"

#: The stack, bottom first. A module may import modules of lower layers only (never its own
#: layer's, never a higher one's). A package's name stands for itself and every module in it
#: not named on its own ("kernels": ``kanfast.kernels`` and its modules; "benchmarks": the
#: empty package ``kanfast.benchmarks``, whose modules are named); "__init__" is ``kanfast``.
LAYERS = [
    # the knot arithmetic (grids, padding, cardinal pieces): imports nothing of kanfast
    ("knots",),
    # foundations: the oracle, the device code (the Triton kernels' Horner constants come from knots)
    ("reference", "kernels", "cpu_buffers", "cpu_workers", "benchmarks"),
    # the autograd formula of every engine (create_graph through the oracle); the engines' knot constants
    ("differentiable", "cpu_knots"),
    # the dense-block engine, bottom up
    ("cpu_plan",),
    ("cpu_bases", "cpu_dispatch"),
    ("torch_backend", "sparse_backend"),
    ("triton_backend",),  # (falls back to the torch engine for float64)
    # registration and autograd of the engines
    ("ops",),
    # the modules
    ("symbolic_branch",),
    ("layer",),
    # paper workflow and ecosystem
    ("workflow", "symbolic", "ecosystem"),
    # plots (on the workflow's edge functions); the command line's helpers
    ("plot", "cli_checks", "benchmarks.provenance"),
    # command line and benchmarks
    ("validate", "tasks", "toy", "benchmarks.baselines"),
    ("benchmarks.bench",),
    ("cli",),
    ("__init__",),
]


def module_name(path: Path, root: Path) -> str:
    """``kanfast.x.y`` of a file under ``root`` (the package directory), ``kanfast`` for __init__."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _exports(root: Path) -> Dict[str, str]:
    """The package's ``_EXPORTS`` (public name -> defining submodule), read from its source."""
    tree = ast.parse((root / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def import_graph(root: Path) -> Dict[str, Set[str]]:
    """module -> the kanfast modules it imports (anywhere in the file), for the package at ``root``."""
    pkg = root.name
    files = {module_name(p, root): p for p in root.rglob("*.py") if "__pycache__" not in p.parts}
    exports = _exports(root)

    def resolve(base: str, name: str) -> str:
        """``from base import name``: the submodule base.name if there is one, else the module
        that defines ``name`` (through ``_EXPORTS`` for the package itself), else base."""
        if f"{base}.{name}" in files:
            return f"{base}.{name}"
        if base == pkg and name in exports:
            return f"{pkg}.{exports[name]}"
        return base

    graph: Dict[str, Set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = mod if is_pkg else mod.rpartition(".")[0]  # the package relative imports start from
        deps: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == pkg or alias.name.startswith(pkg + "."):
                        deps.add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                if not (base == pkg or base.startswith(pkg + ".")):
                    continue
                for alias in node.names:
                    deps.add(resolve(base, alias.name))
        deps.discard(mod)
        graph[mod] = {d for d in deps if d in files}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(mod: str, pkg: str = "kanfast") -> int:
    rel = "__init__" if mod == pkg else mod[len(pkg) + 1:]
    for i, names in enumerate(LAYERS):  # a module named itself, else its package
        if rel in names:
            return i
    for i, names in enumerate(LAYERS):
        if any(rel.startswith(name + ".") for name in names):
            return i
    raise KeyError(rel)


def test_no_import_cycle():
    found = cycles(import_graph(ROOT))
    assert not found, "import cycles among kanfast's modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_module_has_a_layer():
    missing = []
    for mod in import_graph(ROOT):
        try:
            layer_of(mod)
        except KeyError:
            missing.append(mod)
    assert not missing, f"place these modules in LAYERS (tests/test_layering.py) and the README's Layout: {missing}"


def test_imports_point_down():
    graph = import_graph(ROOT)
    upward = sorted(
        f"{mod} (layer {layer_of(mod)}) imports {dep} (layer {layer_of(dep)})"
        for mod, deps in graph.items()
        for dep in deps
        if layer_of(dep) >= layer_of(mod)
    )
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def _write(root: Path, files: Dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@pytest.mark.parametrize(
    "how",
    ["function-level", "relative-parent", "exports", "absolute-submodule", "from-package-submodule"],
)
def test_the_graph_sees_every_form_of_import(tmp_path, how):
    """The checker itself: a cycle a -> b -> a closed by each form of import is found."""
    back = {
        "function-level": "def f():\n    from .a import A\n    return A\n",
        "relative-parent": "from ..a import A\n",
        "exports": "from kanfast import A\n",
        "absolute-submodule": "import kanfast.a\n",
        "from-package-submodule": "from kanfast import a\n",
    }[how]
    b_path = "sub/b.py" if how == "relative-parent" else "b.py"
    b_import = "from .sub.b import B\n" if how == "relative-parent" else "from .b import B\n"
    root = tmp_path / "kanfast"
    _write(root, {
        "__init__.py": '_EXPORTS = {"A": "a"}\n',
        "a.py": b_import + "A = 1\n",
        b_path: back + "B = 2\n",
        "sub/__init__.py": "" if how == "relative-parent" else "# empty\n",
    })
    found = cycles(import_graph(root))
    b_mod = "kanfast.sub.b" if how == "relative-parent" else "kanfast.b"
    assert found == [sorted(["kanfast.a", b_mod])], found


def test_the_graph_ignores_other_packages(tmp_path):
    root = tmp_path / "kanfast"
    _write(root, {"__init__.py": "", "a.py": "import torch\nfrom torch import nn\nfrom . import b\n", "b.py": "import os\n"})
    assert import_graph(root) == {"kanfast": set(), "kanfast.a": {"kanfast.b"}, "kanfast.b": set()}
