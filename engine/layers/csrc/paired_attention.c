/* Paged attention over a paired ("VNNI") bfloat16 KV cache, for decode and prefill rows alike. Layouts
 * (engine/layers/attention.py): K blocks [num_blocks, Hkv, hd/2, bs, 2] (two adjacent head dims per token),
 * V blocks [num_blocks, Hkv, bs/2, hd, 2] (two adjacent tokens per head dim), so one 64-byte load is 16 lanes of
 * bf16 pairs, what vdpbf16ps multiplies: q.K runs lanes over tokens, p.V lanes over head dims.
 * Rows come in groups that share one block table (a decode row alone, or up to 16 rows of a prefill chunk); row r
 * attends over cache tokens [0, ctx[r]). One OpenMP task per (group, KV head) shares each K/V tile it loads across
 * the group's rows x G query heads (register blocks of 4 query vectors x 4 tiles) and prefetches the block it reads
 * next. Scores, softmax and sums are fp32; probabilities go to bf16 for p.V. Without avx512_bf16 the same arithmetic
 * runs on GCC vector extensions (any x86-64 or ARM gcc). Built at run time by engine/layers/cpu_decode_kernel.py.
 */
#include <stdlib.h>

#include "bf16_pairs.h"

#define QB 4     /* query vectors per register block */
#define TB 4     /* vectors (16 tokens or 16 head dims each) per register block */

#ifdef __AVX512BF16__
INLINE vp pairs_load(const bf16 *p, int lanes) { return _mm512_maskz_loadu_epi32(MASK(lanes), p); }
INLINE vp pairs_and(vp a, vp m) { return _mm512_and_si512(a, m); }
INLINE vf vf_load(const float *p, int lanes) { return (vf)_mm512_maskz_loadu_ps(MASK(lanes), p); }
INLINE void vf_store(float *p, vf x, int lanes) { _mm512_mask_storeu_ps(p, MASK(lanes), (__m512)x); }
#else
INLINE vp pairs_load(const bf16 *p, int lanes) {
    vp v = {0};
    memcpy(&v, p, (size_t)lanes * 4);
    return v;
}
INLINE vp pairs_and(vp a, vp m) { return a & m; }
INLINE vf vf_load(const float *p, int lanes) {
    vf v = {0};
    memcpy(&v, p, (size_t)lanes * 4);
    return v;
}
INLINE void vf_store(float *p, vf x, int lanes) { memcpy(p, &x, (size_t)lanes * 4); }
#endif

INLINE vf vf_set(float x) { return (vf){0} + x; }
INLINE vf vf_select(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

INLINE vf exp_neg(vf x) { /* e^x for x <= 0 (flushed to e^-87 below): 2^n e^r, |r| <= ln2/2, degree-6 Taylor */
    x = vf_select(x > vf_set(-87.f), x, vf_set(-87.f));
    const vi n = __builtin_convertvector(x * 1.44269504f - 0.5f, vi); /* truncation toward 0: round(x log2 e) */
    const vf nf = __builtin_convertvector(n, vf);
    const vf r = x - nf * 0.693145752f - nf * 1.42860677e-6f;
    vf p = 1.f / 720 + r * (1.f / 5040);
    p = 1.f / 120 + r * p;
    p = 1.f / 24 + r * p;
    p = 1.f / 6 + r * p;
    p = 0.5f + r * p;
    p = 1.f + r * p;
    p = 1.f + r * p;
    return p * (vf)((n + 127) << 23);
}

INLINE void bf16_store16(bf16 *p, vf x) {
    vu u = (vu)x;
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const vh h = __builtin_convertvector(u, vh);
    memcpy(p, &h, sizeof(h));
}

/* Fetch row i (pf_row bytes) of the block the caller reads next, if any, while this one is computed on. */
INLINE void prefetch_row(const char *pf, int64_t i, int64_t pf_row) {
    if (pf)
        for (int64_t b = 0; b < pf_row; b += 64) __builtin_prefetch(pf + i * pf_row + b, 0, 3);
}

/* s_a[16 j + l] = q_a . k_(16 j + l) for nq query vectors and nt tiles of 16 tokens (the last has `lanes`): k points at
 * the first token of pair row 0 of a K block (pair rows 2 bs elements apart), q_a at a query's hd bf16 values. */
INLINE void qk_tile(const bf16 *k, int64_t bs, int64_t half_hd, const bf16 *const *q, int nq, int nt, int lanes,
                    float *s, int64_t ld, const char *pf, int64_t pf_row) {
    vf acc[QB][TB];
    for (int a = 0; a < nq; a++)
        for (int j = 0; j < nt; j++) acc[a][j] = vf_set(0.f);
    for (int64_t i = 0; i < half_hd; i++) {
        const bf16 *kr = k + i * 2 * bs;
        prefetch_row(pf, i, pf_row);
        vp kt[TB];
        for (int j = 0; j < nt; j++) kt[j] = pairs_load(kr + 2 * LANES * j, j == nt - 1 ? lanes : LANES);
        for (int a = 0; a < nq; a++) {
            const vp qa = pair_bcast(q[a] + 2 * i);
            for (int j = 0; j < nt; j++) acc[a][j] = dot2(acc[a][j], kt[j], qa);
        }
    }
    for (int a = 0; a < nq; a++)
        for (int j = 0; j < nt; j++) vf_store(s + a * ld + LANES * j, acc[a][j], j == nt - 1 ? lanes : LANES);
}

/* acc_a[16 j + l] += sum_t p_a[t] v_t[16 j + l] over the first m tokens of a V block: v points at pair row 0 of its
 * dims (pair rows 2 hd elements apart), p_a at a query's bf16 probabilities of the block's tokens (0 past its context).
 * An odd m leaves half of the last pair outside: that half of V is zeroed, never multiplied as garbage. */
INLINE void pv_tile(const bf16 *v, int64_t hd, int64_t m, const bf16 *const *p, int64_t t0, int nq, int nt, int lanes,
                    float *acc, int64_t acc_ld, const char *pf, int64_t pf_row) {
    static const bf16 first_of_pair[2] = {0xFFFF, 0};
    vf o[QB][TB];
    for (int a = 0; a < nq; a++)
        for (int j = 0; j < nt; j++) o[a][j] = vf_load(acc + a * acc_ld + LANES * j, j == nt - 1 ? lanes : LANES);
    for (int64_t t = 0; t < m; t += 2) {
        const bf16 *vr = v + t * hd;
        prefetch_row(pf, t / 2, pf_row);
        vp vt[TB];
        for (int j = 0; j < nt; j++) vt[j] = pairs_load(vr + 2 * LANES * j, j == nt - 1 ? lanes : LANES);
        if (t + 1 == m)
            for (int j = 0; j < nt; j++) vt[j] = pairs_and(vt[j], pair_bcast(first_of_pair));
        for (int a = 0; a < nq; a++) {
            const vp pa = pair_bcast(p[a] + t0 + t);
            for (int j = 0; j < nt; j++) o[a][j] = dot2(o[a][j], vt[j], pa);
        }
    }
    for (int a = 0; a < nq; a++)
        for (int j = 0; j < nt; j++) vf_store(acc + a * acc_ld + LANES * j, o[a][j], j == nt - 1 ? lanes : LANES);
}

/* One specialisation per register-block shape (nq, nt), so the accumulators live in registers. */
typedef void (*qk_fn)(const bf16 *, int64_t, int64_t, const bf16 *const *, int, float *, int64_t, const char *,
                      int64_t);
typedef void (*pv_fn)(const bf16 *, int64_t, int64_t, const bf16 *const *, int64_t, int, float *, int64_t, const char *,
                      int64_t);
#define SHAPES(X) X(1, 1) X(1, 2) X(1, 3) X(1, 4) X(2, 1) X(2, 2) X(2, 3) X(2, 4) \
                  X(3, 1) X(3, 2) X(3, 3) X(3, 4) X(4, 1) X(4, 2) X(4, 3) X(4, 4)
#define DEFINE(NQ, NT)                                                                                           \
    static void qk_##NQ##_##NT(const bf16 *k, int64_t bs, int64_t half_hd, const bf16 *const *q, int lanes,      \
                               float *s, int64_t ld, const char *pf, int64_t pf_row) {                            \
        qk_tile(k, bs, half_hd, q, NQ, NT, lanes, s, ld, pf, pf_row);                                             \
    }                                                                                                            \
    static void pv_##NQ##_##NT(const bf16 *v, int64_t hd, int64_t m, const bf16 *const *p, int64_t t0, int lanes, \
                               float *acc, int64_t acc_ld, const char *pf, int64_t pf_row) {                      \
        pv_tile(v, hd, m, p, t0, NQ, NT, lanes, acc, acc_ld, pf, pf_row);                                         \
    }
SHAPES(DEFINE)
#define QK_ENTRY(NQ, NT) qk_##NQ##_##NT,
#define PV_ENTRY(NQ, NT) pv_##NQ##_##NT,
static const qk_fn QK[QB * TB] = {SHAPES(QK_ENTRY)};
static const pv_fn PV[QB * TB] = {SHAPES(PV_ENTRY)};

/* p[0, ld) = bf16 exp(scale (s - max)) over s[0, ctx), 0 from ctx on; returns the fp32 sum of the exps. */
static float softmax_row(const float *s, bf16 *p, int64_t ctx, int64_t ld, float scale) {
    float m = s[0];
    for (int64_t t = 1; t < ctx; t++) m = s[t] > m ? s[t] : m;
    vf sum = vf_set(0.f);
    vi idx = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    int64_t t = 0;
    for (; t < ctx; t += LANES, idx += LANES) {
        vf x;
        memcpy(&x, s + t, sizeof(x)); /* s has ld >= ctx rounded up to 32 entries; lanes past ctx are masked */
        const vf e = vf_select(idx < (vi){0} + (int32_t)ctx, exp_neg((x - m) * scale), vf_set(0.f));
        sum += e;
        bf16_store16(p + t, e);
    }
    memset(p + t, 0, sizeof(bf16) * (size_t)(ld - t));
    float total = 0.f;
    for (int l = 0; l < LANES; l++) total += sum[l];
    return total;
}

/* Rows [r0, r1) (one block table bt) x query heads of KV head h. */
static void attend(const bf16 *q, int64_t q_stride, const bf16 *kc, const bf16 *vc, const int64_t *bt, int64_t r0,
                   int64_t r1, const int64_t *row_ctx, bf16 *out, int64_t H, int64_t Hkv, int64_t h, int64_t bs,
                   int64_t hd, float scale) {
    const int64_t G = H / Hkv, nq = (r1 - r0) * G, block = bs * hd;
    int64_t ctx_max = 0;
    for (int64_t r = r0; r < r1; r++) ctx_max = row_ctx[r] > ctx_max ? row_ctx[r] : ctx_max;
    const int64_t ld = (ctx_max + 31) & ~(int64_t)31, nchunks = (nq + QB - 1) / QB;
    /* scores [nq, ld] fp32 | acc [nq, hd] fp32 | probs [nq, ld] bf16 | query, prob pointers | chunk ctx | sums */
    char *buf = malloc((size_t)(nq * (ld * 6 + hd * 4 + 2 * sizeof(void *) + 4) + nchunks * 8));
    if (buf == NULL) abort();
    float *s = (float *)buf, *acc = s + nq * ld; /* hd is even and ld a multiple of 32: the pointers stay aligned */
    bf16 *p = (bf16 *)(acc + nq * hd);
    const bf16 **qp = (const bf16 **)(p + nq * ld), **pp = qp + nq;
    int64_t *cmax = (int64_t *)(pp + nq); /* the longest context in each chunk of QB query vectors */
    float *sums = (float *)(cmax + nchunks);
    for (int64_t a = 0; a < nq; a++) {
        const int64_t row = r0 + a / G, ctx = row_ctx[row];
        qp[a] = q + row * q_stride + (h * G + a % G) * hd;
        pp[a] = p + a * ld;
        if (a % QB == 0 || ctx > cmax[a / QB]) cmax[a / QB] = ctx;
    }
    for (int64_t t0 = 0; t0 < ctx_max; t0 += bs) { /* scores */
        const int64_t n = ctx_max - t0 < bs ? ctx_max - t0 : bs;
        const bf16 *kb = kc + (bt[t0 / bs] * Hkv + h) * block; /* then the next K block, or the first V block: */
        const char *pf = (const char *)(t0 + bs < ctx_max ? kc + (bt[t0 / bs + 1] * Hkv + h) * block
                                                          : vc + (bt[0] * Hkv + h) * block);
        for (int64_t tt = 0; tt < n; tt += LANES * TB) {
            const int64_t tokens = n - tt < LANES * TB ? n - tt : LANES * TB, nt = (tokens + LANES - 1) / LANES;
            for (int64_t c = 0; c < nchunks; c++) {
                const int64_t na = nq - c * QB < QB ? nq - c * QB : QB;
                if (cmax[c] <= t0 + tt) continue; /* no query of the chunk sees these tokens */
                QK[(na - 1) * TB + nt - 1](kb + 2 * tt, bs, hd / 2, qp + c * QB, (int)(tokens - (nt - 1) * LANES),
                                           s + c * QB * ld + t0 + tt, ld, pf, 4 * bs);
                pf = NULL; /* the first call fetches it all */
            }
        }
    }
    for (int64_t a = 0; a < nq; a++) sums[a] = softmax_row(s + a * ld, p + a * ld, row_ctx[r0 + a / G], ld, scale);
    memset(acc, 0, sizeof(float) * (size_t)(nq * hd));
    for (int64_t t0 = 0; t0 < ctx_max; t0 += bs) { /* p.V */
        const bf16 *vb = vc + (bt[t0 / bs] * Hkv + h) * block;
        const char *pf = (const char *)(t0 + bs < ctx_max ? vc + (bt[t0 / bs + 1] * Hkv + h) * block
                                                          : h + 1 < Hkv ? kc + (bt[0] * Hkv + h + 1) * block : NULL);
        for (int64_t d0 = 0; d0 < hd; d0 += LANES * TB) {
            const int64_t dims = hd - d0 < LANES * TB ? hd - d0 : LANES * TB, nt = (dims + LANES - 1) / LANES;
            for (int64_t c = 0; c < nchunks; c++) {
                const int64_t na = nq - c * QB < QB ? nq - c * QB : QB, left = cmax[c] - t0;
                if (left <= 0) continue;
                PV[(na - 1) * TB + nt - 1](vb + 2 * d0, hd, left < bs ? left : bs, pp + c * QB, t0,
                                           (int)(dims - (nt - 1) * LANES), acc + c * QB * hd + d0, hd, pf, 4 * hd);
                pf = NULL;
            }
        }
    }
    for (int64_t a = 0; a < nq; a++) {
        bf16 *o = out + ((r0 + a / G) * H + h * G + a % G) * hd;
        const float inv = 1.f / sums[a];
        for (int64_t i = 0; i < hd; i++) o[i] = f32_to_bf16(acc[a * hd + i] * inv);
    }
    free(buf);
}

/* q [N, H, hd] (row stride q_stride), out [N, H, hd] contiguous; group w = rows [group_starts[w], group_starts[w+1])
 * reads block table tables[group_tables[w]] (rows of max_blocks entries); row r attends over tokens [0, row_ctx[r]). */
void paired_attention_bf16(const bf16 *q, int64_t q_stride, const bf16 *kc, const bf16 *vc, const int64_t *tables,
                           int64_t max_blocks, const int64_t *group_starts, const int64_t *group_tables,
                           int64_t num_groups, const int64_t *row_ctx, bf16 *out, int64_t H, int64_t Hkv, int64_t bs,
                           int64_t hd, float scale, int num_threads) {
/* A thread takes the Hkv heads of a group in turn: each one's last V block fetches the next head's first K block. */
#pragma omp parallel for collapse(2) schedule(dynamic, Hkv) num_threads(num_threads)
    for (int64_t w = 0; w < num_groups; w++)
        for (int64_t h = 0; h < Hkv; h++)
            attend(q, q_stride, kc, vc, tables + group_tables[w] * max_blocks, group_starts[w], group_starts[w + 1],
                   row_ctx, out, H, Hkv, h, bs, hd, scale);
}
