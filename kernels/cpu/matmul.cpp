// CPU matmul kernels: y = x @ W^T (+ b), W in PyTorch Linear layout (N, K).
//
//   W8A8 (LLM.int8()): per-token int8 activations x int8 weights, VNNI vpdpbusd, outlier columns fused
//   weight-only int8:  fp32 activations x int8 weights converted in-register, fp32 FMA
//   bf16:              bf16 x bf16 with vdpbf16ps, fp32 accumulation
//   fp16:              fp16 x fp16, widened in registers (vcvtph2ps), fp32 FMA and accumulation
//
// The exact semantics are the plain-PyTorch references in kernels/matmul_ref.py.
// Plain C++ on raw pointers (no torch headers); matmul_op.cpp wraps these as torch ops.
// SIMD functions carry per-function target attributes and are picked at run time, so the .so is built
// without -march and still runs (scalar) on a CPU without AVX-512.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "floats.h"
#include "vec.h"

#define TGT_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define TGT_F __attribute__((target("avx512f,avx512bw,avx512vl")))
#define TGT_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define TGT_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace mbmm {

// Bits returned by simd_level (kept in sync with matmul.py).
enum { SIMD_AVX512F = 1, SIMD_VNNI = 2, SIMD_BF16 = 4, SIMD_AVX2 = 8 };

static int g_cap = 2;  // highest SIMD family allowed: 0 scalar, 1 AVX2, 2 all the CPU has (AVX-512)

static bool cpu_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}
static bool use_vnni() { return g_cap >= 2 && cpu_avx512() && __builtin_cpu_supports("avx512vnni"); }
static bool use_f() { return g_cap >= 2 && cpu_avx512(); }
static bool use_bf16() { return g_cap >= 2 && cpu_avx512() && __builtin_cpu_supports("avx512bf16"); }
static bool use_avx2() {  // every AVX2 CPU so far has F16C (fp16 <-> fp32); checked anyway
  return g_cap >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

// cap >= 0 sets the highest family allowed (tests run the AVX2 kernels on an AVX-512 CPU); returns the bits in use.
int simd_level(int cap) {
  if (cap >= 0) g_cap = cap;
  return (use_f() ? SIMD_AVX512F : 0) | (use_vnni() ? SIMD_VNNI : 0) | (use_bf16() ? SIMD_BF16 : 0) |
         (use_avx2() ? SIMD_AVX2 : 0);
}

// IEEE fp16 as its bits: a type of its own, so that the kernel templates' loads pick the fp16 conversion.
struct Half {
  uint16_t bits;
};

// Element types of the float tensors the ops pass in (matmul_op.cpp's dtype_code): fp32, bf16, fp16.
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

static inline float load_f(const void* p, int dt, int64_t i) {
  return dt == DT_BF16 ? bf16_to_f32(((const uint16_t*)p)[i])
         : dt == DT_F16 ? f16_to_f32(((const uint16_t*)p)[i])
                        : ((const float*)p)[i];
}

static inline void store_y(void* y, int dt, int64_t i, float v) {
  if (dt == DT_BF16)
    ((uint16_t*)y)[i] = f32_to_bf16(v);
  else if (dt == DT_F16)
    ((uint16_t*)y)[i] = f32_to_f16(v);
  else
    ((float*)y)[i] = v;
}

static inline uint64_t tail_mask(int64_t n) { return n >= 64 ? ~0ULL : ((1ULL << n) - 1); }

static inline int64_t dt_size(int dt) { return dt == DT_F32 ? 4 : 2; }

// ---------------------------------------------------------------------------------------------------------
// Tile driver: each OpenMP thread takes whole NR-row panels of W (N is split, weights are streamed once);
// inside a panel all M rows of x are swept in MR-row tiles, so for M <= 8 one pass over W serves every row.
// Tile sizes keep MR*NR accumulators + NR weight registers + 1 x register within the 32 zmm registers.

template <class Kern, int MR, int NR, class Ctx>
static void drive(const Ctx& c) {
  const int64_t panels = (c.N + NR - 1) / NR;
  const bool par = c.N * c.K * std::max<int64_t>(c.M, 1) >= (1 << 16);  // tiny products: no fork/join
#pragma omp parallel for schedule(static) if (par)
  for (int64_t p = 0; p < panels; p++)
    for (int64_t m0 = 0; m0 < c.M; m0 += MR) Kern::template tile<MR, NR>(c, m0, p * NR);
}

template <class Kern, class Ctx>
static void run_tiles(const Ctx& c) {
  switch (c.M) {
    case 1: return drive<Kern, 1, 8>(c);
    case 2: return drive<Kern, 2, 6>(c);
    case 3: return drive<Kern, 3, 5>(c);
    case 4: return drive<Kern, 4, 4>(c);
    case 5: return drive<Kern, 5, 4>(c);
    case 6: return drive<Kern, 6, 3>(c);
    case 7: return drive<Kern, 7, 3>(c);
    case 8: return drive<Kern, 8, 2>(c);
    default: return drive<Kern, 4, 4>(c);
  }
}

// AVX2 has 16 ymm registers: smaller tiles.
template <class Kern, class Ctx>
static void run_tiles16(const Ctx& c) {
  switch (c.M) {
    case 1: return drive<Kern, 1, 4>(c);
    case 2: return drive<Kern, 2, 4>(c);
    case 3: return drive<Kern, 3, 3>(c);
    case 4: return drive<Kern, 4, 2>(c);
    case 5: return drive<Kern, 5, 2>(c);
    case 6: return drive<Kern, 6, 2>(c);
    case 7: return drive<Kern, 7, 1>(c);
    case 8: return drive<Kern, 8, 1>(c);
    default: return drive<Kern, 4, 2>(c);
  }
}

// Software prefetch in the row kernels, 2 KiB ahead of the current load: on Intel and on CPUs without AVX-512.
// Measured on cold lm_head-sized streams (kernels/MATMUL.md): on Sapphire Rapids 0.5-2 KiB gain 10% over none
// (2 KiB best); on AMD Zen 4 any distance (1-4 KiB) loses 10-15% against the hardware prefetcher alone; on AMD
// Zen 2 (AVX2) it gains 20% for weight-only int8 and ~5% for bf16, W8A8 unchanged.
constexpr int64_t PREFETCH = 2048;
// MINIBLOOM_SW_PREFETCH=0|1 overrides the rule (for measuring it on a new machine).
static bool sw_prefetch_rule() {
  if (const char* e = std::getenv("MINIBLOOM_SW_PREFETCH"); e && (e[0] == '0' || e[0] == '1')) return e[0] == '1';
  __builtin_cpu_init();
  return __builtin_cpu_is("intel") || !__builtin_cpu_supports("avx512f");
}
static const bool g_sw_prefetch = sw_prefetch_rule();
#define ROW_PREFETCH(p)                                        \
  do {                                                         \
    if constexpr (PF) _mm_prefetch((const char*)(p), _MM_HINT_T0); \
  } while (0)

// Row driver (decode, M <= ROW_GROUPS_MAX_M; AVX-512 and AVX2): each OpenMP thread owns a contiguous range of
// weight rows and reads each row once, front to back, dotting it with every row of x (which stays in L1). One
// sequential weight stream per thread is what the hardware prefetchers follow best: on Sapphire Rapids it streams W
// at the machine's read bandwidth, where interleaving 8 rows per panel (the tile driver) reached two thirds of it;
// on Zen 2 (AVX2) the 4-row tiles read lm_head at half the rate of torch.sum (kernels/MATMUL.md).
// Row kernels keep >= 4 independent accumulators per x row to hide the dot instructions' latency.
// Each row kernel copies its context into a local and takes the prefetch choice as a template argument: with the
// fields read through a reference (the stores to y might alias them) and the choice tested per line, lm_head
// streamed 12% slower than a bare read loop over the same bytes on Zen 4; now within 2-7% of it.

// The static split leaves one thread waiting for the other at the end of every call: on the 2-vCPU VM the two
// read at rates 10-27% apart, changing sign from run to run. So each thread's range is cut into chunks of
// ~16 KiB of weights: its owner takes them from the front, and a thread that has finished its own range takes
// them from the back (one compare-and-swap per chunk on the range's (front, back) pair). The owner still reads
// one sequential stream; only the imbalance is stolen.
struct alignas(64) ChunkRange {
  std::atomic<uint64_t> front_back;  // (front << 32) | back, in chunks: [front, back) are still unclaimed
};

static inline bool claim(ChunkRange& r, bool from_front, int64_t& chunk) {
  uint64_t v = r.front_back.load(std::memory_order_relaxed);
  for (;;) {
    const uint64_t f = v >> 32, b = v & 0xffffffffu;
    if (f >= b) return false;
    const uint64_t next = from_front ? ((f + 1) << 32) | b : (f << 32) | (b - 1);
    if (r.front_back.compare_exchange_weak(v, next, std::memory_order_relaxed)) {
      chunk = (int64_t)(from_front ? f : b - 1);
      return true;
    }
  }
}

// x rows per row-kernel call: up to 8, whose accumulators fit the registers. A larger M (batched decode, up to
// ROW_GROUPS_MAX_M) is swept in groups of 8, then the rest (TAIL), over each ~16 KiB chunk of weight rows while
// it sits in L1, so W is still read from memory once. The tile driver did M > 8 before: 2.3-4x the time of M = 8
// for 9-15 rows (bench_matmul --rows, kernels/MATMUL.md).
constexpr int64_t ROW_GROUPS_MAX_M = 64;

template <class Kern, int MR, int TAIL, bool PF, class Ctx>
static void rows_balanced(const Ctx& c, ChunkRange* ranges, int64_t T, int64_t t, int64_t rows_per_chunk) {
  int64_t chunk;
  // The loop over rows lives inside the kernel: a target-attribute function cannot be inlined here,
  // and a call per weight row costs more than the row itself for lm_head's 250,880 rows of 1 KiB.
  for (int64_t v = 0; v < T; v++) {  // v = 0: our own range from the front; then the others' from the back
    ChunkRange& r = ranges[(t + v) % T];
    while (claim(r, v == 0, chunk)) {
      const int64_t n0 = chunk * rows_per_chunk, n1 = std::min(c.N, n0 + rows_per_chunk);
      if (c.M == MR) {  // decode: one group, the context as it is
        Kern::template rows<MR, PF>(c, n0, n1);
        continue;
      }
      int64_t m0 = 0;
      for (; m0 + MR <= c.M; m0 += MR) Kern::template rows<MR, PF>(c.row_group(m0, MR), n0, n1);
      if constexpr (TAIL > 0) Kern::template rows<TAIL, PF>(c.row_group(m0, TAIL), n0, n1);
    }
  }
}

template <class Kern, int MR, int TAIL, class Ctx>
static void drive_rows(const Ctx& c) {
  const bool par = c.N * c.K * c.M >= (1 << 16);
  const int64_t T = par ? omp_get_max_threads() : 1;
  const int64_t rows_per_chunk = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, c.K * (int64_t)sizeof(*c.w)));
  const int64_t chunks = (c.N + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<ChunkRange> ranges(T);
  for (int64_t t = 0; t < T; t++)
    ranges[t].front_back.store(((uint64_t)(chunks * t / T) << 32) | (uint64_t)(chunks * (t + 1) / T));
  // With fewer threads than ranges (a nested region gets one), the ranges nobody owns are all taken from the back.
#pragma omp parallel num_threads(T) if (par)
  {
    const int64_t t = omp_get_thread_num();
    if (g_sw_prefetch)
      rows_balanced<Kern, MR, TAIL, true>(c, ranges.data(), T, t, rows_per_chunk);
    else
      rows_balanced<Kern, MR, TAIL, false>(c, ranges.data(), T, t, rows_per_chunk);
  }
}

// The row driver for a run-time M, through its compile-time group sizes: M <= 8 is one group of M rows, a larger M
// groups of 8 and then a tail of M % 8 (I runs over 0..7).
template <class Kern, class Ctx, int... I>
static void drive_rows_for(const Ctx& c, std::integer_sequence<int, I...>) {
  if (c.M <= 8)
    (void)((c.M == I + 1 && (drive_rows<Kern, I + 1, 0>(c), true)) || ...);
  else
    (void)((c.M % 8 == I && (drive_rows<Kern, 8, I>(c), true)) || ...);
}

// Returns false when M is too large for the row kernels (prefill): the caller uses the tiles.
template <class Kern, class Ctx>
static bool run_rows(const Ctx& c) {
  if (c.M < 1 || c.M > ROW_GROUPS_MAX_M) return false;
  drive_rows_for<Kern>(c, std::make_integer_sequence<int, 8>{});
  return true;
}

// Accumulators per x row in a row kernel: 4 for one row, fewer as rows add independent chains.
template <int MR>
constexpr int row_unroll() { return MR >= 4 ? 1 : 4 / MR; }

TGT_AVX2 static inline int32_t hsum_epi32(__m256i v) {
  __m128i a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4e));
  a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0xb1));
  return _mm_cvtsi128_si32(a);
}

TGT_AVX2 static inline float hsum_ps(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// Row pointers of a tile; rows past the end are clamped to the last row (computed, never stored).
#define TILE_ROWS(MR, NR)                                                          \
  const int mr = (int)std::min<int64_t>(MR, c.M - m0);                             \
  const int nr = (int)std::min<int64_t>(NR, c.N - n0);                             \
  decltype(c.x) xr_[MR];                                                           \
  decltype(c.w) wr_[NR];                                                           \
  for (int i = 0; i < MR; i++) xr_[i] = c.x + std::min(m0 + i, c.M - 1) * c.K;     \
  for (int j = 0; j < NR; j++) wr_[j] = c.w + std::min(n0 + j, c.N - 1) * c.K;

// ---------------------------------------------------------------------------------------------------------
// W8A8: activation quantization (outlier columns recorded and zeroed), then the int8 GEMM + epilogue.

// 16 elements of fp32, bf16 or fp16 (dt) at x[i:] (masked by mk) -> fp32; bf16 -> fp32 is a 16-bit shift,
// fp16 -> fp32 one vcvtph2ps (exact).
TGT_F static inline __m512 load16_as_f32(const void* x, int dt, int64_t i, __mmask16 mk) {
  if (dt == DT_F32) return _mm512_maskz_loadu_ps(mk, (const float*)x + i);
  const __m256i h = _mm256_maskz_loadu_epi16(mk, (const uint16_t*)x + i);
  return dt == DT_F16 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// fp32 copy of x (M, K); with cmax != nullptr also the column maxima max_m |x[m, k]| (K,), in one pass.
// max(|x|, cmax) keeps cmax on a NaN, as the scalar std::max(cmax, |x|) does.
TGT_F static void to_f32_colmax_avx512(const void* x, int x_dt, int64_t M, int64_t K, float* xf, float* cmax) {
  for (int64_t m = 0; m < M; m++)
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = (__mmask16)tail_mask(K - k);
      const int64_t i = m * K + k;
      const __m512 v = load16_as_f32(x, x_dt, i, mk);
      _mm512_mask_storeu_ps(xf + i, mk, v);
      if (cmax)
        _mm512_mask_storeu_ps(cmax + k, mk, _mm512_max_ps(_mm512_abs_ps(v), _mm512_maskz_loadu_ps(mk, cmax + k)));
    }
}

// Columns whose max exceeds the threshold, in increasing order.
TGT_F static void outlier_columns_avx512(const float* cmax, int64_t K, float threshold, std::vector<int32_t>& outl) {
  const __m512 t = _mm512_set1_ps(threshold);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mk = (__mmask16)tail_mask(K - k);
    for (uint32_t hit = _mm512_mask_cmp_ps_mask(mk, _mm512_maskz_loadu_ps(mk, cmax + k), t, _CMP_GT_OQ); hit;
         hit &= hit - 1)
      outl.push_back((int32_t)(k + __builtin_ctz(hit)));
  }
}

// q = round_half_even(x / s_x), s_x = absmax / 127 per row; sum_x (nullable) = sum_k q[m, k] for the VNNI kernels.
TGT_F static void quant_rows_avx512(const float* xf, int64_t M, int64_t K, int8_t* q, float* s_x, int32_t* sum_x) {
  for (int64_t m = 0; m < M; m++) {
    const float* r = xf + m * K;
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      __mmask16 mk = (__mmask16)tail_mask(K - k);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, r + k)));
    }
    float a = _mm512_reduce_max_ps(amax);
    float s = a > 0.f ? a / 127.f : 1.f;  // divide, as the reference does
    s_x[m] = s;
    const __m512 vs = _mm512_set1_ps(s);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
      __mmask16 mk = (__mmask16)tail_mask(K - k);
      __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(mk, r + k), vs);
      v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // half to even
      const __m512i iv = _mm512_cvtps_epi32(v);
      sum = _mm512_add_epi32(sum, iv);
      _mm512_mask_cvtepi32_storeu_epi8(q + m * K + k, mk, iv);
    }
    if (sum_x) sum_x[m] = _mm512_reduce_add_epi32(sum);
  }
}

TGT_AVX2 static void quant_rows_avx2(const float* xf, int64_t M, int64_t K, int8_t* q, float* s_x) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const int64_t K8 = K & ~7;
  for (int64_t m = 0; m < M; m++) {
    const float* r = xf + m * K;
    __m256 amax = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) amax = _mm256_max_ps(amax, _mm256_and_ps(_mm256_loadu_ps(r + k), sign));
    alignas(32) float t[8];
    _mm256_store_ps(t, amax);
    float a = 0.f;
    for (int i = 0; i < 8; i++) a = std::max(a, t[i]);
    for (int64_t k = K8; k < K; k++) a = std::max(a, std::fabs(r[k]));
    float s = a > 0.f ? a / 127.f : 1.f;
    s_x[m] = s;
    const __m256 vs = _mm256_set1_ps(s);
    for (int64_t k = 0; k < K8; k += 8) {
      __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(r + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m256i iv = _mm256_cvtps_epi32(v);
      // low byte of each int32 -> 8 bytes
      iv = _mm256_shuffle_epi8(iv, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                    0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
      const uint32_t lo = (uint32_t)_mm256_extract_epi32(iv, 0), hi = (uint32_t)_mm256_extract_epi32(iv, 4);
      std::memcpy(q + m * K + k, &lo, 4);
      std::memcpy(q + m * K + k + 4, &hi, 4);
    }
    for (int64_t k = K8; k < K; k++) {
      __m128 v = _mm_round_ss(_mm_setzero_ps(), _mm_set_ss(r[k] / s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[m * K + k] = (int8_t)_mm_cvtss_f32(v);
    }
  }
}

static void quant_rows_scalar(const float* xf, int64_t M, int64_t K, int8_t* q, float* s_x) {
  for (int64_t m = 0; m < M; m++) {
    const float* r = xf + m * K;
    float a = 0.f;
    for (int64_t k = 0; k < K; k++) a = std::max(a, std::fabs(r[k]));
    float s = a > 0.f ? a / 127.f : 1.f;
    s_x[m] = s;
    for (int64_t k = 0; k < K; k++) q[m * K + k] = (int8_t)std::nearbyint(r[k] / s);
  }
}

// xf <- fp32 x with outlier columns zeroed (M, K); xo <- the outlier values (M, n_out); q (M, K) = xq.
// sum_x (M,), nullable, only on the AVX-512 path (the VNNI kernels need it): sum_k q[m, k].
static void quantize_act_impl(const void* x, int x_dt, int64_t M, int64_t K, float threshold, int8_t* q,
                              float* s_x, std::vector<int32_t>& outl, std::vector<float>& xo, std::vector<float>& xf,
                              int32_t* sum_x = nullptr) {
  xf.resize(M * K);
  outl.clear();
  std::vector<float> cmax(threshold > 0.f ? K : 0, 0.f);  // max_m |x[m, k]|
  // Prefill: threads take blocks of rows (each its own column maxima, then the max of those); the same values as
  // one thread, since each row's steps are its own and a max does not depend on the order.
  const int T = M * K >= (1 << 18) ? omp_get_max_threads() : 1;
  if (use_f()) {
    std::vector<float> cmax_t(threshold > 0.f ? (size_t)T * K : 0, 0.f);
#pragma omp parallel num_threads(T) if (T > 1)
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      const int64_t m0 = M * t / nt, m1 = M * (t + 1) / nt;
      to_f32_colmax_avx512((const char*)x + m0 * K * dt_size(x_dt), x_dt, m1 - m0, K, xf.data() + m0 * K,
                           threshold > 0.f ? cmax_t.data() + (size_t)t * K : nullptr);
    }
    for (int t = 0; t < T && threshold > 0.f; t++)
      for (int64_t k = 0; k < K; k++) cmax[k] = std::max(cmax[k], cmax_t[(size_t)t * K + k]);
    if (threshold > 0.f) outlier_columns_avx512(cmax.data(), K, threshold, outl);
  } else {
    for (int64_t i = 0; i < M * K; i++) xf[i] = load_f(x, x_dt, i);
    if (threshold > 0.f) {
      for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) cmax[k] = std::max(cmax[k], std::fabs(xf[m * K + k]));
      for (int64_t k = 0; k < K; k++)
        if (cmax[k] > threshold) outl.push_back((int32_t)k);
    }
  }
  const int64_t no = (int64_t)outl.size();
  xo.resize(M * no);
  for (int64_t m = 0; m < M; m++)
    for (int64_t j = 0; j < no; j++) {
      xo[m * no + j] = xf[m * K + outl[j]];
      xf[m * K + outl[j]] = 0.f;
    }
#pragma omp parallel num_threads(T) if (T > 1)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t m0 = M * t / nt, rows = M * (t + 1) / nt - m0;
    const float* xr = xf.data() + m0 * K;
    if (use_f())
      quant_rows_avx512(xr, rows, K, q + m0 * K, s_x + m0, sum_x ? sum_x + m0 : nullptr);
    else if (use_avx2())
      quant_rows_avx2(xr, rows, K, q + m0 * K, s_x + m0);
    else
      quant_rows_scalar(xr, rows, K, q + m0 * K, s_x + m0);
  }
}

// Weights at load time: q = round_half_even(w / s), s = absmax/127 per row (1 for a zero row): the activation
// quantizer's row step, run over blocks of rows in parallel. One pass, no temporaries (the torch-op reference
// allocates a tensor per step, which dominated an int8 load). bf16/fp16 rows (the Hub's BLOOMZ files) are widened,
// exactly, a few rows at a time into a buffer that stays in L2, so the same fp32 step quantizes them.
static void quant_rows_f32(const float* w, int64_t rows, int64_t K, int8_t* q, float* scale) {
  if (use_f())
    quant_rows_avx512(w, rows, K, q, scale, nullptr);
  else if (use_avx2())
    quant_rows_avx2(w, rows, K, q, scale);
  else
    quant_rows_scalar(w, rows, K, q, scale);
}

void quantize_rows(const void* w, int w_dt, int64_t N, int64_t K, int8_t* q, float* scale) {
  const bool par = N * K >= (1 << 16);
#pragma omp parallel if (par)
  {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t n0 = N * t / T, n1 = N * (t + 1) / T;
    if (w_dt == DT_F32) {
      quant_rows_f32((const float*)w + n0 * K, n1 - n0, K, q + n0 * K, scale + n0);
    } else {
      const int64_t block = std::max<int64_t>(1, (64 << 10) / (4 * std::max<int64_t>(K, 1)));  // 64 KiB of fp32
      std::vector<float> f(block * K);
      for (int64_t n = n0; n < n1; n += block) {
        const int64_t r = std::min(block, n1 - n);
        for (int64_t i = 0; i < r * K; i++) f[i] = load_f(w, w_dt, n * K + i);
        quant_rows_f32(f.data(), r, K, q + n * K, scale + n);
      }
    }
  }
}

void quantize_activations(const void* x, int x_dt, int64_t M, int64_t K, float threshold, int8_t* xq,
                          float* s_x, std::vector<int32_t>& outliers) {
  std::vector<float> xo, xf;
  quantize_act_impl(x, x_dt, M, K, threshold, xq, s_x, outliers, xo, xf);
}

struct W8A8 {
  const int8_t* x;  // (M, K) xq
  const int8_t* w;  // (N, K)
  int64_t M, N, K;
  const float *s_x, *w_scale;
  const int32_t* sum_x;  // (M,) sum_k xq[m, k], for the VNNI correction below
  const int32_t* outl;   // (n_out,) outlier columns
  const float* xo;       // (M, n_out) their original values
  int64_t n_out;
  const void* bias;
  int bias_dt;
  void* y;
  int y_dt;
  const int16_t* x16 = nullptr;  // (M, K) xq widened once, for the AVX2 row kernel
  int64_t xmask = 0;             // the VNNI row kernel reads x's 64-byte chunk c at chunk c ^ xmask (scramble_x)

  // Rows [m0, m0 + mr) of x and y, as a context of their own (the row driver's groups).
  W8A8 row_group(int64_t m0, int64_t mr) const {
    W8A8 g = *this;
    g.x += m0 * K, g.s_x += m0, g.sum_x += m0, g.xo += m0 * n_out, g.M = mr;
    g.y = (char*)y + m0 * N * dt_size(y_dt);
    if (x16) g.x16 += m0 * K;
    return g;
  }

  // y = acc * s_x[m] * w_scale[n] + x[m, O] . deq(W[n, O]) + b[n]; the same float order as the reference.
  inline void store(int64_t m, int64_t n, int32_t acc) const {
    float v = (float)acc * s_x[m] * w_scale[n];
    if (n_out) {
      float o = 0.f;
      for (int64_t j = 0; j < n_out; j++) o += xo[m * n_out + j] * ((float)w[n * K + outl[j]] * w_scale[n]);
      v += o;
    }
    if (bias) v += load_f(bias, bias_dt, n);
    store_y(y, y_dt, m * N + n, v);
  }
};

struct W8A8Vnni {
  // vpdpbusd multiplies u8 x s8. The weight byte w flipped by XOR 0x80 is the u8 w + 128, so
  // sum(xq * w) = sum((w ^ 0x80) * xq) - 128 * sum(xq): one XOR per weight vector, one correction per x row.
  // No overflow: |w + 128| <= 255, |xq| <= 127, so the int32 sums hold for K up to 66,000 (bloom-176b: 57,344).
  template <int MR, bool PF>
  TGT_VNNI static void rows(const W8A8& c, int64_t n_begin, int64_t n_end) {
    if (c.xmask)
      rows_x<MR, PF, true>(c, n_begin, n_end);
    else
      rows_x<MR, PF, false>(c, n_begin, n_end);
  }

  // SCRAMBLED: x's chunks are read at their scrambled places (scramble_x); a separate instance, so that the plain
  // one keeps its simple addressing.
  template <int MR, bool PF, bool SCRAMBLED>
  TGT_VNNI static void rows_x(const W8A8& c_in, int64_t n_begin, int64_t n_end) {
    const W8A8 c = c_in;
    constexpr int U = row_unroll<MR>();
    const int64_t K = c.K, K_main = K / (64 * U) * (64 * U);
    const int8_t* const x = c.x;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    int32_t correction[MR];
    for (int i = 0; i < MR; i++) correction[i] = 128 * c.sum_x[i];
    for (int64_t n = n_begin; n < n_end; n++) {
      const int8_t* w = c.w + n * K;
      __m512i acc[MR][U];
      for (int i = 0; i < MR; i++)
        for (int u = 0; u < U; u++) acc[i][u] = _mm512_setzero_si512();
      for (int64_t k = 0; k < K_main; k += 64 * U) {
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
          ROW_PREFETCH(w + k + 64 * u + PREFETCH);
          const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w + k + 64 * u), flip);
          const int64_t xk = SCRAMBLED ? (((k >> 6) + u) ^ c.xmask) << 6 : k + 64 * u;  // x's chunk for it
#pragma GCC unroll 8
          for (int i = 0; i < MR; i++)
            acc[i][u] = _mm512_dpbusd_epi32(acc[i][u], wv, _mm512_loadu_si512(x + i * K + xk));
        }
      }
      for (int64_t k = K_main; k < K; k += 64) {  // K tail: x is zero in the masked lanes, so the flipped zeros add nothing
        const __mmask64 mk = tail_mask(K - k);
        const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w + k), flip);
        for (int i = 0; i < MR; i++)
          acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], wv, _mm512_maskz_loadu_epi8(mk, x + i * K + k));
      }
      for (int i = 0; i < MR; i++) {
        for (int u = 1; u < U; u++) acc[i][0] = _mm512_add_epi32(acc[i][0], acc[i][u]);
        c.store(i, n, _mm512_reduce_add_epi32(acc[i][0]) - correction[i]);
      }
    }
  }

  template <int MR, int NR>
  TGT_VNNI static void tile(const W8A8& c, int64_t m0, int64_t n0) {
    TILE_ROWS(MR, NR)
    __m512i acc[MR][NR];
    for (int i = 0; i < MR; i++)
      for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_si512();
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int64_t k = 0; k < c.K; k += 64) {
      const __mmask64 mk = tail_mask(c.K - k);  // K tail: x is zero there
      __m512i wv[NR];
#pragma GCC unroll 8
      for (int j = 0; j < NR; j++) wv[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, wr_[j] + k), flip);
#pragma GCC unroll 8
      for (int i = 0; i < MR; i++) {
        const __m512i xv = _mm512_maskz_loadu_epi8(mk, xr_[i] + k);
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], wv[j], xv);
      }
    }
    for (int i = 0; i < mr; i++)
      for (int j = 0; j < nr; j++)
        c.store(m0 + i, n0 + j, _mm512_reduce_add_epi32(acc[i][j]) - 128 * c.sum_x[m0 + i]);
  }
};

struct W8A8Avx2 {
  // No VNNI: sign-extend both to int16 and vpmaddwd (exact; vpmaddubsw would saturate).
  // Rows: x is widened once (c.x16), so each 16 weights cost one widening load, one vpmaddwd and one add.
  template <int MR, bool PF>
  TGT_AVX2 static void rows(const W8A8& c_in, int64_t n_begin, int64_t n_end) {
    const W8A8 c = c_in;
    constexpr int U = row_unroll<MR>();
    const int64_t K16 = c.K & ~15;
    for (int64_t n = n_begin; n < n_end; n++) {
      const int8_t* w = c.w + n * c.K;
      __m256i acc[MR][U];
      for (int i = 0; i < MR; i++)
        for (int u = 0; u < U; u++) acc[i][u] = _mm256_setzero_si256();
      int64_t k = 0;
      for (; k + 16 * U <= K16; k += 16 * U) {
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
          if ((k + 16 * u) % 64 == 0) ROW_PREFETCH(w + k + 16 * u + PREFETCH);
          const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + k + 16 * u)));
#pragma GCC unroll 8
          for (int i = 0; i < MR; i++)
            acc[i][u] = _mm256_add_epi32(
                acc[i][u], _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(c.x16 + i * c.K + k + 16 * u)), wv));
        }
      }
      for (; k < K16; k += 16) {
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + k)));
        for (int i = 0; i < MR; i++)
          acc[i][0] = _mm256_add_epi32(
              acc[i][0], _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(c.x16 + i * c.K + k)), wv));
      }
      for (int i = 0; i < MR; i++) {
        for (int u = 1; u < U; u++) acc[i][0] = _mm256_add_epi32(acc[i][0], acc[i][u]);
        int32_t a = hsum_epi32(acc[i][0]);
        for (int64_t kk = K16; kk < c.K; kk++) a += (int32_t)c.x[i * c.K + kk] * (int32_t)w[kk];
        c.store(i, n, a);
      }
    }
  }

  template <int MR, int NR>
  TGT_AVX2 static void tile(const W8A8& c, int64_t m0, int64_t n0) {
    TILE_ROWS(MR, NR)
    __m256i acc[MR][NR];
    for (int i = 0; i < MR; i++)
      for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_si256();
    const int64_t K16 = c.K & ~15;
    for (int64_t k = 0; k < K16; k += 16) {
      __m256i wv[NR];
#pragma GCC unroll 8
      for (int j = 0; j < NR; j++) wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wr_[j] + k)));
#pragma GCC unroll 8
      for (int i = 0; i < MR; i++) {
        const __m256i xv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(xr_[i] + k)));
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(xv, wv[j]));
      }
    }
    for (int i = 0; i < mr; i++)
      for (int j = 0; j < nr; j++) {
        int32_t a = hsum_epi32(acc[i][j]);
        for (int64_t k = K16; k < c.K; k++) a += (int32_t)xr_[i][k] * (int32_t)wr_[j][k];
        c.store(m0 + i, n0 + j, a);
      }
  }
};

struct W8A8Scalar {
  template <int MR, int NR>
  static void tile(const W8A8& c, int64_t m0, int64_t n0) {
    TILE_ROWS(MR, NR)
    for (int i = 0; i < mr; i++)
      for (int j = 0; j < nr; j++) {
        int32_t acc = 0;
        for (int64_t k = 0; k < c.K; k++) acc += (int32_t)xr_[i][k] * (int32_t)wr_[j][k];
        c.store(m0 + i, n0 + j, acc);
      }
  }
};

// The row kernels read x beside each weight row, in the same order. Read front to back, an x of 4 KiB (K = 4096)
// is a sequential stream the hardware prefetchers train on although it sits in L1, and the weight stream slowed
// by 30-45% (Zen 4, cold, one thread: a read loop over 4 KiB rows took 145-165 us alone, 185-210 us with x read in
// order, 140-155 us with x's chunks in a scrambled order; an x of 1 KiB cost nothing). So where that pays
// (scramble_rows), each row of x is stored with its 64-byte chunk c at chunk c ^ 5 (within each group of 8), and
// the row kernel reads the chunk for weight chunk c from there: the same products, in the same order.
template <class T>
static void scramble_x(const T* x, int64_t M, int64_t K, int64_t xmask, T* xs) {
  constexpr int64_t E = 64 / sizeof(T);  // elements per 64-byte chunk
  for (int64_t m = 0; m < M; m++)
    for (int64_t c = 0; c < K / E; c++) std::memcpy(xs + m * K + (c ^ xmask) * E, x + m * K + c * E, 64);
}

// Whether the row kernels read x scrambled: decode rows, x at least 2 KiB long and whole groups of 8 chunks, and
// weight rows of at most 4 KiB. Measured gains (same-process A/B, 24 layers cold): W8A8 K = 4096 (x 4 KiB, rows
// 4 KiB) and fp32 K = 1024 (4 KiB, 4 KiB) 0.87-0.89x the time, weight-only int8 (fp32 x of 4 or 16 KiB, rows of 1
// or 4 KiB) 0.77-0.87x; none with a 1 KiB x; fp32 K = 4096 (16 KiB rows) 1.01-1.06x, so not there.
static bool scramble_rows(int64_t M, int64_t K, int64_t x_size, int64_t w_size) {
  return M <= ROW_GROUPS_MAX_M && K * x_size >= 2048 && K * x_size % 512 == 0 && K * w_size <= 4096;
}

// One call of an AVX-512 kernel with scrambled row reads (W8A8Vnni, FmaAvx512): decode rows, with x scrambled
// where that pays, else the row or the tile driver.
template <class Kern, class Ctx>
static void run_scrambled_rows_or_tiles(const Ctx& c) {
  using X = std::remove_cv_t<std::remove_pointer_t<decltype(c.x)>>;
  if (scramble_rows(c.M, c.K, sizeof(X), sizeof(*c.w))) {
    std::vector<X> xs(c.M * c.K);
    Ctx cr = c;
    cr.xmask = 5;
    scramble_x(c.x, c.M, c.K, cr.xmask, xs.data());
    cr.x = xs.data();
    run_rows<Kern>(cr);
  } else if (!run_rows<Kern>(c)) {
    run_tiles<Kern>(c);
  }
}

void linear_w8a8(const void* x, int x_dt, const int8_t* w, const float* w_scale, const void* bias,
                 int bias_dt, float threshold, int64_t M, int64_t N, int64_t K, void* y) {
  std::vector<int8_t> q(M * K);
  std::vector<float> s_x(M), xo, xf;
  std::vector<int32_t> outl, sum_x(M, 0);
  quantize_act_impl(x, x_dt, M, K, threshold, q.data(), s_x.data(), outl, xo, xf,
                    use_vnni() ? sum_x.data() : nullptr);
  W8A8 c{q.data(), w, M, N, K, s_x.data(), w_scale, sum_x.data(), outl.data(), xo.data(),
         (int64_t)outl.size(), bias, bias_dt, y, x_dt};
  std::vector<int16_t> x16;
  if (use_vnni()) {
    run_scrambled_rows_or_tiles<W8A8Vnni>(c);
  } else if (use_avx2()) {
    if (M <= ROW_GROUPS_MAX_M) {
      x16.assign(q.begin(), q.end());
      c.x16 = x16.data();
    }
    if (!run_rows<W8A8Avx2>(c)) run_tiles16<W8A8Avx2>(c);
  } else {
    run_tiles<W8A8Scalar>(c);
  }
}

// W8A8 prefill epilogue, after torch._int_mm's exact int32 GEMM: y = acc * s_x[m] * w_scale[n] (+ extra[m, n])
// (+ b[n]), in this order, as linear_w8a8_ref computes it (no FMA contraction: ISO C++ mode), in one pass over
// (M, N) where torch's ops took four (int32 -> fp32, two products, the bias), each over tens of MB in prefill.
template <class Y>
static void w8a8_epilogue_as(const int32_t* acc, const float* s_x, const float* w_scale, const float* extra,
                             const float* b, int64_t M, int64_t N, Y* y) {
#pragma omp parallel for schedule(static) if (M * N >= (1 << 16))
  for (int64_t m = 0; m < M; m++) {
    const int32_t* a = acc + m * N;
    const float* e = extra ? extra + m * N : nullptr;
    const float sx = s_x[m];
    Y* out = y + m * N;
    for (int64_t n = 0; n < N; n++) {
      float v = (float)a[n] * sx;
      v = v * w_scale[n];
      if (e) v += e[n];
      if (b) v += b[n];
      if constexpr (std::is_same<Y, float>::value)
        out[n] = v;
      else if constexpr (std::is_same<Y, Half>::value)
        out[n].bits = f32_to_f16(v);
      else
        out[n] = f32_to_bf16(v);
    }
  }
}

void w8a8_epilogue(const int32_t* acc, const float* s_x, const float* w_scale, const float* extra,
                   const void* bias, int bias_dt, int64_t M, int64_t N, void* y, int y_dt) {
  std::vector<float> b;
  if (bias) {
    b.resize(N);
    for (int64_t n = 0; n < N; n++) b[n] = load_f(bias, bias_dt, n);
  }
  const float* bp = bias ? b.data() : nullptr;
  if (y_dt == DT_BF16)
    w8a8_epilogue_as(acc, s_x, w_scale, extra, bp, M, N, (uint16_t*)y);
  else if (y_dt == DT_F16)
    w8a8_epilogue_as(acc, s_x, w_scale, extra, bp, M, N, (Half*)y);
  else
    w8a8_epilogue_as(acc, s_x, w_scale, extra, bp, M, N, (float*)y);
}

// fp32-FMA tiles shared by weight-only int8 (x fp32, w int8), fp16 (x fp32, w fp16) and bf16 (x, w bf16) on AVX2
// and scalar.
static inline float to_f(float v) { return v; }
static inline float to_f(int8_t v) { return (float)v; }
static inline float to_f(uint16_t v) { return bf16_to_f32(v); }
static inline float to_f(Half v) { return f16_to_f32(v.bits); }
TGT_AVX2 static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
TGT_AVX2 static inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
TGT_AVX2 static inline __m256 load8(const uint16_t* p) {  // bf16 -> fp32 is a 16-bit shift
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
TGT_AVX2 static inline __m256 load8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

struct FmaAvx2 {
  // Rows (decode): U independent FMA chains per x row hide the FMA latency; the K % 8 tail is scalar.
  template <int MR, bool PF, class Ctx>
  TGT_AVX2 static void rows(const Ctx& c_in, int64_t n_begin, int64_t n_end) {
    const Ctx c = c_in;
    constexpr int U = row_unroll<MR>();
    const int64_t K8 = c.K & ~7;
    for (int64_t n = n_begin; n < n_end; n++) {
      const auto* w = c.w + n * c.K;
      __m256 acc[MR][U];
      for (int i = 0; i < MR; i++)
        for (int u = 0; u < U; u++) acc[i][u] = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 * U <= K8; k += 8 * U) {
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
          if ((k + 8 * u) * (int64_t)sizeof(*c.w) % 64 == 0)  // one prefetch per 64-byte line
            ROW_PREFETCH((const char*)(w + k + 8 * u) + PREFETCH);
          const __m256 wv = load8(w + k + 8 * u);
#pragma GCC unroll 8
          for (int i = 0; i < MR; i++) acc[i][u] = _mm256_fmadd_ps(load8(c.x + i * c.K + k + 8 * u), wv, acc[i][u]);
        }
      }
      for (; k < K8; k += 8) {
        const __m256 wv = load8(w + k);
        for (int i = 0; i < MR; i++) acc[i][0] = _mm256_fmadd_ps(load8(c.x + i * c.K + k), wv, acc[i][0]);
      }
      for (int i = 0; i < MR; i++) {
        for (int u = 1; u < U; u++) acc[i][0] = _mm256_add_ps(acc[i][0], acc[i][u]);
        float a = hsum_ps(acc[i][0]);
        for (int64_t kk = K8; kk < c.K; kk++) a += to_f(c.x[i * c.K + kk]) * to_f(w[kk]);
        c.store(i, n, a);
      }
    }
  }

  template <int MR, int NR, class Ctx>
  TGT_AVX2 static void tile(const Ctx& c, int64_t m0, int64_t n0) {
    TILE_ROWS(MR, NR)
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; i++)
      for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
    const int64_t K8 = c.K & ~7;
    for (int64_t k = 0; k < K8; k += 8) {
      __m256 wv[NR];
#pragma GCC unroll 8
      for (int j = 0; j < NR; j++) wv[j] = load8(wr_[j] + k);
#pragma GCC unroll 8
      for (int i = 0; i < MR; i++) {
        const __m256 xv = load8(xr_[i] + k);
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
      }
    }
    for (int i = 0; i < mr; i++)
      for (int j = 0; j < nr; j++) {
        float a = hsum_ps(acc[i][j]);
        for (int64_t k = K8; k < c.K; k++) a += to_f(xr_[i][k]) * to_f(wr_[j][k]);
        c.store(m0 + i, n0 + j, a);
      }
  }
};

struct FmaScalar {
  template <int MR, int NR, class Ctx>
  static void tile(const Ctx& c, int64_t m0, int64_t n0) {
    TILE_ROWS(MR, NR)
    for (int i = 0; i < mr; i++)
      for (int j = 0; j < nr; j++) {
        float acc = 0.f;
        for (int64_t k = 0; k < c.K; k++) acc += to_f(xr_[i][k]) * to_f(wr_[j][k]);
        c.store(m0 + i, n0 + j, acc);
      }
  }
};

// Without a kernel for this CPU's SIMD level: fp32-FMA rows (decode) or tiles on AVX2, else the scalar code.
template <class Ctx>
static void run_fma_fallback(const Ctx& c) {
  if (use_avx2()) {
    if (!run_rows<FmaAvx2>(c)) run_tiles16<FmaAvx2>(c);
  } else
    run_tiles<FmaScalar>(c);
}

// ---------------------------------------------------------------------------------------------------------
// Weight-only int8: y = (x @ wq^T) * w_scale (+ b), x in fp32, int8 -> fp32 in registers, fp32 FMA.

struct WInt8 {
  const float* x;   // (M, K)
  const int8_t* w;  // (N, K)
  int64_t M, N, K;
  const float* w_scale;
  const void* bias;
  int bias_dt;
  void* y;
  int y_dt;
  int64_t xmask = 0;  // the AVX-512 row kernel reads x's 64-byte chunk c at chunk c ^ xmask (scramble_x)

  WInt8 row_group(int64_t m0, int64_t mr) const {  // rows [m0, m0 + mr) of x and y
    WInt8 g = *this;
    g.x += m0 * K, g.M = mr, g.y = (char*)y + m0 * N * dt_size(y_dt);
    return g;
  }

  inline void store(int64_t m, int64_t n, float acc) const {
    float v = acc * w_scale[n];
    if (bias) v += load_f(bias, bias_dt, n);
    store_y(y, y_dt, m * N + n, v);
  }
};

// fp32-FMA kernels over 16-wide fp32 vectors, shared by weight-only int8 (int8 -> fp32 in registers) and fp32.
TGT_F static inline __m512 load16(const float* p, __mmask16 mk) { return _mm512_maskz_loadu_ps(mk, p); }
TGT_F static inline __m512 load16(const int8_t* p, __mmask16 mk) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, p)));
}
TGT_F static inline __m512 load16(const Half* p, __mmask16 mk) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, p));
}
// 16 whole elements of x: fp32 as they are, fp16 widened (x stays fp16 for the fp16 kernel, see below).
TGT_F static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
TGT_F static inline __m512 load16(const Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

struct FmaAvx512 {
  template <int MR, bool PF, class Ctx>
  TGT_F static void rows(const Ctx& c, int64_t n_begin, int64_t n_end) {
    if (c.xmask)
      rows_x<MR, PF, true>(c, n_begin, n_end);
    else
      rows_x<MR, PF, false>(c, n_begin, n_end);
  }

  template <int MR, bool PF, bool SCRAMBLED, class Ctx>  // as in W8A8Vnni::rows_x
  TGT_F static void rows_x(const Ctx& c_in, int64_t n_begin, int64_t n_end) {
    const Ctx c = c_in;
    constexpr int U = row_unroll<MR>();
    for (int64_t n = n_begin; n < n_end; n++) {
      const auto* w = c.w + n * c.K;
      __m512 acc[MR][U];
      for (int i = 0; i < MR; i++)
        for (int u = 0; u < U; u++) acc[i][u] = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 16 * U <= c.K; k += 16 * U) {
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
          if ((k + 16 * u) * (int64_t)sizeof(*c.w) % 64 == 0)  // one prefetch per 64-byte line
            ROW_PREFETCH((const char*)(w + k + 16 * u) + PREFETCH);
          const __m512 wv = load16(w + k + 16 * u, (__mmask16)0xffff);
          const int64_t xk = SCRAMBLED ? (((k >> 4) + u) ^ c.xmask) << 4 : k + 16 * u;  // x's chunk for it
#pragma GCC unroll 8
          for (int i = 0; i < MR; i++)
            acc[i][u] = _mm512_fmadd_ps(load16(c.x + i * c.K + xk), wv, acc[i][u]);
        }
      }
      for (; k < c.K; k += 16) {
        const __mmask16 mk = (__mmask16)tail_mask(c.K - k);
        const __m512 wv = load16(w + k, mk);
        for (int i = 0; i < MR; i++)
          acc[i][0] = _mm512_fmadd_ps(load16(c.x + i * c.K + k, mk), wv, acc[i][0]);
      }
      for (int i = 0; i < MR; i++) {
        for (int u = 1; u < U; u++) acc[i][0] = _mm512_add_ps(acc[i][0], acc[i][u]);
        c.store(i, n, _mm512_reduce_add_ps(acc[i][0]));
      }
    }
  }

  template <int MR, int NR, class Ctx>
  TGT_F static void tile(const Ctx& c, int64_t m0, int64_t n0) {
    TILE_ROWS(MR, NR)
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; i++)
      for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < c.K; k += 16) {
      const __mmask16 mk = (__mmask16)tail_mask(c.K - k);
      __m512 wv[NR];
#pragma GCC unroll 8
      for (int j = 0; j < NR; j++) wv[j] = load16(wr_[j] + k, mk);
#pragma GCC unroll 8
      for (int i = 0; i < MR; i++) {
        const __m512 xv = load16(xr_[i] + k, mk);
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
      }
    }
    for (int i = 0; i < mr; i++)
      for (int j = 0; j < nr; j++) c.store(m0 + i, n0 + j, _mm512_reduce_add_ps(acc[i][j]));
  }
};

void linear_int8_weight(const void* x, int x_dt, const int8_t* w, const float* w_scale, const void* bias,
                        int bias_dt, int64_t M, int64_t N, int64_t K, void* y) {
  std::vector<float> xf;
  if (x_dt != DT_F32) {  // (M, K) is small next to W: convert once
    xf.resize(M * K);
    for (int64_t i = 0; i < M * K; i++) xf[i] = load_f(x, x_dt, i);
    x = xf.data();
  }
  const WInt8 c{(const float*)x, w, M, N, K, w_scale, bias, bias_dt, y, x_dt};
  if (use_f()) {
    run_scrambled_rows_or_tiles<FmaAvx512>(c);
  } else {
    run_fma_fallback(c);
  }
}

// ---------------------------------------------------------------------------------------------------------
// bf16: y = x @ w^T (+ b), bf16 in, fp32 accumulation (vdpbf16ps: pairs of bf16 products), bf16 out.

// x, w and y of one float type T: uint16_t (bf16), Half (fp16) or float.
template <class T>
struct Dense {
  const T* x;  // (M, K)
  const T* w;  // (N, K)
  int64_t M, N, K;
  const void* bias;
  int bias_dt;
  T* y;               // (M, N)
  int64_t xmask = 0;  // fp32: the AVX-512 row kernel reads x's 64-byte chunk c at chunk c ^ xmask (scramble_x)

  static constexpr int y_dt = std::is_same<T, uint16_t>::value ? DT_BF16
                              : std::is_same<T, Half>::value   ? DT_F16
                                                               : DT_F32;

  Dense row_group(int64_t m0, int64_t mr) const {  // rows [m0, m0 + mr) of x and y
    Dense g = *this;
    g.x += m0 * K, g.y += m0 * N, g.M = mr;
    return g;
  }

  inline void store(int64_t m, int64_t n, float acc) const {
    if (bias) acc += load_f(bias, bias_dt, n);
    store_y(y, y_dt, m * N + n, acc);
  }
};
using Bf16 = Dense<uint16_t>;

struct Bf16Avx512 {
  template <int MR, bool PF>
  TGT_BF16 static void rows(const Bf16& c_in, int64_t n_begin, int64_t n_end) {
    const Bf16 c = c_in;
    constexpr int U = row_unroll<MR>();
    for (int64_t n = n_begin; n < n_end; n++) {
      const uint16_t* w = c.w + n * c.K;
      __m512 acc[MR][U];
      for (int i = 0; i < MR; i++)
        for (int u = 0; u < U; u++) acc[i][u] = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 32 * U <= c.K; k += 32 * U) {
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
          ROW_PREFETCH((const char*)(w + k + 32 * u) + PREFETCH);
          const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * u);
#pragma GCC unroll 8
          for (int i = 0; i < MR; i++)
            acc[i][u] = _mm512_dpbf16_ps(acc[i][u], (__m512bh)_mm512_loadu_si512(c.x + i * c.K + k + 32 * u), wv);
        }
      }
      for (; k < c.K; k += 32) {  // odd K: the missing half of a pair is zero
        const __mmask32 mk = (__mmask32)tail_mask(c.K - k);
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mk, w + k);
        for (int i = 0; i < MR; i++)
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)_mm512_maskz_loadu_epi16(mk, c.x + i * c.K + k), wv);
      }
      for (int i = 0; i < MR; i++) {
        for (int u = 1; u < U; u++) acc[i][0] = _mm512_add_ps(acc[i][0], acc[i][u]);
        c.store(i, n, _mm512_reduce_add_ps(acc[i][0]));
      }
    }
  }

  template <int MR, int NR>
  TGT_BF16 static void tile(const Bf16& c, int64_t m0, int64_t n0) {
    TILE_ROWS(MR, NR)
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; i++)
      for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < c.K; k += 32) {
      const __mmask32 mk = (__mmask32)tail_mask(c.K - k);  // odd K: the missing half of a pair is zero
      __m512i wv[NR];
#pragma GCC unroll 8
      for (int j = 0; j < NR; j++) wv[j] = _mm512_maskz_loadu_epi16(mk, wr_[j] + k);
#pragma GCC unroll 8
      for (int i = 0; i < MR; i++) {
        const __m512i xv = _mm512_maskz_loadu_epi16(mk, xr_[i] + k);
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
      }
    }
    for (int i = 0; i < mr; i++)
      for (int j = 0; j < nr; j++) c.store(m0 + i, n0 + j, _mm512_reduce_add_ps(acc[i][j]));
  }
};

void linear_bf16(const uint16_t* x, const uint16_t* w, const void* bias, int bias_dt, int64_t M, int64_t N,
                 int64_t K, uint16_t* y) {
  const Bf16 c{x, w, M, N, K, bias, bias_dt, y};
  if (use_bf16()) {
    if (!run_rows<Bf16Avx512>(c)) run_tiles<Bf16Avx512>(c);
  } else {
    run_fma_fallback(c);
  }
}

// ---------------------------------------------------------------------------------------------------------
// fp16: y = x @ w^T (+ b), fp16 in, fp32 accumulation, fp16 out. No x86 before AVX512-FP16 multiplies fp16, so
// each vector of weights and of x is widened in registers (vcvtph2ps, exact) and the weight-only int8 kernels'
// fp32 FMA runs: the weights stream at 2 bytes each, as bf16's do. x stays fp16: widened once into an fp32 copy,
// a 16 KiB x (K = 4096) beside each 8 KiB weight row made that layer read up to 1.56x slower (MATMUL.md). Its
// chunks are not scrambled either: scramble_x's chunk order is defined for fp32 x.

using F16 = Dense<Half>;

void linear_f16(const uint16_t* x, const uint16_t* w, const void* bias, int bias_dt, int64_t M, int64_t N,
                int64_t K, uint16_t* y) {
  const F16 c{(const Half*)x, (const Half*)w, M, N, K, bias, bias_dt, (Half*)y};
  if (use_f()) {
    if (!run_rows<FmaAvx512>(c)) run_tiles<FmaAvx512>(c);
  } else {
    run_fma_fallback(c);
  }
}

// ---------------------------------------------------------------------------------------------------------
// fp32: y = x @ w^T (+ b), fp32 FMA. For decode: stock sgemv (MKL) reads W at about half the machine's
// bandwidth on AMD EPYC (kernels/MATMUL.md); from PREFILL_MIN_ROWS["f32"] rows F.linear runs.

using F32 = Dense<float>;

void linear_f32(const float* x, const float* w, const void* bias, int bias_dt, int64_t M, int64_t N, int64_t K,
                float* y) {
  const F32 c{x, w, M, N, K, bias, bias_dt, y};
  if (use_f()) {
    run_scrambled_rows_or_tiles<FmaAvx512>(c);
  } else {
    run_fma_fallback(c);
  }
}

// ---------------------------------------------------------------------------------------------------------
// tanh GELU for the fused backend: y = x * 0.5 * (1 + tanh(c * x * (1 + 0.044715 * x * x))) (* gate), with
// c = 0.79788456 (BLOOM, Megatron's literal) or sqrt(2/pi) (T5's gelu_new, times wi_1's output as the gate). The
// same function as x / (1 + exp(-2u)) with u the tanh's argument (0.5 * (1 + tanh u) is the logistic of 2u), in
// fp32 per element (bf16 / fp16 widened exactly, rounded once at the end), exp by vec.h's Cephes polynomial
// (~1 ulp). One pass over the (B*T, d_ff) activation where torch's seven or eight elementwise ops took as many:
// a third of a batch-16 fp32 prefill of the bloomz-560m shape (MATMUL.md).

template <int W>
inline typename Vec<W>::f gelu_v(typename Vec<W>::f x, float c) {
  const typename Vec<W>::f u = x * (x * x * 0.044715f + 1.f) * c;
  return x / (expv<W>(u * -2.f) + 1.f);
}

static inline float gelu_1(float x, float c) {
  const float u = x * (x * x * 0.044715f + 1.f) * c;
  return x / (std::exp(u * -2.f) + 1.f);
}

// y[i] = gelu(x[i]) (* g[i] when g is not null)
template <int W>
inline void gelu_span(const float* x, const float* g, float c, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    typename Vec<W>::f v = gelu_v<W>(loadf<W>(x + i), c);
    if (g) v = v * loadf<W>(g + i);
    storef<W>(y + i, v);
  }
  for (; i < n; i++) y[i] = g ? gelu_1(x[i], c) * g[i] : gelu_1(x[i], c);
}

using GeluSpan = void (*)(const float*, const float*, float, float*, int64_t);
TGT_F __attribute__((flatten)) static void gelu_avx512(const float* x, const float* g, float c, float* y, int64_t n) {
  gelu_span<16>(x, g, c, y, n);
}
TGT_AVX2 __attribute__((flatten)) static void gelu_avx2(const float* x, const float* g, float c, float* y, int64_t n) {
  gelu_span<8>(x, g, c, y, n);
}
static void gelu_scalar(const float* x, const float* g, float c, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] = g ? gelu_1(x[i], c) * g[i] : gelu_1(x[i], c);
}

// x, gate (or null), y: n elements of dt (fp32, bf16, fp16). 16-bit values go through fp32 buffers of 4 KiB.
void tanh_gelu(const void* x, const void* gate, int dt, int64_t n, float c, void* y) {
  const GeluSpan span = use_f() ? gelu_avx512 : use_avx2() ? gelu_avx2 : gelu_scalar;
  constexpr int64_t CHUNK = 1024;
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) if (n >= (1 << 15))
  for (int64_t ch = 0; ch < chunks; ch++) {
    const int64_t i0 = ch * CHUNK, len = std::min(CHUNK, n - i0);
    if (dt == DT_F32) {
      span((const float*)x + i0, gate ? (const float*)gate + i0 : nullptr, c, (float*)y + i0, len);
      continue;
    }
    float buf[CHUNK], gbuf[CHUNK];
    for (int64_t i = 0; i < len; i++) buf[i] = load_f(x, dt, i0 + i);
    if (gate)
      for (int64_t i = 0; i < len; i++) gbuf[i] = load_f(gate, dt, i0 + i);
    span(buf, gate ? gbuf : nullptr, c, buf, len);
    for (int64_t i = 0; i < len; i++) store_y(y, dt, i0 + i, buf[i]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// T5's RMSNorm (transformers' T5LayerNorm) for the fused backend, one pass per row where torch's eight ops (float,
// pow, mean, add, rsqrt, mul, to, mul) each read and write it; an mt0-small decode step has 25 of them.
//   t = x * (1 / sqrt(mean(x^2) + eps))     fp32 (16-bit x widened exactly), mean = sum / C as torch's
//   y = w * round_w(t)                        t rounded to w's dtype before the product, as transformers does;
//                                             fp16 weights (activations kept in fp32): y = fp32(w) * t, in fp32
// The reference is minibloom.ops.rms_norm. Only the sum of squares runs in another order (fp32: ~1 ulp).

template <int W>
inline float sumsq(const float* x, int64_t n) {
  typename Vec<W>::f a = splat<W>(0.f), b = splat<W>(0.f);
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const typename Vec<W>::f u = loadf<W>(x + i), v = loadf<W>(x + i + W);
    a += u * u;
    b += v * v;
  }
  alignas(64) float lanes[W];
  storef<W>(lanes, a + b);
  float s = 0.f;
  for (int l = 0; l < W; l++) s += lanes[l];
  for (; i < n; i++) s += x[i] * x[i];
  return s;
}

using SumSq = float (*)(const float*, int64_t);
TGT_F __attribute__((flatten)) static float sumsq_avx512(const float* x, int64_t n) { return sumsq<16>(x, n); }
TGT_AVX2 __attribute__((flatten)) static float sumsq_avx2(const float* x, int64_t n) { return sumsq<8>(x, n); }
static float sumsq_scalar(const float* x, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; i++) s += x[i] * x[i];
  return s;
}

static inline float round_to(float v, int dt) {
  return dt == DT_BF16 ? bf16_to_f32(f32_to_bf16(v)) : dt == DT_F16 ? f16_to_f32(f32_to_f16(v)) : v;
}

// x (M, C) of xdt, w (C,) of wdt; y (M, C) of wdt, or fp32 when w is fp16 (see above).
void rms_norm(const void* x, int xdt, const void* w, int wdt, int64_t M, int64_t C, float eps, void* y) {
  const SumSq ss = use_f() ? sumsq_avx512 : use_avx2() ? sumsq_avx2 : sumsq_scalar;
  const int ydt = wdt == DT_F16 ? DT_F32 : wdt;
#pragma omp parallel if (M * C >= (1 << 16))
  {
    std::vector<float> widened(xdt == DT_F32 ? 0 : C);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < M; r++) {
      const float* xr = (const float*)x + r * C;
      if (xdt != DT_F32) {
        for (int64_t c = 0; c < C; c++) widened[c] = load_f(x, xdt, r * C + c);
        xr = widened.data();
      }
      const float inv = 1.f / std::sqrt(ss(xr, C) / (float)C + eps);
      for (int64_t c = 0; c < C; c++) {
        const float t = xr[c] * inv;
        store_y(y, ydt, r * C + c, load_f(w, wdt, c) * (wdt == DT_F16 ? t : round_to(t, wdt)));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Row argmax of the logits (greedy decoding), exactly torch.argmax: the first index of the row's maximum, a NaN
// counting as larger than any number (the first NaN wins). torch's CPU argmax reads ~2.3 GB/s on lm_head's
// 250,880 logits (0.44 ms per token in fp32, 1 ms in bf16); this reads them at cache speed.

// x[from:N) scanned on from the running (best, best_i): the first NaN's index, else the first index of the max.
static int64_t argmax_scan(const void* x, int dt, int64_t from, int64_t N, float best, int64_t best_i) {
  for (int64_t i = from; i < N; i++) {
    const float v = load_f(x, dt, i);
    if (v != v) return i;
    if (v > best) best = v, best_i = i;
  }
  return best_i;
}

// 16 lanes: each keeps its running max and the vector index where it was first reached (strict >), so the
// smallest index among the lanes holding the overall max is the first occurrence. NaNs are only detected here;
// a row with one is rescanned by the scalar code for its first NaN.
TGT_F static int64_t argmax_row_avx512(const void* x, int dt, int64_t N) {
  const int64_t N16 = N & ~int64_t(15);
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  __m512i vidx = _mm512_setzero_si512(), cur = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi32(1);
  __mmask16 nan = 0;
  for (int64_t i = 0; i < N16; i += 16) {
    const __m512 v = load16_as_f32(x, dt, i, 0xffff);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
    vmax = _mm512_mask_mov_ps(vmax, gt, v);
    vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
    cur = _mm512_add_epi32(cur, one);
  }
  if (nan) return argmax_scan(x, dt, 0, N, -INFINITY, 0);
  alignas(64) float m[16];
  alignas(64) int32_t ix[16];
  _mm512_store_ps(m, vmax);
  _mm512_store_si512(ix, vidx);
  float best = m[0];
  int64_t best_i = (int64_t)ix[0] * 16;
  for (int l = 1; l < 16; l++) {
    const int64_t i = (int64_t)ix[l] * 16 + l;
    if (m[l] > best || (m[l] == best && i < best_i)) best = m[l], best_i = i;
  }
  return argmax_scan(x, dt, N16, N, best, best_i);  // the tail comes after every vector index
}

void argmax_rows(const void* x, int dt, int64_t M, int64_t N, int64_t* out) {
  const bool simd = use_f();
#pragma omp parallel for if (M > 1 && M * N >= (1 << 20))
  for (int64_t r = 0; r < M; r++) {
    const void* row = (const char*)x + r * N * (dt == DT_F32 ? 4 : 2);
    out[r] = simd ? argmax_row_avx512(row, dt, N) : argmax_scan(row, dt, 0, N, -INFINITY, 0);
  }
}

}  // namespace mbmm
