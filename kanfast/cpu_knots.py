"""The dense-block engine's per-call knot constants (:mod:`kanfast.torch_backend`).

:class:`Knots` is built once per call from the layer's knots (before the work is split
across the CPU workers, and reused by the eager backward): uniformity verified
(:func:`kanfast.knots.uniform_spacing`), first and last knots, spacing and its inverse, the
local polynomial tables of the cardinal pieces (:func:`piece_columns`: for the torch ops of
:mod:`kanfast.cpu_bases` and the compiled kernels of :mod:`kanfast.cpu_dispatch`), or the
padded knots of de Boor's scheme; :class:`Grid` is a feature group's view of them.
:func:`column_check` decides once per group and call whether every input lies inside the
knots and on an interior span (:func:`closed_form_span` on uniform knots).
"""

from __future__ import annotations

from typing import Tuple

import torch

from .knots import cardinal_pieces, pad_knots, spacing, uniform_spacing

__all__ = ["piece_columns", "Knots", "Grid", "column_check", "closed_form_span"]


_columns_cache: dict = {}


def piece_columns(k: int, dtype: torch.dtype, device: torch.device):
    """``(cols, dcols, dmat, lmat, polys)``: column p of ``cols`` (k+1, 1) holds the coefficient of
    f^p in each of the k+1 local bases (of :func:`cardinal_pieces`), for broadcasting over
    a (k+1, rows*in) block: one op per power, not per basis; ``dcols`` those of d/df,
    and ``dmat`` (k, k+1) the same as a matrix (``dmat[p, r]``); ``lmat`` (k, k) the
    matrix of the k local bases of order k - 1 (``lmat[p, r]``, the coefficient of f^p in
    ``B_{m-k+1+r, k-1}``; empty for k = 0); ``polys`` the bases, ``lmat`` and ``dmat`` with
    one row per polynomial (row r: the coefficients of f^0, f^1, ...), for the block
    kernels (:mod:`kanfast.kernels.cpu_spline`). Built once per (k, dtype, device)."""
    key = (k, dtype, device)
    out = _columns_cache.get(key)
    if out is None:
        return _columns_cache.setdefault(key, _make_piece_columns(k, dtype, device))
    return out


@torch.inference_mode(False)  # cached across calls: never inference tensors
def _make_piece_columns(k: int, dtype: torch.dtype, device: torch.device):
    pieces = cardinal_pieces(k)
    cols = [torch.tensor([c[p] for c in pieces], dtype=dtype, device=device).view(-1, 1) for p in range(k + 1)]
    dcols = [
        torch.tensor([(p + 1) * c[p + 1] for c in pieces], dtype=dtype, device=device).view(-1, 1) for p in range(k)
    ]
    # dmat (k, k+1): dmat[p, r] = coefficient of f^p in d/df of local basis r
    dmat = torch.cat(dcols, dim=1).t().contiguous() if k else torch.zeros(0, 1, dtype=dtype, device=device)
    lower = cardinal_pieces(k - 1) if k else ()
    lmat = torch.tensor([[c[p] for c in lower] for p in range(k)], dtype=dtype, device=device).view(k, k)
    # the same, one row per polynomial (coefficients of f^0, f^1, ...): the block kernels' tables
    polys = (torch.cat(cols, dim=1).contiguous(), lmat.t().contiguous(), dmat.t().contiguous())
    return cols, dcols, dmat, lmat, polys


class Knots:
    """Per-call constants of every feature's knot vector, built once by the caller (before
    the work is split across the CPU workers, and reused by the eager backward) and
    sliced per feature group (:meth:`part`): on the order of twenty small ops, which
    cost 10-30 us each between large GEMMs. ``uniform``: the caller's flag, verified here
    (a grid edited through ``.data``, or a compiled graph that baked the flag in, may
    have gone stale) unless ``verify`` is False."""

    def __init__(self, grid: torch.Tensor, k: int, uniform: bool, verify: bool = True):
        self.k = k
        self.n = grid.shape[1]
        self.nb = self.n - k - 1
        self.grid = grid = grid.contiguous()
        h = None
        if uniform:
            h = uniform_spacing(grid) if verify else spacing(grid)
        self.uniform = h is not None
        self.t0 = grid[:, 0].contiguous()
        self.tn = grid[:, -1].contiguous()
        self.inv_h = self.h = self.pflat = self.prow_base = None
        # knot lookups: the spans of every path are taken against the stored knots
        self.flat = grid.reshape(-1)
        self.row_base = torch.arange(grid.shape[0], device=grid.device) * self.n
        if self.uniform:
            self.h = h.reshape(-1).contiguous()
            self.inv_h = 1.0 / self.h
            self.cols, self.dcols, self.dmat, self.lmat, self.polys = piece_columns(k, grid.dtype, grid.device)
        else:
            padded = pad_knots(grid, k).contiguous()
            self.pflat = padded.reshape(-1)
            self.prow_base = torch.arange(grid.shape[0], device=grid.device) * padded.shape[1]

    def part(self, f0: int, f1: int) -> "Grid":
        """The knots of features f0..f1 (views)."""
        return Grid(self, f0, f1)


class Grid:
    """The knots of features f0..f1: views of the call's :class:`Knots`. Index
    tables (``row_base``, ``prow_base``) address the whole grid's flat knots."""

    def __init__(self, kn: Knots, f0: int, f1: int):
        self._kn, self._f0 = kn, f0
        self.k, self.n, self.nb, self.uniform = kn.k, kn.n, kn.nb, kn.uniform
        self.grid = kn.grid[f0:f1]
        self.t0, self.tn = kn.t0[f0:f1], kn.tn[f0:f1]
        self.flat, self.pflat = kn.flat, kn.pflat
        self.row_base = None if kn.row_base is None else kn.row_base[f0:f1]
        self.prow_base = None if kn.prow_base is None else kn.prow_base[f0:f1]
        if self.uniform:
            self.inv_h, self.h = kn.inv_h[f0:f1], kn.h[f0:f1]
            self.cols, self.dcols, self.dmat, self.lmat, self.polys = kn.cols, kn.dcols, kn.dmat, kn.lmat, kn.polys

    def part(self, f0: int, f1: int) -> "Grid":
        """Features f0..f1 of this block (relative)."""
        return Grid(self._kn, self._f0 + f0, self._f0 + f1)


def column_check(x: torch.Tensor, g: Grid) -> Tuple[bool, bool]:
    """``(inside, interior)`` for x (N, in) on the group's knots: every input inside
    [t_0, t_last) (False for NaN); and every span ``m`` interior (``k <= m <= nb - 1``:
    all k+1 bases exist, and they sum to 1): ``t_k <= min`` and ``max < t_nb`` per feature,
    the spans of every path (the compiled kernels' included) being taken against the
    stored knots."""
    if x.shape[0] == 0:
        return True, True
    xmin, xmax = x.amin(0), x.amax(0)  # (aminmax(dim=0) is 20x slower on CPU)
    inside = bool((xmin >= g.t0).all()) and bool((xmax < g.tn).all())
    if not inside:
        return False, False
    if g.uniform and g.k >= 2:  # the spans of cpu_bases._spans (monotone in x), from the same float ops
        lo, hi = closed_form_span(xmin, g), closed_form_span(xmax, g)
        return True, bool((lo >= g.k).all()) and bool((hi <= g.nb - 1).all())
    return True, bool((xmin >= g.grid[:, g.k]).all()) and bool((xmax < g.grid[:, g.nb]).all())


def closed_form_span(x: torch.Tensor, g: Grid, blk=None) -> torch.Tensor:
    """Uniform knots, k >= 2: the span m (integer-valued floats of x's dtype, in [0, n - 2]) of
    inputs x (rows, in) inside the knots on the computed knots ``c_m = t_0 + m h`` (a product,
    then a sum: the float ops of the block kernels, compiled without contraction): the guess
    ``floor((x - t_0) / h)`` is within one of it, and is moved by one where x lies on the other
    side of ``c_m`` or ``c_{m+1}``. :func:`kanfast.knots.grid_is_uniform` admits only knots whose stored
    values are within :data:`kanfast.knots.UNIFORM_TOL` eps h of these. ``c_m`` increases with m, so m is
    monotone in x. ``blk``: a :class:`kanfast.cpu_plan.Block` whose scratch buffer holds the result."""
    n = g.n
    m = torch.sub(x, g.t0, out=None if blk is None else blk.scratch("m", x.numel()).view(x.shape))
    m.mul_(g.inv_h).floor_().clamp_(0, n - 2)
    c = torch.mul(m, g.h).add_(g.t0)
    m.sub_(torch.lt(x, c).to(m.dtype)).clamp_(min=0)
    c = torch.add(m, 1).mul_(g.h).add_(g.t0)
    return m.add_(torch.ge(x, c).to(m.dtype)).clamp_(max=n - 2)
