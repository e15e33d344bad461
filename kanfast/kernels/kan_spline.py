"""Fused B-spline KAN kernels (Triton): forward and hand-written backward.

Algorithm
---------
Forward, ``y = silu(x) @ base_weight^T + sum_j B_j(x) @ W[:, :, j]^T``: one
program per (batch tile, out tile). It loops over input-feature tiles; for each
it loads the ``(BLOCK_N, BLOCK_I)`` x tile, finds every element's knot interval
``m`` (uniform grid: closed form ``floor((x - t_0) / h)`` corrected against the
stored knots, a ``UNIFORM`` constexpr specialisation; otherwise a branch-free
binary search over that feature's knots) and evaluates the ``k + 1`` non-zero
bases ``B_{m-k..m}`` by de Boor's triangle (NURBS Book alg. A2.2) in registers.
Then, for each basis index ``j`` that is non-zero somewhere in the tile, the
``(BLOCK_N, BLOCK_I)`` tile of ``B_j`` is selected from those ``k + 1`` values
and contracted with the ``(BLOCK_I, BLOCK_O)`` coefficient slice through
``tl.dot`` into one fp32 accumulator; ``silu(x) @ base_weight^T`` goes into the
same accumulator. The ``(batch, in, G + k)`` basis never touches global memory.

Backward (only x and the parameters are saved; every basis value is recomputed):
  * ``grad_x``: one program per (batch tile, in tile); for each group of
    ``J_PER`` consecutive ``j`` (sharing every grad_y tile load), loops over out
    tiles computing ``grad_y @ W[:, i_tile, j]`` with ``tl.dot`` and multiplies by
    ``dB_j/dx`` (de Boor derivative from the order k-1 values), plus
    ``(grad_y @ base_weight) * silu'(x)``.
  * ``grad_W`` / ``grad_base_weight``: one program per (in tile, out tile, group
    of ``J_PER`` consecutive j, batch split); it loops over the batch rows of its
    split, evaluating the bases of each row tile once and accumulating
    ``B_j^T @ grad_y`` (``silu(x)^T @ grad_y`` for ``j = G + k``) for its j's in
    fp32 registers, and stores one partial per split; the launcher sums the splits
    in a fixed order (the split count depends on shapes and the GPU only). No
    atomics: bit-identical on every run. (Chosen over "one program per (in, out)
    tile looping over everything": all G + k accumulators would not fit in
    registers, and small layers with large batches need the batch split to fill
    the GPU.)

Safety: inputs outside ``[t_0, t_last)`` (NaN and +-inf included) get basis 0 and
are replaced by ``t_0`` before any arithmetic; every interval index is clamped
to ``[0, n_knots - 2]`` before it is used to address knots, and knot addresses
use a clamped feature index, so no load leaves the knot table. Batch-row and
coefficient offsets are computed in int64.

Limits: spline order ``k <= MAX_SPLINE_ORDER`` (7: the k+1 values and their
derivatives live in registers, unrolled), ``G + k <= MAX_N_BASIS`` (4096; the
basis loop is a runtime loop, so this only bounds the binary search and the
launcher's coefficient copies). ``tl.dot`` needs tiles >= 16: every tile is
>= 16 and masked.

Layouts expected from the launcher (``kanfast.triton_backend``): knots padded by
k on each side, fp32 ``(in, G + 4k + 1)``; coefficients ``(G + k, in, out)``
(forward) and ``(G + k, out, in)`` (grad_x), contiguous.
"""

import os
from fractions import Fraction
from math import comb, factorial

import triton
import triton.language as tl
from triton import knobs

#: True when this copy of the module was loaded under Triton's interpreter.
INTERPRETED = bool(knobs.runtime.interpret)
#: KANFAST_TRITON_AUTOTUNE=0 (read at import) uses each kernel's first config only:
#: one compile per specialisation, for validation runs that visit many of them.
AUTOTUNE = os.environ.get("KANFAST_TRITON_AUTOTUNE", "1").strip() != "0"

MAX_SPLINE_ORDER = 7
MAX_N_BASIS = 4096


def _cardinal_pieces(k):
    """c[r][p]: B_{m-k+r}(x) = sum_p c[r][p] f^p on [t_m, t_m + h), f = (x - t_m) / h, for
    uniform knots (the cardinal B-spline N_k(k - r + f); exact rationals, rounded once)."""
    out = []
    for r in range(k + 1):
        j = k - r
        row = []
        for p in range(k + 1):
            acc = Fraction(0)
            for l in range(j + 1):
                acc += (-1) ** l * comb(k + 1, l) * comb(k, p) * Fraction(j - l) ** (k - p)
            row.append(float(acc / factorial(k)))
        out.append(tuple(row))
    return tuple(out)


def _flat_tables(tables):
    """(flat tuple, offsets): tables[k][r][p] at flat[offsets[k] + r * len(tables[k][r]) + p] (Triton's
    constexpr tuples index well flat, not nested three deep)."""
    flat, offs = [], []
    for t in tables:
        offs.append(len(flat))
        flat.extend(v for row in t for v in row)
    return tuple(flat), tuple(offs)


_P, _P_OFF = _flat_tables([_cardinal_pieces(k) for k in range(MAX_SPLINE_ORDER + 1)])
_D, _D_OFF = _flat_tables([tuple(tuple((p + 1) * c[p + 1] for p in range(k)) for c in _cardinal_pieces(k))
                           for k in range(MAX_SPLINE_ORDER + 1)])
#: The cardinal pieces of order k as the kernels' Horner constants: c[r][p] of _cardinal_pieces(k) at
#: _PIECES[_PIECES_OFF[k] + r * (k + 1) + p]; those of d/df (degree k - 1, k >= 1) at
#: _DPIECES[_DPIECES_OFF[k] + r * k + p].
_PIECES = tl.constexpr(_P)
_PIECES_OFF = tl.constexpr(_P_OFF)
_DPIECES = tl.constexpr(_D)
_DPIECES_OFF = tl.constexpr(_D_OFF)


def _configs(kind):
    if INTERPRETED:  # no autotuning under the interpreter: one small config
        extra = {"J_PER": 2} if kind in ("bwd_x", "bwd_w") else {}
        return [triton.Config({"BLOCK_N": 16, "BLOCK_I": 16, "BLOCK_O": 16, **extra}, num_warps=1)]
    # (BLOCK_N, BLOCK_I, BLOCK_O, warps, stages); register use checked offline with
    # ptxas for sm_90 (k = 3, fp32 and bf16): the first entry of each list spills in
    # neither dtype, and each list keeps several spill-free options.
    if kind == "fwd":
        shapes = [(64, 32, 128, 8, 3), (64, 16, 64, 4, 2), (32, 32, 64, 4, 3), (128, 16, 128, 8, 3)]
    elif kind == "bwd_x":  # (BLOCK_N, BLOCK_I, BLOCK_O, J_PER, warps, stages)
        shapes = [(64, 32, 32, 1, 8, 3), (64, 32, 32, 2, 8, 3), (64, 32, 32, 4, 8, 3), (64, 32, 64, 2, 8, 3),
                  (128, 32, 32, 2, 8, 3)]
        if not AUTOTUNE:
            shapes = shapes[:1]
        return [triton.Config({"BLOCK_N": n, "BLOCK_I": i, "BLOCK_O": o, "J_PER": j}, num_warps=w, num_stages=s)
                for n, i, o, j, w, s in shapes]
    else:  # (BLOCK_N, BLOCK_I, BLOCK_O, J_PER, warps, stages)
        shapes = [(32, 64, 128, 1, 8, 3), (32, 64, 64, 2, 8, 3), (32, 64, 64, 4, 8, 3), (32, 32, 64, 4, 4, 3),
                  (32, 64, 128, 2, 8, 3), (32, 32, 32, 2, 4, 2)]
        if not AUTOTUNE:
            shapes = shapes[:1]
        return [triton.Config({"BLOCK_N": n, "BLOCK_I": i, "BLOCK_O": o, "J_PER": j}, num_warps=w, num_stages=s)
                for n, i, o, j, w, s in shapes]
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
def _j_range(b_m, m_in, NB, K: tl.constexpr):
    """[j_lo, j_hi): basis indices that are non-zero somewhere in the tile (empty if none).

    (tl.reduce with local combine functions rather than tl.min/tl.max, so that a
    privately interpreted copy of this module needs no jit'd triton.language helper.)
    """
    j_lo = tl.reduce(tl.reduce(tl.where(m_in, b_m - K, NB), 1, _min_combine), 0, _min_combine)
    j_hi = tl.reduce(tl.reduce(tl.where(m_in, b_m + 1, 0), 1, _max_combine), 0, _max_combine)
    return tl.maximum(j_lo, 0), tl.minimum(j_hi, NB)


@triton.autotune(configs=_configs("fwd"), key=["IN", "OUT", "NB", "K", "UNIFORM", "HAS_BASE", "PREC"])
@triton.jit(do_not_specialize=["N"])
def kan_fwd_kernel(
    p_x, p_t, p_t0, p_tn, p_hinv, p_w, p_wb, p_y,
    N, IN, OUT, NB, n_knots, n_steps,
    s_xn, s_xi, s_wbo, s_wbi, s_yn, s_yo,
    UNIFORM: tl.constexpr, K: tl.constexpr, HAS_BASE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """y (N, OUT) = sum_i,j B_j(x) W[j, i, :] (+ silu(x) @ base_weight^T); W (NB, IN, OUT)."""
    pid_n = tl.program_id(0)
    pid_o = tl.program_id(1)
    o_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    m_n = o_n < N
    m_o = o_o < OUT
    NP = n_knots + 2 * K
    b_acc = tl.full((BLOCK_N, BLOCK_O), 0, tl.float32)
    for i0 in range(0, IN, BLOCK_I):
        o_i = i0 + tl.arange(0, BLOCK_I)
        m_i = o_i < IN
        o_ic = tl.minimum(o_i, IN - 1)
        m_x = m_n[:, None] & m_i[None, :]
        b_x = tl.load(p_x + o_n[:, None] * s_xn + o_i[None, :] * s_xi, mask=m_x, other=0.0).to(tl.float32)
        b_t0 = tl.load(p_t0 + o_ic)[None, :]
        b_tn = tl.load(p_tn + o_ic)[None, :]
        b_hinv = tl.load(p_hinv + o_ic)[None, :]
        p_row = p_t + ((o_ic.to(tl.int64) * NP + K) * (K + 1))[None, :]
        b_m, m_in, vals, dvals = _local_bases(b_x, m_x, p_row, b_t0, b_tn, b_hinv, n_knots, n_steps,
                                              UNIFORM, K, False)
        j_lo, j_hi = _j_range(b_m, m_in, NB, K)
        m_w = m_i[:, None] & m_o[None, :]
        for j in range(j_lo, j_hi):
            b_b = _select(vals, j - b_m + K, K)
            p_wj = p_w + tl.cast(j, tl.int64) * IN * OUT + o_i[:, None].to(tl.int64) * OUT + o_o[None, :]
            b_w = tl.load(p_wj, mask=m_w, other=0.0)
            b_acc = tl.dot(b_b.to(b_w.dtype), b_w, b_acc, input_precision=PREC)
        if HAS_BASE:
            b_s = tl.where(m_x, _silu(b_x), 0.0)
            b_wb = tl.load(p_wb + o_o[None, :] * s_wbo + o_i[:, None] * s_wbi, mask=m_w, other=0.0)
            b_acc = tl.dot(b_s.to(b_wb.dtype), b_wb, b_acc, input_precision=PREC)
    p_out = p_y + o_n[:, None] * s_yn + o_o[None, :] * s_yo
    tl.store(p_out, b_acc.to(p_y.dtype.element_ty), mask=m_n[:, None] & m_o[None, :])


@triton.autotune(configs=_configs("bwd_x"), key=["IN", "OUT", "NB", "K", "UNIFORM", "HAS_BASE", "PREC"])
@triton.jit(do_not_specialize=["N"])
def kan_bwd_x_kernel(
    p_x, p_t, p_t0, p_tn, p_hinv, p_wt, p_wb, p_gy, p_gx,
    N, IN, OUT, NB, n_knots, n_steps,
    s_xn, s_xi, s_wbo, s_wbi, s_gn, s_go, s_gxn, s_gxi,
    UNIFORM: tl.constexpr, K: tl.constexpr, HAS_BASE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr, J_PER: tl.constexpr,
):
    """grad_x (N, IN) = sum_j (grad_y @ Wt[j]) * dB_j/dx (+ (grad_y @ base_weight) * silu'(x)); Wt (NB, OUT, IN)."""
    pid_n = tl.program_id(0)
    pid_i = tl.program_id(1)
    o_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    m_n = o_n < N
    m_i = o_i < IN
    o_ic = tl.minimum(o_i, IN - 1)
    m_x = m_n[:, None] & m_i[None, :]
    NP = n_knots + 2 * K
    b_x = tl.load(p_x + o_n[:, None] * s_xn + o_i[None, :] * s_xi, mask=m_x, other=0.0).to(tl.float32)
    b_t0 = tl.load(p_t0 + o_ic)[None, :]
    b_tn = tl.load(p_tn + o_ic)[None, :]
    b_hinv = tl.load(p_hinv + o_ic)[None, :]
    p_row = p_t + ((o_ic.to(tl.int64) * NP + K) * (K + 1))[None, :]
    b_m, m_in, vals, dvals = _local_bases(b_x, m_x, p_row, b_t0, b_tn, b_hinv, n_knots, n_steps, UNIFORM, K, True)
    j_lo, j_hi = _j_range(b_m, m_in, NB, K)
    b_gx = tl.full((BLOCK_N, BLOCK_I), 0, tl.float32)
    # J_PER consecutive j share each grad_y tile load; j >= NB is masked off (no such rows in Wt)
    for j0 in range(j_lo, j_hi, J_PER):
        gs = ()
        for jj in tl.static_range(J_PER):
            gs = gs + (tl.full((BLOCK_N, BLOCK_I), 0, tl.float32),)
        for o0 in range(0, OUT, BLOCK_O):
            o_o = o0 + tl.arange(0, BLOCK_O)
            m_o = o_o < OUT
            b_gy = tl.load(p_gy + o_n[:, None] * s_gn + o_o[None, :] * s_go, mask=m_n[:, None] & m_o[None, :], other=0.0)
            new = ()
            for jj in tl.static_range(J_PER):
                p_wj = p_wt + tl.cast(j0 + jj, tl.int64) * OUT * IN + o_o[:, None].to(tl.int64) * IN + o_i[None, :]
                b_w = tl.load(p_wj, mask=(m_o & ((o_o * 0 + (j0 + jj)) < NB))[:, None] & m_i[None, :], other=0.0)
                new = new + (tl.dot(b_gy.to(b_w.dtype), b_w, gs[jj], input_precision=PREC),)
            gs = new
        for jj in tl.static_range(J_PER):
            b_gx += gs[jj] * _select(dvals, j0 + jj - b_m + K, K)
    if HAS_BASE:
        b_g = tl.full((BLOCK_N, BLOCK_I), 0, tl.float32)
        for o0 in range(0, OUT, BLOCK_O):
            o_o = o0 + tl.arange(0, BLOCK_O)
            m_o = o_o < OUT
            b_gy = tl.load(p_gy + o_n[:, None] * s_gn + o_o[None, :] * s_go, mask=m_n[:, None] & m_o[None, :], other=0.0)
            b_wb = tl.load(p_wb + o_o[:, None] * s_wbo + o_i[None, :] * s_wbi, mask=m_o[:, None] & m_i[None, :], other=0.0)
            b_g = tl.dot(b_gy.to(b_wb.dtype), b_wb, b_g, input_precision=PREC)
        b_sig = 1.0 / (1.0 + tl.exp(-b_x))
        b_gx += b_g * (b_sig * (1.0 + b_x * (1.0 - b_sig)))
    tl.store(p_gx + o_n[:, None] * s_gxn + o_i[None, :] * s_gxi, b_gx.to(p_gx.dtype.element_ty), mask=m_x)


@triton.autotune(configs=_configs("bwd_w"), key=["IN", "OUT", "NB", "K", "UNIFORM", "HAS_BASE", "PREC"])
@triton.jit(do_not_specialize=["N", "rows_per_split"])
def kan_bwd_w_kernel(
    p_x, p_t, p_t0, p_tn, p_hinv, p_gy, p_gw,
    N, IN, OUT, NB, n_knots, n_steps, rows_per_split,
    s_xn, s_xi, s_gn, s_go,
    UNIFORM: tl.constexpr, K: tl.constexpr, HAS_BASE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr, J_PER: tl.constexpr,
):
    """Partial gradients gw (splits, NB + HAS_BASE, IN, OUT) fp32: gw[s, j] = B_j(x_s)^T @ grad_y_s
    (j = NB: silu(x_s)^T @ grad_y_s), over the rows of batch split s.

    Each program owns J_PER consecutive j (one fp32 accumulator each), so the de Boor
    evaluation of a row tile is shared by J_PER tl.dot's."""
    pid_io = tl.program_id(0)
    j0 = tl.program_id(1) * J_PER
    pid_s = tl.program_id(2)
    n_tiles_o = (OUT + BLOCK_O - 1) // BLOCK_O
    pid_i = pid_io // n_tiles_o
    pid_o = pid_io % n_tiles_o
    o_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    o_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    m_i = o_i < IN
    m_o = o_o < OUT
    o_ic = tl.minimum(o_i, IN - 1)
    NP = n_knots + 2 * K
    b_t0 = tl.load(p_t0 + o_ic)[None, :]
    b_tn = tl.load(p_tn + o_ic)[None, :]
    b_hinv = tl.load(p_hinv + o_ic)[None, :]
    p_row = p_t + ((o_ic.to(tl.int64) * NP + K) * (K + 1))[None, :]
    n_start = pid_s.to(tl.int64) * rows_per_split
    n_end = tl.minimum(n_start + rows_per_split, N)
    accs = ()
    for jj in tl.static_range(J_PER):
        accs = accs + (tl.full((BLOCK_I, BLOCK_O), 0, tl.float32),)
    for n0 in range(n_start, n_end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < n_end
        m_x = m_n[:, None] & m_i[None, :]
        b_x = tl.load(p_x + o_n[:, None] * s_xn + o_i[None, :] * s_xi, mask=m_x, other=0.0).to(tl.float32)
        b_gy = tl.load(p_gy + o_n[:, None] * s_gn + o_o[None, :] * s_go, mask=m_n[:, None] & m_o[None, :], other=0.0)
        b_m, m_in, vals, dvals = _local_bases(b_x, m_x, p_row, b_t0, b_tn, b_hinv, n_knots, n_steps, UNIFORM, K, False)
        b_s = tl.where(m_x, _silu(b_x), 0.0)
        new = ()
        for jj in tl.static_range(J_PER):
            # j >= NB (other than the base slot) selects values of bases that do not exist:
            # computed, never stored
            b_b = _select(vals, j0 + jj - b_m + K, K)
            if HAS_BASE:
                b_b = tl.where(j0 + jj == NB, b_s, b_b)
            new = new + (tl.dot(tl.trans(b_b.to(b_gy.dtype)), b_gy, accs[jj], input_precision=PREC),)
        accs = new
    m_io = m_i[:, None] & m_o[None, :]
    for jj in tl.static_range(J_PER):
        o_row = (pid_s.to(tl.int64) * (NB + HAS_BASE) + j0 + jj) * IN + o_i
        p_out = p_gw + o_row[:, None] * OUT + o_o[None, :]
        tl.store(p_out, accs[jj], mask=m_io & ((o_o * 0 + (j0 + jj))[None, :] < NB + HAS_BASE))
