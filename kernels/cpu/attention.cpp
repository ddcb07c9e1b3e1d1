// CPU fused attention: decode (one query vs a KV cache) and flash-style prefill.
//
// The exact semantics are the plain-PyTorch references in kernels/attention_ref.py:
//   s_j = scale * (q . k_j) + bias_j        bias: ALiBi slope[h]*key_pos[b,j], a T5 bucket bias, or a bias row
//   p   = softmax_j(s),  masked keys (key_pos == -1, causal j > t + q_offset) get p = 0
//   out = sum_j p_j v_j                     a query whose keys are all masked returns 0
// Both kernels use the online softmax of flash attention: keys are visited in blocks of KB = 64, each query
// row keeps a running max m, a running sum l = sum exp(s - m) and an unnormalised output O; a new block with
// a larger max rescales l and O by exp(m_old - m_new). No (B, H, T, S) tensor is ever materialised.
//
// Plain C++ on raw pointers (no torch headers); attention_op.cpp wraps these as torch ops. The flash loops are
// written once on four block primitives (dots, qk tile, softmax update, p.V update). The primitives exist as
// plain scalar loops and as one SIMD template instantiated for AVX2+FMA and AVX-512 with per-function target
// attributes (plus bf16 decode dot products by vdpbf16ps where the CPU has AVX512_BF16); the best set the CPU
// supports is picked at run time, so the .so is built without -march and runs on any x86-64.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "floats.h"
#include "vec.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // vector types cross no ABI boundary: every template is inlined

namespace {

constexpr int KB = 64;   // keys per block
constexpr int BQ = 32;   // prefill query rows per work item
constexpr int MR = 4;    // query rows per register tile
constexpr float NEG_INF = -INFINITY;

// SIMD levels: 0 scalar, 1 AVX2+FMA, 2 AVX-512 (F, BW, VL, DQ), 4 AVX-512 with AVX512_BF16 (bf16 dot products by
// vdpbf16ps); 3 = test-only AVX2 build of the AVX-512 code.
int g_simd_cap = 4;  // highest level allowed (mbattn_simd_level; 0 forces the scalar code)

int cpu_simd_level() {
  static const int level = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
                               ? (__builtin_cpu_supports("avx512bf16") ? 4 : 2)
                               : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                  __builtin_cpu_supports("f16c"))
                                   ? 1
                                   : 0;
  return level;
}
int simd_level() {
  if (g_simd_cap == 3) return cpu_simd_level() >= 1 ? 3 : 0;
  const int level = std::min(g_simd_cap, cpu_simd_level());
  return level == 3 ? 2 : level;
}

// Element types of q, k, v and out (attention_op.cpp): fp32, bf16, fp16.
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

inline float load_elem(const void* p, int dt, int64_t i) {
  return dt == DT_BF16 ? bf16_to_f32(((const uint16_t*)p)[i])
         : dt == DT_F16 ? f16_to_f32(((const uint16_t*)p)[i])
                        : ((const float*)p)[i];
}

inline const void* offset(const void* p, int dt, int64_t elems) {
  return (const char*)p + elems * (dt == DT_F32 ? 4 : 2);
}

// The bf16 layout of the SIMD code: an in-lane unpack (vpunpcklwd / vpunpckhwd with zero) widens 2W bf16 to two
// fp32 vectors without a lane-crossing shuffle, but in the order of the 128-bit lanes: 16 bf16 (AVX2) give
// elements {0-3, 8-11} and {4-7, 12-15}, 32 bf16 (AVX-512) give {0-3, 8-11, 16-19, 24-27} and {4-7, ..., 28-31}.
// So with bf16 inputs the primitives keep q and O rows in that order, block of 2W by block of 2W: row position p
// holds column perm_col(W, p), which rotates bits 2..top of p (top = log2(2W) - 1: bit top moves to bit 2, bits
// 2..top-1 move up by one). W = 0: the natural order.
inline int64_t perm_col(int W, int64_t p) {
  if (W == 0) return p;
  const int top = W == 8 ? 3 : 4;
  const int64_t rotated = ((int64_t(4) << (top - 1)) - 1) & ~int64_t(3);  // bits 2..top
  return (p & ~rotated) | ((p >> top) & 1) << 2 | ((p >> 2) & ((1 << (top - 2)) - 1)) << 3;
}
// The layout of rows for primitives of W lanes: W (perm_col order) with bf16 inputs and whole blocks of 2W
// columns, else 0 (natural order).
inline int perm_layout(int W, int dt, int64_t D) {
  return (W == 8 || W == 16) && dt == DT_BF16 && D % (2 * W) == 0 ? W : 0;
}

// A call's row layout as tables (D <= 256), built once per call: col[p] is the column at row position p, pos[d]
// the row position of column d.
struct RowOrder {
  int16_t col[256], pos[256];
  RowOrder(int W, int64_t D) {
    for (int64_t p = 0; p < D; p++) col[p] = (int16_t)perm_col(W, p), pos[col[p]] = (int16_t)p;
  }
};

// out[o0 : o0 + D] = acc * inv, rounded to out's dtype; acc in the order of `order`.
inline void store_row(void* out, int dt, int64_t o0, const float* acc, int64_t D, float inv,
                      const RowOrder& order) {
  for (int64_t d = 0; d < D; d++) {
    const float v = acc[order.pos[d]] * inv;
    if (dt == DT_BF16)
      ((uint16_t*)out)[o0 + d] = f32_to_bf16(v);
    else if (dt == DT_F16)
      ((uint16_t*)out)[o0 + d] = f32_to_f16(v);
    else
      ((float*)out)[o0 + d] = v;
  }
}

// T5 relative-position bucket, exactly as transformers' _relative_position_bucket (fp32 log, trunc).
int t5_bucket(int64_t rel, bool bidirectional, int num_buckets, int max_distance) {
  int nb = num_buckets, bucket = 0;
  if (bidirectional) {
    nb /= 2;
    if (rel > 0) bucket = nb;
    rel = rel < 0 ? -rel : rel;
  } else {
    rel = rel < 0 ? -rel : 0;
  }
  const int max_exact = nb / 2;
  if (rel < max_exact) return bucket + (int)rel;
  const float denom = (float)std::log((double)max_distance / (double)max_exact);
  const float lg = std::log((float)rel / (float)max_exact);
  const int large = max_exact + (int)(lg / denom * (float)(nb - max_exact));
  return bucket + std::min(large, nb - 1);
}

// ---------------------------------------------------------------------------------------------------------
// Block primitives. Shapes: KB keys per block, rows of a score tile are KB floats apart. k and v hold elements of
// type dt (DT_F32, DT_BF16, DT_F16), widened to fp32 as they are read; q, S, P and O are fp32.
//   dots(q, k, ks, n, D, dt, s)                s[j] = q . k[j*ks : j*ks + D]           j < n
//   qk(Q, KT, rows, D, S)                      S[r][c] = sum_d Q[r][d] KT[d][c]         Q (rows, D), KT (D, KB)
//   softmax(S, rows, scale, keybias, rowbias, limit, m, l, corr)
//       x = S*scale + keybias[c] + rowbias[r][c], x = -inf for c >= limit[r]
//       m_new = max(m, max_c x); corr = exp(m - m_new); l = l*corr + sum_c exp(x - m_new); S <- exp(x - m_new)
//   pv(O, P, corr, v, vs, rows, n, D, dt)      O[r] = O[r]*corr[r] + sum_{j<n} P[r][j] v[j*vs : j*vs + D]

struct Ops {
  void (*dots)(const float*, const void*, int64_t, int, int, int, float*);
  void (*qk)(const float*, const float*, int, int, float*);
  void (*softmax)(float*, int, float, const float*, const float* const*, const int*, float*, float*, float*);
  void (*pv)(float*, const float*, const float*, const void*, int64_t, int, int, int, int);
  int width;  // lanes of the SIMD set (1: scalar); decides the layout of dots' q and pv's O rows
  int layout(int dt, int64_t D) const { return perm_layout(width, dt, D); }
};

// ---- scalar ----

void dots_scalar(const float* q, const void* k, int64_t ks, int n, int D, int dt, float* s) {
  for (int j = 0; j < n; j++) {
    const void* kj = offset(k, dt, j * ks);
    float acc = 0.f;
    for (int d = 0; d < D; d++) acc += q[d] * load_elem(kj, dt, d);
    s[j] = acc;
  }
}

void qk_scalar(const float* Q, const float* KT, int rows, int D, float* S) {
  for (int r = 0; r < rows; r++)
    for (int c = 0; c < KB; c++) {
      float acc = 0.f;
      for (int d = 0; d < D; d++) acc += Q[r * D + d] * KT[d * KB + c];
      S[r * KB + c] = acc;
    }
}

void softmax_scalar(float* S, int rows, float scale, const float* keybias, const float* const* rowbias,
                    const int* limit, float* m, float* l, float* corr) {
  for (int r = 0; r < rows; r++) {
    float* x = S + r * KB;
    float mx = NEG_INF;
    for (int c = 0; c < KB; c++) {
      x[c] = c < limit[r] ? x[c] * scale + keybias[c] + (rowbias ? rowbias[r][c] : 0.f) : NEG_INF;
      mx = std::max(mx, x[c]);
    }
    const float m_new = std::max(m[r], mx);
    if (m_new == NEG_INF) {  // nothing visible yet: keep the state, contribute nothing
      corr[r] = 1.f;
      for (int c = 0; c < KB; c++) x[c] = 0.f;
      continue;
    }
    corr[r] = std::exp(m[r] - m_new);
    float sum = 0.f;
    for (int c = 0; c < KB; c++) {
      x[c] = x[c] == NEG_INF ? 0.f : std::exp(x[c] - m_new);
      sum += x[c];
    }
    l[r] = l[r] * corr[r] + sum;
    m[r] = m_new;
  }
}

void pv_scalar(float* O, const float* P, const float* corr, const void* v, int64_t vs, int rows, int n, int D,
               int dt) {
  for (int r = 0; r < rows; r++) {
    float* o = O + r * D;
    for (int d = 0; d < D; d++) o[d] *= corr[r];
    for (int j = 0; j < n; j++) {
      const float p = P[r * KB + j];
      if (p == 0.f) continue;
      const void* vj = offset(v, dt, j * vs);
      for (int d = 0; d < D; d++) o[d] += p * load_elem(vj, dt, d);
    }
  }
}

// ---- SIMD: written once on GCC vector types of W floats, compiled for AVX2 (W = 8) and AVX-512 (W = 16) ----
// The generic templates carry no target attribute; each entry point below carries one plus `flatten`, so the
// template is inlined there and its vector arithmetic becomes ymm or zmm code (FMAs via -ffp-contract=fast).
// The vector types, splat, loadf / storef and expv are in vec.h (matmul.cpp's GELU uses them too).

// 8 fp16 -> fp32 (vcvtph2ps, exact). The intrinsic needs F16C where it is compiled: in this function, inlined
// into the entry points (flatten), whose targets include f16c. GCC widens a vector of _Float16 element by element.
__attribute__((target("avx,f16c"))) inline __m256 cvt8_f16(const void* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}

// W elements of fp32, bf16 or fp16 -> fp32. bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32.
// Written as one shuffle that puts each bf16 in the high half of a 32-bit lane (zeros below): GCC lowers a
// __builtin_convertvector widening to two half-width conversions plus an insert instead.
template <int W>
inline typename Vec<W>::f load(const void* p, int dt) {
  if (dt == DT_F32) return loadf<W>((const float*)p);
  if (dt == DT_F16) {  // W = 16: two conversions joined by one insert (writing the halves through memory stalls)
    typename Vec<8>::f lo, hi;
    const __m256 a = cvt8_f16(p);
    std::memcpy(&lo, &a, sizeof lo);
    if constexpr (W == 8) {
      return lo;
    } else {
      const __m256 b = cvt8_f16((const uint16_t*)p + 8);
      std::memcpy(&hi, &b, sizeof hi);
      return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    }
  }
  typedef uint16_t H2 __attribute__((vector_size(4 * W)));
  typename Vec<W>::h h, z = {};
  std::memcpy(&h, p, sizeof h);
  H2 wide;
  if constexpr (W == 8)
    wide = __builtin_shufflevector(z, h, 0, 8, 0, 9, 0, 10, 0, 11, 0, 12, 0, 13, 0, 14, 0, 15);
  else
    wide = __builtin_shufflevector(z, h, 0, 16, 0, 17, 0, 18, 0, 19, 0, 20, 0, 21, 0, 22, 0, 23, 0, 24, 0, 25, 0,
                                   26, 0, 27, 0, 28, 0, 29, 0, 30, 0, 31);
  typename Vec<W>::f f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

// 2W bf16 -> two W-lane fp32 vectors in the perm_col order: lo = elements 0-3, 8-11, ..., hi = 4-7, 12-15, ...
// (vpunpcklwd / vpunpckhwd with zero: in-lane, one instruction each).
template <int W>
inline void load2_bf16_perm(const void* p, typename Vec<W>::f& lo, typename Vec<W>::f& hi) {
  typedef typename Vec<W>::h2 H2;
  H2 h, z = {};
  std::memcpy(&h, p, sizeof h);
  // the exact vpunpcklwd / vpunpckhwd index patterns (z is zero, so any z index would do, but GCC then picks vpermq)
  H2 a, b;
  if constexpr (W == 8) {
    a = __builtin_shufflevector(z, h, 0, 16, 1, 17, 2, 18, 3, 19, 8, 24, 9, 25, 10, 26, 11, 27);
    b = __builtin_shufflevector(z, h, 4, 20, 5, 21, 6, 22, 7, 23, 12, 28, 13, 29, 14, 30, 15, 31);
  } else {
    a = __builtin_shufflevector(z, h, 0, 32, 1, 33, 2, 34, 3, 35, 8, 40, 9, 41, 10, 42, 11, 43, 16, 48, 17, 49, 18,
                                50, 19, 51, 24, 56, 25, 57, 26, 58, 27, 59);
    b = __builtin_shufflevector(z, h, 4, 36, 5, 37, 6, 38, 7, 39, 12, 44, 13, 45, 14, 46, 15, 47, 20, 52, 21, 53, 22,
                                54, 23, 55, 28, 60, 29, 61, 30, 62, 31, 63);
  }
  std::memcpy(&lo, &a, sizeof lo);
  std::memcpy(&hi, &b, sizeof hi);
}

// Two consecutive vectors of W elements at p -> fp32, in the perm_col order when perm (bf16 only).
template <int W>
inline void load_pair(const void* p, int dt, bool perm, typename Vec<W>::f& lo, typename Vec<W>::f& hi) {
  if (perm) return load2_bf16_perm<W>(p, lo, hi);
  lo = load<W>(p, dt);
  hi = load<W>(offset(p, dt, W), dt);
}

// Horizontal sum / max as a tree of halves (log2 W steps).
template <int W>
inline float hsum(typename Vec<W>::f v) {
  if constexpr (W == 4) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else {
    typename Vec<W / 2>::f lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, (const char*)&v + sizeof lo, sizeof hi);
    return hsum<W / 2>(lo + hi);
  }
}

template <int W>
inline float hmax(typename Vec<W>::f v) {
  if constexpr (W == 4) {
    return std::max(std::max(v[0], v[2]), std::max(v[1], v[3]));
  } else {
    typename Vec<W / 2>::f lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, (const char*)&v + sizeof lo, sizeof hi);
    return hmax<W / 2>(lo > hi ? lo : hi);
  }
}

// Four rows' horizontal sums at once: a[0..3] (W lanes each) -> r[0..3]. Two levels of a transposed reduction
// (pairs of vectors: the lower half of every group of G lanes added to its upper half) leave 4 partials per row
// in groups of 4 lanes, summed by two in-vector shuffles: about 4 instructions per row instead of log2 W
// dependent steps each.
template <int W>
inline typename Vec<W>::i halves_mask(int G, bool upper) {
  typename Vec<W>::i m;
  for (int t = 0; t < W; t++) {  // output lane t comes from a (t < W/2) or b, group t % (W/2) / (G/2)
    const int p = t % (W / 2);
    m[t] = (t < W / 2 ? 0 : W) + p / (G / 2) * G + p % (G / 2) + (upper ? G / 2 : 0);
  }
  return m;
}

template <int W>
inline typename Vec<W>::f pair_halves(typename Vec<W>::f a, typename Vec<W>::f b, int G) {
  return __builtin_shuffle(a, b, halves_mask<W>(G, false)) + __builtin_shuffle(a, b, halves_mask<W>(G, true));
}

template <int W>
inline void hsum4(const typename Vec<W>::f* a, float* r) {
  typedef typename Vec<W>::f F;
  typedef typename Vec<W>::i I;
  // row r's W/4 partials in lanes [r*W/4, (r+1)*W/4)
  F v = pair_halves<W>(pair_halves<W>(a[0], a[1], W), pair_halves<W>(a[2], a[3], W), W / 2);
  I swap2, swap1;
  for (int t = 0; t < W; t++) swap2[t] = t ^ 2, swap1[t] = t ^ 1;
  if constexpr (W == 16) v += __builtin_shuffle(v, v, swap2);  // 4 partials per row -> 2 (W = 8 has 2 already)
  v += __builtin_shuffle(v, v, swap1);
  for (int i = 0; i < 4; i++) r[i] = v[i * W / 4];
}

// 4 keys at a time, two FMA chains per key (a: even vectors, b: odd ones) and one combined horizontal sum. Each
// key's row is read in order, key after key: the K stream reaches memory in address order (the same arithmetic
// with the loop over d outside the keys read K 10-20% slower cold). DC: the head dim as a
// constant (0: run-time D), so the loop over d unrolls and the four keys' chains still overlap. Keys past n are
// recomputed from the last one, never stored.
template <int W, int DC>
inline void dots4(const float* q, const void* k, int64_t ks, int n, int D, int dt, bool perm, float* s) {
  typedef typename Vec<W>::f F;
  if constexpr (DC > 0) D = DC;
  for (int j0 = 0; j0 < n; j0 += 4) {
    F a[4], b[4];
    for (int r = 0; r < 4; r++) {
      const void* kr = offset(k, dt, std::min(j0 + r, n - 1) * ks);
      a[r] = b[r] = splat<W>(0.f);
      int d = 0;
      for (; d + 2 * W <= D; d += 2 * W) {
        F lo, hi;
        load_pair<W>(offset(kr, dt, d), dt, perm, lo, hi);
        a[r] += loadf<W>(q + d) * lo;
        b[r] += loadf<W>(q + d + W) * hi;
      }
      if (d < D) a[r] += loadf<W>(q + d) * load<W>(offset(kr, dt, d), dt);  // an odd number of vectors
    }
    F acc[4];
    for (int r = 0; r < 4; r++) acc[r] = a[r] + b[r];
    alignas(32) float r4[4];
    hsum4<W>(acc, r4);
    for (int r = 0; r < 4 && j0 + r < n; r++) s[j0 + r] = r4[r];
  }
}

template <int W>
inline void dots_body(const float* q, const void* k, int64_t ks, int n, int D, int dt, float* s) {
  typedef typename Vec<W>::f F;
  const int Dv = D / W * W;
  if (Dv == D) {
    const bool perm = perm_layout(W, dt, D) != 0;  // q in the perm_col order (Ops::layout); then 2W divides D
    if (D == 64)
      dots4<W, 64>(q, k, ks, n, D, dt, perm, s);
    else if (D == 128)
      dots4<W, 128>(q, k, ks, n, D, dt, perm, s);
    else
      dots4<W, 0>(q, k, ks, n, D, dt, perm, s);
    return;
  }
  for (int j = 0; j < n; j++) {  // head dims that are not a multiple of W: one key at a time
    const void* kj = offset(k, dt, j * ks);
    F a0 = splat<W>(0.f), a1 = splat<W>(0.f);
    int d = 0;
    for (; d + 2 * W <= Dv; d += 2 * W) {  // two independent FMA chains
      a0 += loadf<W>(q + d) * load<W>(offset(kj, dt, d), dt);
      a1 += loadf<W>(q + d + W) * load<W>(offset(kj, dt, d + W), dt);
    }
    if (d < Dv) a0 += loadf<W>(q + d) * load<W>(offset(kj, dt, d), dt);
    float acc = hsum<W>(a0 + a1);
    for (d = Dv; d < D; d++) acc += q[d] * load_elem(kj, dt, d);
    s[j] = acc;
  }
}

// The dtype is a run-time value; calling the body with a literal lets the compiler fold every dtype branch out
// of the inner loops (the entry points are `flatten`, so the body is inlined once per dtype).
template <int W>
inline void dots_simd(const float* q, const void* k, int64_t ks, int n, int D, int dt, float* s) {
  switch (dt) {
    case DT_BF16: return dots_body<W>(q, k, ks, n, D, DT_BF16, s);
    case DT_F16: return dots_body<W>(q, k, ks, n, D, DT_F16, s);
    default: return dots_body<W>(q, k, ks, n, D, DT_F32, s);
  }
}

// S tile: MR rows x (NCV * W) columns per register tile; for each d, broadcast Q[r][d] times a row of K^T.
// NCV = 4 with AVX-512 (16 zmm accumulators of 32), 2 with AVX2 (8 ymm of 16).
template <int W>
inline void qk_simd(const float* Q, const float* KT, int rows, int D, float* S) {
  typedef typename Vec<W>::f F;
  constexpr int NCV = W == 16 ? 4 : 2;
  for (int r0 = 0; r0 < rows; r0 += MR)
    for (int c0 = 0; c0 < KB; c0 += NCV * W) {
      F acc[MR][NCV];
      for (int r = 0; r < MR; r++)
        for (int c = 0; c < NCV; c++) acc[r][c] = splat<W>(0.f);
      const float* q = Q + r0 * D;
      for (int d = 0; d < D; d++) {
        F kv[NCV];
        for (int c = 0; c < NCV; c++) kv[c] = loadf<W>(KT + d * KB + c0 + c * W);
        for (int r = 0; r < MR; r++) {
          const F qb = splat<W>(q[r * D + d]);
          for (int c = 0; c < NCV; c++) acc[r][c] += qb * kv[c];
        }
      }
      for (int r = 0; r < MR; r++)
        for (int c = 0; c < NCV; c++) storef<W>(S + (r0 + r) * KB + c0 + c * W, acc[r][c]);
    }
}

template <int W>
inline void softmax_simd(float* S, int rows, float scale, const float* keybias, const float* const* rowbias,
                         const int* limit, float* m, float* l, float* corr) {
  typedef typename Vec<W>::f F;
  typedef typename Vec<W>::i I;
  constexpr int NV = KB / W;
  const F ninf = splat<W>(NEG_INF);
  I lane;
  for (int i = 0; i < W; i++) lane[i] = i;
  for (int r = 0; r < rows; r++) {
    float* x = S + r * KB;
    F xv[NV];
    F mx = ninf;
    for (int c = 0; c < NV; c++) {
      F t = loadf<W>(x + c * W) * scale + loadf<W>(keybias + c * W);
      if (rowbias) t += loadf<W>(rowbias[r] + c * W);
      xv[c] = lane + c * W < limit[r] ? t : ninf;  // causal limit: columns >= limit are invisible
      mx = xv[c] > mx ? xv[c] : mx;
    }
    const float m_new = std::max(m[r], hmax<W>(mx));
    if (m_new == NEG_INF) {  // nothing visible yet: keep the state, contribute nothing
      corr[r] = 1.f;
      for (int c = 0; c < NV; c++) storef<W>(x + c * W, splat<W>(0.f));
      continue;
    }
    corr[r] = std::exp(m[r] - m_new);
    F sum = splat<W>(0.f);
    for (int c = 0; c < NV; c++) {
      const F p = xv[c] == ninf ? splat<W>(0.f) : expv<W>(xv[c] - m_new);
      storef<W>(x + c * W, p);
      sum += p;
    }
    l[r] = l[r] * corr[r] + hsum<W>(sum);
    m[r] = m_new;
  }
}

// R rows x NV vectors of output columns [d0, d0 + NV*W): O = O*corr + P @ V.
template <int W, int R, int NV>
inline void pv_tile(float* O, const float* P, const float* corr, const void* v, int64_t vs, int n, int D, int d0,
                    int dt) {
  typedef typename Vec<W>::f F;
  // One row of at most 4 AVX-512 vectors (a decode row, head dim 64) has too few chains for the FMA latency:
  // even and odd keys then go to two sets of accumulators, added at the end.
  constexpr int SETS = W == 16 && R == 1 && NV <= 4 ? 2 : 1;
  F acc[SETS][R][NV];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < NV; c++) {
      acc[0][r][c] = loadf<W>(O + r * D + d0 + c * W) * corr[r];
      if constexpr (SETS == 2) acc[1][r][c] = splat<W>(0.f);
    }
  const bool perm = perm_layout(W, dt, D) != 0;  // O in the perm_col order (Ops::layout); NV is even then
  auto key = [&](F(&a)[R][NV], int j) {
    const void* vj = offset(v, dt, j * vs + d0);
    F pb[R];
    for (int r = 0; r < R; r++) pb[r] = splat<W>(P[r * KB + j]);
    // Two V vectors at a time, used at once: loading all of them first needs more than AVX2's 16 registers
    // next to 8 accumulators (GCC then keeps the accumulators on the stack).
    for (int c = 0; c < NV; c += 2) {
      if (c + 1 == NV) {
        const F lo = load<W>(offset(vj, dt, c * W), dt);
        for (int r = 0; r < R; r++) a[r][c] += pb[r] * lo;
        break;
      }
      F lo, hi;
      load_pair<W>(offset(vj, dt, c * W), dt, perm, lo, hi);
      for (int r = 0; r < R; r++) {
        a[r][c] += pb[r] * lo;
        a[r][c + 1] += pb[r] * hi;
      }
    }
  };
  int j = 0;
  for (; j + SETS <= n; j += SETS)
    for (int set = 0; set < SETS; set++) key(acc[set], j + set);
  for (; j < n; j++) key(acc[0], j);
  for (int r = 0; r < R; r++)
    for (int c = 0; c < NV; c++) {
      if constexpr (SETS == 2) acc[0][r][c] += acc[1][r][c];
      storef<W>(O + r * D + d0 + c * W, acc[0][r][c]);
    }
}

// Full vectors in chunks of up to NVMAX, the last D % W columns by the scalar code. Each accumulator is one FMA
// chain over the keys, so a chunk needs as many as the FMA latency x throughput (4-10) to run at full rate:
// 4 zmm (AVX-512), 8 ymm for one row on AVX2 (16 registers in all), 2 ymm per row for 4 rows.
template <int W, int R>
inline void pv_rows(float* O, const float* P, const float* corr, const void* v, int64_t vs, int n, int D,
                    int dt) {
  constexpr int NVMAX = W == 16 ? 4 : R == 1 ? 8 : 2;
  const int Dv = D / W * W;
  int d0 = 0;
  for (; d0 + NVMAX * W <= Dv; d0 += NVMAX * W) pv_tile<W, R, NVMAX>(O, P, corr, v, vs, n, D, d0, dt);
  if constexpr (NVMAX > 4)  // head dims 80, 96: 8 + 2 or 8 + 4 vectors
    for (; d0 + 4 * W <= Dv; d0 += 4 * W) pv_tile<W, R, 4>(O, P, corr, v, vs, n, D, d0, dt);
  if constexpr (NVMAX > 2)
    for (; d0 + 2 * W <= Dv; d0 += 2 * W) pv_tile<W, R, 2>(O, P, corr, v, vs, n, D, d0, dt);
  for (; d0 < Dv; d0 += W) pv_tile<W, R, 1>(O, P, corr, v, vs, n, D, d0, dt);
  for (int r = 0; r < R; r++)
    for (int d = Dv; d < D; d++) {
      float acc = O[r * D + d] * corr[r];
      for (int j = 0; j < n; j++) acc += P[r * KB + j] * load_elem(offset(v, dt, j * vs), dt, d);
      O[r * D + d] = acc;
    }
}

template <int W>
inline void pv_body(float* O, const float* P, const float* corr, const void* v, int64_t vs, int rows, int n, int D,
                    int dt) {
  int r = 0;
  for (; r + MR <= rows; r += MR) pv_rows<W, MR>(O + r * D, P + r * KB, corr + r, v, vs, n, D, dt);
  for (; r < rows; r++) pv_rows<W, 1>(O + r * D, P + r * KB, corr + r, v, vs, n, D, dt);
}

template <int W>  // the dtype as a literal, as in dots_simd
inline void pv_simd(float* O, const float* P, const float* corr, const void* v, int64_t vs, int rows, int n, int D,
                    int dt) {
  switch (dt) {
    case DT_BF16: return pv_body<W>(O, P, corr, v, vs, rows, n, D, DT_BF16);
    case DT_F16: return pv_body<W>(O, P, corr, v, vs, rows, n, D, DT_F16);
    default: return pv_body<W>(O, P, corr, v, vs, rows, n, D, DT_F32);
  }
}

// Entry points per instruction set. Each one instantiates the generic template at its vector width.
#define MBATTN_ENTRY_POINTS(ISA, W, TARGET)                                                                       \
  __attribute__((target(TARGET), flatten)) void dots_##ISA(const float* q, const void* k, int64_t ks, int n,    \
                                                            int D, int dt, float* s) {                        \
    dots_simd<W>(q, k, ks, n, D, dt, s);                                                                       \
  }                                                                                                              \
  __attribute__((target(TARGET), flatten)) void qk_##ISA(const float* Q, const float* KT, int rows, int D,      \
                                                          float* S) {                                            \
    qk_simd<W>(Q, KT, rows, D, S);                                                                               \
  }                                                                                                              \
  __attribute__((target(TARGET), flatten)) void softmax_##ISA(float* S, int rows, float scale,                  \
                                                               const float* keybias, const float* const* rowbias, \
                                                               const int* limit, float* m, float* l, float* corr) { \
    softmax_simd<W>(S, rows, scale, keybias, rowbias, limit, m, l, corr);                                        \
  }                                                                                                              \
  __attribute__((target(TARGET), flatten)) void pv_##ISA(float* O, const float* P, const float* corr,           \
                                                          const void* v, int64_t vs, int rows, int n, int D,     \
                                                          int dt) {                                           \
    pv_simd<W>(O, P, corr, v, vs, rows, n, D, dt);                                                             \
  }                                                                                                              \
  const Ops k_##ISA = {dots_##ISA, qk_##ISA, softmax_##ISA, pv_##ISA, W};

MBATTN_ENTRY_POINTS(avx2, 8, "avx2,fma,f16c")
MBATTN_ENTRY_POINTS(avx512, 16, "avx512f,avx512bw,avx512vl,avx512dq,f16c")
// Testing aid: the 16-wide (AVX-512) template logic compiled for AVX2 (each vector is two ymm), so machines
// without AVX-512 still exercise every line the AVX-512 build runs.
MBATTN_ENTRY_POINTS(avx2_w16, 16, "avx2,fma,f16c")

// bf16 dot products with vdpbf16ps (AVX512_BF16): one instruction multiplies 32 bf16 pairs and adds them into 16
// fp32 sums, where the generic code widens every 16 values and then runs an FMA. The products of two bf16 are
// exact in fp32 and each addition rounds once, as in the FMAs; only the order of the additions differs. q arrives
// as fp32 in the perm_col(16, .) order (Ops::layout) and goes back to natural-order bf16 pairs, exactly (it was
// bf16): in each 128-bit lane, 4 columns from lo and the next 4 from hi, so one vpackusdw of their high halves.
// fp32 inputs and head dims that are not a multiple of 32 take the AVX-512 code.
#define MBATTN_BF16DP_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
// 4 keys at a time, each row read in order (dots4), two chains per key (a: even 32-column chunks, b: odd ones).
template <int DC>
MBATTN_BF16DP_TARGET inline void dots4_bf16dp(const __m512bh* qb, const void* k, int64_t ks, int n, int D,
                                              float* s) {
  if constexpr (DC > 0) D = DC;
  for (int j0 = 0; j0 < n; j0 += 4) {
    __m512 a[4], b[4];
    for (int r = 0; r < 4; r++) {
      const uint16_t* kr = (const uint16_t*)k + std::min(j0 + r, n - 1) * ks;
      a[r] = b[r] = _mm512_setzero_ps();
      int c = 0;
      for (; c + 2 <= D / 32; c += 2) {
        a[r] = _mm512_dpbf16_ps(a[r], qb[c], (__m512bh)_mm512_loadu_si512(kr + 32 * c));
        b[r] = _mm512_dpbf16_ps(b[r], qb[c + 1], (__m512bh)_mm512_loadu_si512(kr + 32 * c + 32));
      }
      if (c < D / 32) a[r] = _mm512_dpbf16_ps(a[r], qb[c], (__m512bh)_mm512_loadu_si512(kr + 32 * c));
    }
    Vec<16>::f acc[4];
    for (int r = 0; r < 4; r++) acc[r] = (Vec<16>::f)_mm512_add_ps(a[r], b[r]);
    alignas(32) float r4[4];
    hsum4<16>(acc, r4);
    for (int r = 0; r < 4 && j0 + r < n; r++) s[j0 + r] = r4[r];
  }
}

MBATTN_BF16DP_TARGET __attribute__((flatten)) void dots_avx512bf16(const float* q, const void* k, int64_t ks, int n,
                                                                   int D, int dt, float* s) {
  if (dt != DT_BF16 || D % 32 != 0) return dots_avx512(q, k, ks, n, D, dt, s);
  __m512bh qb[256 / 32];
  for (int c = 0; c < D / 32; c++) {
    const __m512i lo = _mm512_srli_epi32(_mm512_castps_si512(_mm512_loadu_ps(q + 32 * c)), 16);
    const __m512i hi = _mm512_srli_epi32(_mm512_castps_si512(_mm512_loadu_ps(q + 32 * c + 16)), 16);
    qb[c] = (__m512bh)_mm512_packus_epi32(lo, hi);
  }
  if (D == 64)
    dots4_bf16dp<64>(qb, k, ks, n, D, s);
  else if (D == 128)
    dots4_bf16dp<128>(qb, k, ks, n, D, s);
  else
    dots4_bf16dp<0>(qb, k, ks, n, D, s);
}
const Ops k_avx512bf16 = {dots_avx512bf16, qk_avx512, softmax_avx512, pv_avx512, 16};

const Ops kScalar = {dots_scalar, qk_scalar, softmax_scalar, pv_scalar, 1};

const Ops& ops() {
  switch (simd_level()) {
    case 4: return k_avx512bf16;
    case 3: return k_avx2_w16;
    case 2: return k_avx512;
    case 1: return k_avx2;
    default: return kScalar;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Decode: work item = (b, h, chunk of keys). The chunks split the keys of a row when B*H alone cannot keep all
// threads busy (split-K); each item leaves (m, l, O) and a combine step merges them per (b, h). With one
// chunk per row the item writes its output directly: one OpenMP region per call. A thread reads the K of a group
// of items first (scores), then their V (the p.V sums): one memory stream at a time.

struct Partial {
  float m, l;
};

}  // namespace

// cap >= 0 sets the highest SIMD level allowed (0 forces scalar); returns the level now in use.
extern "C" int mbattn_simd_level(int cap) {
  if (cap >= 0) g_simd_cap = cap;
  return simd_level();
}

// q (B, H, D) strides q_st; k, v (B, H, >=L, D) strides k_st / v_st (elements, last dim contiguous);
// key_pos (B, L); one of: alibi (H,), t5_table (num_buckets, H) + t5_qpos (B,), bias (H, L); out (B, H, D).
extern "C" void mbattn_decode(const void* q, const void* k, const void* v, void* out, int dtype, int64_t B,
                              int64_t H, int64_t L, int64_t D, const int64_t* q_st, const int64_t* k_st,
                              const int64_t* v_st, const int32_t* key_pos, float scale, const float* alibi,
                              const float* t5_table, int64_t num_buckets, const int32_t* t5_qpos, int t5_bidir,
                              int64_t t5_max_distance, const float* bias) {
  const int dt = dtype;  // DT_F32, DT_BF16 or DT_F16
  const Ops& op = ops();
  // T5 buckets depend on (b, j) only: compute the logs once, not once per head. (B, L)
  std::vector<int32_t> bucket;
  if (t5_table) {
    bucket.resize(B * L);
    for (int64_t b = 0; b < B; b++)
      for (int64_t j = 0; j < L; j++)
        bucket[b * L + j] = t5_bucket((int64_t)key_pos[b * L + j] - t5_qpos[b], t5_bidir != 0, (int)num_buckets,
                                      (int)t5_max_distance);
  }
  const int64_t BH = B * H, nthr = omp_get_max_threads();
  if (BH == 0) return;
  const RowOrder order(op.layout(dt, D), D);  // q and O rows in the perm_col order of the SIMD code
  // Split-K: aim at >= 4 items per thread, but keep chunks >= 256 keys (whole blocks) so each stays a stream.
  int64_t nc = std::max<int64_t>(1, std::min((4 * nthr + BH - 1) / BH, L / 256));
  const int64_t chunk = std::max<int64_t>(KB, ((L + nc - 1) / nc + KB - 1) / KB * KB);  // L = 0: one empty chunk
  nc = std::max<int64_t>(1, (L + chunk - 1) / chunk);
  std::vector<Partial> part(BH * nc);
  std::vector<float> part_o(BH * nc * D);

  // Each thread takes a contiguous range of items and runs them in groups: pass 1 (K) of every item of the group,
  // then pass 2 (V) of each. Consecutive heads' keys are neighbours in the cache, so K is read as one long stream
  // and V as another, instead of two short streams per head (S = 512: 64 KiB each, where every new stream waits
  // for the prefetcher to ramp up). A group's scores fit in L2: at most GROUP_FLOATS floats.
  constexpr int64_t GROUP_FLOATS = 64 * 1024;
  const int64_t per_item = 2 * (chunk / KB) * KB;  // scores and key biases of one item, whole blocks
#pragma omp parallel
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t i0 = BH * nc * t / nt, i1 = BH * nc * (t + 1) / nt;
    const int64_t G = std::max<int64_t>(1, std::min(i1 - i0, GROUP_FLOATS / per_item));
    thread_local std::vector<float> scratch;
    scratch.resize(G * per_item);
    for (int64_t g0 = i0; g0 < i1; g0 += G) {
      const int64_t g1 = std::min(i1, g0 + G);
      // Pass 1 streams K alone: every score of the chunk and its bias (-inf: masked key or past the chunk's end).
      // Reading K and V in turn, block by block, was 8-18% slower cold (Zen 4, 2 threads).
      for (int64_t it = g0; it < g1; it++) {
        const int64_t bh = it / nc, c = it % nc, b = bh / H, h = bh % H;
        const int64_t j0 = c * chunk, j1 = std::min(L, j0 + chunk);
        alignas(64) float qf[256];
        const void* qp = offset(q, dt, b * q_st[0] + h * q_st[1]);
        for (int64_t d = 0; d < D; d++) qf[d] = load_elem(qp, dt, order.col[d]);
        const void* kp = offset(k, dt, b * k_st[0] + h * k_st[1]);
        const int32_t* pos = key_pos + b * L;
        float* sc = scratch.data() + (it - g0) * per_item;  // (chunk,) scores
        float* keybias = sc + per_item / 2;                 // (chunk,) key biases
        for (int64_t jb = j0; jb < j1; jb += KB) {
          const int n = (int)std::min<int64_t>(KB, j1 - jb);
          op.dots(qf, offset(kp, dt, jb * k_st[2]), k_st[2], n, (int)D, dt, sc + (jb - j0));
          // The key biases of the block, one branch-free loop per kind (the compiler vectorises them). (n,)
          float* bb = keybias + (jb - j0);
          const int32_t* pj = pos + jb;
          if (alibi) {
            const float slope = alibi[h];
            for (int jj = 0; jj < n; jj++) bb[jj] = pj[jj] < 0 ? NEG_INF : slope * (float)pj[jj];
          } else if (t5_table) {
            const int32_t* bucket_j = bucket.data() + b * L + jb;
            for (int jj = 0; jj < n; jj++) bb[jj] = pj[jj] < 0 ? NEG_INF : t5_table[bucket_j[jj] * H + h];
          } else if (bias) {
            const float* bias_j = bias + h * L + jb;
            for (int jj = 0; jj < n; jj++) bb[jj] = pj[jj] < 0 ? NEG_INF : bias_j[jj];
          } else {
            for (int jj = 0; jj < n; jj++) bb[jj] = pj[jj] < 0 ? NEG_INF : 0.f;
          }
          std::fill(bb + n, bb + KB, NEG_INF);
        }
      }
      // Pass 2 streams V alone: the online softmax over the chunk's blocks, from m = -inf.
      for (int64_t it = g0; it < g1; it++) {
        const int64_t bh = it / nc, c = it % nc, b = bh / H, h = bh % H;
        const int64_t j0 = c * chunk, j1 = std::min(L, j0 + chunk);
        const void* vp = offset(v, dt, b * v_st[0] + h * v_st[1]);
        float* sc = scratch.data() + (it - g0) * per_item;
        float* keybias = sc + per_item / 2;
        float m = NEG_INF, l = 0.f, corr;
        float* o = part_o.data() + it * D;
        std::fill(o, o + D, 0.f);
        for (int64_t jb = j0; jb < j1; jb += KB) {
          const int n = (int)std::min<int64_t>(KB, j1 - jb);
          const int limit = n;  // s[n:] is not computed
          op.softmax(sc + (jb - j0), 1, scale, keybias + (jb - j0), nullptr, &limit, &m, &l, &corr);
          op.pv(o, sc + (jb - j0), &corr, offset(vp, dt, jb * v_st[2]), v_st[2], 1, n, (int)D, dt);
        }
        part[it] = {m, l};
        if (nc == 1) store_row(out, dt, bh * D, o, D, l > 0.f ? 1.f / l : 0.f, order);  // all keys masked -> 0
      }
    }
  }
  if (nc == 1) return;

  // Combine the chunks of each (b, h): out = sum_c exp(m_c - M) O_c / sum_c exp(m_c - M) l_c.
#pragma omp parallel for schedule(static)
  for (int64_t bh = 0; bh < BH; bh++) {
    float M = NEG_INF;
    for (int64_t c = 0; c < nc; c++) M = std::max(M, part[bh * nc + c].m);
    std::vector<float> acc(D, 0.f);
    float lsum = 0.f;
    if (M != NEG_INF) {
      for (int64_t c = 0; c < nc; c++) {
        const Partial& pc = part[bh * nc + c];
        if (pc.m == NEG_INF) continue;
        const float w = std::exp(pc.m - M);
        lsum += w * pc.l;
        const float* oc = part_o.data() + (bh * nc + c) * D;
        for (int64_t d = 0; d < D; d++) acc[d] += w * oc[d];
      }
    }
    store_row(out, dt, bh * D, acc.data(), D, lsum > 0.f ? 1.f / lsum : 0.f, order);
  }
}

// Prefill: q (B, H, T, D), k, v (B, H, S, D) with strides (elements, last dim contiguous); key_pos (B, S);
// causal: query t sees key j only if j <= t + q_offset; alibi (H,) or t5_table (num_buckets, H); out (B, H, T, D).
extern "C" void mbattn_prefill(const void* q, const void* k, const void* v, void* out, int dtype, int64_t B,
                               int64_t H, int64_t T, int64_t S, int64_t D, const int64_t* q_st, const int64_t* k_st,
                               const int64_t* v_st, const int32_t* key_pos, float scale, int causal,
                               int64_t q_offset, const float* alibi, const float* t5_table, int64_t num_buckets,
                               int t5_bidir, int64_t t5_max_distance) {
  const int dt = dtype;  // DT_F32, DT_BF16 or DT_F16
  const Ops& op = ops();
  const int64_t nkb = (S + KB - 1) / KB, nqb = (T + BQ - 1) / BQ, BH = B * H;
  const RowOrder order(op.layout(dt, D), D);  // of O (not Q: qk reads packed fp32 K)

  // K^T packed per (b, h, key block) as fp32 (D, KB), zero past S: the qk tile reads KB keys per vector.
  std::vector<float> kt_buf(BH * nkb * D * KB + 16);
  float* KT = (float*)(((uintptr_t)kt_buf.data() + 63) & ~(uintptr_t)63);
#pragma omp parallel for schedule(static)
  for (int64_t it = 0; it < BH * nkb; it++) {
    const int64_t bh = it / nkb, kb = it % nkb, b = bh / H, h = bh % H;
    float* dst = KT + it * D * KB;
    for (int64_t c = 0; c < KB; c++) {
      const int64_t j = kb * KB + c;
      if (j >= S) {
        for (int64_t d = 0; d < D; d++) dst[d * KB + c] = 0.f;
        continue;
      }
      const void* kj = offset(k, dt, b * k_st[0] + h * k_st[1] + j * k_st[2]);
      for (int64_t d = 0; d < D; d++) dst[d * KB + c] = load_elem(kj, dt, d);
    }
  }

  // T5: bias of head h for rel = j - (t + q_offset) at index j - t + T - 1 (range [0, S + T - 1)), padded
  // with KB zeros so a row can read a whole block. (H, R)
  const int64_t R = S + T + KB;
  std::vector<float> t5_rel;
  if (t5_table) {
    t5_rel.assign(H * R, 0.f);
    for (int64_t i = 0; i < S + T - 1; i++) {
      const int bk = t5_bucket(i - (T - 1) - q_offset, t5_bidir != 0, (int)num_buckets, (int)t5_max_distance);
      for (int64_t h = 0; h < H; h++) t5_rel[h * R + i] = t5_table[bk * H + h];
    }
  }

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t it = 0; it < BH * nqb; it++) {
    const int64_t bh = it / nqb, qb = it % nqb, b = bh / H, h = bh % H;
    const int64_t t0 = qb * BQ;
    const int nr = (int)std::min<int64_t>(BQ, T - t0);
    const int Di = (int)D;
    std::vector<float> Q(BQ * D, 0.f), O(BQ * D, 0.f);  // (BQ, D) query rows and unnormalised output
    alignas(64) float Sb[BQ * KB], keybias[KB], m[BQ], l[BQ], corr[BQ];
    const float* rowbias[BQ];
    int limit[BQ];
    for (int r = 0; r < nr; r++) {
      const void* qr = offset(q, dt, b * q_st[0] + h * q_st[1] + (t0 + r) * q_st[2]);
      for (int64_t d = 0; d < D; d++) Q[r * D + d] = load_elem(qr, dt, d);
    }
    std::fill(m, m + BQ, NEG_INF);
    std::fill(l, l + BQ, 0.f);
    const int32_t* pos = key_pos + b * S;
    // causal block skipping: the last row of this block sees keys j <= t0 + nr - 1 + q_offset
    const int64_t kend = causal ? std::min(S, t0 + nr + q_offset) : S;
    const void* kv_v = offset(v, dt, b * v_st[0] + h * v_st[1]);
    for (int64_t kb = 0; kb * KB < kend; kb++) {
      const int64_t j0 = kb * KB;
      const int n = (int)std::min<int64_t>(KB, S - j0);
      op.qk(Q.data(), KT + (bh * nkb + kb) * D * KB, BQ, Di, Sb);
      for (int c = 0; c < KB; c++) {
        const bool masked = c >= n || pos[j0 + c] < 0;
        keybias[c] = masked ? NEG_INF : (alibi ? alibi[h] * (float)pos[j0 + c] : 0.f);
      }
      for (int r = 0; r < BQ; r++) {
        const int64_t t = t0 + r;
        limit[r] = r >= nr ? 0 : (causal ? (int)std::clamp<int64_t>(t + q_offset - j0 + 1, 0, KB) : KB);
        rowbias[r] = t5_table ? t5_rel.data() + h * R + std::max<int64_t>(0, j0 - t + T - 1) : nullptr;  // dummy rows clamp
      }
      op.softmax(Sb, BQ, scale, keybias, t5_table ? rowbias : nullptr, limit, m, l, corr);
      op.pv(O.data(), Sb, corr, offset(kv_v, dt, j0 * v_st[2]), v_st[2], nr, n, Di, dt);
    }
    for (int r = 0; r < nr; r++) {
      // fully masked query row -> 0
      store_row(out, dt, (bh * T + t0 + r) * D, O.data() + r * D, D, l[r] > 0.f ? 1.f / l[r] : 0.f, order);
    }
  }
}
