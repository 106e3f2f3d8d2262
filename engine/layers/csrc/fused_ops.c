/* Fused element-wise chains of the decoder layer for the CPU, each one pass over memory instead of 5-10 torch
 * ops (a decode step of 32 tokens runs ~35 small ops per layer, each costing more in dispatch than in work):
 * residual add + RMSNorm, SiLU(gate) * up, rotary embedding in place, the K/V cache write, and the greedy argmax
 * with the log-softmax of the pick.
 * 16-bit variants round where torch rounds (after each op that torch runs in bf16), so they match the torch twins
 * to float rounding. Rows are split across OpenMP threads only when the work pays for the fork.
 * Built at run time by engine/layers/cpu_build.py; wrapped by engine/layers/cpu_fused_ops.py.
 */
#include <math.h>

#include "bf16_pairs.h"

/* Below these element counts one thread runs: an OpenMP fork costs a few microseconds. SiLU (an exp and a divide
 * per element) pays for the fork sooner than the norm or the rotation. */
#define PARALLEL_MIN_ELEMS 65536
#define PARALLEL_MIN_ELEMS_SILU 16384

static inline float bf16_round(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* exp(x) for |x| < 87 as 2^n * e^r, |r| <= ln2/2, degree-6 Taylor polynomial (relative error ~2e-7, below bf16
 * rounding and close to float rounding); plain arithmetic, so GCC vectorises loops over it (glibc's libmvec expf is
 * slower than torch's own vectorised exp). Inputs below -87 give 0 (as expf's underflow). */
static inline float fast_expf(float x) {
    x = x < -87.f ? -87.f : (x > 87.f ? 87.f : x);
    const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f; /* ln2 split: hi + lo */
    float p = 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    union { uint32_t u; float f; } scale;
    scale.u = (uint32_t)((int32_t)n + 127) << 23;
    return x <= -87.f ? 0.f : p * scale.f;
}

static inline float f32_to_f32(float x) { return x; }

/* -inf by its bits: built with -ffinite-math-only, a comparison with -INFINITY may be folded away. */
static inline int is_neg_inf(float x) {
    uint32_t u;
    __builtin_memcpy(&u, &x, sizeof(u));
    return u == 0xFF800000u;
}
static inline float f32_round(float x) { return x; }

#define DEFINE_OPS(SUFFIX, T, LOAD, STORE, ROUND)                                                                  \
/* residual [rows, n] += x (when has_residual), out = weight * norm(residual); x/out rows may be strided */      \
void add_rms_norm_##SUFFIX(const T *x, int64_t x_stride, T *residual, const T *weight, T *out, int64_t rows,     \
                           int64_t n, float eps, int has_residual, int num_threads) {                          \
    _Pragma("omp parallel for schedule(static) num_threads(num_threads) if (rows * n >= PARALLEL_MIN_ELEMS)")   \
    for (int64_t r = 0; r < rows; r++) {                                                                        \
        const T *xr = x + r * x_stride;                                                                         \
        T *res = residual + r * n, *o = out + r * n;                                                            \
        float sq = 0.f;                                                                                         \
        if (has_residual) {                                                                                     \
            for (int64_t i = 0; i < n; i++) {                                                                   \
                const float s = ROUND(LOAD(xr[i]) + LOAD(res[i]));                                              \
                res[i] = STORE(s);                                                                              \
                sq += s * s;                                                                                    \
            }                                                                                                   \
        } else {                                                                                                \
            for (int64_t i = 0; i < n; i++) sq += LOAD(xr[i]) * LOAD(xr[i]);                                    \
            res = (T *)xr;                                                                                      \
        }                                                                                                       \
        const float inv = 1.f / sqrtf(sq / (float)n + eps);                                                     \
        for (int64_t i = 0; i < n; i++) o[i] = STORE(LOAD(weight[i]) * ROUND(LOAD(res[i]) * inv));              \
    }                                                                                                           \
}                                                                                                               \
                                                                                                                \
/* out [rows, n] = silu(x[:, :n]) * x[:, n:] for x [rows, 2n] */                                                \
void silu_and_mul_##SUFFIX(const T *x, T *out, int64_t rows, int64_t n, int num_threads) {                     \
    _Pragma("omp parallel for schedule(static) num_threads(num_threads) if (rows * n >= PARALLEL_MIN_ELEMS_SILU)") \
    for (int64_t r = 0; r < rows; r++) {                                                                        \
        const T *gate = x + r * 2 * n, *up = gate + n;                                                          \
        T *o = out + r * n;                                                                                     \
        for (int64_t i = 0; i < n; i++) {                                                                       \
            const float g = LOAD(gate[i]);                                                                      \
            o[i] = STORE(ROUND(g / (1.f + fast_expf(-g))) * LOAD(up[i]));                                            \
        }                                                                                                       \
    }                                                                                                           \
}                                                                                                               \
                                                                                                                \
/* Rotate the first `heads` heads [hd] of each row of x (row stride x_stride) in place by the float32 tables      \
 * cos/sin [max_position, hd] at positions[r]; sin has its first half negated, so out = x * cos + roll(x, hd/2) \
 * * sin == x * cos + rotate_half(x) * sin_unsigned. Tables are rounded to T first, as the torch path casts them. */ \
void rotary_##SUFFIX(T *x, int64_t x_stride, const int64_t *positions, const float *cos_table,                 \
                     const float *sin_table, int64_t rows, int64_t heads, int64_t hd, int num_threads) {        \
    const int64_t half = hd / 2;                                                                                \
    _Pragma("omp parallel for schedule(static) num_threads(num_threads) if (rows * heads * hd >= PARALLEL_MIN_ELEMS)") \
    for (int64_t r = 0; r < rows; r++) {                                                                        \
        const float *c = cos_table + positions[r] * hd, *s = sin_table + positions[r] * hd;                    \
        float cr[hd], sr[hd];                                                                                   \
        for (int64_t i = 0; i < hd; i++) {                                                                      \
            cr[i] = ROUND(c[i]);                                                                                \
            sr[i] = ROUND(s[i]);                                                                                \
        }                                                                                                       \
        for (int64_t h = 0; h < heads; h++) {                                                                   \
            T *xh = x + r * x_stride + h * hd;                                                                  \
            for (int64_t i = 0; i < half; i++) {                                                                \
                const float x1 = LOAD(xh[i]), x2 = LOAD(xh[i + half]);                                          \
                xh[i] = STORE(ROUND(x1 * cr[i]) + x2 * sr[i]);                                                  \
                xh[i + half] = STORE(ROUND(x2 * cr[i + half]) + x1 * sr[i + half]);                            \
            }                                                                                                   \
        }                                                                                                       \
    }                                                                                                           \
}

/* Store the step's K/V rows [rows, Hkv, hd] (row strides k_stride / v_stride) into the paged cache at flat slots
 * (block * bs + offset). Plain layout: K [blocks, Hkv, hd, bs], V [blocks, Hkv, bs, hd]. Paired layout: K
 * [blocks, Hkv, hd/2, bs, 2], V [blocks, Hkv, bs/2, hd, 2] (see engine/layers/attention.py). */
#define DEFINE_CACHE_WRITE(SUFFIX, T)                                                                             \
void cache_kv_##SUFFIX(const T *k, int64_t k_stride, const T *v, int64_t v_stride, const int64_t *slots, T *kc,  \
                       T *vc, int64_t rows, int64_t hkv, int64_t hd, int64_t bs, int paired, int num_threads) {  \
    /* Slots are distinct, so rows never write the same element. Each (token, head) misses the cache on its lines \
     * (a write allocates them): two threads keep twice the misses in flight, worth a fork from a few rows on. */ \
    _Pragma("omp parallel for schedule(static) num_threads(num_threads) if (rows * hkv >= 16)")                 \
    for (int64_t r = 0; r < rows; r++) {                                                                        \
        const int64_t b = slots[r] / bs, t = slots[r] % bs;                                                     \
        for (int64_t h = 0; h < hkv; h++) {                                                                     \
            const T *kr = k + r * k_stride + h * hd, *vr = v + r * v_stride + h * hd;                          \
            const int64_t base = (b * hkv + h) * hd * bs; /* both layouts: one head's block holds hd * bs */    \
            if (paired) {                                                                                       \
                for (int64_t i = 0; i < hd; i++) kc[base + ((i / 2) * bs + t) * 2 + i % 2] = kr[i];            \
                for (int64_t i = 0; i < hd; i++) vc[base + ((t / 2) * hd + i) * 2 + t % 2] = vr[i];            \
            } else {                                                                                            \
                for (int64_t i = 0; i < hd; i++) kc[base + i * bs + t] = kr[i];                                 \
                for (int64_t i = 0; i < hd; i++) vc[base + t * hd + i] = vr[i];                                 \
            }                                                                                                   \
        }                                                                                                       \
    }                                                                                                           \
}

DEFINE_CACHE_WRITE(bf16, uint16_t)
DEFINE_CACHE_WRITE(f32, float)
DEFINE_OPS(bf16, uint16_t, bf16_to_f32, f32_to_bf16, bf16_round)
DEFINE_OPS(f32, float, f32_to_f32, f32_to_f32, f32_round)

static inline vf load16_f32(const float *p) {
    vf v;
    __builtin_memcpy(&v, p, sizeof(v));
    return v;
}

static inline vf load16_bf16(const uint16_t *p) { /* 16 bf16 -> 16 floats, exactly (the loop vectorises) */
    uint32_t bits[16];
    for (int j = 0; j < 16; j++) bits[j] = (uint32_t)p[j] << 16;
    vf v;
    __builtin_memcpy(&v, bits, sizeof(v));
    return v;
}

/* Greedy pick per row of logits [rows, n] (row stride `stride`; float32 or bf16, read as float32): the first index
 * of the maximum, and its log-softmax (max - logsumexp), in two vectorised passes per row instead of log_softmax +
 * max over the whole matrix. Each of 16 lanes keeps its own first maximum; the lowest index among the lanes' maxima
 * wins. Grammar rows (mask_rows[r] >= 0; masks may be NULL when no row has one) pick among the ids their bitmask
 * allows, masks[mask_rows[r]] of `words` int32 (bit j of word k allows id 32 k + j; ids past 32 words are not
 * allowed), walking the set bits only; the logprob stays the model's own (x[pick] - logsumexp). As torch's argmax of
 * the masked row (the twin): when no allowed id has a logit above -inf, the pick is id 0. */
#define DEFINE_GREEDY(SUFFIX, T, LOAD)                                                                          \
void greedy_##SUFFIX(const T *logits, int64_t stride, int64_t rows, int64_t n, const int32_t *masks,            \
                     const int64_t *mask_rows, int64_t words, int64_t *ids, float *logprobs, int num_threads) { \
    _Pragma("omp parallel for schedule(static) num_threads(num_threads) if (rows * n >= PARALLEL_MIN_ELEMS)")   \
    for (int64_t r = 0; r < rows; r++) {                                                                        \
        const T *row = logits + r * stride;                                                                     \
        float m = -INFINITY;                                                                                    \
        int64_t best = 0, i0 = 0;                                                                               \
        if (n >= 16) {                                                                                          \
            vf vbest = load16_##SUFFIX(row);                                                                    \
            vi vidx = {0}, lane;                                                                                \
            for (int j = 0; j < 16; j++) lane[j] = j, vidx[j] = j;                                              \
            for (i0 = 16; i0 + 16 <= n; i0 += 16) {                                                             \
                const vf v = load16_##SUFFIX(row + i0);                                                         \
                const vi better = v > vbest; /* all ones where strictly greater: each lane's first max */       \
                vidx = (vidx & ~better) | ((lane + (int32_t)i0) & better);                                      \
                vi vb, vv;                                                                                      \
                __builtin_memcpy(&vb, &vbest, sizeof(vb));                                                      \
                __builtin_memcpy(&vv, &v, sizeof(vv));                                                          \
                vb = (vb & ~better) | (vv & better);                                                            \
                __builtin_memcpy(&vbest, &vb, sizeof(vb));                                                      \
            }                                                                                                   \
            for (int j = 0; j < 16; j++)                                                                        \
                if (vbest[j] > m || (vbest[j] == m && vidx[j] < best)) m = vbest[j], best = vidx[j];            \
        }                                                                                                       \
        for (int64_t i = i0; i < n; i++)                                                                        \
            if (LOAD(row[i]) > m) m = LOAD(row[i]), best = i;                                                   \
        float pick = m; /* the chosen id's logit: the maximum, or the best allowed one */                     \
        if (masks != NULL && mask_rows[r] >= 0) {                                                               \
            const uint32_t *bits = (const uint32_t *)(masks + mask_rows[r] * words);                            \
            int64_t found = -1;                                                                                 \
            for (int64_t k = 0; k < words && 32 * k < n; k++) {                                                 \
                for (uint32_t w = bits[k]; w != 0; w &= w - 1) {                                                \
                    const int64_t i = 32 * k + __builtin_ctz(w);                                                \
                    if (i >= n) break;                                                                          \
                    const float x = LOAD(row[i]);                                                               \
                    if (found < 0 || x > pick) found = i, pick = x;                                             \
                }                                                                                               \
            }                                                                                                   \
            if (found < 0 || is_neg_inf(pick)) found = 0, pick = LOAD(row[0]);                                  \
            best = found;                                                                                       \
        }                                                                                                       \
        float sum = 0.f;                                                                                        \
        for (int64_t i = 0; i < n; i++) sum += fast_expf(LOAD(row[i]) - m);                                     \
        ids[r] = best;                                                                                          \
        logprobs[r] = (pick - m) - logf(sum);                                                                   \
    }                                                                                                           \
}

DEFINE_GREEDY(f32, float, f32_to_f32)
DEFINE_GREEDY(bf16, uint16_t, bf16_to_f32)
