/* cag's CPU loops, compiled with -march=native by cag.cpu_kernels; without AVX-512 the
 * library reports itself unavailable and cag uses torch's operations instead.
 *
 * Prefix attention, float32, head dim a multiple of 16, last dimension contiguous:
 *   scores:   out[h, m, n] = dot(q[h, m, :], k[h, n, :])
 *   weighted: out[h, m, :] = sum over n, in order, of w[h, m, n] * v[h, n, :]
 * Linear layers over ggml Q4_1 or Q8_0 blocks:
 *   q4_1_linear, q8_0_linear: out[m, j] = dot(x[m, :], weight row j), each weight computed
 *   from its block exactly as de-quantizing the block once gives it
 *
 * Every output element is summed in one order that depends on neither the number of
 * rows nor the number of threads.
 */
#include <immintrin.h>
#include <stdint.h>

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

/* Up to 4 rows and up to 64 columns of the output: 16 accumulators stay in registers over all n. */
static inline __attribute__((always_inline)) void weighted_block(const float *w, long w_ms, const float *v, long v_ns,
                                                                 int N, float *out, long o_ms, const int rows,
                                                                 const int chunks) {
    __m512 acc[4][4];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < chunks; c++) acc[r][c] = _mm512_setzero_ps();
    for (int n = 0; n < N; n++) {
        const float *vr = v + n * v_ns;
        __m512 vv[4];
        for (int c = 0; c < chunks; c++) vv[c] = _mm512_loadu_ps(vr + 16 * c);
        for (int r = 0; r < rows; r++) {
            __m512 wv = _mm512_set1_ps(w[r * w_ms + n]);
            for (int c = 0; c < chunks; c++) acc[r][c] = _mm512_fmadd_ps(wv, vv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < chunks; c++) _mm512_storeu_ps(out + r * o_ms + 16 * c, acc[r][c]);
}
#endif

void cag_scores(const float *q, const float *k, float *out, int H, int M, int N, int D, long k_hs, long k_ns,
                long o_hs, long o_ms, int threads) {
#if defined(__AVX512F__)
    const int block = 256; /* 256 keys of 64 floats: 64 KB, reread from L2 by every group of 4 rows */
    int blocks = (N + block - 1) / block;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int h = 0; h < H; h++)
        for (int b = 0; b < blocks; b++) {
            int n0 = b * block, n1 = n0 + block < N ? n0 + block : N;
            for (int m0 = 0; m0 < M; m0 += 4) {
                const float *qb = q + ((long)h * M + m0) * D, *kb = k + h * k_hs;
                float *ob = out + h * o_hs + m0 * o_ms;
                switch (M - m0 < 4 ? M - m0 : 4) {
                case 1: scores_rows(qb, D, kb, k_ns, ob, o_ms, n0, n1, 1); break;
                case 2: scores_rows(qb, D, kb, k_ns, ob, o_ms, n0, n1, 2); break;
                case 3: scores_rows(qb, D, kb, k_ns, ob, o_ms, n0, n1, 3); break;
                default: scores_rows(qb, D, kb, k_ns, ob, o_ms, n0, n1, 4); break;
                }
            }
        }
#endif
}

void cag_weighted(const float *w, const float *v, float *out, int H, int M, int N, int D, long w_hs, long w_ms,
                  long v_hs, long v_ns, long o_hs, long o_ms, int threads) {
#if defined(__AVX512F__)
    int row_blocks = (M + 3) / 4, column_blocks = (D + 63) / 64;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(3)
    for (int h = 0; h < H; h++)
        for (int rb = 0; rb < row_blocks; rb++)
            for (int cb = 0; cb < column_blocks; cb++) {
                int m0 = rb * 4, rows = M - m0 < 4 ? M - m0 : 4;
                int d0 = cb * 64, chunks = (D - d0 < 64 ? D - d0 : 64) / 16;
                const float *wb = w + h * w_hs + m0 * w_ms, *vb = v + h * v_hs + d0;
                float *ob = out + h * o_hs + m0 * o_ms + d0;
#define BLOCK(R, C) weighted_block(wb, w_ms, vb, v_ns, N, ob, o_ms, R, C)
#define ROWS(R) switch (chunks) { case 1: BLOCK(R, 1); break; case 2: BLOCK(R, 2); break; \
                                  case 3: BLOCK(R, 3); break; default: BLOCK(R, 4); }
                switch (rows) {
                case 1: ROWS(1); break;
                case 2: ROWS(2); break;
                case 3: ROWS(3); break;
                default: ROWS(4); break;
                }
#undef ROWS
#undef BLOCK
            }
#endif
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
