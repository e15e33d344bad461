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

int kf_abi_version(void) { return 3; }

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
