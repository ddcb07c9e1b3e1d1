// GCC vector types of W floats and the few operations on them that several CPU kernels share (attention.cpp's
// flash loops, matmul.cpp's GELU). Templates without target attributes: each kernel's entry points carry the
// target (AVX2 for W = 8, AVX-512 for W = 16) plus `flatten`, so they inline into ymm or zmm code there.
#pragma once

#include <cstdint>
#include <cstring>

#pragma GCC diagnostic ignored "-Wpsabi"  // vector types cross no ABI boundary: every template is inlined

namespace {

template <int W>
struct Vec {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef int32_t i __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
  typedef uint16_t h2 __attribute__((vector_size(4 * W)));  // 2W bf16
  typedef uint32_t u __attribute__((vector_size(4 * W)));
};

// Broadcast x to all lanes, written as a shuffle so that it compiles to one vbroadcastss (a lane-by-lane
// initialisation becomes a chain of vinsertps once inlined into the target-specific entry points).
template <int W>
inline typename Vec<W>::f splat(float x) {
  typename Vec<W>::f v = {};
  v[0] = x;
  if constexpr (W == 8) return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0);
  else return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
}

template <int W>
inline typename Vec<W>::f loadf(const float* p) {
  typename Vec<W>::f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int W>
inline void storef(float* p, typename Vec<W>::f v) {
  std::memcpy(p, &v, sizeof v);
}

// exp(x): Cephes expf. n = round(x / ln2), exp(r) for |r| <= ln2/2 by a degree-6 polynomial, times 2^n built
// in the exponent bits. About 1 ulp for x in [-87.3, 88.7]; smaller x is clamped (callers zero masked keys).
template <int W>
inline typename Vec<W>::f expv(typename Vec<W>::f x) {
  typedef typename Vec<W>::f F;
  x = x < splat<W>(-87.3f) ? splat<W>(-87.3f) : x;
  x = x > splat<W>(88.7f) ? splat<W>(88.7f) : x;
  const F magic = splat<W>(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const F n = (x * 1.44269504f + magic) - magic;
  F r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = splat<W>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + (r + 1.f);
  const typename Vec<W>::i e = (__builtin_convertvector(n, typename Vec<W>::i) + 127) << 23;
  F pow2n;
  std::memcpy(&pow2n, &e, sizeof pow2n);
  return p * pow2n;
}

}  // namespace
