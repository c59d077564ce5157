/* Fused CPU kernel of the hashed partner search (method=lsh), one pass per (image, table).
 *
 * It computes exactly what the tensor version in lsh.py computes, without its ~60 separate tensor
 * operations: per image and table, the 16-bit sort keys of the eligible A and B tokens
 * (code << pos_bits | quantised ordering position), a stable radix sort of each set, and for each
 * chunk of sorted A tokens a window of sorted B tokens centred (lower bound) on the chunk's middle
 * key, scoring only same-code pairs: the window's rows are transposed once and eight A rows at a
 * time score 16 candidates per vector multiply-add. Each (image, table) pair yields every A
 * token's best partner in that table (ties: the first window position, as torch.max), then the
 * best table is kept (ties: the first). Pairs are split over OpenMP threads when built with
 * -fopenmp.
 *
 * Built on first use by encoders/merging/lsh_native.py with the system C compiler; no Python or
 * torch headers are needed. Inputs are C-contiguous float32 arrays.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v16f __attribute__((vector_size(64))); /* 16 lanes: one AVX-512 register, or 2-4 narrower ones */

typedef struct {
    const float *metric;    /* [B, N, C] unit rows */
    const float *proj;      /* [B, N, T * (bits + 1)]: per table, bits code planes then the ordering one */
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

static uint16_t token_key(const float *p, int bits, int pos_bits, float scale) {
    /* Same float32 arithmetic as lsh.py: code from the signs, position clamped to [-4, 4],
     * shifted, scaled, rounded half to even. */
    int code = 0;
    for (int i = 0; i < bits; i++) code |= (p[i] > 0.0f) << i;
    float u = p[bits];
    u = u < -4.0f ? -4.0f : (u > 4.0f ? 4.0f : u);
    float pos = nearbyintf((u + 4.0f) * scale);
    return (uint16_t)((int)pos + (code << pos_bits));
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
    /* 64-byte aligned, rows of 16-float multiples: whole-vector loads and stores (aligned_alloc
     * wants a size that is a multiple of the alignment). */
    const size_t win_bytes = (sizeof(float) * (size_t)C * (window + 16) + 63) & ~(size_t)63;
    const size_t acc_bytes = (sizeof(float) * 8 * (size_t)(window + 16) + 63) & ~(size_t)63;
    float *win = aligned_alloc(64, win_bytes);
    float *acc = aligned_alloc(64, acc_bytes);
    const float **rows_b = malloc(sizeof(float *) * (window + 1));
    if (!key_a || !key_b || !sorted_b || !list_a || !list_b || !tmp || !win || !acc || !rows_b) {
        free(key_a); free(key_b); free(sorted_b); free(list_a); free(list_b); free(tmp); free(win); free(acc);
        free(rows_b);
        return (void *)1;
    }
    for (int bt = j->first; bt < j->last; bt++) {
        const int b = bt / T, t = bt % T;
        const float *m = j->metric + (size_t)b * N * C;
        const float *pr = j->proj + (size_t)b * N * T * P + (size_t)t * P;
        const uint8_t *el = j->elig + (size_t)b * N;
        float *best = j->best + (size_t)bt * NA;
        int64_t *part = j->part + (size_t)bt * NA;
        int na = 0, nb = 0;
        for (int a = 0; a < NA; a++) {
            best[a] = -INFINITY;
            part[a] = 0;
            if (el[2 * a]) {
                key_a[a] = token_key(pr + (size_t)(2 * a) * T * P, bits, pos_bits, scale);
                list_a[na++] = a;
            }
        }
        for (int q = 0; q < NB; q++) {
            if (el[2 * q + 1]) {
                key_b[q] = token_key(pr + (size_t)(2 * q + 1) * T * P, bits, pos_bits, scale);
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
             * horizontal sums. */
            const int stride = (width + 15) & ~15;
            for (int w = 0; w < width; w++) rows_b[w] = m + (size_t)(2 * list_b[start + w] + 1) * C;
            for (int k = 0; k < C; k++) { /* contiguous stores, 16 reads of rows in cache */
                float *dst = win + (size_t)k * stride;
                for (int w = 0; w < width; w++) dst[w] = rows_b[w][k];
                for (int w = width; w < stride; w++) dst[w] = 0.0f;
            }
            /* Eight A rows at a time: eight independent multiply-add chains share each load. */
            for (int i0 = c0; i0 < c1; i0 += 8) {
                const int rows = c1 - i0 < 8 ? c1 - i0 : 8;
                const float *x[8];
                for (int r = 0; r < 8; r++) x[r] = m + (size_t)(2 * list_a[i0 + (r < rows ? r : 0)]) * C;
                for (int w0 = 0; w0 < stride; w0 += 16) {
                    v16f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, s4 = {0}, s5 = {0}, s6 = {0}, s7 = {0};
                    for (int k = 0; k < C; k++) {
                        const v16f v = *(const v16f *)(win + (size_t)k * stride + w0);
                        s0 += x[0][k] * v; s1 += x[1][k] * v; s2 += x[2][k] * v; s3 += x[3][k] * v;
                        s4 += x[4][k] * v; s5 += x[5][k] * v; s6 += x[6][k] * v; s7 += x[7][k] * v;
                    }
                    float *o = acc + w0;
                    *(v16f *)o = s0; *(v16f *)(o + stride) = s1; *(v16f *)(o + 2 * stride) = s2;
                    *(v16f *)(o + 3 * stride) = s3; *(v16f *)(o + 4 * stride) = s4; *(v16f *)(o + 5 * stride) = s5;
                    *(v16f *)(o + 6 * stride) = s6; *(v16f *)(o + 7 * stride) = s7;
                }
                for (int r = 0; r < rows; r++) {
                    const int a = list_a[i0 + r];
                    const int code = key_a[a] >> pos_bits;
                    const float *sc = acc + (size_t)r * stride;
                    float s_best = -INFINITY;
                    int64_t p_best = 0;
                    for (int w = 0; w < width; w++) {
                        if ((sorted_b[start + w] >> pos_bits) != code) continue;
                        if (sc[w] > s_best) { s_best = sc[w]; p_best = list_b[start + w]; }
                    }
                    best[a] = s_best;
                    part[a] = p_best;
                }
            }
        }
    }
    free(key_a); free(key_b); free(sorted_b); free(list_a); free(list_b); free(tmp); free(win); free(acc);
    free(rows_b);
    return NULL;
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
