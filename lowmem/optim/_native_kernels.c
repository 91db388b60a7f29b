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
 * the same maths as lowmem.optim._adamw.adam_update (the compiled and foreach kernels).
 * Row sums of g^2 accumulate in double (column sums: see below). Memory traffic per element:
 *
 *   rows: one pass, each row reduced while it sits in L1 and then updated: reads W, g, m and
 *         writes W, m (20 bytes), the floor of the algorithm;
 *   cols: the column means need every row before any element can be updated, so two
 *         row-contiguous passes (below): 24 bytes, 20 when m stays cached between them.
 *
 * Inductor's reduction for the cols case walks each 16-column strip down all rows (one cache
 * line per row, stride C), which measured 2.5x slower than a row-contiguous read here.
 * Compiled and loaded by lowmem.optim._native (gcc/clang, -O3 -march=native -fopenmp; where the
 * compiler rejects -fopenmp or -march=native, without them).
 *
 * Without OpenMP (no _OPENMP) every "#pragma omp" is ignored and each parallel region is one plain
 * block run once: the fallbacks below make it thread 0 of 1, so the hand-split ranges cover
 * everything and each per-thread scratch reduction adds just its first slot. Every kernel computes
 * the same result single-threaded; keep it so when adding a parallel region.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
#endif

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

/* AdamW (lowmem.optim._adamw.adamw_kernel: SlimAdamW's uncompressed tensors, Adam-mini's element
 * blocks, IO-Adam's other parameters): w, g, m and v. */
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

/* ---- AdaPM's element-wise update (lowmem.optim.adapm._adapm_kernel) ------------------------------
 * Per tensor i (numel[i] elements, w, g and the momentum input share its layout):
 *   momentum    mode 0: g (no momentum)           mode 1: m = m + (1-b1)(g - m), stored (full, adamw)
 *               mode 2: g + d (low-rank: d is the n x m correction (b1/(1-b1))(L R - L' R'))
 *               mode 3: d (a momentum computed elsewhere)
 *   denominator full_v[i]: v = b2 v + (1-b2) g^2, stored; den = sqrt(v) / bias_correction2_sqrt + eps
 *               else: den = v[i][(k / div[i]) % len[i]], precomputed per fan-out index (AdaPM-mini)
 *   u = clamp(mom / den, -clip, clip) (clip = inf: no clamp; NaN stays NaN as in torch.clamp)
 *   w = w * decay - step_size * u
 * One call, one parallel region over all tensors (FOR_EACH_SHARE). A run of elements that shares a
 * precomputed denominator (div > 1) or walks it contiguously (div = 1) is one simd loop.
 */
static inline float lowmem_clampf(float u, float clip) { return u > clip ? clip : (u < -clip ? -clip : u); }

typedef struct {
    float decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps, clip;
} lowmem_adapm_scalars;

/* Elements [k0, k1) of one tensor; MODE and FULL_V are constants at every call site (always_inline
 * and a switch below), so each combination is its own branch-free simd loop. den_step: 0 = one
 * denominator den[0] for the run, 1 = den[k - k0] (precomputed denominators only). */
static inline __attribute__((always_inline)) void lowmem_adapm_run(
    const int MODE, const int FULL_V, const int den_step, int64_t k0, int64_t k1, float *restrict w,
    const float *restrict g, float *restrict m, float *restrict v, const float *restrict den,
    const lowmem_adapm_scalars s) {
#pragma omp simd
    for (int64_t k = k0; k < k1; k++) {
        const float gk = g[k];
        float dk;
        if (FULL_V) {
            const float vk = s.beta2 * v[k] + s.one_minus_beta2 * (gk * gk);
            v[k] = vk;
            dk = sqrtf(vk) / s.bias_correction2_sqrt + s.eps;
        } else {
            dk = den_step ? den[k - k0] : den[0];
        }
        float mk;
        if (MODE == 1) {
            mk = m[k] + s.one_minus_beta1 * (gk - m[k]);
            m[k] = mk;
        } else if (MODE == 2) {
            mk = gk + m[k];
        } else if (MODE == 3) {
            mk = m[k];
        } else {
            mk = gk;
        }
        w[k] = w[k] * s.decay - s.step_size * lowmem_clampf(mk / dk, s.clip);
    }
}

static void lowmem_adapm_piece(int mode, int full_v, int64_t div, int64_t len, int64_t lo, int64_t hi,
                               float *w, const float *g, float *m, float *v, const lowmem_adapm_scalars s) {
#define ADAPM_RUN(DS, A, B, DEN)                                                                        \
    switch (mode * 2 + (full_v != 0)) {                                                                 \
    case 0: lowmem_adapm_run(0, 0, DS, A, B, w, g, m, v, DEN, s); break;                                \
    case 1: lowmem_adapm_run(0, 1, DS, A, B, w, g, m, v, DEN, s); break;                                \
    case 2: lowmem_adapm_run(1, 0, DS, A, B, w, g, m, v, DEN, s); break;                                \
    case 3: lowmem_adapm_run(1, 1, DS, A, B, w, g, m, v, DEN, s); break;                                \
    case 4: lowmem_adapm_run(2, 0, DS, A, B, w, g, m, v, DEN, s); break;                                \
    case 5: lowmem_adapm_run(2, 1, DS, A, B, w, g, m, v, DEN, s); break;                                \
    case 6: lowmem_adapm_run(3, 0, DS, A, B, w, g, m, v, DEN, s); break;                                \
    default: lowmem_adapm_run(3, 1, DS, A, B, w, g, m, v, DEN, s); break;                               \
    }
    if (full_v) {
        ADAPM_RUN(0, lo, hi, NULL);
        return;
    }
    for (int64_t k0 = lo; k0 < hi;) {
        const int64_t idx = (k0 / div) % len;
        int64_t k1;
        if (div > 1) { /* a run of elements under one denominator */
            k1 = k0 + (div - k0 % div);
            if (k1 > hi) k1 = hi;
            ADAPM_RUN(0, k0, k1, v + idx);
        } else { /* the denominators walk along with the elements */
            k1 = k0 + (len - idx);
            if (k1 > hi) k1 = hi;
            ADAPM_RUN(1, k0, k1, v + idx);
        }
        k0 = k1;
    }
#undef ADAPM_RUN
}

#define ADAPM_BODY(i, lo, hi) \
    lowmem_adapm_piece(mode[i], full_v[i], div[i], len[i], lo, hi, w[i], g[i], m[i], v[i], s)

int lowmem_adapm_f32(int n, const int64_t *numel, float **w, float **g, float **m, float **v, const int *mode,
                     const int *full_v, const int64_t *div, const int64_t *len, float decay, float one_minus_beta1,
                     float beta2, float one_minus_beta2, float step_size, float bias_correction2_sqrt, float eps,
                     float clip, int threads) {
    const lowmem_adapm_scalars s = {decay, one_minus_beta1, beta2, one_minus_beta2, step_size,
                                    bias_correction2_sqrt, eps, clip};
    FOR_EACH_SHARE(n, numel, threads, ADAPM_BODY);
    return 0;
}

/* Mean of g^2 over every index but the fan-out one (AdaPM-mini's and Adam-mini's row means): g is
 * viewed as (outer, n, inner) row-major and out gets n means, accumulated in double. inner > 1:
 * each fan-out index j is a set of contiguous runs; inner = 1 (the fan-out dim is the last one):
 * column sums, per thread over its share of the outer rows, then added. Returns 1 if the scratch
 * of the column sums cannot be allocated. */
int lowmem_fanout_mean_sq_f32(int64_t outer, int64_t n, int64_t inner, const float *restrict g, float *restrict out,
                              int threads) {
    const double count = (double)outer * (double)inner;
    if (inner > 1 || outer == 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t j = 0; j < n; j++) {
            double sum = 0.0;
            for (int64_t o = 0; o < outer; o++) {
                const float *gr = g + (o * n + j) * inner;
                float part = 0.0f; /* a row's sum in float (one L1-resident run), added in double */
#pragma omp simd reduction(+ : part)
                for (int64_t k = 0; k < inner; k++) part += gr[k] * gr[k];
                sum += (double)part;
            }
            out[j] = (float)(sum / count);
        }
        return 0;
    }
    double *sums = calloc((size_t)threads * (size_t)n, sizeof(double));
    if (sums == NULL) return 1;
#pragma omp parallel num_threads(threads)
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t lo = outer * t / nt, hi = outer * (t + 1) / nt;
        double *acc = sums + (size_t)t * (size_t)n;
        for (int64_t o = lo; o < hi; o++) {
            const float *gr = g + o * n;
#pragma omp simd
            for (int64_t j = 0; j < n; j++) acc[j] += (double)gr[j] * (double)gr[j];
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j++) {
            double sum = 0.0;
            for (int64_t k = 0; k < nt; k++) sum += sums[(size_t)k * (size_t)n + j];
            out[j] = (float)(sum / count);
        }
    }
    free(sums);
    return 0;
}

/* ---- IO-Adam's update (lowmem.optim.ioadam._io_adam_kernel) ---------------------------------------
 * Per weight i, stored (rows x cols) row-major (n_out x n_in; n_in x n_out for a Conv1D), with the
 * statistics of its rows a (rows x b) and the transposed statistics of its columns bt (b x cols),
 * both already raised to their powers (2/q and 2/p for buffer_mode "paper", 1/q and 1/p for
 * "per_slot"):
 *   D = sum_k a[:, k] (x) bt[k, :]   (then sqrt for "paper": root[i] = 1)
 *   D += sum_k a2[:, k] (x) bt2[k, :] (then sqrt: its own root) when slots2[i] > 0: a weight tied
 *                                     to an embedding, D = D_head + D_emb (a2: rows x slots2[i])
 *   m = m_decay[i] m + (1-b1) g      (g may be NULL: the fused backward already added it)
 *   w = w * decay - step_size[i] * m / (D + eps)
 * D is never stored: each row is built in tiles of 64 columns (AVX + FMA; IO_TILE otherwise) whose
 * sums stay in registers across the b slots, then that tile of w and m is updated, so the step
 * reads w, g, m and writes w, m once (20 B per element), plus b multiply-adds per element (a
 * first version that kept the tile sums in an L1 array, a load and a store per slot and element,
 * ran at ~2x its byte floor at 50M parameters). The rows of all weights of a call are split across the
 * threads by elements (a row goes to the thread whose share holds its first element): one parallel
 * region, no barrier.
 */
#define IO_TILE 256

/* acc[0..64) = sum_k a[k] bt[k * C + c] for c in [0, 64): the 64 sums stay in registers across the b
 * slots (eight 8-float accumulators), one load and one multiply-add per slot and 8 elements. */
#if defined(__AVX__) && defined(__FMA__)
#include <immintrin.h>
static inline void lowmem_io_tile64(const float *restrict a, const float *restrict bt, int64_t C, int64_t b,
                                    float *restrict acc) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    for (int64_t k = 0; k < b; k++) {
        const __m256 ak = _mm256_set1_ps(a[k]);
        const float *restrict bk = bt + k * C;
        s0 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(bk + 0), s0);
        s1 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(bk + 8), s1);
        s2 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(bk + 16), s2);
        s3 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(bk + 24), s3);
        s4 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(bk + 32), s4);
        s5 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(bk + 40), s5);
        s6 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(bk + 48), s6);
        s7 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(bk + 56), s7);
    }
    _mm256_storeu_ps(acc + 0, s0);
    _mm256_storeu_ps(acc + 8, s1);
    _mm256_storeu_ps(acc + 16, s2);
    _mm256_storeu_ps(acc + 24, s3);
    _mm256_storeu_ps(acc + 32, s4);
    _mm256_storeu_ps(acc + 40, s5);
    _mm256_storeu_ps(acc + 48, s6);
    _mm256_storeu_ps(acc + 56, s7);
}
#define LOWMEM_IO_STEP 64
#else
#define LOWMEM_IO_STEP IO_TILE
#endif

/* acc[0..tc) = sum_k a[k] bt[k * C + c]: any tile width (the generic path, and the last columns). */
static inline void lowmem_io_tile(const float *restrict a, const float *restrict bt, int64_t C, int64_t b,
                                  int64_t tc, float *restrict acc) {
#pragma omp simd
    for (int64_t c = 0; c < tc; c++) acc[c] = 0.0f;
    for (int64_t k = 0; k < b; k++) {
        const float ak = a[k];
        const float *restrict bk = bt + k * C;
#pragma omp simd
        for (int64_t c = 0; c < tc; c++) acc[c] += ak * bk[c];
    }
}

/* acc[0..tc) = one use's D over a tile of tc columns: the sum over its b slots, then its root if
 * root (buffer_mode "paper"). */
static inline void lowmem_io_denominator(const float *restrict a, const float *restrict bt, int64_t C, int64_t b,
                                         int64_t tc, int root, float *restrict acc) {
#if defined(__AVX__) && defined(__FMA__)
    if (tc == 64)
        lowmem_io_tile64(a, bt, C, b, acc);
    else
#endif
        lowmem_io_tile(a, bt, C, b, tc, acc);
    if (root) {
#pragma omp simd
        for (int64_t c = 0; c < tc; c++) acc[c] = sqrtf(acc[c]);
    }
}

int lowmem_ioadam_f32(int n, const int64_t *rows, const int64_t *cols, const int64_t *slots,
                      const int64_t *slots2, float **w, float **g, float **m, float **a, float **bt, float **a2,
                      float **bt2, const float *m_decay, const float *step_size, const int *root, float decay,
                      float one_minus_beta1, float eps, int threads) {
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += rows[i] * cols[i];
#pragma omp parallel num_threads(threads)
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t begin = total * t / nt, end = total * (t + 1) / nt;
        float acc[IO_TILE], acc2[IO_TILE];
        int64_t offset = 0;
        for (int i = 0; i < n; offset += rows[i] * cols[i], i++) {
            const int64_t C = cols[i], R = rows[i], b = slots[i], b2 = slots2[i];
            if (C == 0 || R == 0) continue;
            int64_t r0 = begin > offset ? (begin - offset + C - 1) / C : 0;
            int64_t r1 = end > offset ? (end - offset + C - 1) / C : 0;
            if (r1 > R) r1 = R;
            const float md = m_decay[i], ss = step_size[i];
            const float *restrict bti = bt[i], *restrict bt2i = b2 > 0 ? bt2[i] : NULL;
            for (int64_t r = r0; r < r1; r++) {
                float *restrict wr = w[i] + r * C, *restrict mr = m[i] + r * C;
                const float *restrict gr = g[i] ? g[i] + r * C : NULL;
                const float *restrict ar = a[i] + r * b;
                const float *restrict a2r = b2 > 0 ? a2[i] + r * b2 : NULL;
                for (int64_t c0 = 0; c0 < C; c0 += LOWMEM_IO_STEP) {
                    const int64_t tc = C - c0 < LOWMEM_IO_STEP ? C - c0 : LOWMEM_IO_STEP;
                    lowmem_io_denominator(ar, bti + c0, C, b, tc, root[i], acc);
                    if (a2r) {
                        lowmem_io_denominator(a2r, bt2i + c0, C, b2, tc, root[i], acc2);
#pragma omp simd
                        for (int64_t c = 0; c < tc; c++) acc[c] += acc2[c];
                    }
                    float *restrict wc = wr + c0, *restrict mc = mr + c0;
                    if (gr) {
                        const float *restrict gc = gr + c0;
#pragma omp simd
                        for (int64_t c = 0; c < tc; c++) {
                            const float mk = md * mc[c] + one_minus_beta1 * gc[c];
                            mc[c] = mk;
                            wc[c] = wc[c] * decay - ss * (mk / (acc[c] + eps));
                        }
                    } else {
#pragma omp simd
                        for (int64_t c = 0; c < tc; c++) {
                            const float mk = md * mc[c];
                            mc[c] = mk;
                            wc[c] = wc[c] * decay - ss * (mk / (acc[c] + eps));
                        }
                    }
                }
            }
        }
    }
    return 0;
}

/* ---- IO-Adam's statistics (lowmem.optim._io_stats.power_sum) -------------------------------------
 * out[j] = sum_t |x[t, j]|^p over the T rows of a row-major (T x F) matrix (the tokens of a layer
 * input or output gradient), per thread over its share of the rows, then added: one read of x, no
 * x-sized temporary (p = 2: x*x; else powf). Returns 1 if the per-thread sums cannot be allocated. */
int lowmem_power_sum_f32(int64_t T, int64_t F, const float *restrict x, float p, float *restrict out, int threads) {
    /* Below 2^20 elements one thread: the pass takes < 1 ms on one core, and a parallel region
     * waits at its end for every thread: on the shared 2-core machine this was measured on, any
     * 2-thread region cost ~5-10 ms whenever another process held a core (1 thread: 0.07-0.3 ms
     * for a layer input of 2048 tokens x 128-512 features). */
    if (T * F < (1 << 20)) threads = 1;
    double *sums = calloc((size_t)threads * (size_t)F, sizeof(double));
    float *block_sums = malloc((size_t)threads * (size_t)F * sizeof(float));
    if (sums == NULL || block_sums == NULL) {
        free(sums);
        free(block_sums);
        return 1;
    }
    const int square = p == 2.0f;
#pragma omp parallel num_threads(threads)
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t lo = T * t / nt, hi = T * (t + 1) / nt;
        double *acc = sums + (size_t)t * (size_t)F;
        float *blk = block_sums + (size_t)t * (size_t)F;
        /* float sums over blocks of COLS_BLOCK rows, each block's added in double (as the SlimAdamW
         * cols kernel): float-speed SIMD, the rounding of a COLS_BLOCK-term float sum */
        for (int64_t r0 = lo; r0 < hi; r0 += COLS_BLOCK) {
            const int64_t r1 = r0 + COLS_BLOCK < hi ? r0 + COLS_BLOCK : hi;
#pragma omp simd
            for (int64_t j = 0; j < F; j++) blk[j] = 0.0f;
            for (int64_t r = r0; r < r1; r++) {
                const float *xr = x + r * F;
                if (square) {
#pragma omp simd
                    for (int64_t j = 0; j < F; j++) blk[j] += xr[j] * xr[j];
                } else {
                    for (int64_t j = 0; j < F; j++) blk[j] += powf(fabsf(xr[j]), p);
                }
            }
#pragma omp simd
            for (int64_t j = 0; j < F; j++) acc[j] += (double)blk[j];
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t j = 0; j < F; j++) {
            double sum = 0.0;
            for (int64_t k = 0; k < nt; k++) sum += sums[(size_t)k * (size_t)F + j];
            out[j] = (float)sum;
        }
    }
    free(sums);
    free(block_sums);
    return 0;
}
