/* Every decoder layer of a Llama-family model for one step, in one call: the same compiled kernels, in the same order,
 * as the per-module path (norm, qkv GEMM, rotary, K/V cache write, paired attention, o GEMM, norm, gate_up GEMM,
 * SiLU * up, down GEMM), reached through function pointers into their own libraries, so the results are identical
 * bit for bit while a step costs one Python call instead of ~10 per layer. bf16 only; see cpu_decoder_stack.py. */
#include "bf16_pairs.h" /* bf16, bf16_to_f32, f32_to_bf16 */

typedef void (*gemm_fn)(const bf16 *, int64_t, const bf16 *, const bf16 *, bf16 *, int64_t, int64_t, int64_t, int64_t,
                        int);
typedef void (*norm_fn)(const bf16 *, int64_t, bf16 *, const bf16 *, bf16 *, int64_t, int64_t, float, int, int);
typedef void (*silu_fn)(const bf16 *, bf16 *, int64_t, int64_t, int);
typedef void (*rotary_fn)(bf16 *, int64_t, const int64_t *, const float *, const float *, int64_t, int64_t, int64_t,
                          int);
typedef void (*cache_fn)(const bf16 *, int64_t, const bf16 *, int64_t, const int64_t *, bf16 *, bf16 *, int64_t,
                         int64_t, int64_t, int64_t, int, int);
typedef void (*attn_fn)(const bf16 *, int64_t, const bf16 *, const bf16 *, const int64_t *, int64_t, const int64_t *,
                        const int64_t *, int64_t, const int64_t *, bf16 *, int64_t, int64_t, int64_t, int64_t, float,
                        int);

typedef struct {
    gemm_fn gemm;
    norm_fn norm;
    silu_fn silu;
    rotary_fn rotary;
    cache_fn cache;
    attn_fn attn;
} Kernels;

/* One layer's weights (GEMM weights packed for gemm_bf16; a NULL bias is absent) and its paired K/V cache. */
typedef struct {
    const bf16 *ln1, *ln2, *w_qkv, *b_qkv, *w_o, *b_o, *w_gu, *b_gu, *w_down, *b_down;
    bf16 *kc, *vc;
} Layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter, block_size;
    float eps, scale;
} Shape;

/* The step: T rows; rotary tables [max_position, head_dim]; flat cache slots [T]; the paired kernel's row groups. */
typedef struct {
    int64_t T;
    const int64_t *positions;
    const float *cos, *sin;
    const int64_t *slots;
    const int64_t *tables;
    int64_t max_blocks;
    const int64_t *group_starts, *group_tables;
    int64_t num_groups;
    const int64_t *row_ctx;
} Step;

/* y [T, n] += bias [n] in bf16 (a row-parallel layer's bias, added after its matmul as in linear.py) */
static void add_bias(bf16 *y, const bf16 *bias, int64_t T, int64_t n) {
    for (int64_t r = 0; r < T; r++)
        for (int64_t i = 0; i < n; i++) y[r * n + i] = f32_to_bf16(bf16_to_f32(y[r * n + i]) + bf16_to_f32(bias[i]));
}

/* x [T, hidden]: the embeddings in, then the residual stream (updated in place). out [T, hidden]: the final norm of
 * the last layer's output. Scratch: h [T, hidden], qkv [T, (H + 2 Hkv) hd], attn [T, H hd], gu [T, 2 inter],
 * act [T, inter], y [T, hidden]. */
void decoder_stack(const Kernels *k, const Layer *layers, int64_t num_layers, const Shape *s, const Step *st, bf16 *x,
                   const bf16 *final_norm, bf16 *out, bf16 *h, bf16 *qkv, bf16 *attn, bf16 *gu, bf16 *act, bf16 *y,
                   int threads) {
    const int64_t T = st->T, hid = s->hidden, hd = s->head_dim, H = s->heads, Hkv = s->kv_heads;
    const int64_t q_size = H * hd, kv_size = Hkv * hd, n_qkv = q_size + 2 * kv_size, I = s->inter;
    for (int64_t l = 0; l < num_layers; l++) {
        const Layer *L = layers + l;
        if (l == 0)
            k->norm(x, hid, x, L->ln1, h, T, hid, s->eps, 0, threads); /* the embeddings are the residual */
        else
            k->norm(y, hid, x, L->ln1, h, T, hid, s->eps, 1, threads);
        k->gemm(h, hid, L->w_qkv, L->b_qkv, qkv, n_qkv, T, n_qkv, hid, threads);
        k->rotary(qkv, n_qkv, st->positions, st->cos, st->sin, T, H + Hkv, hd, threads);
        k->cache(qkv + q_size, n_qkv, qkv + q_size + kv_size, n_qkv, st->slots, L->kc, L->vc, T, Hkv, hd,
                 s->block_size, 1, threads);
        k->attn(qkv, n_qkv, L->kc, L->vc, st->tables, st->max_blocks, st->group_starts, st->group_tables,
                st->num_groups, st->row_ctx, attn, H, Hkv, s->block_size, hd, s->scale, threads);
        k->gemm(attn, q_size, L->w_o, NULL, y, hid, T, hid, q_size, threads);
        if (L->b_o) add_bias(y, L->b_o, T, hid);
        k->norm(y, hid, x, L->ln2, h, T, hid, s->eps, 1, threads);
        k->gemm(h, hid, L->w_gu, L->b_gu, gu, 2 * I, T, 2 * I, hid, threads);
        k->silu(gu, act, T, I, threads);
        k->gemm(act, I, L->w_down, NULL, y, hid, T, hid, I, threads);
        if (L->b_down) add_bias(y, L->b_down, T, hid);
    }
    k->norm(y, hid, x, final_norm, out, T, hid, s->eps, 1, threads);
}
