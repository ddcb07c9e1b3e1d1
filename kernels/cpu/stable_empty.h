// empty_cpu: a new contiguous CPU tensor for an op's output, through the C shim's aoti_torch_empty_strided.
// torch::stable::new_empty calls aten::new_empty through the dispatcher by name (a string lookup and a boxed call):
// 1-1.5 us more per op call, and far more in a decode step, where every line of framework code it runs has just been
// evicted from the caches by the weight stream (kernels/MATMUL.md, "What a step pays outside the kernels").
#pragma once
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <initializer_list>

inline torch::stable::Tensor empty_cpu(std::initializer_list<int64_t> sizes, torch::headeronly::ScalarType dtype) {
  int64_t size[8], stride[8];
  const int64_t ndim = (int64_t)sizes.size();
  STD_TORCH_CHECK(ndim <= 8, "empty_cpu: at most 8 dims");
  int64_t i = 0;
  for (int64_t s : sizes) size[i++] = s;
  for (int64_t d = ndim - 1, st = 1; d >= 0; d--) {
    stride[d] = st;
    st *= size[d] > 1 ? size[d] : 1;
  }
  AtenTensorHandle h;
  STD_TORCH_CHECK(aoti_torch_empty_strided(ndim, size, stride,
                                           torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype)),
                                           aoti_torch_device_type_cpu(), 0, &h) == AOTI_TORCH_SUCCESS,
                  "allocating the output tensor failed");
  return torch::stable::Tensor(h);
}
