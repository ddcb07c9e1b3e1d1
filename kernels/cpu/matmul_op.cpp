// torch.ops.minibloom_matmul.*: stable-ABI wrappers around the kernels in matmul.cpp.
// Only the stable headers (not torch/extension.h): a cold build takes ~2 s instead of ~26 s.
// Shape/dtype validation with user-facing messages lives in matmul.py; the checks here are a safety net.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include "stable_empty.h"

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

namespace mbmm {  // matmul.cpp
int simd_level(int cap);
void quantize_rows(const void* w, int w_dt, int64_t N, int64_t K, int8_t* q, float* scale);
void quantize_activations(const void* x, int x_dt, int64_t M, int64_t K, float threshold, int8_t* xq,
                          float* s_x, std::vector<int32_t>& outliers);
void linear_w8a8(const void* x, int x_dt, const int8_t* w, const float* w_scale, const void* bias,
                 int bias_dt, float threshold, int64_t M, int64_t N, int64_t K, void* y);
void linear_int8_weight(const void* x, int x_dt, const int8_t* w, const float* w_scale, const void* bias,
                        int bias_dt, int64_t M, int64_t N, int64_t K, void* y);
void linear_f32(const float* x, const float* w, const void* bias, int bias_dt, int64_t M, int64_t N, int64_t K,
                float* y);
void linear_bf16(const uint16_t* x, const uint16_t* w, const void* bias, int bias_dt, int64_t M, int64_t N,
                 int64_t K, uint16_t* y);
void linear_f16(const uint16_t* x, const uint16_t* w, const void* bias, int bias_dt, int64_t M, int64_t N,
                int64_t K, uint16_t* y);
void argmax_rows(const void* x, int dt, int64_t M, int64_t N, int64_t* out);
void tanh_gelu(const void* x, const void* gate, int dt, int64_t n, float c, void* y);
void rms_norm(const void* x, int xdt, const void* w, int wdt, int64_t M, int64_t C, float eps, void* y);
void w8a8_epilogue(const int32_t* acc, const float* s_x, const float* w_scale, const float* extra,
                   const void* bias, int bias_dt, int64_t M, int64_t N, void* y, int y_dt);
}  // namespace mbmm

static bool is_bf16(const Tensor& t) { return t.scalar_type() == ScalarType::BFloat16; }
static bool is_float(const Tensor& t) {
  const ScalarType s = t.scalar_type();
  return s == ScalarType::Float || s == ScalarType::BFloat16 || s == ScalarType::Half;
}
// matmul.cpp's element type codes: DT_F32 0, DT_BF16 1, DT_F16 2.
static int dtype_code(const Tensor& t) { return is_bf16(t) ? 1 : t.scalar_type() == ScalarType::Half ? 2 : 0; }

static void check_2d(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.is_cpu() && t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous 2-D CPU tensor");
}

// x (M, K) fp32|bf16|fp16 contiguous; returns M, K and checks w (N, K) of dtype wdt, scale (N,), bias (N,).
static void check_args(const Tensor& x, const Tensor& w, ScalarType wdt, const Tensor* w_scale,
                       const std::optional<Tensor>& bias) {
  check_2d(x, "x");
  check_2d(w, "w");
  STD_TORCH_CHECK(is_float(x), "x must be float32, bfloat16 or float16");
  STD_TORCH_CHECK(w.scalar_type() == wdt && w.size(1) == x.size(1), "w has the wrong dtype or K");
  if (w_scale)
    STD_TORCH_CHECK(w_scale->is_cpu() && w_scale->scalar_type() == ScalarType::Float && w_scale->is_contiguous() &&
                        w_scale->numel() == w.size(0),
                    "w_scale must be a float32 (N,) CPU tensor");
  if (bias)
    STD_TORCH_CHECK(bias->is_cpu() && is_float(*bias) && bias->is_contiguous() && bias->numel() == w.size(0),
                    "bias must be a float32, bfloat16 or float16 (N,) CPU tensor");
}

static const void* bias_ptr(const std::optional<Tensor>& b) { return b ? b->data_ptr() : nullptr; }
static int bias_dt(const std::optional<Tensor>& b) { return b ? dtype_code(*b) : 0; }

int64_t simd_level(int64_t cap) { return mbmm::simd_level((int)cap); }

static void check_quantize_rows(const Tensor& w, const Tensor& q, const Tensor& scale) {
  check_2d(w, "w");
  STD_TORCH_CHECK(is_float(w), "w must be float32, bfloat16 or float16");
  STD_TORCH_CHECK(q.is_cpu() && q.scalar_type() == ScalarType::Char && q.dim() == 2 && q.size(0) == w.size(0) &&
                      q.size(1) == w.size(1) && q.is_contiguous(),
                  "q must be a contiguous int8 CPU tensor of w's shape");
  STD_TORCH_CHECK(scale.is_cpu() && scale.scalar_type() == ScalarType::Float && scale.dim() == 1 &&
                      scale.size(0) == w.size(0) && scale.is_contiguous(),
                  "scale must be a contiguous float32 (N,) CPU tensor");
}

// Writes into q and scale, which the caller slices from the whole matrix's int8 storage (no temporary copy).
void quantize_rows_into(Tensor w, Tensor q, Tensor scale) {
  check_quantize_rows(w, q, scale);
  mbmm::quantize_rows(w.data_ptr(), dtype_code(w), w.size(0), w.size(1), (int8_t*)q.data_ptr(),
                      (float*)scale.data_ptr());
}

std::tuple<Tensor, Tensor> quantize_rows(Tensor w) {
  check_2d(w, "w");
  const int64_t N = w.size(0), K = w.size(1);
  Tensor q = empty_cpu({N, K}, ScalarType::Char);
  Tensor scale = empty_cpu({N}, ScalarType::Float);
  quantize_rows_into(w, q, scale);
  return {q, scale};
}

std::tuple<Tensor, Tensor, Tensor> quantize_activations(Tensor x, double threshold) {
  check_2d(x, "x");
  STD_TORCH_CHECK(is_float(x), "x must be float32, bfloat16 or float16");
  const int64_t M = x.size(0), K = x.size(1);
  Tensor xq = empty_cpu({M, K}, ScalarType::Char);
  Tensor s_x = empty_cpu({M}, ScalarType::Float);
  std::vector<int32_t> outl;
  mbmm::quantize_activations(x.data_ptr(), dtype_code(x), M, K, (float)threshold, (int8_t*)xq.data_ptr(),
                             (float*)s_x.data_ptr(), outl);
  Tensor o = empty_cpu({(int64_t)outl.size()}, ScalarType::Int);
  if (!outl.empty()) std::copy(outl.begin(), outl.end(), (int32_t*)o.data_ptr());
  return {xq, s_x, o};
}

Tensor linear_w8a8(Tensor x, Tensor wq, Tensor w_scale, std::optional<Tensor> bias, double threshold) {
  check_args(x, wq, ScalarType::Char, &w_scale, bias);
  const int64_t M = x.size(0), K = x.size(1), N = wq.size(0);
  Tensor y = empty_cpu({M, N}, x.scalar_type());
  mbmm::linear_w8a8(x.data_ptr(), dtype_code(x), (const int8_t*)wq.data_ptr(), (const float*)w_scale.data_ptr(),
                    bias_ptr(bias), bias_dt(bias), (float)threshold, M, N, K, y.data_ptr());
  return y;
}

Tensor linear_int8_weight(Tensor x, Tensor wq, Tensor w_scale, std::optional<Tensor> bias) {
  check_args(x, wq, ScalarType::Char, &w_scale, bias);
  const int64_t M = x.size(0), K = x.size(1), N = wq.size(0);
  Tensor y = empty_cpu({M, N}, x.scalar_type());
  mbmm::linear_int8_weight(x.data_ptr(), dtype_code(x), (const int8_t*)wq.data_ptr(),
                           (const float*)w_scale.data_ptr(), bias_ptr(bias), bias_dt(bias), M, N, K,
                           y.data_ptr());
  return y;
}

// bf16 or fp16: x, w and y of one 16-bit float type, passed to the kernel as their bits.
using Linear16 = void (*)(const uint16_t*, const uint16_t*, const void*, int, int64_t, int64_t, int64_t, uint16_t*);

static Tensor linear_16(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, ScalarType dt,
                        const char* x_message, Linear16 kernel) {
  check_args(x, w, dt, nullptr, bias);
  STD_TORCH_CHECK(x.scalar_type() == dt, x_message);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  Tensor y = empty_cpu({M, N}, dt);
  kernel((const uint16_t*)x.data_ptr(), (const uint16_t*)w.data_ptr(), bias_ptr(bias), bias_dt(bias), M, N, K,
         (uint16_t*)y.data_ptr());
  return y;
}

Tensor linear_bf16(Tensor x, Tensor w, std::optional<Tensor> bias) {
  return linear_16(x, w, bias, ScalarType::BFloat16, "x must be bfloat16", mbmm::linear_bf16);
}

Tensor linear_f16(Tensor x, Tensor w, std::optional<Tensor> bias) {
  return linear_16(x, w, bias, ScalarType::Half, "x must be float16", mbmm::linear_f16);
}

Tensor linear_f32(Tensor x, Tensor w, std::optional<Tensor> bias) {
  check_args(x, w, ScalarType::Float, nullptr, bias);
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Float, "x must be float32");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  Tensor y = empty_cpu({M, N}, x.scalar_type());
  mbmm::linear_f32((const float*)x.data_ptr(), (const float*)w.data_ptr(), bias_ptr(bias), bias_dt(bias), M, N,
                   K, (float*)y.data_ptr());
  return y;
}

// y (M, N) in like's dtype from torch._int_mm's int32 acc: acc * s_x * w_scale (+ extra) (+ bias).
Tensor w8a8_epilogue(Tensor acc, Tensor s_x, Tensor w_scale, std::optional<Tensor> extra, std::optional<Tensor> bias,
                     Tensor like) {
  check_2d(acc, "acc");
  STD_TORCH_CHECK(acc.scalar_type() == ScalarType::Int, "acc must be int32");
  const int64_t M = acc.size(0), N = acc.size(1);
  STD_TORCH_CHECK(s_x.is_cpu() && s_x.scalar_type() == ScalarType::Float && s_x.is_contiguous() && s_x.numel() == M,
                  "s_x must be a float32 (M,) CPU tensor");
  STD_TORCH_CHECK(w_scale.is_cpu() && w_scale.scalar_type() == ScalarType::Float && w_scale.is_contiguous() &&
                      w_scale.numel() == N,
                  "w_scale must be a float32 (N,) CPU tensor");
  if (extra) {
    check_2d(*extra, "extra");
    STD_TORCH_CHECK(extra->scalar_type() == ScalarType::Float && extra->size(0) == M && extra->size(1) == N,
                    "extra must be float32 of acc's shape");
  }
  if (bias)
    STD_TORCH_CHECK(bias->is_cpu() && is_float(*bias) && bias->is_contiguous() && bias->numel() == N,
                    "bias must be a float32, bfloat16 or float16 (N,) CPU tensor");
  STD_TORCH_CHECK(is_float(like), "like must be float32, bfloat16 or float16");
  Tensor y = empty_cpu({M, N}, like.scalar_type());
  mbmm::w8a8_epilogue((const int32_t*)acc.data_ptr(), (const float*)s_x.data_ptr(),
                      (const float*)w_scale.data_ptr(), extra ? (const float*)extra->data_ptr() : nullptr,
                      bias_ptr(bias), bias_dt(bias), M, N, y.data_ptr(), dtype_code(like));
  return y;
}

// tanh GELU of every element of x (contiguous, any shape), times gate's when given (same dtype and size), as a
// 1-D tensor of x.numel() (the wrapper views it).
Tensor tanh_gelu(Tensor x, double c, std::optional<Tensor> gate) {
  STD_TORCH_CHECK(x.is_cpu() && x.is_contiguous() && is_float(x), "x must be a contiguous float CPU tensor");
  if (gate)
    STD_TORCH_CHECK(gate->is_cpu() && gate->is_contiguous() && gate->scalar_type() == x.scalar_type() &&
                        gate->numel() == x.numel(),
                    "gate must be a contiguous CPU tensor of x's dtype and size");
  Tensor y = empty_cpu({x.numel()}, x.scalar_type());
  mbmm::tanh_gelu(x.data_ptr(), gate ? gate->data_ptr() : nullptr, dtype_code(x), x.numel(), (float)c, y.data_ptr());
  return y;
}

// T5's RMSNorm of each row of x (M, C) with weight w (C,): y (M, C) in w's dtype, or fp32 for fp16 weights.
Tensor rms_norm(Tensor x, Tensor w, double eps) {
  check_2d(x, "x");
  STD_TORCH_CHECK(is_float(x), "x must be float32, bfloat16 or float16");
  STD_TORCH_CHECK(w.is_cpu() && w.dim() == 1 && w.is_contiguous() && is_float(w) && w.size(0) == x.size(1),
                  "w must be a contiguous float (C,) CPU tensor, C = x's last dim");
  const bool half_w = w.scalar_type() == ScalarType::Half;
  Tensor y = empty_cpu({x.size(0), x.size(1)}, half_w ? ScalarType::Float : w.scalar_type());
  mbmm::rms_norm(x.data_ptr(), dtype_code(x), w.data_ptr(), dtype_code(w), x.size(0), x.size(1), (float)eps,
                 y.data_ptr());
  return y;
}

Tensor argmax_rows(Tensor x) {
  check_2d(x, "x");
  STD_TORCH_CHECK(is_float(x), "x must be float32, bfloat16 or float16");
  STD_TORCH_CHECK(x.size(1) > 0, "argmax of an empty row");
  const int64_t M = x.size(0), N = x.size(1);
  Tensor out = empty_cpu({M}, ScalarType::Long);
  mbmm::argmax_rows(x.data_ptr(), dtype_code(x), M, N, (int64_t*)out.data_ptr());
  return out;
}

STABLE_TORCH_LIBRARY(minibloom_matmul, m) {
  m.def("simd_level(int cap) -> int");
  m.def("quantize_rows(Tensor w) -> (Tensor, Tensor)");
  m.def("quantize_rows_into(Tensor w, Tensor(a!) q, Tensor(b!) scale) -> ()");
  m.def("quantize_activations(Tensor x, float threshold) -> (Tensor, Tensor, Tensor)");
  m.def("linear_w8a8(Tensor x, Tensor wq, Tensor w_scale, Tensor? bias, float threshold) -> Tensor");
  m.def("linear_int8_weight(Tensor x, Tensor wq, Tensor w_scale, Tensor? bias) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_f16(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_f32(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("tanh_gelu(Tensor x, float c, Tensor? gate) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("w8a8_epilogue(Tensor acc, Tensor s_x, Tensor w_scale, Tensor? extra, Tensor? bias, Tensor like) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(minibloom_matmul, CPU, m) {
  m.impl("quantize_rows", TORCH_BOX(&quantize_rows));
  m.impl("quantize_rows_into", TORCH_BOX(&quantize_rows_into));
  m.impl("quantize_activations", TORCH_BOX(&quantize_activations));
  m.impl("linear_w8a8", TORCH_BOX(&linear_w8a8));
  m.impl("linear_int8_weight", TORCH_BOX(&linear_int8_weight));
  m.impl("linear_bf16", TORCH_BOX(&linear_bf16));
  m.impl("linear_f16", TORCH_BOX(&linear_f16));
  m.impl("linear_f32", TORCH_BOX(&linear_f32));
  m.impl("argmax_rows", TORCH_BOX(&argmax_rows));
  m.impl("w8a8_epilogue", TORCH_BOX(&w8a8_epilogue));
  m.impl("tanh_gelu", TORCH_BOX(&tanh_gelu));
  m.impl("rms_norm", TORCH_BOX(&rms_norm));
}

STABLE_TORCH_LIBRARY_IMPL(minibloom_matmul, CompositeExplicitAutograd, m) {
  m.impl("simd_level", TORCH_BOX(&simd_level));  // no tensor argument to dispatch on
}
