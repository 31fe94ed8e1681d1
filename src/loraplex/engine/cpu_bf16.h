/* bf16 <-> fp32 for the CPU kernels (lora_cpu.c, quant_cpu.c), bit for bit as torch converts. */
#ifndef LORAPLEX_CPU_BF16_H
#define LORAPLEX_CPU_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t b;
    memcpy(&b, &f, 4);
    const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    return (uint16_t)((b & 0x7fffffffu) > 0x7f800000u ? (b >> 16) | 0x40u : rounded); /* a select: vectorises */
}
#endif
