"""The dense-block engine's layout and plan (:mod:`kanfast.torch_backend`): how a call is cut
into feature groups (K-slices of the GEMM) and chunks of rows, the reusable dense block of
one group (:class:`Block`, basis-major ``[silu(x) | B_0 | ... | B_{G+k-1}]``), and each
group's weight in the same layout (:func:`group_weight`, the reduced form that drops the last
basis; :func:`derivative_weight`, the derivative spline's coefficients for grad_x).

The sizes below are the engine's budgets (what bounds its memory, see
:mod:`kanfast.torch_backend`). The blocks' memory comes from the calling thread's buffers
(:mod:`kanfast.cpu_buffers`); the spans and bases written into them from
:mod:`kanfast.cpu_bases` (torch ops) or the compiled kernels (:mod:`kanfast.cpu_dispatch`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from .cpu_buffers import thread_buffers

if TYPE_CHECKING:
    from .cpu_knots import Grid

__all__ = [
    "CHUNK_ELEMENTS",
    "BLOCK_WIDTH",
    "ROW_ELEMENTS",
    "CANCEL_RATIO",
    "KERNEL_CHUNK_ELEMENTS",
    "KERNEL_BLOCK_WIDTH",
    "feature_groups",
    "Plan",
    "Block",
    "chunks",
    "reducible",
    "group_weight",
    "derivative_weight",
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
#: The last basis is dropped (:func:`group_weight`) only while the group's largest |W_L| is
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
#: :func:`feature_groups`) can be narrower at no cost, which keeps the weight-sized work
#: buffers (two per thread, ``out x width``) and the block about the same size from G = 5 to
#: G = 50 (same machine, 2 threads, paired runs, fwd+bwd / floor, widths 4096 / 2048 /
#: 1024: G=5 0.905 / 0.912 / 0.982, G=20 0.872 / 0.855 / 0.906, G=50 0.965 / 0.973 / 0.970).
KERNEL_BLOCK_WIDTH = 2048


def feature_groups(nin: int, nb: int, width: Optional[int] = None, align: bool = False) -> List[Tuple[int, int]]:
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


class Plan:
    """Per-call chunking: rows per chunk, feature groups, their knots and work blocks
    (the groups share one buffer). ``knots``: the knots of x's features (a
    :class:`kanfast.cpu_knots.Grid`); ``has_base``: the blocks carry a SiLU column block.
    Each CPU worker runs its own plan with the full per-chunk budgets (halving them
    per worker was slower: smaller GEMMs, more ops per element)."""

    def __init__(self, x: torch.Tensor, knots: Grid, has_base: bool, kernels: bool = False):
        N, nin = x.shape
        k, nb = knots.k, knots.nb
        off = 1 if has_base else 0
        self.groups = feature_groups(nin, nb + off, KERNEL_BLOCK_WIDTH if kernels else BLOCK_WIDTH, align=kernels)
        fg = self.groups[0][1] - self.groups[0][0]
        if kernels:  # rows by the block's size alone: the kernels' work buffers are per row
            self.step = max(1, KERNEL_CHUNK_ELEMENTS // max(1, fg * (nb + off)))
        else:
            self.step = max(1, min(ROW_ELEMENTS // max(1, nin), CHUNK_ELEMENTS // max(1, fg * (nb + off))))
        cap = min(self.step, N)
        self.grids = [knots.part(f0, f1) for f0, f1 in self.groups]
        first = Block(cap, fg, nb, k, off, x)
        self.blocks = [
            first if f1 - f0 == fg else Block(cap, f1 - f0, nb, k, off, x, share=first) for f0, f1 in self.groups
        ]
        self.k, self.nb, self.off = k, nb, off


class Block:
    """Reusable dense block (cap, C * in) of one feature group in one flat buffer.

    Row layout basis-major: ``C = off + nb`` column blocks of ``in`` columns each,
    ``[silu(x) | B_0 | B_1 | ... | B_{nb-1}]`` (the SiLU block when ``off = 1``), so
    that dropping the last basis (see :func:`group_weight`) is a K-slice of the
    GEMM, and the SiLU base branch is part of the same GEMM. Slot r of an input
    on span m (basis ``m - k + r``) sits at ``lin + r * in``. The block starts at
    offset ``k * in`` of ``flat`` and is followed by ``(k + 1) * in`` elements of
    slack, so that every slot position of an input on any span (extension spans
    and the sentinel span n - 1 included) is in bounds without clamping: a slot
    of a basis that does not exist lands on another column block (or a
    neighbouring row's, or the slack) and carries the value 0: it is only ever
    added there, and reads there are masked (the block is zeroed before each
    fill; the slack may hold anything). The buffers come from the calling
    thread's cache (:mod:`kanfast.cpu_buffers`). ``share``: a block of a wider
    feature group whose buffer this one reuses."""

    def __init__(
        self, cap: int, nin: int, nb: int, k: int, off: int, like: torch.Tensor, share: Optional["Block"] = None
    ):
        self.nin, self.nb, self.k, self.off = nin, nb, k, off
        self.C = off + nb
        self.R = self.C * nin  # row stride
        self.lead = k * nin
        self.dtype, self.device = like.dtype, like.device
        self._bufs = share._bufs if share is not None else thread_buffers()
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


def chunks(N: int, step: int, stagger: bool):
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


def reducible(check, nb: int) -> bool:
    """Drop the last basis (partition of unity, :func:`group_weight`): every input of
    the group on an interior span, and more than one basis."""
    return bool(check[1]) and nb >= 2


def group_weight(coef2, base_weight, scale, f0: int, f1: int, nb: int, blk: Block, reduced: bool):
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


def derivative_weight(coef2, base_weight, scale, f0: int, f1: int, nb: int, blk: Block, inv_h) -> torch.Tensor:
    """The weight of ``grad_D`` when every input of the group is interior, on uniform knots:
    (out, (off + nb - 1) * fw) = ``[base_weight | D_1 | ... | D_{nb-1}]`` with
    ``D_j = (W_j - W_{j-1}) / h`` per feature: the coefficients of the spline's
    derivative on the order-(k-1) bases ``B_{j,k-1}`` (``s' = sum_j D_j B_{j,k-1}``, de Boor,
    *A Practical Guide to Splines*, ch. X, on uniform knots ``k / (t_{j+k} - t_j) = 1 / h``).
    On an interior span m only ``B_{j,k-1}``, ``j = m-k+1 .. m``, are non-zero, all with
    ``1 <= j <= nb - 1``: k values per input instead of the k+1 of the order-k bases,
    in the same K as the reduced forward weight (:func:`group_weight`), and D_j in
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
