/* Weight-only int4 and int8 matmuls on CPU: y[M, N] = x[M, K] @ W.T, in one call. Compiled on
 * first use by lora_kernel.py (plain C with OpenMP and x86 intrinsics where the compiler targets
 * them; no Python or torch headers; called through ctypes).
 *
 * Weights, per output row n and group g of 32 inputs (k = 32 g + j):
 *     W[n, k] = d[n, g] * q[n, k] + m[n, g]          q in 0..15; d, m fp16 (GGUF Q4_1's own scheme)
 * stored in tiles of 16 output rows, one 320-byte block per (tile t, group g), blocks [N/16, K/32]:
 *     bytes 64 c + 4 i + b (c < 4, i < 16, b < 4): q[16 t + i, 32 g + 4 c + b] in the low nibble,
 *                                                  q[16 t + i, 32 g + 4 (c + 4) + b] in the high one
 *     bytes 256 + 2 i: d[16 t + i, g], 288 + 2 i: m[16 t + i, g]
 * so that one 64-byte load holds, for 16 output rows at once, 4 consecutive weights of each in a
 * 32-bit lane (twice: low and high nibbles), the layout of a dot-product instruction whose other
 * operand is 4 activation bytes broadcast to every lane; its sums land one output row per lane, and
 * the scales apply to 16 rows with one vector op (no horizontal sums).
 * int8 weights, one scale per row and group (W[n, k] = d[n, g] * q[n, k], q in -127..127: GGUF's
 * Q8_0), are tiled the same way: per (tile, group) 544 bytes, byte 64 c + 4 i + b (c < 8) =
 * q[16 t + i, 32 g + 4 c + b], then bytes 512 + 2 i: d[16 t + i, g] fp16.
 * Activations are quantized per call, per row and group, to int8 (as llama.cpp does for Q4_1 x Q8_1):
 *     x[k] ~= e[g] * p[k],  e = max|x| / 127,  p = round(x / e),  s[g] = e[g] * sum_j p
 * (s from the rounded p, not the exact x: the rounding errors then meet W itself, not W - m, which
 * is ~2.7x larger for a Q4_1 block; measured 0.6% vs 1.2% relative error in y) and then
 *     y[n] = sum_g d[n, g] * e[g] * (sum_j q p)  +  sum_g m[n, g] * s[g]
 * The integer dot products run 64 (AVX-512 VNNI), or 32 (AVX-VNNI, AVX2) products an instruction.
 *
 * Why hand-written: a single decode stream reads every weight once per token, so its speed is the
 * bytes read. PyTorch's packed CPU kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`)
 * convert the weights to floating point and want bf16 activations. Measured on a 2-core AVX-512
 * Xeon without bf16, one thread: a 576 x 576 int4 projection 42 us there (4 GB/s) against 11.6 us
 * here; a 300-token prompt through gate|up 17.3 ms against 3.6 ms (MKL's fp32 matmul: 6.3 ms);
 * SmolLM2's int8 output head in a decode step 4.3 ms against 1.4 ms. Which instructions are used
 * is decided when the library is built (-march=native on the machine that runs it), never
 * hard-coded: the same source builds the AVX-512 VNNI, AVX-VNNI, AVX2 or plain C path, and
 * tests/test_quant.py checks each against a naive reference.
 *
 * Not here: LoRA (lora_cpu.c adds it on top), CUDA.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define QK 32
#define TILE 16   /* output rows per tile */
#define BLOCK 320 /* int4: bytes per (tile, group): 256 of nibbles, 32 of d, 32 of m */
#define BLOCK8 544 /* int8: bytes per (tile, group): 512 of weights, 32 of d */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define PATH_AVX512 1
#define PATH_NAME "avx512-vnni"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PATH_AVX2 1
#if defined(__AVXVNNI__)
#define PATH_NAME "avx-vnni"
#else
#define PATH_NAME "avx2"
#endif
#else
#define PATH_NAME "c"
#endif
/* Rows of x per pass over a tile: their accumulators and the tile's weights fit the registers (32
 * on AVX-512, 16 on AVX2). 8 rows in one pass against two of 4: 1.08x (int4 gate|up) to 1.2x (int8
 * output head) at 8 rows on AVX-512. */
#if PATH_AVX512
#define RB 8
#else
#define RB 4
#endif
/* The next tile's weights are prefetched while a tile's first rows compute: the hardware prefetcher
 * alone left one row's gate|up (1 MB int4) at 73 us, prefetched 51 us (~19 GB/s); 8 rows 176 -> 129 us. */
#define PREFETCH(p, bytes)                                                                                  \
    do {                                                                                                   \
        if (p)                                                                                             \
            for (int l_ = 0; l_ < (bytes); l_ += 64) __builtin_prefetch((p) + l_, 0, 3);                   \
    } while (0)

const char *q_path(void) { return PATH_NAME; }

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    float f;
    if (exp == 0) { /* zero or subnormal: man * 2^-24 */
        f = (float)man * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* Quantized activations of M rows: p [M, K] int8, e and s [M, K/32]. */
struct acts {
    int8_t *p;
    float *e, *s;
    int32_t *off; /* [M, K/32]: 128 * sum_j p, int8's offset (see tile_rows8) */
};

#if PATH_AVX512
/* 16 fp32 -> 16 bf16, rounded to nearest even as f32_to_bf16 (NaN stays NaN), in one pass */
static inline void store_bf16_16(uint16_t *dst, const float *src) {
    const __m512i b = _mm512_castps_si512(_mm512_loadu_ps(src));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i h = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan =
        _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    h = _mm512_mask_mov_epi32(h, nan, _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(h));
}

/* one group of 32 activations: the reference below, 16 lanes at a time (at 8 rows the reference was
 * ~30 us of a 576 x 1,536 int4 matmul's 85) */
static inline void quantize_group(const void *x, int act_bf16, int64_t k0, int8_t *p, float *e_out, float *s_out,
                                  int32_t *off_out) {
    __m512 v[2];
    for (int h = 0; h < 2; h++) {
        if (act_bf16) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + k0 + 16 * h));
            v[h] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        } else {
            v[h] = _mm512_loadu_ps((const float *)x + k0 + 16 * h);
        }
    }
    /* max over |v|, NaN skipped (as the plain loop's compare): a NaN lane loses every max */
    const __m512 abs0 = _mm512_abs_ps(v[0]), abs1 = _mm512_abs_ps(v[1]);
    const __m512 m0 = _mm512_mask_mov_ps(_mm512_setzero_ps(), _mm512_cmp_ps_mask(abs0, abs0, _CMP_ORD_Q), abs0);
    const __m512 m1 = _mm512_mask_mov_ps(_mm512_setzero_ps(), _mm512_cmp_ps_mask(abs1, abs1, _CMP_ORD_Q), abs1);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
    const float e = amax / 127.f, inv = e > 0.f ? 1.f / e : 0.f;
    const __m512 vi = _mm512_set1_ps(inv);
    /* round to nearest even (the MXCSR default, as nearbyintf), then saturate to int8 */
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v[0], vi)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v[1], vi));
    _mm_storeu_si128((__m128i *)p, _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128((__m128i *)(p + 16), _mm512_cvtsepi32_epi8(q1));
    /* the sum of the stored (saturated) values, as the plain loop sums what it stores */
    const int32_t isum = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)),
                                                                  _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16)))));
    *e_out = e;
    *s_out = e * (float)isum;
    *off_out = 128 * isum;
}
#else
/* the reference (and the AVX2 and plain C paths, which the compiler vectorises) */
static inline void quantize_group(const void *x, int act_bf16, int64_t k0, int8_t *p, float *e_out, float *s_out,
                                  int32_t *off_out) {
    float buf[QK];
    if (act_bf16)
        for (int j = 0; j < QK; j++) buf[j] = bf16_to_f32(((const uint16_t *)x)[k0 + j]);
    else
        memcpy(buf, (const float *)x + k0, sizeof buf);
    /* a compare, not fmaxf: fmaxf's NaN rule kept it a libm call per element (5% of an int4 decode
     * step); both skip a NaN */
    float amax = 0.f;
    for (int j = 0; j < QK; j++) {
        const float v = fabsf(buf[j]);
        amax = v > amax ? v : amax;
    }
    const float e = amax / 127.f, inv = e > 0.f ? 1.f / e : 0.f;
    int32_t isum = 0;
    for (int j = 0; j < QK; j++) {
        p[j] = (int8_t)nearbyintf(buf[j] * inv);
        isum += p[j];
    }
    *e_out = e;
    *s_out = e * (float)isum;
    *off_out = 128 * isum;
}
#endif

static void quantize_rows(const void *x, int act_bf16, int64_t r0, int64_t r1, int64_t K, struct acts a) {
    const int64_t G = K / QK;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t k0 = r * K + g * QK, at = r * G + g;
            quantize_group(x, act_bf16, k0, a.p + k0, a.e + at, a.s + at, a.off + at);
        }
}

static inline int32_t four(const int8_t *p) { /* 4 activation bytes as one 32-bit lane */
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* out[r][0..16) = y[r0 + r, 16 t .. 16 t + 16) for rb <= RB rows (a literal at every call, so that
 * the accumulators stay in registers); pf: the next tile's blocks to prefetch, or NULL. */
static inline __attribute__((always_inline)) void tile_rows(const uint8_t *blk, int64_t G, struct acts a, int64_t K,
                                                            int64_t r0, const int rb, float out[RB][TILE],
                                                            const uint8_t *pf) {
#if PATH_AVX512
    __m512 acc[RB], macc[RB];
    for (int r = 0; r < rb; r++) acc[r] = macc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0f);
    for (int64_t g = 0; g < G; g++, blk += BLOCK) {
        PREFETCH(pf ? pf + g * BLOCK : NULL, BLOCK);
        __m512i wl[4], wh[4];
        for (int c = 0; c < 4; c++) {
            const __m512i v = _mm512_loadu_si512((const void *)(blk + 64 * c));
            wl[c] = _mm512_and_si512(v, low);
            wh[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 256)));
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 288)));
        for (int r = 0; r < rb; r++) {
            const int8_t *p = a.p + (r0 + r) * K + QK * g;
            __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512(); /* two chains */
            for (int c = 0; c < 4; c++) {
                lo = _mm512_dpbusd_epi32(lo, wl[c], _mm512_set1_epi32(four(p + 4 * c)));
                hi = _mm512_dpbusd_epi32(hi, wh[c], _mm512_set1_epi32(four(p + 16 + 4 * c)));
            }
            const int64_t at = (r0 + r) * G + g;
            const __m512 de = _mm512_mul_ps(d, _mm512_set1_ps(a.e[at]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), de, acc[r]);
            macc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(a.s[at]), macc[r]);
        }
    }
    for (int r = 0; r < rb; r++) _mm512_storeu_ps(out[r], _mm512_add_ps(acc[r], macc[r]));
#elif PATH_AVX2
    /* the 16 rows of a tile as two halves of 8 lanes (bytes 0-31 and 32-63 of each 64) */
    for (int h = 0; h < 2; h++) {
        __m256 acc[RB], macc[RB];
        for (int r = 0; r < rb; r++) acc[r] = macc[r] = _mm256_setzero_ps();
        const __m256i low = _mm256_set1_epi8(0x0f);
#if !defined(__AVXVNNI__)
        const __m256i ones = _mm256_set1_epi16(1);
#endif
        const uint8_t *b = blk;
        for (int64_t g = 0; g < G; g++, b += BLOCK) {
            PREFETCH(pf && h == 0 ? pf + g * BLOCK : NULL, BLOCK);
            __m256i wl[4], wh[4];
            for (int c = 0; c < 4; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(b + 64 * c + 32 * h));
                wl[c] = _mm256_and_si256(v, low);
                wh[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            }
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 256 + 16 * h)));
            for (int r = 0; r < rb; r++) {
                const int8_t *p = a.p + (r0 + r) * K + QK * g;
#if defined(__AVXVNNI__)
                __m256i sum = _mm256_setzero_si256();
                for (int c = 0; c < 4; c++) {
                    sum = _mm256_dpbusd_avx_epi32(sum, wl[c], _mm256_set1_epi32(four(p + 4 * c)));
                    sum = _mm256_dpbusd_avx_epi32(sum, wh[c], _mm256_set1_epi32(four(p + 16 + 4 * c)));
                }
#else
                /* u8 x s8 pairs to int16 (each at most 2 * 15 * 127 = 3,810), the group's 8 of them
                 * summed in int16 (at most 30,480 < 2^15: no saturation), then one widening to int32:
                 * 9 multiplies a group instead of 16. 8 rows of int4 gate|up, weights from memory, on a
                 * Zen 4 held to AVX2: 168 -> 161 us (the loop is bound by all its vector ops, not the
                 * multiplies: AVX-VNNI 133, AVX-512 VNNI 65; one row 38, 38 and 31). */
                __m256i s16 = _mm256_setzero_si256();
                for (int c = 0; c < 4; c++) {
                    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(wl[c], _mm256_set1_epi32(four(p + 4 * c))));
                    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(wh[c], _mm256_set1_epi32(four(p + 16 + 4 * c))));
                }
                const __m256i sum = _mm256_madd_epi16(s16, ones);
#endif
                const int64_t at = (r0 + r) * G + g;
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(d, _mm256_set1_ps(a.e[at])), acc[r]);
            }
        }
        /* the groups' minimums times the rows' sums, in a pass of their own: the same sums in the same
         * order, and 4 registers fewer in the loop above (16 ymm registers: it spilled) */
        b = blk;
        for (int64_t g = 0; g < G; g++, b += BLOCK) {
            const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 288 + 16 * h)));
            for (int r = 0; r < rb; r++) macc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(a.s[(r0 + r) * G + g]), macc[r]);
        }
        for (int r = 0; r < rb; r++) _mm256_storeu_ps(out[r] + 8 * h, _mm256_add_ps(acc[r], macc[r]));
    }
#else
    (void)pf; /* the reference path: no prefetching */
    for (int r = 0; r < rb; r++) {
        for (int i = 0; i < TILE; i++) out[r][i] = 0.f;
        const uint8_t *b = blk;
        for (int64_t g = 0; g < G; g++, b += BLOCK) {
            const int8_t *p = a.p + (r0 + r) * K + QK * g;
            const int64_t at = (r0 + r) * G + g;
            for (int i = 0; i < TILE; i++) {
                int32_t dot = 0;
                for (int c = 0; c < 4; c++)
                    for (int k = 0; k < 4; k++) {
                        const uint8_t v = b[64 * c + 4 * i + k];
                        dot += (int32_t)(v & 0x0f) * p[4 * c + k] + (int32_t)(v >> 4) * p[16 + 4 * c + k];
                    }
                uint16_t dh, mh;
                memcpy(&dh, b + 256 + 2 * i, 2);
                memcpy(&mh, b + 288 + 2 * i, 2);
                out[r][i] += f16_to_f32(dh) * a.e[at] * (float)dot + f16_to_f32(mh) * a.s[at];
            }
        }
    }
#endif
}

/* int8 weights: out[r][i] = y[r0 + r, 16 t + i]. AVX-512 and AVX-VNNI take the weights as unsigned
 * (q + 128: one XOR) for their u8 x s8 products, which adds 128 * sum_j p to each group's dot: taken
 * off in integers (off). AVX2's u8 x s8 pairs would saturate int16 at (q + 128) * p, so it multiplies
 * |q| by p with q's sign instead (at most 2 * 127 * 127 < 2^15). */
static inline __attribute__((always_inline)) void tile_rows8(const uint8_t *blk, int64_t G, struct acts a, int64_t K,
                                                             int64_t r0, const int rb, float out[RB][TILE],
                                                             const uint8_t *pf) {
#if PATH_AVX512
    __m512 acc[RB];
    for (int r = 0; r < rb; r++) acc[r] = _mm512_setzero_ps();
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int64_t g = 0; g < G; g++, blk += BLOCK8) {
        PREFETCH(pf ? pf + g * BLOCK8 : NULL, BLOCK8);
        __m512i w[8];
        for (int c = 0; c < 8; c++) w[c] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(blk + 64 * c)), flip);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 512)));
        for (int r = 0; r < rb; r++) {
            const int8_t *p = a.p + (r0 + r) * K + QK * g;
            const int64_t at = (r0 + r) * G + g;
            __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
            for (int c = 0; c < 4; c++) {
                lo = _mm512_dpbusd_epi32(lo, w[c], _mm512_set1_epi32(four(p + 4 * c)));
                hi = _mm512_dpbusd_epi32(hi, w[c + 4], _mm512_set1_epi32(four(p + 16 + 4 * c)));
            }
            const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(lo, hi), _mm512_set1_epi32(a.off[at]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(a.e[at])), acc[r]);
        }
    }
    for (int r = 0; r < rb; r++) _mm512_storeu_ps(out[r], acc[r]);
#elif PATH_AVX2
    for (int h = 0; h < 2; h++) {
        __m256 acc[RB];
        for (int r = 0; r < rb; r++) acc[r] = _mm256_setzero_ps();
#if defined(__AVXVNNI__)
        const __m256i flip = _mm256_set1_epi8((char)0x80);
#else
        const __m256i ones = _mm256_set1_epi16(1);
#endif
        const uint8_t *b = blk;
        for (int64_t g = 0; g < G; g++, b += BLOCK8) {
            PREFETCH(pf && h == 0 ? pf + g * BLOCK8 : NULL, BLOCK8);
            __m256i w[8];
            for (int c = 0; c < 8; c++) w[c] = _mm256_loadu_si256((const __m256i *)(b + 64 * c + 32 * h));
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 512 + 16 * h)));
            for (int r = 0; r < rb; r++) {
                const int8_t *p = a.p + (r0 + r) * K + QK * g;
                const int64_t at = (r0 + r) * G + g;
                __m256i sum = _mm256_setzero_si256();
                for (int c = 0; c < 8; c++) {
                    const __m256i x = _mm256_set1_epi32(four(p + 4 * c));
#if defined(__AVXVNNI__)
                    sum = _mm256_dpbusd_avx_epi32(sum, _mm256_xor_si256(w[c], flip), x);
#else
                    const __m256i pr = _mm256_maddubs_epi16(_mm256_sign_epi8(w[c], w[c]), _mm256_sign_epi8(x, w[c]));
                    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pr, ones));
#endif
                }
#if defined(__AVXVNNI__)
                sum = _mm256_sub_epi32(sum, _mm256_set1_epi32(a.off[at]));
#endif
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(d, _mm256_set1_ps(a.e[at])), acc[r]);
            }
        }
        for (int r = 0; r < rb; r++) _mm256_storeu_ps(out[r] + 8 * h, acc[r]);
    }
#else
    (void)pf;
    for (int r = 0; r < rb; r++) {
        for (int i = 0; i < TILE; i++) out[r][i] = 0.f;
        const uint8_t *b = blk;
        for (int64_t g = 0; g < G; g++, b += BLOCK8) {
            const int8_t *p = a.p + (r0 + r) * K + QK * g;
            const float e = a.e[(r0 + r) * G + g];
            for (int i = 0; i < TILE; i++) {
                int32_t dot = 0;
                for (int c = 0; c < 8; c++)
                    for (int k = 0; k < 4; k++) dot += (int32_t)(int8_t)b[64 * c + 4 * i + k] * p[4 * c + k];
                uint16_t dh;
                memcpy(&dh, b + 512 + 2 * i, 2);
                out[r][i] += f16_to_f32(dh) * e * (float)dot;
            }
        }
    }
#endif
}

#define CASE_(fn, n) \
    case n: fn(blk, G, a, K, r0, n, out, pf); break;
#if RB == 8
#define ROW_CASES(fn) CASE_(fn, 8) CASE_(fn, 7) CASE_(fn, 6) CASE_(fn, 5) CASE_(fn, 4) CASE_(fn, 3) CASE_(fn, 2)
#else
#define ROW_CASES(fn) CASE_(fn, 4) CASE_(fn, 3) CASE_(fn, 2)
#endif

static void tiles(int bits, const uint8_t *w, int64_t M, int64_t K, int64_t N, struct acts a, void *y,
                  int out_bf16, int64_t t0, int64_t t1) {
    const int64_t G = K / QK, tile_bytes = G * (bits == 4 ? BLOCK : BLOCK8);
    float out[RB][TILE];
    for (int64_t t = t0; t < t1; t++) { /* a tile's weights stay in cache across row blocks */
        const uint8_t *blk = w + t * tile_bytes, *next = t + 1 < t1 ? blk + tile_bytes : NULL;
        for (int64_t r0 = 0; r0 < M; r0 += RB) {
            const int64_t rb = M - r0 < RB ? M - r0 : RB;
            const uint8_t *pf = r0 == 0 ? next : NULL;
            if (bits == 4) {
                switch (rb) { /* literal row counts: see tile_rows */
                    ROW_CASES(tile_rows)
                default: tile_rows(blk, G, a, K, r0, 1, out, pf); break;
                }
            } else {
                switch (rb) {
                    ROW_CASES(tile_rows8)
                default: tile_rows8(blk, G, a, K, r0, 1, out, pf); break;
                }
            }
            for (int64_t r = 0; r < rb; r++) {
                if (out_bf16) {
                    uint16_t *dst = (uint16_t *)y + (r0 + r) * N + TILE * t;
#if PATH_AVX512
                    store_bf16_16(dst, out[r]);
#else
                    for (int i = 0; i < TILE; i++) dst[i] = f32_to_bf16(out[r][i]);
#endif
                } else {
                    memcpy((float *)y + (r0 + r) * N + TILE * t, out[r], sizeof(out[r]));
                }
            }
        }
    }
}

/* y [M, N] (fp32, or bf16 when act_bf16) = x [M, K] (the same dtype) @ W.T, W tiled as above with
 * `bits` 4 or 8; K a multiple of 32 and N of 16. With threads > 1 (torch's OpenMP pool: the same libgomp soname), rows
 * of x are quantized and then tiles computed in parallel. Returns 0, -1 when out of memory, -2 for
 * a shape it does not take. */
int q_matmul(int32_t bits, int64_t M, int64_t K, int64_t N, const void *x, int32_t act_bf16, const uint8_t *w,
             void *y, int32_t threads) {
    if (K % QK != 0 || N % TILE != 0 || (bits != 4 && bits != 8)) return -2;
    const int64_t G = K / QK, T = N / TILE;
    struct acts a;
    a.p = malloc((size_t)(M * K));
    a.e = malloc(sizeof(float) * (size_t)(3 * M * G));
    if (!a.p || !a.e) {
        free(a.p);
        free(a.e);
        return -1;
    }
    a.s = a.e + M * G;
    a.off = (int32_t *)(a.s + M * G);
#ifdef _OPENMP
    if (threads > 1 && M * N >= 4096) {
#pragma omp parallel num_threads(threads)
        {
            const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
            quantize_rows(x, act_bf16, tid * M / nth, (tid + 1) * M / nth, K, a);
#pragma omp barrier
            tiles(bits, w, M, K, N, a, y, act_bf16, tid * T / nth, (tid + 1) * T / nth);
        }
    } else
#endif
    {
        (void)threads;
        quantize_rows(x, act_bf16, 0, M, K, a);
        tiles(bits, w, M, K, N, a, y, act_bf16, 0, T);
    }
    free(a.p);
    free(a.e);
    return 0;
}

/* bf16 weights, unquantized, for a bf16 model on a CPU with AVX512-BF16: y [M, N] bf16 = x [M, K]
 * bf16 @ W.T, sums in fp32. W in tiles of 16 output rows, per pair of inputs one 64-byte block:
 *     element 2 i + b of block (t, p) = W[16 t + i, 2 p + b]         (i < 16, b < 2)
 * the operand layout of `vdpbf16ps`, whose other operand is one pair of x broadcast: each lane
 * gathers its own row's two products, so 16 rows' sums need no horizontal adds, as in the integer
 * tiles above. Why not oneDNN (what F.linear runs for bf16): at 1-8 rows it is a GEMV that read
 * SmolLM2's 269 MB at ~12 GB/s on a Zen 4 core (45.6 tok/s, llama.cpp's BF16 80 tok/s there).
 * Built only where the compiler targets AVX512-BF16 (q_bf16() says so); elsewhere a bf16 model
 * keeps oneDNN's path. */
int q_bf16(void) {
#if PATH_AVX512 && defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

#if PATH_AVX512 && defined(__AVX512BF16__)
#define BF_RB 8 /* rows of x per pass: 2 accumulators each (two chains) and a tile's block fit 32 registers */
static inline __attribute__((always_inline)) void bf_tile_rows(const uint16_t *blk, int64_t P, const uint16_t *x,
                                                               int64_t K, int64_t r0, const int rb, float out[BF_RB][TILE],
                                                               const uint8_t *pf) {
    __m512 a0[BF_RB], a1[BF_RB];
    for (int r = 0; r < rb; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    int64_t p = 0;
    for (; p + 2 <= P; p += 2, blk += 64) {
        if (pf) __builtin_prefetch(pf + 64 * p, 0, 3), __builtin_prefetch(pf + 64 * p + 64, 0, 3);
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)blk);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void *)(blk + 32));
        for (int r = 0; r < rb; r++) {
            const uint16_t *xr = x + (r0 + r) * K + 2 * p;
            a0[r] = _mm512_dpbf16_ps(a0[r], w0, (__m512bh)_mm512_set1_epi32(four((const int8_t *)xr)));
            a1[r] = _mm512_dpbf16_ps(a1[r], w1, (__m512bh)_mm512_set1_epi32(four((const int8_t *)(xr + 2))));
        }
    }
    if (p < P) { /* an odd pair count (K = 2 mod 4) */
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)blk);
        for (int r = 0; r < rb; r++)
            a0[r] = _mm512_dpbf16_ps(a0[r], w0, (__m512bh)_mm512_set1_epi32(four((const int8_t *)(x + (r0 + r) * K + 2 * p))));
    }
    for (int r = 0; r < rb; r++) _mm512_storeu_ps(out[r], _mm512_add_ps(a0[r], a1[r]));
}

#define BF_CASE_(n) \
    case n: bf_tile_rows(blk, P, x, K, r0, n, out, pf); break;

static void bf_tiles(const uint16_t *w, int64_t M, int64_t K, int64_t N, const uint16_t *x, uint16_t *y, int64_t t0,
                     int64_t t1) {
    const int64_t P = K / 2, tile_elems = P * 32;
    float out[BF_RB][TILE];
    for (int64_t t = t0; t < t1; t++) {
        const uint16_t *blk = w + t * tile_elems;
        const uint8_t *next = t + 1 < t1 ? (const uint8_t *)(blk + tile_elems) : NULL;
        for (int64_t r0 = 0; r0 < M; r0 += BF_RB) {
            const int64_t rb = M - r0 < BF_RB ? M - r0 : BF_RB;
            const uint8_t *pf = r0 == 0 ? next : NULL;
            switch (rb) {
                BF_CASE_(8) BF_CASE_(7) BF_CASE_(6) BF_CASE_(5) BF_CASE_(4) BF_CASE_(3) BF_CASE_(2)
            default: bf_tile_rows(blk, P, x, K, r0, 1, out, pf); break;
            }
            for (int64_t r = 0; r < rb; r++) {
                /* fp32 sums to bf16, round to nearest even, 16 at a time */
                _mm256_storeu_si256((__m256i *)(y + (r0 + r) * N + TILE * t),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(out[r])));
            }
        }
    }
}
#endif

/* y [M, N] bf16 = x [M, K] bf16 @ W.T, W in the bf16 tiles above; K even, N a multiple of 16.
 * Returns 0, -2 for a shape it does not take, -3 where it is not built (q_bf16() == 0). */
int q_bf16_matmul(int64_t M, int64_t K, int64_t N, const uint16_t *x, const uint16_t *w, uint16_t *y, int32_t threads) {
    if (K % 2 != 0 || N % TILE != 0) return -2;
#if PATH_AVX512 && defined(__AVX512BF16__)
    const int64_t T = N / TILE;
#ifdef _OPENMP
    if (threads > 1 && M * N >= 4096) {
#pragma omp parallel num_threads(threads)
        {
            const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
            bf_tiles(w, M, K, N, x, y, tid * T / nth, (tid + 1) * T / nth);
        }
        return 0;
    }
#endif
    (void)threads;
    bf_tiles(w, M, K, N, x, y, 0, T);
    return 0;
#else
    (void)M, (void)x, (void)w, (void)y, (void)threads;
    return -3;
#endif
}

/* fp32 weights, unquantized, for an fp32 model (a CPU without AVX512-BF16): y [M, N] fp32 = x [M, K]
 * fp32 @ W.T. W in tiles of 16 output rows, per input one 64-byte block:
 *     element i of block (t, k) = W[16 t + i, k]                      (i < 16)
 * so one x value broadcast meets 16 rows' weights in one FMA (AVX-512) or two (AVX2), and the
 * sums need no horizontal adds. Why not MKL (what F.linear runs): held to AVX2, its 1-8 row GEMV
 * read SmolLM2's 538 MB at ~19 GB/s on a Zen 4 core (35.9 tok/s against llama.cpp's F32 51.1), and
 * 8 rows cost 2.9x one row. Built on the AVX-512 and AVX2 paths (q_f32() says so); the plain C
 * path leaves fp32 to MKL. */
int q_f32(void) {
#if PATH_AVX512 || PATH_AVX2
    return 1;
#else
    return 0;
#endif
}

#if PATH_AVX512 || PATH_AVX2
#if PATH_AVX512
#define F_RB 8 /* rows of x per pass: two accumulators each (even and odd k), 16 registers */
#else
#define F_RB 4 /* two halves of 8 rows each: 8 accumulators, and the two weight registers */
#endif
/* 16 weights of tile row k as fp32: fp32 tiles as they are, fp16 tiles (`half`) converted (F16C) */
#if PATH_AVX512
static inline __attribute__((always_inline)) __m512 f_load16(const void *blk, int64_t k, const int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)blk + 16 * k)))
                : _mm512_loadu_ps((const float *)blk + 16 * k);
}
#endif
static inline __attribute__((always_inline)) void f_tile_rows(const void *blk, const float *x, int64_t K, int64_t r0,
                                                              const int rb, float out[F_RB][TILE], const char *pf,
                                                              const int half) {
    const int64_t row_bytes = half ? 32 : 64; /* one k of a tile: 16 weights */
#if PATH_AVX512
    __m512 a0[F_RB], a1[F_RB];
    for (int r = 0; r < rb; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
        if (pf) __builtin_prefetch(pf + row_bytes * k, 0, 3), __builtin_prefetch(pf + row_bytes * k + 64, 0, 3);
        const __m512 w0 = f_load16(blk, k, half), w1 = f_load16(blk, k + 1, half);
        for (int r = 0; r < rb; r++) {
            const float *xr = x + (r0 + r) * K + k;
            a0[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xr[0]), a0[r]);
            a1[r] = _mm512_fmadd_ps(w1, _mm512_set1_ps(xr[1]), a1[r]);
        }
    }
    if (k < K) {
        const __m512 w0 = f_load16(blk, k, half);
        for (int r = 0; r < rb; r++) a0[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[(r0 + r) * K + k]), a0[r]);
    }
    for (int r = 0; r < rb; r++) _mm512_storeu_ps(out[r], _mm512_add_ps(a0[r], a1[r]));
#else
    __m256 lo[F_RB], hi[F_RB];
    for (int r = 0; r < rb; r++) lo[r] = hi[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        if (pf && (k & 3) == 0)
            for (int64_t l = 0; l < 4 * row_bytes; l += 64) __builtin_prefetch(pf + row_bytes * k + l, 0, 3);
        __m256 w0, w1;
        if (half) {
            const __m128i *h = (const __m128i *)((const uint16_t *)blk + 16 * k);
            w0 = _mm256_cvtph_ps(_mm_loadu_si128(h)), w1 = _mm256_cvtph_ps(_mm_loadu_si128(h + 1));
        } else {
            w0 = _mm256_loadu_ps((const float *)blk + 16 * k), w1 = _mm256_loadu_ps((const float *)blk + 16 * k + 8);
        }
        for (int r = 0; r < rb; r++) {
            const __m256 xv = _mm256_broadcast_ss(x + (r0 + r) * K + k);
            lo[r] = _mm256_fmadd_ps(w0, xv, lo[r]);
            hi[r] = _mm256_fmadd_ps(w1, xv, hi[r]);
        }
    }
    for (int r = 0; r < rb; r++) _mm256_storeu_ps(out[r], lo[r]), _mm256_storeu_ps(out[r] + 8, hi[r]);
#endif
}

#define F_CASE_(n) \
    case n: f_tile_rows(blk, x, K, r0, n, out, pf, half); break;

static inline __attribute__((always_inline)) void f_tiles_(const void *w, int64_t M, int64_t K, int64_t N,
                                                           const float *x, float *y, int64_t t0, int64_t t1,
                                                           const int half) {
    const int64_t tile_bytes = K * TILE * (half ? 2 : 4);
    float out[F_RB][TILE];
    for (int64_t t = t0; t < t1; t++) { /* a tile (16 x K: 36 KB for K = 576 in fp32) stays in cache across row blocks */
        const char *blk = (const char *)w + t * tile_bytes, *next = t + 1 < t1 ? blk + tile_bytes : NULL;
        for (int64_t r0 = 0; r0 < M; r0 += F_RB) {
            const int64_t rb = M - r0 < F_RB ? M - r0 : F_RB;
            const char *pf = r0 == 0 ? next : NULL;
            switch (rb) {
#if F_RB == 8
                F_CASE_(8) F_CASE_(7) F_CASE_(6) F_CASE_(5)
#endif
                F_CASE_(4) F_CASE_(3) F_CASE_(2)
            default: f_tile_rows(blk, x, K, r0, 1, out, pf, half); break;
            }
            for (int64_t r = 0; r < rb; r++) memcpy(y + (r0 + r) * N + TILE * t, out[r], sizeof(out[r]));
        }
    }
}

static void f_tiles(const void *w, int64_t M, int64_t K, int64_t N, const float *x, float *y, int64_t t0, int64_t t1,
                    int half) {
    if (half)
        f_tiles_(w, M, K, N, x, y, t0, t1, 1);
    else
        f_tiles_(w, M, K, N, x, y, t0, t1, 0);
}
#endif

static int f_matmul(int64_t M, int64_t K, int64_t N, const float *x, const void *w, float *y, int32_t threads,
                    int half) {
    if (N % TILE != 0 || K < 1) return -2;
#if PATH_AVX512 || PATH_AVX2
    const int64_t T = N / TILE;
#ifdef _OPENMP
    if (threads > 1 && M * N >= 4096) {
#pragma omp parallel num_threads(threads)
        {
            const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
            f_tiles(w, M, K, N, x, y, tid * T / nth, (tid + 1) * T / nth, half);
        }
        return 0;
    }
#endif
    (void)threads;
    f_tiles(w, M, K, N, x, y, 0, T, half);
    return 0;
#else
    (void)M, (void)x, (void)w, (void)y, (void)threads, (void)half;
    return -3;
#endif
}

/* y [M, N] fp32 = x [M, K] fp32 @ W.T, W in the fp32 tiles above; N a multiple of 16. Returns 0, -2
 * for a shape it does not take, -3 where it is not built (q_f32() == 0). */
int q_f32_matmul(int64_t M, int64_t K, int64_t N, const float *x, const float *w, float *y, int32_t threads) {
    return f_matmul(M, K, N, x, w, y, threads, 0);
}

/* the same with W's tiles in fp16 (`uint16_t` [N/16, K, 16]): half the bytes, sums in fp32. Why:
 * a CPU without bf16 arithmetic keeps small encoders in fp32, whose weights are then the bytes a
 * question waits for (all-MiniLM-L6-v2: 42 MB fp32); fp16 rounds a weight to 11 significant bits
 * (bf16: 8), converted exactly to fp32 on load (F16C). */
int q_f16_matmul(int64_t M, int64_t K, int64_t N, const float *x, const uint16_t *w, float *y, int32_t threads) {
    return f_matmul(M, K, N, x, w, y, threads, 1);
}
