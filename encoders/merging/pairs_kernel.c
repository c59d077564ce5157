/* Fused CPU kernel of the greedy one-to-one matching of method=pairs and method=ward.
 *
 * It gives what pairs.greedy_pairs(*pairs.matrix_edges(score, keep_first, k), r, ...) gives, with
 * neither the top-k (torch's CPU topk over 145 x 145 per image costs as much as ~8 passes over
 * the matrix, whatever k is) nor r rounds of tensor operations over every candidate edge:
 *
 *   1. every unprotected token lists its k best-scoring unprotected partners (one pass over its
 *      row; an insertion into a sorted list of k; ties: the lower column first);
 *   2. r times, the best candidate edge whose two tokens are both unused is taken: each unused
 *      row keeps a pointer to its first candidate with an unused partner (the row's best live
 *      edge, since the list is sorted), the best row wins (ties: the lower row, as torch.argmax
 *      over the row-major edge list), and after a step only pointers that meet a used partner
 *      move on;
 *   3. a step that finds no edge (every live candidate -inf, or none left) fails; failed steps are
 *      the last ones (edges only die) and take the unused unprotected tokens in position order,
 *      two by two, as pairs.close_pairs does.
 *
 * The score matrix comes in raw: its diagonal and the protected rows and columns are never read.
 * NaN ranks above every number, as in torch's topk and argmax. Per image O(N^2 + r N) work; images
 * are split over OpenMP threads when built with -fopenmp.
 *
 * Built on first use by encoders/merging/lsh_native.py (load_pairs) with the system C compiler;
 * no Python or torch headers are needed. Inputs are C-contiguous float32 arrays.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* x ranks strictly above y: larger, or NaN over a number (torch's order for topk and argmax). */
static inline int above(float x, float y) {
    return x > y || (isnan(x) && !isnan(y));
}

/* This worker's images [first, last) of B, split evenly over the OpenMP team (all of them serially). */
static void my_images(int B, int *first, int *last) {
    int t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    *first = (int)((long)B * t / nt);
    *last = (int)((long)B * (t + 1) / nt);
}

typedef struct {
    float *val;     /* [N * k] each row's candidates' scores, best first */
    int32_t *col;   /* [N * k] their partners */
    int32_t *cnt;   /* [N] candidates listed per row */
    int32_t *ptr;   /* [N] first candidate with an unused partner */
    uint8_t *used;  /* [N] */
} work_t;

static void one_image(const float *s, int N, int keep_first, int k, int r, work_t *w, int64_t *src, int64_t *dst,
                      int64_t *fallback) {
    float *val = w->val;
    int32_t *col = w->col, *cnt = w->cnt, *ptr = w->ptr;
    uint8_t *used = w->used;
    memset(used, 0, (size_t)N);
    for (int a = 0; a < keep_first && a < N; a++) used[a] = 1;
    /* 1. candidate lists */
    for (int a = 0; a < N; a++) {
        cnt[a] = 0;
        ptr[a] = 0;
        if (a < keep_first) continue;
        const float *row = s + (size_t)a * N;
        float *v = val + (size_t)a * k;
        int32_t *c = col + (size_t)a * k;
        int m = 0;
        for (int b = keep_first; b < N; b++) {
            if (b == a) continue;
            const float x = row[b];
            if (m == k && !above(x, v[m - 1])) continue;  /* an equal score at a higher column ranks after */
            int i = m < k ? m++ : k - 1;                   /* drop the last when full */
            while (i > 0 && above(x, v[i - 1])) {
                v[i] = v[i - 1];
                c[i] = c[i - 1];
                i--;
            }
            v[i] = x;
            c[i] = b;
        }
        cnt[a] = m;
    }
    /* 2. greedy steps */
    int failed = 0;
    for (int step = 0; step < r; step++) {
        int best_row = -1;
        float best = 0.0f;
        for (int a = keep_first; a < N; a++) {
            if (used[a]) continue;
            int p = ptr[a];
            const int32_t *c = col + (size_t)a * k;
            while (p < cnt[a] && used[c[p]]) p++;
            ptr[a] = p;
            if (p == cnt[a]) continue;
            const float x = val[(size_t)a * k + p];
            if (best_row < 0 || above(x, best)) {
                best_row = a;
                best = x;
            }
        }
        if (best_row < 0 || best == -INFINITY) {  /* no edge left: this and every later step fail */
            failed = r - step;
            break;
        }
        const int b = col[(size_t)best_row * k + ptr[best_row]];
        used[best_row] = used[b] = 1;
        src[step] = best_row > b ? best_row : b;
        dst[step] = best_row > b ? b : best_row;
    }
    /* 3. failed steps: the unused unprotected tokens in position order, two by two */
    if (failed) {
        int step = r - failed, first = -1;
        for (int a = keep_first; a < N && step < r; a++) {
            if (used[a]) continue;
            if (first < 0) {
                first = a;
                continue;
            }
            src[step] = a;
            dst[step] = first;
            step++;
            first = -1;
        }
    }
    *fallback = failed;
}

/* Returns 0 on success, 1 when out of memory, 2 on bad sizes. score: [B, N, N]; src, dst: [B, r]
 * the later and the earlier token of each pair; fallback: [B] the failed steps. */
int mergeseek_pairs_greedy(const float *score, int B, int N, int keep_first, int k, int r, int64_t *src,
                           int64_t *dst, int64_t *fallback, int threads) {
    if (B < 0 || N < 2 || k < 1 || r < 0 || keep_first < 0 || 2 * r > N - keep_first) return 2;
    if (k > N - 1) k = N - 1;
    if (threads > B) threads = B;
    if (threads < 1) threads = 1;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(| : failed)
#endif
    {
        int first, last;
        my_images(B, &first, &last);
        work_t w;
        w.val = malloc(sizeof(float) * (size_t)N * k);
        w.col = malloc(sizeof(int32_t) * (size_t)N * k);
        w.cnt = malloc(sizeof(int32_t) * (size_t)N);
        w.ptr = malloc(sizeof(int32_t) * (size_t)N);
        w.used = malloc((size_t)N);
        if (!w.val || !w.col || !w.cnt || !w.ptr || !w.used) {
            failed = 1;
        } else {
            for (int b = first; b < last; b++)
                one_image(score + (size_t)b * N * N, N, keep_first, k, r, &w, src + (size_t)b * r, dst + (size_t)b * r,
                          fallback + b);
        }
        free(w.val);
        free(w.col);
        free(w.cnt);
        free(w.ptr);
        free(w.used);
    }
    return failed;
}

/* ---- The same greedy over an explicit edge list (pairs_lsh, ward_lsh: SimHash windows) ----
 *
 * pairs.greedy_pairs' rule: r times, the best edge whose two ends are both unused (ties: the
 * earlier edge), -inf edges are no edges. Per image the edges go into a binary heap ordered by
 * (score, then the earlier edge; NaN above every number) and are popped until r have two unused
 * ends: an edge found dead stays dead (tokens are only ever used up), so the first live edge popped
 * is the best live edge. O(E + (r + dead edges) log E) per image. */

/* edge i ranks before edge j */
static inline int edge_before(const float *s, int32_t i, int32_t j) {
    const float x = s[i], y = s[j];
    if (above(x, y)) return 1;
    if (above(y, x)) return 0;
    return i < j;
}

static void sift_down(const float *s, int32_t *heap, int m, int at) {
    for (;;) {
        int best = at, l = 2 * at + 1, r = l + 1;
        if (l < m && edge_before(s, heap[l], heap[best])) best = l;
        if (r < m && edge_before(s, heap[r], heap[best])) best = r;
        if (best == at) return;
        const int32_t t = heap[at];
        heap[at] = heap[best];
        heap[best] = t;
        at = best;
    }
}

static void edges_one_image(const float *s, const int64_t *fst, const int64_t *snd, int E, int N, int keep_first, int r,
                            int32_t *heap, uint8_t *used, int64_t *src, int64_t *dst, int64_t *fallback) {
    memset(used, 0, (size_t)N);
    for (int a = 0; a < keep_first && a < N; a++) used[a] = 1;
    int m = 0;
    for (int i = 0; i < E; i++)
        if (s[i] != -INFINITY) heap[m++] = i;
    for (int at = m / 2 - 1; at >= 0; at--) sift_down(s, heap, m, at);
    int step = 0;
    while (step < r && m > 0) {
        const int32_t e = heap[0];
        heap[0] = heap[--m];
        sift_down(s, heap, m, 0);
        const int64_t a = fst[e], b = snd[e];
        if (a < 0 || b < 0 || a >= N || b >= N || a == b || used[a] || used[b]) continue;
        used[a] = used[b] = 1;
        src[step] = a > b ? a : b;
        dst[step] = a > b ? b : a;
        step++;
    }
    const int failed = r - step;
    for (int a = keep_first, first = -1; a < N && step < r; a++) {
        if (used[a]) continue;
        if (first < 0) {
            first = a;
            continue;
        }
        src[step] = a;
        dst[step] = first;
        step++;
        first = -1;
    }
    *fallback = failed;
}

/* Returns 0 on success, 1 when out of memory, 2 on bad sizes. score, first, second: [B, E]; src,
 * dst: [B, r] the later and the earlier token of each pair; fallback: [B] the failed steps. */
int mergeseek_pairs_edges(const float *score, const int64_t *first, const int64_t *second, int B, int E, int N,
                          int keep_first, int r, int64_t *src, int64_t *dst, int64_t *fallback, int threads) {
    if (B < 0 || E < 0 || N < 1 || r < 0 || keep_first < 0 || 2 * r > N - keep_first) return 2;
    if (threads > B) threads = B;
    if (threads < 1) threads = 1;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(| : failed)
#endif
    {
        int lo, hi;
        my_images(B, &lo, &hi);
        int32_t *heap = malloc(sizeof(int32_t) * (size_t)(E > 0 ? E : 1));
        uint8_t *used = malloc((size_t)N);
        if (!heap || !used) {
            failed = 1;
        } else {
            for (int b = lo; b < hi; b++)
                edges_one_image(score + (size_t)b * E, first + (size_t)b * E, second + (size_t)b * E, E, N, keep_first,
                                r, heap, used, src + (size_t)b * r, dst + (size_t)b * r, fallback + b);
        }
        free(heap);
        free(used);
    }
    return failed;
}
