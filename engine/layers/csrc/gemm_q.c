/* Weight-only int4 / int8 matmul for the CPU: y[M, N] = x[M, K] @ W^T (+ bias), x and y bf16, W held as integer
 * codes with one fp16 scale (and, for int4, one fp16 offset) per 16 outputs x group of G inputs (engine/quant/
 * int_weight.py: w = q * s + m, or m = -(z * s) for zero points). The codes are widened exactly (integers below
 * 256) and multiplied with x into per-group fp32 accumulators; at each group's end acc += acc_g * s + m * sum(x over
 * the group), so no weight is ever rounded: the result is the float32 product with the dequantized weight up to
 * summation order (engine/quant/cpu_kernel.py packs; its twin dequantizes). int4 codes become bf16 (128 + q, one
 * OR) for vdpbf16ps; int8 codes become fp32 (vpmovsxbd + vcvtdq2ps) for fp32 FMAs against x in fp32, cheaper on
 * AVX-512 than int8's widening to bf16 plus vdpbf16ps (tile8_kernel).
 * Layout per panel of 16 outputs (zero-padded): int4 [K/8][32] uint16, element e (lane e/2, input pair slot e%2)
 * of pair steps 4t..4t+3 in bits 0-3, 4-7, 8-11, 12-15 of its uint16 (inputs 8t + 2j + e%2 for step 4t + j); int8
 * [K/2][32] int8 in the same element order. Scales and offsets [panel][G][16] fp16. Threads take contiguous
 * ranges of panels.
 */
#include <stdlib.h>

#include "bf16_pairs.h"

#define MR 3    /* int4: rows per register block */
#define NR 2    /* int4: panels per register block (rows > 1) */
#define NR1 4   /* int4: panels per register block of a single row (decode: more independent chains) */
#define MR8 4   /* int8: rows per register block */
#define NR8 2   /* int8: panels per register block (rows > 1) */
#define NR8_1 8 /* int8: panels per register block of a single row (more weight streams in flight) */
#define PF8 512 /* int8: prefetch distance in bytes of each panel's codes */
#define PF4_LOCALITY 2 /* int4: the next panel block's codes are prefetched into L2 while this one runs */
#define PARALLEL_MIN_MACS 65536

typedef uint16_t f16;
typedef uint64_t v8u __attribute__((vector_size(64)));

#ifdef __AVX512BF16__
INLINE vf h8_load16(const f16 *p) { return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
INLINE vf bf16_load16(const bf16 *p, int lanes) {
    const __m256i h = _mm256_maskz_loadu_epi16(MASK(lanes), p);
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
}
INLINE void bf16_store16(bf16 *p, vf x, int lanes) {
    _mm256_mask_storeu_epi16(p, MASK(lanes), (__m256i)_mm512_cvtneps_pbh((__m512)x));
}
/* 32 lanes of 4 nibbles (one quad of pair steps) -> the bf16 pairs of step j: 128 + q, exactly (0x4300 is 128.0,
 * the code its low mantissa bits), so no table or conversion is needed; the 128 is taken back with the offsets */
INLINE vp decode4(__m512i v, int j) {
    return _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4 * j), _mm512_set1_epi16(15)),
                           _mm512_set1_epi16(0x4300));
}
INLINE __m512i load_quad(const uint8_t *p) { return _mm512_loadu_si512(p); }
INLINE vf widen16(const int8_t *p) { /* 16 int8 -> fp32, exact */
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#else
INLINE float h2f(f16 h) { /* IEEE half -> float, exact */
    const uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023;
    uint32_t u;
    if (e == 0) {
        float f = (float)m * (1.0f / 16777216.0f);
        return s ? -f : f;
    }
    u = s | (e == 31 ? 0x7F800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
    float f;
    memcpy(&f, &u, 4);
    return f;
}
INLINE vf h8_load16(const f16 *p) {
    vf r;
    for (int i = 0; i < 16; i++) r[i] = h2f(p[i]);
    return r;
}
INLINE vf bf16_load16(const bf16 *p, int lanes) {
    vf r = {0};
    for (int i = 0; i < lanes; i++) r[i] = bf16_to_f32(p[i]);
    return r;
}
INLINE void bf16_store16(bf16 *p, vf x, int lanes) {
    for (int i = 0; i < lanes; i++) p[i] = f32_to_bf16(x[i]);
}
typedef uint16_t vq __attribute__((vector_size(64)));
INLINE vp decode4(vq v, int j) { return (vp)(((v >> (4 * j)) & 15) | 0x4300); }
INLINE vq load_quad(const uint8_t *p) {
    vq v;
    memcpy(&v, p, sizeof(v));
    return v;
}
INLINE vf widen16(const int8_t *p) {
    vf r;
    for (int l = 0; l < 16; l++) r[l] = (float)p[l];
    return r;
}
#endif

typedef struct {
    int64_t N, K, G, group;     /* outputs, inputs, groups, inputs per group */
    int bits, offset_kind;      /* 4 | 8; 0 none, 1 mins, 2 zero points */
    const uint8_t *codes;       /* panels as above */
    const f16 *scales, *offsets; /* [panel][G][16] */
} QWeight;

#include "gemm_q_amx.h"

/* int4: mr rows x nr panels of y; xsum [rows][G] (row stride G). Two group accumulators per (row, panel), one per
 * pair step of a step pair, keep more vdpbf16ps chains independent (its latency, not its throughput, bounds a GEMV). */
INLINE void tile_kernel(const bf16 *x, int64_t xs, const float *xsum, int mr, const QWeight *w, int64_t p, int nr,
                        int pfn, const bf16 *bias, bf16 *y, int64_t ys, int lanes) {
    const int64_t K = w->K, G = w->G, steps = w->group / 2, panel_bytes = K * 8; /* pair steps per group */
    const uint8_t *codes = w->codes + p * panel_bytes;
    vf acc[MR][NR1];
    for (int a = 0; a < mr; a++)
        for (int j = 0; j < nr; j++) acc[a][j] = (vf){0};
    for (int64_t g = 0; g < G; g++) {
        vf ga[MR][NR1], gb[MR][NR1];
        for (int a = 0; a < mr; a++)
            for (int j = 0; j < nr; j++) ga[a][j] = gb[a][j] = (vf){0};
        for (int64_t i = g * steps; i < (g + 1) * steps; i += 4) { /* one quad: pair steps i..i+3 */
            for (int j = 0; j < pfn; j++) __builtin_prefetch(codes + (nr + j) * panel_bytes + 16 * i, 0, PF4_LOCALITY);
#ifdef __AVX512BF16__
            __m512i v[NR1];
#else
            vq v[NR1];
#endif
            for (int j = 0; j < nr; j++) v[j] = load_quad(codes + j * panel_bytes + 16 * i);
            for (int s2 = 0; s2 < 4; s2 += 2) {
                vp wa[NR1], wb[NR1];
                for (int j = 0; j < nr; j++) wa[j] = decode4(v[j], s2), wb[j] = decode4(v[j], s2 + 1);
                for (int a = 0; a < mr; a++) {
                    const bf16 *xr = x + a * xs + 2 * (i + s2);
                    const vp xa = pair_bcast(xr), xb = pair_bcast(xr + 2);
                    for (int j = 0; j < nr; j++) {
                        ga[a][j] = dot2(ga[a][j], wa[j], xa);
                        gb[a][j] = dot2(gb[a][j], wb[j], xb);
                    }
                }
            }
        }
        for (int j = 0; j < nr; j++) {
            const int64_t at = ((p + j) * G + g) * 16;
            const vf s = h8_load16(w->scales + at);
            vf m = {0};
            if (w->offset_kind) m = h8_load16(w->offsets + at);
            if (w->offset_kind == 2) m = -(m * s); /* zero points: m = -(z s), exact */
            if (w->bits == 4) m -= 128 * s;         /* the codes were read as 128 + q */
            const int offset = w->offset_kind || w->bits == 4;
            for (int a = 0; a < mr; a++) {
                acc[a][j] += (ga[a][j] + gb[a][j]) * s;
                if (offset) acc[a][j] += m * xsum[a * G + g];
            }
        }
    }
    for (int j = 0; j < nr; j++) {
        const int n = j == nr - 1 ? lanes : LANES;
        const vf b = bias ? bf16_load16(bias + LANES * j, n) : (vf){0};
        for (int a = 0; a < mr; a++) bf16_store16(y + a * ys + LANES * j, acc[a][j] + b, n);
    }
}

/* int8 on fp32 multiply-adds (widening int8 to bf16 pairs for vdpbf16ps costs more): a pair step's 32 codes widen
 * to two vectors of 8 outputs x the step's 2 inputs (lane 2l + e: output l, or 8 + l, times input 2i + e),
 * multiplied exactly (int8 x bf16 fits fp32) by x's pair (x[2i], x[2i+1]) repeated. At each group's end the even
 * and odd lanes are added into the 16 outputs' order, then scaled. xf: x in fp32, rows K apart. pf: prefetch the
 * codes PF8 bytes ahead (the first row block of a panel block reads them from memory, the others from cache). */
INLINE void tile8_kernel(const float *xf, const float *xsum, int mr, const QWeight *w, int64_t p, int nr, int pf,
                         const bf16 *bias, bf16 *y, int64_t ys, int lanes) {
    const int64_t K = w->K, G = w->G, steps = w->group / 2, panel_bytes = K * 16;
    const int8_t *codes = (const int8_t *)w->codes + p * panel_bytes;
    const vi even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}, odd = even + 1;
    vf acc[MR8][NR8_1];
    for (int a = 0; a < mr; a++)
        for (int j = 0; j < nr; j++) acc[a][j] = (vf){0};
    for (int64_t g = 0; g < G; g++) {
        vf lo[MR8][NR8_1], hi[MR8][NR8_1];
        for (int a = 0; a < mr; a++)
            for (int j = 0; j < nr; j++) lo[a][j] = hi[a][j] = (vf){0};
        for (int64_t i = g * steps; i < (g + 1) * steps; i += 2) { /* one 64-byte line of each panel */
            if (pf && 32 * i + PF8 < panel_bytes) /* never an address past the panel (the last one: the buffer) */
                for (int j = 0; j < nr; j++) __builtin_prefetch(codes + j * panel_bytes + 32 * i + PF8, 0, 3);
            for (int64_t h = i; h < i + 2; h++) {
                vf wl[NR8_1], wh[NR8_1];
                for (int j = 0; j < nr; j++) {
                    wl[j] = widen16(codes + j * panel_bytes + 32 * h);
                    wh[j] = widen16(codes + j * panel_bytes + 32 * h + 16);
                }
                for (int a = 0; a < mr; a++) {
                    uint64_t u;
                    memcpy(&u, xf + a * K + 2 * h, 8);
                    const vf xp = (vf)((v8u){0} + u);
                    for (int j = 0; j < nr; j++) lo[a][j] += wl[j] * xp, hi[a][j] += wh[j] * xp;
                }
            }
        }
        for (int j = 0; j < nr; j++) {
            const int64_t at = ((p + j) * G + g) * 16;
            const vf s = h8_load16(w->scales + at);
            vf m = w->offset_kind ? h8_load16(w->offsets + at) : (vf){0};
            if (w->offset_kind == 2) m = -(m * s);
            for (int a = 0; a < mr; a++) {
                const vf sum = __builtin_shuffle(lo[a][j], hi[a][j], even) + __builtin_shuffle(lo[a][j], hi[a][j], odd);
                acc[a][j] += sum * s;
                if (w->offset_kind) acc[a][j] += m * xsum[a * G + g];
            }
        }
    }
    for (int j = 0; j < nr; j++) {
        const int n = j == nr - 1 ? lanes : LANES;
        const vf b = bias ? bf16_load16(bias + LANES * j, n) : (vf){0};
        for (int a = 0; a < mr; a++) bf16_store16(y + a * ys + LANES * j, acc[a][j] + b, n);
    }
}

#define TILE_CASE(R, C)                                                                                      \
    case (R) * 8 + (C):                                                                                      \
        tile_kernel(x, xs, xsum, R, w, p, C, pfn, bias, y, ys, lanes);                                       \
        break;

static void tile(const bf16 *x, int64_t xs, const float *xsum, int mr, const QWeight *w, int64_t p, int nr, int pfn,
                 const bf16 *bias, bf16 *y, int64_t ys, int lanes) {
    switch (mr * 8 + nr) {
        TILE_CASE(1, 1) TILE_CASE(1, 2) TILE_CASE(1, 3) TILE_CASE(1, 4)
        TILE_CASE(2, 1) TILE_CASE(2, 2) TILE_CASE(3, 1) TILE_CASE(3, 2)
    default:
        break;
    }
}

#define TILE8_CASE(R, C)                                                                                     \
    case (R) * 16 + (C):                                                                                     \
        tile8_kernel(xf, xsum, R, w, p, C, pf, bias, y, ys, lanes);                                          \
        break;

static void tile8(const float *xf, const float *xsum, int mr, const QWeight *w, int64_t p, int nr, int pf,
                  const bf16 *bias, bf16 *y, int64_t ys, int lanes) {
    switch (mr * 16 + nr) {
        TILE8_CASE(1, 1) TILE8_CASE(1, 2) TILE8_CASE(1, 3) TILE8_CASE(1, 4) TILE8_CASE(1, 5) TILE8_CASE(1, 6)
        TILE8_CASE(1, 7) TILE8_CASE(1, 8) TILE8_CASE(2, 1) TILE8_CASE(2, 2) TILE8_CASE(3, 1) TILE8_CASE(3, 2)
        TILE8_CASE(4, 1) TILE8_CASE(4, 2)
    default:
        break;
    }
}

/* Panels p0..p1 of y in blocks of nr panels x mr rows; while a block's first row block runs, int4 prefetches the
 * next block's codes (the hardware prefetcher alone restarts at each panel, K * 8 bytes, and leaves the stream short
 * of bandwidth) */
static void avx_panels(const bf16 *x, int64_t xs, const float *xf, const float *xsum, const QWeight *w, int64_t M,
                       int64_t N, int64_t p0, int64_t p1, const bf16 *bias, bf16 *y, int64_t ys) {
    const int64_t K = w->K, G = w->G, bits = w->bits;
    const int64_t step = bits == 8 ? (M == 1 ? NR8_1 : NR8) : (M == 1 ? NR1 : NR), rows = bits == 8 ? MR8 : MR;
    for (int64_t p = p0; p < p1; p += step) {
        const int nr = (int)(p1 - p < step ? p1 - p : step);
        const int64_t ahead = p1 - (p + nr); /* the next block's panels in this thread's range */
        const int pfn = (int)(ahead < nr ? ahead : nr);
        const int64_t n0 = LANES * p;
        const int last = N - n0 - LANES * (nr - 1) < LANES ? (int)(N - n0 - LANES * (nr - 1)) : LANES;
        const bf16 *b = bias ? bias + n0 : 0;
        for (int64_t r = 0; r < M; r += rows) {
            const int mr = (int)(M - r < rows ? M - r : rows);
            if (bits == 8)
                tile8(xf + r * K, xsum + r * G, mr, w, p, nr, r == 0, b, y + r * ys + n0, ys, last);
            else
                tile(x + r * xs, xs, xsum + r * G, mr, w, p, nr, r == 0 ? pfn : 0, b, y + r * ys + n0, ys, last);
        }
    }
}

/* x [M, K] (rows xs apart), y [M, N] (rows ys apart), bias [N] or NULL; amx: int4 in groups of 32k inputs on AMX
 * tiles (gemm_q_amx.h) from AMX_MIN_ROWS rows, where this build and the OS allow them */
void gemm_q(const bf16 *x, int64_t xs, const uint8_t *codes, const f16 *scales, const f16 *offsets, int bits,
            int offset_kind, int64_t group, const bf16 *bias, bf16 *y, int64_t ys, int64_t M, int64_t N, int64_t K,
            int amx, int num_threads) {
    const QWeight w = {N, K, K / group, group, bits, offset_kind, codes, scales, offsets};
    const int64_t G = w.G, num_panels = (N + LANES - 1) / LANES;
    float *xsum = malloc(sizeof(float) * (size_t)(M * G > 0 ? M * G : 1));
    for (int64_t r = 0; r < M; r++)
        for (int64_t g = 0; g < G; g++) {
            float s = 0;
            for (int64_t k = g * group; k < (g + 1) * group; k++) s += bf16_to_f32(x[r * xs + k]);
            xsum[r * G + g] = s;
        }
    float *xf = NULL; /* int8: x in fp32 [M][K] */
    if (bits == 8) {
        xf = malloc(sizeof(float) * (size_t)(M * K > 0 ? M * K : 1));
        for (int64_t r = 0; r < M; r++)
            for (int64_t k = 0; k < K; k++) xf[r * K + k] = bf16_to_f32(x[r * xs + k]);
    }
    const int parallel = num_panels >= 2 && M * N * K >= PARALLEL_MIN_MACS;
    amx = amx && AMX_BUILT && bits == 4 && group % 32 == 0 && M >= AMX_MIN_ROWS && gemm_q_amx_init(); /* else AVX-512 */
    if (amx) __atomic_add_fetch(&amx_calls, 1, __ATOMIC_RELAXED);
#pragma omp parallel num_threads(num_threads) if (parallel)
    {
#ifdef _OPENMP
        extern int omp_get_thread_num(void), omp_get_num_threads(void);
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        const int64_t t = 0, T = 1;
#endif
        const int64_t p0 = num_panels * t / T, p1 = num_panels * (t + 1) / T;
#if AMX_BUILT
        if (amx)
            amx_panels(x, xs, xsum, &w, M, N, p0, p1, bias, y, ys);
        else
#endif
            avx_panels(x, xs, xf, xsum, &w, M, N, p0, p1, bias, y, ys);
    }
    free(xsum);
    free(xf);
}

/* A weight as the decoder stack (decoder_stack.c) passes it to its gemm pointer: gemm_bf16's signature, `w` this. */
typedef struct {
    const uint8_t *codes;
    const f16 *scales, *offsets;
    int64_t bits, offset_kind, group, amx;
} QDesc;

void gemm_q_desc(const bf16 *x, int64_t xs, const QDesc *w, const bf16 *bias, bf16 *y, int64_t ys, int64_t M,
                 int64_t N, int64_t K, int num_threads) {
    gemm_q(x, xs, w->codes, w->scales, w->offsets, (int)w->bits, (int)w->offset_kind, w->group, bias, y, ys, M, N, K,
           (int)w->amx, num_threads);
}
