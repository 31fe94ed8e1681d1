/* A decoding step's small per-layer work on CPU, for n rows of one new token each: RMSNorm with the
 * residual add before it, SiLU(gate) * up, and rotary + KV-cache write + grouped-query attention in one call.
 *
 * Why C: at decode sizes these are ~20 tiny PyTorch ops per layer (profiled on SmolLM2 at one row,
 * fp32, one thread: RMSNorm 11 us a call, rotary 12 us, two cache writes 9 us, attention over 150
 * keys 42 us), ~3 ms of a ~18 ms int4 step in dispatch, not arithmetic. Here a layer's attention for
 * one row is a few microseconds.
 *
 * One row's prompt also comes here: its tokens as rows for the norms and SiLU, and its attention in
 * `prefill_attention`, the new tokens' queries together (model.py `_prefill_one`). The reference these must equal is
 * DecoderModel.forward's PyTorch path (engine/model.py), which serves prefills of several rows at
 * once, steps that want every position's logits, and every machine without a C compiler;
 * tests/test_decode_kernel.py compares the two.
 *
 * Activations are fp32 (bf16 = 0) or bf16 (bf16 = 1, rounded as torch rounds); the KV cache holds
 * the activations' type, or fp16 under fp32 activations (half the bytes each step reads, as
 * llama.cpp's default cache); all arithmetic is fp32. Vectorised by the compiler (-O3
 * -march=native, the flags in lora_kernel.py); the one instruction named is F16C's fp16
 * conversion, used where the build's target has it (f16_row), with a plain-C path otherwise.
 *
 * This file does not allocate the cache, pick rows or decide when the fast path applies (model.py). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"
#if defined(__F16C__)
#include <immintrin.h>
#endif

/* fp16 <-> fp32, round to nearest even as torch converts: the compiler's _Float16 (one instruction
 * with F16C; GCC >= 12, clang >= 15), else by bits (no subnormal fp16 on the way in: they
 * flush to zero, as keys and values that small are). */
#ifdef __FLT16_MANT_DIG__
static inline float f16_to_f32(uint16_t h) {
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}
static inline uint16_t f32_to_f16(float v) {
    const _Float16 f = (_Float16)v;
    uint16_t h;
    memcpy(&h, &f, 2);
    return h;
}
#else
static inline float f16_to_f32(uint16_t h) {
    const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t b = e == 0 ? sign : e == 31 ? sign | 0x7f800000u | (m << 13) : sign | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &b, 4);
    return f;
}
static inline uint16_t f32_to_f16(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    const uint32_t sign = (b >> 16) & 0x8000u, a = b & 0x7fffffffu;
    if (a > 0x7f800000u)
        return (uint16_t)(sign | 0x7e00u); /* NaN */
    if (a >= 0x477ff000u)
        return (uint16_t)(sign | 0x7c00u); /* rounds past 65504: inf */
    if (a < 0x38800000u)
        return (uint16_t)sign; /* below the smallest normal fp16 */
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
    return (uint16_t)(sign | (r >> 13));
}
#endif

/* n fp16 values as fp32: 8 an instruction where the CPU has F16C (GCC 12 converts _Float16 one
 * element at a time, which made fp16 keys 5x slower to read than fp32 ones). */
static inline void f16_row(const uint16_t *h, float *f, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++)
        f[i] = f16_to_f32(h[i]);
}

#define TB 4 /* positions of attention at a time (attend) */
#define PF 8 /* keys prefetched this many positions ahead (4-32 measured alike) */

/* nb cache rows of d elements from `off`, `stride` apart, as fp32: pointers into the cache when it
 * is fp32, else converted into buf. */
static inline __attribute__((always_inline)) void cache_rows(const void *cache, int64_t off, int64_t stride,
                                                             int64_t nb, int64_t d, int kind, float *buf,
                                                             const float **rows) {
    for (int64_t b = 0; b < nb; b++) {
        if (kind == 0) {
            rows[b] = (const float *)cache + off + b * stride;
            continue;
        }
        const uint16_t *h = (const uint16_t *)cache + off + b * stride;
        if (kind == 2)
            f16_row(h, buf + b * d, d);
        else
            for (int64_t i = 0; i < d; i++)
                buf[b * d + i] = bf16_to_f32(h[i]);
        rows[b] = buf + b * d;
    }
}

/* element i of an fp32 (kind 0), bf16 (1) or fp16 (2) array := v */
static inline void stk(void *p, int64_t i, float v, int kind) {
    if (kind == 1)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else if (kind == 2)
        ((uint16_t *)p)[i] = f32_to_f16(v);
    else
        ((float *)p)[i] = v;
}

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

/* rotary, then token r's k and v for kv head j into the cache at element `at` (y: d floats of scratch) */
static inline __attribute__((always_inline)) void store_kv(int64_t r, int64_t j, int64_t heads, int64_t kv, int64_t d,
                                                           const void *qkv, int64_t qkv_stride, const float *c,
                                                           const float *s, void *k_cache, void *v_cache, int64_t at,
                                                           float *y, const int bf16, const int kvk) {
    rotate(qkv, r * qkv_stride + (heads + j) * d, d, c, s, y, bf16);
    for (int64_t i = 0; i < d; i++) {
        stk(k_cache, at + i, y[i], kvk);
        stk(v_cache, at + i, ld(qkv, r * qkv_stride + (heads + kv + j) * d + i, bf16), kvk);
    }
}

/* One row r and kv head j: rotary, the token's k and v into the cache, then the g = heads / kv query
 * heads that share j attend together, so each key and value is read once for all g of them. `sc`:
 * scratch of g * (T + d) + d floats. */
static inline __attribute__((always_inline)) void attend(int64_t r, int64_t j, int64_t heads, int64_t kv, int64_t d,
                                                         const void *qkv, int64_t qkv_stride, const float *c,
                                                         const float *s, void *k_cache, void *v_cache,
                                                         int64_t base, int64_t s_pos, int64_t T, void *out,
                                                         float *sc, const int bf16, const int kvk) {
    const int64_t g = heads / kv, P = T - 1;
    const float scale = 1.0f / sqrtf((float)d);
    float *q = sc + g * T, *acc = q + g * d, *y = acc + g * d; /* q and acc: [g, d]; y: [d] */
    store_kv(r, j, heads, kv, d, qkv, qkv_stride, c, s, k_cache, v_cache, base + P * s_pos, y, bf16, kvk);
    for (int64_t h = 0; h < g; h++) {
        rotate(qkv, r * qkv_stride + (j * g + h) * d, d, c, s, q + h * d, bf16);
        for (int64_t i = 0; i < d; i++) /* torch's path rotates in bf16: the query it attends with is rounded */
            q[h * d + i] = bf16 ? bf16_to_f32(f32_to_bf16(q[h * d + i])) * scale : q[h * d + i] * scale;
    }
    const int64_t esz = kvk ? 2 : 4; /* bytes a cached element */
    /* Positions go TB at a time: TB dot products (or TB value rows) share one pass over q (or acc), so
     * the sums run side by side instead of one reduction after another, and acc is loaded and
     * stored once per TB rows. A bf16/fp16 block is converted to fp32 once for all g heads. */
    float buf[TB * d];
    const float *kr[TB];
    int64_t t = 0;
    for (; t < T; t += TB) { /* scores [g, T] */
        const int64_t nb = T - t < TB ? T - t : TB;
        /* The cache is read from memory (8 rows of SmolLM2 at 150 positions: 55 MB a step), faster
         * when asked for ahead: the keys TB positions on. */
        for (int64_t l = 0; l < TB * d * esz; l += 64) {
            __builtin_prefetch((const char *)k_cache + (base + (t + PF) * s_pos) * esz + l, 0, 3);
            __builtin_prefetch((const char *)v_cache + (base + t * s_pos) * esz + l, 0, 3);
        }
        cache_rows(k_cache, base + t * s_pos, s_pos, nb, d, kvk, buf, kr);
        for (int64_t h = 0; h < g; h++) {
            const float *qh = q + h * d;
            if (nb == TB) {
                float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
                const float *k0 = kr[0], *k1 = kr[1], *k2 = kr[2], *k3 = kr[3];
                for (int64_t i = 0; i < d; i++) {
                    const float x = qh[i];
                    s0 += x * k0[i];
                    s1 += x * k1[i];
                    s2 += x * k2[i];
                    s3 += x * k3[i];
                }
                sc[h * T + t] = s0, sc[h * T + t + 1] = s1, sc[h * T + t + 2] = s2, sc[h * T + t + 3] = s3;
            } else
                for (int64_t b = 0; b < nb; b++) {
                    float dot = 0.0f;
                    for (int64_t i = 0; i < d; i++)
                        dot += qh[i] * kr[b][i];
                    sc[h * T + t + b] = dot;
                }
        }
    }
    for (int64_t h = 0; h < g; h++) { /* softmax in fp32 */
        float *p = sc + h * T, top = -INFINITY, sum = 0.0f;
        for (int64_t u = 0; u < T; u++)
            top = p[u] > top ? p[u] : top;
        for (int64_t u = 0; u < T; u++) {
            p[u] = exp_approx(p[u] - top);
            sum += p[u];
        }
        const float inv = 1.0f / sum;
        for (int64_t u = 0; u < T; u++)
            p[u] *= inv;
    }
    for (int64_t i = 0; i < g * d; i++)
        acc[i] = 0.0f;
    for (t = 0; t < T; t += TB) {
        const int64_t nb = T - t < TB ? T - t : TB;
        cache_rows(v_cache, base + t * s_pos, s_pos, nb, d, kvk, buf, kr);
        for (int64_t h = 0; h < g; h++) {
            const float *p = sc + h * T + t;
            float *ah = acc + h * d;
            if (nb == TB) {
                const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
                const float *v0 = kr[0], *v1 = kr[1], *v2 = kr[2], *v3 = kr[3];
                for (int64_t i = 0; i < d; i++)
                    ah[i] += p0 * v0[i] + p1 * v1[i] + p2 * v2[i] + p3 * v3[i];
            } else
                for (int64_t b = 0; b < nb; b++)
                    for (int64_t i = 0; i < d; i++)
                        ah[i] += p[b] * kr[b][i];
        }
    }
    for (int64_t h = 0; h < g; h++)
        for (int64_t i = 0; i < d; i++)
            st(out, r * heads * d + (j * g + h) * d + i, acc[h * d + i], bf16);
}

/* One row's prompt: n new tokens at positions start .. start + n - 1 of one cache slot, attending
 * together. The decode loop above (`attend`) reads and converts every cached key once per new token
 * and sums each score along d on its own; here each kv head's keys are converted once, KB positions
 * side by side ([d][KB], `kt`), and QB queries (the new tokens' query heads, in order) take every
 * block together, so KB scores are the lanes of one FMA chain and a value row meets QB queries at
 * once: a small matrix product instead of n decode steps. Why: a question's 20 new tokens after a
 * retrieved passage of ~110 cached positions took ~14 ms more to the first token than the same
 * tokens without it on a Zen 3 core (docs/generalization.md), the decode loop's attention; 30
 * layers of SmolLM2's attention there, one thread of a Xeon: 6.6 -> 3.7 ms, 40 tokens after 300
 * 34 -> 13 ms. Same arithmetic as `attend` (fp32, the same rounding of q and of the stored keys,
 * the same softmax), summed in another order. */
/* KB: key positions a block, as many as one vector register holds (whatever the build targets: 16
 * floats on AVX-512, 8 on AVX, 4 on SSE); QB: queries at a time, QB sums in flight fill the FMA
 * units without spilling. Wider vectors than the target's (16 on AVX2) ran 3x slower than the
 * decode loop: GCC keeps them on the stack. */
#if defined(__AVX512F__)
#define KB 16
#elif defined(__AVX__)
#define KB 8
#else
#define KB 4
#endif
#define QB 8
/* KB floats as one value of GCC's (and clang's) vector extension; vkb_u reads and writes them unaligned */
typedef float vkb __attribute__((vector_size(4 * KB)));
typedef float vkb_u __attribute__((vector_size(4 * KB), aligned(4)));
typedef int32_t vkbi __attribute__((vector_size(4 * KB)));

/* max of p[0..n), n >= 1, KB lanes at a time (a scalar max is a chain of n dependent instructions:
 * a quarter of this file's prompt attention before); NaN-free input (scores of finite keys) */
static inline float max_of(const float *p, int64_t n) {
    float mx = p[0];
    int64_t t = 0;
    if (n >= KB) {
        vkb m = *(const vkb_u *)p;
        for (t = KB; t + KB <= n; t += KB) {
            const vkb x = *(const vkb_u *)(p + t);
            const vkbi gt = x > m;
            m = (vkb)((gt & (vkbi)x) | (~gt & (vkbi)m));
        }
        for (int64_t c = 0; c < KB; c++) mx = m[c] > mx ? m[c] : mx;
    }
    for (; t < n; t++) mx = p[t] > mx ? p[t] : mx;
    return mx;
}

/* keys 0..T-1 of one kv head as fp32 blocks kt [T/KB][d][KB] (zeros past T), values as vf [T][d] */
static inline __attribute__((always_inline)) void load_head(const void *k_cache, const void *v_cache, int64_t base,
                                                            int64_t s_pos, int64_t T, int64_t d, float *kt, float *vf,
                                                            float *row, const int kvk) {
    const int64_t nblk = (T + KB - 1) / KB;
    for (int64_t b = 0; b < nblk; b++) {
        float *blk = kt + b * d * KB;
        for (int64_t c = 0; c < KB; c++) {
            const int64_t t = b * KB + c;
            if (t < T) {
                const float *kr;
                cache_rows(k_cache, base + t * s_pos, s_pos, 1, d, kvk, row, &kr);
                for (int64_t i = 0; i < d; i++) blk[i * KB + c] = kr[i];
            } else {
                for (int64_t i = 0; i < d; i++) blk[i * KB + c] = 0.0f;
            }
        }
    }
    for (int64_t t = 0; t < T; t++) {
        const float *vr;
        cache_rows(v_cache, base + t * s_pos, s_pos, 1, d, kvk, row, &vr);
        memcpy(vf + t * d, vr, sizeof(float) * (size_t)d);
    }
}

/* Queries q0 .. q0 + QB - 1 of kv head j (query u: token u / g, head j * g + u % g; those past
 * n * g are zeros and not stored) over the keys each may see. sc: QB * T floats, q: QB * d. */
static inline __attribute__((always_inline)) void prefill_queries(int64_t q0, int64_t n, int64_t j, int64_t heads,
                                                                  int64_t kv, int64_t d, const void *qkv,
                                                                  int64_t qkv_stride, const float *cos,
                                                                  const float *sin, int64_t start, const float *kt,
                                                                  const float *vf, void *out, float *sc, float *q,
                                                                  const int bf16) {
    const int64_t g = heads / kv;
    const float scale = 1.0f / sqrtf((float)d);
    int64_t lim[QB], top = 0;
    for (int64_t u = 0; u < QB; u++) {
        const int64_t qi = q0 + u, r = qi / g, h = qi % g;
        float *qu = q + u * d;
        if (qi >= n * g) {
            for (int64_t i = 0; i < d; i++) qu[i] = 0.0f;
            lim[u] = 0;
            continue;
        }
        rotate(qkv, r * qkv_stride + (j * g + h) * d, d, cos + r * d, sin + r * d, qu, bf16);
        for (int64_t i = 0; i < d; i++) /* as `attend`: torch's path rotates in bf16 */
            qu[i] = bf16 ? bf16_to_f32(f32_to_bf16(qu[i])) * scale : qu[i] * scale;
        lim[u] = start + r + 1;
        top = lim[u] > top ? lim[u] : top;
    }
    /* scores [QB, top]: per block of KB keys, QB x KB sums, each along d */
    for (int64_t b = 0; b * KB < top; b++) {
        const float *blk = kt + b * d * KB;
        vkb sum[QB];
        for (int64_t u = 0; u < QB; u++) sum[u] = (vkb){0};
        for (int64_t i = 0; i < d; i++) {
            const vkb k = *(const vkb_u *)(blk + i * KB);
            for (int64_t u = 0; u < QB; u++) sum[u] += q[u * d + i] * k;
        }
        const int64_t nb = top - b * KB < KB ? top - b * KB : KB;
        for (int64_t u = 0; u < QB; u++) {
            if (nb == KB)
                *(vkb_u *)(sc + u * top + b * KB) = sum[u];
            else
                for (int64_t c = 0; c < nb; c++) sc[u * top + b * KB + c] = sum[u][c];
        }
    }
    for (int64_t u = 0; u < QB; u++) { /* softmax in fp32 over the keys query u sees; 0 past them */
        float *p = sc + u * top, sum = 0.0f;
        const float mx = lim[u] ? max_of(p, lim[u]) : 0.0f;
        for (int64_t t = 0; t < lim[u]; t++) {
            p[t] = exp_approx(p[t] - mx);
            sum += p[t];
        }
        const float inv = lim[u] ? 1.0f / sum : 0.0f;
        for (int64_t t = 0; t < lim[u]; t++) p[t] *= inv;
        for (int64_t t = lim[u]; t < top; t++) p[t] = 0.0f;
    }
    /* outputs: KB of d at a time, QB queries side by side over every key */
    for (int64_t i0 = 0; i0 < d; i0 += KB) {
        const int64_t w = d - i0 < KB ? d - i0 : KB;
        vkb acc[QB];
        for (int64_t u = 0; u < QB; u++) acc[u] = (vkb){0};
        if (w == KB) {
            for (int64_t t = 0; t < top; t++) {
                const vkb v = *(const vkb_u *)(vf + t * d + i0);
                for (int64_t u = 0; u < QB; u++) acc[u] += sc[u * top + t] * v;
            }
        } else {
            for (int64_t t = 0; t < top; t++)
                for (int64_t u = 0; u < QB; u++)
                    for (int64_t c = 0; c < w; c++) acc[u][c] += sc[u * top + t] * vf[t * d + i0 + c];
        }
        for (int64_t u = 0; u < QB; u++) {
            const int64_t qi = q0 + u;
            if (qi >= n * g) break;
            const int64_t r = qi / g, h = qi % g;
            for (int64_t c = 0; c < w; c++) st(out, r * heads * d + (j * g + h) * d + i0 + c, acc[u][c], bf16);
        }
    }
}

/* n new tokens of one row at positions start .. start + n - 1 in the cache slot at element `slot_off`
 * (token r's qkv at row r, its cos/sin at row r): their keys and values into the cache, then each
 * token's query heads attend over keys 0 .. start + r (causal), as n calls of `decode_attention`
 * would, the work split over kv heads and blocks of queries on `threads` threads. Returns 0, or -1
 * when out of memory. */
int prefill_attention(int64_t n, int64_t heads, int64_t kv, int64_t d, const void *qkv, int64_t qkv_stride,
                      const float *cos, const float *sin, void *k_cache, void *v_cache, int64_t slot_off,
                      int64_t s_head, int64_t s_pos, int64_t start, void *out, int bf16, int kv16, int threads) {
    const int64_t g = heads / kv, T = start + n, nblk = (T + KB - 1) / KB, nq = (n * g + QB - 1) / QB;
    const int kvk = bf16 ? 1 : kv16 ? 2 : 0;
    float *kt = malloc(sizeof(float) * (size_t)(kv * nblk * KB * d)), *vf = malloc(sizeof(float) * (size_t)(kv * T * d));
    if (!kt || !vf) {
        free(kt);
        free(vf);
        return -1;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *row = malloc(sizeof(float) * (size_t)d);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < kv; j++) {
            if (!row) continue;
            const int64_t base = slot_off + j * s_head;
            for (int64_t r = 0; r < n; r++) { /* constant kinds: each its own loops */
                const int64_t at = base + (start + r) * s_pos;
                if (kvk == 1)
                    store_kv(r, j, heads, kv, d, qkv, qkv_stride, cos + r * d, sin + r * d, k_cache, v_cache, at, row, 1, 1);
                else if (kvk == 2)
                    store_kv(r, j, heads, kv, d, qkv, qkv_stride, cos + r * d, sin + r * d, k_cache, v_cache, at, row, 0, 2);
                else
                    store_kv(r, j, heads, kv, d, qkv, qkv_stride, cos + r * d, sin + r * d, k_cache, v_cache, at, row, 0, 0);
            }
            float *ktj = kt + j * nblk * KB * d, *vfj = vf + j * T * d;
            if (kvk == 1)
                load_head(k_cache, v_cache, base, s_pos, T, d, ktj, vfj, row, 1);
            else if (kvk == 2)
                load_head(k_cache, v_cache, base, s_pos, T, d, ktj, vfj, row, 2);
            else
                load_head(k_cache, v_cache, base, s_pos, T, d, ktj, vfj, row, 0);
        }
        /* (the implicit barrier: every head's keys are in place before any query reads them) */
        float *sc = malloc(sizeof(float) * (size_t)(QB * T + QB * d));
        if (!row || !sc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < kv * nq; task++) {
            if (!row || !sc) continue;
            const int64_t j = task / nq, q0 = (task % nq) * QB;
            const float *ktj = kt + j * nblk * KB * d, *vfj = vf + j * T * d;
            if (bf16)
                prefill_queries(q0, n, j, heads, kv, d, qkv, qkv_stride, cos, sin, start, ktj, vfj, out, sc,
                                sc + QB * T, 1);
            else
                prefill_queries(q0, n, j, heads, kv, d, qkv, qkv_stride, cos, sin, start, ktj, vfj, out, sc,
                                sc + QB * T, 0);
        }
        free(sc);
        free(row);
    }
    free(kt);
    free(vf);
    return failed ? -1 : 0;
}


/* For each row r (one new token at position pos[r], stored in cache slot slot[r]):
 *   qkv[r] = [q (heads*d) | k (kv*d) | v (kv*d)] at row stride qkv_stride (elements);
 *   k and v of the token go to the cache at [slot, kv head, pos] (k rotated), then every query head
 *   attends (softmax in fp32, scaled by 1/sqrt(d)) over the slot's keys 0..pos;
 *   out[r] = the heads' outputs side by side [heads*d].
 * cos/sin: [n, d] fp32. Cache strides in elements: per slot, per kv head, per position (d contiguous).
 * kv16: the cache is fp16 (with bf16 = 0); otherwise it holds the activations' type.
 */
int decode_attention(int64_t n, int64_t heads, int64_t kv, int64_t d, const void *qkv, int64_t qkv_stride,
                     const float *cos, const float *sin, void *k_cache, void *v_cache, int64_t s_slot,
                     int64_t s_head, int64_t s_pos, const int64_t *slot, const int64_t *pos, void *out, int bf16,
                     int kv16, int threads) {
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
        /* constant kinds: each combination compiles to its own vectorised loops */
        if (bf16)
            attend(r, j, heads, kv, d, qkv, qkv_stride, cos + r * d, sin + r * d, k_cache, v_cache, base, s_pos,
                   pos[r] + 1, out, sc, 1, 1);
        else if (kv16)
            attend(r, j, heads, kv, d, qkv, qkv_stride, cos + r * d, sin + r * d, k_cache, v_cache, base, s_pos,
                   pos[r] + 1, out, sc, 0, 2);
        else
            attend(r, j, heads, kv, d, qkv, qkv_stride, cos + r * d, sin + r * d, k_cache, v_cache, base, s_pos,
                   pos[r] + 1, out, sc, 0, 0);
        free(sc);
    }
    return failed ? -1 : 0;
}
