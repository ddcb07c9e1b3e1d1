// Scalar conversions between fp32 and the two 16-bit float formats, shared by matmul.cpp and attention.cpp.
// Widening is exact. Narrowing rounds to nearest even, as torch's casts do (tested bit-equal on every fp16 value).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

static inline float bf16_to_f32(uint16_t h) {  // the bf16 bits are the high half of the fp32
  uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits. Subnormals, infinities and NaN payloads kept.
static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float f = (float)mant * 5.9604644775390625e-08f;
    return sign ? -f : f;
  }
  const uint32_t u = sign | (exp == 0x1f ? 0x7f800000u | (mant << 13) : ((exp + 112) << 23) | (mant << 13));
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The FP16 library's fp16_ieee_from_fp32_value (c10::Half's portable path): scaling by 2^112 then 2^-110 makes
// values too large for fp16 infinite; adding a power of two chosen from f's exponent lets the fp32 adder round
// the mantissa at fp16's precision (subnormals included). A NaN becomes 0x7e00 with its sign.
static inline uint16_t f32_to_f16(float f) {
  uint32_t w, b;
  std::memcpy(&w, &f, 4);
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t shl1 = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1 & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  const uint32_t ub = (bias >> 1) + 0x07800000u;
  float fb;
  std::memcpy(&fb, &ub, 4);
  base = fb + base;
  std::memcpy(&b, &base, 4);
  const uint32_t nonsign = ((b >> 13) & 0x7c00u) + (b & 0x0fffu);
  return (uint16_t)((sign >> 16) | (shl1 > 0xff000000u ? 0x7e00u : nonsign));
}
