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

#ifndef KF_BODY

int kf_abi_version(void) { return 4; }

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
 * Sparse contraction kernels (kf_sparse_*): the small-call path of the CPU engine
 * (kanfast.sparse_backend), and the sparse contraction of issue 18.
 *
 * Algorithm: for every row b and input feature i, the span m with t_m <= x < t_{m+1} by
 * binary search over the STORED knots t = grid[i] (any non-decreasing knots, no uniformity
 * assumed), then the k + 1 non-zero bases B_{m-k..m}(x) by de Boor's triangle (NURBS Book,
 * alg. A2.2: one division per entry, its denominator the knot difference
 * t_{m+r+1} - t_{m+r+1-p} of the Cox-de Boor recursion, a zero denominator (repeated knots)
 * giving 0), and contract them directly with the coefficient table, laid out (in, G + k, out)
 * so that each row W[i, j, :] is contiguous and the loop over out vectorises:
 *     y[b, :] = sum_i ( silu(x_bi) Bt[i, :] + sum_r B_r(x_bi) W[i, m_bi - k + r, :] ).
 * No dense basis block, no GEMM. Knot indices outside [0, n) (the bases B_j with j < 0 or
 * j > G + k - 1 that the triangle carries near the ends) read the clamped end knot: those
 * entries are never used, and every real basis B_j depends only on t_j .. t_{j+k+1}, inside.
 * Inputs outside [t_0, t_last) (NaN and +-inf included) contribute no spline term (their
 * bases are 0, as in the reference); their SiLU term carries NaN/inf.
 * Backward (rows of one worker): grad_W[i, m - k + r, :] += B_r grad_y[b, :] (the transposed
 * scatter, rows in order: deterministic), grad_Bt[i, :] += silu(x) grad_y[b, :], and
 * grad_x[b, i] = silu'(x) <grad_y[b], Bt[i]> + sum_r B_r'(x) <grad_y[b], W[i, m - k + r]>
 * (k + 2 dot products), B_r' = k (B_{j,k-1} / (t_{j+k} - t_j) - B_{j+1,k-1} / (t_{j+k+1} - t_{j+1}))
 * from the triangle's last-level quotients. Weight gradients of bases that are 0 on every row
 * are never written: exactly 0. kf_sparse_finish sums the workers' partial weight gradients in
 * worker order (deterministic for a given split) and turns them into the gradients of
 * efficient-kan's parameters: spline_weight (out, in, G + k) (times the scale) and the scale.
 *
 * Knots: every call checks them (fwd/bwd with pack = 1: finite and non-decreasing, O(in n));
 * a return value of 1 means "not so", and the caller takes another path. Nothing derived from
 * the knots is kept between calls, so no edit of the knots (in place, through .data, a new
 * tensor) can leave anything stale.
 * Work: the caller's buffer holds the packed tables Wt (in * (G + k) * out) and Bt (in * out).
 * Addresses are formed only from indices checked to lie in range (m in [0, n - 2] by the
 * search's invariant, j tested against [0, G + k)): no input value can move a load or store.
 * ------------------------------------------------------------------------------------------ */
#if defined(KF_BODY) && !defined(KF_SPARSE_PASS2)
#if !defined(KF_SPARSE_PASS1)
#define KF_SPARSE_PASS1 /* first inclusion: float; the second defines PASS2 (double), the outer pass skips */
#ifdef __FMA__ /* fused multiply-add in the contractions (one rounding); plain a * b + c without the hardware */
#define KS_FMA(a, b, c) fmaf(a, b, c)
#else
#define KS_FMA(a, b, c) ((a) * (b) + (c))
#endif
#else
#define KF_SPARSE_PASS2
#undef KS_FMA
#ifdef __FMA__
#define KS_FMA(a, b, c) fma(a, b, c)
#else
#define KS_FMA(a, b, c) ((a) * (b) + (c))
#endif
#endif

#define KS_MAXK 16

/* span m in [0, n - 2] with t[m] <= x < t[m + 1] (precondition t[0] <= x < t[n - 1]) */
static inline int64_t SFX(ks_span)(const T* restrict t, int64_t n, T x) {
    int64_t lo = 0, hi = n - 1;
    while (hi - lo > 1) {
        const int64_t mid = (lo + hi) >> 1;
        if (t[mid] <= x) lo = mid; else hi = mid;
    }
    return lo;
}

static inline T SFX(ks_knot)(const T* restrict t, int64_t n, int64_t j) {
    return t[j < 0 ? 0 : (j > n - 1 ? n - 1 : j)];
}

/* v[r] = B_{m-k+r,k}(x), r = 0..k; q (when not NULL) the last level's quotients
 * q[r] = B_{m-k+1+r,k-1}(x) / (t_{m+1+r} - t_{m+1+r-k}), r = 0..k-1 (0 where the difference is 0) */
static inline void SFX(ks_bases)(const T* restrict t, int64_t n, int64_t m, int64_t k, T x, T* restrict v,
                                 T* restrict q) {
    v[0] = (T)1;
    for (int64_t p = 1; p <= k; p++) {
        T saved = 0;
        for (int64_t r = 0; r < p; r++) {
            const T hi = SFX(ks_knot)(t, n, m + r + 1), lo = SFX(ks_knot)(t, n, m + r + 1 - p);
            const T den = hi - lo;
            const T temp = den > 0 ? v[r] / den : (T)0;
            if (q != 0 && p == k) q[r] = temp;
            v[r] = saved + (hi - x) * temp;
            saved = (x - lo) * temp;
        }
        v[p] = saved;
    }
}

/* 1 unless every knot row is finite and non-decreasing */
static int64_t SFX(ks_check)(int64_t nin, int64_t n, const T* grid) {
    for (int64_t i = 0; i < nin; i++) {
        const T* t = grid + i * n;
        int bad = 0;
        for (int64_t j = 0; j < n; j++) bad |= !(t[j] - t[j] == 0); /* NaN or +-inf */
        for (int64_t j = 0; j + 1 < n; j++) bad |= !(t[j] <= t[j + 1]);
        if (bad) return 1;
    }
    return 0;
}

/* Wt[i, j, o] = sw[o, i, j] * sc[o, i] (sc NULL: 1); Bt[i, o] = bw[o, i] (bw NULL: skipped) */
static void SFX(ks_pack)(int64_t nin, int64_t nout, int64_t nb, const T* sw, const T* sc, const T* bw, T* Wt,
                         T* Bt) {
    for (int64_t o = 0; o < nout; o++)
        for (int64_t i = 0; i < nin; i++) {
            const T s = sc ? sc[o * nin + i] : (T)1;
            const T* restrict w = sw + (o * nin + i) * nb;
            T* restrict d = Wt + i * nb * nout + o;
            for (int64_t j = 0; j < nb; j++) d[j * nout] = w[j] * s;
            if (bw) Bt[i * nout + o] = bw[o * nin + i];
        }
}

static inline T SFX(ks_silu)(T x) { return x / ((T)1 + EXP(-x)); }

/* a . b over n elements: two vectors of partial sums (GCC/clang vector extensions: SIMD of
 * whatever width the target has), then their lanes in index order, then the tail: one fixed
 * order for a given n (deterministic). */
typedef T SFX(ks_vec) __attribute__((vector_size(32)));
static inline T SFX(ks_dot)(int64_t n, const T* restrict a, const T* restrict b) {
    enum { L = 32 / sizeof(T) };
    SFX(ks_vec) s0 = {0}, s1 = {0}, va, vb;
    int64_t o = 0;
    for (; o + 2 * L <= n; o += 2 * L) {
        memcpy(&va, a + o, sizeof va);
        memcpy(&vb, b + o, sizeof vb);
        s0 += va * vb;
        memcpy(&va, a + o + L, sizeof va);
        memcpy(&vb, b + o + L, sizeof vb);
        s1 += va * vb;
    }
    s0 += s1;
    T acc = 0;
    for (int l = 0; l < L; l++) acc += s0[l];
    for (; o < n; o++) acc = KS_FMA(a[o], b[o], acc);
    return acc;
}

/* One feature i on a tile of nr <= KS_TILE rows: xs (the inputs), in (inside [t_0, t_last)),
 * m (span, as an index), v (k + 1 rows of KS_TILE: the bases, 0 for inputs outside), q (k rows:
 * the last level's quotients, when want_q) and e = exp(-x). Vectorised over the rows: the spans
 * by counting knots (n <= KS_COUNT_MAX) or binary search, the triangle on gathered knots. */
#define KS_TILE 64
#define KS_UMAX 1024 /* outputs up to which grad_x forms u on the stack (one dot product per input) */
#define KS_COUNT_MAX 48
static __attribute__((noinline)) void SFX(ks_tile_bases)(int64_t nr, const T* restrict x, int64_t sx, const T* restrict t, int64_t n,
                               int64_t k, int want_q, T* restrict xs, T* restrict in, int64_t* restrict m,
                               T* restrict v, T* restrict q, T* restrict e) {
    const T t0 = t[0], tn = t[n - 1];
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
    } else {
        for (int64_t b = 0; b < nr; b++) m[b] = SFX(ks_span)(t, n, xc[b]);
    }
    const int64_t nk = 2 * k; /* knots m - k + 1 .. m + k, clamped to the row */
    for (int64_t b = 0; b < nr; b++) {
        const int64_t mb = m[b];
        for (int64_t d = 0; d < nk; d++) kt[d * KS_TILE + b] = SFX(ks_knot)(t, n, mb - k + 1 + d);
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
}

/* y[o] += s Bi[o] (Bi not NULL) + sum_{r <= K} v[r * KS_TILE] W[r * nout + o] */
static inline __attribute__((always_inline)) void SFX(ks_fwd_row)(int64_t K, int64_t nout, T* restrict y, T s,
                                                                   const T* restrict Bi, const T* restrict v,
                                                                   const T* restrict W) {
    T c[KS_MAXK + 1];
    for (int64_t r = 0; r <= K; r++) c[r] = v[r * KS_TILE];
    if (Bi) {
        for (int64_t o = 0; o < nout; o++) {
            T a = KS_FMA(s, Bi[o], y[o]);
            for (int64_t r = 0; r <= K; r++) a = KS_FMA(c[r], W[r * nout + o], a);
            y[o] = a;
        }
    } else {
        for (int64_t o = 0; o < nout; o++) {
            T a = y[o];
            for (int64_t r = 0; r <= K; r++) a = KS_FMA(c[r], W[r * nout + o], a);
            y[o] = a;
        }
    }
}

/* ks_fwd_row for any K (one out-of-line copy: the build stays short) */
static __attribute__((noinline)) void SFX(ks_fwd_any)(int64_t K, int64_t nout, T* restrict y, T s, const T* restrict Bi,
                                                      const T* restrict v, const T* restrict W) {
    SFX(ks_fwd_row)(K, nout, y, s, Bi, v, W);
}

/* rows [0, N) of y (N, nout), row stride nout. pack: check the knots (return 1 if not finite
 * and non-decreasing) and pack Wt/Bt from sw, sc, bw first; else Wt/Bt are the caller's. */
int64_t SFX(kf_sparse_fwd)(int64_t N, int64_t nin, int64_t nout, int64_t k, int64_t n, const T* x, int64_t sx,
                           const T* grid, const T* sw, const T* sc, const T* bw, int64_t has_base, int64_t pack,
                           T* Wt, T* Bt, T* y) {
    const int64_t nb = n - k - 1;
    if (k < 0 || k >= KS_MAXK || nb < 1) return 2;
    if (pack) {
        if (SFX(ks_check)(nin, n, grid)) return 1;
        SFX(ks_pack)(nin, nout, nb, sw, sc, has_base ? bw : 0, Wt, Bt);
    }
    T xs[KS_TILE], in[KS_TILE], e[KS_TILE], v[(KS_MAXK + 1) * KS_TILE], q[KS_MAXK * KS_TILE], zero[KS_MAXK + 1];
    int64_t m[KS_TILE];
    for (int64_t r = 0; r <= KS_MAXK; r++) zero[r] = 0;
    (void)zero;
    for (int64_t b0 = 0; b0 < N; b0 += KS_TILE) {
        const int64_t nr = b0 + KS_TILE < N ? KS_TILE : N - b0;
        T* restrict yt = y + b0 * nout;
        memset(yt, 0, (size_t)(nr * nout) * sizeof(T));
        for (int64_t i = 0; i < nin; i++) {
            const T* restrict t = grid + i * n;
            const T* restrict Wi = Wt + i * nb * nout;
            const T* restrict Bi = has_base ? Bt + i * nout : 0;
            SFX(ks_tile_bases)(nr, x + b0 * sx + i, sx, t, n, k, 0, xs, in, m, v, q, e);
            for (int64_t b = 0; b < nr; b++) {
                T* restrict yr = yt + b * nout;
                const T s = xs[b] / ((T)1 + e[b]); /* silu */
                if (in[b] != 0 && m[b] >= k && m[b] <= nb - 1) { /* all k + 1 bases exist */
                    const T* restrict W = Wi + (m[b] - k) * nout;
                    if (k == 3) /* the default order: a constant K, the loop over r unrolled */
                        SFX(ks_fwd_row)(3, nout, yr, s, Bi, v + b, W);
                    else
                        SFX(ks_fwd_any)(k, nout, yr, s, Bi, v + b, W);
                    continue;
                }
                if (Bi) SFX(ks_fwd_any)(-1, nout, yr, s, Bi, v + b, Wi); /* (K = -1: the SiLU term alone) */
                if (in[b] == 0) continue;
                for (int64_t r = 0; r <= k; r++) { /* an end span: the slots whose basis exists */
                    const int64_t j = m[b] - k + r;
                    if (j >= 0 && j < nb) SFX(ks_fwd_any)(0, nout, yr, 0, 0, v + b + r * KS_TILE, Wi + j * nout);
                }
            }
        }
    }
    return 0;
}

/* gW[r * nout + o] += v_r g[o] (gW not NULL) for r <= K; returns sum_o g[o] (sp Bi[o] + sum_r d_r W[r * nout + o])
 * (W not NULL; sp * Bi only when Bi not NULL) */
static inline __attribute__((always_inline)) T SFX(ks_bwd_row)(int64_t K, int64_t nout, const T* restrict g,
                                                                const T* restrict v, const T* restrict d, T* restrict gW,
                                                                T sp, const T* restrict Bi, const T* restrict W) {
    if (gW)
        for (int64_t r = 0; r <= K; r++) { /* one row at a time: plain axpys, vectorised */
            const T c = v[r * KS_TILE];
            T* restrict gr = gW + r * nout;
            for (int64_t o = 0; o < nout; o++) gr[o] = KS_FMA(c, g[o], gr[o]);
        }
    if (!W) return 0;
    if (nout <= KS_UMAX) { /* u = sp Bi + sum_r d_r W_r (axpys), then one dot product */
        T u[KS_UMAX], dd[KS_MAXK + 1];
        for (int64_t r = 0; r <= K; r++) dd[r] = d[r * KS_TILE];
        if (Bi) {
            for (int64_t o = 0; o < nout; o++) {
                T a = sp * Bi[o];
                for (int64_t r = 0; r <= K; r++) a = KS_FMA(dd[r], W[r * nout + o], a);
                u[o] = a;
            }
        } else {
            for (int64_t o = 0; o < nout; o++) {
                T a = 0;
                for (int64_t r = 0; r <= K; r++) a = KS_FMA(dd[r], W[r * nout + o], a);
                u[o] = a;
            }
        }
        return SFX(ks_dot)(nout, g, u);
    }
    T acc = Bi ? sp * SFX(ks_dot)(nout, g, Bi) : (T)0;
    for (int64_t r = 0; r <= K; r++) acc += d[r * KS_TILE] * SFX(ks_dot)(nout, g, W + r * nout);
    return acc;
}

/* ks_bwd_row for any K (one out-of-line copy) */
static __attribute__((noinline)) T SFX(ks_bwd_any)(int64_t K, int64_t nout, const T* restrict g, const T* restrict v,
                                                   const T* restrict d, T* restrict gW, T sp, const T* restrict Bi,
                                                   const T* restrict W) {
    return SFX(ks_bwd_row)(K, nout, g, v, d, gW, sp, Bi, W);
}

/* Backward over rows [0, N): gW (in, nb, out) and gB (in, out) zeroed, then accumulated (NULL:
 * not needed); gx (N, nin) with row stride sgx (NULL: not needed; then Wt/Bt are not read).
 * pack as in kf_sparse_fwd (the tables are needed only for gx). */
int64_t SFX(kf_sparse_bwd)(int64_t N, int64_t nin, int64_t nout, int64_t k, int64_t n, const T* x, int64_t sx,
                           const T* grid, const T* gy, const T* sw, const T* sc, const T* bw, int64_t has_base,
                           int64_t pack, T* Wt, T* Bt, T* gx, int64_t sgx, T* gW, T* gB) {
    const int64_t nb = n - k - 1;
    if (k < 0 || k >= KS_MAXK || nb < 1) return 2;
    if (pack) {
        if (SFX(ks_check)(nin, n, grid)) return 1;
        if (gx) SFX(ks_pack)(nin, nout, nb, sw, sc, has_base ? bw : 0, Wt, Bt);
    }
    if (gW) memset(gW, 0, (size_t)(nin * nb * nout) * sizeof(T));
    if (gB) memset(gB, 0, (size_t)(nin * nout) * sizeof(T));
    T xs[KS_TILE], in[KS_TILE], e[KS_TILE], v[(KS_MAXK + 1) * KS_TILE], q[KS_MAXK * KS_TILE];
    T dv[(KS_MAXK + 1) * KS_TILE];
    int64_t m[KS_TILE];
    for (int64_t b0 = 0; b0 < N; b0 += KS_TILE) {
        const int64_t nr = b0 + KS_TILE < N ? KS_TILE : N - b0;
        for (int64_t i = 0; i < nin; i++) {
            const T* restrict t = grid + i * n;
            const T* restrict Wi = gx ? Wt + i * nb * nout : 0;
            const T* restrict Bi = (gx && has_base) ? Bt + i * nout : 0;
            T* restrict gWi = gW ? gW + i * nb * nout : 0;
            T* restrict gBi = (gB && has_base) ? gB + i * nout : 0;
            SFX(ks_tile_bases)(nr, x + b0 * sx + i, sx, t, n, k, gx != 0 && k > 0, xs, in, m, v, q, e);
            if (gx) { /* B_r' = k (q_{r-1} - q_r), q_{-1} = q_k = 0 */
                for (int64_t r = 0; r <= k; r++) {
                    T* restrict dr = dv + r * KS_TILE;
                    const T* restrict qa = q + (r > 0 ? r - 1 : 0) * KS_TILE;
                    const T* restrict qb = q + (r < k ? r : 0) * KS_TILE;
                    const T ka = r > 0 ? (T)k : (T)0, kb = r < k ? (T)k : (T)0;
                    if (k == 0) /* piecewise constant: no derivative (and no quotients computed) */
                        for (int64_t b = 0; b < nr; b++) dr[b] = 0;
                    else
                        for (int64_t b = 0; b < nr; b++) dr[b] = ka * qa[b] - kb * qb[b];
                }
            }
            for (int64_t b = 0; b < nr; b++) {
                const T* restrict g = gy + (b0 + b) * nout;
                const T xi = xs[b], sig = (T)1 / ((T)1 + e[b]);
                if (gBi) {
                    const T s = xi / ((T)1 + e[b]);
                    for (int64_t o = 0; o < nout; o++) gBi[o] = KS_FMA(s, g[o], gBi[o]);
                }
                const T sp = sig * ((T)1 + xi * ((T)1 - sig)); /* silu'(x) */
                T acc = 0;
                if (in[b] != 0 && m[b] >= k && m[b] <= nb - 1) {
                    const int64_t off = (m[b] - k) * nout;
                    T* restrict gw = gWi ? gWi + off : 0;
                    const T* restrict W = Wi ? Wi + off : 0;
                    if (k == 3)
                        acc = SFX(ks_bwd_row)(3, nout, g, v + b, dv + b, gw, sp, Bi, W);
                    else
                        acc = SFX(ks_bwd_any)(k, nout, g, v + b, dv + b, gw, sp, Bi, W);
                } else {
                    if (Bi) acc = SFX(ks_bwd_any)(-1, nout, g, v + b, dv + b, 0, sp, Bi, Wi);
                    if (in[b] != 0)
                        for (int64_t r = 0; r <= k; r++) { /* an end span: the slots whose basis exists */
                            const int64_t j = m[b] - k + r;
                            if (j < 0 || j >= nb) continue;
                            acc += SFX(ks_bwd_any)(0, nout, g, v + b + r * KS_TILE, dv + b + r * KS_TILE,
                                                   gWi ? gWi + j * nout : 0, 0, 0, Wi ? Wi + j * nout : 0);
                        }
                }
                if (gx) gx[(b0 + b) * sgx + i] = acc;
            }
        }
    }
    return 0;
}

/* Sum P partial weight gradients (each gW (in, nb, out) then gB (in, out), part p at
 * parts + p * stride) in order p = 0..P-1, then: gsw[o, i, j] = GW[i, j, o] * sc[o, i] (sc NULL:
 * 1), gsc[o, i] = sum_j GW[i, j, o] sw[o, i, j], gbw[o, i] = GB[i, o]; any output may be NULL. */
void SFX(kf_sparse_finish)(int64_t P, int64_t nin, int64_t nout, int64_t nb, T* parts, int64_t stride,
                           int64_t has_gb, const T* sw, const T* sc, T* gsw, T* gsc, T* gbw) {
    const int64_t nw = nin * nb * nout, tot = nw + (has_gb ? nin * nout : 0);
    for (int64_t p = 1; p < P; p++) {
        const T* restrict src = parts + p * stride;
        for (int64_t e = 0; e < tot; e++) parts[e] += src[e];
    }
    const T* GW = parts;
    const T* GB = parts + nw;
    for (int64_t o = 0; o < nout; o++)
        for (int64_t i = 0; i < nin; i++) {
            const T* restrict gwi = GW + i * nb * nout + o;
            if (gsw) {
                const T s = sc ? sc[o * nin + i] : (T)1;
                T* restrict d = gsw + (o * nin + i) * nb;
                for (int64_t j = 0; j < nb; j++) d[j] = gwi[j * nout] * s;
            }
            if (gsc) {
                const T* restrict w = sw + (o * nin + i) * nb;
                T acc = 0;
                for (int64_t j = 0; j < nb; j++) acc += gwi[j * nout] * w[j];
                gsc[o * nin + i] = acc;
            }
            if (gbw && has_gb) gbw[o * nin + i] = GB[i * nout + o];
        }
}

#endif /* sparse kernels */
