"""The dense-block engine's element-wise work in torch ops (:mod:`kanfast.torch_backend`,
steps 1-3 of its algorithm): every input's span on its knots (:func:`_spans`: the closed
form on uniform knots, ``searchsorted`` otherwise), its ``k + 1`` non-zero bases and their
derivatives (:func:`_values`: the cardinal pieces by Horner's rule on uniform knots, de
Boor's triangle otherwise), their slots in the dense block (:func:`_slot_index`), the block
fill (:func:`fill_block`), and backward's contraction of the gathered ``grad_D`` on uniform
knots (:func:`uniform_grad_x`).

This is the path of every chunk the compiled kernels (:mod:`kanfast.cpu_dispatch`) cannot
run (non-uniform knots, k <= 1, other dtypes, recording modes, no C compiler): same results
to rounding. :func:`local_bases` and :func:`dense_block` give the same bases to other callers
(:func:`kanfast.ops.basis_matrix`: the dense basis of least-squares fits).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .cpu_knots import Grid, Knots, closed_form_span
from .cpu_plan import Block

__all__ = ["local_bases", "dense_block", "fill_block", "chunk_bases", "uniform_grad_x"]


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


def _spans(
    x: torch.Tensor, g: Grid, all_inside: Optional[bool] = None, blk: Optional[Block] = None
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Span index ``m`` (rows, in), ``n - 1`` for inputs outside the knots (int64; on the
    uniform ``k >= 2`` path integer-valued floats of x's dtype), and (uniform knots) the local
    coordinate ``f = (x - t_m) / h`` in [0, 1] up to rounding (0 outside). ``all_inside``: the
    caller knows every input is inside. ``blk``: take the outputs' memory from its scratch
    buffers.

    Uniform knots, k >= 2: :func:`kanfast.cpu_knots.closed_form_span` (spans and ``t_m`` on the computed knots
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
        m = closed_form_span(xs, g, blk)
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


def _correct_span(x, m, g: Grid, inside):
    """Move ``m`` by one where rounding put ``x`` on the wrong side of a stored knot."""
    n = g.n
    base = g.row_base
    t_m = g.flat[base + m]
    m = torch.where(x < t_m, m - 1, m).clamp_(0, n - 2)
    t_m1 = g.flat[base + m + 1]
    m = torch.where(x >= t_m1, m + 1, m).clamp_(0, n - 2)
    return m


def _values(x, m, f, g: Grid, need_val: bool, need_deriv: bool, deriv_scaled: bool = True, blk=None):
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
    m: torch.Tensor, g: Grid, blk: Block, rows: int, interior: bool = False
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Flat position in ``blk.flat`` of the first of the k+1 values of every input.

    Returns ``(lin, invalid)``: ``lin`` (rows*in,) int64, slot r of an input at
    ``lin + r * in`` (read/written through ``blk.flat[r * in:]``; see :class:`kanfast.cpu_plan.Block`).
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
    g = Knots(grid, k, uniform, verify=False).part(0, grid.shape[0])
    m, f = _spans(x, g)
    V, dV = _values(x, m, f, g, True, need_deriv)
    outside = (m == g.n - 1).unsqueeze(-1)
    vals = V.permute(1, 2, 0).masked_fill(outside, 0.0)
    dvals = dV.permute(1, 2, 0).masked_fill(outside, 0.0) if need_deriv else None
    return m.long().clamp(max=g.n - 2) - k, vals, dvals


def dense_block(x, grid, k, n_basis, uniform, has_base, need_deriv):
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


def fill_block(blk: Block, rows: int, xc, V, lin, invalid) -> torch.Tensor:
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


def chunk_bases(xc, g: Grid, check, blk: Block, need_val: bool, need_deriv: bool):
    """Steps 1-2 and the slot positions for one chunk of one feature group: ``(V, dV,
    f, lin, invalid)`` (see :func:`_spans`, :func:`_values` and :func:`_slot_index`;
    ``f`` None off uniform knots); ``check`` the call's ``(inside, interior)`` from
    :func:`kanfast.cpu_knots.column_check`; on uniform knots dV lacks the 1/h factor."""
    inside, interior = check
    m, f = _spans(xc, g, inside, blk)
    V, dV = _values(xc, m, f, g, need_val, need_deriv, deriv_scaled=not g.uniform, blk=blk)
    lin, invalid = _slot_index(m, g, blk, xc.shape[0], interior)
    return V, dV, f, lin, invalid


def uniform_grad_x(gx, gl, f, mat: torch.Tensor, blk: Block) -> None:
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
