// torch.ops.minibloom_attn.{decode, prefill, simd_level}: stable-ABI wrappers around attention.cpp.
// Only the stable headers are included (cold build ~2 s instead of ~26 s with torch/extension.h).
// The checks here guard every pointer the kernels read (attention.py calls decode directly and, when a check
// fails, reruns its own checks, which name the mistake or convert what can be converted).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include "stable_empty.h"

#include <cstdint>
#include <initializer_list>
#include <optional>

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

extern "C" int mbattn_simd_level(int cap);
extern "C" void mbattn_decode(const void* q, const void* k, const void* v, void* out, int dtype, int64_t B,
                              int64_t H, int64_t L, int64_t D, const int64_t* q_st, const int64_t* k_st,
                              const int64_t* v_st, const int32_t* key_pos, float scale, const float* alibi,
                              const float* t5_table, int64_t num_buckets, const int32_t* t5_qpos, int t5_bidir,
                              int64_t t5_max_distance, const float* bias);
extern "C" void mbattn_prefill(const void* q, const void* k, const void* v, void* out, int dtype, int64_t B,
                               int64_t H, int64_t T, int64_t S, int64_t D, const int64_t* q_st, const int64_t* k_st,
                               const int64_t* v_st, const int32_t* key_pos, float scale, int causal,
                               int64_t q_offset, const float* alibi, const float* t5_table, int64_t num_buckets,
                               int t5_bidir, int64_t t5_max_distance);

namespace {

// Checks q, k, v; returns attention.cpp's dtype code: 0 fp32, 1 bf16, 2 fp16.
int check_qkv(const Tensor& q, const Tensor& k, const Tensor& v, int64_t qdim) {
  const ScalarType dt = q.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::BFloat16 || dt == ScalarType::Half,
                  "attention: q must be float32, bfloat16 or float16");
  STD_TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "attention: q, k, v must share one dtype");
  STD_TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu(), "attention: q, k, v must be CPU tensors");
  STD_TORCH_CHECK(q.dim() == qdim && k.dim() == 4 && v.dim() == 4, "attention: wrong number of dimensions");
  STD_TORCH_CHECK(q.stride(qdim - 1) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
                  "attention: the last dim of q, k, v must be contiguous");
  STD_TORCH_CHECK(q.size(qdim - 1) >= 1 && q.size(qdim - 1) <= 256, "attention: head dim must be 1..256");
  return dt == ScalarType::BFloat16 ? 1 : dt == ScalarType::Half ? 2 : 0;
}

template <class T>
const T* ptr_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? static_cast<const T*>(t->data_ptr()) : nullptr;
}

// An optional vector/table argument: absent, or a contiguous CPU tensor of this dtype and shape.
void check_optional(const std::optional<Tensor>& t, ScalarType dt, std::initializer_list<int64_t> shape,
                    const char* what) {
  if (!t.has_value()) return;
  STD_TORCH_CHECK(t->is_cpu() && t->scalar_type() == dt && t->is_contiguous() && t->dim() == (int64_t)shape.size(),
                  "decode: ", what, " has the wrong dtype, device, layout or rank");
  int64_t i = 0;
  for (int64_t n : shape) {
    STD_TORCH_CHECK(n < 0 || t->size(i) == n, "decode: ", what, " has the wrong shape");
    i++;
  }
}

int64_t simd_level(int64_t cap) { return mbattn_simd_level((int)cap); }

Tensor decode(Tensor q, Tensor k, Tensor v, Tensor key_pos, double scale, std::optional<Tensor> alibi_slopes,
              std::optional<Tensor> t5_table, std::optional<Tensor> t5_query_pos, bool t5_bidirectional,
              int64_t t5_max_distance, std::optional<Tensor> bias) {
  const int dtype = check_qkv(q, k, v, 3);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  STD_TORCH_CHECK(key_pos.is_cpu(), "decode: key_pos must be a CPU tensor");
  STD_TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.size(0) == B && v.size(1) == H &&
                      v.size(3) == D, "decode: k, v do not match q in B, H or D");
  STD_TORCH_CHECK(key_pos.scalar_type() == ScalarType::Int && key_pos.is_contiguous() && key_pos.dim() == 2 &&
                      key_pos.size(0) == B, "decode: key_pos must be (B, L) int32");
  const int64_t L = key_pos.size(1);
  STD_TORCH_CHECK(k.size(2) == v.size(2) && k.size(2) >= L, "decode: k, v lengths differ or are shorter than L");
  STD_TORCH_CHECK(alibi_slopes.has_value() + t5_table.has_value() + bias.has_value() <= 1,
                  "decode: at most one of alibi_slopes, t5_table, bias");
  STD_TORCH_CHECK(t5_table.has_value() == t5_query_pos.has_value(), "decode: t5_table needs t5_query_pos");
  check_optional(alibi_slopes, ScalarType::Float, {H}, "alibi_slopes");
  check_optional(t5_table, ScalarType::Float, {-1, H}, "t5_table");
  STD_TORCH_CHECK(!t5_table.has_value() || t5_table->size(0) >= 2, "decode: t5_table needs >= 2 buckets");
  check_optional(t5_query_pos, ScalarType::Int, {B}, "t5_query_pos");
  check_optional(bias, ScalarType::Float, {H, L}, "bias");
  const int64_t q_st[2] = {q.stride(0), q.stride(1)};
  const int64_t k_st[3] = {k.stride(0), k.stride(1), k.stride(2)};
  const int64_t v_st[3] = {v.stride(0), v.stride(1), v.stride(2)};
  Tensor out = empty_cpu({B, H, D}, q.scalar_type());
  mbattn_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), dtype, B, H, L, D, q_st, k_st, v_st,
                static_cast<const int32_t*>(key_pos.data_ptr()), (float)scale, ptr_or_null<float>(alibi_slopes),
                ptr_or_null<float>(t5_table), t5_table.has_value() ? t5_table->size(0) : 0,
                ptr_or_null<int32_t>(t5_query_pos), t5_bidirectional, t5_max_distance, ptr_or_null<float>(bias));
  return out;
}

Tensor prefill(Tensor q, Tensor k, Tensor v, Tensor key_pos, double scale, bool causal, int64_t q_offset,
               std::optional<Tensor> alibi_slopes, std::optional<Tensor> t5_table, bool t5_bidirectional,
               int64_t t5_max_distance) {
  const int dtype = check_qkv(q, k, v, 4);
  STD_TORCH_CHECK(key_pos.scalar_type() == ScalarType::Int && key_pos.is_contiguous(), "prefill: key_pos int32");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), S = k.size(2);
  STD_TORCH_CHECK(key_pos.size(1) == S, "prefill: key_pos must be (B, S)");
  const int64_t q_st[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const int64_t k_st[3] = {k.stride(0), k.stride(1), k.stride(2)};
  const int64_t v_st[3] = {v.stride(0), v.stride(1), v.stride(2)};
  Tensor out = empty_cpu({B, H, T, D}, q.scalar_type());
  mbattn_prefill(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), dtype, B, H, T, S, D, q_st, k_st, v_st,
                 static_cast<const int32_t*>(key_pos.data_ptr()), (float)scale, causal, q_offset,
                 ptr_or_null<float>(alibi_slopes), ptr_or_null<float>(t5_table),
                 t5_table.has_value() ? t5_table->size(0) : 0, t5_bidirectional, t5_max_distance);
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY(minibloom_attn, m) {
  m.def("simd_level(int cap) -> int");
  m.def(
      "decode(Tensor q, Tensor k, Tensor v, Tensor key_pos, float scale, Tensor? alibi_slopes, Tensor? t5_table, "
      "Tensor? t5_query_pos, bool t5_bidirectional, int t5_max_distance, Tensor? bias) -> Tensor");
  m.def(
      "prefill(Tensor q, Tensor k, Tensor v, Tensor key_pos, float scale, bool causal, int q_offset, "
      "Tensor? alibi_slopes, Tensor? t5_table, bool t5_bidirectional, int t5_max_distance) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(minibloom_attn, CPU, m) {
  m.impl("decode", TORCH_BOX(&decode));
  m.impl("prefill", TORCH_BOX(&prefill));
}

// No tensor arguments, so no backend key to dispatch on.
STABLE_TORCH_LIBRARY_IMPL(minibloom_attn, CompositeExplicitAutograd, m) {
  m.impl("simd_level", TORCH_BOX(&simd_level));
}
