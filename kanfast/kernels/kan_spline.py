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
basis loop is a runtime loop, so this only bounds the binary search and the
launcher's coefficient copies). ``tl.dot`` needs tiles >= 16: every dot
dimension is >= 16 (grad_W's BLOCK_I may be 8: its dot's N is SLOTS * BLOCK_I)
and masked.

Layouts expected from the launcher (``kanfast.triton_backend``): knots padded by
k on each side, fp32 ``(in, G + 4k + 1)``; coefficients ``(G + k, in, out)``
(forward) and ``(G + k, out, in)`` (grad_x), contiguous; grad_W partials
``(splits, out, G + k, in)`` fp32 (each accumulator row is an out index, its
columns slot-major), grad_base_weight partials ``(splits, in, out)`` fp32.
"""

import os

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


#: kan_bwd_w_kernel's configs (BLOCK_N, BLOCK_I, BLOCK_O, SLOTS, warps, stages), from the static
#: model (benchmarks/gpu_model.py) at batch 65536, in = out = 1024, k = 3, bf16, sm_90: all three
#: without spills (223-241 registers), HGMMA 64x128x16 (M = BLOCK_O = 256 over two warpgroups,
#: N = SLOTS * BLOCK_I = 128), 1 CTA of 8 warps per SM (registers: the 256 x 128 fp32 accumulator
#: takes 128 per thread). The first (pinned under torch.use_deterministic_algorithms) also compiles
#: without spills for sm_80; the second is the model's pick at G = 5 (2.25 vs 2.33 ms), the
#: third at G = 50 (16 slots a chunk: 4 chunks of basis evaluation instead of 7; 15.5 vs
#: 15.6 / 16.2 ms).
BWD_W_SHAPES = [(32, 16, 256, 8, 8, 3), (64, 16, 256, 8, 8, 2), (32, 8, 256, 16, 8, 3)]
#: kan_bwd_base_kernel's configs (BLOCK_N, BLOCK_I, BLOCK_O, warps, stages): HGMMA, no spills on
#: sm_90 (the first also on sm_80); the first two model at 0.22 ms at the shape above.
BWD_BASE_SHAPES = [(32, 128, 256, 8, 3), (64, 128, 256, 8, 3), (32, 64, 128, 4, 3)]


def _configs(kind):
    if INTERPRETED:  # no autotuning under the interpreter: one small config
        extra = {"J_PER": 2} if kind == "bwd_x" else {"SLOTS": 4} if kind == "bwd_w" else {}
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
def _local_bases(b_x, m_valid, p_row, b_t0, b_tn, b_h, n_knots, n_steps,
                 UNIFORM: tl.constexpr, K: tl.constexpr, DERIV: tl.constexpr):
    """Interval index, inside-mask, the k+1 non-zero bases and their derivatives.

    b_x (BN, BI) fp32; p_row (1, BI) pointers to t_0 of each (clamped) feature in the
    padded knot table (valid offsets -K .. n_knots-1+K); b_t0/b_tn/b_h (1, BI).
    Returns b_m (int32, in [0, n_knots-2]), m_in, vals = (B_{m-K}, .., B_m),
    dvals = their d/dx (or vals again when DERIV is False).
    """
    m_in = (b_x >= b_t0) & (b_x < b_tn) & m_valid  # False for NaN/inf
    b_xs = tl.where(m_in, b_x, b_t0)
    if UNIFORM:
        b_m = tl.floor((b_xs - b_t0) / b_h).to(tl.int32)
        b_m = tl.minimum(tl.maximum(b_m, 0), n_knots - 2)
        b_tm = tl.load(p_row + b_m)
        b_m = tl.where(b_xs < b_tm, b_m - 1, b_m)
        b_m = tl.minimum(tl.maximum(b_m, 0), n_knots - 2)
        b_tm1 = tl.load(p_row + b_m + 1)
        b_m = tl.where(b_xs >= b_tm1, b_m + 1, b_m)
        b_m = tl.minimum(tl.maximum(b_m, 0), n_knots - 2)
        b_u = (b_xs - tl.load(p_row + b_m)) / b_h
        lefts = ()
        rights = ()
        for r in tl.static_range(K):
            lefts = lefts + (b_u + r,)  # (x - t_{m-r}) / h
            rights = rights + ((r + 1) - b_u,)  # (t_{m+1+r} - x) / h
    else:
        # largest m with t_m <= x: invariant t_lo <= x < t_hi
        b_lo = tl.full(b_x.shape, 0, tl.int32)
        b_hi = b_lo + (n_knots - 1)
        for _ in range(n_steps):
            b_mid = (b_lo + b_hi) // 2
            m_le = tl.load(p_row + b_mid) <= b_xs
            b_lo = tl.where(m_le, b_mid, b_lo)
            b_hi = tl.where(m_le, b_hi, b_mid)
        b_m = tl.minimum(tl.maximum(b_lo, 0), n_knots - 2)
        lefts = ()
        rights = ()
        for r in tl.static_range(K):
            lefts = lefts + (b_xs - tl.load(p_row + b_m - r),)
            rights = rights + (tl.load(p_row + b_m + 1 + r) - b_xs,)

    b_one = tl.full(b_x.shape, 1.0, tl.float32)
    vals = (b_one,)
    prev = vals
    for p in tl.static_range(1, K + 1):
        prev = vals
        b_saved = tl.full(b_x.shape, 0, tl.float32)
        new = ()
        for r in tl.static_range(p):
            b_tmp = vals[r] / (rights[r] + lefts[p - r - 1])
            new = new + (b_saved + rights[r] * b_tmp,)
            b_saved = lefts[p - r - 1] * b_tmp
        vals = new + (b_saved,)

    out = ()
    for r in tl.static_range(K + 1):
        out = out + (tl.where(m_in, vals[r], 0.0),)

    dout = out
    if DERIV:
        dout = ()
        for r in tl.static_range(K + 1):
            if K == 0:
                b_d = tl.full(b_x.shape, 0, tl.float32)
            elif UNIFORM:
                # dB_{i,K} = (B_{i,K-1} - B_{i+1,K-1}) / h, i = m-K+r; prev[s] = B_{m-K+1+s,K-1}
                if r == 0:
                    b_d = -prev[0]
                elif r == K:
                    b_d = prev[K - 1]
                else:
                    b_d = prev[r - 1] - prev[r]
                b_d = b_d / b_h
            else:
                b_d = tl.full(b_x.shape, 0, tl.float32)
                if r > 0:  # + K B_{i,K-1} / (t_{i+K} - t_i) with t_i = t_{m-K+r}
                    b_den = tl.load(p_row + b_m + r) - tl.load(p_row + b_m - K + r)
                    b_d += tl.where(b_den > 0, prev[r - 1] / tl.where(b_den > 0, b_den, 1.0), 0.0)
                if r < K:  # - K B_{i+1,K-1} / (t_{i+K+1} - t_{i+1})
                    b_den = tl.load(p_row + b_m + r + 1) - tl.load(p_row + b_m - K + r + 1)
                    b_d -= tl.where(b_den > 0, prev[r] / tl.where(b_den > 0, b_den, 1.0), 0.0)
                b_d = b_d * K
            dout = dout + (tl.where(m_in, b_d, 0.0),)
    return b_m, m_in, out, dout


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
    p_x, p_t, p_t0, p_tn, p_h, p_w, p_wb, p_y,
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
        b_h = tl.load(p_h + o_ic)[None, :]
        p_row = p_t + (o_ic.to(tl.int64) * NP + K)[None, :]
        b_m, m_in, vals, dvals = _local_bases(b_x, m_x, p_row, b_t0, b_tn, b_h, n_knots, n_steps,
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
    p_x, p_t, p_t0, p_tn, p_h, p_wt, p_wb, p_gy, p_gx,
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
    b_h = tl.load(p_h + o_ic)[None, :]
    p_row = p_t + (o_ic.to(tl.int64) * NP + K)[None, :]
    b_m, m_in, vals, dvals = _local_bases(b_x, m_x, p_row, b_t0, b_tn, b_h, n_knots, n_steps, UNIFORM, K, True)
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


@triton.autotune(configs=_configs("bwd_w"), key=["IN", "OUT", "NB", "K", "UNIFORM", "PREC"])
@triton.jit(do_not_specialize=["N", "rows_per_split"])
def kan_bwd_w_kernel(
    p_x, p_t, p_t0, p_tn, p_h, p_gy, p_gw,
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
    b_h = tl.load(p_h + o_ic)
    p_row = p_t + (o_ic.to(tl.int64) * NP + K)
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
        b_m, m_in, vals, dvals = _local_bases(b_x, m_x, p_row, b_t0, b_tn, b_h, n_knots, n_steps, UNIFORM, K, False)
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
