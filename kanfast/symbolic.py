"""Symbolic regression on KAN edges (Liu et al. 2024, arXiv:2404.19756, sec. 2.5.1).

Every edge ``phi_{l,j,i}`` (layer ``l``, input node ``i``, output node ``j``,
pykan's ``(l, i, j)`` convention) can be *fixed* to a formula
``c * f(a * x + b) + d`` with ``f`` from :data:`SYMBOLIC_LIB`. A fixed edge is
evaluated by a :class:`SymbolicBranch` beside the spline (the layer adds the
branch's output to its own and masks the numeric edge out), so the affine
parameters ``(a, b, c, d)`` stay trainable.

    fits = suggest_symbolic(model, 0, 0, 0, x=x_train)   # ranked by R^2
    auto_symbolic(model, x=x_train)                      # fix every edge
    symbolic_formula(model)                              # sympy expressions

Fitting follows pykan's recipe: a grid search over ``(a, b)`` (zoomed in a few
times around the best point) with the closed-form linear regression for
``(c, d)``; the quality of a fit is its coefficient of determination ``R^2``.

The function library and the branch module the layer evaluates live below the layer, in
:mod:`kanfast.symbolic_branch`; this module chooses and fits the formulas.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .ops import basis_matrix
from .symbolic_branch import SYMBOLIC_LIB, SymbolicBranch, SymbolicFunction, import_sympy

__all__ = [
    "SYMBOLIC_LIB",
    "SymbolicFunction",
    "SymbolicFit",
    "SymbolicBranch",
    "fit_affine",
    "suggest_symbolic",
    "pick_best",
    "fix_symbolic",
    "unfix_symbolic",
    "auto_symbolic",
    "SymbolicReport",
    "symbolic_formula",
]


def _resolve_lib(lib: Optional[Iterable[str]]) -> List[SymbolicFunction]:
    if lib is None:
        return list(SYMBOLIC_LIB.values())
    out = []
    for name in lib:
        if name not in SYMBOLIC_LIB:
            raise ValueError(f"unknown symbolic function {name!r}; choose from {sorted(SYMBOLIC_LIB)}")
        out.append(SYMBOLIC_LIB[name])
    if not out:
        raise ValueError("the symbolic library is empty")
    return out


@dataclass
class SymbolicFit:
    """One candidate fit ``y ~ c * f(a * x + b) + d`` of an edge."""

    name: str
    r2: float
    complexity: float
    params: Tuple[float, float, float, float]  # a, b, c, d


# --------------------------------------------------------------------- fitting
#: Elements of the ``(a, b, sample)`` block of :func:`fit_affine`'s grid search evaluated at once:
#: a few rows of ``a`` at a time, so that the function values and the R^2 table's temporaries stay
#: in cache (the whole 41 x 41 x 1024 block is 13 MB in float64, each of its passes a trip to memory).
R2_BLOCK_ELEMENTS = 1 << 16


def _r2_table(post: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """R^2 of the best ``c * post + d`` for every row of ``post`` (..., N); -inf where post is not finite."""
    finite = None  # None: every value finite (a NaN or an inf makes the sum non-finite; the sum is one pass,
    p = post  # torch.isfinite four)
    if not math.isfinite(float(post.sum())):
        fin = torch.isfinite(post)
        finite = fin.all(-1)
        p = torch.where(fin, post, 0.0)  # (non-finite values as 0)
    pc = p - p.mean(-1, keepdim=True)
    yc = y - y.mean()
    syy = (yc * yc).sum()
    spp = (pc * pc).sum(-1)
    spy = (pc * yc).sum(-1)
    ok = spp > 1e-24 * p.abs().amax(-1).clamp_min(1.0) ** 2 * post.shape[-1]
    if finite is not None:
        ok &= finite
    r2 = torch.where(ok, spy**2 / (spp * syy).clamp_min(1e-300), torch.zeros_like(spp))
    return r2 if finite is None else torch.where(finite, r2, -math.inf)


def fit_affine(
    x: torch.Tensor,
    y: torch.Tensor,
    fun: SymbolicFunction,
    a_range: Tuple[float, float] = (-10.0, 10.0),
    b_range: Tuple[float, float] = (-10.0, 10.0),
    grid_number: int = 41,
    iterations: int = 3,
) -> SymbolicFit:
    """Fit ``y ~ c * f(a x + b) + d`` (pykan's recipe: grid search over ``(a, b)``,
    zoomed ``iterations`` times around the best cell, least squares for ``(c, d)``).

    Args:
        x, y: ``(N,)`` samples of the edge's input and output (N >= 2), any float dtype
            (computed in float64).
        fun: the candidate function.
        a_range, b_range: initial search ranges.
        grid_number: points per axis of the grid search.

    Returns:
        :class:`SymbolicFit`; ``r2 = -inf`` when ``f`` is undefined (NaN/inf) for every
        ``(a, b)`` tried, and ``r2 = 0`` for the constant function ``"0"``.
    """
    x = x.detach().reshape(-1).to("cpu", torch.float64)  # small 1-D problem: CPU, whatever the model's device
    y = y.detach().reshape(-1).to("cpu", torch.float64)
    if x.numel() != y.numel() or x.numel() < 2:
        raise ValueError(f"fit_affine needs x and y of the same length >= 2, got {x.numel()} and {y.numel()}")
    ymean = float(y.mean())
    if float(((y - ymean) ** 2).sum()) == 0.0:  # a constant edge: c = 0, every f is exact
        return SymbolicFit(fun.name, 1.0, fun.complexity, (1.0, 0.0, 0.0, ymean))
    if fun.name == "0":
        return SymbolicFit("0", 0.0, fun.complexity, (0.0, 0.0, 0.0, ymean))
    a_lo, a_hi = a_range
    b_lo, b_hi = b_range
    best_a, best_b, best_r2 = 0.0, 0.0, -math.inf
    for _ in range(iterations):
        a_vals = torch.linspace(a_lo, a_hi, grid_number, dtype=torch.float64)
        b_vals = torch.linspace(b_lo, b_hi, grid_number, dtype=torch.float64)
        rows = max(1, R2_BLOCK_ELEMENTS // (grid_number * x.numel()))  # rows of a per block
        with torch.no_grad(), torch.autograd.set_grad_enabled(False):
            r2 = torch.cat([  # (Na, Nb): the block (rows, Nb, N) of f(a x + b) at a time
                _r2_table(fun.fn(a_vals[r : r + rows, None, None] * x + b_vals[None, :, None]), y)
                for r in range(0, grid_number, rows)
            ])
        # a == 0 makes f constant: a degenerate fit, never preferred
        r2 = torch.where(a_vals[:, None] == 0, torch.full_like(r2, -math.inf), r2)
        flat = int(torch.argmax(torch.nan_to_num(r2, nan=-math.inf)))
        ia, ib = divmod(flat, grid_number)
        if float(r2[ia, ib]) > best_r2 or best_r2 == -math.inf:
            best_a, best_b, best_r2 = float(a_vals[ia]), float(b_vals[ib]), float(r2[ia, ib])
        da = (a_hi - a_lo) / (grid_number - 1)
        db = (b_hi - b_lo) / (grid_number - 1)
        a_lo, a_hi = best_a - da, best_a + da
        b_lo, b_hi = best_b - db, best_b + db
    if best_r2 == -math.inf:
        return SymbolicFit(fun.name, -math.inf, fun.complexity, (1.0, 0.0, 0.0, ymean))
    post = fun.fn(best_a * x + best_b)
    A = torch.stack([post, torch.ones_like(post)], dim=1)
    c, d = torch.linalg.lstsq(A, y.unsqueeze(1), driver="gelsd").solution.reshape(-1).tolist()
    resid = y - (c * post + d)
    r2 = 1.0 - float((resid**2).sum() / ((y - ymean) ** 2).sum())
    return SymbolicFit(fun.name, r2, fun.complexity, (best_a, best_b, c, d))


# ------------------------------------------------------------ model plumbing
def _layer_inputs(model, x: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """2-D inputs of every layer: from ``x`` (one forward) or the kept ``last_input``."""
    layers = list(model.layers)
    if x is not None:
        with torch.no_grad():
            h = x.reshape(-1, layers[0].in_features)
            ins = []
            for layer in layers:
                ins.append(h)
                h = layer(h)
        return ins
    ins = [layer.last_input for layer in layers]
    if any(t is None for t in ins):
        raise ValueError(
            "no samples: pass x=(N, in_features) or run a forward with model.keep_inputs = True first"
        )
    return [t.detach() for t in ins]


def _check_edge(model, l: int, i: int, j: int):
    n = len(model.layers)
    if not 0 <= l < n:
        raise IndexError(f"layer index l={l} out of range for a KAN with {n} layers")
    layer = model.layers[l]
    if not 0 <= i < layer.in_features:
        raise IndexError(f"input node i={i} out of range for layer {l} (in_features={layer.in_features})")
    if not 0 <= j < layer.out_features:
        raise IndexError(f"output node j={j} out of range for layer {l} (out_features={layer.out_features})")
    return layer


def _numeric_edge(layer, xi: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """The numeric edge function phi_{j,i} (base + spline) at the samples ``xi`` (N,)."""
    grid = layer.grid[i : i + 1]
    D = basis_matrix(xi.unsqueeze(1), grid, layer.spline_order)[:, 0]  # (N, nb)
    w = layer.scaled_spline_weight[j, i]
    return D @ w + layer.base_weight[j, i] * layer.base_activation(xi)


def suggest_symbolic(
    model,
    l: int,
    i: int,
    j: int,
    x: Optional[torch.Tensor] = None,
    lib: Optional[Iterable[str]] = None,
    a_range: Tuple[float, float] = (-10.0, 10.0),
    b_range: Tuple[float, float] = (-10.0, 10.0),
    grid_number: int = 41,
    iterations: int = 3,
    max_samples: int = 1024,
) -> List[SymbolicFit]:
    """Fit every library function to the numeric edge ``(l, i, j)`` (layer ``l``,
    from input node ``i`` to output node ``j``), ranked by ``R^2`` (best first).

    Args:
        model: a :class:`kanfast.KAN`.
        x: ``(N, in_features)`` model inputs; the edge is sampled at the activations
            that reach layer ``l``. Without ``x``, the inputs kept by the last forward
            (``model.keep_inputs = True``) are used.
        lib: names from :data:`SYMBOLIC_LIB` (default: all).
        max_samples: at most this many (evenly spaced, sorted) samples are fitted.

    Returns:
        list of :class:`SymbolicFit` sorted by ``r2`` descending (``-inf`` last);
        :func:`pick_best` chooses among them with a simplicity preference.

    Raises:
        IndexError: ``l``, ``i`` or ``j`` out of range. ValueError: no samples.
    """
    layer = _check_edge(model, l, i, j)
    funs = _resolve_lib(lib)
    return _suggest_on_samples(layer, _layer_inputs(model, x)[l][:, i], i, j, funs, a_range, b_range,
                               grid_number, iterations, max_samples)


def _suggest_on_samples(layer, xi, i, j, funs, a_range=(-10.0, 10.0), b_range=(-10.0, 10.0), grid_number=41,
                        iterations=3, max_samples=1024):
    xi = torch.sort(xi[torch.isfinite(xi)]).values
    if xi.numel() < 2:
        raise ValueError("suggest_symbolic needs at least 2 finite samples of the edge input")
    if xi.numel() > max_samples:
        xi = xi[torch.linspace(0, xi.numel() - 1, max_samples).round().long()]
    with torch.no_grad():
        yi = _numeric_edge(layer, xi, i, j)
    fits = [fit_affine(xi, yi, f, a_range, b_range, grid_number, iterations) for f in funs]
    fits.sort(key=lambda f: -f.r2 if math.isfinite(f.r2) else math.inf)
    return fits


def pick_best(fits: Sequence[SymbolicFit], weight_simple: float = 1.0) -> SymbolicFit:
    """Choose a fit trading accuracy for simplicity: minimise
    ``log10(max(1 - R^2, 1e-10)) + weight_simple * complexity``, i.e. one unit of
    complexity costs ``weight_simple`` decades of unexplained variance (ties: higher
    R^2). ``weight_simple=0`` picks the highest R^2."""
    valid = [f for f in fits if math.isfinite(f.r2)]
    if not valid:
        raise ValueError("no valid symbolic fit (every candidate undefined on the samples)")

    def score(f):
        return (math.log10(max(1.0 - f.r2, 1e-10)) + weight_simple * f.complexity, -f.r2)

    return min(valid, key=score)


def _ensure_branch(layer) -> SymbolicBranch:
    if layer.symbolic is None:
        w = layer.base_weight
        layer.symbolic = SymbolicBranch(layer.in_features, layer.out_features, device=w.device, dtype=w.dtype)
    if layer.edge_mask is None:
        layer.edge_mask = torch.ones_like(layer.base_weight, requires_grad=False).detach()
    return layer.symbolic


@torch.no_grad()
def fix_symbolic(
    model,
    l: int,
    i: int,
    j: int,
    name: str,
    x: Optional[torch.Tensor] = None,
    fit_params: bool = True,
    params: Optional[Sequence[float]] = None,
    **fit_kwargs,
) -> float:
    """Freeze edge ``(l, i, j)`` to ``c * f(a x + b) + d`` with ``f = SYMBOLIC_LIB[name]``.

    The numeric (base + spline) edge is masked out (``layer.edge_mask[j, i] = 0``)
    and the layer's :class:`SymbolicBranch` evaluates the formula instead.

    Args:
        fit_params: fit ``(a, b, c, d)`` to the numeric edge on the samples (from
            ``x`` or the kept inputs, as :func:`suggest_symbolic`); otherwise use
            ``params`` (default ``(1, 0, 1, 0)``).
        fit_kwargs: passed to :func:`fit_affine`.

    Returns:
        the fit's ``R^2`` (``nan`` when not fitted).
    """
    layer = _check_edge(model, l, i, j)
    fun = _resolve_lib([name])[0]
    if fit_params:
        fits = suggest_symbolic(model, l, i, j, x=x, lib=[name], **fit_kwargs)
        fit = fits[0]
        if not math.isfinite(fit.r2):
            raise ValueError(f"{name!r} is undefined on the samples of edge ({l}, {i}, {j})")
        p, r2 = fit.params, fit.r2
    else:
        p, r2 = tuple(params) if params is not None else (1.0, 0.0, 1.0, 0.0), math.nan
        if len(p) != 4:
            raise ValueError(f"params must be (a, b, c, d), got {params!r}")
    branch = _ensure_branch(layer)
    branch.affine[j, i] = torch.tensor(p, dtype=branch.affine.dtype, device=branch.affine.device)
    branch.mask[j, i] = 1.0
    branch.names[j][i] = fun.name
    layer.edge_mask[j, i] = 0.0
    return r2


@torch.no_grad()
def unfix_symbolic(model, l: int, i: int, j: int) -> None:
    """Give edge ``(l, i, j)`` back to the numeric (spline) function."""
    layer = _check_edge(model, l, i, j)
    if layer.symbolic is not None:
        layer.symbolic.mask[j, i] = 0.0
        layer.symbolic.names[j][i] = None
    if layer.edge_mask is not None:
        layer.edge_mask[j, i] = 1.0


class SymbolicReport(dict):
    """What :func:`auto_symbolic` did: a dict ``{(l, i, j): SymbolicFit}`` of the edges it
    fixed (negligible edges with the constant ``"0"``), plus

    Attributes:
        zeroed: edges fixed to ``"0"`` because their activation was negligible.
        skipped: ``{(l, i, j): best SymbolicFit}`` of edges left numeric (spline) because no
            candidate reached ``r2_threshold``.
        error_before, error_after: the model's RMSE against ``y`` on the samples before and
            after (``None`` without ``y``).
        output_change: RMS of ``model(x)`` after minus before, on the samples.
        output_scale: RMS of ``model(x) - mean`` before (the spread the change compares to).
    """

    def __init__(self):
        super().__init__()
        self.zeroed: List[Tuple[int, int, int]] = []
        self.skipped: Dict[Tuple[int, int, int], SymbolicFit] = {}
        self.error_before: Optional[float] = None
        self.error_after: Optional[float] = None
        self.output_change: float = 0.0
        self.output_scale: float = 0.0

    def summary(self) -> str:
        """One line: edges fixed/zeroed/skipped and the model's error (or output change)."""
        parts = [f"{len(self) - len(self.zeroed)} edges fixed to formulas, {len(self.zeroed)} negligible edges "
                 f"to 0, {len(self.skipped)} left as splines"]
        if self.error_before is not None:
            parts.append(f"RMSE on the samples {self.error_before:.4g} -> {self.error_after:.4g}")
        parts.append(f"output change (RMS) {self.output_change:.4g} (output spread {self.output_scale:.4g})")
        return "; ".join(parts)


def _rms(t: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean(t.detach().to(torch.float64) ** 2))) if t.numel() else 0.0


def auto_symbolic(
    model,
    x: Optional[torch.Tensor] = None,
    y: Optional[torch.Tensor] = None,
    lib: Optional[Iterable[str]] = None,
    weight_simple: float = 1.0,
    r2_threshold: float = 0.99,
    zero_threshold: float = 1e-2,
    warn_growth: float = 0.1,
    verbose: bool = False,
    **fit_kwargs,
) -> SymbolicReport:
    """Fix the active numeric edges to formulas (Liu et al. 2024 sec. 2.5.1), layer by
    layer, where that is safe. Edges already symbolic, or masked out (pruned), are left
    as they are. For each edge ``(l, i, j)``, on the samples that reach it:

    * **negligible** edges become the constant ``"0"`` (``c = 0``, ``d`` = the edge's mean):
      an edge is negligible when the standard deviation of its activation is at most
      ``zero_threshold`` times the layer's output scale, the largest standard deviation
      of the layer's output nodes (numeric and symbolic edges together);
    * any other edge gets the best of the library's non-constant candidates whose fit
      reaches ``R^2 >= r2_threshold`` (:func:`suggest_symbolic`, then :func:`pick_best`
      among those); "0" is never chosen for it;
    * when none reaches ``r2_threshold`` the edge stays a spline and is reported
      (``report.skipped``, a warning; train further, or lower the threshold).

    The model's error before and after is measured on the samples: its RMSE against ``y``
    when given, and the RMS change of its output; a ``UserWarning`` is issued when the RMSE
    grows by more than the factor ``1 + warn_growth`` (without ``y``: when the output moves
    by more than ``warn_growth`` times its spread). The fixed formulas' affine parameters
    stay trainable: retrain after fixing to recover accuracy, or :func:`unfix_symbolic`.

    Args:
        x: ``(N, in_features)`` model inputs (or, without ``x``, the inputs the last forward
            kept: ``model.keep_inputs = True``). With ``x``, each layer is fitted on the
            activations of the model as it is after the previous layers were fixed.
        y: ``(N, out_features)`` targets for the error report (optional).
        lib: candidate names (default: all of :data:`SYMBOLIC_LIB`).
        weight_simple: see :func:`pick_best`.
        r2_threshold: least ``R^2`` for fixing an edge (default 0.99).
        zero_threshold: the negligible-edge threshold above (default 1e-2).
        warn_growth: the error growth that triggers a warning (default 0.1 = 10 %).
        verbose: print one line per edge and the summary.

    Returns:
        :class:`SymbolicReport` (a dict ``{(l, i, j): chosen SymbolicFit}`` with the
        skipped edges and the error before/after).

    Raises:
        ValueError: no samples, ``y`` of the wrong shape, or thresholds out of range; the
        model is unchanged then.
    """
    if not (0.0 <= zero_threshold < 1.0) or not math.isfinite(r2_threshold) or r2_threshold > 1.0:
        raise ValueError(f"need 0 <= zero_threshold < 1 and r2_threshold <= 1, got {zero_threshold}, {r2_threshold}")
    funs = _resolve_lib(lib)
    candidates = [f for f in funs if f.name != "0"]
    layers = list(model.layers)
    x_in = (x if x is not None else _layer_inputs(model, None)[0]).reshape(-1, layers[0].in_features)
    with torch.no_grad():
        out_before = model(x_in).detach()
    if y is not None:
        y = torch.as_tensor(y, device=out_before.device)
        if y.numel() != out_before.numel():
            raise ValueError(f"y has {y.numel()} entries for model outputs of shape {tuple(out_before.shape)}")
        y = y.reshape(out_before.shape).to(out_before.dtype)
    report = SymbolicReport()
    if y is not None:
        report.error_before = _rms(out_before - y)
    report.output_scale = _rms(out_before - out_before.mean(0))
    for l, layer in enumerate(layers):
        inputs = None  # this layer's input, after the previous layers were fixed
        for j in range(layer.out_features):
            for i in range(layer.in_features):
                if layer.edge_mask is not None and float(layer.edge_mask[j, i]) == 0.0:
                    continue
                if layer.symbolic is not None and float(layer.symbolic.mask[j, i]) != 0.0:
                    continue
                if inputs is None:
                    inputs = _layer_inputs(model, x)[l]
                    with torch.no_grad():
                        layer_scale = float(layer(inputs).detach().to(torch.float64).std(0, unbiased=False).max())
                xi = inputs[:, i]
                xi = xi[torch.isfinite(xi)]
                with torch.no_grad():
                    act = _numeric_edge(layer, xi, i, j).detach().to(torch.float64)
                edge_std = float(act.std(unbiased=False)) if act.numel() > 1 else 0.0
                if act.numel() > 0 and edge_std <= zero_threshold * layer_scale:
                    fit = SymbolicFit("0", 1.0 if edge_std == 0.0 else 0.0, SYMBOLIC_LIB["0"].complexity,
                                      (0.0, 0.0, 0.0, float(act.mean())))
                    fix_symbolic(model, l, i, j, "0", fit_params=False, params=fit.params)
                    report[(l, i, j)] = fit
                    report.zeroed.append((l, i, j))
                    if verbose:
                        print(f"fixing ({l},{i},{j}) with 0: negligible (std {edge_std:.3g} <= "
                              f"{zero_threshold:g} x layer output scale {layer_scale:.3g})")
                    continue
                fits = _suggest_on_samples(layer, inputs[:, i], i, j, candidates, **fit_kwargs)
                good = [f for f in fits if math.isfinite(f.r2) and f.r2 >= r2_threshold]
                if not good:
                    best = fits[0]
                    report.skipped[(l, i, j)] = best
                    if verbose:
                        print(f"leaving ({l},{i},{j}) as a spline: best fit {best.name} has r2={best.r2:.6f} "
                              f"< r2_threshold={r2_threshold}")
                    continue
                best = pick_best(good, weight_simple)
                fix_symbolic(model, l, i, j, best.name, fit_params=False, params=best.params)
                report[(l, i, j)] = best
                if verbose:
                    print(f"fixing ({l},{i},{j}) with {best.name}, r2={best.r2:.6f}")
    with torch.no_grad():
        out_after = model(x_in).detach()
    report.output_change = _rms(out_after - out_before)
    if y is not None:
        report.error_after = _rms(out_after - y)
    if verbose:
        print(report.summary())
    if report.skipped:
        warnings.warn(
            f"auto_symbolic left {len(report.skipped)} edges as splines (best R^2 below r2_threshold="
            f"{r2_threshold}): " + ", ".join(f"{k} {f.name} r2={f.r2:.4f}" for k, f in report.skipped.items()),
            UserWarning,
            stacklevel=2,
        )
    tiny = 1e-12 * max(report.output_scale, 1e-300)
    if y is not None and report.error_after > (1.0 + warn_growth) * report.error_before + tiny:
        warnings.warn(
            f"auto_symbolic: the model's RMSE on the samples grew from {report.error_before:.4g} to "
            f"{report.error_after:.4g}; retrain (the formulas' affine parameters are trainable) or "
            f"unfix_symbolic the edges in the report",
            UserWarning,
            stacklevel=2,
        )
    elif y is None and report.output_change > warn_growth * report.output_scale + tiny:
        warnings.warn(
            f"auto_symbolic: the model's output moved by {report.output_change:.4g} (RMS) on the samples, "
            f"against an output spread of {report.output_scale:.4g}; retrain or unfix_symbolic the edges "
            f"in the report",
            UserWarning,
            stacklevel=2,
        )
    return report


def symbolic_formula(
    model,
    var_names: Optional[Sequence[str]] = None,
    digits: Optional[int] = None,
    simplify: bool = False,
):
    """The model as sympy expressions (one per output), once every active edge is
    symbolic (Liu et al. 2024 sec. 2.5.1).

    Args:
        var_names: input symbol names (default ``x_1 .. x_n``).
        digits: round the constants to this many significant digits (default: full).
        simplify: run ``sympy.simplify`` on the result (slow on big formulas).

    Returns:
        list of sympy expressions, ``len == out_features`` of the last layer.

    Raises:
        ValueError: an active edge is still numeric (run :func:`auto_symbolic` or
        :func:`fix_symbolic` first).
    """
    sp = import_sympy()
    n_in = model.layers[0].in_features
    if var_names is None:
        var_names = [f"x_{k + 1}" for k in range(n_in)]
    if len(var_names) != n_in:
        raise ValueError(f"var_names needs {n_in} names, got {len(var_names)}")

    def num(v: float):
        v = float(v)
        return sp.Float(v, digits) if digits is not None else sp.Float(v)

    exprs = list(sp.symbols(list(var_names), real=True)) if n_in > 1 else [sp.Symbol(var_names[0], real=True)]
    for l, layer in enumerate(model.layers):
        outs = []
        for j in range(layer.out_features):
            acc = sp.Integer(0)
            for i in range(layer.in_features):
                sym_on = layer.symbolic is not None and float(layer.symbolic.mask[j, i]) != 0.0
                num_on = layer.edge_mask is None or float(layer.edge_mask[j, i]) != 0.0
                if num_on:
                    raise ValueError(
                        f"edge ({l}, {i}, {j}) is still numeric; fix it (auto_symbolic/fix_symbolic) or prune it first"
                    )
                if sym_on:
                    a, b, c, d = layer.symbolic.affine[j, i].tolist()
                    f = SYMBOLIC_LIB[layer.symbolic.names[j][i]]
                    acc = acc + num(c) * f.sympy_fn(num(a) * exprs[i] + num(b)) + num(d)
            outs.append(acc)
        exprs = outs
    if simplify:
        exprs = [sp.simplify(e) for e in exprs]
    return exprs
