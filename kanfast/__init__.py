"""kanfast: fast, exact B-spline Kolmogorov-Arnold Network layers for PyTorch.

    from kanfast import FastKANLayer, KAN
    layer = FastKANLayer(64, 32)          # drop-in for nn.Linear(64, 32)

See README.md. Liu et al. 2024, "KAN: Kolmogorov-Arnold Networks", arXiv:2404.19756.

The public names below load on first use (PEP 562 ``__getattr__``): ``import kanfast``
itself imports nothing heavy, so that the ``kanfast`` command answers ``--help`` without
importing torch (about 1.5 s). ``from kanfast import FastKANLayer`` works as usual.
"""

import importlib
import importlib.util
import sys
import types

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "FastKANLayer": "layer", "KAN": "layer", "BACKENDS": "layer",
    "b_spline_basis": "reference", "kan_linear_reference": "reference",
    "auto_symbolic": "symbolic", "fix_symbolic": "symbolic", "suggest_symbolic": "symbolic",
    "symbolic_formula": "symbolic",
    "plot": "plot", "fit_lbfgs": "workflow",
    "export_onnx": "ecosystem", "from_efficient_kan": "ecosystem", "from_pykan": "ecosystem",
    "kanify": "ecosystem", "update_grid_distributed": "ecosystem",
}

#: submodule -> the submodule that completes its classes, loaded with it: the paper workflow
#: attaches its methods to KAN (``prune``, ``activation_regularization``; see kanfast.workflow)
_COMPLETED_BY = {"layer": "workflow", "ecosystem": "workflow"}

__all__ = ["FastKANLayer", "KAN", "BACKENDS", "b_spline_basis", "kan_linear_reference", "__version__",
           "plot", "suggest_symbolic", "fix_symbolic", "auto_symbolic", "symbolic_formula",
           "fit_lbfgs", "kanify", "export_onnx", "from_efficient_kan", "from_pykan", "update_grid_distributed"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        # a submodule (kanfast.workflow, kanfast.ops, ...): reachable as an attribute, as when it was imported eagerly
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    if module in _COMPLETED_BY:
        importlib.import_module(f".{_COMPLETED_BY[module]}", __name__)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``kanfast.plot`` is the function ``kanfast.plot.plot`` (``kanfast.plot(model, ...)``): importing the
    submodule binds the module under that name on the package, which would hide the function."""

    def __setattr__(self, name, value):
        if name == "plot" and isinstance(value, types.ModuleType):
            value = value.plot
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
