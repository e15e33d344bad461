"""Fused B-spline KAN kernels (Triton): forward and hand-written backward.

Algorithm
---------
Basis (``_local_bases``): each element's knot interval ``m`` and its ``k + 1`` non-zero bases
``B_{m-k..m}``. Uniform knots (a ``UNIFORM`` constexpr specialisation): ``m = floor((x - t_0) / h)``
(times the launcher's 1/h) moved by one where rounding put x on the wrong side of the stored
``t_m`` / ``t_{m+1}`` (two gathers), ``f = (x - t_m) / h`` against the stored knot, and the
cardinal B-spline pieces by Horner (k FMAs per value, constants from :func:`kanfast.knots.cardinal_pieces`; d/dx
likewise): no division. Otherwise a branch-free binary search over the feature's stored knots and
de Boor's triangle (NURBS Book alg. A2.2) multiplying by the launcher's reciprocals of knot
differences (one interleaved table per grid change: knot, 1/(t_{a+1}-t_a), .., 1/(t_{a+k}-t_a)), all
gathers at constant offsets from one address.

Forward, ``y = silu(x) @ base_weight^T + A @ W`` with ``A`` the dense ``(batch, in * (G + k))``
basis: one program per (batch tile, out tile) loops over (input tile, chunk of ``JC`` basis
indices) pairs; for each it builds the ``(BLOCK_N, BLOCK_I * JC)`` tile of ``A`` in registers
(the k + 1 values placed by compares shared by all slots, bf16/fp16/fp32 as x) and makes one
``tl.dot`` of ``K = BLOCK_I * JC`` with the contiguous K-slice of ``W`` (launcher layout
``(NC, in, JC, out)``, G + k zero-padded to ``NC * JC``; ``JC = min(8, next power of two >= G + k)``).
Then a second loop adds ``silu(x) @ base_weight^T``. The basis never touches global memory.

Backward (only x and the parameters are saved; every basis value is recomputed):
  * ``grad_x``: one program per (batch tile, ``SUB * BLOCK_I`` features); per chunk of ``JC``
    basis indices (chunks with no non-zero in the tile skipped when G + k > JC) it loops over out
    tiles accumulating ``grad_y @ Wt`` (N = ``BLOCK_I * JC``: one grad_y tile load serves every j
    of the chunk, and the base branch's ``grad_y @ base_weight`` on the first chunk), then
    multiplies by the dense derivative tile ``dB_j/dx`` (recomputed after the loop, so it holds no
    registers during it) and sums over j; plus ``(grad_y @ base_weight) * silu'(x)``. Wt layout
    ``(NC, out, in, JC)``.
  * ``grad_W``: one program per (in tile, out tile, chunk of ``SLOTS`` consecutive
    basis indices, batch split). Per row tile of its split it evaluates the k + 1
    bases of the ``(BLOCK_N, BLOCK_I)`` x tile once, spreads them into the dense
    ``(BLOCK_N, SLOTS * BLOCK_I)`` tile of its chunk (column ``c * BLOCK_I + i`` =
    ``B_{c0+c}`` of feature i; the slot axis lies in each thread's registers, so the
    spread is (k + 1) * SLOTS selects and a few compares per element, no data
    movement) and contracts it with the grad_y tile in ONE ``tl.dot``
    (``grad_y^T @ tile``: M = BLOCK_O, K = BLOCK_N, N = SLOTS * BLOCK_I; wgmma with
    both operands in shared memory) into one fp32 accumulator. Each basis value is
    so evaluated once per (row tile, in tile, out tile, chunk): ``(G + k) / SLOTS``
    (rounded up) x ``out / BLOCK_O`` times in all -- at out = 1024, 4 at G = 5 (8
    slots a chunk) and 16 at G = 50 (16 slots), where the previous kernel took
    40-72. Trade-off: the accumulator ``BLOCK_O x SLOTS * BLOCK_I`` (256 x 128
    fp32 = half the register file of an SM for 8 warps) bounds the reuse; all G + k slots in one program would
    need ``(G + k) * BLOCK_I * BLOCK_O`` accumulators, so for large G the slot chunks
    are a grid axis and each chunk re-evaluates the bases (cheaper than moving the
    basis through memory; the wide path of ``basis_block.py`` does that instead).
    Slots past the last basis in the final chunk are computed, never stored.
  * ``grad_base_weight``: a separate plain GEMM kernel, one program per (in tile,
    out tile, batch split) accumulating ``silu(x)^T @ grad_y`` (silu recomputed
    from x per out tile), so the base column does not cost a whole slot chunk of
    basis work when ``G + k`` is a multiple of ``SLOTS``.
  Both store one fp32 partial per batch split; the launcher sums the splits in a
  fixed order (the split count depends on shapes and the GPU only). No atomics:
  bit-identical on every run. Small layers with large batches need the batch split
  to fill the GPU.

Safety: inputs outside ``[t_0, t_last)`` (NaN and +-inf included) get basis 0 and
are replaced by ``t_0`` before any arithmetic; every interval index is clamped
to ``[0, n_knots - 2]`` before it is used to address knots, and knot addresses
use a clamped feature index, so no load leaves the knot table. Batch-row and
coefficient offsets are computed in int64.

Limits: spline order ``k <= MAX_SPLINE_ORDER`` (7: the k+1 values and their
derivatives live in registers, unrolled), ``G + k <= MAX_N_BASIS`` (4096; the
chunk loops are runtime loops, so this only bounds the binary search and the
launcher's coefficient copies). ``tl.dot`` needs tiles >= 16: every dot dimension is >= 16
(grad_W's BLOCK_I may be 8: its dot's N is SLOTS * BLOCK_I) and masked. The dense contraction pays for the zeros of ``A``:
its tensor work grows like ``ceil((G + k) / JC) * JC``, not like k + 1.

Configs (sm_90, from ``benchmarks/gpu_model.py`` at batch 65536, in = out = 1024, k = 3, bf16):
every 16-bit forward / grad_x config compiles to HGMMA without spills at G = 5 (forward first
config: 245 registers, grad_x: 255; one CTA of 8 warps per SM, limited by registers and shared
memory); grad_W's configs: see ``BWD_W_SHAPES`` / ``BWD_BASE_SHAPES``; results in
``benchmarks/results/gpu_model_v2_*.json``.

Layouts expected from the launcher (``kanfast.triton_backend``): the knot table fp32
``(in, G + 4k + 1, k + 1)`` (knots padded by k on each side, interleaved with the reciprocals
above), ``t_0``, ``t_last``, ``1/h`` per feature; coefficients ``(NC, in, JC, out)`` (forward) and
``(NC, out, in, JC)`` (grad_x), contiguous; grad_W partials ``(splits, out, G + k, in)`` fp32 (each
accumulator row is an out index, its columns slot-major), grad_base_weight partials
``(splits, in, out)`` fp32.
"""

import os

import triton
import triton.language as tl
from triton import knobs

from ..knots import cardinal_pieces

#: True when this copy of the module was loaded under Triton's interpreter.
INTERPRETED = bool(knobs.runtime.interpret)
#: KANFAST_TRITON_AUTOTUNE=0 (read at import) uses each kernel's first config only:
#: one compile per specialisation, for validation runs that visit many of them.
AUTOTUNE = os.environ.get("KANFAST_TRITON_AUTOTUNE", "1").strip() != "0"

MAX_SPLINE_ORDER = 7
MAX_N_BASIS = 4096


#: kan_bwd_w_kernel's configs (BLOCK_N, BLOCK_I, BLOCK_O, SLOTS, warps, stages), from the static
#: model (benchmarks/gpu_model.py) at batch 65536, in = out = 1024, k = 3, bf16, sm_90: all three
#: without spills (213-230 registers with the cardinal-piece basis), HGMMA 64x128x16 (M = BLOCK_O = 256
#: over two warpgroups, N = SLOTS * BLOCK_I = 128), 1 CTA of 8 warps per SM (registers: the 256 x 128
#: fp32 accumulator takes 128 per thread). The first (pinned under torch.use_deterministic_algorithms)
#: also compiles without spills for sm_80 (2 stages: with 3 it spills 88 B there on uniform knots);
#: the second is the model's pick at G = 5, the third at G = 50 (16 slots a chunk: 4 chunks of basis
#: evaluation instead of 7).
BWD_W_SHAPES = [(32, 16, 256, 8, 8, 2), (64, 16, 256, 8, 8, 2), (32, 8, 256, 16, 8, 3)]
#: kan_bwd_base_kernel's configs (BLOCK_N, BLOCK_I, BLOCK_O, warps, stages): HGMMA, no spills on
#: sm_90 (the first also on sm_80); the first two model at 0.22 ms at the shape above.
BWD_BASE_SHAPES = [(32, 128, 256, 8, 3), (64, 128, 256, 8, 3), (32, 64, 128, 4, 3)]


def _flat_tables(tables):
    """(flat tuple, offsets): tables[k][r][p] at flat[offsets[k] + r * len(tables[k][r]) + p] (Triton's
    constexpr tuples index well flat, not nested three deep)."""
    flat, offs = [], []
    for t in tables:
        offs.append(len(flat))
        flat.extend(v for row in t for v in row)
    return tuple(flat), tuple(offs)


_P, _P_OFF = _flat_tables([cardinal_pieces(k) for k in range(MAX_SPLINE_ORDER + 1)])
_D, _D_OFF = _flat_tables([tuple(tuple((p + 1) * c[p + 1] for p in range(k)) for c in cardinal_pieces(k))
                           for k in range(MAX_SPLINE_ORDER + 1)])
#: The cardinal pieces of order k as the kernels' Horner constants: c[r][p] of cardinal_pieces(k) at
#: _PIECES[_PIECES_OFF[k] + r * (k + 1) + p]; those of d/df (degree k - 1, k >= 1) at
#: _DPIECES[_DPIECES_OFF[k] + r * k + p].
_PIECES = tl.constexpr(_P)
_PIECES_OFF = tl.constexpr(_P_OFF)
_DPIECES = tl.constexpr(_D)
_DPIECES_OFF = tl.constexpr(_D_OFF)


def _configs(kind, fp32=False):
    if INTERPRETED:  # no autotuning under the interpreter: one small config
        extra = {"SUB": 2} if kind == "bwd_x" else {"SLOTS": 4} if kind == "bwd_w" else {}
        return [triton.Config({"BLOCK_N": 16, "BLOCK_I": 16, "BLOCK_O": 16, **extra}, num_warps=1)]
    # (BLOCK_N, BLOCK_I, BLOCK_O[, SUB], warps, stages), 16-bit lists picked with benchmarks/gpu_model.py
    # (sm_90, batch 65536, in = out = 1024, k = 3, G = 5 and 50): HGMMA, no spills at G = 5 (the first
    # forward config spills 32 B at G = 50), best modelled first; BLOCK_O = 256 in the forward
    # amortises the basis tile over 256 outputs. float32 (TF32 / IEEE) lists: smaller tiles (shared memory).
    if kind == "fwd":
        shapes = ([(64, 16, 64, 4, 2), (64, 16, 128, 4, 2)] if fp32 else
                  [(64, 16, 256, 8, 2), (128, 16, 256, 8, 2), (128, 16, 128, 8, 3)])
    elif kind == "bwd_x":  # (BLOCK_N, BLOCK_I, BLOCK_O, SUB, warps, stages)
        shapes = ([(64, 16, 32, 1, 4, 2), (64, 16, 32, 2, 4, 2)] if fp32 else
                  [(64, 16, 64, 1, 8, 2), (128, 16, 64, 1, 8, 2), (128, 16, 32, 1, 8, 3)])
        if not AUTOTUNE:
            shapes = shapes[:1]
        return [triton.Config({"BLOCK_N": n, "BLOCK_I": i, "BLOCK_O": o, "SUB": u}, num_warps=w, num_stages=s)
                for n, i, o, u, w, s in shapes]
    elif kind == "bwd_w":
        shapes = BWD_W_SHAPES if AUTOTUNE else BWD_W_SHAPES[:1]
        return [triton.Config({"BLOCK_N": n, "BLOCK_I": i, "BLOCK_O": o, "SLOTS": c}, num_warps=w, num_stages=s)
                for n, i, o, c, w, s in shapes]
    else:
        shapes = BWD_BASE_SHAPES
    if not AUTOTUNE:
        shapes = shapes[:1]
    return [triton.Config({"BLOCK_N": n, "BLOCK_I": i, "BLOCK_O": o}, num_warps=w, num_stages=s)
            for n, i, o, w, s in shapes]


@triton.jit
def _silu(b_x):
    return b_x / (1.0 + tl.exp(-b_x))


@triton.jit
def _local_bases(b_x, m_valid, p_row, b_t0, b_tn, b_hinv, n_knots, n_steps,
                 UNIFORM: tl.constexpr, K: tl.constexpr, DERIV: tl.constexpr):
    """Interval index, inside-mask, the k+1 non-zero bases and their derivatives.

    b_x (BN, BI) fp32; p_row (1, BI) pointers to t_0 of each (clamped) feature in the
    launcher's interleaved table (knot j at p_row + j*(K+1), 1/(t_{j+p} - t_j) at
    p_row + j*(K+1) + p; valid knot indices -K .. n_knots-1+K); b_t0/b_tn/b_hinv (1, BI)
    (b_hinv = 1/h, uniform knots only). Returns b_m (int32, in [0, n_knots-2]), m_in,
    vals = (B_{m-K}, .., B_m), dvals = their d/dx (or vals again when DERIV is False).

    Uniform knots: m = floor((x - t_0) / h) moved by one where rounding put x on the
    wrong side of the stored t_m or t_{m+1} (two gathers), f = (x - t_m) / h against the
    stored t_m, and the cardinal pieces by Horner (K FMAs per value, no division).
    Otherwise: bisection on the stored knots, de Boor's triangle with the table's
    reciprocals of knot differences (no division).
    """
    TS: tl.constexpr = K + 1
    m_in = (b_x >= b_t0) & (b_x < b_tn) & m_valid  # False for NaN/inf
    b_xs = tl.where(m_in, b_x, b_t0)
    if UNIFORM:
        b_m = tl.floor((b_xs - b_t0) * b_hinv).to(tl.int32)
        b_m = tl.minimum(tl.maximum(b_m, 0), n_knots - 2)
        p_m = p_row + b_m * TS
        b_tm = tl.load(p_m)
        b_tm1 = tl.load(p_m + TS)
        # x < t_m: m - 1, with f = 1 + (x - t_m)/h (x is within rounding of t_m, never on
        # t_{m-1}); x >= t_{m+1}: m + 1 and f against t_{m+1}. m stays in [0, n_knots-2]:
        # inside x lies in [t_0, t_last), outside x is t_0 (m = 0, no move).
        m_dn = b_xs < b_tm
        m_up = (b_xs >= b_tm1) & (b_m < n_knots - 2) & (m_dn == 0)
        m_dn = m_dn & (b_m > 0)
        b_m = tl.where(m_dn, b_m - 1, tl.where(m_up, b_m + 1, b_m))
        b_f = (b_xs - tl.where(m_up, b_tm1, b_tm)) * b_hinv
        b_f = tl.where(m_dn, b_f + 1.0, b_f)
        vals = ()
        for r in tl.static_range(K + 1):
            b_v = tl.full(b_x.shape, _PIECES[_PIECES_OFF[K] + r * (K + 1) + K], tl.float32)
            for q in tl.static_range(K):
                b_v = b_v * b_f + _PIECES[_PIECES_OFF[K] + r * (K + 1) + K - 1 - q]
            vals = vals + (tl.where(m_in, b_v, 0.0),)
        dvals = vals
        if DERIV:
            dvals = ()
            for r in tl.static_range(K + 1):
                if K == 0:
                    b_d = tl.full(b_x.shape, 0, tl.float32)
                else:
                    b_d = tl.full(b_x.shape, _DPIECES[_DPIECES_OFF[K] + r * K + K - 1], tl.float32)
                    for q in tl.static_range(K - 1):
                        b_d = b_d * b_f + _DPIECES[_DPIECES_OFF[K] + r * K + K - 2 - q]
                    b_d = b_d * b_hinv
                dvals = dvals + (tl.where(m_in, b_d, 0.0),)
    else:
        # largest m with t_m <= x: invariant t_lo <= x < t_hi
        b_lo = tl.full(b_x.shape, 0, tl.int32)
        b_hi = b_lo + (n_knots - 1)
        for _ in range(n_steps):
            b_mid = (b_lo + b_hi) // 2
            m_le = tl.load(p_row + b_mid * TS) <= b_xs
            b_lo = tl.where(m_le, b_mid, b_lo)
            b_hi = tl.where(m_le, b_hi, b_mid)
        b_m = tl.minimum(tl.maximum(b_lo, 0), n_knots - 2)
        p_m = p_row + b_m * TS  # every gather below: p_m + a compile-time offset
        lefts = ()
        rights = ()
        for r in tl.static_range(K):
            lefts = lefts + (b_xs - tl.load(p_m - r * TS),)  # x - t_{m-r}
            rights = rights + (tl.load(p_m + (r + 1) * TS) - b_xs,)  # t_{m+1+r} - x
        b_one = tl.full(b_x.shape, 1.0, tl.float32)
        vals = (b_one,)
        prev = vals
        recs = ()
        for p in tl.static_range(1, K + 1):
            prev = vals
            recs = ()
            new = ()
            b_saved = tl.full(b_x.shape, 0, tl.float32)
            for r in tl.static_range(p):
                # 1 / (t_{m+1+r} - t_{m+1+r-p}); 0 for coincident knots (0/0 := 0)
                b_rec = tl.load(p_m + (r + 1 - p) * TS + p)
                recs = recs + (b_rec,)
                b_tmp = vals[r] * b_rec
                new = new + (b_saved + rights[r] * b_tmp,)
                b_saved = lefts[p - r - 1] * b_tmp
            vals = new + (b_saved,)
        out = ()
        for r in tl.static_range(K + 1):
            out = out + (tl.where(m_in, vals[r], 0.0),)
        vals = out
        dvals = vals
        if DERIV:
            # dB_{i,K} = K (B_{i,K-1} / (t_{i+K} - t_i) - B_{i+1,K-1} / (t_{i+K+1} - t_{i+1})),
            # i = m-K+r; prev[s] = B_{m-K+1+s,K-1}, recs[s] = 1/(t_{m+1+s} - t_{m+1+s-K})
            dvals = ()
            for r in tl.static_range(K + 1):
                b_d = tl.full(b_x.shape, 0, tl.float32)
                if K > 0:
                    if r > 0:
                        b_d += prev[r - 1] * recs[r - 1]
                    if r < K:
                        b_d -= prev[r] * recs[r]
                    b_d = b_d * K
                dvals = dvals + (tl.where(m_in, b_d, 0.0),)
    return b_m, m_in, vals, dvals


@triton.jit
def _select(vals, b_s, K: tl.constexpr):
    """(BN, BI) tile of vals[s] where 0 <= s <= K, else 0."""
    b = tl.full(b_s.shape, 0, tl.float32)
    for r in tl.static_range(K + 1):
        b = tl.where(b_s == r, vals[r], b)
    return b


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add_combine(a, b):
    return a + b


@triton.jit
def _j_range(b_m, m_in, NB, K: tl.constexpr):
    """[j_lo, j_hi): basis indices that are non-zero somewhere in the tile ([0, 0) if none).

    (tl.reduce with local combine functions rather than tl.min/tl.max, so that a
    privately interpreted copy of this module needs no jit'd triton.language helper.)
    """
    j_lo = tl.reduce(tl.reduce(tl.where(m_in, b_m - K, NB), 1, _min_combine), 0, _min_combine)
    j_hi = tl.reduce(tl.reduce(tl.where(m_in, b_m + 1, 0), 1, _max_combine), 0, _max_combine)
    j_lo = tl.maximum(j_lo, 0)
    j_hi = tl.minimum(j_hi, NB)
    return tl.where(j_lo < j_hi, j_lo, 0), tl.where(j_lo < j_hi, j_hi, 0)


@triton.jit
def _tile_bases(p_x, p_t, p_t0, p_tn, p_hinv, o_n, m_n, o_i, IN, n_knots, n_steps, s_xn, s_xi,
                UNIFORM: tl.constexpr, K: tl.constexpr, DERIV: tl.constexpr):
    """x (fp32) of the (rows o_n, features o_i) tile, its mask and its bases (see _local_bases)."""
    m_i = o_i < IN
    o_ic = tl.minimum(o_i, IN - 1)
    m_x = m_n[:, None] & m_i[None, :]
    b_x = tl.load(p_x + o_n[:, None] * s_xn + o_i[None, :] * s_xi, mask=m_x, other=0.0).to(tl.float32)
    b_t0 = tl.load(p_t0 + o_ic)[None, :]
    b_tn = tl.load(p_tn + o_ic)[None, :]
    b_hinv = tl.load(p_hinv + o_ic)[None, :]
    p_row = p_t + ((o_ic.to(tl.int64) * (n_knots + 2 * K) + K) * (K + 1))[None, :]
    b_m, m_in, vals, dvals = _local_bases(b_x, m_x, p_row, b_t0, b_tn, b_hinv, n_knots, n_steps, UNIFORM, K, DERIV)
    return b_x, m_x, b_m, m_in, vals, dvals


@triton.jit
def _slot_tiles(vals, b_m, c, K: tl.constexpr, JC: tl.constexpr):
    """The JC (BN, BI) tiles of B_j(x), j = c*JC + jj (jj = 0 .. JC-1): vals[r] where j = m - K + r,
    else 0 (j >= NB: values of bases that do not exist, finite; their coefficient rows are zero).
    The compares d == jj - r take one of JC + K values per element, shared by all slots."""
    b_d = b_m - K - c * JC  # the slot of vals[0]
    tiles = ()
    for jj in tl.static_range(JC):
        b = tl.where(b_d == jj, vals[0], 0.0)
        for r in tl.static_range(1, K + 1):
            b = tl.where(b_d == jj - r, vals[r], b)
        tiles = tiles + (b,)
    return tiles


@triton.jit
def _slots_to_k(tiles, JC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):
    """(BN, BI * JC) with column i*JC + jj = tiles[jj][:, i] (tl.join adds a minor dimension: the
    last join picks the lowest bit of jj)."""
    if JC == 1:
        b = tiles[0]
    elif JC == 2:
        b = tl.join(tiles[0], tiles[1])
    elif JC == 4:
        b = tl.join(tl.join(tiles[0], tiles[2]), tl.join(tiles[1], tiles[3]))
    else:
        b = tl.join(tl.join(tl.join(tiles[0], tiles[4]), tl.join(tiles[2], tiles[6])),
                    tl.join(tl.join(tiles[1], tiles[5]), tl.join(tiles[3], tiles[7])))
    return tl.reshape(b, (BLOCK_N, BLOCK_I * JC))


@triton.jit
def _k_to_slots(b, JC: tl.constexpr):
    """Inverse of _slots_to_k for a (BN, BI * JC) tile: the JC (BN, BI) tiles."""
    BN: tl.constexpr = b.shape[0]
    BI: tl.constexpr = b.shape[1] // JC
    if JC == 1:
        out = (b,)
    elif JC == 2:
        t0, t1 = tl.split(tl.reshape(b, (BN, BI, 2)))
        out = (t0, t1)
    elif JC == 4:
        e, o = tl.split(tl.reshape(b, (BN, BI, 2, 2)))
        t0, t2 = tl.split(e)
        t1, t3 = tl.split(o)
        out = (t0, t1, t2, t3)
    else:
        e, o = tl.split(tl.reshape(b, (BN, BI, 2, 2, 2)))
        e0, e1 = tl.split(e)
        o0, o1 = tl.split(o)
        t0, t4 = tl.split(e0)
        t2, t6 = tl.split(e1)
        t1, t5 = tl.split(o0)
        t3, t7 = tl.split(o1)
        out = (t0, t1, t2, t3, t4, t5, t6, t7)
    return out


@triton.jit(do_not_specialize=["N"])
def kan_fwd_kernel(
    p_x, p_t, p_t0, p_tn, p_hinv, p_w, p_wb, p_y,
    N, IN, OUT, NB, n_knots, n_steps,
    s_xn, s_xi, s_wbo, s_wbi, s_yn, s_yo,
    UNIFORM: tl.constexpr, K: tl.constexpr, HAS_BASE: tl.constexpr, PREC: tl.constexpr,
    JC: tl.constexpr, NC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """y (N, OUT) = A @ W (+ silu(x) @ base_weight^T), A the dense basis (N, IN * NC * JC); W
    (NC, IN, JC, OUT): W[c, i, jj, :] = coef[:, i, c*JC + jj] (zero for c*JC + jj >= NB)."""
    pid_n = tl.program_id(0)
    pid_o = tl.program_id(1)
    o_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    m_n = o_n < N
    m_o = o_o < OUT
    BK: tl.constexpr = BLOCK_I * JC
    o_k = tl.arange(0, BK)
    p_wk = p_w + o_k[:, None].to(tl.int64) * OUT + o_o[None, :]  # the K-slice's rows, from its first
    b_acc = tl.full((BLOCK_N, BLOCK_O), 0, tl.float32)
    # one step per (input tile, chunk of JC basis indices): a dot of K = BLOCK_I * JC
    for t in range(0, NC * ((IN + BLOCK_I - 1) // BLOCK_I)):
        i0 = (t // NC) * BLOCK_I
        c = t % NC
        o_i = i0 + tl.arange(0, BLOCK_I)
        b_x, m_x, b_m, m_in, vals, dvals = _tile_bases(p_x, p_t, p_t0, p_tn, p_hinv, o_n, m_n, o_i, IN, n_knots,
                                                       n_steps, s_xn, s_xi, UNIFORM, K, False)
        b_a = _slots_to_k(_slot_tiles(vals, b_m, c, K, JC), JC, BLOCK_N, BLOCK_I)
        m_k = (i0 + o_k // JC) < IN
        b_w = tl.load(p_wk + tl.cast(c * IN + i0, tl.int64) * JC * OUT, mask=m_k[:, None] & m_o[None, :], other=0.0)
        b_acc = tl.dot(b_a.to(b_w.dtype), b_w, b_acc, input_precision=PREC)
    if HAS_BASE:
        for i0 in range(0, IN, BLOCK_I):
            o_i = i0 + tl.arange(0, BLOCK_I)
            m_i = o_i < IN
            m_x = m_n[:, None] & m_i[None, :]
            b_x = tl.load(p_x + o_n[:, None] * s_xn + o_i[None, :] * s_xi, mask=m_x, other=0.0).to(tl.float32)
            b_s = tl.where(m_x, _silu(b_x), 0.0)
            b_wb = tl.load(p_wb + o_o[None, :] * s_wbo + o_i[:, None] * s_wbi, mask=m_i[:, None] & m_o[None, :],
                           other=0.0)
            b_acc = tl.dot(b_s.to(b_wb.dtype), b_wb, b_acc, input_precision=PREC)
    p_out = p_y + o_n[:, None] * s_yn + o_o[None, :] * s_yo
    tl.store(p_out, b_acc.to(p_y.dtype.element_ty), mask=m_n[:, None] & m_o[None, :])


@triton.jit
def _gx_chunk(p_wt, p_wb, p_gy, o_n, m_n, i0, c, IN, OUT, s_gn, s_go, s_wbo, s_wbi,
              PREC: tl.constexpr, WITH_BASE: tl.constexpr, JC: tl.constexpr, SUB: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr):
    """For each of the SUB feature tiles i0 + s*BLOCK_I: grad_y @ Wt[c, :, tile, :] (BN, BI*JC) and,
    when WITH_BASE, grad_y @ base_weight[:, tile] (BN, BI) (else zeros). One grad_y tile load
    serves every dot: all SUB tiles, all JC basis indices and the base branch. (SUB accumulators
    rather than one SUB times wider: the epilogue of one tile frees its registers before the next.)"""
    BK: tl.constexpr = BLOCK_I * JC
    o_k = tl.arange(0, BK)
    p_wc = p_wt + tl.cast(c, tl.int64) * OUT * IN * JC + o_k[None, :]
    accs = ()
    accbs = ()
    for sub in tl.static_range(SUB):
        accs = accs + (tl.full((BLOCK_N, BK), 0, tl.float32),)
        accbs = accbs + (tl.full((BLOCK_N, BLOCK_I), 0, tl.float32),)
    for o0 in range(0, OUT, BLOCK_O):
        o_o = o0 + tl.arange(0, BLOCK_O)
        m_o = o_o < OUT
        b_gy = tl.load(p_gy + o_n[:, None] * s_gn + o_o[None, :] * s_go, mask=m_n[:, None] & m_o[None, :], other=0.0)
        new = ()
        newb = ()
        for sub in tl.static_range(SUB):
            i1 = i0 + sub * BLOCK_I
            m_k = (i1 + o_k // JC) < IN
            b_w = tl.load(p_wc + i1 * JC + o_o[:, None].to(tl.int64) * IN * JC, mask=m_o[:, None] & m_k[None, :],
                          other=0.0)
            new = new + (tl.dot(b_gy.to(b_w.dtype), b_w, accs[sub], input_precision=PREC),)
            if WITH_BASE:
                o_i = i1 + tl.arange(0, BLOCK_I)
                b_wb = tl.load(p_wb + o_o[:, None] * s_wbo + o_i[None, :] * s_wbi,
                               mask=m_o[:, None] & (o_i < IN)[None, :], other=0.0)
                newb = newb + (tl.dot(b_gy.to(b_wb.dtype), b_wb, accbs[sub], input_precision=PREC),)
            else:
                newb = newb + (accbs[sub],)
        accs = new
        accbs = newb
    return accs, accbs


@triton.jit
def _gx_finish(b_acc, dvals, b_m, c, K: tl.constexpr, JC: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_I: tl.constexpr):
    """(BN, BI): sum over the chunk's JC basis indices j of (grad_y @ Wt_j) * dB_j/dx."""
    b_d = _slots_to_k(_slot_tiles(dvals, b_m, c, K, JC), JC, BLOCK_N, BLOCK_I)
    return tl.reduce(tl.reshape(b_acc * b_d, (BLOCK_N, BLOCK_I, JC)), 2, _add_combine)


@triton.jit
def _gx_add(gxs, accs, accbs, p_x, p_t, p_t0, p_tn, p_hinv, o_n, m_n, i0, c, IN, n_knots, n_steps, s_xn, s_xi,
            UNIFORM: tl.constexpr, K: tl.constexpr, WITH_BASE: tl.constexpr, JC: tl.constexpr, SUB: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):
    """gxs[s] + chunk c's terms (and the base branch's when WITH_BASE), the bases recomputed here."""
    out = ()
    for sub in tl.static_range(SUB):
        o_i = i0 + sub * BLOCK_I + tl.arange(0, BLOCK_I)
        b_x, m_x, b_m, m_in, vals, dvals = _tile_bases(p_x, p_t, p_t0, p_tn, p_hinv, o_n, m_n, o_i, IN, n_knots,
                                                       n_steps, s_xn, s_xi, UNIFORM, K, True)
        b_g = gxs[sub] + _gx_finish(accs[sub], dvals, b_m, c, K, JC, BLOCK_N, BLOCK_I)
        if WITH_BASE:
            b_sig = 1.0 / (1.0 + tl.exp(-b_x))
            b_g += tl.where(m_x, accbs[sub] * (b_sig * (1.0 + b_x * (1.0 - b_sig))), 0.0)
        out = out + (b_g,)
    return out


@triton.jit(do_not_specialize=["N"])
def kan_bwd_x_kernel(
    p_x, p_t, p_t0, p_tn, p_hinv, p_wt, p_wb, p_gy, p_gx,
    N, IN, OUT, NB, n_knots, n_steps,
    s_xn, s_xi, s_wbo, s_wbi, s_gn, s_go, s_gxn, s_gxi,
    UNIFORM: tl.constexpr, K: tl.constexpr, HAS_BASE: tl.constexpr, PREC: tl.constexpr,
    JC: tl.constexpr, NC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr, SUB: tl.constexpr,
):
    """grad_x (N, IN) = sum_j (grad_y @ Wt_j) * dB_j/dx (+ (grad_y @ base_weight) * silu'(x)); Wt
    (NC, OUT, IN, JC): Wt[c, :, i, jj] = coef[:, i, c*JC + jj] (zero for c*JC + jj >= NB). A program
    owns SUB * BLOCK_I features."""
    pid_n = tl.program_id(0)
    i0 = tl.program_id(1) * (BLOCK_I * SUB)
    o_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    if NC > 1:  # chunks of basis indices with no non-zero in the program's tiles are skipped
        j_lo = NB
        j_hi = NB * 0
        for sub in tl.static_range(SUB):
            o_i = i0 + sub * BLOCK_I + tl.arange(0, BLOCK_I)
            b_x, m_x, b_m, m_in, vals, dvals = _tile_bases(p_x, p_t, p_t0, p_tn, p_hinv, o_n, m_n, o_i, IN, n_knots,
                                                           n_steps, s_xn, s_xi, UNIFORM, K, False)
            lo, hi = _j_range(b_m, m_in, NB, K)
            j_lo = tl.where(lo < hi, tl.minimum(j_lo, lo), j_lo)
            j_hi = tl.maximum(j_hi, hi)
        j_lo = tl.where(j_lo < j_hi, j_lo, 0)
    else:
        j_lo = NB * 0
        j_hi = NB
    gxs = ()
    for sub in tl.static_range(SUB):
        gxs = gxs + (tl.full((BLOCK_N, BLOCK_I), 0, tl.float32),)
    if HAS_BASE:  # the base branch's dots ride with the first chunk's grad_y loads
        c = j_lo // JC
        accs, accbs = _gx_chunk(p_wt, p_wb, p_gy, o_n, m_n, i0, c, IN, OUT, s_gn, s_go, s_wbo, s_wbi,
                                PREC, True, JC, SUB, BLOCK_N, BLOCK_I, BLOCK_O)
        gxs = _gx_add(gxs, accs, accbs, p_x, p_t, p_t0, p_tn, p_hinv, o_n, m_n, i0, c, IN, n_knots, n_steps,
                      s_xn, s_xi, UNIFORM, K, True, JC, SUB, BLOCK_N, BLOCK_I)
    for c in range(j_lo // JC + HAS_BASE, (j_hi + JC - 1) // JC):
        accs, accbs = _gx_chunk(p_wt, p_wb, p_gy, o_n, m_n, i0, c, IN, OUT, s_gn, s_go, s_wbo, s_wbi,
                                PREC, False, JC, SUB, BLOCK_N, BLOCK_I, BLOCK_O)
        gxs = _gx_add(gxs, accs, accbs, p_x, p_t, p_t0, p_tn, p_hinv, o_n, m_n, i0, c, IN, n_knots, n_steps,
                      s_xn, s_xi, UNIFORM, K, False, JC, SUB, BLOCK_N, BLOCK_I)
    for sub in tl.static_range(SUB):
        o_i = i0 + sub * BLOCK_I + tl.arange(0, BLOCK_I)
        m_x = m_n[:, None] & (o_i < IN)[None, :]
        tl.store(p_gx + o_n[:, None] * s_gxn + o_i[None, :] * s_gxi, gxs[sub].to(p_gx.dtype.element_ty), mask=m_x)


_KEY = ["IN", "OUT", "NB", "K", "UNIFORM", "HAS_BASE", "PREC"]
#: Forward and grad_x kernels, autotuned over a few configs per dtype class (16-bit, float32).
_fwd_jit, _bwd_x_jit = kan_fwd_kernel, kan_bwd_x_kernel
kan_fwd_kernel = triton.autotune(configs=_configs("fwd"), key=_KEY)(_fwd_jit)
kan_fwd_kernel_fp32 = triton.autotune(configs=_configs("fwd", fp32=True), key=_KEY)(_fwd_jit)
kan_bwd_x_kernel = triton.autotune(configs=_configs("bwd_x"), key=_KEY)(_bwd_x_jit)
kan_bwd_x_kernel_fp32 = triton.autotune(configs=_configs("bwd_x", fp32=True), key=_KEY)(_bwd_x_jit)


@triton.autotune(configs=_configs("bwd_w"), key=["IN", "OUT", "NB", "K", "UNIFORM", "PREC"])
@triton.jit(do_not_specialize=["N", "rows_per_split"])
def kan_bwd_w_kernel(
    p_x, p_t, p_t0, p_tn, p_hinv, p_gy, p_gw,
    N, IN, OUT, NB, n_knots, n_steps, rows_per_split,
    s_xn, s_xi, s_gn, s_go,
    UNIFORM: tl.constexpr, K: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr, SLOTS: tl.constexpr,
):
    """Partial gradients gw (splits, OUT, NB, IN) fp32: gw[s, :, j] = grad_y_s^T @ B_j(x_s) over the
    rows of batch split s.

    Program (in tile, out tile, chunk of SLOTS basis indices, split). Per row tile the k + 1
    bases of the x tile are evaluated once, spread into the dense (BLOCK_N, SLOTS * BLOCK_I)
    tile of the chunk's slots (column c * BLOCK_I + i: basis c0 + c of feature i), and one
    tl.dot (M = BLOCK_O, K = BLOCK_N, N = SLOTS * BLOCK_I) accumulates grad_y^T @ tile."""
    pid_io = tl.program_id(0)
    c0 = tl.program_id(1) * SLOTS
    pid_s = tl.program_id(2)
    n_tiles_o = (OUT + BLOCK_O - 1) // BLOCK_O
    pid_i = pid_io // n_tiles_o
    pid_o = pid_io % n_tiles_o
    # the x tile is handled as (BLOCK_N, 1, BLOCK_I): its bases broadcast over the slot axis in place
    o_i = (pid_i * BLOCK_I + tl.arange(0, BLOCK_I))[None, None, :]
    o_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    m_i = o_i < IN
    m_o = o_o < OUT
    o_ic = tl.minimum(o_i, IN - 1)
    NP = n_knots + 2 * K
    b_t0 = tl.load(p_t0 + o_ic)
    b_tn = tl.load(p_tn + o_ic)
    b_hinv = tl.load(p_hinv + o_ic)
    p_row = p_t + (o_ic.to(tl.int64) * NP + K) * (K + 1)
    o_c = tl.arange(0, SLOTS)[None, :, None]
    n_start = pid_s.to(tl.int64) * rows_per_split
    n_end = tl.minimum(n_start + rows_per_split, N)
    b_acc = tl.full((BLOCK_O, SLOTS * BLOCK_I), 0, tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < n_end
        m_x = m_n[:, None, None] & m_i
        b_x = tl.load(p_x + o_n[:, None, None] * s_xn + o_i * s_xi, mask=m_x, other=0.0).to(tl.float32)
        b_gy = tl.load(p_gy + o_n[:, None] * s_gn + o_o[None, :] * s_go, mask=m_n[:, None] & m_o[None, :], other=0.0)
        b_m, m_in, vals, dvals = _local_bases(b_x, m_x, p_row, b_t0, b_tn, b_hinv, n_knots, n_steps, UNIFORM, K, False)
        # slot c0 + c holds vals[q] = B_{m-K+q} where c == m - K - c0 + q; the slot axis lies in
        # registers, so (c - q) are constants and the k + SLOTS distinct compares are shared
        b_d = b_m - (c0 + K)
        b_b = tl.full((BLOCK_N, SLOTS, BLOCK_I), 0, tl.float32)
        for q in tl.static_range(K + 1):
            b_b = tl.where(b_d == o_c - q, vals[q], b_b)
        # slots >= NB (past the last basis) get values of bases that do not exist: never stored
        b_b = tl.reshape(b_b.to(b_gy.dtype), (BLOCK_N, SLOTS * BLOCK_I))
        b_acc = tl.dot(tl.trans(b_gy), b_b, b_acc, input_precision=PREC)
    o_r = tl.arange(0, SLOTS * BLOCK_I)
    o_j = c0 + o_r // BLOCK_I
    o_ir = pid_i * BLOCK_I + o_r % BLOCK_I
    o_col = o_j * IN + o_ir
    p_out = p_gw + (pid_s.to(tl.int64) * OUT + o_o)[:, None] * NB * IN + o_col[None, :]
    tl.store(p_out, b_acc, mask=m_o[:, None] & ((o_j < NB) & (o_ir < IN))[None, :])


@triton.autotune(configs=_configs("bwd_base"), key=["IN", "OUT", "PREC"])
@triton.jit(do_not_specialize=["N", "rows_per_split"])
def kan_bwd_base_kernel(
    p_x, p_gy, p_gb,
    N, IN, OUT, rows_per_split,
    s_xn, s_xi, s_gn, s_go,
    PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Partial gradients gb (splits, IN, OUT) fp32: gb[s] = silu(x_s)^T @ grad_y_s over the rows of
    batch split s; program (in tile, out tile, split), one tl.dot per row tile."""
    pid_io = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_tiles_o = (OUT + BLOCK_O - 1) // BLOCK_O
    o_i = (pid_io // n_tiles_o) * BLOCK_I + tl.arange(0, BLOCK_I)
    o_o = (pid_io % n_tiles_o) * BLOCK_O + tl.arange(0, BLOCK_O)
    m_i = o_i < IN
    m_o = o_o < OUT
    n_start = pid_s.to(tl.int64) * rows_per_split
    n_end = tl.minimum(n_start + rows_per_split, N)
    b_acc = tl.full((BLOCK_I, BLOCK_O), 0, tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < n_end
        m_x = m_i[:, None] & m_n[None, :]
        b_x = tl.load(p_x + o_i[:, None] * s_xi + o_n[None, :] * s_xn, mask=m_x, other=0.0).to(tl.float32)
        b_gy = tl.load(p_gy + o_n[:, None] * s_gn + o_o[None, :] * s_go, mask=m_n[:, None] & m_o[None, :], other=0.0)
        b_s = tl.where(m_x, _silu(b_x), 0.0)
        b_acc = tl.dot(b_s.to(b_gy.dtype), b_gy, b_acc, input_precision=PREC)
    p_out = p_gb + (pid_s.to(tl.int64) * IN + o_i)[:, None] * OUT + o_o[None, :]
    tl.store(p_out, b_acc, mask=m_i[:, None] & m_o[None, :])
