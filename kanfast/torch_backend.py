"""Fast torch KAN backend: the CPU engine (torch ops and MKL GEMMs, plus two small
compiled C kernels for the element-wise work where a C compiler is available).

Algorithm (forward, per group of input features, a K-slice of the GEMM of at
most ``BLOCK_WIDTH`` columns so that the dense block stays the same size whatever
G, and within it per chunk of rows; only ``x`` is saved for backward):

  1. interval ("span") index ``m`` of every input on its knots, ``t_m <= x < t_{m+1}`` on
     the stored knots. Uniform knots (:func:`grid_is_uniform`: every stored knot within
     :data:`UNIFORM_TOL` eps h of equal spacing): the closed form ``floor((x - t_0) / h)``,
     within one of the span, corrected against the stored ``t_m`` and ``t_{m+1}``; other
     knots: ``searchsorted``. Whether every span of a feature group is interior is decided
     once per call from the per-feature min and max against the stored ``t_k`` and
     ``t_{nb}``. Inputs outside ``[t_0, t_last)`` (and NaN/inf)
     get the sentinel span ``n - 1`` and contribute exactly 0 to the spline term;
  2. the ``k + 1`` non-zero bases ``B_{m-k..m}``. Uniform knots: the pieces of
     the cardinal B-spline are fixed polynomials of the local coordinate
     ``f = (x - t_m) / h``, ``t_m`` the stored knot (not ``t_0 + m h``, whose rounding
     grows with the knots' magnitude and with m) (coefficients computed exactly, in rationals, once per
     ``k``), evaluated for all k+1 bases at once (Horner's rule, one broadcast
     op per degree) with no knot gathers. Other knots: de Boor's triangular scheme
     (NURBS Book, alg. A2.2) on gathered knots;
  3. those values are written (``scatter_`` through 1-D views of one flat
     buffer shifted by the slot number: parallel on CPU, unlike ``index_add_``)
     into a zeroed dense block reused across chunks, laid out basis-major:
     ``[silu(x) | B_0 | ... | B_{G+k-1}]``, each a column block of the group's
     ``in`` features (:class:`_Block`); one GEMM against the weight in the same
     layout ``[base_weight | W_0 | ...]`` gives ``y``, the SiLU base branch
     included: exactly the dense-GEMM floor ``batch x in*(G+k+1) x out``, or
     less: when every input of the group lies inside the grid range (the bases
     sum to 1 there, the common case), ``sum_j W_j B_j = sum_{j<L} (W_j - W_L) B_j
     + W_L`` with ``L = G+k-1``, so the last basis's column block is dropped (a
     K-slice of the basis-major block) and ``sum_i W_L`` is added as a bias: each
     GEMM does (G+k)/(G+k+1) of the floor's work (8/9 at G=5, k=3). Chunks whose
     inputs all sit on interior spans write distinct positions and need no
     masking; otherwise the slots of bases that do not exist (extension spans,
     the sentinel span) carry the value 0 and are accumulated (``scatter_add_``)
     unclamped: they land on another column block or in the buffer's slack,
     adding 0.

Backward recomputes steps 1-3 per chunk and issues the two remaining GEMMs:
``gW += grad_y^T @ D`` (the gradient w.r.t. ``[base_weight | W]``, accumulated
chunk by chunk in a fixed order: deterministic; when the last basis was dropped
its column is ``sum_b grad_y - sum_{j<L} gW_j``, since ``B_L = 1 - sum_{j<L} B_j``; exactly
0 for a feature whose inputs all lie at or below ``t_L``, where ``B_L`` vanishes on every row),
then ``grad_D = grad_y @ W`` into the same block: its SiLU column block gives the
base branch's share of grad_x (``silu_backward``), and of the rest only the
``k + 1`` entries at the non-zero bases are gathered (``index_select``; reads at
missing bases masked to 0) and contracted with the basis derivatives

    dB_{j,k}/dx = k * (B_{j,k-1} / (t_{j+k} - t_j) - B_{j+1,k-1} / (t_{j+k+1} - t_{j+1})).

On uniform knots the derivatives are polynomials of ``f`` too, so the contraction
is regrouped by powers (``S = d^T @ gathered``, a (k, k+1) GEMM, then Horner's
rule) and the k+1 derivative rows are never formed; the 1/h of d/dx is folded into
the weight. Where the group is reduced on uniform knots, ``grad_D`` is taken against
the derivative spline's coefficients instead (:func:`_derivative_weight`:
``s' = sum_j (W_j - W_{j-1}) / h * B_{j,k-1}``, same K): k values per input to gather
instead of k + 1, the order-(k-1) local bases in place of the derivatives, and no
dropped column block to clear (measured in-process, 2 threads, batch 4096,
in = out = 256, G = 5: 2.1-2.4 ms less per fwd+bwd, ~2.3%).

Compiled block kernels (:mod:`kanfast.kernels.cpu_spline`, C built on first use and
cached; uniform knots, k >= 2, float32/float64): steps 1-3 of a chunk are one kernel
pass writing the block row by row (spans, bases, the SiLU column and the zeros, selected
by comparing each column's basis index with the span: no scatter, no index ever used
as an address; for large G, where comparing with every column costs more, the row is
zeroed and only the slots whose column exists are stored: ``SELECT_MAX`` in
:mod:`kanfast.kernels.cpu_spline`), and backward's gather, contraction with the local
polynomials and silu' are one more (``grad_x`` from the ``grad_D`` block). They replace ~20 torch ops per
chunk whose memory passes over the block cost more than the arithmetic; the chunks
shrink (:data:`KERNEL_CHUNK_ELEMENTS`) so that the block stays in cache for its GEMM. The
GEMMs stay torch's (MKL). Measured in-process, paired runs, 2 threads, batch 4096,
in = out = 256, k = 3, fwd+bwd: G = 5 89.8 -> 79.9 ms, G = 20 238.9 -> 221.9 ms, G = 50
588.7 -> 535.8 ms. Without a compiler (or with ``KANFAST_CPU_KERNEL=0``) the torch ops
below run: same results to rounding.

Threads (:mod:`kanfast.cpu_workers`): a large call is split into independent
parts, one per thread, each running single-threaded ops: forward by blocks of
rows, backward by blocks of input features (disjoint gradient columns, no
reduction). Odd-numbered parts start with a half-size chunk, so that two
workers side by side are half a chunk out of phase and one's memory-bound basis
work overlaps the other's GEMM (measured: 1.17x -> 1.13x the floor at G = 5).
Each thread keeps its work buffers between calls (:func:`release_buffers`).

Sparse path: calls whose coefficient table fits in cache (and every small call) take the
sparse contraction of :mod:`kanfast.sparse_backend` instead (the rule is there; :mod:`kanfast.ops`
chooses), whose compiled kernel contracts only the ``k + 1`` non-zero bases per input. Built from
torch index ops (gather/scatter, ~1-3 ns per element against ~0.01 ns per multiply-add inside a
GEMM) such a contraction lost to the dense GEMMs at every grid size measured (G = 5..50); this
engine keeps the dense block, built cheaply, for the calls the rule leaves to it.

Memory bound: nothing of size (batch, in, G + k) lives between forward and
backward (saved: ``x``, the knots and the coefficients). The transient memory
per thread running the engine (the caller, or each CPU worker) is one dense
block of at most about ``CHUNK_ELEMENTS * (G+k+1)/(G+k)`` elements (the bases
of one feature group and its SiLU column block, then its ``grad_D`` in
backward), ``2k + 6`` work buffers (uniform knots; more on others) of at most ``rows_per_chunk * in <=
ROW_ELEMENTS`` elements (an int64 buffer counting as two), and two buffers the
size of one feature group's weight (``out * (G+k+1) * group width``: its scaled
weight in the block's layout, and its weight gradient), all reused by every
chunk, group and call (fresh allocations cost page faults; see
:func:`release_buffers`); plus the gradients returned. At most about 16 MiB at the
defaults, k = 3, in float32, plus the weight-sized pair, whatever the batch size
and G. Measured fwd+bwd peak beyond parameters, gradients, input and output at
batch 4096, in = out = 256: see ``benchmarks/results`` (flat in G).

The engine's backward is first-order; double backward (``create_graph=True``) is
routed by the autograd formula in :mod:`kanfast.ops` through a differentiable
formulation.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from fractions import Fraction
from math import comb, factorial
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import cpu_workers
from .kernels import cpu_spline

__all__ = [
    "kan_linear_torch",
    "grid_is_uniform",
    "local_bases",
    "CHUNK_ELEMENTS",
    "BLOCK_WIDTH",
    "ROW_ELEMENTS",
    "KERNEL_CHUNK_ELEMENTS",
    "CANCEL_RATIO",
    "KERNEL_BLOCK_WIDTH",
    "UNIFORM_TOL",
    "release_buffers",
]

#: Largest dense basis block (elements) materialised at once: at most
#: ``rows_per_chunk * BLOCK_WIDTH`` with the default ROW_ELEMENTS at in = 256.
CHUNK_ELEMENTS = 1 << 21
#: Widest K of one GEMM: the input features are split into groups of at most
#: BLOCK_WIDTH / (G + k + 1) features (bases and the SiLU column), each a K-slice of the dense GEMM. The block
#: then no longer grows with G (memory flat in G) while the rows per chunk, the
#: GEMM's M, stay large (a block capped by shrinking M instead made G=50 1.4x
#: slower at 151 rows than at 303).
BLOCK_WIDTH = 4096
#: Target number of (row, feature) elements per chunk. Measured on a quiet 2-core
#: AMD EPYC (batch 4096, in=out=256, fwd+bwd engine / dense floor, median of 7):
#: G=5: 2**15: 1.44, 2**16: 1.30, 2**17: 1.29, 2**18: 1.35, 2**19: 1.68;
#: G=20: 1.18, 1.10, 1.10, 1.12, 1.12 (fewer fork-joins vs cache-resident work).
ROW_ELEMENTS = 1 << 17
#: The last basis is dropped (:func:`_group_weight`) only while the group's largest |W_L| is
#: at most this many times the median, over the other bases, of their largest |W_j|: the
#: reduced form's rounding grows with |W_L| (a layer whose never-reached last coefficient is
#: 1e4 gave float32 outputs off by 1e-3 relative, against 3e-7 unreduced).
CANCEL_RATIO = 16.0
#: The compiled block kernels' path (:mod:`kanfast.kernels.cpu_spline`): a chunk's block
#: has at most KERNEL_CHUNK_ELEMENTS elements (2 MiB in float32), whatever the layer's width,
#: so that it stays in cache between the fill and its GEMM while its rows (the GEMM's M) stay
#: in the hundreds. Measured on the same machine, 2 threads, batch 4096, in=out=256, fwd+bwd
#: / floor, paired runs, 2**17 / 2**18 / 2**19: G=5 0.960 / 0.938 / 0.916, G=50 1.001 /
#: 0.942 / 0.932. (Sizing the rows by rows x in instead, as the torch ops' path does, gave
#: KAN([1152, 4608, 1152]) 28-row chunks.)
KERNEL_CHUNK_ELEMENTS = 1 << 19
#: BLOCK_WIDTH of the kernels' path: its feature groups (aligned, see
#: :func:`_feature_groups`) can be narrower at no cost, which keeps the weight-sized work
#: buffers (two per thread, ``out x width``) and the block about the same size from G = 5 to
#: G = 50 (same machine, 2 threads, paired runs, fwd+bwd / floor, widths 4096 / 2048 /
#: 1024: G=5 0.905 / 0.912 / 0.982, G=20 0.872 / 0.855 / 0.906, G=50 0.965 / 0.973 / 0.970).
KERNEL_BLOCK_WIDTH = 2048
#: Knots count as uniform (the closed form of :func:`_spans` and the compiled kernels) when
#: each lies within UNIFORM_TOL * eps * h of the straight line through the first and last
#: (:func:`_uniform_spacing`); others are searched (``searchsorted``, de Boor). Rounded float32
#: knots of ``grid_range`` (-1, 1) deviate up to 8.9 eps h at G = 50, 13.6 at G = 60, 30 at
#: G = 100, 392 at G = 1000 (knots near 1e3 with h = 0.02: 1.3e4).
UNIFORM_TOL = 3.0


def grid_is_uniform(grid: torch.Tensor) -> bool:
    """True when every row of ``grid`` (in, n_knots) is equally spaced to within
    :data:`UNIFORM_TOL` units of the grid dtype's rounding of the spacing (see
    :func:`_uniform_spacing`): the rows the closed form evaluates as exactly as Cox-de Boor
    on the stored knots. Non-finite, non-increasing or coincident knots: False."""
    return _uniform_spacing(grid) is not None


def _spacing(grid: torch.Tensor) -> torch.Tensor:
    """(t_last - t_0) / (n - 1) per row, (in, 1): the spacing of uniform knots."""
    return (grid[:, -1:] - grid[:, :1]) / (grid.shape[-1] - 1)


def _uniform_spacing(grid: torch.Tensor) -> Optional[torch.Tensor]:
    """The spacing h (in, 1), in the grid's dtype, when every row of ``grid`` is uniform, else None.

    Uniform: the knots strictly increase, and each stored knot ``t_j`` lies within
    ``UNIFORM_TOL * eps * h`` of ``t_0 + j h``, ``h = (t_last - t_0) / (n - 1)``, eps that of
    the grid's dtype. The closed form takes the span and the local coordinate against the
    stored ``t_m`` (:func:`_spans`) and the cardinal pieces in place of its neighbours
    ``t_{m-k} .. t_{m+k+1}``, so its error is at most about that deviation over h: a
    tolerance relative to h, not to the knots' magnitude (float32 knots at 1e3 with h = 0.02
    sit up to 1.5e-3 h off the line, and fine grids of many steps drift as far: both are
    searched instead). Tested in float64 (exact differences for float32 knots): the
    deviations are the cumulative sums of the spacings' excess over h, less the straight
    line that takes up h's own rounding, so the test's rounding stays far below eps * h. And
    each stored knot within the same tolerance of the knot the closed form computes,
    ``t_0 + j h`` in the grid's dtype (:func:`_closed_form_span`): exact, so identical, for
    ``uniform_grid``'s knots."""
    n = grid.shape[-1]
    if n < 2 or grid.dim() != 2:
        return None
    t = grid.detach().to(torch.float64)
    d = t[:, 1:] - t[:, :-1]
    h = (t[:, -1:] - t[:, :1]) / (n - 1)
    p = torch.cumsum(d - h, dim=1)  # t_j - t_0 - j h, j = 1 .. n - 1
    j = torch.arange(1, n, dtype=torch.float64, device=t.device)
    dev = p - (j / (n - 1)) * p[:, -1:]  # less the line through t_0 and t_last
    tol = UNIFORM_TOL * torch.finfo(grid.dtype).eps
    hw = _spacing(grid)  # the knots the closed form computes, t_0 + j h in the grid's dtype
    comp = torch.arange(n, dtype=grid.dtype, device=grid.device).mul(hw).add_(grid[:, :1])
    ok = torch.isfinite(t).all() & (d > 0).all() & (dev.abs() <= tol * h).all()
    ok &= ((comp.to(torch.float64) - t).abs() <= tol * h).all()
    return hw if bool(ok) else None


@functools.lru_cache(maxsize=None)
def _cardinal_pieces(k: int) -> Tuple[Tuple[float, ...], ...]:
    """Monomial coefficients of the uniform B-spline pieces.

    On a span ``[t_m, t_m + h)`` with local coordinate ``f = (x - t_m) / h``,
    ``B_{m-k+r}(x) = N_k(k - r + f)`` where ``N_k`` is the cardinal B-spline of
    degree k on ``[0, k+1]``: ``N_k(s) = 1/k! sum_{l<=j} (-1)^l C(k+1, l) (s - l)^k``
    on ``[j, j+1)``. Returns ``c[r][p]`` with ``B_{m-k+r} = sum_p c[r][p] f^p``,
    computed exactly in rationals then rounded once.
    """
    out = []
    for r in range(k + 1):
        j = k - r
        coefs = []
        for p in range(k + 1):
            acc = Fraction(0)
            for l in range(j + 1):
                acc += (-1) ** l * comb(k + 1, l) * comb(k, p) * Fraction(j - l) ** (k - p)
            coefs.append(float(acc / factorial(k)))
        out.append(tuple(coefs))
    return tuple(out)


def _horner(cols: List[torch.Tensor], fv: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = sum_p cols[p] * fv^p by Horner's rule (one ``addcmul`` per degree, no powers
    of f; operands broadcast: the k+1 local polynomials with cols[p] (k+1, 1) and fv
    (1, E), or one polynomial of per-element coefficients)."""
    d = len(cols) - 1
    if d == 0:
        return out.copy_(cols[0].expand_as(out))
    torch.addcmul(cols[d - 1], cols[d], fv, out=out)
    for p in range(d - 2, -1, -1):
        torch.addcmul(cols[p], out, fv, out=out)
    return out


_columns_cache: dict = {}


def _piece_columns(k: int, dtype: torch.dtype, device: torch.device):
    """``(cols, dcols, dmat, lmat, polys)``: column p of ``cols`` (k+1, 1) holds the coefficient of
    f^p in each of the k+1 local bases (of :func:`_cardinal_pieces`), for broadcasting over
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
    pieces = _cardinal_pieces(k)
    cols = [torch.tensor([c[p] for c in pieces], dtype=dtype, device=device).view(-1, 1) for p in range(k + 1)]
    dcols = [
        torch.tensor([(p + 1) * c[p + 1] for c in pieces], dtype=dtype, device=device).view(-1, 1) for p in range(k)
    ]
    # dmat (k, k+1): dmat[p, r] = coefficient of f^p in d/df of local basis r
    dmat = torch.cat(dcols, dim=1).t().contiguous() if k else torch.zeros(0, 1, dtype=dtype, device=device)
    lower = _cardinal_pieces(k - 1) if k else ()
    lmat = torch.tensor([[c[p] for c in lower] for p in range(k)], dtype=dtype, device=device).view(k, k)
    # the same, one row per polynomial (coefficients of f^0, f^1, ...): the block kernels' tables
    polys = (torch.cat(cols, dim=1).contiguous(), lmat.t().contiguous(), dmat.t().contiguous())
    return cols, dcols, dmat, lmat, polys


class _Knots:
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
            h = _uniform_spacing(grid) if verify else _spacing(grid)
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
            self.cols, self.dcols, self.dmat, self.lmat, self.polys = _piece_columns(k, grid.dtype, grid.device)
        else:
            padded = _pad_knots(grid, k).contiguous()
            self.pflat = padded.reshape(-1)
            self.prow_base = torch.arange(grid.shape[0], device=grid.device) * padded.shape[1]

    def part(self, f0: int, f1: int) -> "_Grid":
        """The knots of features f0..f1 (views)."""
        return _Grid(self, f0, f1)


class _Grid:
    """The knots of features f0..f1: views of the call's :class:`_Knots`. Index
    tables (``row_base``, ``prow_base``) address the whole grid's flat knots."""

    def __init__(self, kn: _Knots, f0: int, f1: int):
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

    def part(self, f0: int, f1: int) -> "_Grid":
        """Features f0..f1 of this block (relative)."""
        return _Grid(self._kn, self._f0 + f0, self._f0 + f1)


def _pad_knots(grid: torch.Tensor, k: int) -> torch.Tensor:
    """Extend each knot row by k knots on each side (spacing of the end interval).

    De Boor's scheme for the span [t_m, t_{m+1}) reads t_{m-k+1} .. t_{m+k}; near the
    ends those fall outside the row. Any increasing extension is exact for the
    bases that exist (B_j depends only on t_j .. t_{j+k+1}); the others are dropped.
    """
    if k == 0:
        return grid
    steps = torch.arange(1, k + 1, device=grid.device, dtype=grid.dtype)
    h_lo = (grid[:, 1:2] - grid[:, :1]).clamp_min(1.0)
    h_hi = (grid[:, -1:] - grid[:, -2:-1]).clamp_min(1.0)
    left = grid[:, :1] - h_lo * steps.flip(0)
    right = grid[:, -1:] + h_hi * steps
    return torch.cat([left, grid, right], dim=1)


def _column_check(x: torch.Tensor, g: _Grid) -> Tuple[bool, bool]:
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
    if g.uniform and g.k >= 2:  # the spans of _spans (monotone in x), from the same float ops
        lo, hi = _closed_form_span(xmin, g), _closed_form_span(xmax, g)
        return True, bool((lo >= g.k).all()) and bool((hi <= g.nb - 1).all())
    return True, bool((xmin >= g.grid[:, g.k]).all()) and bool((xmax < g.grid[:, g.nb]).all())


def _closed_form_span(x: torch.Tensor, g: "_Grid", blk: Optional["_Block"] = None) -> torch.Tensor:
    """Uniform knots, k >= 2: the span m (integer-valued floats of x's dtype, in [0, n - 2]) of
    inputs x (rows, in) inside the knots on the computed knots ``c_m = t_0 + m h`` (a product,
    then a sum: the float ops of the block kernels, compiled without contraction): the guess
    ``floor((x - t_0) / h)`` is within one of it, and is moved by one where x lies on the other
    side of ``c_m`` or ``c_{m+1}``. :func:`grid_is_uniform` admits only knots whose stored
    values are within :data:`UNIFORM_TOL` eps h of these. ``c_m`` increases with m, so m is
    monotone in x."""
    n = g.n
    m = torch.sub(x, g.t0, out=None if blk is None else blk.scratch("m", x.numel()).view(x.shape))
    m.mul_(g.inv_h).floor_().clamp_(0, n - 2)
    c = torch.mul(m, g.h).add_(g.t0)
    m.sub_(torch.lt(x, c).to(m.dtype)).clamp_(min=0)
    c = torch.add(m, 1).mul_(g.h).add_(g.t0)
    return m.add_(torch.ge(x, c).to(m.dtype)).clamp_(max=n - 2)


def _spans(
    x: torch.Tensor, g: _Grid, all_inside: Optional[bool] = None, blk: Optional["_Block"] = None
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Span index ``m`` (rows, in), ``n - 1`` for inputs outside the knots (int64; on the
    uniform ``k >= 2`` path integer-valued floats of x's dtype), and (uniform knots) the local
    coordinate ``f = (x - t_m) / h`` in [0, 1] up to rounding (0 outside). ``all_inside``: the
    caller knows every input is inside. ``blk``: take the outputs' memory from its scratch
    buffers.

    Uniform knots, k >= 2: :func:`_closed_form_span` (spans and ``t_m`` on the computed knots
    ``t_0 + m h``, which the uniformity test holds within a few eps h of the stored ones); the
    local coordinate from that ``t_m``, not ``u - floor(u)``, whose rounding grows with the
    knots' magnitude and with m. Uniform, k <= 1 (values or slopes jump at knots): the closed
    form corrected against the stored knots, so that an input exactly on a knot takes the
    reference's span. Otherwise ``searchsorted``."""
    n = g.n
    outside = None
    if not all_inside:
        outside = torch.lt(x, g.tn).logical_not_().logical_or_(x < g.t0)  # NaN -> outside
    if g.uniform and g.k >= 2:
        xs = x if outside is None else torch.where(outside, g.t0, x)
        m = _closed_form_span(xs, g, blk)
        f = torch.mul(m, g.h, out=None if blk is None else blk.scratch("u", x.numel()).view(x.shape))
        f.add_(g.t0)
        torch.sub(xs, f, out=f).mul_(g.inv_h)
        if outside is not None:
            f.masked_fill_(outside, 0.0)
            m.masked_fill_(outside, float(n - 1))
        return m, f
    if g.uniform:
        u = (x - g.t0).mul_(g.inv_h)
        if outside is not None:
            u.masked_fill_(outside, 0.0)
        m = _correct_span(x, torch.floor(u).clamp_(0, n - 2).long(), g, None)
        t_m = g.flat[g.row_base + m]
        out = None if blk is None else blk.scratch("u", x.numel()).view(x.shape)
        f = torch.sub(x, t_m, out=out).mul_(g.inv_h)
        if outside is not None:
            f.masked_fill_(outside, 0.0)
            m.masked_fill_(outside, n - 1)
        return m, f
    m = torch.searchsorted(g.grid, x.t().contiguous(), right=True).t() - 1
    m = m.clamp_(0, n - 2)
    if outside is not None:
        m.masked_fill_(outside, n - 1)
    return m, None


def _correct_span(x, m, g: _Grid, inside):
    """Move ``m`` by one where rounding put ``x`` on the wrong side of a stored knot."""
    n = g.n
    base = g.row_base
    t_m = g.flat[base + m]
    m = torch.where(x < t_m, m - 1, m).clamp_(0, n - 2)
    t_m1 = g.flat[base + m + 1]
    m = torch.where(x >= t_m1, m + 1, m).clamp_(0, n - 2)
    return m


def _values(x, m, f, g: _Grid, need_val: bool, need_deriv: bool, deriv_scaled: bool = True, blk=None):
    """``(V, dV)``: the non-zero bases (k+1, rows, in) of every input on its span,
    and d/dx (for uniform knots without the 1/h factor when ``deriv_scaled`` is
    False); ``f`` the local coordinate of :func:`_spans` (uniform knots).
    ``blk``: take the outputs' memory from its scratch buffers."""
    k = g.k
    shape = (k + 1,) + tuple(x.shape)
    E = (k + 1) * x.numel()

    def out(name):
        if blk is not None:
            return blk.scratch(name, E).view(shape)
        return torch.empty(shape, dtype=x.dtype, device=x.device)

    V = out("V") if need_val else None
    dV = out("dV") if need_deriv else None
    if g.uniform:
        fv = f.reshape(1, -1)
        if need_val:
            _horner(g.cols, fv, V.view(k + 1, -1))
        if need_deriv:
            if k == 0:
                dV.zero_()
            else:
                _horner(g.dcols, fv, dV.view(k + 1, -1))
                if deriv_scaled:
                    dV.mul_(g.inv_h)
        return V, dV
    # non-uniform: de Boor on the padded knots (spans m = n - 1 read valid padded knots)
    mc = m.clamp(max=g.n - 2)
    base = g.prow_base + k + mc  # padded index of t_m
    flat = g.pflat
    xs = torch.where(m < g.n - 1, x, g.t0.expand_as(x))
    lefts = [xs - flat[base + 1 - j] for j in range(1, k + 1)]
    rights = [flat[base + j] - xs for j in range(1, k + 1)]
    N = [torch.ones_like(xs)]
    N_prev = N
    for p in range(1, k + 1):
        if p == k:
            N_prev = N
        saved = torch.zeros_like(xs)
        new = []
        for r in range(p):
            temp = N[r] / (rights[r] + lefts[p - r - 1])
            new.append(saved + rights[r] * temp)
            saved = lefts[p - r - 1] * temp
        new.append(saved)
        N = new
    if need_val:
        torch.stack(N, out=V)
    if need_deriv:
        if k == 0:
            dV.zero_()
        else:
            zero = torch.zeros_like(xs)
            one = torch.ones_like(xs)
            lower = [zero] + list(N_prev) + [zero]  # lower[r] = B_{m-k+r, k-1}
            last = flat.numel() - 1
            for r in range(k + 1):
                i = base - k + r  # padded index of t_{m-k+r}
                den_a = flat[(i + k).clamp(max=last)] - flat[i.clamp(min=0)]
                den_b = flat[(i + k + 1).clamp(max=last)] - flat[(i + 1).clamp(min=0)]
                a = torch.where(den_a > 0, lower[r] / torch.where(den_a > 0, den_a, one), zero)
                b = torch.where(den_b > 0, lower[r + 1] / torch.where(den_b > 0, den_b, one), zero)
                torch.mul(a - b, k, out=dV[r])
    return V, dV


def _slot_index(
    m: torch.Tensor, g: _Grid, blk: "_Block", rows: int, interior: bool = False
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Flat position in ``blk.flat`` of the first of the k+1 values of every input.

    Returns ``(lin, invalid)``: ``lin`` (rows*in,) int64, slot r of an input at
    ``lin + r * in`` (read/written through ``blk.flat[r * in:]``; see :class:`_Block`).
    Common case (every input of the chunk on an interior span): ``invalid`` is None
    and all positions are distinct and inside the chunk's block. Otherwise
    ``invalid`` (k+1, rows*in) bool marks the slots of bases that do not exist
    (extension spans, sentinel span n-1): their positions fall on another column
    of the block (or a neighbouring row's, or the slack), so their values must be 0
    and they must be accumulated (``scatter_add_``), never copied; reads there must
    be masked.
    """
    k, nb = g.k, g.nb
    if not interior:  # (known for the whole call, or checked on this chunk)
        lo, hi = torch.aminmax(m)
        interior = float(lo) >= k and float(hi) <= nb - 1
    E = m.numel()
    lin = blk.scratch("lin", E, torch.int64)
    if m.is_floating_point() and blk.base_f is not None:
        # base + m * in in floats (integers below 2^24: exact), one conversion to int64
        # (int64 element-wise ops cost ~5x float32 ones on CPU)
        linf = torch.add(blk.base_f[:rows], m, alpha=blk.nin, out=blk.scratch("linf", E).view(m.shape))
        lin.copy_(linf.view(-1))
    else:
        mi = m.long() if m.is_floating_point() else m
        torch.add(blk.base[:rows], mi, alpha=blk.nin, out=lin.view(m.shape))
    if interior:
        return lin, None
    mv = m.reshape(1, -1)
    invalid = torch.lt(mv, blk.lo_bound).logical_or_(torch.gt(mv, blk.hi_bound))
    return lin, invalid


def local_bases(
    x: torch.Tensor, grid: torch.Tensor, k: int, uniform: bool, need_deriv: bool
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Non-zero bases of every input.

    Args:
        x: ``(rows, in)``.
        grid: ``(in, n)`` knots, ``n = G + 2k + 1``, same dtype as x.
        k: spline order.
        uniform: use the closed form for equally spaced knots.
        need_deriv: also return d/dx of the k+1 bases.

    Returns:
        ``first`` ``(rows, in)`` int64: index (among the G+k bases) of the first of the
        k+1 values, ``m - k`` (may be negative or run past G+k-1 at the ends: those
        slots must be dropped); ``vals`` ``(rows, in, k+1)`` (0 for out-of-range or
        non-finite inputs); ``dvals`` the same shape or None.
    """
    g = _Knots(grid, k, uniform, verify=False).part(0, grid.shape[0])
    m, f = _spans(x, g)
    V, dV = _values(x, m, f, g, True, need_deriv)
    outside = (m == g.n - 1).unsqueeze(-1)
    vals = V.permute(1, 2, 0).masked_fill(outside, 0.0)
    dvals = dV.permute(1, 2, 0).masked_fill(outside, 0.0) if need_deriv else None
    return m.long().clamp(max=g.n - 2) - k, vals, dvals


def _dense_block(x, grid, k, n_basis, uniform, has_base, need_deriv):
    """Dense (rows, in, n_basis + has_base) block of bases (and silu column).

    Returns ``(D, idx_c, valid, dvals)``: ``idx_c`` (rows, in, k+1) the clamped
    basis index of each local value, ``valid`` where it is a real basis,
    ``dvals`` (rows, in, k+1) or None."""
    first, vals, dvals = local_bases(x, grid, k, uniform, need_deriv)
    rows, nin = x.shape
    width = n_basis + (1 if has_base else 0)
    idx = first.unsqueeze(-1) + torch.arange(k + 1, device=x.device)
    valid = (idx >= 0) & (idx < n_basis)
    idx_c = idx.clamp(0, n_basis - 1)
    D = torch.zeros(rows, nin, width, dtype=x.dtype, device=x.device)
    # scatter_add: slots that were clamped onto a real index carry value 0
    D.scatter_add_(2, idx_c, torch.where(valid, vals, torch.zeros_like(vals)))
    if has_base:
        D[..., n_basis] = F.silu(x)
    return D, idx_c, valid, dvals


def _feature_groups(nin: int, nb: int, width: Optional[int] = None, align: bool = False) -> List[Tuple[int, int]]:
    """Contiguous feature ranges [f0, f1) of near-equal size with (f1 - f0) * nb <= width
    (default BLOCK_WIDTH; one feature at least). ``align``: when the features need more
    than one group, groups of a whole multiple of 16 features where the width allows
    (the last one ragged), so that every column block of the group's dense block and weight
    starts 64-byte aligned in float32 (measured at G = 50, in = 256, width 3072: unaligned
    groups of 52 features 1.10x the floor against 0.92x for aligned groups of 64)."""
    width = BLOCK_WIDTH if width is None else width
    ng = max(1, -(-nin * nb // width))
    size = -(-nin // ng)
    if align and ng > 1 and width // nb >= 16:
        size = width // nb // 16 * 16
    return [(f0, min(nin, f0 + size)) for f0 in range(0, nin, size)]


class _Plan:
    """Per-call chunking: rows per chunk, feature groups, their knots and work blocks
    (the groups share one buffer). ``knots``: the knots of x's features (a
    :class:`_Grid`); ``has_base``: the blocks carry a SiLU column block.
    Each CPU worker runs its own plan with the full per-chunk budgets (halving them
    per worker was slower: smaller GEMMs, more ops per element)."""

    def __init__(self, x: torch.Tensor, knots: "_Grid", has_base: bool, kernels: bool = False):
        N, nin = x.shape
        k, nb = knots.k, knots.nb
        off = 1 if has_base else 0
        self.groups = _feature_groups(nin, nb + off, KERNEL_BLOCK_WIDTH if kernels else BLOCK_WIDTH, align=kernels)
        fg = self.groups[0][1] - self.groups[0][0]
        if kernels:  # rows by the block's size alone: the kernels' work buffers are per row
            self.step = max(1, KERNEL_CHUNK_ELEMENTS // max(1, fg * (nb + off)))
        else:
            self.step = max(1, min(ROW_ELEMENTS // max(1, nin), CHUNK_ELEMENTS // max(1, fg * (nb + off))))
        cap = min(self.step, N)
        self.grids = [knots.part(f0, f1) for f0, f1 in self.groups]
        first = _Block(cap, fg, nb, k, off, x)
        self.blocks = [
            first if f1 - f0 == fg else _Block(cap, f1 - f0, nb, k, off, x, share=first) for f0, f1 in self.groups
        ]
        self.k, self.nb, self.off = k, nb, off


class _Buffers(dict):
    """One thread's work buffers, kept from call to call (see :func:`release_buffers`)."""

    # identity, not contents, for the WeakSet of all threads' buffers
    __hash__ = object.__hash__
    __eq__ = object.__eq__
    __ne__ = object.__ne__


_local = threading.local()
_all_buffers: "weakref.WeakSet[_Buffers]" = weakref.WeakSet()  # every thread's (dropped with the thread)
_buffers_lock = threading.Lock()


def _reset_buffers_lock() -> None:
    """In a forked child: a fresh lock (a thread of the parent that held it does not exist
    here, so the child's copy would stay locked forever)."""
    global _buffers_lock
    _buffers_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_buffers_lock)


def _thread_buffers() -> _Buffers:
    bufs = getattr(_local, "buffers", None)
    if bufs is None:
        bufs = _local.buffers = _Buffers()
        with _buffers_lock:
            _all_buffers.add(bufs)
    return bufs


def release_buffers() -> None:
    """Free the work buffers the torch backend keeps between calls.

    Each thread that runs the engine (the caller, or the CPU workers of
    :mod:`kanfast.cpu_workers`) keeps its largest dense block, work buffers and
    weight-sized buffers (see the module's memory bound: at most about 16 MiB in float32
    at k = 3 and in = out = 256, per dtype) so that the next call does not pay for
    fresh pages again (page faults cost ~2 ms per call at batch 4096, in = 256 on
    a 2-core VM). A thread's buffers go when the thread ends. Safe to call at any
    time: a call in flight keeps the buffers it holds."""
    with _buffers_lock:
        for bufs in list(_all_buffers):
            bufs.clear()


class _Block:
    """Reusable dense block (cap, C * in) of one feature group in one flat buffer.

    Row layout basis-major: ``C = off + nb`` column blocks of ``in`` columns each,
    ``[silu(x) | B_0 | B_1 | ... | B_{nb-1}]`` (the SiLU block when ``off = 1``), so
    that dropping the last basis (see :func:`_group_weight`) is a K-slice of the
    GEMM, and the SiLU base branch is part of the same GEMM. Slot r of an input
    on span m (basis ``m - k + r``) sits at ``lin + r * in``. The block starts at
    offset ``k * in`` of ``flat`` and is followed by ``(k + 1) * in`` elements of
    slack, so that every slot position of an input on any span (extension spans
    and the sentinel span n - 1 included) is in bounds without clamping: a slot
    of a basis that does not exist lands on another column block (or a
    neighbouring row's, or the slack) and carries the value 0: it is only ever
    added there, and reads there are masked (the block is zeroed before each
    fill; the slack may hold anything). The buffers come from the calling
    thread's cache (:func:`release_buffers`). ``share``: a block of a wider
    feature group whose buffer this one reuses."""

    def __init__(
        self, cap: int, nin: int, nb: int, k: int, off: int, like: torch.Tensor, share: Optional["_Block"] = None
    ):
        self.nin, self.nb, self.k, self.off = nin, nb, k, off
        self.C = off + nb
        self.R = self.C * nin  # row stride
        self.lead = k * nin
        self.dtype, self.device = like.dtype, like.device
        self._bufs = share._bufs if share is not None else _thread_buffers()
        size = self.lead + cap * self.R + (k + 1) * nin
        self.flat = self.scratch("flat", size)
        # flat position of slot 0 (basis m - k) of feature i in row b:
        # lead + b * R + (off + m - k) * in + i = base[b, i] + m * in
        key = ("base", cap, nin, nb, k, off, like.device)
        base = self._bufs.get(key)
        if base is None:
            with torch.inference_mode(False):  # kept across calls: never an inference tensor
                base = (
                    torch.arange(cap, device=like.device).mul_(self.R).add_(self.lead + (off - k) * nin).unsqueeze(1)
                    + torch.arange(nin, device=like.device)
                )
            stale = [kk for kk in list(self._bufs) if kk[0] in ("base", "base_f")]
            for old in stale[: max(0, len(stale) - 6)]:  # a few shapes per thread (groups of a call)
                self._bufs.pop(old, None)
            self._bufs[key] = base
        self.base = base
        # the same positions as floats (exact below 2^24) for the float span path
        self.base_f = None
        limit = {torch.float32: 1 << 24, torch.float64: 1 << 53}.get(like.dtype)
        if limit is not None and size + (k + 1) * nin < limit:
            fkey = ("base_f",) + key[1:] + (like.dtype,)
            base_f = self._bufs.get(fkey)
            if base_f is None:
                with torch.inference_mode(False):
                    base_f = self._bufs[fkey] = base.to(like.dtype)
            self.base_f = base_f
        r = torch.arange(k + 1, device=like.device).view(-1, 1)
        self.lo_bound = k - r  # slot r exists iff k - r <= m <= nb - 1 + k - r
        self.hi_bound = nb - 1 + k - r

    def rows(self, rows: int) -> torch.Tensor:
        """The first ``rows`` rows, (rows, C * in)."""
        return self.flat[self.lead : self.lead + rows * self.R].view(rows, self.R)

    def column(self, rows: int, c: int) -> torch.Tensor:
        """Column block c of the first ``rows`` rows, (rows, in) strided."""
        return self.rows(rows).view(rows, self.C, self.nin)[:, c, :]

    def scratch(self, name: str, n: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A 1-D work buffer of ``n`` elements from the thread's cache, grown to the
        largest size asked for: fresh allocations of this size cost page faults."""
        key = (name, dtype or self.dtype, self.device)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            self._bufs.pop(key, None)  # free the smaller one first
            with torch.inference_mode(False):  # kept across calls: a buffer made under inference
                # mode would refuse the in-place writes of a later ordinary call
                buf = self._bufs[key] = torch.empty(n, dtype=key[1], device=self.device)
        return buf[:n]


def _fill_block(blk: _Block, rows: int, xc, V, lin, invalid) -> torch.Tensor:
    """The chunk's dense block (rows, C * in): zero, write the k+1 values of every input
    at their positions (``scatter_`` on 1-D views is parallel on CPU, ``index_add_`` is
    not), then the SiLU column block from ``xc`` (rows, in) when the block has one."""
    D = blk.rows(rows)
    D.zero_()
    k, step = blk.k, blk.nin
    V = V.view(k + 1, -1)
    if invalid is not None:  # slots of missing bases carry 0 and may hit another slot's position
        V.masked_fill_(invalid, 0.0)
        for r in range(k + 1):
            blk.flat[r * step :].scatter_add_(0, lin, V[r])
    else:  # distinct positions inside the block
        for r in range(k + 1):
            blk.flat[r * step :].scatter_(0, lin, V[r])
    if blk.off:
        torch.ops.aten.silu.out(xc, out=blk.column(rows, 0))
    return D


def _chunk_bases(xc, g: _Grid, check, blk: _Block, need_val: bool, need_deriv: bool):
    """Steps 1-2 and the slot positions for one chunk of one feature group: ``(V, dV,
    f, lin, invalid)`` (see :func:`_spans`, :func:`_values` and :func:`_slot_index`;
    ``f`` None off uniform knots); ``check`` the call's ``(inside, interior)`` from
    :func:`_column_check`; on uniform knots dV lacks the 1/h factor."""
    inside, interior = check
    m, f = _spans(xc, g, inside, blk)
    V, dV = _values(xc, m, f, g, need_val, need_deriv, deriv_scaled=not g.uniform, blk=blk)
    lin, invalid = _slot_index(m, g, blk, xc.shape[0], interior)
    return V, dV, f, lin, invalid


def _uniform_grad_x(gx, gl, f, mat: torch.Tensor, blk: _Block) -> None:
    """gx (rows, fw) = sum_r gl[r] P_r(f) on uniform knots for the local polynomials
    ``P_r = sum_p mat[p, r] f^p`` (``mat`` (d+1, R): the bases' derivatives d/df, or the
    order-(k-1) bases of the derivative spline), without evaluating them:
    ``gx = sum_p f^p S_p`` with ``S = mat @ gl`` ((d+1, R) @ (R, E): one small-K GEMM),
    summed by Horner's rule. gl (R, E) the gathered grad_D (0 at missing bases; the
    1/h of d/dx already in the weight), f (rows, fw) the local coordinate."""
    if mat.shape[0] == 0:  # k = 0: piecewise constant
        gx.zero_()
        return
    E = gl.shape[1]
    d1 = mat.shape[0]
    S = torch.mm(mat, gl, out=blk.scratch("S", d1 * E).view(d1, E)).view((d1,) + tuple(gx.shape))
    _horner(list(S), f.view(gx.shape), gx)


def _group_weight(coef2, base_weight, scale, f0: int, f1: int, nb: int, blk: _Block, reduced: bool):
    """One feature group's K-slice of the weight in the block's basis-major layout:
    ``(Wg, bias)`` with ``Wg`` (out, K) = ``[base_weight | W_0 | ... | W_{nb-1}]``
    (columns of features f0..f1; ``W = coef2 * scale`` per (out, feature) when
    ``scale`` (out, in) is given; coef2 (out, in * nb) feature-major), written into
    ``blk``'s work buffer "W" (the scaled weight is never materialised whole).

    ``reduced`` (every input of the group interior, where the bases sum to 1):
    ``sum_j W_j B_j = sum_{j<L} (W_j - W_L) B_j + W_L`` with ``L = nb - 1``, so the
    last basis is dropped (K one column block shorter: (G+k)/(G+k+1) of the dense
    GEMM floor's work) and ``bias`` (out,) = ``sum_i W_L[:, i]`` is returned to be
    added to the output; else ``bias`` is None. Declined (``bias`` None, K whole) when the
    group's largest ``|W_L|`` exceeds :data:`CANCEL_RATIO` times the median over the other
    bases of their largest ``|W_j|``: ``W_j - W_L`` and ``+ W_L`` would then cancel to far
    more than the output's rounding."""
    nout, fw, off = coef2.shape[0], f1 - f0, blk.off
    C = off + nb
    Wp = blk.scratch("W", nout * C * fw).view(nout, C, fw)
    if off:
        Wp[:, 0, :].copy_(base_weight[:, f0:f1])
    w = coef2[:, f0 * nb : f1 * nb].view(nout, fw, nb)
    spl = Wp[:, off:, :].permute(0, 2, 1)  # (out, fw, nb) view of the basis-major blocks
    if scale is None:
        spl.copy_(w)
    else:
        torch.mul(w, scale[:, f0:f1, None], out=spl)
    bias = None
    K = C * fw
    if reduced and nb >= 2:  # declined where the subtraction would cancel (see CANCEL_RATIO)
        spl = Wp[:, off:, :]
        big = torch.maximum(spl.amax(dim=(0, 2)), spl.amin(dim=(0, 2)).neg())  # max |W_j| per basis
        reduced = float(big[-1]) <= CANCEL_RATIO * float(big[:-1].median())
    if reduced:
        last = Wp[:, C - 1 : C, :]
        bias = last.sum((1, 2))
        Wp[:, off : C - 1, :].sub_(last)
        K -= fw
    return Wp.view(nout, C * fw)[:, :K], bias


def _derivative_weight(coef2, base_weight, scale, f0: int, f1: int, nb: int, blk: _Block, inv_h) -> torch.Tensor:
    """The weight of ``grad_D`` when every input of the group is interior, on uniform knots:
    (out, (off + nb - 1) * fw) = ``[base_weight | D_1 | ... | D_{nb-1}]`` with
    ``D_j = (W_j - W_{j-1}) / h`` per feature: the coefficients of the spline's
    derivative on the order-(k-1) bases ``B_{j,k-1}`` (``s' = sum_j D_j B_{j,k-1}``, de Boor,
    *A Practical Guide to Splines*, ch. X, on uniform knots ``k / (t_{j+k} - t_j) = 1 / h``).
    On an interior span m only ``B_{j,k-1}``, ``j = m-k+1 .. m``, are non-zero, all with
    ``1 <= j <= nb - 1``: k values per input instead of the k+1 of the order-k bases,
    in the same K as the reduced forward weight (:func:`_group_weight`), and D_j in
    column block ``off + j - 1``, where the reduced block holds B_{j-1}: the input's slot r
    (basis ``m - k + r``) is the derivative spline's local basis r."""
    nout, fw, off = coef2.shape[0], f1 - f0, blk.off
    C = off + nb - 1
    Wp = blk.scratch("W", nout * C * fw).view(nout, C, fw)
    if off:
        Wp[:, 0, :].copy_(base_weight[:, f0:f1])
    w = coef2[:, f0 * nb : f1 * nb].view(nout, fw, nb)
    torch.sub(w[:, :, 1:], w[:, :, :-1], out=Wp[:, off:, :].permute(0, 2, 1))
    if scale is None:
        Wp[:, off:, :].mul_(inv_h)
    else:
        Wp[:, off:, :].mul_((scale[:, f0:f1] * inv_h)[:, None, :])
    return Wp.view(nout, C * fw)


def _block_kernels(x: torch.Tensor, g: _Grid):
    """The compiled block kernels (:mod:`kanfast.kernels.cpu_spline`) when they can run the
    chunks of x (N, in) on knots g: uniform knots, k >= 2 (the spans of k <= 1 are corrected
    against the stored knots, which the kernels do not do), float32 or float64 with unit
    feature stride, knots in x's dtype, and the kernels built (a C compiler; not disabled by
    ``KANFAST_CPU_KERNEL=0``), and nothing recording ops (``torch.jit.trace``, a
    ``TorchDispatchMode``/``TorchFunctionMode``: the kernels write through raw pointers,
    which such a recording would not see). Else None: the pure-torch ops, exact too."""
    if not (g.uniform and g.k >= 2) or g.t0.dtype != x.dtype or x.device.type != "cpu":
        return None
    if (
        torch._C._get_tracing_state() is not None
        or torch._C._len_torch_dispatch_stack()
        or torch._C._len_torch_function_stack()
    ):
        return None
    kern = cpu_spline.load()
    return kern if kern is not None and kern.supports(x, g.k) else None


def _kernel_fill(kern, blk: _Block, rows: int, xc: torch.Tensor, g: _Grid, C: int) -> torch.Tensor:
    """The chunk's dense block (rows, blk.C * in), its first C column blocks written by the
    fill kernel (SiLU block included when the block has one): steps 1-3 in one pass."""
    D = blk.rows(rows)
    kern.fill(xc, g.h, g.t0, g.tn, g.inv_h, g.n, g.k, g.polys[0], D, blk.off, C,
              blk.scratch("kf", (g.k + 3) * blk.nin))
    return D


def _chunks(N: int, step: int, stagger: bool):
    """``(start, rows)`` of the row chunks; ``stagger``: a half-size first chunk, so that
    two workers running side by side are half a chunk out of phase: one's memory-bound
    basis work then overlaps the other's GEMM instead of competing with its own."""
    s = 0
    if stagger and step > 1 and N > step:
        yield 0, step // 2
        s = step // 2
    while s < N:
        yield s, step
        s += step


def _forward(x, grid, coef2, base_weight, spline_order, uniform, scale=None, knots: Optional[_Knots] = None):
    """y (N, out) = D(x) @ W^T [+ silu(x) @ base_weight^T]. x (N, in); coef2 (out, in * nb)
    with W = coef2, or ``coef2 * scale`` per (out, feature) when ``scale`` (out, in) is
    given; base_weight (out, in) or None. ``knots``: the call's :class:`_Knots` of
    ``grid`` when the caller built them (built here otherwise). Large calls are split
    by rows across the CPU workers (:mod:`kanfast.cpu_workers`)."""
    # the caller's flag may be stale (a grid edited through .data, or a compiled graph
    # that baked it in): _Knots verifies it, so the closed form never runs on uneven knots
    kn = knots if knots is not None else _Knots(grid, spline_order, uniform)
    N, nin = x.shape
    nb = kn.nb
    y = torch.empty(N, coef2.shape[0], dtype=x.dtype, device=x.device)
    parts = cpu_workers.split(N, cpu_workers.worker_count(N * nin * (nb + 1), x, grid, coef2, base_weight, scale))
    whole = kn.part(0, nin)

    def rows(r0, r1):
        stagger = parts.index((r0, r1)) % 2 == 1
        _forward_rows(y[r0:r1], x[r0:r1], whole, coef2, base_weight, scale, stagger)

    cpu_workers.run(rows, parts)
    return y


def _forward_rows(y, x, knots: _Grid, coef2, base_weight, scale, stagger=False):
    """:func:`_forward` of the rows of x into y, K-split over feature groups, chunked over rows."""
    kern = _block_kernels(x, knots)
    plan = _Plan(x, knots, base_weight is not None, kern is not None)
    nb = plan.nb
    N = x.shape[0]
    bias = None
    for i, ((f0, f1), g, blk) in enumerate(zip(plan.groups, plan.grids, plan.blocks)):
        check = _column_check(x[:, f0:f1], g)  # once for all chunks
        wg, b = _group_weight(coef2, base_weight, scale, f0, f1, nb, blk, _reduced(check, nb))
        if b is not None:
            bias = b if bias is None else bias.add_(b)
        K = wg.shape[1]
        wt = wg.t()
        for s, size in _chunks(N, plan.step, stagger):
            xc = x[s : s + size, f0:f1]
            rows = xc.shape[0]
            if kern is not None:  # steps 1-3 fused, the block written row by row
                D = _kernel_fill(kern, blk, rows, xc, g, K // (f1 - f0))[:, :K]
            else:
                V, _, _, lin, invalid = _chunk_bases(xc, g, check, blk, True, False)
                D = _fill_block(blk, rows, xc, V, lin, invalid)[:, :K]
            if i == 0:
                torch.mm(D, wt, out=y[s : s + size])
            else:
                y[s : s + size].addmm_(D, wt)
    if bias is not None:
        y.add_(bias)


def _reduced(check, nb: int) -> bool:
    """Drop the last basis (partition of unity, :func:`_group_weight`): every input of
    the group on an interior span, and more than one basis."""
    return bool(check[1]) and nb >= 2


def _backward(
    grad_y, x, grid, coef2, base_weight, spline_order, uniform, need_x, need_c, need_b, scale=None, need_s=False,
    knots: Optional[_Knots] = None,
):
    """(grad_x, grad_coef2 (out, in*nb), grad_base (out, in), grad_scale (out, in)) of
    :func:`_forward`, each or None; ``knots`` as for :func:`_forward` (the eager autograd
    Function passes the forward's). Large calls are split by input features (disjoint
    gradient columns) across the CPU workers."""
    kn = knots if knots is not None else _Knots(grid, spline_order, uniform)
    N, nin = x.shape
    nb = kn.nb
    nout = coef2.shape[0]
    has_base = base_weight is not None
    need_b = need_b and has_base
    need_s = need_s and scale is not None
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None  # contiguous
    # gradient w.r.t. W, turned group by group into the gradient w.r.t. coef2 (times scale)
    grad_c = torch.empty(nout, nin * nb, dtype=coef2.dtype, device=coef2.device) if (need_c or need_s) else None
    grad_b = torch.empty(nout, nin, dtype=coef2.dtype, device=coef2.device) if need_b else None
    grad_s = torch.empty(nout, nin, dtype=coef2.dtype, device=coef2.device) if need_s else None
    grad_y = grad_y.contiguous()
    work = N * nin * (nb + 1)
    parts = cpu_workers.split(nin, cpu_workers.worker_count(work, grad_y, x, grid, coef2, base_weight, scale))

    def cols(f0, f1):
        def sl(t):
            return None if t is None else t[:, f0:f1]

        _backward_features(
            grad_y, x[:, f0:f1], kn.part(f0, f1), coef2[:, f0 * nb : f1 * nb], sl(base_weight), sl(scale),
            sl(grad_x), None if grad_c is None else grad_c[:, f0 * nb : f1 * nb], sl(grad_b), sl(grad_s),
            need_c, parts.index((f0, f1)) % 2 == 1,
        )

    cpu_workers.run(cols, parts)
    return grad_x, (grad_c if need_c else None), grad_b, grad_s


def _backward_features(
    grad_y, x, knots: _Grid, coef2, base_weight, scale, grad_x, grad_c, grad_b, grad_s, need_c, stagger=False
):
    """:func:`_backward` for a block of input features: x (N, f), knots their :class:`_Grid`, coef2
    (out, f * nb), base_weight and scale (out, f) or None; writes the gradients
    into the given views (None: not needed): grad_x (N, f), grad_c (out, f * nb),
    grad_b and grad_s (out, f).

    Per feature group, with the block layout of :class:`_Block` and the weight of
    :func:`_group_weight` (reduced or not, decided for this group's inputs alone):
    ``gW = grad_y^T @ D`` (the gradient w.r.t. ``[base_weight | W]`` in basis-major
    layout; when reduced, the last basis's column is ``sum_b grad_y - sum_{j<L} gW_j``,
    as its basis is ``1 - sum_{j<L} B_j``), then ``grad_D = grad_y @ Wg`` into the
    same block, of which the SiLU column block gives the base branch's share of
    grad_x and the slots of every input the spline's: k+1 against the bases'
    derivatives, or, for a reduced group on uniform knots, k against the derivative
    spline's coefficients (:func:`_derivative_weight`)."""
    kern = _block_kernels(x, knots)
    plan = _Plan(x, knots, base_weight is not None, kern is not None)
    k, nb, off = plan.k, plan.nb, plan.off
    N = x.shape[0]
    nout = coef2.shape[0]
    need_x = grad_x is not None
    need_spl = grad_c is not None  # (also for grad_s alone)
    need_w = need_spl or grad_b is not None
    if not (need_x or need_w):
        return
    colsum = None
    for (f0, f1), g, blk in zip(plan.groups, plan.grids, plan.blocks):
        fw = f1 - f0
        C = off + nb
        check = _column_check(x[:, f0:f1], g)
        reduced = _reduced(check, nb)
        Kx = (C - reduced) * fw  # columns of grad_D (and of the weight)
        Kw = Kx if need_spl else off * fw  # columns of gW
        # grad_x through the derivative spline (k values per input), or the bases' derivatives
        deriv = reduced and g.uniform and k >= 1
        nslot = k if deriv else k + 1
        wg = None
        if need_x and deriv:
            wg = _derivative_weight(coef2, base_weight, scale, f0, f1, nb, blk, g.inv_h)
        elif need_x:
            wg = _group_weight(coef2, base_weight, scale, f0, f1, nb, blk, reduced)[0]
            Kx = wg.shape[1]  # (the weight may have declined the reduction)
            if g.uniform:  # d/dx = (1/h) d/df: folded into the spline columns of the weight
                wg.view(nout, -1, fw)[:, off:, :].mul_(g.inv_h)
        gW = blk.scratch("gW", nout * C * fw).view(nout, C * fw) if need_w else None
        first = True
        for s, size in _chunks(N, plan.step, stagger):  # one block in flight: the bases, then grad_D
            xc = x[s : s + size, f0:f1]
            gy = grad_y[s : s + size]
            rows = xc.shape[0]
            if kern is None:  # (the kernels compute the spans and bases themselves)
                V, dV, f, lin, invalid = _chunk_bases(xc, g, check, blk, need_w, need_x and not g.uniform)
            if need_w:
                if kern is not None:
                    D = _kernel_fill(kern, blk, rows, xc, g, Kw // fw)[:, :Kw]
                else:
                    D = _fill_block(blk, rows, xc, V, lin, invalid)[:, :Kw]
                if first:
                    torch.mm(gy.t(), D, out=gW[:, :Kw])
                else:
                    gW[:, :Kw].addmm_(gy.t(), D)
                first = False
            if not need_x:
                continue
            gD = blk.rows(rows)
            torch.mm(gy, wg, out=gD[:, :Kx])
            if kern is not None:  # grad_x from grad_D in one pass (silu' included)
                poly = g.polys[1] if deriv else g.polys[2]  # Q_r: derivative-spline bases, or d/df
                kern.grad_x(xc, g.h, g.t0, g.tn, g.inv_h, g.n, k, poly, gD, off, Kx // fw, grad_x[s : s + size, f0:f1],
                            blk.scratch("kf", (k + 3) * fw))
                continue
            if Kx < C * fw and not deriv:  # the dropped basis's slots read 0
                blk.column(rows, C - 1).zero_()
            E = lin.numel()
            gl = blk.scratch("V", nslot * E).view(nslot, E)
            for r in range(nslot):
                torch.index_select(blk.flat[r * fw :], 0, lin, out=gl[r])
            if invalid is not None:  # reads at missing bases may be any value
                gl.masked_fill_(invalid, 0.0)
            gx = grad_x[s : s + size, f0:f1]
            if off:  # the base branch: silu'(x) * (grad_y @ base_weight), then the spline's added
                torch.ops.aten.silu_backward.grad_input(blk.column(rows, 0), xc, grad_input=gx)
                gxs = blk.scratch("linf", rows * fw).view(rows, fw)
            else:
                gxs = gx
            if g.uniform:
                _uniform_grad_x(gxs, gl, f, g.lmat if deriv else g.dmat, blk)
            else:
                dV = dV.view(k + 1, rows, fw)
                gl = gl.view(k + 1, rows, fw)
                if invalid is not None:  # their derivatives may be 0/0 (an outside input evaluated
                    dV.masked_fill_(invalid.view(k + 1, rows, fw), 0.0)  # on a zero-length end span)
                torch.mul(gl[0], dV[0], out=gxs)
                for r in range(1, k + 1):
                    gxs.addcmul_(gl[r], dV[r])
            if off:
                gx.add_(gxs)
        if not need_w:
            continue
        if first:  # no rows
            gW.zero_()
        gWv = gW.view(nout, C, fw)
        if grad_b is not None:
            grad_b[:, f0:f1].copy_(gWv[:, 0, :])
        if not need_spl:
            continue
        if reduced:
            if colsum is None:
                colsum = grad_y.sum(0)
            last = gWv[:, C - 1, :]
            torch.sub(colsum[:, None], gWv[:, off : C - 1, :].sum(1), out=last)
            if N:  # B_L is 0 on every row of a feature whose inputs all lie at or below its first
                # knot t_L (below it for k = 0): its exact gradient sum_b grad_y * 0 (0, or NaN
                # after a non-finite grad_y), where the difference above leaves rounding noise
                # (Adam, scale-free, would move that weight no input reaches)
                xmax, t_last = x[:, f0:f1].amax(0), g.grid[:, nb - 1]
                untouched = xmax <= t_last if k >= 1 else xmax < t_last
                if bool(untouched.any()):
                    last.copy_(torch.where(untouched, colsum[:, None] * 0, last))
        gsp = gWv[:, off:, :].permute(0, 2, 1)  # (out, fw, nb): the gradient w.r.t. W
        gc = grad_c[:, f0 * nb : f1 * nb].view(nout, fw, nb)
        if scale is None:
            gc.copy_(gsp)
            continue
        if grad_s is not None:  # chain rule through W = coef2 * scale
            prod = blk.scratch("W", nout * fw * nb).view(nout, fw, nb)  # (the weight is done with)
            torch.mul(gsp, coef2[:, f0 * nb : f1 * nb].view(nout, fw, nb), out=prod)
            torch.sum(prod, -1, out=grad_s[:, f0:f1])
        if need_c:
            torch.mul(gsp, scale[:, f0:f1, None], out=gc)


def kan_linear_torch(
    x: torch.Tensor,
    grid: torch.Tensor,
    coef: torch.Tensor,
    base_weight: Optional[torch.Tensor],
    spline_order: int,
    uniform: Optional[bool] = None,
) -> torch.Tensor:
    """KAN layer on 2-D input with the fast torch backend.

    Args:
        x: ``(N, in_features)``.
        grid: ``(in_features, G + 2k + 1)`` knots (no gradient).
        coef: ``(out_features, in_features, G + k)`` scaled spline coefficients.
        base_weight: ``(out_features, in_features)`` for the fused SiLU base branch,
            or ``None`` to compute the spline term only.
        spline_order: ``k``.
        uniform: knots equally spaced (detected when None).

    Returns:
        ``(N, out_features)`` in x's dtype; differentiable w.r.t. x, coef, base_weight
        (twice too: ``create_graph=True`` backward goes through a differentiable
        formulation, as for the layer).

    Raises:
        ValueError: x not 2-D, coef not 3-D, their in_features differ, or grid is not
            ``(in_features, G + 2k + 1)`` for coef's ``G + k``.
    """
    from .ops import _EagerTorchKAN  # (ops builds on this module)

    if x.dim() != 2 or coef.dim() != 3 or x.shape[1] != coef.shape[1]:
        raise ValueError(
            f"kan_linear_torch: expected x (N, in_features) and coef (out_features, in_features, G + k), "
            f"got x {tuple(x.shape)} and coef {tuple(coef.shape)} (flatten leading dimensions of x first, "
            f"or use FastKANLayer, which takes (..., in_features))"
        )
    k = int(spline_order)
    if grid.dim() != 2 or grid.shape[0] != x.shape[1] or grid.shape[1] != coef.shape[2] + k + 1:
        raise ValueError(
            f"kan_linear_torch: grid must be (in_features, G + 2k + 1) = ({x.shape[1]}, {coef.shape[2] + k + 1}) "
            f"for coef {tuple(coef.shape)} and spline_order {k}, got {tuple(grid.shape)}"
        )
    grid = grid.to(x.dtype)
    if uniform is None:
        uniform = grid_is_uniform(grid)
    return _EagerTorchKAN.apply(x, grid, coef, base_weight, int(spline_order), bool(uniform), None)
