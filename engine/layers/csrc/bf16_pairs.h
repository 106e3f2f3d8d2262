/* What the bf16 kernels (gemm_bf16.c, paired_attention.c, fused_ops.c, decoder_stack.c) share: the scalar bf16 <->
 * float32 conversions (rounding as torch does), 16-lane vector types, and a vector of 16 bf16 pairs (vp) with dot2,
 * the pairwise multiply-add vdpbf16ps does (acc += a.lo * b.lo + a.hi * b.hi per fp32 lane). With avx512_bf16 these
 * are the intrinsics; elsewhere GCC vector extensions compute the same thing (any x86-64 or ARM gcc), and each
 * kernel's portable build is tested against its native one. */
#ifndef BF16_PAIRS_H
#define BF16_PAIRS_H

#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;
#define LANES 16 /* fp32 lanes (bf16 pairs) per vector */

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
#define INLINE static inline __attribute__((always_inline))

INLINE float bf16_to_f32(bf16 h) { /* exact */
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

INLINE bf16 f32_to_bf16(float f) { /* round to nearest even, as torch does; a NaN stays a NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (bf16)((u >> 16) | 0x40);
    return (bf16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#ifdef __AVX512BF16__
#include <immintrin.h>
typedef __m512i vp; /* 16 lanes of bf16 pairs */
#define MASK(lanes) ((__mmask16)((1u << (lanes)) - 1u))
INLINE vf dot2(vf acc, vp a, vp b) { return (vf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b); }
#else
#pragma GCC diagnostic ignored "-Wpsabi" /* 64-byte vectors in registers of any width: inlined, no ABI crossed */
typedef vu vp;
INLINE vf dot2(vf acc, vp a, vp b) { /* low halves hold one element of each pair, high halves the other */
    return acc + (vf)(a << 16) * (vf)(b << 16) + (vf)(a & 0xFFFF0000u) * (vf)(b & 0xFFFF0000u);
}
#endif

INLINE vp pair_splat(uint32_t u) { return (vp)((vu){0} + u); } /* one bf16 pair (low half: the first) in every lane */

INLINE vp pair_bcast(const bf16 *p) { /* the bf16 pair p[0], p[1] in every lane */
    uint32_t u;
    memcpy(&u, p, 4);
    return pair_splat(u);
}

#endif
