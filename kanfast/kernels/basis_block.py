"""Dense basis blocks for the Triton backend's wide-layer path (Triton kernels).

Algorithm
---------
The wide-layer path (``kanfast.triton_backend``, chosen by ``use_wide_path``)
writes the KAN layer as one dense product per chunk of batch rows, the CPU
engine's design on the GPU:

    D[n, :] = [ silu(x[n, 0..IN-1]) | B_0..B_{NB-1}(x[n, 0]), 0.. | ... | B_0..B_{NB-1}(x[n, IN-1]), 0.. ]
    y_chunk = D @ Wcat^T,   Wcat = [ base_weight | pad(coef).reshape(OUT, IN * NBP) ]   (OUT, C)

with ``NB = G + k`` bases per feature stored in ``NBP`` columns (``NB`` rounded up
to a multiple of 8, so each feature's slice starts 16-byte aligned in 16-bit D
and the stores vectorise; the padding columns hold zeros in D and in Wcat) and
``C = IN * NBP (+ IN with a base branch)``: the column of ``B_j(x_i)`` is
``BASE + i * NBP + j`` (``BASE = IN`` or 0), the order of ``reshape`` for the
contiguous zero-padded ``coef`` of shape ``(OUT, IN, NBP)``.

* :func:`basis_block_kernel` fills ``D`` for a chunk of rows: one program per
  (row tile, input tile) finds each element's knot interval ``m`` by a binary
  search over that feature's stored knots (exact on every grid, uniform or not),
  evaluates the ``k + 1`` non-zero bases ``B_{m-k..m}`` by de Boor's triangle
  (NURBS Book alg. A2.2) in fp32 registers, and stores them into the
  ``(BLOCK_N, BLOCK_I, NBP)`` block in ``BLOCK_J``-wide slices (zeros elsewhere),
  contiguous along j, in D's dtype. The products with ``Wcat`` are
  ``torch.matmul`` calls (cuBLAS on the GPU), made by the launcher.
* :func:`basis_grad_x_kernel` finishes grad_x from ``gD = grad_y_chunk @ Wcat``
  (rows, C): ``grad_x[n, i] = gD[n, i] * silu'(x) + sum_r gD[n, BASE + i*NBP + m-k+r]
  * dB_{m-k+r}/dx`` -- it reads only the ``k + 2`` columns of gD that can be
  non-zero for each element (gathered), recomputing ``m`` and the derivatives.

Saved vs recomputed: the launcher saves only x (and the parameters); the basis
block of each chunk is recomputed in the backward (grad_W = grad_y^T @ D and
grad_x above), so memory is flat in batch size: one D and one gD buffer of
``chunk_rows x C`` elements, whatever the batch.

Semantics are those of the fused kernels (:mod:`kanfast.kernels.kan_spline`) and
of :mod:`kanfast.reference`: inputs outside ``[t_0, t_last)`` (NaN and +-inf
included) get basis 0 and derivative 0 and are replaced by ``t_0`` before any
arithmetic; the SiLU column carries them as ``x / (1 + exp(-x))`` does (NaN/inf
as the reference's base term).

Safety: every interval index is clamped to ``[0, n_knots - 2]`` before it
addresses knots; knot addresses use a clamped feature index; basis columns
outside ``[0, NB)`` are masked; row offsets are int64. No load or store leaves
its tensor.

Limits: ``k <= MAX_SPLINE_ORDER`` (7, the k + 1 values live in registers,
unrolled); knots padded by k on each side, fp32 ``(IN, n_knots + 2k)`` (the
launcher's table, shared with the fused kernels). D and gD rows contiguous.
Tiles (launcher, sm_90): block kernel 16 x 16 x 8 with 4 warps, grad_x
kernel 32 x 16 with 4 warps; ptxas reports no spills for k = 1..7 (the 3-D
store tile holds the k + 1 broadcast values, so registers grow with k: 162 at k = 3).
"""

import triton
import triton.language as tl
from triton import knobs

#: True when this copy of the module was loaded under Triton's interpreter.
INTERPRETED = bool(knobs.runtime.interpret)

MAX_SPLINE_ORDER = 7


@triton.jit
def _silu(b_x):
    return b_x / (1.0 + tl.exp(-b_x))


@triton.jit
def _bases(b_x, m_valid, p_row, b_t0, b_tn, n_knots, n_steps, K: tl.constexpr, DERIV: tl.constexpr):
    """Interval index m (int32 in [0, n_knots-2]), inside mask, (B_{m-K}..B_m) and, when
    DERIV, their d/dx (else the values again). p_row (1, BI): pointers to t_0 of each
    (clamped) feature in the padded knot table; b_t0/b_tn (1, BI)."""
    m_in = (b_x >= b_t0) & (b_x < b_tn) & m_valid  # False for NaN/inf
    b_xs = tl.where(m_in, b_x, b_t0)
    # largest m with t_m <= x, by bisection on the stored knots: t_lo <= x < t_hi
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
        lefts = lefts + (b_xs - tl.load(p_row + b_m - r),)  # x - t_{m-r}
        rights = rights + (tl.load(p_row + b_m + 1 + r) - b_xs,)  # t_{m+1+r} - x

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
            b_d = tl.full(b_x.shape, 0, tl.float32)
            if K > 0:
                if r > 0:  # + K B_{i,K-1} / (t_{i+K} - t_i), i = m-K+r; prev[s] = B_{m-K+1+s,K-1}
                    b_den = tl.load(p_row + b_m + r) - tl.load(p_row + b_m - K + r)
                    b_d += tl.where(b_den > 0, prev[r - 1] / tl.where(b_den > 0, b_den, 1.0), 0.0)
                if r < K:  # - K B_{i+1,K-1} / (t_{i+K+1} - t_{i+1})
                    b_den = tl.load(p_row + b_m + r + 1) - tl.load(p_row + b_m - K + r + 1)
                    b_d -= tl.where(b_den > 0, prev[r] / tl.where(b_den > 0, b_den, 1.0), 0.0)
                b_d = b_d * K
            dout = dout + (tl.where(m_in, b_d, 0.0),)
    return b_m, m_in, out, dout


@triton.jit
def _tile_bases(p_x, p_t, p_t0, p_tn, N, IN, n_knots, n_steps, s_xn, s_xi, K: tl.constexpr, DERIV: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):
    """This program's (BLOCK_N rows, BLOCK_I features) tile: offsets, mask, x (fp32) and its bases (see
    :func:`_bases`), shared by both kernels."""
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
    p_row = p_t + (o_ic.to(tl.int64) * NP + K)[None, :]
    b_m, m_in, vals, dvals = _bases(b_x, m_x, p_row, b_t0, b_tn, n_knots, n_steps, K, DERIV)
    return o_n, o_i, m_x, b_x, b_m, m_in, vals, dvals


@triton.jit(do_not_specialize=["N"])
def basis_block_kernel(
    p_x, p_t, p_t0, p_tn, p_d,
    N, IN, NB, n_knots, n_steps,
    s_xn, s_xi, s_dn,
    K: tl.constexpr, HAS_BASE: tl.constexpr, NBP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """D (N, IN*NBP (+ IN)) = [silu(x) | B_j(x_i) at column BASE + i*NBP + j], in D's dtype
    (columns NB <= j < NBP: zeros)."""
    o_n, o_i, m_x, b_x, b_m, m_in, vals, dvals = _tile_bases(p_x, p_t, p_t0, p_tn, N, IN, n_knots, n_steps, s_xn, s_xi,
                                                             K, False, BLOCK_N, BLOCK_I)
    p_drow = p_d + o_n[:, None] * s_dn  # (BN, 1)
    if HAS_BASE:
        tl.store(p_drow + o_i[None, :], _silu(b_x).to(p_d.dtype.element_ty), mask=m_x)
    base = IN if HAS_BASE else 0
    # (BN, BI, BJ) slices of the block, contiguous along j; slot s = j - (m - K) in [0, K] holds vals[s]
    p_blk = p_drow[:, :, None] + (base + o_i.to(tl.int64) * NBP)[None, :, None]
    m_blk = m_x[:, :, None]
    b_m3 = b_m[:, :, None]
    for j0 in range(0, NBP, BLOCK_J):
        o_j = j0 + tl.arange(0, BLOCK_J)
        b_s = o_j[None, None, :] - b_m3 + K
        b_v = tl.full((BLOCK_N, BLOCK_I, BLOCK_J), 0, tl.float32)
        for r in tl.static_range(K + 1):
            b_v = tl.where(b_s == r, vals[r][:, :, None], b_v)
        b_v = tl.where((o_j < NB)[None, None, :], b_v, 0.0)  # j >= NB: padding (no such basis)
        tl.store(p_blk + o_j[None, None, :], b_v.to(p_d.dtype.element_ty), mask=m_blk & (o_j < NBP)[None, None, :])


@triton.jit(do_not_specialize=["N"])
def basis_grad_x_kernel(
    p_x, p_t, p_t0, p_tn, p_gd, p_gx,
    N, IN, NB, n_knots, n_steps,
    s_xn, s_xi, s_gdn, s_gxn, s_gxi,
    K: tl.constexpr, HAS_BASE: tl.constexpr, NBP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """grad_x (N, IN) = sum_r gD[:, BASE + i*NBP + m-K+r] * dB_{m-K+r}/dx (+ gD[:, i] * silu'(x)),
    gD = grad_y @ Wcat in the layout of basis_block_kernel; fp32 arithmetic."""
    o_n, o_i, m_x, b_x, b_m, m_in, vals, dvals = _tile_bases(p_x, p_t, p_t0, p_tn, N, IN, n_knots, n_steps, s_xn, s_xi,
                                                             K, True, BLOCK_N, BLOCK_I)
    p_grow = p_gd + o_n[:, None] * s_gdn
    base = IN if HAS_BASE else 0
    p_col = p_grow + base + o_i[None, :].to(tl.int64) * NBP
    b_gx = tl.full((BLOCK_N, BLOCK_I), 0, tl.float32)
    for r in tl.static_range(K + 1):
        b_j = b_m - K + r
        m_j = m_in & (b_j >= 0) & (b_j < NB)
        b_g = tl.load(p_col + tl.where(m_j, b_j, 0), mask=m_j, other=0.0).to(tl.float32)
        b_gx += b_g * dvals[r]
    if HAS_BASE:
        b_g = tl.load(p_grow + o_i[None, :], mask=m_x, other=0.0).to(tl.float32)
        b_sig = 1.0 / (1.0 + tl.exp(-b_x))
        b_gx += b_g * (b_sig * (1.0 + b_x * (1.0 - b_sig)))
    tl.store(p_gx + o_n[:, None] * s_gxn + o_i[None, :] * s_gxi, b_gx.to(p_gx.dtype.element_ty), mask=m_x)
