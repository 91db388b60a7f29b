/* Hand-written CPU kernels for float32 contiguous tensors: the fast path of HMAdam(W), AdamS,
 * SlimAdamW and Adam-mini on CPU (lowmem.optim._native compiles and loads this file). Each kernel
 * does the maths of its optimizer's reference, in float32.
 *
 * Element-wise steps (HMAdam(W), AdamS, SlimAdamW's uncompressed tensors, Adam-mini's element
 * blocks): all tensors of a call in one parallel region without barriers (FOR_EACH_SHARE, below).
 *
 * SlimAdamW's compressed tensors (and Adam-mini's blocks, which are runs of whole rows): a
 * parameter is seen as an (R, C) row-major matrix whose second moment v is averaged over its
 * columns ("rows" kernel: v has R entries) or over its rows ("cols" kernel: v has C entries):
 *
 *     m = m + (1 - b1) (g - m)
 *     v = b2 v + (1 - b2) mean(g^2)              (over C for rows, over R for cols)
 *     W = W * decay - step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)
 *
 * the same maths as slimadam._adam_update (the for-loop reference and the Inductor kernel).
 * Row sums of g^2 accumulate in double (column sums: see below). Memory traffic per element:
 *
 *   rows: one pass, each row reduced while it sits in L1 and then updated: reads W, g, m and
 *         writes W, m (20 bytes), the floor of the algorithm;
 *   cols: the column means need every row before any element can be updated, so two
 *         row-contiguous passes (below): 24 bytes, 20 when m stays cached between them.
 *
 * Inductor's reduction for the cols case walks each 16-column strip down all rows (one cache
 * line per row, stride C), which measured 2.5x slower than a row-contiguous read here.
 * Compiled and loaded by lowmem.optim._native (gcc/clang, -O3 -march=native -fopenmp).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

int lowmem_slim_rows_f32(int64_t R, int64_t C, float *restrict w, const float *restrict g, float *restrict m,
                         float *restrict v, float decay, float one_minus_beta1, float beta2, float one_minus_beta2,
                         float step_size, float bias_correction2_sqrt, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < R; r++) {
        const float *gr = g + r * C;
        float *mr = m + r * C, *wr = w + r * C;
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < C; c++) sum += (double)gr[c] * (double)gr[c];
        const float vr = beta2 * v[r] + one_minus_beta2 * (float)(sum / (double)C);
        v[r] = vr;
        const float denom = sqrtf(vr) / bias_correction2_sqrt + eps;
#pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            const float mc = mr[c] + one_minus_beta1 * (gr[c] - mr[c]);
            mr[c] = mc;
            wr[c] = wr[c] * decay - step_size * mc / denom;
        }
    }
    return 0;
}

/* ---- cols --------------------------------------------------------------------------------------
 * Pass 1 updates m and accumulates per-thread column sums of g^2 (reads g, m, writes m): in float
 * over blocks of COLS_BLOCK rows (L1-resident, as fast as the plain loop), each block's sums then
 * added in double, so the rounding error stays that of a COLS_BLOCK-term float sum. After a
 * barrier the sums give v and the C denominators; pass 2 updates W (reads W, m, writes W) over
 * the same rows per thread, which re-reads m it has just written (cached when the tensor fits).
 * Measured in the same rounds as a bare two-pass traffic pattern (m += 0 g; W += 0 m), it is 2-12%
 * slower; a double-precision accumulator (1-7% slower still), pipelining pass 2 of one tensor
 * with pass 1 of the next, one parallel region for all tensors, re-reading g instead of m and a
 * reversed pass 2 were tried and dropped (no gain or slower).
 */
#define COLS_BLOCK 32

int lowmem_slim_cols_f32(int64_t R, int64_t C, float *restrict w, const float *restrict g, float *restrict m,
                         float *restrict v, float decay, float one_minus_beta1, float beta2, float one_minus_beta2,
                         float step_size, float bias_correction2_sqrt, float eps, int threads) {
    /* per thread: C double sums and C float block sums; then the C denominators */
    double *sums = calloc((size_t)threads * (size_t)C, sizeof(double));
    float *block_sums = malloc((size_t)threads * (size_t)C * sizeof(float));
    float *denom = malloc((size_t)C * sizeof(float));
    if (sums == NULL || block_sums == NULL || denom == NULL) {
        free(sums);
        free(block_sums);
        free(denom);
        return 1;
    }
#pragma omp parallel num_threads(threads)
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t lo = R * t / nt, hi = R * (t + 1) / nt; /* this thread's rows, in both passes */
        double *acc = sums + (size_t)t * (size_t)C;
        float *blk = block_sums + (size_t)t * (size_t)C;
        for (int64_t r0 = lo; r0 < hi; r0 += COLS_BLOCK) {
            const int64_t r1 = r0 + COLS_BLOCK < hi ? r0 + COLS_BLOCK : hi;
            for (int64_t c = 0; c < C; c++) blk[c] = 0.0f;
            for (int64_t r = r0; r < r1; r++) {
                const float *gr = g + r * C;
                float *mr = m + r * C;
#pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    const float gc = gr[c];
                    mr[c] = mr[c] + one_minus_beta1 * (gc - mr[c]);
                    blk[c] += gc * gc;
                }
            }
#pragma omp simd
            for (int64_t c = 0; c < C; c++) acc[c] += (double)blk[c];
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t c = 0; c < C; c++) {
            double sum = 0.0;
            for (int64_t k = 0; k < nt; k++) sum += sums[(size_t)k * (size_t)C + c];
            const float vc = beta2 * v[c] + one_minus_beta2 * (float)(sum / (double)R);
            v[c] = vc;
            denom[c] = sqrtf(vc) / bias_correction2_sqrt + eps;
        }
        /* implicit barrier: v and denom are final */
        for (int64_t r = lo; r < hi; r++) {
            const float *mr = m + r * C;
            float *wr = w + r * C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) wr[c] = wr[c] * decay - step_size * mr[c] / denom[c];
        }
    }
    free(sums);
    free(block_sums);
    free(denom);
    return 0;
}

/* ---- element-wise steps over many tensors, no barrier ------------------------------------------
 * The tensors of a call are one concatenated range of elements split evenly across the threads
 * (a thread's share may start in one tensor and end in another), so the whole step is one
 * parallel region with no barrier in it: torch's fused AdamW opens a region per tensor.
 * FOR_EACH_SHARE runs BODY(i, lo, hi) for every piece [lo, hi) of tensor i in this thread's share.
 */
#define FOR_EACH_SHARE(n, numel, threads, BODY)                                                         \
    do {                                                                                                \
        int64_t total = 0;                                                                              \
        for (int i = 0; i < (n); i++) total += (numel)[i];                                             \
        _Pragma("omp parallel num_threads(threads)") {                                                  \
            const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();                        \
            const int64_t begin = total * t / nt, end = total * (t + 1) / nt;                          \
            int64_t offset = 0;                                                                         \
            for (int i = 0; i < (n) && offset < end; offset += (numel)[i], i++) {                       \
                const int64_t lo = begin > offset ? begin - offset : 0;                                 \
                const int64_t hi = end - offset < (numel)[i] ? end - offset : (numel)[i];              \
                if (lo < hi) BODY(i, lo, hi);                                                           \
            }                                                                                           \
        }                                                                                               \
    } while (0)

/* HMAdam(W), lowmem.optim.hmadam._hmadam_kernel: w, the momentum buffer b (.grad) and v. */
#define HMADAM_BODY(i, lo, hi)                                                                          \
    do {                                                                                                \
        float *restrict wi = w[i], *restrict bi = b[i], *restrict vi = v[i];                           \
        _Pragma("omp simd") for (int64_t k = lo; k < hi; k++) {                                         \
            const float bk = bi[k] * clip_coef + l2 * wi[k];                                            \
            const float mk = one_minus_beta1 * bk;                                                      \
            const float vk = beta2 * vi[k] + v_scale * mk * mk;                                         \
            wi[k] = wi[k] * param_decay - step_size * mk / (sqrtf(vk) * inv_bias_correction2_sqrt + eps); \
            vi[k] = vk;                                                                                 \
            bi[k] = beta1 * bk;                                                                         \
        }                                                                                               \
    } while (0)

int lowmem_hmadam_f32(int n, const int64_t *numel, float **w, float **b, float **v, float clip_coef, float l2,
                      float one_minus_beta1, float beta2, float v_scale, float param_decay, float step_size,
                      float inv_bias_correction2_sqrt, float eps, float beta1, int threads) {
    FOR_EACH_SHARE(n, numel, threads, HMADAM_BODY);
    return 0;
}

/* AdamS, lowmem.optim.adams._adams_kernel: w, g and m (the denominator uses the old m). */
#define ADAMS_BODY(i, lo, hi)                                                                           \
    do {                                                                                                \
        float *restrict wi = w[i], *restrict mi = m[i];                                                 \
        const float *restrict gi = g[i];                                                                \
        _Pragma("omp simd") for (int64_t k = lo; k < hi; k++) {                                         \
            const float gk = gi[k], mk = mi[k];                                                         \
            const float denom = sqrtf(old_m_weight * mk * mk + one_minus_beta2 * gk * gk) + eps;        \
            const float mn = mk + one_minus_beta1 * (gk - mk);                                          \
            mi[k] = mn;                                                                                 \
            wi[k] = wi[k] * param_decay - step_size * mn / denom;                                       \
        }                                                                                               \
    } while (0)

int lowmem_adams_f32(int n, const int64_t *numel, float **w, float **g, float **m, float param_decay,
                     float old_m_weight, float one_minus_beta2, float one_minus_beta1, float step_size, float eps,
                     int threads) {
    FOR_EACH_SHARE(n, numel, threads, ADAMS_BODY);
    return 0;
}

/* AdamW (SlimAdamW's uncompressed tensors), lowmem.optim.slimadam._adamw_kernel: w, g, m and v. */
#define ADAMW_BODY(i, lo, hi)                                                                           \
    do {                                                                                                \
        float *restrict wi = w[i], *restrict mi = m[i], *restrict vi = v[i];                           \
        const float *restrict gi = g[i];                                                                \
        _Pragma("omp simd") for (int64_t k = lo; k < hi; k++) {                                         \
            const float gk = gi[k];                                                                     \
            const float vk = beta2 * vi[k] + one_minus_beta2 * (gk * gk);                               \
            const float mk = mi[k] + one_minus_beta1 * (gk - mi[k]);                                    \
            vi[k] = vk;                                                                                 \
            mi[k] = mk;                                                                                 \
            wi[k] = wi[k] * param_decay - step_size * mk / (sqrtf(vk) / bias_correction2_sqrt + eps);   \
        }                                                                                               \
    } while (0)

int lowmem_adamw_f32(int n, const int64_t *numel, float **w, float **g, float **m, float **v, float param_decay,
                     float one_minus_beta1, float beta2, float one_minus_beta2, float step_size,
                     float bias_correction2_sqrt, float eps, int threads) {
    FOR_EACH_SHARE(n, numel, threads, ADAMW_BODY);
    return 0;
}
