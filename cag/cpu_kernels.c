/* cag's CPU loops, compiled with -march=native by cag.cpu_kernels; without AVX-512 the
 * library reports itself unavailable and cag uses torch's operations instead.
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

int cag_available(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512F__)
/* Up to 4 query rows against keys n0..n1 of one head: each key row is loaded once for all rows. */
static inline __attribute__((always_inline)) void scores_rows(const float *q, int D, const float *k, long k_ns,
                                                              float *out, long o_ms, int n0, int n1, const int rows) {
    for (int n = n0; n < n1; n++) {
        const float *kr = k + n * k_ns;
        __m512 acc[4];
        for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
        for (int c = 0; c < D; c += 16) {
            __m512 kv = _mm512_loadu_ps(kr + c);
            for (int r = 0; r < rows; r++) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * D + c), kv, acc[r]);
        }
        for (int r = 0; r < rows; r++) out[r * o_ms + n] = _mm512_reduce_add_ps(acc[r]);
    }
}

#endif

#if defined(__AVX512F__)
/* exp(x) for x <= 0 (scores less their row's maximum), -inf and below -104 giving 0: x = n ln2 + r,
 * |r| <= ln2 / 2, a degree-6 polynomial for exp(r), then 2^n by scalef. Within 2 ulp. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* One row's softmax in place over its N prefix scores and S suffix scores, masked suffix columns
 * (mask[s] == 0) weighing 0. The prefix is summed by lanes (column n in lane n % 16), the suffix
 * one column after another: a row's weights do not depend on how much left padding it carries. */
static void softmax_row(float *x, int N, int S, const uint8_t *mask) {
    const float neg = -__builtin_inff();
    if (mask)
        for (int s = 0; s < S; s++)
            if (!mask[s]) x[N + s] = neg;
    __m512 top = _mm512_set1_ps(neg);
    int n = 0;
    for (; n + 16 <= N; n += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(x + n));
    __mmask16 tail = (__mmask16)((1u << (N - n)) - 1);
    top = _mm512_max_ps(top, _mm512_mask_loadu_ps(_mm512_set1_ps(neg), tail, x + n));
    float high = _mm512_reduce_max_ps(top);
    for (int s = 0; s < S; s++) high = x[N + s] > high ? x[N + s] : high;
    __m512 shift = _mm512_set1_ps(high), lanes = _mm512_setzero_ps();
    for (n = 0; n + 16 <= N; n += 16) {
        __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(x + n), shift));
        _mm512_storeu_ps(x + n, e);
        lanes = _mm512_add_ps(lanes, e);
    }
    __m512 e = _mm512_maskz_mov_ps(tail, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, x + n), shift)));
    _mm512_mask_storeu_ps(x + n, tail, e);
    float total = _mm512_reduce_add_ps(_mm512_add_ps(lanes, e));
    for (int s = 0; s < S; s += 16) {
        __mmask16 m = S - s >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (S - s)) - 1);
        __m512 es = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + N + s), shift));
        _mm512_mask_storeu_ps(x + N + s, m, es);
    }
    for (int s = 0; s < S; s++) total += x[N + s];
    __m512 inverse = _mm512_set1_ps(1.0f / total);
    for (n = 0; n < N + S; n += 16) {
        __mmask16 m = N + S - n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N + S - n)) - 1);
        _mm512_mask_storeu_ps(x + n, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + n), inverse));
    }
}

/* Up to 4 rows of weights against the prefix's values, then the suffix's, for up to 64 columns. */
static inline __attribute__((always_inline)) void weighted_rows(const float *w, long w_ms, const float *pv, long pv_ns,
                                                                int N, const float *sv, long sv_ns, int S, float *out,
                                                                long o_ms, const int rows, const int chunks) {
    __m512 acc[4][4];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < chunks; c++) acc[r][c] = _mm512_setzero_ps();
    for (int part = 0; part < 2; part++) {
        const float *v = part ? sv : pv, *wp = part ? w + N : w;
        long v_ns = part ? sv_ns : pv_ns;
        for (int n = 0, end = part ? S : N; n < end; n++) {
            const float *vr = v + n * v_ns;
            __m512 vv[4];
            for (int c = 0; c < chunks; c++) vv[c] = _mm512_loadu_ps(vr + 16 * c);
            for (int r = 0; r < rows; r++) {
                __m512 wv = _mm512_set1_ps(wp[r * w_ms + n]);
                for (int c = 0; c < chunks; c++) acc[r][c] = _mm512_fmadd_ps(wv, vv[c], acc[r][c]);
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < chunks; c++) _mm512_storeu_ps(out + r * o_ms + 16 * c, acc[r][c]);
}

static void scores_range(const float *q, int rows, int D, const float *k, long k_ns, int N, float *out, long o_ms) {
    const int block = 256; /* 256 keys of 64 floats: 64 KB, reread from L2 by every group of 4 rows */
    for (int n0 = 0; n0 < N; n0 += block) {
        int n1 = n0 + block < N ? n0 + block : N;
        for (int m0 = 0; m0 < rows; m0 += 4) {
            const float *qb = q + (long)m0 * D;
            float *ob = out + m0 * o_ms;
            switch (rows - m0 < 4 ? rows - m0 : 4) {
            case 1: scores_rows(qb, D, k, k_ns, ob, o_ms, n0, n1, 1); break;
            case 2: scores_rows(qb, D, k, k_ns, ob, o_ms, n0, n1, 2); break;
            case 3: scores_rows(qb, D, k, k_ns, ob, o_ms, n0, n1, 3); break;
            default: scores_rows(qb, D, k, k_ns, ob, o_ms, n0, n1, 4); break;
            }
        }
    }
}

static void weighted_range(const float *w, long w_ms, int rows, const float *pv, long pv_ns, int N, const float *sv,
                           long sv_ns, int S, int D, float *out) {
    for (int m0 = 0; m0 < rows; m0 += 4)
        for (int d0 = 0; d0 < D; d0 += 64) {
            int r = rows - m0 < 4 ? rows - m0 : 4, chunks = (D - d0 < 64 ? D - d0 : 64) / 16;
            const float *wb = w + m0 * w_ms;
            float *ob = out + (long)m0 * D + d0;
#define BLOCK(R, C) weighted_rows(wb, w_ms, pv + d0, pv_ns, N, sv + d0, sv_ns, S, ob, D, R, C)
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
#if defined(__AVX512F__)
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
#if defined(__AVX512F__)
#pragma omp parallel for num_threads(threads) schedule(static) if (rows >= 64)
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        __m512 squares = _mm512_setzero_ps();
        for (int c = 0; c < dim; c += 16) {
            __m512 v = _mm512_loadu_ps(xr + c);
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / dim + eps));
        for (int c = 0; c < dim; c += 16)
            _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(w + c), _mm512_mul_ps(_mm512_loadu_ps(xr + c), scale)));
    }
#endif
}

/* x [B, L, heads, D] (strides x_bs, x_ts, x_hs), cos and sin [B, L, D] (stride cs_rs per token). Token t of batch b, head h, is written to row ((h / group) * B + b) * group * L + (h % group)
 * * L + t of out [.., D]: with group = heads, out is [B, heads, L, D], as the cache takes keys; with
 * group = the query heads per key/value head, it is the attention's [kv heads, B x group x L, D]. */
void cag_rotary(const float *x, long x_bs, long x_ts, long x_hs, int B, int L, int heads, int D, const float *cos,
                const float *sin, long cs_rs, float scale, int group, float *out) {
    int half = D / 2;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < L; t++)
            for (int h = 0; h < heads; h++) {
                long token = (long)b * L + t;
                const float *xr = x + b * x_bs + t * x_ts + h * x_hs, *c = cos + token * cs_rs, *s = sin + token * cs_rs;
                float *o = out + ((((long)(h / group) * B + b) * group + h % group) * L + t) * D;
                for (int i = 0; i < half; i++) {
                    o[i] = (xr[i] * c[i] - xr[i + half] * s[i]) * scale;
                    o[i + half] = (xr[i + half] * c[i + half] + xr[i] * s[i + half]) * scale;
                }
            }
}

#if defined(__AVX512F__)
enum { Q4_1 = 0, Q8_0 = 1 };

/* A block's 32 float32 weights, bit for bit those that de-quantizing the block once gives.
 * ggml's Q4_1: weight i is d * code_i + m, code i in the low nibble of byte i and code i + 16 in
 * the high nibble; d * code is exact in float32, so fma(d, code, m) is the weight. The block's
 * 16 possible weights are made as a table, and each code picks its own by a permute.
 * ggml's Q8_0: weight i is d * code_i, code an int8, exact in float32. */
static inline __attribute__((always_inline)) void block_weights(const uint8_t *codes, const float *scales, long block,
                                                                const int format, __m512 *low, __m512 *high) {
    if (format == Q4_1) {
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512 table = _mm512_fmadd_ps(_mm512_set1_ps(scales[2 * block]), iota, _mm512_set1_ps(scales[2 * block + 1]));
        __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + 16 * block)));
        *low = _mm512_permutexvar_ps(c, table); /* the permute reads the low 4 bits of each index */
        *high = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), table);
    } else {
        __m512 d = _mm512_set1_ps(scales[block]);
        const __m128i *c = (const __m128i *)(codes + 32 * block);
        *low = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c))));
        *high = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c + 1))));
    }
}

/* R rows of x against output rows j..j+J-1: each block's weights are made once for all R rows. */
static inline __attribute__((always_inline)) void block_rows(const float *x, long x_ms, const uint8_t *codes,
                                                             const float *scales, int nb, float *out, long o_ms,
                                                             int j, const int format, const int R, const int J) {
    __m512 lo_acc[4][4], hi_acc[4][4];
    for (int a = 0; a < J; a++)
        for (int r = 0; r < R; r++) lo_acc[a][r] = hi_acc[a][r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++)
        for (int a = 0; a < J; a++) {
            __m512 low, high;
            block_weights(codes, scales, (long)(j + a) * nb + b, format, &low, &high);
            for (int r = 0; r < R; r++) {
                lo_acc[a][r] = _mm512_fmadd_ps(low, _mm512_loadu_ps(x + r * x_ms + 32 * b), lo_acc[a][r]);
                hi_acc[a][r] = _mm512_fmadd_ps(high, _mm512_loadu_ps(x + r * x_ms + 32 * b + 16), hi_acc[a][r]);
            }
        }
    for (int a = 0; a < J; a++)
        for (int r = 0; r < R; r++)
            out[r * o_ms + j + a] = _mm512_reduce_add_ps(_mm512_add_ps(lo_acc[a][r], hi_acc[a][r]));
}
#endif

/* out[m, j] = dot(x[m, :], weight row j) over blocks of 32 inputs: codes [N, K / 32, 16] bytes and
 * scales [N, K / 32, 2] (d, m) for Q4_1, codes [N, K / 32, 32] int8 and scales [N, K / 32] (d) for
 * Q8_0; N a multiple of 4, K of 32. Output rows 4 at a time, with as many x rows as keep the
 * accumulators in registers. */
#if defined(__AVX512F__)
#define BLOCK_LINEAR(name, format)                                                                     \
    void name(const float *x, const uint8_t *codes, const float *scales, float *out, int M, int N, int K,      \
              long x_ms, long o_ms, int threads) {                                                             \
        int nb = K / 32;                                                                                       \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                      \
        for (int jt = 0; jt < N / 4; jt++) {                                                                   \
            int j = jt * 4;                                                                                    \
            for (int m0 = 0; m0 < M; m0 += 4) {                                                                \
                const float *xr = x + m0 * x_ms;                                                               \
                float *o = out + m0 * o_ms;                                                                    \
                switch (M - m0 < 4 ? M - m0 : 4) {                                                             \
                case 1: block_rows(xr, x_ms, codes, scales, nb, o, o_ms, j, format, 1, 4); break;                         \
                case 2: for (int a = 0; a < 4; a += 2) block_rows(xr, x_ms, codes, scales, nb, o, o_ms, j + a, format, 2, 2); break; \
                case 3: for (int a = 0; a < 4; a++) block_rows(xr, x_ms, codes, scales, nb, o, o_ms, j + a, format, 3, 1); break; \
                default: for (int a = 0; a < 4; a++) block_rows(xr, x_ms, codes, scales, nb, o, o_ms, j + a, format, 4, 1); break; \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }
#else
#define BLOCK_LINEAR(name, format)                                                                     \
    void name(const float *x, const uint8_t *codes, const float *scales, float *out, int M, int N, int K,      \
              long x_ms, long o_ms, int threads) {}
#endif

BLOCK_LINEAR(cag_q4_1_linear, Q4_1)
BLOCK_LINEAR(cag_q8_0_linear, Q8_0)
