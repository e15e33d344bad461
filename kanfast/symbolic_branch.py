"""The symbolic branch a layer evaluates (Liu et al. 2024, arXiv:2404.19756, sec. 2.5.1):
the library of candidate edge functions (:data:`SYMBOLIC_LIB`, pykan's default) and
:class:`SymbolicBranch`, the per-layer module that adds ``c * f(a * x + b) + d`` for every
edge fixed to a formula. :class:`kanfast.FastKANLayer` holds one (``layer.symbolic``) once an
edge is fixed; choosing and fitting the formulas is the workflow's (:mod:`kanfast.symbolic`).
sympy (for :attr:`SymbolicFunction.sympy_fn`) is imported on first use only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["SymbolicFunction", "SYMBOLIC_LIB", "SymbolicBranch"]


@dataclass(frozen=True)
class SymbolicFunction:
    """A candidate edge function.

    Attributes:
        name: library key (``"sin"``, ``"x^2"`` ...).
        fn: exact torch function, used for fitting (values outside the domain are
            NaN/inf and disqualify an ``(a, b)`` pair).
        safe_fn: the same function on its domain, clamped outside it (used by the
            forward, so training the affine parameters cannot produce NaN).
        sympy_fn: ``sympy expression -> sympy expression``.
        complexity: simplicity penalty used by :func:`pick_best` (0 = simplest).
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    safe_fn: Callable[[torch.Tensor], torch.Tensor]
    sympy_fn: Callable
    complexity: float


def import_sympy():
    """The sympy module (imported on first use), or ImportError saying how to install it."""
    try:
        import sympy
    except ImportError as e:  # pragma: no cover - sympy is a dependency
        raise ImportError("kanfast.symbolic needs sympy: pip install sympy") from e
    return sympy


def _recip_safe(x):
    tiny = 1e-6
    return 1.0 / torch.where(x.abs() < tiny, torch.full_like(x, tiny).copysign(x), x)


class _LazySympy:
    """sympy is imported on first use (keeps ``import kanfast`` light)."""

    def __getattr__(self, name):
        return getattr(import_sympy(), name)


def _lib() -> Dict[str, SymbolicFunction]:
    sp = _LazySympy()
    entries = [
        ("x", lambda x: x, lambda x: x, lambda s: s, 1),
        ("x^2", lambda x: x**2, lambda x: x**2, lambda s: s**2, 2),
        ("x^3", lambda x: x**3, lambda x: x**3, lambda s: s**3, 3),
        ("x^4", lambda x: x**4, lambda x: x**4, lambda s: s**4, 4),
        ("1/x", lambda x: 1.0 / x, _recip_safe, lambda s: 1 / s, 3),
        ("sqrt", torch.sqrt, lambda x: torch.sqrt(x.clamp_min(1e-12)), lambda s: sp.sqrt(s), 3),
        ("exp", torch.exp, lambda x: torch.exp(x.clamp_max(80.0)), lambda s: sp.exp(s), 3),
        ("log", torch.log, lambda x: torch.log(x.clamp_min(1e-12)), lambda s: sp.log(s), 3),
        ("sin", torch.sin, torch.sin, lambda s: sp.sin(s), 3),
        ("tan", torch.tan, torch.tan, lambda s: sp.tan(s), 4),
        ("tanh", torch.tanh, torch.tanh, lambda s: sp.tanh(s), 4),
        ("abs", torch.abs, torch.abs, lambda s: sp.Abs(s), 3),
        ("sgn", torch.sign, torch.sign, lambda s: sp.sign(s), 3),
        ("arcsin", torch.arcsin, lambda x: torch.arcsin(x.clamp(-1 + 1e-7, 1 - 1e-7)), lambda s: sp.asin(s), 4),
        ("arctan", torch.arctan, torch.arctan, lambda s: sp.atan(s), 4),
        ("gaussian", lambda x: torch.exp(-(x**2)), lambda x: torch.exp(-(x**2)), lambda s: sp.exp(-(s**2)), 4),
        ("0", torch.zeros_like, torch.zeros_like, lambda s: sp.Integer(0), 0),
    ]
    return {n: SymbolicFunction(n, f, g, s, c) for n, f, g, s, c in entries}


#: The candidate functions of Liu et al. 2024 sec. 2.5.1 (pykan's default library).
SYMBOLIC_LIB: Dict[str, SymbolicFunction] = _lib()


class SymbolicBranch(nn.Module):
    """Per-edge symbolic functions of one layer: ``y_j += c f(a x_i + b) + d`` for
    every fixed edge ``(j, i)``.

    Attributes:
        affine: parameter ``(out, in, 4)`` of ``(a, b, c, d)``.
        mask: buffer ``(out, in)``: 1 where the edge is symbolic.
        names: ``out x in`` nested list of function names (``None`` when unfixed);
            saved in the state_dict as extra state.

    Shapes: forward ``(N, in) -> (N, out)``; :meth:`edge_values` ``(N, in) -> (N, in, out)``.
    """

    def __init__(self, in_features: int, out_features: int, *, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.affine = nn.Parameter(torch.zeros(out_features, in_features, 4, device=device, dtype=dtype))
        self.register_buffer("mask", torch.zeros(out_features, in_features, device=device, dtype=dtype))
        self.names: List[List[Optional[str]]] = [[None] * in_features for _ in range(out_features)]

    def get_extra_state(self):
        return {"names": [list(r) for r in self.names]}

    def set_extra_state(self, state):
        self.names = [list(r) for r in state["names"]]

    def _groups(self):
        groups: Dict[str, Tuple[List[int], List[int]]] = {}
        for j, row in enumerate(self.names):
            for i, n in enumerate(row):
                if n is not None and float(self.mask[j, i]) != 0.0:
                    groups.setdefault(n, ([], []))
                    groups[n][0].append(j)
                    groups[n][1].append(i)
        return groups

    def _group_values(self, x: torch.Tensor, name: str, js, is_):
        dev = x.device
        jt = torch.tensor(js, device=dev)
        it = torch.tensor(is_, device=dev)
        p = self.affine[jt, it].to(x.dtype)  # (E, 4)
        m = self.mask[jt, it].to(x.dtype)
        xs = x[:, it]  # (N, E)
        v = p[:, 2] * SYMBOLIC_LIB[name].safe_fn(p[:, 0] * xs + p[:, 1]) + p[:, 3]
        return v * m, jt, it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_zeros(x.shape[0], self.out_features)
        for name, (js, is_) in self._groups().items():
            v, jt, _ = self._group_values(x, name, js, is_)
            y = y.index_add(1, jt, v)
        return y

    def edge_values(self, x: torch.Tensor) -> torch.Tensor:
        """Every symbolic edge's value ``(N, in, out)`` (0 where not symbolic)."""
        out = x.new_zeros(x.shape[0], self.in_features, self.out_features)
        for name, (js, is_) in self._groups().items():
            v, jt, it = self._group_values(x, name, js, is_)
            idx = it * self.out_features + jt
            out = out.reshape(x.shape[0], -1).index_add(1, idx, v).reshape_as(out)
        return out

    def select(self, out_idx: torch.Tensor, in_idx: torch.Tensor) -> "SymbolicBranch":
        """A branch on the sub-network of rows ``out_idx`` and columns ``in_idx``."""
        new = SymbolicBranch(len(in_idx), len(out_idx), device=self.mask.device, dtype=self.mask.dtype)
        with torch.no_grad():
            new.affine.copy_(self.affine[out_idx][:, in_idx])
            new.mask.copy_(self.mask[out_idx][:, in_idx])
        new.names = [[self.names[int(j)][int(i)] for i in in_idx] for j in out_idx]
        return new
