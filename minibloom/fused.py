"""The fused backend: the same calls as ops.Backend, answered by the kernels in minibloom.kernels.

CPU: C/AVX-512 kernels (kernels/cpu); CUDA: Triton kernels (kernels/triton). Each kernel is tested against the
reference it replaces (tests/kernels/), and whole models against transformers with backend="fused".
"""
import math

import torch
import torch.nn.functional as F

from . import ops



def _modules(device: torch.device):
    if device.type == "cuda":
        from .kernels.triton import attention, int8
        return attention, int8
    from .kernels.cpu import attention, matmul
    return attention, matmul


def available(device: torch.device) -> tuple[bool, str]:
    try:
        attention, matmul = _modules(device)
    except ImportError as e:
        return False, f"kernel modules missing ({e})"
    for mod in (attention, matmul):
        ok, reason = mod.available()
        if not ok:
            return False, reason
    return True, ""


class FusedBackend(ops.Backend):
    name = "fused"

    def __init__(self, device: torch.device):
        self.device = device
        self.attn, self.mm = _modules(device)

    def alibi_attention(self, q, k, v, key_pos, slopes, q_offset):
        key_pos = key_pos.to(torch.int32)
        scale = 1.0 / math.sqrt(q.shape[-1])
        if q.shape[2] == 1:
            return self.attn.attention_decode(q[:, :, 0], k, v, key_pos, scale=scale,
                                              alibi_slopes=slopes)[:, :, None]
        return self.attn.attention_prefill(q, k, v, key_pos, scale=scale, causal=True, q_offset=q_offset,
                                           alibi_slopes=slopes)

    def t5_attention(self, q, k, v, key_pos, bias, causal, q_offset):
        key_pos = key_pos.to(torch.int32)
        t5 = {}
        if bias is not None:
            t5 = dict(t5_table=bias.table.float(), t5_bidirectional=bias.bidirectional,
                      t5_max_distance=bias.max_distance)
        if q.shape[2] == 1:
            if bias is not None:
                t5["t5_query_pos"] = torch.full((q.shape[0],), q_offset, dtype=torch.int32, device=q.device)
            return self.attn.attention_decode(q[:, :, 0], k, v, key_pos, scale=1.0, **t5)[:, :, None]
        return self.attn.attention_prefill(q, k, v, key_pos, scale=1.0, causal=causal, q_offset=q_offset, **t5)

    def linear_int8(self, x, layer):
        if layer.quant == "int8":
            return self.mm.linear_w8a8(x, layer.weight, layer.weight_scale, layer.bias, layer.threshold)
        return self.mm.linear_int8_weight(x, layer.weight, layer.weight_scale, layer.bias)

    def argmax(self, logits):
        # An exact op, so GPU logits and other dtypes use torch's (on the CPU it reads ~2 GB/s: 0.4-1 ms a token).
        if self.device.type == "cpu" and logits.dtype in self.mm._FLOATS and logits.shape[-1] > 0:
            return self.mm.argmax(logits)
        return logits.argmax(-1)

    # The tanh GELUs and T5's RMSNorm in one pass, in fp32, where torch's seven or eight ops each read and write the
    # activation (the GELUs: a third of a batch-16 fp32 prefill); 16-bit values are rounded as MATMUL.md says.
    # Not in a compiled step: inductor fuses the reference's ops into its own loop there, as before the kernels.
    def _elementwise_kernel(self, x) -> bool:
        return self.device.type == "cpu" and x.dtype in self.mm._FLOATS and not torch.compiler.is_compiling()

    def rms_norm(self, x, weight, eps):
        # T5's norm in one pass per row: 25 in an mt0-small decode step, eight torch ops each.
        return self.mm.rms_norm(x, weight, eps) if self._elementwise_kernel(x) else ops.rms_norm(x, weight, eps)

    def bloom_gelu(self, x):
        return self.mm.tanh_gelu(x, ops.BLOOM_GELU_C) if self._elementwise_kernel(x) else ops.bloom_gelu(x)

    def gated_gelu_new(self, x, gate):
        if self._elementwise_kernel(x) and gate.dtype == x.dtype:
            return self.mm.tanh_gelu(x, ops.GELU_NEW_C, gate)
        return ops.gelu_new(x) * gate

    def linear(self, x, layer):
        w = layer.weight
        if w.dtype == torch.int8:
            return self.linear_int8(x, layer)
        if self.device.type == "cpu" and w.dtype == torch.bfloat16:
            # ours for decode rows; from PREFILL_MIN_ROWS on, oneDNN where it is faster (kernels/MATMUL.md)
            return self.mm.linear_bf16(x, w, layer.bias)
        if self.device.type == "cpu" and w.dtype == torch.float16:
            return self.mm.linear_f16(x, w, layer.bias)  # torch's fp16 GEMM is slower at every size (MATMUL.md)
        if self.device.type == "cpu" and w.dtype == torch.float32:
            return self.mm.linear_f32(x, w, layer.bias)  # ours below 64 rows on AVX-512, else F.linear
        return F.linear(x, w, layer.bias)
