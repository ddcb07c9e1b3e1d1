"""Plain-PyTorch references for the matmul kernels: the executable spec they are tested against.

y = x @ W^T + b with W in PyTorch Linear layout (N, K). Quantization follows LLM.int8() (arXiv 2208.07339):
symmetric absmax int8, per output row for weights and per token for activations, and activation columns with
any |x| > threshold ("outlier features") kept in floating point. Scales are applied by dividing (x / s),
never by multiplying with 1/s: the two round differently on half-way cases.
"""
import math

import torch


def _absmax(t: torch.Tensor, dim: int) -> torch.Tensor:
    """max |t| along dim; 0 where dim is empty (a zero-row batch, a K = 0 layer)."""
    if t.shape[dim] == 0:
        return t.new_zeros(t.shape[:dim] + t.shape[dim + 1:])
    return t.abs().amax(dim=dim)


def quantize_rows_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (wq int8 (N, K), scale fp32 (N,)); scale = absmax(row) / 127, all-zero row -> 1."""
    w = w.float()
    scale = _absmax(w, 1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))                # (N,)
    wq = torch.round(w / scale[:, None]).to(torch.int8)                          # (N, K)
    return wq, scale


def quantize_activations_ref(x: torch.Tensor, threshold: float = 6.0):
    """x (M, K) -> (xq int8 (M, K), s_x fp32 (M,), outlier columns int32): the activation side of linear_w8a8."""
    x = x.float()
    if threshold > 0:
        outliers = torch.nonzero(_absmax(x, 0) > threshold)[:, 0].to(torch.int32)
    else:
        outliers = torch.zeros(0, dtype=torch.int32)
    x_in = x.clone()
    x_in[:, outliers.long()] = 0
    s_x = _absmax(x_in, 1) / 127
    s_x = torch.where(s_x > 0, s_x, torch.ones_like(s_x))                         # (M,)
    xq = torch.round(x_in / s_x[:, None]).to(torch.int8)                         # (M, K)
    return xq, s_x, outliers


def linear_w8a8_ref(x, wq, w_scale, bias=None, threshold=6.0):
    """LLM.int8(): int8 x int8 -> int32 for the regular columns, fp32 for the outlier columns; y in x's dtype."""
    shape = x.shape
    x2 = x.reshape(math.prod(shape[:-1]), shape[-1]).float()                      # (M, K)
    xq, s_x, outliers = quantize_activations_ref(x2, threshold)
    acc = (xq.long() @ wq.long().t()).to(torch.int32)                             # (M, N), exact
    y = acc.float() * s_x[:, None] * w_scale[None, :]
    if torch.compiler.is_compiling() or outliers.numel():  # compiled: no branch on the data (none adds zeros)
        o = outliers.long()
        y = y + x2[:, o] @ (wq[:, o].float() * w_scale[:, None]).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], wq.shape[0])


def linear_int8_weight_ref(x, wq, w_scale, bias=None):
    """Weight-only int8: y = (x @ wq^T) * w_scale (+ b), fp32 accumulation; y in x's dtype."""
    y = (x.float() @ wq.float().t()) * w_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def linear_bf16_ref(x, w, bias=None):
    """bf16 x bf16 with fp32 accumulation, rounded once to bf16."""
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.bfloat16)


def linear_f16_ref(x, w, bias=None):
    """fp16 x fp16 with fp32 accumulation, rounded once to fp16."""
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.float16)


def linear_f32_ref(x, w, bias=None):
    """fp32 x fp32 -> fp32 (only the summation order may differ between implementations)."""
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y


def argmax_ref(x):
    """Greedy pick: the first index of each row's maximum over the last dim (NaN counts as the maximum)."""
    return x.argmax(-1)
