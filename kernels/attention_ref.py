"""Plain-PyTorch attention references: the executable spec of the fused attention kernels.

Textbook attention with every bias and mask written out as a dense tensor (these functions DO materialise
(B, H, T, S) scores; the kernels must not). Math is fp32 unless upcast=False, which runs the same ops in the
input dtype (softmax still in fp32, as transformers does): "PyTorch's own low-precision path", the yardstick
for the kernels' bf16 error.
"""
import math

import torch


def t5_bucket_ref(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5 relative-position bucket of rel = key - query, exactly as transformers' _relative_position_bucket."""
    rel = rel.long()
    if bidirectional:
        num_buckets //= 2
        bucket = (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        bucket = torch.zeros_like(rel)
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()  # fp32 log, truncation toward 0
    large = torch.clamp(large, max=num_buckets - 1)
    return bucket + torch.where(rel < max_exact, rel, large)


def _attend(q, k, v, bias, visible, scale, upcast):
    # q (B, H, T, D), k/v (B, H, S, D), bias (B|1, H, T|1, S) fp32 or None, visible (B, 1|H, T|1, S) bool
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, S)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    scores = scores.masked_fill(~visible, float("-inf"))
    p = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0)  # a row with no visible key -> all zeros
    out = p.to(v.dtype) @ v
    return out.to(dtype)


def attention_decode_ref(q, k, v, key_pos, *, scale, alibi_slopes=None, t5_table=None, t5_query_pos=None,
                         t5_bidirectional=False, t5_max_distance=128, bias=None, upcast=True):
    """One query per row vs a KV cache. q (B, H, D); k, v (B, H, S_max, D), only the first L = key_pos.shape[1]
    keys are used; key_pos (B, L), -1 = masked. Returns (B, H, D) in q's dtype."""
    L = key_pos.shape[1]
    k, v = k[:, :, :L], v[:, :, :L]
    pos = key_pos.long()  # (B, L)
    H = q.shape[1]
    att_bias = None
    if alibi_slopes is not None:  # BLOOM: slope[h] * key position
        att_bias = alibi_slopes.float()[None, :, None, None] * pos[:, None, None, :].float()  # (B, H, 1, L)
    elif t5_table is not None:  # T5: bucket of key - query
        rel = pos - t5_query_pos.long()[:, None]  # (B, L)
        buckets = t5_bucket_ref(rel, t5_bidirectional, t5_table.shape[0], t5_max_distance)
        att_bias = t5_table.float()[buckets].permute(0, 2, 1)[:, :, None, :]  # (B, H, 1, L)
    elif bias is not None:
        att_bias = bias.float().reshape(1, H, 1, L)
    visible = (pos >= 0)[:, None, None, :]  # (B, 1, 1, L)
    return _attend(q[:, :, None], k, v, att_bias, visible, scale, upcast)[:, :, 0]


def attention_prefill_ref(q, k, v, key_pos, *, scale, causal, q_offset=0, alibi_slopes=None, t5_table=None,
                          t5_bidirectional=False, t5_max_distance=128, upcast=True):
    """q (B, H, T, D), k, v (B, H, S, D), key_pos (B, S) with -1 = masked key.
    causal: query t sees key j only if j <= t + q_offset. Returns (B, H, T, D) in q's dtype."""
    T, S = q.shape[2], k.shape[2]
    pos = key_pos.long()
    t = torch.arange(T)[:, None] + q_offset  # (T, 1) absolute query positions
    j = torch.arange(S)[None, :]  # (1, S)
    att_bias = None
    if alibi_slopes is not None:
        att_bias = alibi_slopes.float()[None, :, None, None] * pos[:, None, None, :].float()  # (B, H, 1, S)
    elif t5_table is not None:
        buckets = t5_bucket_ref(j - t, t5_bidirectional, t5_table.shape[0], t5_max_distance)  # (T, S)
        att_bias = t5_table.float()[buckets].permute(2, 0, 1)[None]  # (1, H, T, S)
    visible = (pos >= 0)[:, None, None, :]  # (B, 1, 1, S)
    if causal:
        visible = visible & (j <= t)[None, None]  # (B, 1, T, S)
    return _attend(q, k, v, att_bias, visible, scale, upcast)
