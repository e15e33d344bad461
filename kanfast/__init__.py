"""kanfast: fast, exact B-spline Kolmogorov-Arnold Network layers for PyTorch.

    from kanfast import FastKANLayer, KAN
    layer = FastKANLayer(64, 32)          # drop-in for nn.Linear(64, 32)

See README.md. Liu et al. 2024, "KAN: Kolmogorov-Arnold Networks", arXiv:2404.19756.
"""

from .layer import KAN, FastKANLayer, BACKENDS
from .reference import b_spline_basis, kan_linear_reference
from .symbolic import auto_symbolic, fix_symbolic, suggest_symbolic, symbolic_formula
from .plot import plot  # the function shadows the submodule name on purpose: kanfast.plot(model, ...)
from .ecosystem import export_onnx, from_efficient_kan, from_pykan, kanify, update_grid_distributed

__version__ = "0.1.0"

__all__ = ["FastKANLayer", "KAN", "BACKENDS", "b_spline_basis", "kan_linear_reference", "__version__",
           "plot", "suggest_symbolic", "fix_symbolic", "auto_symbolic", "symbolic_formula",
           "kanify", "export_onnx", "from_efficient_kan", "from_pykan", "update_grid_distributed"]
