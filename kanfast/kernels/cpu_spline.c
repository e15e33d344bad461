/* Fused B-spline block kernels for the CPU engine (kanfast.torch_backend), uniform knots.
 *
 * Algorithm (Liu et al. 2024, eq. 2.10 with efficient-kan's layer; one feature group, one
 * chunk of rows; the caller's GEMMs do the contraction):
 *   kf_fill:   for every row b and input feature i of the group, the span m with
 *              c_m <= x < c_{m+1} on the computed knots c_m = t_0 + m h (the closed form
 *              floor((x - t_0) / h), within one of it, moved by one against c_m and c_{m+1};
 *              the caller's uniformity test holds the stored knots within a few eps h of c_m;
 *              the sentinel span n - 1 for inputs outside [t_0, t_last), NaN and +-inf
 *              included), the local coordinate f = (x - c_m) / h (not u - floor(u), whose
 *              rounding grows with the knots' magnitude and with m), and
 *              the k + 1 non-zero bases B_{m-k+r}(x) = P_r(f) (P_r the cardinal pieces,
 *              Horner's rule); then the row of the dense basis-major block
 *              [silu(x) | B_0 | ... | B_{C-off-1}], column block c holding, for each
 *              feature, the value of the slot r with m - k + r = c - off, or 0.
 *   kf_grad_x: the same spans, then grad_x[b, i] = g[b, 0, i] * silu'(x) (when off) +
 *              sum_r g[b, off + m - k + r, i] * Q_r(f) over the slots whose column exists,
 *              with g = grad_y @ W' the block the caller's GEMM wrote and Q_r the local
 *              polynomials of the weight W' it used (the derivative spline's order-(k-1)
 *              bases, or the bases' derivatives: the caller's choice, its 1/h folded in W').
 * Two ways to place the slots (the caller's ``direct`` flag): compare m with every column's
 * index and select (vectorised; (G + k + 1) (k + 1) compares per input, cheap for small G), or
 * zero the row and store / load only the slots whose column index m - k + r lies in [0, C - off)
 * (k + 1 per input, for large G). Either way an address is formed only from a column index
 * checked to be inside the row, so no input value (NaN, +-inf, out of range) can make a load or
 * store leave its row.
 *
 * Saved vs recomputed: nothing is kept between calls; spans and bases are recomputed from x
 * in every call (the engine saves only x for backward).
 *
 * Size limits: rows and strides int64; fw (features per group) any; the caller's work buffer
 * holds (R + 2) * fw elements (R = number of polynomials); k and the polynomial degree are
 * the caller's (<= 16 by kanfast.kernels.cpu_spline). Floats: the same IEEE operations as
 * the torch path for the spans (compiled with -ffp-contract=off, no fast-math: a span is
 * never decided differently from the caller's interior check); silu and silu' through an
 * exp accurate to ~1 ulp (float: Cephes' polynomial; double: libm).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

#ifndef KF_BODY

int kf_abi_version(void) { return 6; }

/* 1 when built with OpenMP (the one-entry calls can then split themselves across the caller's team) */
int kf_openmp(void) {
#if defined(_OPENMP)
    return 1;
#else
    return 0;
#endif
}

/* exp for float, vectorisable (Cephes expf: range reduction by ln 2, degree-6 polynomial).
 * Arguments below -87.3 give exp(-87.3) (~1e-38: 1 + e rounds to 1, as it would for the exact
 * value), above 88.3 +inf, so that silu and silu' of -inf are NaN as in torch; NaN arguments
 * give a finite value here but reach the result through x. */
static inline float kf_expf(float a) {
    float x = a < -87.3f ? -87.3f : a;
    x = x > 88.3f ? 88.3f : x;
    x = x == x ? x : 0.0f; /* NaN: any finite value (the caller's x carries the NaN); no UB in the cast */
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } s;
    s.i = ((int32_t)n + 127) << 23;
    return a > 88.3f ? INFINITY : p * s.f;
}

static inline double kf_exp(double x) { return exp(x); }

#define KF_BODY
#define T float
#define SFX(name) name##_f32
#define FLOOR floorf
#define EXP kf_expf
#include __FILE__
#undef T
#undef SFX
#undef FLOOR
#undef EXP
#define T double
#define SFX(name) name##_f64
#define FLOOR floor
#define EXP kf_exp
#include __FILE__

#else /* KF_BODY: the kernels for one element type T (included once per type above) */

/* spans of one row: m (as T: exact small integers; the sentinel n - 1 outside) and f, on the
 * computed knots c_m = t0 + m h: the float ops of kanfast.torch_backend._closed_form_span */
static inline void SFX(kf_spans)(int64_t fw, const T* restrict xr, const T* restrict h, const T* restrict t0,
                                 const T* restrict tn, const T* restrict inv_h, int64_t n, T* restrict m,
                                 T* restrict f) {
    const T sentinel = (T)(n - 1);
    const T last = (T)(n - 2);
    for (int64_t i = 0; i < fw; i++) {
        const T x0 = xr[i];
        int outside = !(x0 < tn[i]) | (x0 < t0[i]); /* NaN: outside */
        const T xi = outside ? t0[i] : x0;
        T mi = FLOOR((xi - t0[i]) * inv_h[i]);
        mi = mi >= (T)0 ? mi : (T)0;
        mi = mi <= last ? mi : last;
        mi = xi < t0[i] + mi * h[i] ? mi - (T)1 : mi; /* the guess is within one of the span */
        mi = mi >= (T)0 ? mi : (T)0;
        mi = xi >= t0[i] + (mi + (T)1) * h[i] ? mi + (T)1 : mi;
        mi = mi <= last ? mi : last;
        const T fi = (xi - (t0[i] + mi * h[i])) * inv_h[i];
        m[i] = outside ? sentinel : mi;
        f[i] = outside ? (T)0 : fi;
    }
}

/* v[r * fw + i] = sum_p poly[r * np + p] f[i]^p for r < R (Horner's rule) */
static inline void SFX(kf_poly)(int64_t fw, int64_t R, int64_t np, const T* restrict poly, const T* restrict f,
                                T* restrict v) {
    for (int64_t r = 0; r < R; r++) {
        const T* c = poly + r * np;
        T* restrict vr = v + r * fw;
        const T top = c[np - 1];
        for (int64_t i = 0; i < fw; i++) vr[i] = top;
        for (int64_t p = np - 2; p >= 0; p--) {
            const T cp = c[p];
            for (int64_t i = 0; i < fw; i++) vr[i] = vr[i] * f[i] + cp;
        }
    }
}

void SFX(kf_fill)(int64_t rows, int64_t fw, const T* x, int64_t sx, const T* h, const T* t0, const T* tn,
                  const T* inv_h,
                  int64_t n, int64_t k, const T* poly, T* out, int64_t so, int64_t off, int64_t C, int64_t direct,
                  T* work) {
    T* restrict m = work;
    T* restrict f = work + fw;
    T* restrict v = work + 2 * fw; /* (k + 1) * fw */
    for (int64_t b = 0; b < rows; b++) {
        const T* restrict xr = x + b * sx;
        T* restrict o = out + b * so;
        SFX(kf_spans)(fw, xr, h, t0, tn, inv_h, n, m, f);
        SFX(kf_poly)(fw, k + 1, k + 1, poly, f, v);
        if (off) /* silu(x) = x / (1 + exp(-x)) */
            for (int64_t i = 0; i < fw; i++) o[i] = xr[i] / ((T)1 + EXP(-xr[i]));
        if (direct) { /* zero the row, then store each input's k + 1 slots whose column exists */
            const T ncol = (T)(C - off);
            memset(o + off * fw, 0, (size_t)((C - off) * fw) * sizeof(T));
            for (int64_t r = 0; r <= k; r++) {
                const T* restrict vr = v + r * fw;
                for (int64_t i = 0; i < fw; i++) {
                    const T col = m[i] - (T)(k - r); /* basis index of slot r */
                    if (col >= 0 && col < ncol) o[(off + (int64_t)col) * fw + i] = vr[i];
                }
            }
            continue;
        }
        for (int64_t c = off; c < C; c++) { /* every column: select by comparing (vectorised) */
            T* restrict oc = o + c * fw;
            for (int64_t i = 0; i < fw; i++) oc[i] = 0;
            for (int64_t r = 0; r <= k; r++) {
                const T want = (T)(c - off + k - r); /* the span whose slot r is basis c - off */
                const T* restrict vr = v + r * fw;
                for (int64_t i = 0; i < fw; i++) oc[i] = m[i] == want ? vr[i] : oc[i];
            }
        }
    }
}

void SFX(kf_grad_x)(int64_t rows, int64_t fw, const T* x, int64_t sx, const T* h, const T* t0, const T* tn,
                    const T* inv_h,
                    int64_t n, int64_t k, int64_t R, int64_t np, const T* poly, const T* g, int64_t sg, int64_t off,
                    int64_t C, int64_t direct, T* gx, int64_t sgx, T* work) {
    T* restrict m = work;
    T* restrict f = work + fw;
    T* restrict q = work + 2 * fw; /* R * fw */
    for (int64_t b = 0; b < rows; b++) {
        const T* restrict xr = x + b * sx;
        const T* restrict gr = g + b * sg;
        T* restrict o = gx + b * sgx;
        SFX(kf_spans)(fw, xr, h, t0, tn, inv_h, n, m, f);
        SFX(kf_poly)(fw, R, np, poly, f, q);
        if (off) { /* silu'(x) = s (1 + x (1 - s)), s = sigmoid(x) */
            for (int64_t i = 0; i < fw; i++) {
                const T s = (T)1 / ((T)1 + EXP(-xr[i]));
                o[i] = gr[i] * (s * ((T)1 + xr[i] * ((T)1 - s)));
            }
        } else {
            for (int64_t i = 0; i < fw; i++) o[i] = 0;
        }
        if (direct) { /* load each input's slots whose column exists */
            const T ncol = (T)(C - off);
            for (int64_t r = 0; r < R; r++) {
                const T* restrict qr = q + r * fw;
                for (int64_t i = 0; i < fw; i++) {
                    const T col = m[i] - (T)(k - r);
                    if (col >= 0 && col < ncol) o[i] += gr[(off + (int64_t)col) * fw + i] * qr[i];
                }
            }
            continue;
        }
        for (int64_t c = off; c < C; c++) {
            const T* restrict gc = gr + c * fw;
            for (int64_t r = 0; r < R; r++) {
                const T want = (T)(c - off + k - r);
                const T* restrict qr = q + r * fw;
                for (int64_t i = 0; i < fw; i++) o[i] += m[i] == want ? gc[i] * qr[i] : (T)0;
            }
        }
    }
}

#endif /* KF_BODY */
/* ------------------------------------------------------------------------------------------
 * Sparse contraction kernels (kf_sparse_*): the sparse path of the CPU engine
 * (kanfast.sparse_backend), the sparse contraction of issue 18.
 *
 * Algorithm: for every row b and input feature i, the span m with t_m <= x < t_{m+1} over the
 * STORED knots t = grid[i] (any non-decreasing knots, no uniformity assumed: by counting the
 * knots <= x for short rows, else a branchless binary search, both vectorised over 64 rows),
 * then the k + 1 non-zero bases B_{m-k..m}(x) by de Boor's triangle (NURBS Book, alg. A2.2: one
 * division per entry, its denominator the knot difference t_{m+r+1} - t_{m+r+1-p} of the
 * Cox-de Boor recursion, a zero denominator (repeated knots) giving 0), contracted directly
 * with the coefficient table, packed per call as Wt (in, nb + 2k, out), nb = G + k: feature i's
 * rows W[i, j, :] (contiguous: the loops over out are vectorised, 64-byte vectors) at row
 * j + k, with k zero rows before and after, so that the k + 1 slots of every span m in
 * [0, n - 2] are the rows m .. m + k (no branch at the ends; slots of bases that do not exist
 * get coefficient 0):
 *     y[b, :] = sum_i ( silu(x_bi) Bt[i, :] + sum_r B_r(x_bi) Wt[i, m_bi + r, :] ).
 * Knot indices outside [0, n) (the bases B_j with j < 0 or j > G + k - 1 that the triangle
 * carries near the ends) read the clamped end knot; those slots are zeroed. Inputs outside
 * [t_0, t_last) (NaN and +-inf included) contribute no spline term (their bases are 0, as in
 * the reference); their SiLU term carries NaN/inf.
 * Sorted tiles (ks_sort_tile): for a tile of rows and one feature, the bases of every row computed
 * (KS_TILE rows at a time), then the rows ordered by span with a stable counting sort (rows of one
 * span contiguous, in row order), so that the k + 1 table rows a span selects are loaded once per
 * run of rows and held in registers (the loads per multiply-add of a row-by-row sweep, and in the
 * backward the loads and stores of the weight-gradient rows, are what bounds the contraction).
 * Forward (kf_sparse_fwd, rows [0, N) of one worker): tiles of R rows; per tile, feature by
 * feature in order, its sorted rows, then per chunk of NV vectors of out and per run of one span:
 * the span's k + 1 table rows and the base row in registers, and per row y loaded, the SiLU term
 * and r = 0..k added, y stored. Every y[b, o] is the same chain of multiply-adds (features in
 * order; per feature the SiLU term, then r = 0..k), whatever R, NV and the rows a worker gets.
 * Backward (kf_sparse_bwd, features [f0, f1) of one worker, ALL rows): per block of FB features,
 * their table rows packed and their weight gradient gW (FB, nb + 2k, out) zeroed; then tiles of
 * KS_BT rows, per tile groups of KS_FG features (each one's rows sorted), and per chunk of 2
 * vectors of out, feature by feature of the group, its runs in span order: the span's k + 1 rows of
 * W and of gW held in registers (a sliding window: when the span moves on, the rows that leave are
 * stored, each exactly once per tile and chunk, the rows that enter loaded), and per row
 * gW[i, m + r, :] += B_r grad_y[b, :] (the transposed scatter), gB[i, :] += silu(x) grad_y[b, :],
 * and the partial sums of grad_x[b, i] = <grad_y[b], silu'(x) Bt[i] + sum_r B_r'(x) Wt[i, m + r]>
 * (one vector of partial sums over out, continued over the chunks in order, its lanes then added in
 * order), B_r' = k (B_{j,k-1} / (t_{j+k} - t_j) - B_{j+1,k-1} / (t_{j+k+1} - t_{j+1})) from the
 * triangle's last-level quotients; then the block's parameter gradients written directly
 * (transposed by tiles through a small buffer): spline_weight (out, in, G + k) (times the scale),
 * the scale (sum over j, in order) and base_weight. Each weight gradient is one sum over all rows
 * in a fixed order (tile by tile, within a tile by span, rows of one span in row order), each grad_x
 * one dot product: nothing depends on how the features are split, so results are bit-identical
 * for every thread count (and run to run); no partial sums across workers, no reduction.
 * Outputs that are not a whole number of vectors (out < 16 floats included): the last vector is
 * partial; table and gradient rows are loaded and stored lane by lane there (only where a window
 * changes), y and grad_y go through a copy of the tile padded with zeros to whole vectors, so every
 * contraction is vectorised (no scalar tail); the padding lanes hold zeros and are never stored.
 * Zero-gradient rule (as the dense path and the reference, whose weight gradient is
 * sum_b grad_y[b, o] B_j(x_bi) over every row): a weight whose basis is 0 on every row gets
 * exactly 0, and a non-finite grad_y[b, o] makes every weight (i, j, o) with B_j(x_bi) = 0
 * NaN (0 * inf): the rows with a non-finite grad_y are listed once per call
 * (kf_sparse_bad_rows) and 0 * grad_y[b, :] is added to the rows of gW outside the row's slots;
 * their grad_x is NaN (the reference's sum_j dL/dB_j dB_j/dx meets 0 * inf at a basis whose
 * derivative is 0) unless every basis of the feature is among the row's slots.
 *
 * Knots: kf_sparse_check (finite and non-decreasing, O(in n)) is called in every call before
 * anything else; 1 means "not so", and the caller takes another path. Nothing derived from the
 * knots is kept between calls, so no edit of the knots can leave anything stale.
 * Memory: forward, one packed table Wt, Bt per call (in (nb + 2k + 1) out elements, shared by
 * the workers, packed by them by feature ranges: kf_sparse_pack) and per worker a sorted tile
 * (ks_tile_need: R (k + 2) elements, 3 R + n int32, and the padded y tile when out is not whole
 * vectors); backward, per worker a block of FB features (2 FB (nb + 2k + 1) out elements at most,
 * FB chosen by the caller to fit its budget) and KS_FG sorted tiles of KS_BT rows: nothing grows
 * with the batch (but a list of the rows with non-finite grad_y) and nothing with G beyond one
 * feature's rows per worker and the counts (n int32).
 * Addresses are formed only from indices checked to lie in range (m in [0, n - 2] by the
 * search's invariant): no input value can move a load or store.
 * Floats: the contractions are compiled with fp-contract=fast (fused multiply-adds where the
 * target has them, in every lane and tail alike): one rounding per multiply-add.
 * ------------------------------------------------------------------------------------------ */
#if defined(KF_BODY) && !defined(KF_SPARSE_PASS2)
#if !defined(KF_SPARSE_PASS1)
#define KF_SPARSE_PASS1 /* first inclusion: float; the second defines PASS2 (double), the outer pass skips */
#define KS_MAXK 16
#define KS_TILE 64       /* rows per basis evaluation */
#define KS_COUNT_MAX 32  /* knots up to which spans are found by counting */
#define KS_VB 64         /* bytes per vector */
#define KS_SKEW 1088     /* bytes (17 x 64) between the backward's work arrays */
#define KS_UNROLL _Pragma("GCC unroll 17") /* the loops over slots and vectors: whole, early */
#define KS_PF 8          /* rows ahead whose grad_y / y is prefetched */
#define KS_BT 1024        /* backward rows per tile (a multiple of KS_TILE) */
#define KS_FG 4          /* backward features sorted per tile and swept together chunk by chunk */
#if defined(__clang__)
#define KS_ATTR
#define KS_CONTRACT _Pragma("clang fp contract(fast)")
#else
#define KS_ATTR __attribute__((optimize("fp-contract=fast")))
#define KS_CONTRACT
#endif
#else
#define KF_SPARSE_PASS2
#endif

typedef T SFX(ks_v) __attribute__((vector_size(KS_VB)));
#define KS_L ((int64_t)(KS_VB / sizeof(T)))

static inline __attribute__((always_inline)) SFX(ks_v) SFX(ks_ld)(const T* p) {
    SFX(ks_v) v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline __attribute__((always_inline)) void SFX(ks_st)(T* p, SFX(ks_v) v) { memcpy(p, &v, sizeof v); }

/* 1 unless every knot row is finite and non-decreasing */
int64_t SFX(kf_sparse_check)(int64_t nin, int64_t n, const T* grid) {
    for (int64_t i = 0; i < nin; i++) {
        const T* t = grid + i * n;
        int bad = 0;
        for (int64_t j = 0; j < n; j++) bad |= !(t[j] - t[j] == 0); /* NaN or +-inf */
        for (int64_t j = 0; j + 1 < n; j++) bad |= !(t[j] <= t[j + 1]);
        if (bad) return 1;
    }
    return 0;
}

/* Features [f0, f1) of the table: feature i at Wt + (i - f0) (nb + 2k) nout, its row j + k =
 * sw[o, i, j] * sc[o, i] (sc NULL: 1), k zero rows before and after; Bt + (i - f0) nout =
 * bw[:, i] (Bt NULL: skipped). Transposed by tiles of 16 outputs x up to 256 bases through a small
 * buffer: sw read by runs of up to 256 bases, Wt written by 64-byte runs of outputs (the
 * transposition's large strides would otherwise miss the caches and the TLB on every element). */
KS_ATTR void SFX(kf_sparse_pack)(int64_t f0, int64_t f1, int64_t nin, int64_t nout, int64_t nb, int64_t k,
                                 const T* sw, const T* sc, const T* bw, T* Wt, T* Bt) {
    KS_CONTRACT
    const int64_t nbp = nb + 2 * k;
    T buf[256][16];
    for (int64_t i = f0; i < f1; i++) {
        T* restrict d = Wt + (i - f0) * nbp * nout;
        memset(d, 0, (size_t)(k * nout) * sizeof(T));
        memset(d + (nb + k) * nout, 0, (size_t)(k * nout) * sizeof(T));
        for (int64_t o0 = 0; o0 < nout; o0 += 16) {
            const int64_t no = o0 + 16 < nout ? 16 : nout - o0;
            for (int64_t j0 = 0; j0 < nb; j0 += 256) {
                const int64_t nj = j0 + 256 < nb ? 256 : nb - j0;
                for (int64_t o = 0; o < no; o++) {
                    const int64_t oi = (o0 + o) * nin + i;
                    const T sv = sc ? sc[oi] : (T)1;
                    const T* restrict src = sw + oi * nb + j0;
                    for (int64_t j = 0; j < nj; j++) buf[j][o] = src[j] * sv;
                }
                for (int64_t j = 0; j < nj; j++) {
                    T* restrict dr = d + (j0 + j + k) * nout + o0;
                    for (int64_t o = 0; o < no; o++) dr[o] = buf[j][o];
                }
            }
            if (Bt)
                for (int64_t o = 0; o < no; o++) Bt[(i - f0) * nout + o0 + o] = bw[(o0 + o) * nin + i];
        }
    }
}

/* One feature on a tile of nr <= KS_TILE rows: xs (the inputs), in (inside [t_0, t_last)), m (the
 * span), v (k + 1 rows of KS_TILE: the bases; 0 for inputs outside and for slots whose basis
 * m - k + r is not in [0, nb)), q (k rows: the last level's quotients, when want_q) and
 * e = exp(-x). Vectorised over the rows. */
static KS_ATTR __attribute__((noinline)) void SFX(ks_tile_bases)(
    int64_t nr, const T* restrict x, int64_t sx, const T* restrict t, int64_t n, int64_t k, int want_q,
    T* restrict xs, T* restrict in, int64_t* restrict m, T* restrict v, T* restrict q, T* restrict e) {
    KS_CONTRACT
    const T t0 = t[0], tn = t[n - 1];
    const int64_t nb = n - k - 1;
    T xc[KS_TILE], mf[KS_TILE], kt[2 * KS_MAXK * KS_TILE], saved[KS_TILE];
    for (int64_t b = 0; b < nr; b++) xs[b] = x[b * sx];
    for (int64_t b = 0; b < nr; b++) {
        const T xi = xs[b];
        const int inside = xi >= t0 && xi < tn; /* NaN: outside */
        in[b] = inside ? (T)1 : (T)0;
        xc[b] = inside ? xi : t0;
        e[b] = EXP(-xi);
    }
    if (n <= KS_COUNT_MAX) { /* m = #{1 <= j <= n - 2 : t_j <= x} (knots non-decreasing) */
        for (int64_t b = 0; b < nr; b++) mf[b] = 0;
        for (int64_t j = 1; j <= n - 2; j++) {
            const T tj = t[j];
            for (int64_t b = 0; b < nr; b++) mf[b] += tj <= xc[b] ? (T)1 : (T)0;
        }
        for (int64_t b = 0; b < nr; b++) m[b] = (int64_t)mf[b];
    } else { /* the largest m <= n - 2 with t_m <= x: it lies in [lo, lo + size), halved each step */
        for (int64_t b = 0; b < nr; b++) m[b] = 0;
        for (int64_t size = n - 1; size > 1;) {
            const int64_t half = size / 2;
            for (int64_t b = 0; b < nr; b++) m[b] = t[m[b] + half] <= xc[b] ? m[b] + half : m[b];
            size -= half;
        }
    }
    const int64_t nk = 2 * k; /* knots m - k + 1 .. m + k, clamped to the row (indices first, no branch) */
    for (int64_t d = 0; d < nk; d++) {
        int64_t ji[KS_TILE];
        for (int64_t b = 0; b < nr; b++) {
            int64_t j = m[b] - k + 1 + d;
            j = j < 0 ? 0 : j;
            ji[b] = j > n - 1 ? n - 1 : j;
        }
        for (int64_t b = 0; b < nr; b++) kt[d * KS_TILE + b] = t[ji[b]];
    }
    for (int64_t b = 0; b < nr; b++) v[b] = in[b]; /* level 0: 1 inside, 0 outside (all levels follow) */
    for (int64_t p = 1; p <= k; p++) {
        for (int64_t b = 0; b < nr; b++) saved[b] = 0;
        for (int64_t r = 0; r < p; r++) {
            const T* restrict hi = kt + (r + k) * KS_TILE;     /* t_{m+r+1} */
            const T* restrict lo = kt + (r + k - p) * KS_TILE; /* t_{m+r+1-p} */
            T* restrict vr = v + r * KS_TILE;
            T* restrict qr = q + r * KS_TILE;
            const int store_q = want_q && p == k;
            for (int64_t b = 0; b < nr; b++) {
                const T den = hi[b] - lo[b];
                const T temp = den > 0 ? vr[b] / (den > 0 ? den : (T)1) : (T)0;
                if (store_q) qr[b] = temp;
                vr[b] = saved[b] + (hi[b] - xc[b]) * temp;
                saved[b] = (xc[b] - lo[b]) * temp;
            }
        }
        T* restrict vp = v + p * KS_TILE;
        for (int64_t b = 0; b < nr; b++) vp[b] = saved[b];
    }
    for (int64_t r = 0; r <= k; r++) { /* slots of bases that do not exist (the padding rows): 0 */
        T* restrict vr = v + r * KS_TILE;
        for (int64_t b = 0; b < nr; b++) {
            const int64_t j = m[b] - k + r;
            vr[b] = (j >= 0 && j < nb) ? vr[b] : (T)0;
        }
    }
}

/* Partial vectors (the last, nout % KS_L lanes of a row that is not a whole number of vectors):
 * lanes [0, lim) from p, the others 0 (ks_ldp); lanes [0, lim) of v to p, nothing past (ks_stp). */
static inline __attribute__((always_inline)) SFX(ks_v) SFX(ks_ldp)(const T* p, int64_t lim) {
    if (lim >= KS_L) return SFX(ks_ld)(p);
    T buf[KS_L];
    for (int64_t l = 0; l < KS_L; l++) buf[l] = l < lim ? p[l] : (T)0;
    return SFX(ks_ld)(buf);
}
static inline __attribute__((always_inline)) void SFX(ks_stp)(T* p, SFX(ks_v) v, int64_t lim) {
    if (lim >= KS_L) {
        SFX(ks_st)(p, v);
        return;
    }
    T buf[KS_L];
    SFX(ks_st)(buf, v);
    for (int64_t l = 0; l < lim; l++) p[l] = buf[l];
}

/* Bytes of the work the sorted tiles of R rows need (ks_sort_tile; forward one feature's, backward
 * KS_FG features'): R CW elements per feature (the coefficients, by row),
 * 2 R int32 per feature (span and row by sorted position) and R more (span by row), n int32 (the
 * counts), then the padded y / grad_y tile of R op elements, op = nout rounded up to whole vectors,
 * and backward the grad_x partial sums and values, R (KS_L + 1) elements per feature. */
static int64_t SFX(ks_tile_need)(int64_t R, int64_t k, int64_t n, int64_t nout, int bwd) {
    const int64_t CW = bwd ? 2 * k + 4 : k + 2, op = (nout + KS_L - 1) / KS_L * KS_L, F = bwd ? KS_FG : 1;
    return (int64_t)sizeof(T) * (F * R * CW + R * op + (bwd ? F * R * (KS_L + 1) : 0)) +
           4 * ((2 * F + 1) * R + n) + 64;
}

/* One feature on rows [0, nr) of a tile (nr <= R): spans and bases (ks_tile_bases, KS_TILE rows at
 * a time), then the rows sorted by span (a stable counting sort): ms[p] and ord[p] the span and
 * row of sorted position p; cs + b CW the coefficients of row b: B_0..B_k, silu(x) and, backward
 * (bwd), B_0'..B_k' (0 for slots whose basis does not exist), silu'(x). mr (R) and cnt (n) are
 * scratch. Rows with the same span are contiguous, in row order. */
static KS_ATTR __attribute__((noinline)) void SFX(ks_sort_tile)(int64_t nr, const T* restrict x, int64_t sx,
                                                                const T* restrict t, int64_t n, int64_t k, int bwd,
                                                                int32_t* restrict ms, int32_t* restrict ord,
                                                                T* restrict cs, int32_t* restrict mr,
                                                                int32_t* restrict cnt) {
    KS_CONTRACT
    const int64_t CW = bwd ? 2 * k + 4 : k + 2, nb = n - k - 1;
    T xs[KS_TILE], in[KS_TILE], e[KS_TILE], v[(KS_MAXK + 1) * KS_TILE], q[KS_MAXK * KS_TILE];
    int64_t m[KS_TILE];
    for (int64_t s0 = 0; s0 < nr; s0 += KS_TILE) {
        const int64_t ns = s0 + KS_TILE < nr ? KS_TILE : nr - s0;
        SFX(ks_tile_bases)(ns, x + s0 * sx, sx, t, n, k, bwd && k > 0, xs, in, m, v, q, e);
        for (int64_t b = 0; b < ns; b++) {
            T* restrict c = cs + (s0 + b) * CW;
            mr[s0 + b] = (int32_t)m[b];
            for (int64_t r = 0; r <= k; r++) c[r] = v[r * KS_TILE + b];
            c[k + 1] = xs[b] / ((T)1 + e[b]); /* silu(x) */
            if (!bwd) continue;
            const T sig = (T)1 / ((T)1 + e[b]);
            c[2 * k + 3] = sig * ((T)1 + xs[b] * ((T)1 - sig)); /* silu'(x) */
            for (int64_t r = 0; r <= k; r++) { /* B_r' = k (q_{r-1} - q_r), q_{-1} = q_k = 0 */
                const int64_t j = m[b] - k + r;
                const T qa = r > 0 ? q[(r - 1) * KS_TILE + b] : (T)0, qb = r < k ? q[r * KS_TILE + b] : (T)0;
                c[k + 2 + r] = (k > 0 && j >= 0 && j < nb) ? (T)k * qa - (T)k * qb : (T)0;
            }
        }
    }
    for (int64_t j = 0; j < n; j++) cnt[j] = 0;
    for (int64_t b = 0; b < nr; b++) cnt[mr[b]]++;
    int32_t s = 0;
    for (int64_t j = 0; j < n; j++) {
        const int32_t c = cnt[j];
        cnt[j] = s;
        s += c;
    }
    for (int64_t b = 0; b < nr; b++) {
        const int64_t p = cnt[mr[b]]++;
        ms[p] = mr[b];
        ord[p] = (int32_t)b;
    }
}

/* Forward of one feature on the sorted rows of a tile, NV vectors of out from o0 (lim: the lanes
 * that exist from o0; the last vector may be partial), run by run (the rows of one span): the
 * feature's k + 1 table rows of the span (and its base row) held in registers for the run; per
 * row y loaded (not when first), the SiLU term and r = 0..k added, y stored. yt: the tile's y
 * rows, stride sy (full vectors writable). */
static inline __attribute__((always_inline)) void SFX(ks_fwd_feat)(
    const int NV, int64_t K, int64_t nr, const int32_t* restrict ms, const int32_t* restrict ord,
    const T* restrict cs, const T* restrict Wf, const T* restrict Bf, int64_t nout, int64_t o0, int64_t lim,
    T* restrict yt, int64_t sy, int first, SFX(ks_v) (*restrict w)[4]) {
    SFX(ks_v) bt[4];
    KS_UNROLL
    for (int u = 0; u < NV; u++) bt[u] = Bf ? SFX(ks_ldp)(Bf + o0 + u * KS_L, lim - u * KS_L) : (SFX(ks_v)){0};
    for (int64_t p = 0; p < nr;) {
        const int64_t mp = ms[p];
        KS_UNROLL
        for (int64_t r = 0; r <= K; r++)
            KS_UNROLL
            for (int u = 0; u < NV; u++) w[r][u] = SFX(ks_ldp)(Wf + (mp + r) * nout + o0 + u * KS_L, lim - u * KS_L);
        for (; p < nr && ms[p] == mp; p++) {
            const T* restrict c = cs + ord[p] * (K + 2);
            T* restrict yr = yt + ord[p] * sy + o0;
            if (p + KS_PF < nr && !first) /* the rows come in span order, not in memory order: fetch ahead */
                KS_UNROLL
                for (int u = 0; u < NV; u++) __builtin_prefetch(yt + ord[p + KS_PF] * sy + o0 + u * KS_L, 1);
            SFX(ks_v) acc[4];
            KS_UNROLL
            for (int u = 0; u < NV; u++) acc[u] = first ? (SFX(ks_v)){0} : SFX(ks_ld)(yr + u * KS_L);
            if (Bf)
                KS_UNROLL
                for (int u = 0; u < NV; u++) acc[u] = c[K + 1] * bt[u] + acc[u];
            KS_UNROLL
            for (int64_t r = 0; r <= K; r++)
                KS_UNROLL
                for (int u = 0; u < NV; u++) acc[u] = c[r] * w[r][u] + acc[u];
            KS_UNROLL
            for (int u = 0; u < NV; u++) SFX(ks_st)(yr + u * KS_L, acc[u]);
        }
    }
}

/* one feature over every output: chunks of NV (4, 2, 1) vectors, then the partial vector */
#define KS_FWD_FEAT(K)                                                                                       \
    do {                                                                                                     \
        int64_t v = 0;                                                                                       \
        if (NV >= 4)                                                                                         \
            for (; v + 4 <= nvp; v += 4)                                                                     \
                SFX(ks_fwd_feat)(4, K, nr, ms, ord, cs, Wf, Bf, nout, v * KS_L, nout - v * KS_L, yt, sy, first, w); \
        if (NV >= 2)                                                                                         \
            for (; v + 2 <= nvp; v += 2)                                                                     \
                SFX(ks_fwd_feat)(2, K, nr, ms, ord, cs, Wf, Bf, nout, v * KS_L, nout - v * KS_L, yt, sy, first, w); \
        for (; v < nvp; v++)                                                                                 \
            SFX(ks_fwd_feat)(1, K, nr, ms, ord, cs, Wf, Bf, nout, v * KS_L, nout - v * KS_L, yt, sy, first, w); \
    } while (0)

static KS_ATTR __attribute__((noinline)) void SFX(ks_fwd_feat3)(int64_t NV, int64_t nr, const int32_t* ms,
                                                                const int32_t* ord, const T* cs, const T* Wf,
                                                                const T* Bf, int64_t nout, int64_t nvp, T* yt,
                                                                int64_t sy, int first) {
    KS_CONTRACT
    SFX(ks_v) w[4][4]; /* the window: exactly k + 1 rows, so that it lives in registers */
    KS_FWD_FEAT(3);
}

static KS_ATTR __attribute__((noinline)) void SFX(ks_fwd_feat_any)(int64_t K, int64_t NV, int64_t nr,
                                                                   const int32_t* ms, const int32_t* ord,
                                                                   const T* cs, const T* Wf, const T* Bf,
                                                                   int64_t nout, int64_t nvp, T* yt, int64_t sy,
                                                                   int first) {
    KS_CONTRACT
    SFX(ks_v) w[KS_MAXK + 1][4];
    KS_FWD_FEAT(K);
}

/* Rows [0, N) of y (N, nout), row stride nout, from the packed table (kf_sparse_pack of every
 * feature; Bt NULL: no base term). Tiles of R rows (a multiple of KS_TILE); per tile, feature by
 * feature in order: the rows sorted by span (ks_sort_tile), then chunks of NV (4, 2 or 1) vectors
 * of out (ks_fwd_feat). When nout is not a whole number of vectors the tile is accumulated in a
 * padded copy (row stride nout rounded up) and copied out at the end of the tile. FB: the caller's
 * sizing of work only (work_len is checked against ks_tile_need; at least R FB (k + 2) elements
 * plus R FB int64 are asked for by kanfast.kernels.cpu_spline.fwd_work with the FB of
 * kanfast.sparse_backend._fwd_blocks). Returns 3 if work_len (in elements) is short. */
KS_ATTR int64_t SFX(kf_sparse_fwd)(int64_t N, int64_t nin, int64_t nout, int64_t k, int64_t n, const T* x,
                                   int64_t sx, const T* grid, const T* Wt, const T* Bt, T* y, int64_t R,
                                   int64_t FB, int64_t NV, T* work, int64_t work_len) {
    KS_CONTRACT
    const int64_t nb = n - k - 1, nbp = nb + 2 * k, K2 = k + 2;
    if (k < 0 || k >= KS_MAXK || nb < 1 || R < KS_TILE || R % KS_TILE || FB < 1 || n >= (1 << 30) || R >= (1 << 30))
        return 2;
    if (work_len * (int64_t)sizeof(T) < SFX(ks_tile_need)(R, k, n, nout, 0)) return 3;
    const int64_t nvp = (nout + KS_L - 1) / KS_L, op = nvp * KS_L, pad = op != nout;
    T* restrict cs = work;
    T* restrict yp = cs + R * K2; /* the padded tile (pad) */
    int32_t* restrict ms = (int32_t*)(yp + (pad ? R * op : 0));
    int32_t* restrict ord = ms + R;
    int32_t* restrict mr = ord + R;
    int32_t* restrict cnt = mr + R;
    for (int64_t b0 = 0; b0 < N; b0 += R) {
        const int64_t nr = b0 + R < N ? R : N - b0;
        T* restrict yt = pad ? yp : y + b0 * nout;
        const int64_t sy = pad ? op : nout;
        for (int64_t i = 0; i < nin; i++) {
            SFX(ks_sort_tile)(nr, x + b0 * sx + i, sx, grid + i * n, n, k, 0, ms, ord, cs, mr, cnt);
            const T* Wf = Wt + i * nbp * nout;
            const T* Bf = Bt ? Bt + i * nout : 0;
            if (k == 3)
                SFX(ks_fwd_feat3)(NV, nr, ms, ord, cs, Wf, Bf, nout, nvp, yt, sy, i == 0);
            else
                SFX(ks_fwd_feat_any)(k, NV, nr, ms, ord, cs, Wf, Bf, nout, nvp, yt, sy, i == 0);
        }
        if (nin == 0)
            for (int64_t b = 0; b < nr; b++)
                for (int64_t o = 0; o < nout; o++) yt[b * sy + o] = 0;
        if (pad)
            for (int64_t b = 0; b < nr; b++) memcpy(y + (b0 + b) * nout, yp + b * op, (size_t)nout * sizeof(T));
    }
    return 0;
}

/* Indices of the rows of gy (N, nout) holding a NaN or +-inf, written to idx; returns their count */
int64_t SFX(kf_sparse_bad_rows)(int64_t N, int64_t nout, const T* gy, int64_t* idx) {
    int64_t cnt = 0;
    for (int64_t b = 0; b < N; b++) {
        const T* restrict g = gy + b * nout;
        int bad = 0;
        for (int64_t o = 0; o < nout; o++) bad |= !(g[o] - g[o] == 0);
        if (bad) idx[cnt++] = b;
    }
    return cnt;
}


/* Store the weight-gradient window a (k + 1 rows of NV vectors, lanes up to lim) at rows
 * gW .. gW + K nout, from o0: when the backward's span jumps past the window and at the end. */
static inline __attribute__((always_inline)) void SFX(ks_bwd_store)(
    const int NV, int64_t K, T* restrict gW, int64_t nout, int64_t o0, int64_t lim,
    SFX(ks_v) (*restrict a)[2]) {
    KS_UNROLL
    for (int64_t r = 0; r <= K; r++)
        KS_UNROLL
        for (int u = 0; u < NV; u++) SFX(ks_stp)(gW + r * nout + o0 + u * KS_L, a[r][u], lim - u * KS_L);
}

/* Backward of one feature on the sorted rows of a tile, NV vectors of out from o0 (lim: the lanes
 * that exist from o0). While a span lasts, its k + 1 rows of the table W (for grad_x) and of the
 * weight gradient gW (accumulators) are held in registers; when the span moves on, the rows that
 * leave the window are stored (each exactly once per tile: later spans do not touch them) and the
 * rows that enter are loaded. Per row: gW[m + r] += B_r g, gB += silu(x) g, and the partial sums of
 * grad_x, d += g (silu'(x) Bt + sum_r B_r' W[m + r]), one vector per sorted position (dacc, stride
 * KS_L; first: start from 0), continued over the chunks of out in order. gt: the tile's grad_y rows
 * (stride sg; full vectors readable: padded with 0 where nout is not whole vectors). Wf, Bf: the
 * feature's table rows and base row (NULL: no grad_x); gWf, gBf: its gradients (NULL: not needed;
 * Bf NULL with Wf: no base term). */
static inline __attribute__((always_inline)) void SFX(ks_bwd_feat)(
    const int NV, int64_t K, int64_t nr, const int32_t* restrict ms, const int32_t* restrict ord,
    const T* restrict cs, const T* restrict gt, int64_t sg, const T* restrict Wf, const T* restrict Bf,
    T* restrict gWf, T* restrict gBf, int64_t nout, int64_t o0, int64_t lim, T* restrict dacc, int first,
    SFX(ks_v) (*restrict w)[2], SFX(ks_v) (*restrict a)[2]) {
    SFX(ks_v) bt[2], gb[2];
    const int64_t CW = 2 * K + 4;
    KS_UNROLL
    for (int64_t r = 0; r <= K; r++)
        KS_UNROLL
        for (int u = 0; u < NV; u++) a[r][u] = w[r][u] = (SFX(ks_v)){0};
    KS_UNROLL
    for (int u = 0; u < NV; u++) {
        bt[u] = Bf ? SFX(ks_ldp)(Bf + o0 + u * KS_L, lim - u * KS_L) : (SFX(ks_v)){0};
        gb[u] = gBf ? SFX(ks_ldp)(gBf + o0 + u * KS_L, lim - u * KS_L) : (SFX(ks_v)){0};
    }
    int64_t mcur = -1;
    for (int64_t p = 0; p < nr;) {
        const int64_t mp = ms[p];
        {
            int64_t j = mcur < 0 ? mp : mcur; /* the window's first row */
            if (mcur >= 0 && mp - mcur <= K) { /* slide by one row until it starts at mp */
                for (; j < mp; j++) {
                    KS_UNROLL
                    for (int u = 0; u < NV; u++) {
                        const int64_t l = lim - u * KS_L, off = o0 + u * KS_L;
                        if (gWf) SFX(ks_stp)(gWf + j * nout + off, a[0][u], l);
                        KS_UNROLL
                        for (int64_t r = 0; r < K; r++) a[r][u] = a[r + 1][u], w[r][u] = w[r + 1][u];
                        if (gWf) a[K][u] = SFX(ks_ldp)(gWf + (j + K + 1) * nout + off, l);
                        if (Wf) w[K][u] = SFX(ks_ldp)(Wf + (j + K + 1) * nout + off, l);
                    }
                }
            } else { /* (first span, or a jump past the window) store it all, load the new one */
                if (mcur >= 0 && gWf) SFX(ks_bwd_store)(NV, K, gWf + mcur * nout, nout, o0, lim, a);
                KS_UNROLL
                for (int64_t r = 0; r <= K; r++)
                    KS_UNROLL
                    for (int u = 0; u < NV; u++) {
                        const int64_t l = lim - u * KS_L, off = (mp + r) * nout + o0 + u * KS_L;
                        if (gWf) a[r][u] = SFX(ks_ldp)(gWf + off, l);
                        if (Wf) w[r][u] = SFX(ks_ldp)(Wf + off, l);
                    }
            }
            mcur = mp;
        }
        for (; p < nr && ms[p] == mp; p++) {
            const T* restrict c = cs + ord[p] * CW;
            const T* restrict g = gt + ord[p] * sg + o0;
            if (p + KS_PF < nr) /* the rows come in span order, not in memory order: fetch ahead */
                for (int u = 0; u < NV; u++) __builtin_prefetch(gt + ord[p + KS_PF] * sg + o0 + u * KS_L);
            SFX(ks_v) gv[2];
            KS_UNROLL
            for (int u = 0; u < NV; u++) gv[u] = SFX(ks_ld)(g + u * KS_L);
            if (gWf)
                KS_UNROLL
                for (int64_t r = 0; r <= K; r++)
                    KS_UNROLL
                    for (int u = 0; u < NV; u++) a[r][u] = c[r] * gv[u] + a[r][u];
            if (gBf)
                KS_UNROLL
                for (int u = 0; u < NV; u++) gb[u] = c[K + 1] * gv[u] + gb[u];
            if (Wf) {
                SFX(ks_v) d = first ? (SFX(ks_v)){0} : SFX(ks_ld)(dacc + p * KS_L);
                KS_UNROLL
                for (int u = 0; u < NV; u++) {
                    SFX(ks_v) uu = Bf ? c[2 * K + 3] * bt[u] : (SFX(ks_v)){0};
                    KS_UNROLL
                    for (int64_t r = 0; r <= K; r++) uu = c[K + 2 + r] * w[r][u] + uu;
                    d = gv[u] * uu + d;
                }
                SFX(ks_st)(dacc + p * KS_L, d);
            }
        }
    }
    if (mcur >= 0 && gWf) SFX(ks_bwd_store)(NV, K, gWf + mcur * nout, nout, o0, lim, a);
    if (gBf)
        KS_UNROLL
        for (int u = 0; u < NV; u++) SFX(ks_stp)(gBf + o0 + u * KS_L, gb[u], lim - u * KS_L);
}

/* one feature, one chunk: 2 vectors of out from vector v (1 when only one is left, possibly partial) */
#define KS_BWD_CHUNK(K)                                                                                   \
    do {                                                                                                  \
        if (v + 2 <= nvp)                                                                                 \
            SFX(ks_bwd_feat)(2, K, nr, ms, ord, cs, gt, sg, Wf, Bf, gWf, gBf, nout, v * KS_L, nout - v * KS_L, \
                             dacc, v == 0, w, a);                                                         \
        else                                                                                              \
            SFX(ks_bwd_feat)(1, K, nr, ms, ord, cs, gt, sg, Wf, Bf, gWf, gBf, nout, v * KS_L, nout - v * KS_L, \
                             dacc, v == 0, w, a);                                                         \
    } while (0)

/* the default case (k = 3, every gradient, a base term): constants, the loops over r unrolled */
static KS_ATTR __attribute__((noinline)) void SFX(ks_bwd_chunk3)(int64_t v, int64_t nr, const int32_t* ms,
                                                                 const int32_t* ord, const T* cs, const T* gt,
                                                                 int64_t sg, const T* Wf, const T* Bf, T* gWf,
                                                                 T* gBf, int64_t nout, int64_t nvp, T* dacc) {
    KS_CONTRACT
    SFX(ks_v) w[4][2], a[4][2]; /* the windows: exactly k + 1 rows, so that they live in registers */
    KS_BWD_CHUNK(3);
}

static KS_ATTR __attribute__((noinline)) void SFX(ks_bwd_chunk_any)(int64_t K, int64_t v, int64_t nr,
                                                                    const int32_t* ms, const int32_t* ord,
                                                                    const T* cs, const T* gt, int64_t sg,
                                                                    const T* Wf, const T* Bf, T* gWf, T* gBf,
                                                                    int64_t nout, int64_t nvp, T* dacc) {
    KS_CONTRACT
    SFX(ks_v) w[KS_MAXK + 1][2], a[KS_MAXK + 1][2];
    KS_BWD_CHUNK(K);
}

/* Backward of features [f0, f1) over all rows [0, N): gx[:, f0:f1] (row stride sgx; NULL: not
 * needed), and the parameter gradients of those features written directly: gsw (out, in, nb) =
 * GW^T sc (sc NULL: 1), gsc (out, in) = sum_j GW^T sw, gbw (out, in) = GB^T (each NULL when not
 * needed; gbw needs bw). gy (N, nout) contiguous; bad[0 .. nbad) the rows of gy with a non-finite
 * entry (kf_sparse_bad_rows). Blocks of FB features; per block, tiles of KS_BT rows, per tile
 * feature by feature: the rows sorted by span (ks_sort_tile), then chunks of out (ks_bwd_feat).
 * work: at least FB (nb + 2k + 1) nout elements (+ 2 KS_SKEW bytes) for gx and as many for the
 * weight gradients, plus ks_tile_need(KS_BT) bytes (returns 3 if work_len is short). */
KS_ATTR int64_t SFX(kf_sparse_bwd)(int64_t N, int64_t nin, int64_t nout, int64_t k, int64_t n, int64_t f0,
                                   int64_t f1, const T* x, int64_t sx, const T* grid, const T* gy, const T* sw,
                                   const T* sc, const T* bw, T* gx, int64_t sgx, T* gsw, T* gsc, T* gbw,
                                   int64_t nbad, const int64_t* bad, int64_t FB, T* work, int64_t work_len) {
    KS_CONTRACT
    const int64_t nb = n - k - 1, nbp = nb + 2 * k, R = KS_BT, CW = 2 * k + 4;
    if (k < 0 || k >= KS_MAXK || nb < 1 || FB < 1 || n >= (1 << 30)) return 2;
    const int want_x = gx != 0, want_w = gsw != 0 || gsc != 0, want_b = gbw != 0 && bw != 0;
    /* FB x (nbp, nout) table rows, FB x nout base rows, then the same for their gradients, each
     * array KS_SKEW bytes past a multiple of 128 from the previous one's end: no address of one
     * differs from another's by a multiple of 4 KiB plus a multiple of the row length (the
     * stores of the scatter would stall the loads of the table rows, 4K aliasing) */
    const int64_t sk = KS_SKEW / (int64_t)sizeof(T), blk = FB * (nbp + 1) * nout + 2 * sk;
    const int64_t used = (want_x ? blk : 0) + (want_w || want_b ? blk : 0);
    if (work_len < used || (work_len - used) * (int64_t)sizeof(T) < SFX(ks_tile_need)(R, k, n, nout, 1)) return 3;
    T* Wb = work;
    T* Bb = Wb + FB * nbp * nout + sk;
    T* gWb = want_x ? work + blk : work;
    T* gBb = gWb + FB * nbp * nout + sk;
    const int64_t nvp = (nout + KS_L - 1) / KS_L, op = nvp * KS_L, pad = op != nout;
    const int64_t nl = nvp > 1 ? KS_L : nout; /* lanes of the partial sums that hold outputs */
    T* restrict csg = work + used;           /* KS_FG sorted tiles' coefficients (by row) */
    T* restrict daccg = csg + KS_FG * R * CW; /* KS_FG x R x KS_L grad_x partial sums */
    T* restrict gxb = daccg + KS_FG * R * KS_L; /* R x KS_FG grad_x of the group, by row */
    T* restrict gp = gxb + KS_FG * R;          /* the padded grad_y tile (pad) */
    int32_t* restrict msg = (int32_t*)(gp + (pad ? R * op : 0));
    int32_t* restrict ordg = msg + KS_FG * R;
    int32_t* restrict mr = ordg + KS_FG * R;
    int32_t* restrict cnt = mr + R;
    T xs[KS_TILE], in[KS_TILE], e[KS_TILE], v[(KS_MAXK + 1) * KS_TILE], q[KS_MAXK * KS_TILE];
    int64_t m[KS_TILE];
    const int fast = k == 3 && want_x && want_w && want_b;
    for (int64_t fb = f0; fb < f1; fb += FB) {
        const int64_t nf = fb + FB < f1 ? FB : f1 - fb;
        if (want_x) SFX(kf_sparse_pack)(fb, fb + nf, nin, nout, nb, k, sw, sc, bw, Wb, bw ? Bb : 0);
        if (want_w) memset(gWb, 0, (size_t)(nf * nbp * nout) * sizeof(T));
        if (want_b) memset(gBb, 0, (size_t)(nf * nout) * sizeof(T));
        for (int64_t b0 = 0; b0 < N; b0 += R) {
            const int64_t nr = b0 + R < N ? R : N - b0;
            const T* gt = gy + b0 * nout;
            int64_t sg = nout;
            if (pad) { /* rows padded with 0 to whole vectors */
                for (int64_t b = 0; b < nr; b++) {
                    T* restrict d = gp + b * op;
                    memcpy(d, gy + (b0 + b) * nout, (size_t)nout * sizeof(T));
                    for (int64_t o = nout; o < op; o++) d[o] = 0;
                }
                gt = gp, sg = op;
            }
            /* groups of KS_FG features: each one's rows sorted, then chunk by chunk of out over the
             * group's features (the tile's grad_y columns of a chunk are reused by the group) */
            for (int64_t g0 = 0; g0 < nf; g0 += KS_FG) {
                const int64_t ng = g0 + KS_FG < nf ? KS_FG : nf - g0;
                for (int64_t f = 0; f < ng; f++)
                    SFX(ks_sort_tile)(nr, x + b0 * sx + fb + g0 + f, sx, grid + (fb + g0 + f) * n, n, k, 1, msg + f * R,
                                      ordg + f * R, csg + f * R * CW, mr, cnt);
                for (int64_t vv = 0; vv < nvp; vv += 2)
                    for (int64_t f = 0; f < ng; f++) {
                        const int64_t fl = g0 + f;
                        const int32_t* ms = msg + f * R;
                        const int32_t* ord = ordg + f * R;
                        const T* cs = csg + f * R * CW;
                        T* dacc = daccg + f * R * KS_L;
                        const T* Wf = want_x ? Wb + fl * nbp * nout : 0;
                        const T* Bf = want_x && bw ? Bb + fl * nout : 0;
                        T* gWf = want_w ? gWb + fl * nbp * nout : 0;
                        T* gBf = want_b ? gBb + fl * nout : 0;
                        if (fast)
                            SFX(ks_bwd_chunk3)(vv, nr, ms, ord, cs, gt, sg, Wf, Bf, gWf, gBf, nout, nvp, dacc);
                        else
                            SFX(ks_bwd_chunk_any)(k, vv, nr, ms, ord, cs, gt, sg, Wf, Bf, gWf, gBf, nout, nvp, dacc);
                    }
                if (want_x) { /* the partial sums' lanes in order; by row into gxb, then the group's run of gx */
                    for (int64_t f = 0; f < ng; f++) {
                        const int32_t* ord = ordg + f * R;
                        const T* dacc = daccg + f * R * KS_L;
                        for (int64_t p = 0; p < nr; p++) {
                            const T* restrict d = dacc + p * KS_L;
                            T acc = 0;
                            for (int64_t l = 0; l < nl; l++) acc += d[l];
                            gxb[ord[p] * KS_FG + f] = nout ? acc : (T)0;
                        }
                    }
                    for (int64_t b = 0; b < nr; b++)
                        for (int64_t f = 0; f < ng; f++) gx[(b0 + b) * sgx + fb + g0 + f] = gxb[b * KS_FG + f];
                }
            }
        }
        for (int64_t f = 0; f < nf; f++) {
            const int64_t i = fb + f;
            T* restrict gWf = gWb + f * nbp * nout;
            for (int64_t p = 0; p < nbad && (want_w || want_x); p++) { /* rows with a non-finite grad_y */
                const int64_t bb = bad[p];
                SFX(ks_tile_bases)(1, x + bb * sx + i, sx, grid + i * n, n, k, 0, xs, in, m, v, q, e);
                const int slots_only = in[0] != 0 && nb == k + 1 && m[0] == k; /* every basis in the slots */
                if (want_x && !slots_only) /* some basis's derivative is 0: 0 * inf in the reference */
                    gx[bb * sgx + i] = (T)NAN;
                if (!want_w) continue;
                const T* restrict g = gy + bb * nout;
                for (int64_t j = k; j < nb + k; j++) { /* 0 * grad_y[b] on the rows outside the slots */
                    if (in[0] != 0 && j >= m[0] && j <= m[0] + k) continue;
                    T* restrict gr = gWf + j * nout;
                    for (int64_t o = 0; o < nout; o++) gr[o] += (T)0 * g[o];
                }
            }
        }
        /* the block's parameter gradients (out, in, nb): gW (nbp, out) transposed by tiles of up to 256
         * bases x 16 outputs through a small buffer (gW read by 64-byte rows, gsw written and sw read
         * by runs of up to 256 bases); per (o, i) the scale's sum over j in order */
        for (int64_t f = 0; f < nf && (want_w || want_b); f++) {
            const int64_t i = fb + f;
            const T* restrict GW = gWb + (f * nbp + k) * nout; /* basis j, output o at GW[j nout + o] */
            for (int64_t o0 = 0; o0 < nout; o0 += 16) {
                const int64_t no = o0 + 16 < nout ? 16 : nout - o0;
                T acc[16], buf[16][256];
                for (int64_t o = 0; o < no; o++) acc[o] = 0;
                for (int64_t j0 = 0; j0 < nb && want_w; j0 += 256) {
                    const int64_t nj = j0 + 256 < nb ? 256 : nb - j0;
                    for (int64_t j = 0; j < nj; j++)
                        for (int64_t o = 0; o < no; o++) buf[o][j] = GW[(j0 + j) * nout + o0 + o];
                    for (int64_t o = 0; o < no; o++) {
                        const int64_t oi = (o0 + o) * nin + i;
                        if (gsw) {
                            const T sv = sc ? sc[oi] : (T)1;
                            T* restrict d = gsw + oi * nb + j0;
                            for (int64_t j = 0; j < nj; j++) d[j] = buf[o][j] * sv;
                        }
                        if (gsc) {
                            const T* restrict wv = sw + oi * nb + j0;
                            T a = acc[o];
                            for (int64_t j = 0; j < nj; j++) a = buf[o][j] * wv[j] + a;
                            acc[o] = a;
                        }
                    }
                }
                for (int64_t o = 0; o < no; o++) {
                    const int64_t oi = (o0 + o) * nin + i;
                    if (gsc) gsc[oi] = acc[o];
                    if (want_b) gbw[oi] = gBb[f * nout + o0 + o];
                }
            }
        }
    }
    return 0;
}

/* One layer call in one entry (the calls of kanfast.sparse_backend, whose cost is the calls themselves
 * for small layers): forward = kf_sparse_check, kf_sparse_pack of every feature into Wt/Bt,
 * kf_sparse_fwd of every row (arguments as theirs; Bt is used only with bw). P > 1 (built with OpenMP):
 * split across a team of P threads of the caller's OpenMP runtime (torch's: forking and joining its
 * team costs microseconds where a pool of Python threads costs ~0.1 ms): thread p of np packs
 * features [nin p / np, nin (p + 1) / np), a barrier, then runs rows [N p / np, N (p + 1) / np) with
 * its own work area (work_len / P elements, rounded down to a multiple of 16, each). Every y row is
 * the same chain of multiply-adds whoever runs it: the same bits for any P. Returns 1 when the knots
 * are declined (nothing written), else kf_sparse_fwd's code (2 also for sizes the pack cannot take). */
KS_ATTR int64_t SFX(kf_sparse_fwd_call)(int64_t N, int64_t nin, int64_t nout, int64_t k, int64_t n, const T* x,
                                        int64_t sx, const T* grid, const T* sw, const T* sc, const T* bw, T* Wt,
                                        T* Bt, T* y, int64_t R, int64_t FB, int64_t NV, T* work,
                                        int64_t work_len, int64_t P) {
    if (SFX(kf_sparse_check)(nin, n, grid)) return 1;
    const int64_t nb = n - k - 1;
    if (k < 0 || k >= KS_MAXK || nb < 1) return 2;
#if defined(_OPENMP)
    if (P > 1 && N > 1) {
        const int64_t nbp = nb + 2 * k, per = work_len / P / 16 * 16;
        int64_t rc = 0; /* the largest code of any thread (kf_sparse_fwd's are 0, 2 or 3) */
#pragma omp parallel num_threads((int)P) reduction(max : rc)
        {
            const int64_t p = omp_get_thread_num(), np = omp_get_num_threads();
            const int64_t f0 = nin * p / np, f1 = nin * (p + 1) / np, a = N * p / np, b = N * (p + 1) / np;
            SFX(kf_sparse_pack)(f0, f1, nin, nout, nb, k, sw, sc, bw, Wt + f0 * nbp * nout, bw ? Bt + f0 * nout : 0);
#pragma omp barrier
            if (b > a)
                rc = SFX(kf_sparse_fwd)(b - a, nin, nout, k, n, x + a * sx, sx, grid, Wt, bw ? Bt : 0, y + a * nout, R, FB,
                                        NV, work + p * per, per);
        }
        return rc;
    }
#endif
    (void)P;
    SFX(kf_sparse_pack)(0, nin, nin, nout, nb, k, sw, sc, bw, Wt, bw ? Bt : 0);
    return SFX(kf_sparse_fwd)(N, nin, nout, k, n, x, sx, grid, Wt, bw ? Bt : 0, y, R, FB, NV, work, work_len);
}

/* Backward in one entry: kf_sparse_check (returns 1: declined, nothing written), then, when bad is
 * not NULL, kf_sparse_bad_rows of gy into bad (at least N int64), then kf_sparse_bwd of features
 * [f0, f1) (its arguments; nbad from the listing, 0 when bad is NULL). P > 1 (built with OpenMP): the
 * features split across a team of P threads of the caller's OpenMP runtime, thread p of np features
 * [f0 + (f1 - f0) p / np, f0 + (f1 - f0) (p + 1) / np) with its own work area (work_len / P elements,
 * rounded down to a multiple of 16): every gradient of a feature is computed by one thread over all
 * rows in order, the same bits for any P. Returns kf_sparse_bwd's code. */
KS_ATTR int64_t SFX(kf_sparse_bwd_call)(int64_t N, int64_t nin, int64_t nout, int64_t k, int64_t n, int64_t f0,
                                        int64_t f1, const T* x, int64_t sx, const T* grid, const T* gy,
                                        const T* sw, const T* sc, const T* bw, T* gx, int64_t sgx, T* gsw, T* gsc,
                                        T* gbw, int64_t* bad, int64_t FB, T* work, int64_t work_len, int64_t P) {
    if (SFX(kf_sparse_check)(nin, n, grid)) return 1;
    const int64_t nbad = bad ? SFX(kf_sparse_bad_rows)(N, nout, gy, bad) : 0;
#if defined(_OPENMP)
    if (P > 1 && f1 - f0 > 1) {
        const int64_t per = work_len / P / 16 * 16;
        int64_t rc = 0; /* the largest code of any thread (kf_sparse_bwd's are 0, 2 or 3) */
#pragma omp parallel num_threads((int)P) reduction(max : rc)
        {
            const int64_t p = omp_get_thread_num(), np = omp_get_num_threads();
            const int64_t a = f0 + (f1 - f0) * p / np, b = f0 + (f1 - f0) * (p + 1) / np;
            if (b > a)
                rc = SFX(kf_sparse_bwd)(N, nin, nout, k, n, a, b, x, sx, grid, gy, sw, sc, bw, gx, sgx, gsw, gsc, gbw, nbad,
                                        bad, FB, work + p * per, per);
        }
        return rc;
    }
#endif
    (void)P;
    return SFX(kf_sparse_bwd)(N, nin, nout, k, n, f0, f1, x, sx, grid, gy, sw, sc, bw, gx, sgx, gsw, gsc, gbw, nbad,
                              bad, FB, work, work_len);
}

#endif /* sparse kernels */
