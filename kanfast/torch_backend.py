"""Fast torch KAN backend: the CPU engine (torch ops and MKL GEMMs, plus two small
compiled C kernels for the element-wise work where a C compiler is available).

Algorithm (forward, per group of input features, a K-slice of the GEMM of at
most ``BLOCK_WIDTH`` columns so that the dense block stays the same size whatever
G, and within it per chunk of rows; only ``x`` is saved for backward):

  1. interval ("span") index ``m`` of every input on its knots, ``t_m <= x < t_{m+1}`` on
     the stored knots. Uniform knots (:func:`kanfast.knots.grid_is_uniform`: every stored knot within
     :data:`kanfast.knots.UNIFORM_TOL` eps h of equal spacing): the closed form ``floor((x - t_0) / h)``,
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
     ``in`` features (:class:`kanfast.cpu_plan.Block`); one GEMM against the weight in the same
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
the derivative spline's coefficients instead (:func:`kanfast.cpu_plan.derivative_weight`:
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
shrink (:data:`kanfast.cpu_plan.KERNEL_CHUNK_ELEMENTS`) so that the block stays in cache for its GEMM. The
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
Each thread keeps its work buffers between calls (:mod:`kanfast.cpu_buffers`, :func:`release_buffers`).

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
routed by the autograd formula of :mod:`kanfast.differentiable` (shared with the other
engines' autograd Functions and custom ops) through a differentiable formulation.

Layout (each module imports only those listed before it, :mod:`kanfast.knots` and
``kanfast.kernels``): :mod:`kanfast.cpu_buffers` (per-thread work buffers),
:mod:`kanfast.cpu_knots` (per-call knot constants, inside/interior checks),
:mod:`kanfast.cpu_plan` (sizes, feature groups, chunks, the dense block and each group's
weight), :mod:`kanfast.cpu_bases` (spans, bases and block fill in torch ops),
:mod:`kanfast.cpu_dispatch` (the compiled kernels' dispatch) and, here, the forward and
backward drivers, the eager autograd Function (:class:`EagerTorchKAN`, on the autograd formula
of :mod:`kanfast.differentiable`) and the public entry :func:`kan_linear_torch`.
The names in ``__all__`` that are defined in those modules are this engine's public
settings, re-exported here (set them on their own module to change the engine's behaviour).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import cpu_workers
from .cpu_bases import chunk_bases, fill_block, local_bases, uniform_grad_x
from .cpu_buffers import release_buffers
from .cpu_dispatch import block_kernels, kernel_fill
from .cpu_knots import Grid, Knots, column_check
from .cpu_plan import (
    BLOCK_WIDTH,
    CANCEL_RATIO,
    CHUNK_ELEMENTS,
    KERNEL_BLOCK_WIDTH,
    KERNEL_CHUNK_ELEMENTS,
    ROW_ELEMENTS,
    Plan,
    chunks,
    derivative_weight,
    group_weight,
    reducible,
)
from .differentiable import make_backward, setup_context
from .knots import UNIFORM_TOL, grid_is_uniform

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
    "forward",
    "backward",
    "eager_backward",
    "EagerTorchKAN",
]


def _forward(x, grid, coef2, base_weight, spline_order, uniform, scale=None, knots: Optional[Knots] = None):
    """y (N, out) = D(x) @ W^T [+ silu(x) @ base_weight^T]. x (N, in); coef2 (out, in * nb)
    with W = coef2, or ``coef2 * scale`` per (out, feature) when ``scale`` (out, in) is
    given; base_weight (out, in) or None. ``knots``: the call's :class:`Knots` of
    ``grid`` when the caller built them (built here otherwise). Large calls are split
    by rows across the CPU workers (:mod:`kanfast.cpu_workers`)."""
    # the caller's flag may be stale (a grid edited through .data, or a compiled graph
    # that baked it in): Knots verifies it, so the closed form never runs on uneven knots
    kn = knots if knots is not None else Knots(grid, spline_order, uniform)
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


def _forward_rows(y, x, knots: Grid, coef2, base_weight, scale, stagger=False):
    """:func:`_forward` of the rows of x into y, K-split over feature groups, chunked over rows."""
    kern = block_kernels(x, knots)
    plan = Plan(x, knots, base_weight is not None, kern is not None)
    nb = plan.nb
    N = x.shape[0]
    bias = None
    for i, ((f0, f1), g, blk) in enumerate(zip(plan.groups, plan.grids, plan.blocks)):
        check = column_check(x[:, f0:f1], g)  # once for all chunks
        wg, b = group_weight(coef2, base_weight, scale, f0, f1, nb, blk, reducible(check, nb))
        if b is not None:
            bias = b if bias is None else bias.add_(b)
        K = wg.shape[1]
        wt = wg.t()
        for s, size in chunks(N, plan.step, stagger):
            xc = x[s : s + size, f0:f1]
            rows = xc.shape[0]
            if kern is not None:  # steps 1-3 fused, the block written row by row
                D = kernel_fill(kern, blk, rows, xc, g, K // (f1 - f0))[:, :K]
            else:
                V, _, _, lin, invalid = chunk_bases(xc, g, check, blk, True, False)
                D = fill_block(blk, rows, xc, V, lin, invalid)[:, :K]
            if i == 0:
                torch.mm(D, wt, out=y[s : s + size])
            else:
                y[s : s + size].addmm_(D, wt)
    if bias is not None:
        y.add_(bias)


def _backward(
    grad_y, x, grid, coef2, base_weight, spline_order, uniform, need_x, need_c, need_b, scale=None, need_s=False,
    knots: Optional[Knots] = None,
):
    """(grad_x, grad_coef2 (out, in*nb), grad_base (out, in), grad_scale (out, in)) of
    :func:`_forward`, each or None; ``knots`` as for :func:`_forward` (the eager autograd
    Function passes the forward's). Large calls are split by input features (disjoint
    gradient columns) across the CPU workers."""
    kn = knots if knots is not None else Knots(grid, spline_order, uniform)
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
    grad_y, x, knots: Grid, coef2, base_weight, scale, grad_x, grad_c, grad_b, grad_s, need_c, stagger=False
):
    """:func:`_backward` for a block of input features: x (N, f), knots their :class:`Grid`, coef2
    (out, f * nb), base_weight and scale (out, f) or None; writes the gradients
    into the given views (None: not needed): grad_x (N, f), grad_c (out, f * nb),
    grad_b and grad_s (out, f).

    Per feature group, with the block layout of :class:`Block` and the weight of
    :func:`group_weight` (reduced or not, decided for this group's inputs alone):
    ``gW = grad_y^T @ D`` (the gradient w.r.t. ``[base_weight | W]`` in basis-major
    layout; when reduced, the last basis's column is ``sum_b grad_y - sum_{j<L} gW_j``,
    as its basis is ``1 - sum_{j<L} B_j``), then ``grad_D = grad_y @ Wg`` into the
    same block, of which the SiLU column block gives the base branch's share of
    grad_x and the slots of every input the spline's: k+1 against the bases'
    derivatives, or, for a reduced group on uniform knots, k against the derivative
    spline's coefficients (:func:`derivative_weight`)."""
    kern = block_kernels(x, knots)
    plan = Plan(x, knots, base_weight is not None, kern is not None)
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
        check = column_check(x[:, f0:f1], g)
        reduced = reducible(check, nb)
        Kx = (C - reduced) * fw  # columns of grad_D (and of the weight)
        Kw = Kx if need_spl else off * fw  # columns of gW
        # grad_x through the derivative spline (k values per input), or the bases' derivatives
        deriv = reduced and g.uniform and k >= 1
        nslot = k if deriv else k + 1
        wg = None
        if need_x and deriv:
            wg = derivative_weight(coef2, base_weight, scale, f0, f1, nb, blk, g.inv_h)
        elif need_x:
            wg = group_weight(coef2, base_weight, scale, f0, f1, nb, blk, reduced)[0]
            Kx = wg.shape[1]  # (the weight may have declined the reduction)
            if g.uniform:  # d/dx = (1/h) d/df: folded into the spline columns of the weight
                wg.view(nout, -1, fw)[:, off:, :].mul_(g.inv_h)
        gW = blk.scratch("gW", nout * C * fw).view(nout, C * fw) if need_w else None
        first = True
        for s, size in chunks(N, plan.step, stagger):  # one block in flight: the bases, then grad_D
            xc = x[s : s + size, f0:f1]
            gy = grad_y[s : s + size]
            rows = xc.shape[0]
            if kern is None:  # (the kernels compute the spans and bases themselves)
                V, dV, f, lin, invalid = chunk_bases(xc, g, check, blk, need_w, need_x and not g.uniform)
            if need_w:
                if kern is not None:
                    D = kernel_fill(kern, blk, rows, xc, g, Kw // fw)[:, :Kw]
                else:
                    D = fill_block(blk, rows, xc, V, lin, invalid)[:, :Kw]
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
                uniform_grad_x(gxs, gl, f, g.lmat if deriv else g.dmat, blk)
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


def forward(x, grid, coef, base_weight, k, uniform, scale=None, knots=None):
    """:func:`_forward` for coef ``(out, in, G + k)``: y (N, out)."""
    nout, nin, nb = coef.shape
    base = None if base_weight is None else base_weight.contiguous()
    sc = None if scale is None else scale.contiguous()
    return _forward(x, grid, coef.reshape(nout, nin * nb).contiguous(), base, k, uniform, sc, knots)


def backward(
    grad_y, x, grid, coef, base_weight, k, uniform, need_x, need_c, need_b, scale=None, need_s=False, knots=None
):
    """:func:`_backward` for coef ``(out, in, G + k)``: (grad_x, grad_coef, grad_base, grad_scale),
    None where not needed."""
    nout, nin, nb = coef.shape
    base = None if base_weight is None else base_weight.contiguous()
    sc = None if scale is None else scale.contiguous()
    gx, gc, gb, gs = _backward(
        grad_y, x, grid, coef.reshape(nout, nin * nb).contiguous(), base, k, uniform, need_x, need_c, need_b, sc,
        need_s, knots,
    )
    return gx, (gc.view(nout, nin, nb) if gc is not None else None), (gb if need_b else None), gs


def eager_backward(
    grad_y, x, grid, coef, base_weight, k, uniform, need_x, need_c, need_b, scale=None, need_s=False, knots=None
):
    """:func:`backward` on contiguous grad_y, x and grid: the autograd Functions' fast backward."""
    return backward(
        grad_y.contiguous(), x.contiguous(), grid.contiguous(), coef, base_weight, k, uniform, need_x, need_c, need_b,
        scale, need_s, knots,
    )


class EagerTorchKAN(torch.autograd.Function):
    """Eager twin of ``kanfast::kan_fwd``: the same forward and autograd formula
    without the custom-op dispatcher, whose first call imports torch._dynamo
    (about a second) and which costs tens of microseconds per call."""

    @staticmethod
    def forward(ctx, x, grid, coef, base_weight, spline_order, uniform, scale):
        setup_context(ctx, (x, grid, coef, base_weight, spline_order, uniform, scale), None)
        grid = grid.contiguous()
        # the knots' per-call constants (uniformity verified), shared with the backward
        ctx.knots = Knots(grid, spline_order, uniform)
        return forward(x.contiguous(), grid, coef, base_weight, spline_order, uniform, scale, ctx.knots)

    backward = staticmethod(make_backward(eager_backward))


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
    return EagerTorchKAN.apply(x, grid, coef, base_weight, int(spline_order), bool(uniform), None)
