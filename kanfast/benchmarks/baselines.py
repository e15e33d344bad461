"""Baselines the benchmark compares kanfast against.

* :class:`MaterializedKAN`: the formulation of efficient-kan's ``KANLinear``
  (https://github.com/Blealtan/efficient-kan), written here from its description:
  evaluate every B-spline basis by the full Cox-de Boor table, a
  ``(batch, in, G + k)`` tensor, then one ``F.linear`` on the flattened bases plus
  ``F.linear(silu(x))``. Same parameters (names, shapes) as
  :class:`kanfast.FastKANLayer`, so outputs can be cross-checked; autograd
  differentiates the whole table (that is the point of the baseline).
* :func:`mlp`: ``Linear(in, out)`` followed by ``SiLU``, the dense yardstick.
* :func:`make_peers`: other KAN packages from PyPI when installed (extra
  ``kanfast[peers]``): ``pykan`` (Liu et al.'s reference implementation,
  ``kan.KANLayer``), ``flashkan`` and ``inkan`` (both uniform cubic only), each
  configured with the same ``G``, ``k`` and grid range. A peer that is missing,
  does not support the configuration, or fails to build is returned as a
  :class:`PeerStatus` with the reason instead of a module, never silently dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MaterializedKAN", "mlp", "make_peers", "PeerStatus", "PEERS", "compile_module"]


class MaterializedKAN(nn.Module):
    """efficient-kan's ``KANLinear`` formulation: materialised basis + ``F.linear``.

    Args:
        in_features, out_features, grid_size, spline_order, grid_range: as in
            :class:`kanfast.FastKANLayer` (uniform knots, ``G + 2k + 1`` per feature).
        device, dtype: factory arguments.

    Shapes: input ``(..., in_features)``, output ``(..., out_features)``.
    Parameters: ``base_weight (out, in)``, ``spline_weight (out, in, G + k)``,
    ``spline_scaler (out, in)``; buffer ``grid (in, G + 2k + 1)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid_size: int = 5,
        spline_order: int = 3,
        grid_range: Sequence[float] = (-1.0, 1.0),
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.grid_size, self.spline_order = grid_size, spline_order
        lo, hi = float(grid_range[0]), float(grid_range[1])
        h = (hi - lo) / grid_size
        knots = torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float64) * h + lo
        self.register_buffer("grid", knots.to(device=device, dtype=dtype or torch.get_default_dtype()).expand(in_features, -1).contiguous())
        fk = {"device": device, "dtype": dtype}
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features, **fk))
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, grid_size + spline_order, **fk))
        self.spline_scaler = nn.Parameter(torch.empty(out_features, in_features, **fk))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.base_weight, a=5**0.5)
            self.spline_weight.uniform_(-0.1 / grid_size, 0.1 / grid_size)
            nn.init.kaiming_uniform_(self.spline_scaler, a=5**0.5)

    @classmethod
    def from_layer(cls, layer: nn.Module) -> "MaterializedKAN":
        """A baseline holding a copy of a :class:`kanfast.FastKANLayer`'s parameters
        and knots (SiLU base, standalone spline scaler)."""
        p = layer.base_weight
        m = cls(layer.in_features, layer.out_features, layer.grid_size, layer.spline_order,
                layer.grid_range, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            m.grid.copy_(layer.grid)
            m.base_weight.copy_(layer.base_weight)
            m.spline_weight.copy_(layer.spline_weight)
            if getattr(layer, "enable_standalone_scale_spline", True):
                m.spline_scaler.copy_(layer.spline_scaler)
            else:
                m.spline_scaler.fill_(1.0)
        return m

    def bases(self, x: torch.Tensor) -> torch.Tensor:
        """All ``G + k`` bases of every feature: ``(N, in) -> (N, in, G + k)``,
        order raised one step at a time over the whole table."""
        t = self.grid
        xe = x.unsqueeze(-1)
        table = ((xe >= t[:, :-1]) & (xe < t[:, 1:])).to(x.dtype)
        for p in range(1, self.spline_order + 1):
            rise = (xe - t[:, : -(p + 1)]) / (t[:, p:-1] - t[:, : -(p + 1)])
            fall = (t[:, p + 1 :] - xe) / (t[:, p + 1 :] - t[:, 1:-p])
            table = rise * table[..., :-1] + fall * table[..., 1:]
        return table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        w = (self.spline_weight * self.spline_scaler.unsqueeze(-1)).reshape(self.out_features, -1)
        y = F.linear(F.silu(x2), self.base_weight) + F.linear(self.bases(x2).reshape(x2.shape[0], -1), w)
        return y.reshape(*lead, self.out_features)


def mlp(in_features: int, out_features: int, *, device=None, dtype=None) -> nn.Module:
    """``Linear(in, out) -> SiLU``: one dense layer of the same input/output size."""
    return nn.Sequential(nn.Linear(in_features, out_features, device=device, dtype=dtype), nn.SiLU())


def compile_module(module: nn.Module) -> nn.Module:
    """``torch.compile`` of a module (default mode). Compilation happens at the
    first call, i.e. during the benchmark's warm-up; a failure surfaces there."""
    return torch.compile(module)


@dataclasses.dataclass
class PeerStatus:
    """A peer that could not be benchmarked, and why (``missing``, ``unsupported``, ``failed``)."""

    name: str
    status: str
    reason: str


class _FirstOutput(nn.Module):
    """pykan's ``KANLayer`` returns ``(y, preacts, postacts, postspline)``: keep ``y``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)[0]


class _EagerFlashKAN(nn.Module):
    """flashkan's layer with its eager basis function (its default wraps the basis
    in ``torch.compile`` at import; that variant is benchmarked as ``flashkan+compile``)."""

    def __init__(self, inner: nn.Module, eager_fn: Callable):
        super().__init__()
        self.inner = inner
        self._eager_fn = eager_fn

    def forward(self, x):
        import flashkan.layer as fl

        saved = fl.bspline_basis
        fl.bspline_basis = self._eager_fn
        try:
            return self.inner(x)
        finally:
            fl.bspline_basis = saved


def _pykan(cfg, compiled: bool):
    from kan.KANLayer import KANLayer

    lo, hi = cfg["grid_range"]
    with contextlib.redirect_stdout(None):
        layer = KANLayer(in_dim=cfg["in"], out_dim=cfg["out"], num=cfg["G"], k=cfg["k"], grid_range=[lo, hi],
                         device=cfg["device"])
    layer = layer.to(cfg["dtype"])
    return _FirstOutput(layer)


def _flashkan(cfg, compiled: bool):
    if cfg["k"] != 3:
        raise NotImplementedError("flashkan evaluates the cubic (k=3) B-spline only")
    import flashkan.basis
    from flashkan import KANLayer

    layer = KANLayer(cfg["in"], cfg["out"], grid_size=cfg["G"], spline_order=3, grid_range=tuple(cfg["grid_range"]))
    layer = layer.to(device=cfg["device"], dtype=cfg["dtype"])
    if compiled:
        return layer  # flashkan's own torch.compile'd basis
    return _EagerFlashKAN(layer, flashkan.basis.bspline_basis_eager)


def _inkan(cfg, compiled: bool):
    if cfg["k"] != 3:
        raise NotImplementedError("inkan supports spline_order=3 only")
    from inkan import KANLayer

    layer = KANLayer(cfg["in"], cfg["out"], grid_size=cfg["G"], spline_order=3, grid_range=tuple(cfg["grid_range"]),
                     compile_basis=compiled)
    return layer.to(device=cfg["device"], dtype=cfg["dtype"])


#: name -> (import name, factory(cfg, compiled) -> nn.Module)
PEERS: Dict[str, Tuple[str, Callable]] = {
    "pykan": ("kan", _pykan),
    "flashkan": ("flashkan", _flashkan),
    "inkan": ("inkan", _inkan),
}


def make_peers(
    names: Sequence[str],
    in_features: int,
    out_features: int,
    grid_size: int,
    spline_order: int,
    grid_range: Tuple[float, float] = (-1.0, 1.0),
    *,
    device="cpu",
    dtype=torch.float32,
    compiled: bool = False,
) -> List[Tuple[str, Union[nn.Module, PeerStatus]]]:
    """Build the requested peers for one configuration.

    Returns ``[(label, module or PeerStatus)]``; ``label`` is the peer name, with
    ``+compile`` for the compiled variant (pykan has none: it is not written for
    ``torch.compile``). Raises ``ValueError`` for an unknown peer name.
    """
    import importlib

    cfg = {"in": in_features, "out": out_features, "G": grid_size, "k": spline_order,
           "grid_range": (float(grid_range[0]), float(grid_range[1])), "device": device, "dtype": dtype}
    out = []
    for name in names:
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r}; known: {sorted(PEERS)}")
        if compiled and name == "pykan":
            continue
        label = name + ("+compile" if compiled else "")
        mod_name, factory = PEERS[name]
        try:
            importlib.import_module(mod_name)
        except Exception as e:  # ImportError, or a broken dependency of the peer
            out.append((label, PeerStatus(label, "missing", f"import {mod_name} failed: {type(e).__name__}: {e}")))
            continue
        try:
            module = factory(cfg, compiled)
        except NotImplementedError as e:
            out.append((label, PeerStatus(label, "unsupported", str(e))))
            continue
        except Exception as e:
            out.append((label, PeerStatus(label, "failed", f"construction: {type(e).__name__}: {e}")))
            continue
        out.append((label, module))
    return out
