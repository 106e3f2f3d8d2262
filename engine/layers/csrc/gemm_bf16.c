/* bf16 matmul for the CPU: y[M, N] = x[M, K] @ W^T (+ bias), fp32 accumulation, y rounded to bf16 (nearest even).
 * W is packed once (engine/layers/cpu_gemm.py: pack) into panels of 16 output columns with input pairs interleaved,
 * [ceil(N/16)][ceil(K/2)][16][2], zero-padded, so one 64-byte load is 16 lanes of bf16 pairs, what vdpbf16ps
 * multiplies against a broadcast pair of x. A panel's K/2 pair rows are contiguous and panels follow each other.
 * Threads take contiguous ranges of panels (one weight stream each). Register blocks are up to 8 rows x 3 panels
 * (24 fp32 accumulators); rows run in chunks that fit the L2 (x re-read from cache), and within a chunk each block of
 * 3 panels is read from memory once and from cache by the chunk's other row blocks. While a block is computed on,
 * the next one is software-prefetched, spread over the block's k steps, so that at small M (decode) the weight
 * stream from DRAM overlaps the arithmetic instead of adding to it. Without avx512_bf16 the same arithmetic runs
 * on GCC vector extensions (any x86-64 or ARM gcc). Built at run time by engine/layers/cpu_build.py.
 */
#include "bf16_pairs.h" /* LANES: the columns of a panel */

#define MR 8         /* rows per register block */
#define NR 3         /* panels per register block */
#ifndef X_CHUNK_BYTES /* rows of x per chunk: about this many bytes (kept in the L2 with the block; 96-384 KB alike) */
#define X_CHUNK_BYTES (192 * 1024)
#endif
#define PARALLEL_MIN_MACS 65536    /* below this many multiply-adds one thread runs (an OpenMP fork is microseconds) */
#ifndef PF_HINT
#define PF_HINT 3 /* temporal locality of the prefetches (3: all cache levels; 0-2 measured no better) */
#endif

#ifdef __AVX512BF16__
INLINE vp pairs_load(const bf16 *p) { return _mm512_loadu_si512(p); }
INLINE vf bf16_load16(const bf16 *p, int lanes) { /* up to 16 bf16 -> fp32 */
    const __m256i h = _mm256_maskz_loadu_epi16(MASK(lanes), p);
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
}
INLINE void bf16_store16(bf16 *p, vf x, int lanes) { /* round to nearest even */
    _mm256_mask_storeu_epi16(p, MASK(lanes), (__m256i)_mm512_cvtneps_pbh((__m512)x));
}
#else
INLINE vp pairs_load(const bf16 *p) {
    vp v;
    memcpy(&v, p, sizeof(v));
    return v;
}
INLINE vf bf16_load16(const bf16 *p, int lanes) {
    vh h = {0};
    memcpy(&h, p, (size_t)lanes * 2);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}
INLINE void bf16_store16(bf16 *p, vf x, int lanes) { /* round to nearest even, as torch does (finite values) */
    vu u = (vu)x;
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const vh h = __builtin_convertvector(u, vh);
    memcpy(p, &h, (size_t)lanes * 2);
}
#endif

/* y[a, 16 j + l] for mr rows of x (row stride xs) and nr panels (panel stride `panel` elements, the last with
 * `lanes` columns): K/2 pair steps (and the odd K's last element). pf..pf_end: the next block's bytes, q lines
 * per step. mr and nr are constants where this is inlined (see tile), so the accumulators stay in registers. */
INLINE void tile_kernel(const bf16 *x, int64_t xs, int mr, const bf16 *w, int64_t panel, int nr, int64_t K,
                        const bf16 *bias, bf16 *y, int64_t ys, int lanes, const char *pf, const char *pf_end, int q) {
    vf acc[MR][NR];
    for (int a = 0; a < mr; a++)
        for (int j = 0; j < nr; j++) acc[a][j] = (vf){0};
    const int64_t pairs = K / 2;
    for (int64_t i = 0; i < pairs; i++) {
        if (q && pf < pf_end)
            for (int b = 0; b < q; b++) __builtin_prefetch(pf + 64 * b, 0, PF_HINT);
        pf += 64 * q;
        vp wt[NR];
        for (int j = 0; j < nr; j++) wt[j] = pairs_load(w + j * panel + 32 * i);
        for (int a = 0; a < mr; a++) {
            uint32_t u;
            memcpy(&u, x + a * xs + 2 * i, 4);
            const vp xa = pair_splat(u);
            for (int j = 0; j < nr; j++) acc[a][j] = dot2(acc[a][j], wt[j], xa);
        }
    }
    if (K & 1) { /* the last element pairs with zero (the packed weight's pad is zero too) */
        vp wt[NR];
        for (int j = 0; j < nr; j++) wt[j] = pairs_load(w + j * panel + 32 * pairs);
        for (int a = 0; a < mr; a++) {
            const vp xa = pair_splat(x[a * xs + K - 1]);
            for (int j = 0; j < nr; j++) acc[a][j] = dot2(acc[a][j], wt[j], xa);
        }
    }
    for (int j = 0; j < nr; j++) {
        const int n = j == nr - 1 ? lanes : LANES;
        const vf b = bias ? bf16_load16(bias + LANES * j, n) : (vf){0};
        for (int a = 0; a < mr; a++) bf16_store16(y + a * ys + LANES * j, acc[a][j] + b, n);
    }
}

#define TILE_CASE(R, C)                                                                                      \
    case (R) * 4 + (C):                                                                                      \
        tile_kernel(x, xs, R, w, panel, C, K, bias, y, ys, lanes, pf, pf_end, q);                            \
        break;
#define TILE_ROW(R) TILE_CASE(R, 1) TILE_CASE(R, 2) TILE_CASE(R, 3)

/* One register block, specialised on its shape (8 x 3 in the bulk, smaller at the edges). */
static void tile(const bf16 *x, int64_t xs, int mr, const bf16 *w, int64_t panel, int nr, int64_t K,
                 const bf16 *bias, bf16 *y, int64_t ys, int lanes, const char *pf, const char *pf_end, int q) {
    switch (mr * 4 + nr) {
        TILE_ROW(1) TILE_ROW(2) TILE_ROW(3) TILE_ROW(4) TILE_ROW(5) TILE_ROW(6) TILE_ROW(7) TILE_ROW(8)
    default:
        break;
    }
}

/* x [M, K] (rows xs elements apart, unit stride along K), w packed as above for [N, K], bias [N] or NULL,
 * y [M, N] (rows ys apart). */
void gemm_bf16(const bf16 *x, int64_t xs, const bf16 *w, const bf16 *bias, bf16 *y, int64_t ys, int64_t M,
               int64_t N, int64_t K, int num_threads) {
    const int64_t panel = (K + 1) / 2 * 32, num_panels = (N + LANES - 1) / LANES;
    int64_t chunk = X_CHUNK_BYTES / (2 * (K > 0 ? K : 1));
    chunk = chunk < MR ? MR : chunk;
    chunk = (M + chunk - 1) / chunk; /* the number of chunks: then rows shared evenly, in whole register blocks */
    chunk = ((M + chunk - 1) / chunk + MR - 1) / MR * MR;
    const int parallel = num_panels >= 2 && M * N * K >= PARALLEL_MIN_MACS;
#pragma omp parallel num_threads(num_threads) if (parallel)
    {
#ifdef _OPENMP
        extern int omp_get_thread_num(void), omp_get_num_threads(void);
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        const int64_t t = 0, T = 1;
#endif
        const int64_t p0 = num_panels * t / T, p1 = num_panels * (t + 1) / T;
        for (int64_t m0 = 0; m0 < M; m0 += chunk) {
            const int64_t mc = M - m0 < chunk ? M - m0 : chunk, row_blocks = (mc + MR - 1) / MR;
            /* Prefetch lines per k step: the next block's lines spread over this block's steps. A single row (GEMV)
             * is all memory: the hardware prefetchers keep up and software prefetches only compete with them. */
            const int q = M > 1 ? (int)((NR + row_blocks - 1) / row_blocks) : 0;
            for (int64_t p = p0; p < p1; p += NR) {
                const int nr = (int)(p1 - p < NR ? p1 - p : NR);
                const int64_t next_end = p + nr + NR < p1 ? p + nr + NR : p1;
                const char *pf = (const char *)(w + (p + nr) * panel), *pf_end = (const char *)(w + next_end * panel);
                const int64_t n0 = LANES * p;
                const int last = N - n0 - LANES * (nr - 1) < LANES ? (int)(N - n0 - LANES * (nr - 1)) : LANES;
                for (int64_t r = 0; r < mc; r += MR) {
                    const int mr = (int)(mc - r < MR ? mc - r : MR);
                    tile(x + (m0 + r) * xs, xs, mr, w + p * panel, panel, nr, K, bias ? bias + n0 : 0,
                         y + (m0 + r) * ys + n0, ys, last, pf, pf_end, q);
                    pf += K / 2 * 64 * q; /* as far as the tile prefetched */
                }
            }
        }
    }
}
