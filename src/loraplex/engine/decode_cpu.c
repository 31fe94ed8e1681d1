/* A decoding step's small per-layer work on CPU, for n rows of one new token each: RMSNorm with the
 * residual add before it, SiLU(gate) * up, and rotary + KV-cache write + grouped-query attention in one call.
 *
 * Why C: at decode sizes these are ~20 tiny PyTorch ops per layer (profiled on SmolLM2 at one row,
 * fp32, one thread: RMSNorm 11 us a call, rotary 12 us, two cache writes 9 us, attention over 150
 * keys 42 us), ~3 ms of a ~18 ms int4 step in dispatch, not arithmetic. Here a layer's attention for
 * one row is a few microseconds.
 *
 * The reference these must equal is DecoderModel.forward's PyTorch path (engine/model.py), which
 * serves every step that is not a pure decode step (prefill, several tokens per row) and every
 * machine without a C compiler; tests/test_decode_kernel.py compares the two.
 *
 * Activations and the KV cache are fp32 (act_bf16 = 0) or bf16 (act_bf16 = 1, rounded as torch
 * rounds); all arithmetic is fp32. Vectorised by the compiler (-O3 -march=native, the flags in
 * lora_kernel.py): no instruction set is named here.
 *
 * This file does not allocate the cache, pick rows or decide when the fast path applies (model.py). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"

static inline float ld(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void st(void *p, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* x [rows, dim] += res (unless res is NULL; x is updated in place), then out = x / rms(x) * w. */
int rms_norm(int64_t rows, int64_t dim, void *x, const void *res, const void *w, void *out, float eps, int bf16) {
    float buf[dim];
    for (int64_t r = 0; r < rows; r++) {
        float ss = 0.0f;
        for (int64_t i = 0; i < dim; i++) {
            float v = ld(x, r * dim + i, bf16);
            if (res) {
                v += ld(res, r * dim + i, bf16);
                st(x, r * dim + i, v, bf16);
                v = ld(x, r * dim + i, bf16); /* the sum as stored (bf16: rounded), as torch's add then norm */
            }
            buf[i] = v;
            ss += v * v;
        }
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++)
            st(out, r * dim + i, buf[i] * inv * ld(w, i, bf16), bf16);
    }
    return 0;
}

/* e^x to ~2 ulp (Cephes' expf: Cody-Waite reduction by ln 2, a degree-6 polynomial, 2^n from the
 * exponent bits), in plain arithmetic so that the loops calling it vectorise. Why not libm's expf:
 * without -ffast-math (see lora_kernel.py's FLAGS) the compiler calls it once per element, ~20 cycles
 * each, which made SiLU 54 us and the softmax most of attention for 8 rows of SmolLM2. */
static inline float exp_approx(float x) {
    /* e^x stays a normal float; SiLU's e^-g saturates as torch's does (comparisons: fminf/fmaxf would
     * stop the vectoriser, which keeps their NaN rules) */
    x = x > 88.3f ? 88.3f : x < -87.3f ? -87.3f : x;
    const float n = nearbyintf(x * 1.44269504088896341f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    return p * two_n;
}

/* out [rows, inter] = silu(gate) * up for gu [rows, 2*inter] = [gate | up] (SwiGLU). */
static inline __attribute__((always_inline)) void silu_rows(int64_t rows, int64_t inter, const void *gu, void *out,
                                                            const int bf16) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < inter; i++) {
            const float g = ld(gu, r * 2 * inter + i, bf16), u = ld(gu, r * 2 * inter + inter + i, bf16);
            st(out, r * inter + i, g / (1.0f + exp_approx(-g)) * u, bf16);
        }
}

int silu_mul(int64_t rows, int64_t inter, const void *gu, void *out, int bf16) {
    if (bf16) /* a literal dtype in each copy: no per-element branch in the vectorised loop */
        silu_rows(rows, inter, gu, out, 1);
    else
        silu_rows(rows, inter, gu, out, 0);
    return 0;
}

/* Rotate one head (rotate_half convention, as transformers' Llama): y = x*cos + rotate_half(x)*sin. */
static inline void rotate(const void *src, int64_t off, int64_t d, const float *cos, const float *sin, float *y,
                          int bf16) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = ld(src, off + i, bf16), b = ld(src, off + i + half, bf16);
        y[i] = a * cos[i] - b * sin[i];
        y[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* One row r and kv head j: rotary, the token's k and v into the cache, then the g = heads / kv query
 * heads that share j attend together, so each key and value is read once for all g of them. `sc`:
 * scratch of g * (T + d) + d floats. */
static inline __attribute__((always_inline)) void attend(int64_t r, int64_t j, int64_t heads, int64_t kv, int64_t d,
                                                         const void *qkv, int64_t qkv_stride, const float *c,
                                                         const float *s, void *k_cache, void *v_cache,
                                                         int64_t base, int64_t s_pos, int64_t T, void *out,
                                                         float *sc, const int bf16) {
    const int64_t g = heads / kv, P = T - 1;
    const float scale = 1.0f / sqrtf((float)d);
    float *q = sc + g * T, *acc = q + g * d, *y = acc + g * d; /* q and acc: [g, d]; y: [d] */
    rotate(qkv, r * qkv_stride + (heads + j) * d, d, c, s, y, bf16);
    for (int64_t i = 0; i < d; i++) {
        st(k_cache, base + P * s_pos + i, y[i], bf16);
        st(v_cache, base + P * s_pos + i, ld(qkv, r * qkv_stride + (heads + kv + j) * d + i, bf16), bf16);
    }
    for (int64_t h = 0; h < g; h++) {
        rotate(qkv, r * qkv_stride + (j * g + h) * d, d, c, s, q + h * d, bf16);
        for (int64_t i = 0; i < d; i++) /* torch's path rotates in bf16: the query it attends with is rounded */
            q[h * d + i] = bf16 ? bf16_to_f32(f32_to_bf16(q[h * d + i])) * scale : q[h * d + i] * scale;
    }
    const int64_t esz = bf16 ? 2 : 4; /* bytes an element */
    for (int64_t t = 0; t < T; t++) { /* scores [g, T] */
        /* The cache is read from memory (8 rows of SmolLM2 at 150 positions: 55 MB a step), faster
         * when asked for ahead: the keys 8 positions on, and this position's values for the sum below. */
        for (int64_t l = 0; l < d * esz; l += 64) {
            __builtin_prefetch((const char *)k_cache + (base + (t + 8) * s_pos) * esz + l, 0, 3);
            __builtin_prefetch((const char *)v_cache + (base + t * s_pos) * esz + l, 0, 3);
        }
        for (int64_t h = 0; h < g; h++) {
            float dot = 0.0f;
            for (int64_t i = 0; i < d; i++)
                dot += q[h * d + i] * ld(k_cache, base + t * s_pos + i, bf16);
            sc[h * T + t] = dot;
        }
    }
    for (int64_t h = 0; h < g; h++) { /* softmax in fp32 */
        float *p = sc + h * T, top = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < T; t++)
            top = p[t] > top ? p[t] : top;
        for (int64_t t = 0; t < T; t++) {
            p[t] = exp_approx(p[t] - top);
            sum += p[t];
        }
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < T; t++)
            p[t] *= inv;
    }
    for (int64_t i = 0; i < g * d; i++)
        acc[i] = 0.0f;
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < g; h++) {
            const float p = sc[h * T + t];
            for (int64_t i = 0; i < d; i++)
                acc[h * d + i] += p * ld(v_cache, base + t * s_pos + i, bf16);
        }
    for (int64_t h = 0; h < g; h++)
        for (int64_t i = 0; i < d; i++)
            st(out, r * heads * d + (j * g + h) * d + i, acc[h * d + i], bf16);
}

/* For each row r (one new token at position pos[r], stored in cache slot slot[r]):
 *   qkv[r] = [q (heads*d) | k (kv*d) | v (kv*d)] at row stride qkv_stride (elements);
 *   k and v of the token go to the cache at [slot, kv head, pos] (k rotated), then every query head
 *   attends (softmax in fp32, scaled by 1/sqrt(d)) over the slot's keys 0..pos;
 *   out[r] = the heads' outputs side by side [heads*d].
 * cos/sin: [n, d] fp32. Cache strides in elements: per slot, per kv head, per position (d contiguous).
 */
int decode_attention(int64_t n, int64_t heads, int64_t kv, int64_t d, const void *qkv, int64_t qkv_stride,
                     const float *cos, const float *sin, void *k_cache, void *v_cache, int64_t s_slot,
                     int64_t s_head, int64_t s_pos, const int64_t *slot, const int64_t *pos, void *out, int bf16,
                     int threads) {
    const int64_t g = heads / kv;
    int64_t longest = 0;
    for (int64_t r = 0; r < n; r++)
        longest = pos[r] + 1 > longest ? pos[r] + 1 : longest;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n * kv > 1)
    for (int64_t task = 0; task < n * kv; task++) {
        const int64_t r = task / kv, j = task % kv;
        float *sc = malloc(sizeof(float) * (size_t)(g * longest + 2 * g * d + d));
        if (!sc) {
            failed = 1;
            continue;
        }
        const int64_t base = slot[r] * s_slot + j * s_head;
        if (bf16)
            attend(r, j, heads, kv, d, qkv, qkv_stride, cos + r * d, sin + r * d, k_cache, v_cache, base, s_pos,
                   pos[r] + 1, out, sc, 1);
        else
            attend(r, j, heads, kv, d, qkv, qkv_stride, cos + r * d, sin + r * d, k_cache, v_cache, base, s_pos,
                   pos[r] + 1, out, sc, 0);
        free(sc);
    }
    return failed ? -1 : 0;
}
