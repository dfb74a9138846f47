/* cag's CPU loops, compiled with -march=native by cag.cpu_kernels, for AVX-512 or for AVX2 with
 * FMA; without either the library reports itself unavailable and cag uses torch's operations.
 *
 * The loops are written once over `vf`, sixteen float32 lanes: one __m512 on AVX-512, two __m256
 * on AVX2. Every sum keeps the same lanes and the same order on both; only how many rows and
 * columns a loop keeps in registers differs (AVX2 has half the register file), which changes no
 * element's order.
 *
 * cag_attend: attention over a shared prefix and each row's own suffix, float32, head dim a
 * multiple of 16, last dimensions contiguous: scores dot(q, k), one softmax over the prefix's and
 * the suffix's, then the values summed in order, prefix first.
 * cag_rms_norm: out = w * (x * (1 / sqrt(mean(x^2) + eps))) over each row's last dimension, as
 * Llama's RMSNorm computes it.
 * cag_rotary: Llama's rotary embedding, x * cos + rotate_half(x) * sin, rounded as torch rounds
 * it (compiled with -ffp-contract=off, so no product and sum are fused), then times a scale.
 * Linear layers over ggml Q4_1 or Q8_0 blocks:
 *   q4_1_linear, q8_0_linear: out[m, j] = dot(x[m, :], weight row j), each weight computed
 *   from its block exactly as de-quantizing the block once gives it
 *
 * Every output element is summed in one order that depends on neither the number of
 * rows nor the number of threads.
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#if defined(__AVX512F__)
#define CAG_SIMD 1
typedef __m512 vf;
typedef __mmask16 vmask;
static inline vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf vf_set1(float a) { return _mm512_set1_ps(a); }
static inline vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void vf_store(float *p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vf_fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vf_fnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
static inline vf vf_round(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vf_scale_by_pow2(vf a, vf n) { return _mm512_scalef_ps(a, n); }
static inline float vf_sum(vf a) { return _mm512_reduce_add_ps(a); }
static inline float vf_top(vf a) { return _mm512_reduce_max_ps(a); }
static inline vmask vf_first(int count) { return count >= 16 ? (vmask)0xffff : (vmask)((1u << count) - 1); }
static inline vf vf_load_first(vmask m, const float *p, float fill) { return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), m, p); }
static inline void vf_store_first(vmask m, float *p, vf a) { _mm512_mask_storeu_ps(p, m, a); }
static inline vf vf_keep_first(vmask m, vf a) { return _mm512_maskz_mov_ps(m, a); }
static inline vf vf_held(vf a) { __asm__("" : "+v"(a)); return a; }
#elif defined(__AVX2__) && defined(__FMA__)
#define CAG_SIMD 1
typedef struct { __m256 lo, hi; } vf;
typedef struct { __m256i lo, hi; } vmask;
#define VF_MAP(expr_lo, expr_hi) ((vf){expr_lo, expr_hi})
static inline vf vf_zero(void) { return VF_MAP(_mm256_setzero_ps(), _mm256_setzero_ps()); }
static inline vf vf_set1(float a) { __m256 v = _mm256_set1_ps(a); return VF_MAP(v, v); }
static inline vf vf_load(const float *p) { return VF_MAP(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)); }
static inline void vf_store(float *p, vf a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
static inline vf vf_add(vf a, vf b) { return VF_MAP(_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)); }
static inline vf vf_sub(vf a, vf b) { return VF_MAP(_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)); }
static inline vf vf_mul(vf a, vf b) { return VF_MAP(_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)); }
static inline vf vf_max(vf a, vf b) { return VF_MAP(_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)); }
static inline vf vf_fmadd(vf a, vf b, vf c) { return VF_MAP(_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)); }
static inline vf vf_fnmadd(vf a, vf b, vf c) { return VF_MAP(_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)); }
static inline vf vf_round(vf a) {
    const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    return VF_MAP(_mm256_round_ps(a.lo, mode), _mm256_round_ps(a.hi, mode));
}
/* a * 2^n for whole n in [-150, 0] and a in [0.5, 2), rounded once as AVX-512's scalef rounds it: the
 * first factor 2^(n - n/2) keeps a normal, so only the second product rounds. */
static inline __m256 scale_by_pow2_half(__m256 a, __m256 n) {
    __m256i whole = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(whole, 1), rest = _mm256_sub_epi32(whole, half);
    __m256 first = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, _mm256_set1_epi32(127)), 23));
    __m256 second = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(a, first), second);
}
static inline vf vf_scale_by_pow2(vf a, vf n) { return VF_MAP(scale_by_pow2_half(a.lo, n.lo), scale_by_pow2_half(a.hi, n.hi)); }
/* The lanes added in the tree _mm512_reduce_add_ps adds them in. */
static inline float vf_sum(vf a) {
    __m256 eight = _mm256_add_ps(a.hi, a.lo);
    __m128 four = _mm_add_ps(_mm256_extractf128_ps(eight, 1), _mm256_castps256_ps128(eight));
    __m128 two = _mm_add_ps(four, _mm_shuffle_ps(four, four, _MM_SHUFFLE(1, 0, 3, 2)));
    return two[0] + two[1];
}
static inline float vf_top(vf a) {
    __m256 eight = _mm256_max_ps(a.hi, a.lo);
    __m128 four = _mm_max_ps(_mm256_extractf128_ps(eight, 1), _mm256_castps256_ps128(eight));
    __m128 two = _mm_max_ps(four, _mm_shuffle_ps(four, four, _MM_SHUFFLE(1, 0, 3, 2)));
    return two[0] > two[1] ? two[0] : two[1];
}
static inline vmask vf_first(int count) {
    __m256i n = _mm256_set1_epi32(count);
    return (vmask){_mm256_cmpgt_epi32(n, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                   _mm256_cmpgt_epi32(n, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15))};
}
static inline vf vf_load_first(vmask m, const float *p, float fill) {
    __m256 f = _mm256_set1_ps(fill);
    return VF_MAP(_mm256_blendv_ps(f, _mm256_maskload_ps(p, m.lo), _mm256_castsi256_ps(m.lo)),
                  _mm256_blendv_ps(f, _mm256_maskload_ps(p + 8, m.hi), _mm256_castsi256_ps(m.hi)));
}
static inline void vf_store_first(vmask m, float *p, vf a) { _mm256_maskstore_ps(p, m.lo, a.lo); _mm256_maskstore_ps(p + 8, m.hi, a.hi); }
static inline vf vf_keep_first(vmask m, vf a) {
    return VF_MAP(_mm256_and_ps(a.lo, _mm256_castsi256_ps(m.lo)), _mm256_and_ps(a.hi, _mm256_castsi256_ps(m.hi)));
}
static inline vf vf_held(vf a) { __asm__("" : "+x"(a.lo), "+x"(a.hi)); return a; }
#endif

/* vf_held(a): a, kept in registers. GCC otherwise folds a loaded vector into every multiply that
 * reads it, loading it again each time; where one value row meets several weight rows, the loads,
 * not the multiplies, bound the loop. */

/* fresh_loads(p): on AVX2 the compiler forgets where p points, so loads through it are made where
 * they are used (folded into the multiply) instead of once for several weight rows and held: the
 * held rows of x pushed a one-row product's accumulators onto the stack. AVX-512 has the registers. */
#if defined(__AVX512F__)
#define fresh_loads(p) ((void)0)
#else
#define fresh_loads(p) __asm__("" : "+r"(p))
#endif

#if defined(CAG_SIMD) && defined(__AVX512F__)
enum { SCORE_ROWS = 4, WEIGHT_ROWS = 4, WEIGHT_CHUNKS = 4, WEIGHT_SPAN = 128, SCORE_AHEAD = 16 };
#elif defined(CAG_SIMD)
enum { SCORE_ROWS = 4, WEIGHT_ROWS = 2, WEIGHT_CHUNKS = 2, WEIGHT_SPAN = 64, SCORE_AHEAD = 16 }; /* 16 ymm registers */
#endif

int cag_available(void) {
#if defined(CAG_SIMD)
    return 1;
#else
    return 0;
#endif
}

#if defined(CAG_SIMD)
/* Up to 4 query rows against keys n0..n1 of one head: each key row is loaded once for all rows, and
 * the row SCORE_AHEAD keys on, if below `ahead`, is asked for meanwhile (a decode step's attention
 * to a 4k context took about 10% less time than with the hardware's prefetching alone). */
static inline __attribute__((always_inline)) void scores_rows(const float *q, int D, const float *k, long k_ns, int ahead,
                                                              float *out, long o_ms, int n0, int n1, const int rows) {
    for (int n = n0; n < n1; n++) {
        const float *kr = k + n * k_ns;
        if (n + SCORE_AHEAD < ahead)
            for (int c = 0; c < D; c += 16) __builtin_prefetch(kr + SCORE_AHEAD * k_ns + c);
        vf acc[4];
        for (int r = 0; r < rows; r++) acc[r] = vf_zero();
        for (int c = 0; c < D; c += 16) {
            vf kv = vf_load(kr + c);
            for (int r = 0; r < rows; r++) acc[r] = vf_fmadd(vf_load(q + r * D + c), kv, acc[r]);
        }
        for (int r = 0; r < rows; r++) out[r * o_ms + n] = vf_sum(acc[r]);
    }
}

/* exp(x) for x <= 0 (scores less their row's maximum), -inf and below -104 giving 0: x = n ln2 + r,
 * |r| <= ln2 / 2, a degree-6 polynomial for exp(r), then 2^n. Within 2 ulp. */
static inline vf exp_nonpositive(vf x) {
    x = vf_max(x, vf_set1(-104.0f));
    vf n = vf_round(vf_mul(x, vf_set1(1.44269504088896341f)));
    vf r = vf_fnmadd(n, vf_set1(0.693359375f), x);
    r = vf_fnmadd(n, vf_set1(-2.12194440e-4f), r);
    vf p = vf_set1(1.9875691500e-4f);
    p = vf_fmadd(p, r, vf_set1(1.3981999507e-3f));
    p = vf_fmadd(p, r, vf_set1(8.3334519073e-3f));
    p = vf_fmadd(p, r, vf_set1(4.1665795894e-2f));
    p = vf_fmadd(p, r, vf_set1(1.6666665459e-1f));
    p = vf_fmadd(p, r, vf_set1(5.0000001201e-1f));
    p = vf_fmadd(p, vf_mul(r, r), vf_add(r, vf_set1(1.0f)));
    return vf_scale_by_pow2(p, n);
}

/* One row's softmax in place over its N prefix scores and S suffix scores, masked suffix columns
 * (mask[s] == 0) weighing 0. The prefix is summed by lanes (column n in lane n % 16), the suffix
 * one column after another: a row's weights do not depend on how much left padding it carries. */
static void softmax_row(float *x, int N, int S, const uint8_t *mask) {
    const float neg = -__builtin_inff();
    if (mask)
        for (int s = 0; s < S; s++)
            if (!mask[s]) x[N + s] = neg;
    vf top = vf_set1(neg);
    int n = 0;
    for (; n + 16 <= N; n += 16) top = vf_max(top, vf_load(x + n));
    vmask tail = vf_first(N - n);
    top = vf_max(top, vf_load_first(tail, x + n, neg));
    float high = vf_top(top);
    for (int s = 0; s < S; s++) high = x[N + s] > high ? x[N + s] : high;
    vf shift = vf_set1(high), lanes = vf_zero();
    for (n = 0; n + 16 <= N; n += 16) {
        vf e = exp_nonpositive(vf_sub(vf_load(x + n), shift));
        vf_store(x + n, e);
        lanes = vf_add(lanes, e);
    }
    vf e = vf_keep_first(tail, exp_nonpositive(vf_sub(vf_load_first(tail, x + n, 0.0f), shift)));
    vf_store_first(tail, x + n, e);
    float total = vf_sum(vf_add(lanes, e));
    for (int s = 0; s < S; s += 16) {
        vmask m = vf_first(S - s);
        vf_store_first(m, x + N + s, exp_nonpositive(vf_sub(vf_load_first(m, x + N + s, 0.0f), shift)));
    }
    for (int s = 0; s < S; s++) total += x[N + s];
    vf inverse = vf_set1(1.0f / total);
    for (n = 0; n < N + S; n += 16) {
        vmask m = vf_first(N + S - n);
        vf_store_first(m, x + n, vf_mul(vf_load_first(m, x + n, 0.0f), inverse));
    }
}

/* Up to 4 rows of weights for values n0..n1 of v, added to up to 64 columns of out (or to zero
 * with `fresh`), one value after another. */
static inline __attribute__((always_inline)) void weighted_rows(const float *w, long w_ms, const float *v, long v_ns,
                                                                int n0, int n1, float *out, long o_ms, int fresh,
                                                                const int rows, const int chunks) {
    vf acc[4][4];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < chunks; c++) acc[r][c] = fresh ? vf_zero() : vf_load(out + r * o_ms + 16 * c);
    for (int n = n0; n < n1; n++) {
        const float *vr = v + n * v_ns;
        vf vv[4];
        for (int c = 0; c < chunks; c++) vv[c] = vf_held(vf_load(vr + 16 * c));
        for (int r = 0; r < rows; r++) {
            vf wv = vf_set1(w[r * w_ms + n]);
            for (int c = 0; c < chunks; c++) acc[r][c] = vf_fmadd(wv, vv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < chunks; c++) vf_store(out + r * o_ms + 16 * c, acc[r][c]);
}

static void scores_range(const float *q, int rows, int D, const float *k, long k_ns, int N, float *out, long o_ms) {
    const int block = 256; /* 256 keys of 64 floats: 64 KB, reread from L2 by every group of 4 rows */
    for (int n0 = 0; n0 < N; n0 += block) {
        int n1 = n0 + block < N ? n0 + block : N;
        for (int m0 = 0; m0 < rows; m0 += SCORE_ROWS) {
            const float *qb = q + (long)m0 * D;
            float *ob = out + m0 * o_ms;
            int ahead = m0 == 0 ? N : 0; /* the first group of rows reads the block from memory, the others from cache */
            switch (rows - m0 < SCORE_ROWS ? rows - m0 : SCORE_ROWS) {
            case 1: scores_rows(qb, D, k, k_ns, ahead, ob, o_ms, n0, n1, 1); break;
            case 2: scores_rows(qb, D, k, k_ns, ahead, ob, o_ms, n0, n1, 2); break;
            case 3: scores_rows(qb, D, k, k_ns, ahead, ob, o_ms, n0, n1, 3); break;
            default: scores_rows(qb, D, k, k_ns, ahead, ob, o_ms, n0, n1, 4); break;
            }
        }
    }
}

/* Rows of weights against the prefix's values, then the suffix's. Each output element sums its
 * column in one order, whatever rows and columns share a block; the values are read in blocks of
 * WEIGHT_SPAN rows, each block by every row and every column before the next block, so it is read
 * from memory once even where the registers hold only a few rows and part of a row's columns.
 * On AVX2, with the value rows held (vf_held) and blocks of 64, a 20-token question's attention
 * to a 4k context (60 rows a head, 30 layers) took 196 ms against 228 ms re-reading the values for
 * each group of 3 rows (medians of 40 interleaved runs; a decode step's, within noise). */
static void weighted_range(const float *w, long w_ms, int rows, const float *pv, long pv_ns, int N, const float *sv,
                           long sv_ns, int S, int D, float *out) {
    const int columns = 16 * WEIGHT_CHUNKS;
    for (int n0 = 0; n0 < N + S; n0 += WEIGHT_SPAN) {
        int n1 = n0 + WEIGHT_SPAN < N + S ? n0 + WEIGHT_SPAN : N + S;
        for (int m0 = 0; m0 < rows; m0 += WEIGHT_ROWS) {
            int r = rows - m0 < WEIGHT_ROWS ? rows - m0 : WEIGHT_ROWS;
            const float *wb = w + m0 * w_ms;
            float *ob = out + (long)m0 * D;
            for (int d0 = 0; d0 < D; d0 += columns) {
                int chunks = (D - d0 < columns ? D - d0 : columns) / 16;
                /* the block's prefix values, then its suffix values: weights N + s go with suffix row s */
                int p1 = n1 < N ? n1 : N, s0 = n0 > N ? n0 - N : 0, s1 = n1 > N ? n1 - N : 0;
#define BLOCK(R, C) do { \
                    if (n0 < p1) weighted_rows(wb, w_ms, pv + d0, pv_ns, n0, p1, ob + d0, D, n0 == 0, R, C); \
                    if (s0 < s1) weighted_rows(wb + N, w_ms, sv + d0, sv_ns, s0, s1, ob + d0, D, s0 == 0 && N == 0, R, C); \
                } while (0)
#define ROWS(R) switch (chunks) { case 1: BLOCK(R, 1); break; case 2: BLOCK(R, 2); break; \
                                  case 3: BLOCK(R, 3); break; default: BLOCK(R, 4); }
                switch (r) {
                case 1: ROWS(1); break;
                case 2: ROWS(2); break;
                case 3: ROWS(3); break;
                default: ROWS(4); break;
                }
#undef ROWS
#undef BLOCK
            }
        }
    }
}
#endif

/* Attention of rows over a shared prefix and their own suffix, one softmax over both:
 *   q [H, R, D] (contiguous, already scaled), R = batches x rows_per_batch, batch b's rows reading
 *   suffix b; prefix keys/values [H, N, D]; suffix keys/values [B, H, S, D]; mask [B, q_len, S]
 *   (nonzero attends; NULL: all) with row r of a batch being query token r % q_len; out [H, R, D].
 * Tiles of up to 16 rows of one batch, each with its own scores buffer. Returns 0, or -1 when a
 * buffer could not be allocated. */
int cag_attend(const float *q, int H, int R, int D, int rows_per_batch, int q_len, const float *pk, const float *pv,
               int N, long pk_hs, long pk_ns, long pv_hs, long pv_ns, const float *sk, const float *sv, int S,
               long sk_bs, long sk_hs, long sk_ns, long sv_bs, long sv_hs, long sv_ns, const uint8_t *mask,
               long m_bs, long m_ts, float *out, int threads) {
#if defined(CAG_SIMD)
    const int tile = 16;
    int tiles = (rows_per_batch + tile - 1) / tile, batches = R / rows_per_batch, failed = 0;
    long width = N + S;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int h = 0; h < H; h++)
        for (int t = 0; t < batches * tiles; t++) {
            int b = t / tiles, first = (t % tiles) * tile;
            int rows = rows_per_batch - first < tile ? rows_per_batch - first : tile;
            long r0 = (long)b * rows_per_batch + first;
            float *w = (float *)malloc(sizeof(float) * rows * width);
            if (!w) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            const float *qt = q + ((long)h * R + r0) * D;
            const float *skb = sk + b * sk_bs + h * sk_hs, *svb = sv + b * sv_bs + h * sv_hs;
            scores_range(qt, rows, D, pk + h * pk_hs, pk_ns, N, w, width);
            scores_range(qt, rows, D, skb, sk_ns, S, w + N, width);
            for (int i = 0; i < rows; i++)
                softmax_row(w + i * width, N, S, mask ? mask + b * m_bs + ((first + i) % q_len) * m_ts : 0);
            weighted_range(w, width, rows, pv + h * pv_hs, pv_ns, N, svb, sv_ns, S, D, out + ((long)h * R + r0) * D);
            free(w);
        }
    return failed ? -1 : 0;
#else
    return -1;
#endif
}

void cag_rms_norm(const float *x, const float *w, float *out, long rows, int dim, float eps, int threads) {
#if defined(CAG_SIMD)
#pragma omp parallel for num_threads(threads) schedule(static) if (rows >= 64)
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        vf squares = vf_zero();
        for (int c = 0; c < dim; c += 16) {
            vf v = vf_load(xr + c);
            squares = vf_fmadd(v, v, squares);
        }
        vf scale = vf_set1(1.0f / sqrtf(vf_sum(squares) / dim + eps));
        for (int c = 0; c < dim; c += 16) vf_store(o + c, vf_mul(vf_load(w + c), vf_mul(vf_load(xr + c), scale)));
    }
#endif
}

/* One head's row of one token, rotated as transformers' apply_rotary_pos_emb and scaled. */
static inline void rotate_row(const float *xr, const float *c, const float *s, int D, float scale, float *o) {
    int half = D / 2;
    for (int i = 0; i < half; i++) {
        o[i] = (xr[i] * c[i] - xr[i + half] * s[i]) * scale;
        o[i + half] = (xr[i + half] * c[i + half] + xr[i] * s[i + half]) * scale;
    }
}

/* x [B, L, heads, D] (strides x_bs, x_ts, x_hs), cos and sin [B, L, D] (stride cs_rs per token). Token t of batch b, head h, is written to row ((h / group) * B + b) * group * L + (h % group)
 * * L + t of out [.., D]: with group = heads, out is [B, heads, L, D], as the cache takes keys; with
 * group = the query heads per key/value head, it is the attention's [kv heads, B x group x L, D]. */
void cag_rotary(const float *x, long x_bs, long x_ts, long x_hs, int B, int L, int heads, int D, const float *cos,
                const float *sin, long cs_rs, float scale, int group, float *out) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < L; t++)
            for (int h = 0; h < heads; h++) {
                long token = (long)b * L + t;
                rotate_row(x + b * x_bs + t * x_ts + h * x_hs, cos + token * cs_rs, sin + token * cs_rs, D, scale,
                           out + ((((long)(h / group) * B + b) * group + h % group) * L + t) * D);
            }
}

/* A decode step's attention in one call: qkv [B * L, (heads + 2 kv_heads) * D] as the fused q|k|v
 * product gives it, cos and sin [B, L, D]. The queries are rotated and scaled into `query`
 * ([kv_heads, B x group x L, D], as cag_rotary lays them out), the keys rotated and the values
 * copied into columns at..at+L-1 of the suffix buffers ([B, kv_heads, capacity, D], strides buf_bs,
 * buf_hs), and cag_attend reads the prefix and the suffix's first at + L columns; mask as there. */
int cag_rotary_attend(const float *qkv, int B, int L, int heads, int kv_heads, int D, const float *cos,
                      const float *sin, float scale, float *key_buffer, float *value_buffer, long buf_bs, long buf_hs,
                      int at, const float *pk, const float *pv, int N, long pk_hs, long pk_ns, long pv_hs, long pv_ns,
                      const uint8_t *mask, long m_bs, long m_ts, float *query, float *out, int threads) {
    long row = (long)(heads + 2 * kv_heads) * D;
    int group = heads / kv_heads;
    cag_rotary(qkv, L * row, row, D, B, L, heads, D, cos, sin, D, scale, group, query);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < L; t++)
            for (int h = 0; h < kv_heads; h++) {
                long token = (long)b * L + t, column = b * buf_bs + h * buf_hs + (long)(at + t) * D;
                const float *k = qkv + token * row + (heads + h) * D, *v = k + (long)kv_heads * D;
                rotate_row(k, cos + token * D, sin + token * D, D, 1.0f, key_buffer + column);
                for (int i = 0; i < D; i++) value_buffer[column + i] = v[i];
            }
    return cag_attend(query, kv_heads, B * group * L, D, group * L, L, pk, pv, N, pk_hs, pk_ns, pv_hs, pv_ns,
                      key_buffer, value_buffer, at + L, buf_bs, buf_hs, D, buf_bs, buf_hs, D, mask, m_bs, m_ts, out,
                      threads);
}

#if defined(CAG_SIMD)
enum { Q4_1 = 0, Q8_0 = 1, BLOCKS_AHEAD = 4 };

/* A block's codes: 32 nibbles (Q4_1) or 32 int8 (Q8_0). */
static inline long code_bytes(const int format) { return format == Q4_1 ? 16 : 32; }

/* A block's 32 float32 weights, bit for bit those that de-quantizing the block once gives.
 * ggml's Q4_1: weight i is d * code_i + m, code i in the low nibble of byte i and code i + 16 in
 * the high nibble; d * code is exact in float32, so fma(d, code, m) is the weight. On AVX-512 the
 * block's 16 possible weights are made as a table, and each code picks its own by a permute.
 * ggml's Q8_0: weight i is d * code_i, code an int8, exact in float32. */
static inline __attribute__((always_inline)) void block_weights(const uint8_t *codes, const float *scales, long block,
                                                                const int format, vf *low, vf *high) {
#if defined(__AVX512F__)
    if (format == Q4_1) {
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512 table = _mm512_fmadd_ps(_mm512_set1_ps(scales[2 * block]), iota, _mm512_set1_ps(scales[2 * block + 1]));
        __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + code_bytes(format) * block)));
        *low = _mm512_permutexvar_ps(c, table); /* the permute reads the low 4 bits of each index */
        *high = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), table);
    } else {
        __m512 d = _mm512_set1_ps(scales[block]);
        const __m128i *c = (const __m128i *)(codes + code_bytes(format) * block);
        *low = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c))));
        *high = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c + 1))));
    }
#else
    if (format == Q4_1) {
        const uint8_t *c = codes + code_bytes(format) * block;
        __m256 d = _mm256_set1_ps(scales[2 * block]), m = _mm256_set1_ps(scales[2 * block + 1]);
        __m256i first = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)c));
        __m256i second = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + 8)));
        __m256i nibble = _mm256_set1_epi32(15);
#define WEIGHT(codes) _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(codes), m)
        *low = (vf){WEIGHT(_mm256_and_si256(first, nibble)), WEIGHT(_mm256_and_si256(second, nibble))};
        *high = (vf){WEIGHT(_mm256_srli_epi32(first, 4)), WEIGHT(_mm256_srli_epi32(second, 4))};
#undef WEIGHT
    } else {
        const uint8_t *c = codes + code_bytes(format) * block;
        __m256 d = _mm256_set1_ps(scales[block]);
#define WEIGHT(at) _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(c + at)))))
        *low = (vf){WEIGHT(0), WEIGHT(8)};
        *high = (vf){WEIGHT(16), WEIGHT(24)};
#undef WEIGHT
    }
#endif
}

/* R rows of x against output rows j..j+J-1 of N: each block's weights are made once for all R rows,
 * and the codes of output row j + a + BLOCKS_AHEAD are asked for meanwhile (the Q8_0 head's product
 * at one row took about half the time it took with the hardware's prefetching alone). */
static inline __attribute__((always_inline)) void block_rows(const float *x, long x_ms, const uint8_t *codes,
                                                             const float *scales, int nb, int N, float *out, long o_ms,
                                                             int j, const int format, const int R, const int J) {
    vf lo_acc[4][4], hi_acc[4][4];
    for (int a = 0; a < J; a++)
        for (int r = 0; r < R; r++) lo_acc[a][r] = hi_acc[a][r] = vf_zero();
    for (int b = 0; b < nb; b++)
        for (int a = 0; a < J; a++) {
            if (j + a + BLOCKS_AHEAD < N)
                __builtin_prefetch(codes + ((long)(j + a + BLOCKS_AHEAD) * nb + b) * code_bytes(format));
            vf low, high;
            block_weights(codes, scales, (long)(j + a) * nb + b, format, &low, &high);
            for (int r = 0; r < R; r++) {
                const float *xr = x + r * x_ms + 32 * b;
                fresh_loads(xr);
                lo_acc[a][r] = vf_fmadd(low, vf_load(xr), lo_acc[a][r]);
                hi_acc[a][r] = vf_fmadd(high, vf_load(xr + 16), hi_acc[a][r]);
            }
        }
    for (int a = 0; a < J; a++)
        for (int r = 0; r < R; r++)
            out[r * o_ms + j + a] = vf_sum(vf_add(lo_acc[a][r], hi_acc[a][r]));
}

/* Four output rows j..j+3 against up to 4 rows of x, as many of each as keep the accumulators in
 * registers: AVX2 has 16 registers of 8 lanes, AVX-512 32 of 16. On AVX2 one row of x takes Q4_1's
 * weight rows two at a time, Q8_0's one at a time: 576 x 576 Q4_1 at one row took 27 us, against 29
 * us one at a time and 31 us with x held; the 49,152 x 576 Q8_0 head 3.2-3.5 ms, against 4.0-4.4 ms
 * two at a time (medians of 41 interleaved runs, the head's codes read from memory). */
static inline void block_rows_of_four(const float *x, long x_ms, const uint8_t *codes, const float *scales, int nb,
                                      int N, float *out, long o_ms, int j, const int format, int rows) {
#if defined(__AVX512F__)
    switch (rows) {
    case 1: block_rows(x, x_ms, codes, scales, nb, N, out, o_ms, j, format, 1, 4); break;
    case 2: for (int a = 0; a < 4; a += 2) block_rows(x, x_ms, codes, scales, nb, N, out, o_ms, j + a, format, 2, 2); break;
    case 3: for (int a = 0; a < 4; a++) block_rows(x, x_ms, codes, scales, nb, N, out, o_ms, j + a, format, 3, 1); break;
    default: for (int a = 0; a < 4; a++) block_rows(x, x_ms, codes, scales, nb, N, out, o_ms, j + a, format, 4, 1); break;
    }
#else
    if (rows == 1 && format == Q8_0) {
        for (int a = 0; a < 4; a++) block_rows(x, x_ms, codes, scales, nb, N, out, o_ms, j + a, format, 1, 1);
        return;
    }
    if (rows == 1) {
        for (int a = 0; a < 4; a += 2) block_rows(x, x_ms, codes, scales, nb, N, out, o_ms, j + a, format, 1, 2);
        return;
    }
    for (int r = 0; r < rows; r += 2)
        for (int a = 0; a < 4; a++) {
            if (rows - r == 1) block_rows(x + r * x_ms, x_ms, codes, scales, nb, N, out + r * o_ms, o_ms, j + a, format, 1, 1);
            else block_rows(x + r * x_ms, x_ms, codes, scales, nb, N, out + r * o_ms, o_ms, j + a, format, 2, 1);
        }
#endif
}
#endif

/* out[m, j] = dot(x[m, :], weight row j) over blocks of 32 inputs: codes [N, K / 32, 16] bytes and
 * scales [N, K / 32, 2] (d, m) for Q4_1, codes [N, K / 32, 32] int8 and scales [N, K / 32] (d) for
 * Q8_0; N a multiple of 4, K of 32. With `norm` (a weight [K]; x's rows contiguous), each row of x is
 * RMS-normalised first, exactly as cag_rms_norm does: a decode step's norm and product in one call.
 * Returns 0, or -1 when the normalised rows could not be held. */
#if defined(CAG_SIMD)
#define BLOCK_LINEAR(name, format)                                                                     \
    int name(const float *x, const uint8_t *codes, const float *scales, float *out, int M, int N, int K,       \
             long x_ms, long o_ms, const float *norm, float eps, int threads) {                               \
        int nb = K / 32;                                                                                       \
        float *normed = 0;                                                                                     \
        if (norm) {                                                                                            \
            if (x_ms != K || !(normed = (float *)malloc(sizeof(float) * M * K))) return -1;                    \
            cag_rms_norm(x, norm, normed, M, K, eps, 1);                                                       \
            x = normed;                                                                                        \
        }                                                                                                      \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                      \
        for (int jt = 0; jt < N / 4; jt++)                                                                     \
            for (int m0 = 0; m0 < M; m0 += 4)                                                                  \
                block_rows_of_four(x + m0 * x_ms, x_ms, codes, scales, nb, N, out + m0 * o_ms, o_ms, jt * 4,      \
                                   format, M - m0 < 4 ? M - m0 : 4);                                           \
        free(normed);                                                                                          \
        return 0;                                                                                              \
    }
#else
#define BLOCK_LINEAR(name, format)                                                                     \
    int name(const float *x, const uint8_t *codes, const float *scales, float *out, int M, int N, int K,       \
             long x_ms, long o_ms, const float *norm, float eps, int threads) { return -1; }
#endif

BLOCK_LINEAR(cag_q4_1_linear, Q4_1)
BLOCK_LINEAR(cag_q8_0_linear, Q8_0)
