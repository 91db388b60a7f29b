/* Hand-written CPU kernels for SlimAdamW's compressed tensors (float32, contiguous).
 *
 * A parameter is seen as an (R, C) row-major matrix whose second moment v is averaged over its
 * columns ("rows" kernel: v has R entries) or over its rows ("cols" kernel: v has C entries):
 *
 *     m = m + (1 - b1) (g - m)
 *     v = b2 v + (1 - b2) mean(g^2)              (over C for rows, over R for cols)
 *     W = W * decay - step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)
 *
 * the same maths as slimadam._adam_update (the for-loop reference and the Inductor kernel).
 * Sums of g^2 accumulate in double. Memory traffic per element:
 *
 *   rows: one pass, each row reduced while it sits in L1 and then updated: reads W, g, m and
 *         writes W, m (20 bytes), the floor of the algorithm;
 *   cols: the column means need every row before any element can be updated, so two passes:
 *         pass 1 updates m and accumulates per-thread column sums (reads g, m, writes m), pass 2
 *         updates W (reads W, m, writes W). Both passes stream row-contiguous memory over the
 *         same rows per thread, pass 2 in reverse order, so a thread first re-reads the m rows
 *         it wrote last, from its caches. 24 bytes at most, 20 when m stays cached.
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

int lowmem_slim_cols_f32(int64_t R, int64_t C, float *restrict w, const float *restrict g, float *restrict m,
                         float *restrict v, float decay, float one_minus_beta1, float beta2, float one_minus_beta2,
                         float step_size, float bias_correction2_sqrt, float eps, int threads) {
    /* per-thread column sums of g^2 (double), then the C denominators of the update */
    double *partial = calloc((size_t)threads * (size_t)C, sizeof(double));
    float *denom = malloc((size_t)C * sizeof(float));
    if (partial == NULL || denom == NULL) {
        free(partial);
        free(denom);
        return 1;
    }
#pragma omp parallel num_threads(threads)
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t lo = R * t / nt, hi = R * (t + 1) / nt; /* this thread's rows, in both passes */
        double *acc = partial + (size_t)t * (size_t)C;
        for (int64_t r = lo; r < hi; r++) {
            const float *gr = g + r * C;
            float *mr = m + r * C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                const float gc = gr[c];
                mr[c] = mr[c] + one_minus_beta1 * (gc - mr[c]);
                acc[c] += (double)gc * (double)gc;
            }
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t c = 0; c < C; c++) {
            double sum = 0.0;
            for (int64_t k = 0; k < nt; k++) sum += partial[(size_t)k * (size_t)C + c];
            const float vc = beta2 * v[c] + one_minus_beta2 * (float)(sum / (double)R);
            v[c] = vc;
            denom[c] = sqrtf(vc) / bias_correction2_sqrt + eps;
        }
        /* implicit barrier: v and denom are final. Rows in reverse: the m rows this thread wrote
         * last are still in its caches. */
        for (int64_t r = lo; r < hi; r++) {
            const float *mr = m + r * C;
            float *wr = w + r * C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) wr[c] = wr[c] * decay - step_size * mr[c] / denom[c];
        }
    }
    free(partial);
    free(denom);
    return 0;
}
