/* Paged decode attention for the CPU: one query token per sequence attends over its cached K/V, read in place
 * through the block table (no gather copy). Layouts (engine/layers/attention.py): K blocks [num_blocks, Hkv, hd, bs]
 * (transposed, so q.K runs across tokens with no horizontal sums), V blocks [num_blocks, Hkv, bs, hd]; q [D, H, hd]
 * with row stride q_stride; out [D, H, hd] contiguous. One OpenMP task per (sequence, KV head), fp32 accumulation in
 * 16-lane tiles the compiler keeps in vector registers. Built at run time by engine/layers/cpu_decode_kernel.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 16 /* floats per vector register (GCC vector extensions: AVX-512 here, narrower elsewhere) */

typedef float vfloat __attribute__((vector_size(TILE * 4)));
typedef uint32_t vuint __attribute__((vector_size(TILE * 4)));
typedef uint16_t vhalf __attribute__((vector_size(TILE * 2)));

static inline float bf16_load(uint16_t x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}

static inline vfloat bf16_load_tile(const uint16_t *p) {
    vhalf h;
    memcpy(&h, p, sizeof(h));
    vuint u = __builtin_convertvector(h, vuint) << 16;
    vfloat f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

static inline uint16_t bf16_store(float f) { /* round to nearest even, as torch does (finite values) */
    union { uint32_t u; float f; } v;
    v.f = f;
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

static inline float f32_load(float x) { return x; }
static inline float f32_store(float f) { return f; }

static inline vfloat f32_load_tile(const float *p) {
    vfloat f;
    memcpy(&f, p, sizeof(f));
    return f;
}

#define DEFINE_KERNEL(NAME, T, LOAD, LOAD_TILE, STORE)                                                                  \
/* s[t] = q . k_t for the n (<= bs) tokens of one K block kb [hd, bs] */                                      \
static void NAME##_scores(const float *restrict qg, const T *restrict kb, float *restrict s, int64_t n,       \
                          int64_t bs, int64_t hd) {                                                           \
    int64_t t0 = 0;                                                                                           \
    for (; t0 + 4 * TILE <= n; t0 += 4 * TILE) { /* four independent FMA chains hide the latency */          \
        vfloat a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                                        \
        for (int64_t i = 0; i < hd; i++) {                                                                    \
            const T *kr = kb + i * bs + t0;                                                                   \
            const float q = qg[i];                                                                            \
            a0 += q * LOAD_TILE(kr);                                                                          \
            a1 += q * LOAD_TILE(kr + TILE);                                                                   \
            a2 += q * LOAD_TILE(kr + 2 * TILE);                                                               \
            a3 += q * LOAD_TILE(kr + 3 * TILE);                                                               \
        }                                                                                                     \
        memcpy(s + t0, &a0, sizeof(a0));                                                                      \
        memcpy(s + t0 + TILE, &a1, sizeof(a1));                                                               \
        memcpy(s + t0 + 2 * TILE, &a2, sizeof(a2));                                                           \
        memcpy(s + t0 + 3 * TILE, &a3, sizeof(a3));                                                           \
    }                                                                                                         \
    for (; t0 + TILE <= n; t0 += TILE) {                                                                      \
        vfloat acc = {0};                                                                                     \
        for (int64_t i = 0; i < hd; i++) acc += qg[i] * LOAD_TILE(kb + i * bs + t0);                         \
        memcpy(s + t0, &acc, sizeof(acc));                                                                    \
    }                                                                                                         \
    for (int64_t t = t0; t < n; t++) {                                                                        \
        float acc = 0.f;                                                                                      \
        for (int64_t i = 0; i < hd; i++) acc += qg[i] * LOAD(kb[i * bs + t]);                                 \
        s[t] = acc;                                                                                           \
    }                                                                                                         \
}                                                                                                             \
                                                                                                              \
/* ag[:hd] += sum_t p[t] v_t over the n tokens of one V block vb [bs, hd] */                                  \
static void NAME##_values(const float *restrict p, const T *restrict vb, float *restrict ag, int64_t n,       \
                          int64_t hd) {                                                                       \
    int64_t i0 = 0;                                                                                           \
    for (; i0 + 4 * TILE <= hd; i0 += 4 * TILE) {                                                             \
        vfloat a0 = f32_load_tile(ag + i0), a1 = f32_load_tile(ag + i0 + TILE);                               \
        vfloat a2 = f32_load_tile(ag + i0 + 2 * TILE), a3 = f32_load_tile(ag + i0 + 3 * TILE);                \
        for (int64_t t = 0; t < n; t++) {                                                                     \
            const T *vr = vb + t * hd + i0;                                                                   \
            const float w = p[t];                                                                             \
            a0 += w * LOAD_TILE(vr);                                                                          \
            a1 += w * LOAD_TILE(vr + TILE);                                                                   \
            a2 += w * LOAD_TILE(vr + 2 * TILE);                                                               \
            a3 += w * LOAD_TILE(vr + 3 * TILE);                                                               \
        }                                                                                                     \
        memcpy(ag + i0, &a0, sizeof(a0));                                                                     \
        memcpy(ag + i0 + TILE, &a1, sizeof(a1));                                                              \
        memcpy(ag + i0 + 2 * TILE, &a2, sizeof(a2));                                                          \
        memcpy(ag + i0 + 3 * TILE, &a3, sizeof(a3));                                                          \
    }                                                                                                         \
    for (; i0 + TILE <= hd; i0 += TILE) {                                                                     \
        vfloat acc = f32_load_tile(ag + i0);                                                                  \
        for (int64_t t = 0; t < n; t++) acc += p[t] * LOAD_TILE(vb + t * hd + i0);                            \
        memcpy(ag + i0, &acc, sizeof(acc));                                                                   \
    }                                                                                                         \
    for (int64_t i = i0; i < hd; i++)                                                                         \
        for (int64_t t = 0; t < n; t++) ag[i] += p[t] * LOAD(vb[t * hd + i]);                                 \
}                                                                                                             \
                                                                                                              \
void NAME(const T *q, int64_t q_stride, const T *kc, const T *vc, const int64_t *block_tables,                \
          const int64_t *ctx_lens, T *out, int64_t num_seqs, int64_t max_blocks, int64_t num_heads,          \
          int64_t num_kv_heads, int64_t bs, int64_t hd, float scale, int num_threads) {                      \
    const int64_t G = num_heads / num_kv_heads, block_elems = bs * hd;                                        \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)")                     \
    for (int64_t d = 0; d < num_seqs; d++) {                                                                  \
        for (int64_t h = 0; h < num_kv_heads; h++) {                                                          \
            const int64_t ctx = ctx_lens[d];                                                                  \
            const int64_t *bt = block_tables + d * max_blocks;                                                \
            float *qf = malloc(sizeof(float) * (size_t)(2 * G * hd + G * ctx));                               \
            float *acc = qf + G * hd, *scores = acc + G * hd;                                                 \
            for (int64_t g = 0; g < G; g++) {                                                                 \
                const T *qr = q + d * q_stride + (h * G + g) * hd;                                            \
                for (int64_t i = 0; i < hd; i++) qf[g * hd + i] = LOAD(qr[i]) * scale;                       \
            }                                                                                                 \
            for (int64_t t0 = 0; t0 < ctx; t0 += bs) {                                                        \
                const int64_t n = ctx - t0 < bs ? ctx - t0 : bs;                                              \
                const T *kb = kc + (bt[t0 / bs] * num_kv_heads + h) * block_elems;                            \
                for (int64_t g = 0; g < G; g++) NAME##_scores(qf + g * hd, kb, scores + g * ctx + t0, n, bs, hd); \
            }                                                                                                 \
            float inv[G];                                                                                     \
            for (int64_t g = 0; g < G; g++) { /* softmax over t; 1/sum is applied at the end */               \
                float *sg = scores + g * ctx, m = sg[0], sum = 0.f;                                           \
                for (int64_t t = 1; t < ctx; t++) m = sg[t] > m ? sg[t] : m;                                  \
                for (int64_t t = 0; t < ctx; t++) { sg[t] = expf(sg[t] - m); sum += sg[t]; }                  \
                inv[g] = 1.f / sum;                                                                           \
            }                                                                                                 \
            memset(acc, 0, sizeof(float) * (size_t)(G * hd));                                                 \
            for (int64_t t0 = 0; t0 < ctx; t0 += bs) {                                                        \
                const int64_t n = ctx - t0 < bs ? ctx - t0 : bs;                                              \
                const T *vb = vc + (bt[t0 / bs] * num_kv_heads + h) * block_elems;                            \
                for (int64_t g = 0; g < G; g++) NAME##_values(scores + g * ctx + t0, vb, acc + g * hd, n, hd); \
            }                                                                                                 \
            for (int64_t g = 0; g < G; g++) {                                                                 \
                T *og = out + (d * num_heads + h * G + g) * hd;                                               \
                for (int64_t i = 0; i < hd; i++) og[i] = STORE(acc[g * hd + i] * inv[g]);                    \
            }                                                                                                 \
            free(qf);                                                                                         \
        }                                                                                                     \
    }                                                                                                         \
}

DEFINE_KERNEL(paged_decode_bf16, uint16_t, bf16_load, bf16_load_tile, bf16_store)
DEFINE_KERNEL(paged_decode_f32, float, f32_load, f32_load_tile, f32_store)
