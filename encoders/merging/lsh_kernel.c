/* Fused CPU kernel of the hashed partner search (method=lsh), one pass per (image, table).
 *
 * It computes what the tensor version in lsh.py computes, without its ~60 separate tensor
 * operations: per image and table, the 16-bit sort keys of the eligible A and B tokens
 * (code << pos_bits | quantised ordering position), a stable radix sort of each set, and for each
 * chunk of sorted A tokens a window of sorted B tokens centred (lower bound) on the chunk's middle
 * key, scoring only same-code pairs: the window's rows are transposed once (16 x 16 register
 * blocks with AVX-512) and eight A rows at a time score 16 candidates per vector multiply-add. Each
 * (image, table) pair yields every A token's best partner in that table (ties: the first window
 * position, as torch.max), then the best table is kept (ties: the first). Pairs are split over
 * OpenMP threads when built with -fopenmp.
 *
 * The metric comes in as it is (not normalised) and so do its projections: the kernel computes
 * each token's inverse norm and applies it to the ordering position and to the scores, which are
 * cosines (dot * inv_a * inv_b), so no normalised copy of the metric is ever written.
 *
 * Built on first use by encoders/merging/lsh_native.py with the system C compiler; no Python or
 * torch headers are needed. Inputs are C-contiguous float32 arrays.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v16f __attribute__((vector_size(64))); /* 16 lanes: one AVX-512 register, or 2-4 narrower ones */

typedef struct {
    const float *metric;    /* [B, N, C] rows of any norm */
    const float *proj;      /* [B, N, T * (bits + 1)] metric @ planes: per table, bits code planes + the ordering one */
    const uint8_t *elig;    /* [B, N] 1 = may merge */
    int B, N, C, T, bits, window, chunk;
    float *best;            /* [B * T, NA] per-table best score */
    int64_t *part;          /* [B * T, NA] per-table partner (index into B) */
    int first, last;        /* (image, table) pairs [first, last) of this worker */
} job_t;

static void radix_sort16(const uint16_t *key, int32_t *idx, int32_t *tmp, int n) {
    /* Stable LSD radix sort of idx[0..n) by key[idx[i]]: two passes of 8 bits, result in idx. */
    int32_t count[257];
    int32_t *src = idx, *dst = tmp;
    for (int shift = 0; shift < 16; shift += 8) {
        memset(count, 0, sizeof(count));
        for (int i = 0; i < n; i++) count[((key[src[i]] >> shift) & 255) + 1]++;
        for (int k = 0; k < 256; k++) count[k + 1] += count[k];
        for (int i = 0; i < n; i++) dst[count[(key[src[i]] >> shift) & 255]++] = src[i];
        int32_t *t = src;
        src = dst;
        dst = t;
    }
}

static uint16_t token_key(const float *p, float inv_norm, int bits, int pos_bits, float scale) {
    /* As lsh.py: code from the signs, position (of the unit row) clamped to [-4, 4], shifted,
     * scaled, rounded half to even. */
    int code = 0;
    for (int i = 0; i < bits; i++) code |= (p[i] > 0.0f) << i;
    float u = p[bits] * inv_norm;
    u = u < -4.0f ? -4.0f : (u > 4.0f ? 4.0f : u);
    float pos = nearbyintf((u + 4.0f) * scale);
    return (uint16_t)((int)pos + (code << pos_bits));
}

#if defined(__AVX512F__)
static inline void transpose16(__m512 r[16]) {
    /* In place: r[i] lane k becomes r[k] lane i. Stage 1 interleaves pairs of rows, stage 2 pairs
     * of pairs, so that r[4g + c] holds in its 128-bit lane j the rows 4g..4g+3 of column 4j + c;
     * stages 3-4 then transpose the 128-bit lanes of r[c], r[4 + c], r[8 + c], r[12 + c]. */
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 4; g++) {
        const __m512d lo0 = _mm512_castps_pd(t[4 * g]), lo1 = _mm512_castps_pd(t[4 * g + 2]);
        const __m512d hi0 = _mm512_castps_pd(t[4 * g + 1]), hi1 = _mm512_castps_pd(t[4 * g + 3]);
        r[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo0, lo1));
        r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo0, lo1));
        r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi0, hi1));
        r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi0, hi1));
    }
    for (int c = 0; c < 4; c++) {
        const __m512 u0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44), u1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
        const __m512 u2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
        const __m512 u3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
        t[c] = _mm512_shuffle_f32x4(u0, u2, 0x88);
        t[4 + c] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
        t[8 + c] = _mm512_shuffle_f32x4(u1, u3, 0x88);
        t[12 + c] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}
#endif

static void inverse_norms(const float *m, int N, int C, float *inv) {
    /* 1 / |row| of every row (inf for a zero row, whose cosines come out NaN as in the tensor code). */
    for (int p = 0; p < N; p++) {
        const float *x = m + (size_t)p * C;
        float s = 0.0f;
        for (int k = 0; k < C; k++) s += x[k] * x[k];
        inv[p] = 1.0f / sqrtf(s);
    }
}

static void *work(void *arg) {
    job_t *j = (job_t *)arg;
    const int N = j->N, C = j->C, T = j->T, bits = j->bits, window = j->window, chunk = j->chunk;
    const int NA = (N + 1) / 2, NB = N / 2, P = bits + 1, pos_bits = 13 - bits;
    const float scale = (float)(((1 << pos_bits) - 1) / 8.0);
    uint16_t *key_a = malloc(sizeof(uint16_t) * (NA + 1)), *key_b = malloc(sizeof(uint16_t) * (NB + 1));
    uint16_t *sorted_b = malloc(sizeof(uint16_t) * (NB + 1));
    int32_t *list_a = malloc(sizeof(int32_t) * (NA + 1)), *list_b = malloc(sizeof(int32_t) * (NB + 1));
    int32_t *tmp = malloc(sizeof(int32_t) * (NA + 1));
    float *inv = malloc(sizeof(float) * (N + 1));
    /* 64-byte aligned, rows of 16-float multiples: whole-vector loads and stores (aligned_alloc
     * wants a size that is a multiple of the alignment). */
    const size_t win_bytes = (sizeof(float) * (size_t)C * (window + 16) + 63) & ~(size_t)63;
    const size_t lane_bytes = (sizeof(int32_t) * (size_t)(window + 16) + 63) & ~(size_t)63;
    float *win = aligned_alloc(64, win_bytes);
    float *win_inv = aligned_alloc(64, lane_bytes); /* inverse norm of each window row (0: past the end) */
    int32_t *win_code = aligned_alloc(64, lane_bytes); /* code of each window row (-1: past the end) */
    const float **rows_b = malloc(sizeof(float *) * (window + 1));
    if (!key_a || !key_b || !sorted_b || !list_a || !list_b || !tmp || !inv || !win || !win_inv || !win_code ||
        !rows_b) {
        free(key_a); free(key_b); free(sorted_b); free(list_a); free(list_b); free(tmp); free(inv); free(win);
        free(win_inv); free(win_code); free(rows_b);
        return (void *)1;
    }
    int norms_of = -1; /* image whose inverse norms `inv` holds */
    for (int bt = j->first; bt < j->last; bt++) {
        const int b = bt / T, t = bt % T;
        const float *m = j->metric + (size_t)b * N * C;
        const float *pr = j->proj + (size_t)b * N * T * P + (size_t)t * P;
        const uint8_t *el = j->elig + (size_t)b * N;
        float *best = j->best + (size_t)bt * NA;
        int64_t *part = j->part + (size_t)bt * NA;
        if (norms_of != b) {
            inverse_norms(m, N, C, inv);
            norms_of = b;
        }
        int na = 0, nb = 0;
        for (int a = 0; a < NA; a++) {
            best[a] = -INFINITY;
            part[a] = 0;
            if (el[2 * a]) {
                key_a[a] = token_key(pr + (size_t)(2 * a) * T * P, inv[2 * a], bits, pos_bits, scale);
                list_a[na++] = a;
            }
        }
        for (int q = 0; q < NB; q++) {
            if (el[2 * q + 1]) {
                key_b[q] = token_key(pr + (size_t)(2 * q + 1) * T * P, inv[2 * q + 1], bits, pos_bits, scale);
                list_b[nb++] = q;
            }
        }
        radix_sort16(key_a, list_a, tmp, na);
        radix_sort16(key_b, list_b, tmp, nb);
        for (int k = 0; k < nb; k++) sorted_b[k] = key_b[list_b[k]];
        const int upper = nb - window > 0 ? nb - window : 0;
        for (int c0 = 0; c0 < na; c0 += chunk) {
            int start = nb;
            const int mid = c0 + chunk / 2;
            if (mid < na) { /* lower bound of the middle key among the sorted B keys */
                const uint16_t mk = key_a[list_a[mid]];
                int lo = 0, hi = nb;
                while (lo < hi) {
                    int h = (lo + hi) / 2;
                    if (sorted_b[h] < mk) lo = h + 1; else hi = h;
                }
                start = lo - window / 2;
            }
            start = start < 0 ? 0 : (start > upper ? upper : start);
            const int end = start + window < nb ? start + window : nb;
            const int width = end - start;
            const int c1 = c0 + chunk < na ? c0 + chunk : na;
            /* The window's rows, transposed to [C][stride] (stride: width rounded up to 16, zero
             * filled): each A row then scores 16 candidates with C vector multiply-adds and no
             * horizontal sums. Per lane: the row's code and inverse norm. */
            const int stride = (width + 15) & ~15;
            for (int w = 0; w < stride; w++) {
                const int in = w < width;
                const int q = in ? list_b[start + w] : 0;
                win_code[w] = in ? sorted_b[start + w] >> pos_bits : -1;
                win_inv[w] = in ? inv[2 * q + 1] : 0.0f;
            }
#if defined(__AVX512F__)
            for (int w0 = 0; w0 < stride; w0 += 16) { /* 16 rows at a time, 16 x 16 blocks in registers */
                const float *row[16];
                for (int w = 0; w < 16; w++)
                    row[w] = w0 + w < width ? m + (size_t)(2 * list_b[start + w0 + w] + 1) * C : NULL;
                int k0 = 0;
                for (; k0 + 16 <= C; k0 += 16) {
                    __m512 r[16];
                    for (int w = 0; w < 16; w++) r[w] = row[w] ? _mm512_loadu_ps(row[w] + k0) : _mm512_setzero_ps();
                    transpose16(r);
                    for (int k = 0; k < 16; k++) _mm512_store_ps(win + (size_t)(k0 + k) * stride + w0, r[k]);
                }
                for (int k = k0; k < C; k++) /* the last C % 16 columns */
                    for (int w = 0; w < 16; w++) win[(size_t)k * stride + w0 + w] = row[w] ? row[w][k] : 0.0f;
            }
#else
            for (int w = 0; w < width; w++) rows_b[w] = m + (size_t)(2 * list_b[start + w] + 1) * C;
            for (int k = 0; k < C; k++) { /* contiguous stores, 16 reads of rows in cache */
                float *dst = win + (size_t)k * stride;
                for (int w = 0; w < width; w++) dst[w] = rows_b[w][k];
                for (int w = width; w < stride; w++) dst[w] = 0.0f;
            }
#endif
            /* Eight A rows at a time: eight independent multiply-add chains share each load. */
            for (int i0 = c0; i0 < c1; i0 += 8) {
                const int rows = c1 - i0 < 8 ? c1 - i0 : 8;
                const float *x[8];
                float s_best[8];
                int64_t p_best[8];
                int code[8];
                for (int r = 0; r < 8; r++) {
                    const int a = list_a[i0 + (r < rows ? r : 0)];
                    x[r] = m + (size_t)(2 * a) * C;
                    code[r] = key_a[a] >> pos_bits;
                    s_best[r] = -INFINITY;
                    p_best[r] = 0;
                }
                for (int w0 = 0; w0 < stride; w0 += 16) {
                    v16f s[8] = {{0}};
                    for (int k = 0; k < C; k++) {
                        const v16f v = *(const v16f *)(win + (size_t)k * stride + w0);
                        s[0] += x[0][k] * v; s[1] += x[1][k] * v; s[2] += x[2][k] * v; s[3] += x[3][k] * v;
                        s[4] += x[4][k] * v; s[5] += x[5][k] * v; s[6] += x[6][k] * v; s[7] += x[7][k] * v;
                    }
                    const v16f vinv = *(const v16f *)(win_inv + w0);
#if defined(__AVX512F__)
                    /* Best same-code lane of each row, in registers: mask, reduce, first equal lane. */
                    const __m512i vcode = _mm512_load_si512(win_code + w0);
                    for (int r = 0; r < rows; r++) {
                        const __m512 sc = (__m512)(s[r] * vinv);
                        __mmask16 ok = _mm512_cmpeq_epi32_mask(vcode, _mm512_set1_epi32(code[r]));
                        ok = _mm512_mask_cmp_ps_mask(ok, sc, sc, _CMP_ORD_Q); /* NaN never wins */
                        if (!ok) continue;
                        const float top = _mm512_mask_reduce_max_ps(ok, sc);
                        if (top > s_best[r]) {
                            const __mmask16 at = _mm512_mask_cmp_ps_mask(ok, sc, _mm512_set1_ps(top), _CMP_EQ_OQ);
                            s_best[r] = top;
                            p_best[r] = list_b[start + w0 + __builtin_ctz((unsigned)at)];
                        }
                    }
#else
                    for (int r = 0; r < rows; r++) {
                        const v16f sc = s[r] * vinv;
                        for (int w = 0; w < 16 && w0 + w < width; w++) {
                            if (win_code[w0 + w] != code[r]) continue;
                            if (sc[w] > s_best[r]) { s_best[r] = sc[w]; p_best[r] = list_b[start + w0 + w]; }
                        }
                    }
#endif
                }
                for (int r = 0; r < rows; r++) {
                    const int a = list_a[i0 + r];
                    best[a] = s_best[r] * inv[2 * a];
                    part[a] = p_best[r];
                }
            }
        }
    }
    free(key_a); free(key_b); free(sorted_b); free(list_a); free(list_b); free(tmp); free(inv); free(win);
    free(win_inv); free(win_code); free(rows_b);
    return NULL;
}

/* Which scoring path was compiled: 512 with AVX-512 (register transposes and selection), 0 for
 * the portable one. */
int mergeseek_lsh_simd_bits(void) {
#if defined(__AVX512F__)
    return 512;
#else
    return 0;
#endif
}

/* Returns 0 on success. best/part: [B, NA], each A token's best score and partner (index into B)
 * over all tables; -inf where no table found a same-code candidate. */
int mergeseek_lsh_search(const float *metric, const float *proj, const uint8_t *elig, int B, int N, int C,
                         int T, int bits, int window, int chunk, float *best, int64_t *part, int threads) {
    if (bits < 1 || bits > 11 || window < 1 || chunk < 1) return 2;
    const int pairs = B * T, NA = (N + 1) / 2;
    if (threads > pairs) threads = pairs;
    if (threads < 1) threads = 1;
    float *t_best = malloc(sizeof(float) * (size_t)pairs * NA);
    int64_t *t_part = malloc(sizeof(int64_t) * (size_t)pairs * NA);
    if (!t_best || !t_part) {
        free(t_best); free(t_part);
        return 1;
    }
    int failed = 0;
    /* (image, table) pairs split evenly over the workers. Built with -fopenmp, the library binds
     * to the libgomp already loaded by torch, so these are torch's warm intra-op threads. */
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(| : failed)
#endif
    {
        int w = 0, nw = 1;
#ifdef _OPENMP
        w = omp_get_thread_num();
        nw = omp_get_num_threads();
#endif
        job_t job = {metric, proj, elig, B, N, C, T, bits, window, chunk, t_best, t_part,
                     (int)((long)pairs * w / nw), (int)((long)pairs * (w + 1) / nw)};
        failed |= work(&job) != NULL;
    }
    /* Best table per A token; ties keep the first table, as torch.max does. */
    for (int b = 0; b < B; b++) {
        for (int a = 0; a < NA; a++) {
            float s = t_best[(size_t)b * T * NA + a];
            int64_t q = t_part[(size_t)b * T * NA + a];
            for (int t = 1; t < T; t++) {
                const size_t i = ((size_t)b * T + t) * NA + a;
                if (t_best[i] > s) { s = t_best[i]; q = t_part[i]; }
            }
            best[(size_t)b * NA + a] = s;
            part[(size_t)b * NA + a] = q;
        }
    }
    free(t_best);
    free(t_part);
    return failed;
}

/* The fallback edges of lsh.lsh_soft_matching, in place: every eligible A token that found no
 * same-code candidate (best = -inf) takes its most similar B token among the `count` B tokens
 * `cols` (indices into B; ties: the first, as torch.max), scored as cosine - offset, below every
 * bucket edge. missing[b]: how many eligible A tokens of image b had no bucket-mate. */
int mergeseek_lsh_fallback(const float *metric, const uint8_t *elig, int B, int N, int C, const int64_t *cols,
                           int count, float offset, float *best, int64_t *part, int64_t *missing) {
    const int NA = (N + 1) / 2;
    if (count < 1) return 2;
    float *inv = malloc(sizeof(float) * (size_t)N);
    if (!inv) return 1;
    for (int b = 0; b < B; b++) {
        const float *m = metric + (size_t)b * N * C;
        int64_t miss = 0;
        int norms = 0;
        for (int a = 0; a < NA; a++) {
            const size_t i = (size_t)b * NA + a;
            if (!elig[(size_t)b * N + 2 * a] || best[i] != -INFINITY) continue;
            if (!norms) { inverse_norms(m, N, C, inv); norms = 1; }
            miss++;
            const float *x = m + (size_t)(2 * a) * C;
            float s_best = -INFINITY;
            int64_t p_best = cols[0];
            for (int c = 0; c < count; c++) {
                const int row = 2 * (int)cols[c] + 1;
                const float *y = m + (size_t)row * C;
                float dot = 0.0f;
                for (int k = 0; k < C; k++) dot += x[k] * y[k];
                const float s = (dot * inv[2 * a]) * inv[row];
                if (s > s_best) { s_best = s; p_best = cols[c]; }
            }
            best[i] = s_best - offset;
            part[i] = p_best;
        }
        missing[b] = miss;
    }
    free(inv);
    return 0;
}
