/* Fused LayerNorm forward and backward over the last dimension, for cifarlab.ops.layernorm.
 *
 * The same formulas as LayerNormFunction's eager path (docs/derivations.md, "LayerNorm"),
 * one row at a time so that each row is read from cache instead of memory:
 *
 *   forward   mu = mean(x);  xhat = (x - mu) * rstd,  rstd = 1/sqrt(mean((x - mu)^2) + eps)
 *             y = gamma * xhat + beta                                  (3 passes over a row)
 *   backward  dxhat = dy * gamma
 *             dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
 *             dgamma = sum over rows of dy * xhat,  dbeta = sum over rows of dy   (2 passes)
 *
 * Rows are split across OpenMP threads. Loaded from Python with ctypes after torch, whose
 * bundled libgomp.so.1 then serves these parallel regions too (one thread pool, not two).
 * A NULL output pointer means "not needed": that gradient is not computed.
 * Arrays are dense and row-major: x, y, xhat, dy, dx are n x m, rstd is n x 1, gamma, beta,
 * dgamma, dbeta have m entries (the Python side checks this before passing any pointer).
 * Returns 0; 1 if scratch memory could not be allocated; 2 if an argument is invalid (a
 * NULL pointer where an array is required, n < 0 or m < 1): then nothing is read or written.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else  /* built without OpenMP: one thread, the pragmas are ignored */
static int omp_get_max_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
#endif

#define DEFINE_LAYERNORM(T, SUFFIX, SQRT)                                                      \
int cl_layernorm_forward_##SUFFIX(const T *x, const T *gamma, const T *beta, T *y, T *xhat,  \
                                  T *rstd, int64_t n, int64_t m, double eps)                 \
{                                                                                             \
    if (x == NULL || gamma == NULL || beta == NULL || y == NULL || xhat == NULL ||            \
        rstd == NULL || n < 0 || m < 1)                                                       \
        return 2;                                                                             \
    _Pragma("omp parallel for schedule(static)")                                              \
    for (int64_t i = 0; i < n; i++) {                                                         \
        const T *xr = x + i * m;                                                              \
        T *hr = xhat + i * m, *yr = y + i * m;                                                \
        T sum = 0, sumsq = 0;                                                                 \
        _Pragma("omp simd reduction(+:sum)")                                                  \
        for (int64_t j = 0; j < m; j++) sum += xr[j];                                         \
        const T mu = sum / (T)m;                                                              \
        _Pragma("omp simd reduction(+:sumsq)")                                                \
        for (int64_t j = 0; j < m; j++) {   /* two-pass variance: no cancellation */          \
            const T c = xr[j] - mu;                                                           \
            hr[j] = c;                                                                        \
            sumsq += c * c;                                                                   \
        }                                                                                     \
        const T r = (T)1 / SQRT(sumsq / (T)m + (T)eps);                                       \
        _Pragma("omp simd")                                                                   \
        for (int64_t j = 0; j < m; j++) {                                                     \
            const T h = hr[j] * r;                                                            \
            hr[j] = h;                                                                        \
            yr[j] = gamma[j] * h + beta[j];                                                   \
        }                                                                                     \
        rstd[i] = r;                                                                          \
    }                                                                                         \
    return 0;                                                                                 \
}                                                                                             \
                                                                                              \
int cl_layernorm_backward_##SUFFIX(const T *dy, const T *xhat, const T *rstd, const T *gamma, \
                                   T *dx, T *dgamma, T *dbeta, int64_t n, int64_t m)         \
{                                                                                             \
    if (dy == NULL || xhat == NULL || n < 0 || m < 1 ||                                       \
        (dx != NULL && (rstd == NULL || gamma == NULL)))                                      \
        return 2;                                                                             \
    const int need_params = dgamma != NULL || dbeta != NULL;                                  \
    const int nthreads = omp_get_max_threads();                                               \
    T *partial = NULL; /* per-thread column sums: [thread][dgamma | dbeta][m] */              \
    if (need_params) {                                                                        \
        partial = (T *)calloc((size_t)nthreads * 2 * (size_t)m, sizeof(T));                   \
        if (partial == NULL) return 1;                                                        \
    }                                                                                         \
    _Pragma("omp parallel num_threads(nthreads)")                                             \
    {                                                                                         \
        T *pg = need_params ? partial + (size_t)omp_get_thread_num() * 2 * m : NULL;          \
        T *pb = need_params ? pg + m : NULL;                                                  \
        _Pragma("omp for schedule(static)")                                                   \
        for (int64_t i = 0; i < n; i++) {                                                     \
            const T *dr = dy + i * m, *hr = xhat + i * m;                                     \
            if (need_params) {                                                                \
                _Pragma("omp simd")                                                           \
                for (int64_t j = 0; j < m; j++) {                                             \
                    pg[j] += dr[j] * hr[j];                                                   \
                    pb[j] += dr[j];                                                           \
                }                                                                             \
            }                                                                                 \
            if (dx == NULL) continue;                                                         \
            T s = 0, sh = 0; /* sum(dxhat), sum(dxhat * xhat) */                              \
            _Pragma("omp simd reduction(+:s, sh)")                                            \
            for (int64_t j = 0; j < m; j++) {                                                 \
                const T g = dr[j] * gamma[j];                                                 \
                s += g;                                                                       \
                sh += g * hr[j];                                                              \
            }                                                                                 \
            const T r = rstd[i], a = s / (T)m, b = sh / (T)m;                                 \
            T *xr = dx + i * m;                                                               \
            _Pragma("omp simd")                                                               \
            for (int64_t j = 0; j < m; j++) xr[j] = r * (dr[j] * gamma[j] - a - hr[j] * b);   \
        }                                                                                     \
    }                                                                                         \
    if (need_params) {                                                                        \
        if (dgamma != NULL) memset(dgamma, 0, (size_t)m * sizeof(T));                        \
        if (dbeta != NULL) memset(dbeta, 0, (size_t)m * sizeof(T));                          \
        for (int t = 0; t < nthreads; t++) {                                                  \
            const T *pg = partial + (size_t)t * 2 * m, *pb = pg + m;                          \
            if (dgamma != NULL) for (int64_t j = 0; j < m; j++) dgamma[j] += pg[j];           \
            if (dbeta != NULL) for (int64_t j = 0; j < m; j++) dbeta[j] += pb[j];             \
        }                                                                                     \
        free(partial);                                                                        \
    }                                                                                         \
    return 0;                                                                                 \
}

DEFINE_LAYERNORM(float, f32, sqrtf)
DEFINE_LAYERNORM(double, f64, sqrt)
