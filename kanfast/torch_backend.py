"""Fast pure-torch KAN backend: the CPU engine.

Algorithm (forward, per group of input features, a K-slice of the GEMM of at
most ``BLOCK_WIDTH`` columns so that the dense block stays the same size whatever
G, and within it per chunk of rows; only ``x`` is saved for backward):

  1. interval ("span") index ``m`` of every input on its knots. Uniform knots:
     closed form ``floor((x - t_0) / h)`` (for ``k <= 1``, whose values or
     slopes jump at knots, corrected against the stored knots so that an input
     sitting exactly on a knot takes the same span as the reference); other
     knots: ``searchsorted``. Inputs outside ``[t_0, t_last)`` (and NaN/inf)
     get the sentinel span ``n - 1`` and contribute exactly 0 to the spline term;
  2. the ``k + 1`` non-zero bases ``B_{m-k..m}``. Uniform knots: the pieces of
     the cardinal B-spline are fixed polynomials of the local coordinate
     ``f = (x - t_m) / h`` (coefficients computed exactly, in rationals, once per
     ``k``), evaluated for all k+1 bases at once (one broadcast op per power of
     ``f``) with no knot gathers. Other knots: de Boor's triangular scheme
     (NURBS Book, alg. A2.2) on gathered knots;
  3. those values are written (``scatter_`` through 1-D views of one flat
     buffer shifted by the slot number: parallel on CPU, unlike ``index_add_``)
     into a zeroed dense ``(chunk, in * (G + k))`` block reused across chunks;
     one GEMM against ``W.reshape(out, in*(G+k))`` plus one small GEMM
     ``silu(x) @ base_weight^T`` give ``y``: together exactly the dense-GEMM floor
     ``batch x in*(G+k+1) x out``. Chunks whose inputs all sit on interior spans
     (the common case) write distinct positions and need no masking; otherwise
     the slots of bases that do not exist (extension spans, the sentinel span)
     carry the value 0 and are accumulated (``scatter_add_``) unclamped: they land
     on a neighbouring feature's position or in the buffer's slack, adding 0.

Backward recomputes steps 1-3 per chunk and issues the two remaining GEMMs:
``grad_W += grad_y^T @ D`` (accumulated chunk by chunk in a fixed order:
deterministic), then ``grad_D = grad_y @ W`` into the same block, of which only
the ``k + 1`` entries at the non-zero bases are gathered (``index_select``;
reads at missing bases masked to 0) and contracted with the basis derivatives

    dB_{j,k}/dx = k * (B_{j,k-1} / (t_{j+k} - t_j) - B_{j+1,k-1} / (t_{j+k+1} - t_{j+1})).

Why no sparse path: on CPU an index op (gather/scatter) costs ~1-3 ns per element
against ~0.1 ns for a contiguous element-wise op and ~0.01 ns per multiply-add
inside a GEMM, so contracting only the ``k + 1`` non-zero bases by gathers of
``W`` is slower than the dense GEMM at every grid size measured (G = 5..50,
``benchmarks/results``). The dense block is kept, but built cheaply.

Memory bound: nothing of size (batch, in, G + k) lives between forward and
backward (saved: ``x``, the knots and the coefficients; given a ``scale``, as
for ``spline_weight * spline_scaler``, the scaled ``W`` is formed one feature
group at a time and never whole, and ``grad_W`` becomes the coefficients'
gradient in place). The transient memory is one dense block of at most
``CHUNK_ELEMENTS`` elements (the bases of one feature group, then its
``grad_D`` in backward), about ``4k + 10`` work
buffers of at most ``rows_per_chunk * in <= ROW_ELEMENTS`` elements allocated
once per call and reused by every chunk and group (fresh allocations per chunk
cost page faults), and the weight gradient; i.e. at most
``CHUNK_ELEMENTS + (4k + 10) * ROW_ELEMENTS`` elements (19 MiB in float32 at the
defaults, k = 3), one feature group's scaled weight, and the weight gradient,
whatever the batch size and G. Measured fwd+bwd peak beyond parameters,
gradients, input and output at batch 4096, in = out = 256: see
``benchmarks/results`` (flat in G).

Double backward is supported by autograd only through the reference/einsum
formulation; this Function's backward is not itself differentiable
(``once_differentiable``).
"""

from __future__ import annotations

import functools
from fractions import Fraction
from math import comb, factorial
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "kan_linear_torch",
    "forward_2d",
    "backward_2d",
    "grid_is_uniform",
    "local_bases",
    "CHUNK_ELEMENTS",
    "BLOCK_WIDTH",
    "ROW_ELEMENTS",
]

#: Largest dense basis block (elements) materialised at once: at most
#: ``rows_per_chunk * BLOCK_WIDTH`` with the default ROW_ELEMENTS at in = 256.
CHUNK_ELEMENTS = 1 << 21
#: Widest K of one GEMM: the input features are split into groups of at most
#: BLOCK_WIDTH / (G + k) features, each a K-slice of the dense GEMM. The block
#: then no longer grows with G (memory flat in G) while the rows per chunk, the
#: GEMM's M, stay large (a block capped by shrinking M instead made G=50 1.4x
#: slower at 151 rows than at 303).
BLOCK_WIDTH = 4096
#: Target number of (row, feature) elements per chunk. Measured on a quiet 2-core
#: AMD EPYC (batch 4096, in=out=256, fwd+bwd engine / dense floor, median of 7):
#: G=5: 2**15: 1.44, 2**16: 1.30, 2**17: 1.29, 2**18: 1.35, 2**19: 1.68;
#: G=20: 1.18, 1.10, 1.10, 1.12, 1.12 (fewer fork-joins vs cache-resident work).
ROW_ELEMENTS = 1 << 17


def grid_is_uniform(grid: torch.Tensor) -> bool:
    """True when every row of ``grid`` (in, n_knots) is equally spaced to rounding."""
    if grid.shape[-1] < 2:
        return False
    d = grid[:, 1:] - grid[:, :-1]
    h = (grid[:, -1:] - grid[:, :1]) / (grid.shape[-1] - 1)
    tol = 16 * torch.finfo(grid.dtype).eps * grid.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
    return bool(((d - h).abs() <= tol).all()) and bool((h > 0).all())


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


def _poly_cols(powers: List[torch.Tensor], cols: List[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """out (k+1, E) = sum_p cols[p] (k+1, 1) * powers[p] (1, E), ``powers[p] = f^p`` (p >= 1):
    the k+1 local polynomials in one op per power."""
    d = len(cols) - 1
    if d == 0:
        return out.copy_(cols[0].expand_as(out))
    torch.mul(cols[d], powers[d], out=out)
    for p in range(d - 1, 0, -1):
        out.addcmul_(cols[p], powers[p])
    return out.add_(cols[0])


class _Grid:
    """Per-call constants of the knot vectors (built once per forward/backward)."""

    def __init__(self, grid: torch.Tensor, k: int, uniform: bool):
        self.k = k
        self.n = grid.shape[1]
        self.nb = self.n - k - 1
        self.uniform = uniform
        self.grid = grid
        self.t0 = grid[:, 0].contiguous()
        self.tn = grid[:, -1].contiguous()
        self.flat = grid.contiguous().reshape(-1)
        self.row_base = torch.arange(grid.shape[0], device=grid.device) * self.n
        if uniform:
            h = (self.tn - self.t0) / (self.n - 1)
            self.inv_h = 1.0 / h
            pieces = _cardinal_pieces(k)
            # column p: coefficient of f^p in each of the k+1 local bases, (k+1, 1) for
            # broadcasting over a (k+1, rows*in) block (one op per power, not per basis)
            self.cols = [grid.new_tensor([c[p] for c in pieces]).view(-1, 1) for p in range(k + 1)]
            self.dcols = [grid.new_tensor([(p + 1) * c[p + 1] for c in pieces]).view(-1, 1) for p in range(k)]
        else:
            self.padded = _pad_knots(grid, k).contiguous()
            self.pflat = self.padded.reshape(-1)
            self.prow_base = torch.arange(grid.shape[0], device=grid.device) * self.padded.shape[1]


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


def _all_inside(x: torch.Tensor, g: _Grid) -> bool:
    """Every row of x (N, in) inside its feature's knots [t_0, t_last) (False for NaN)."""
    if x.shape[0] == 0:
        return True
    xmin, xmax = x.amin(0), x.amax(0)  # (aminmax(dim=0) is 20x slower on CPU)
    return bool((xmin >= g.t0).all()) and bool((xmax < g.tn).all())


def _spans(
    x: torch.Tensor, g: _Grid, all_inside: Optional[bool] = None, blk: Optional["_Block"] = None
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Span index ``m`` (rows, in), ``n - 1`` for inputs outside the knots, and
    (uniform knots) the local coordinate ``f`` in [0, 1] up to rounding.

    ``m`` is int64, except on the uniform ``k >= 2`` path where it is the float
    ``floor`` (exact small integers), which saves int64 passes. ``blk``: take the
    outputs' memory from its scratch buffers."""
    n = g.n
    if g.uniform and g.k >= 2:
        if blk is not None:
            u = torch.sub(x, g.t0, out=blk.scratch("u", x.numel()).view(x.shape)).mul_(g.inv_h)
            mf = blk.scratch("mf", x.numel()).view(x.shape)
        else:
            u = (x - g.t0).mul_(g.inv_h)
            mf = torch.empty_like(u)
        if not (all_inside if all_inside is not None else _all_inside(x, g)):
            outside = torch.lt(x, g.tn).logical_not_().logical_or_(x < g.t0)
            u.masked_fill_(outside, float(n - 1))
        # an inside input whose u rounds up to n - 1 lands on the sentinel span: its
        # bases there are 0 up to rounding. Values and first derivatives are
        # continuous for k >= 2, so a span off by one for an input within rounding
        # of a knot changes nothing beyond rounding either.
        torch.floor(u, out=mf)
        return mf, u.sub_(mf)
    outside = torch.lt(x, g.tn).logical_not_().logical_or_(x < g.t0)  # NaN -> outside
    if g.uniform:
        u = (x - g.t0).mul_(g.inv_h).masked_fill_(outside, float(n - 1))
        m = torch.floor(u).clamp_(max=n - 2).long()
        inside = outside.logical_not_()
        m = _correct_span(x, m, g, inside)
        t_m = g.flat[g.row_base + m]
        f = (x - t_m).mul_(g.inv_h)
        return m.masked_fill_(~inside, n - 1), f
    m = torch.searchsorted(g.grid, x.t().contiguous(), right=True).t() - 1
    m = m.clamp_(0, n - 2).masked_fill_(outside, n - 1)
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
    """Non-zero bases (k+1, rows, in) of every input on its span, and d/dx
    (for uniform knots without the 1/h factor when ``deriv_scaled`` is False).
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
        powers = [None, fv]
        for p in range(2, k + 1):
            o = blk.scratch(f"f^{p}", fv.numel()).view(fv.shape) if blk is not None else None
            powers.append(torch.mul(powers[-1], fv, out=o) if o is not None else powers[-1] * fv)
        if need_val:
            _poly_cols(powers, g.cols, V.view(k + 1, -1))
        if need_deriv:
            if k == 0:
                dV.zero_()
            else:
                _poly_cols(powers, g.dcols, dV.view(k + 1, -1))
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


def _slot_index(m: torch.Tensor, g: _Grid, blk: "_Block", rows: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Flat position in ``blk.flat`` of the first of the k+1 values of every input.

    Returns ``(lin, invalid)``: ``lin`` (rows*in,) int64, slot r of an input at
    ``lin + r`` (read/written through ``blk.flat[r:]``). Common case (every input
    of the chunk on an interior span): ``invalid`` is None and all positions are
    distinct and inside the chunk's block. Otherwise ``invalid`` (k+1, rows*in)
    bool marks the slots of bases that do not exist (extension spans, sentinel
    span n-1): their positions fall on a neighbouring feature's bases or in the
    buffer's slack, so their values must be 0 and they must be accumulated
    (``scatter_add_``), never copied; reads there must be masked.
    """
    k, nb = g.k, g.nb
    lo, hi = torch.aminmax(m)
    interior = float(lo) >= k and float(hi) <= nb - 1
    if m.is_floating_point() and blk.base_f is not None:
        E = m.numel()
        linf = torch.add(blk.base_f[:rows], m, out=blk.scratch("linf", E).view(m.shape))
        lin = blk.scratch("lin", E, torch.int64).copy_(linf.view(-1))
    else:
        lin = torch.add(blk.base[:rows], m.long()).view(-1)
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
    g = _Grid(grid, k, uniform)
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


def _feature_groups(nin: int, nb: int) -> List[Tuple[int, int]]:
    """Contiguous feature ranges [f0, f1) of near-equal size with (f1 - f0) * nb <= BLOCK_WIDTH
    (one feature at least)."""
    ng = max(1, -(-nin * nb // BLOCK_WIDTH))
    size = -(-nin // ng)
    return [(f0, min(nin, f0 + size)) for f0 in range(0, nin, size)]


class _Plan:
    """Per-call chunking: rows per chunk, feature groups, their knots and work blocks
    (the groups share one buffer)."""

    def __init__(self, x: torch.Tensor, grid: torch.Tensor, k: int, uniform: bool):
        # the caller's flag may be stale (a grid edited through .data, or a compiled graph
        # that baked it in): verify it, so the closed form never runs on uneven knots
        uniform = uniform and grid_is_uniform(grid)
        N, nin = x.shape
        nb = grid.shape[1] - k - 1
        self.groups = _feature_groups(nin, nb)
        fg = self.groups[0][1] - self.groups[0][0]
        self.step = max(1, min(ROW_ELEMENTS // max(1, nin), CHUNK_ELEMENTS // max(1, fg * nb)))
        cap = min(self.step, N)
        self.grids = [_Grid(grid[f0:f1], k, uniform) for f0, f1 in self.groups]
        first = _Block(cap, fg, nb, k, x)
        self.blocks = [first if f1 - f0 == fg else _Block(cap, f1 - f0, nb, k, x, share=first) for f0, f1 in self.groups]
        self.k, self.nb = k, nb


class _Block:
    """Reusable dense block (cap, in * nb) of bases in one flat buffer.

    Row layout ``(in, nb)``, matching ``coef.reshape(out, in * nb)``. The block
    starts at offset k of ``flat`` and is followed by 2k + 1 elements of slack,
    so that every slot position ``first + r`` of an input on any span (extension
    spans and the sentinel span n - 1 included) is in bounds without clamping:
    a slot of a basis that does not exist lands on a neighbouring feature's
    position (or in the slack, or past a narrower group's rows) and carries the
    value 0: it is only ever added there, and reads there are masked. ``share``:
    a block of a wider feature group whose buffer and scratch this one reuses."""

    def __init__(self, cap: int, nin: int, nb: int, k: int, like: torch.Tensor, share: Optional["_Block"] = None):
        size = cap * nin * nb + 3 * k + 1
        if share is not None and share.flat.numel() >= size:  # same buffer and scratch, narrower rows
            self.flat, self._scratch = share.flat, share._scratch
        else:
            self.flat, self._scratch = torch.zeros(size, dtype=like.dtype, device=like.device), {}
        self.nin, self.nb, self.k = nin, nb, k
        # flat position of slot 0 (basis m - k) is base + m: the -k of "first basis = m - k"
        # cancels the offset k of the block.
        self.base = (
            torch.arange(cap, device=like.device).mul_(nin * nb).unsqueeze(1)
            + torch.arange(nin, device=like.device).mul_(nb)
        )
        # float copy (exact: cap * in * nb < 1/eps) for the float-span path; int64 otherwise.
        exact = self.flat.numel() < 1.0 / torch.finfo(like.dtype).eps
        self.base_f = self.base.to(like.dtype) if exact else None
        r = torch.arange(k + 1, device=like.device).view(-1, 1)
        self.lo_bound = k - r  # slot r exists iff k - r <= m <= nb - 1 + k - r
        self.hi_bound = nb - 1 + k - r

    def rows(self, rows: int) -> torch.Tensor:
        k = self.k
        return self.flat[k : k + rows * self.nin * self.nb].view(rows, self.nin * self.nb)

    def scratch(self, name: str, n: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A 1-D work buffer of ``n`` elements, allocated at the first (largest) chunk
        and reused by the next ones: fresh allocations of this size cost page faults."""
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype or self.flat.dtype, device=self.flat.device)
            self._scratch[name] = buf
        return buf[:n]


def _fill_block(blk: _Block, rows: int, V, lin, invalid) -> torch.Tensor:
    """The chunk's dense block of bases: zero, then write the k+1 values at their positions.

    ``scatter_`` on 1-D views is parallel on CPU (``index_add_`` is not)."""
    D = blk.rows(rows)
    D.zero_()
    k = blk.k
    V = V.view(k + 1, -1)
    if invalid is not None:  # slots of missing bases carry 0 and may hit a neighbour's position
        V.masked_fill_(invalid, 0.0)
        for r in range(k + 1):
            blk.flat[r:].scatter_add_(0, lin, V[r])
    else:  # distinct positions inside the block
        for r in range(k + 1):
            blk.flat[r:].scatter_(0, lin, V[r])
    return D


def _chunk_bases(xc, g: _Grid, inside, blk: _Block, need_val: bool, need_deriv: bool):
    """Steps 1-2 and the slot positions for one chunk of one feature group: ``(V, dV,
    lin, invalid)`` (see :func:`_values` and :func:`_slot_index`); on uniform knots
    dV lacks the 1/h factor (applied once to grad_x)."""
    m, f = _spans(xc, g, inside, blk)
    V, dV = _values(xc, m, f, g, need_val, need_deriv, deriv_scaled=not g.uniform, blk=blk)
    lin, invalid = _slot_index(m, g, blk, xc.shape[0])
    return V, dV, lin, invalid


def _group_weight(coef2, scale, f0: int, f1: int, nb: int) -> torch.Tensor:
    """Columns [f0*nb, f1*nb) of the coefficient matrix (out, in*nb), times ``scale``
    (out, in) per (out, feature) when given: one feature group's K-slice (a strided
    view without scale, else a group-sized product: the scaled weight is never
    materialised whole)."""
    w = coef2[:, f0 * nb : f1 * nb]
    if scale is None:
        return w
    nout = coef2.shape[0]
    return (w.view(nout, f1 - f0, nb) * scale[:, f0:f1, None]).view(nout, -1)


def _forward(x, grid, coef2, base_weight, spline_order, uniform, scale=None):
    """y (N, out) = D(x) @ W^T [+ silu(x) @ base_weight^T], K-split over feature
    groups, chunked over rows. x (N, in); coef2 (out, in * nb) with W = coef2, or
    ``coef2 * scale`` per (out, feature) when ``scale`` (out, in) is given;
    base_weight (out, in) or None."""
    plan = _Plan(x, grid, spline_order, uniform)
    nb, step = plan.nb, plan.step
    nout = coef2.shape[0]
    N = x.shape[0]
    y = torch.empty(N, nout, dtype=x.dtype, device=x.device)
    for i, ((f0, f1), g, blk) in enumerate(zip(plan.groups, plan.grids, plan.blocks)):
        ct = _group_weight(coef2, scale, f0, f1, nb).t()
        inside = _all_inside(x[:, f0:f1], g) if g.uniform else None  # one check for all chunks
        for s in range(0, N, step):
            xc = x[s : s + step, f0:f1]
            rows = xc.shape[0]
            V, _, lin, invalid = _chunk_bases(xc, g, inside, blk, True, False)
            D = _fill_block(blk, rows, V, lin, invalid)
            if i == 0:
                torch.mm(D, ct, out=y[s : s + step])
            else:
                y[s : s + step].addmm_(D, ct)
    if base_weight is not None:
        bt = base_weight.t()
        for s in range(0, N, step):
            xs = x[s : s + step]
            y[s : s + step].addmm_(_silu(xs, plan.blocks[0]), bt)
    return y


def _backward(grad_y, x, grid, coef2, base_weight, spline_order, uniform, need_x, need_c, need_b, scale=None, need_s=False):
    """(grad_x, grad_coef2 (out, in*nb), grad_base (out, in), grad_scale (out, in)) of
    :func:`_forward`, each or None."""
    plan = _Plan(x, grid, spline_order, uniform)
    k, nb, step = plan.k, plan.nb, plan.step
    N, nin = x.shape
    nout = coef2.shape[0]
    has_base = base_weight is not None
    need_b = need_b and has_base
    need_s = need_s and scale is not None
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None  # contiguous
    # gradient w.r.t. W, turned group by group into the gradient w.r.t. coef2 (times scale)
    grad_c = torch.zeros(nout, nin * nb, dtype=coef2.dtype, device=coef2.device) if (need_c or need_s) else None
    grad_b = torch.zeros(nout, nin, dtype=coef2.dtype, device=coef2.device) if need_b else None
    grad_s = torch.empty(nout, nin, dtype=coef2.dtype, device=coef2.device) if need_s else None
    grad_y = grad_y.contiguous()
    for (f0, f1), g, blk in zip(plan.groups, plan.grids, plan.blocks):
        if not (need_x or grad_c is not None):
            break
        cg = _group_weight(coef2, scale, f0, f1, nb) if need_x else None
        gc = grad_c[:, f0 * nb : f1 * nb] if grad_c is not None else None
        inside = _all_inside(x[:, f0:f1], g) if g.uniform else None
        for s in range(0, N, step):  # one block in flight: the bases, then grad_D
            xc = x[s : s + step, f0:f1]
            gy = grad_y[s : s + step]
            rows = xc.shape[0]
            V, dV, lin, invalid = _chunk_bases(xc, g, inside, blk, gc is not None, need_x)
            if gc is not None:
                gc.addmm_(gy.t(), _fill_block(blk, rows, V, lin, invalid))
            if not need_x:
                continue
            torch.mm(gy, cg, out=blk.rows(rows))
            E = lin.numel()
            gl = blk.scratch("gl", (k + 1) * E).view(k + 1, E)
            for r in range(k + 1):
                torch.index_select(blk.flat[r:], 0, lin, out=gl[r])
            dV = dV.view(k + 1, rows, f1 - f0)
            gl = gl.view(k + 1, rows, f1 - f0)
            if invalid is not None:  # reads at missing bases may be a neighbour's (any) value, and
                # their derivatives may be 0/0 (an outside input evaluated on a zero-length end span)
                inv = invalid.view(k + 1, rows, f1 - f0)
                gl.masked_fill_(inv, 0.0)
                dV.masked_fill_(inv, 0.0)
            gx = grad_x[s : s + step, f0:f1]
            torch.mul(gl[0], dV[0], out=gx)
            for r in range(1, k + 1):
                gx.addcmul_(gl[r], dV[r])
            if g.uniform:
                gx.mul_(g.inv_h)
        if scale is not None and gc is not None:  # chain rule through W = coef2 * scale, in place
            gcv = gc.view(nout, f1 - f0, nb)
            if need_s:
                torch.sum(gcv * coef2[:, f0 * nb : f1 * nb].view(nout, f1 - f0, nb), -1, out=grad_s[:, f0:f1])
            if need_c:
                gcv.mul_(scale[:, f0:f1, None])
    if need_b or (need_x and has_base):
        work = plan.blocks[0]
        for s in range(0, N, step):
            xs = x[s : s + step]
            gy = grad_y[s : s + step]
            if need_b:
                grad_b.addmm_(gy.t(), _silu(xs, work))
            if need_x:
                shape, n = xs.shape, xs.numel()
                gs = torch.mm(gy, base_weight, out=work.scratch("gs", n).view(shape))
                ds = torch.ops.aten.silu_backward.grad_input(gs, xs, grad_input=work.scratch("ds", n).view(shape))
                grad_x[s : s + step].add_(ds)
    return grad_x, (grad_c if need_c else None), grad_b, grad_s


def _silu(x: torch.Tensor, blk: _Block) -> torch.Tensor:
    return torch.ops.aten.silu.out(x, out=blk.scratch("silu", x.numel()).view(x.shape))


def _split_weight(weight, n_basis, has_base):
    nout, nin, _ = weight.shape
    coef2 = weight[..., :n_basis].reshape(nout, nin * n_basis).contiguous()
    base = weight[..., n_basis].contiguous() if has_base else None
    return coef2, base


def forward_2d(x, grid, weight, spline_order, n_basis, has_base, uniform):
    """y = D(x) @ weight.reshape(out, -1)^T, chunked. x (N, in); weight (out, in, n_basis + has_base)
    (``[W | base_weight]``, the last column the SiLU base weight when ``has_base``)."""
    coef2, base = _split_weight(weight, n_basis, has_base)
    return _forward(x, grid, coef2, base, spline_order, uniform)


def backward_2d(grad_y, x, grid, weight, spline_order, n_basis, has_base, uniform, need_x=True, need_w=True):
    """Gradients (grad_x (N, in) or None, grad_weight (out, in, n_basis + has_base) or None) of forward_2d."""
    coef2, base = _split_weight(weight, n_basis, has_base)
    gx, gc, gb, _ = _backward(grad_y, x, grid, coef2, base, spline_order, uniform, need_x, need_w, need_w)
    gw = None
    if need_w:
        gw = gc.view(weight.shape[0], weight.shape[1], n_basis)
        if has_base:
            gw = torch.cat([gw, gb.unsqueeze(-1)], dim=-1)
    return gx, gw


class _KANLinearTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid, coef, base_weight, spline_order, uniform):
        x = x.contiguous()
        nout, nin, nb = coef.shape
        coef2 = coef.reshape(nout, nin * nb)
        if not coef2.is_contiguous():
            coef2 = coef2.contiguous()
        ctx.save_for_backward(x, grid, coef2, base_weight)
        ctx.cfg = (spline_order, uniform, coef.shape)
        return _forward(x, grid, coef2, base_weight, spline_order, uniform)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, grid, coef2, base_weight = ctx.saved_tensors
        spline_order, uniform, cshape = ctx.cfg
        need_x, _, need_c, need_b = ctx.needs_input_grad[:4]
        gx, gc, gb, _ = _backward(grad_y, x, grid, coef2, base_weight, spline_order, uniform, need_x, need_c, need_b)
        return gx, None, gc.view(cshape) if gc is not None else None, gb, None, None


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
        ``(N, out_features)`` in x's dtype; differentiable w.r.t. x, coef, base_weight.
    """
    grid = grid.to(x.dtype)
    if uniform is None:
        uniform = grid_is_uniform(grid)
    return _KANLinearTorch.apply(x, grid, coef, base_weight, int(spline_order), bool(uniform))
