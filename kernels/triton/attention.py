"""Fused attention for BLOOM (ALiBi) and mT5 (relative position buckets) in Triton.

Implements the contract of kernels/attention_ref.py (attention_prefill_ref, attention_decode_ref):
  prefill: flash-style online softmax over key blocks, causal block skipping, q_offset for chunked prefill.
  decode:  one query per row over a KV cache; split-K over long caches (partial softmax per split, then a
           combine kernel), so a batch of a few heads still fills the GPU.
Bias is computed in-kernel in fp32, never materialised as (B, H, T, S):
  ALiBi:   score += slope[h] * key_pos[b, j]
  T5:      score += table[bucket(key - query), h], bucket computed per score from the table's bucket count
  padding: key_pos = -1 drops a key; a query row with no visible key returns zeros.
Float math is fp32 (scores, softmax, accumulators); q/k/v may be fp32, fp16 or bf16 and the output has q's dtype.
fp32 inputs use IEEE dots (not TF32), so fp32 results match the reference to ~1e-6.

Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (tests; slow: tiny shapes only). The interpreter gets
bf16 tl.dot wrong (triton-lang/triton#11584), so there bf16 operands are upcast to fp32 before each dot.
"""
import functools
import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"    # read once, as @triton.jit does when this module loads
LOG2E = 1.4426950408889634
NO_BIAS, ALIBI, T5, DENSE = 0, 1, 2, 3
SPLIT_MIN_KEYS = 256     # decode: fewer keys per split and the combine pass costs more than the split saves


def available() -> tuple[bool, str]:
    """(True, "") when these kernels can run: a CUDA device, or built for the interpreter (CPU tensors, slow)."""
    if INTERPRET:   # how this module's kernels were built, whatever the environment says now
        return True, ""
    if not torch.cuda.is_available():
        return False, ("no CUDA device for the Triton kernels (TRITON_INTERPRET=1 before importing them runs "
                       "them on CPU tensors, slowly)")
    return True, ""


# --- T5 relative position buckets ---------------------------------------------------------------------------------

def t5_log_thresholds(num_buckets: int, bidirectional: bool, max_distance: int, device) -> torch.Tensor:
    """Smallest |rel| of each logarithmic bucket past the first, (nb - nb//2 - 1,) int32, nb = buckets per direction.

    transformers computes max_exact + int(log(rel / max_exact) / log(max_distance / max_exact) * (nb - max_exact))
    in fp32, which lands exactly on integers (rel = 2 * max_exact gives 2.0): an approximate GPU log could round
    below and pick the previous bucket. The kernel compares |rel| against these boundaries instead, evaluated
    once here with the very same fp32 torch formula, so every bucket matches transformers exactly.
    """
    return _t5_log_thresholds(num_buckets, bidirectional, max_distance).to(device)


@functools.lru_cache(maxsize=None)
def _t5_log_thresholds(num_buckets: int, bidirectional: bool, max_distance: int) -> torch.Tensor:
    nb = num_buckets // 2 if bidirectional else num_buckets
    max_exact = nb // 2
    rel = torch.arange(max_exact, max_distance + 1)
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (nb - max_exact)).long()
    large = torch.clamp(large, max=nb - 1)
    # bucket max_exact + 1 + i starts at the first rel whose bucket reaches it (never reached -> int32 max)
    first = [rel[large >= b][:1] for b in range(max_exact + 1, nb)]
    return torch.tensor([int(f) if len(f) else 2**31 - 1 for f in first], dtype=torch.int32)


@triton.jit
def _t5_bias(rel, TAB, THR, h, stride_tb, stride_th,
             BIDIR: tl.constexpr, NB_DIR: tl.constexpr, NLOG: tl.constexpr):
    """table[bucket(rel), h] for an int32 block of relative positions (key - query)."""
    EXACT: tl.constexpr = NB_DIR // 2
    if BIDIR:
        bucket = tl.where(rel > 0, NB_DIR, 0)            # keys after the query use the upper half of the table
        r = tl.abs(rel)
    else:
        bucket = tl.zeros_like(rel)
        r = tl.maximum(-rel, 0)                          # future keys share bucket 0 (they are masked anyway)
    large = tl.zeros_like(r) + EXACT
    for i in tl.static_range(NLOG):
        large += (r >= tl.load(THR + i)).to(tl.int32)
    bucket += tl.where(r < EXACT, r, large)
    return tl.load(TAB + bucket * stride_tb + h * stride_th)


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")   # no TF32 for fp32 inputs
    return tl.dot(a, b)


# --- prefill ------------------------------------------------------------------------------------------------------

def _prefill_configs():
    if INTERPRET:   # one small config: exercises several blocks at tiny shapes, no benchmarking
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3),
                                 (64, 32, 4, 2), (128, 128, 8, 2)]]


@triton.autotune(configs=_prefill_configs(), key=["T_KEY", "S_KEY", "BLOCK_D", "BIAS", "CAUSAL", "DOT_F32"])
@triton.jit
def _prefill_kernel(Q, K, V, Out, KPOS, SLOPES, TAB, THR,
                    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
                    spb, sps, stb, sth,
                    H, T, S, q_offset, qk_scale, T_KEY, S_KEY,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BIAS: tl.constexpr,
                    T5_BIDIR: tl.constexpr, T5_NB_DIR: tl.constexpr, T5_NLOG: tl.constexpr,
                    DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)      # query index t
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=(offs_m < T)[:, None] & mask_d[None, :], other=0.0)          # (BLOCK_M, BLOCK_D)

    # online softmax state in the log2 domain (exp2 is the fast path): running max, sum, weighted values
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if BIAS == 1:
        slope = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
    hi = S
    if CAUSAL:   # blocks entirely right of the diagonal are never visited
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + q_offset)
    for start_n in range(0, hi, BLOCK_N):
        offs_j = start_n + offs_n                                                 # key index j
        in_s = offs_j < S
        kpos = tl.load(KPOS + b * spb + offs_j * sps, mask=in_s, other=-1)        # (BLOCK_N,)
        k = tl.load(K + b * skb + h * skh + offs_j[:, None] * skt + offs_d[None, :] * skd,
                    mask=in_s[:, None] & mask_d[None, :], other=0.0)             # (BLOCK_N, BLOCK_D)
        s = _dot(q, tl.trans(k), DOT_F32) * qk_scale                              # (BLOCK_M, BLOCK_N)
        if BIAS == 1:
            s += slope * kpos.to(tl.float32)[None, :]
        if BIAS == 2:
            rel = offs_j[None, :] - (offs_m[:, None] + q_offset)
            s += _t5_bias(rel, TAB, THR, h, stb, sth, T5_BIDIR, T5_NB_DIR, T5_NLOG) * 1.4426950408889634
        visible = (kpos >= 0)[None, :]
        if CAUSAL:
            visible = visible & (offs_j[None, :] <= offs_m[:, None] + q_offset)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # nothing visible yet: keep p = alpha = 0
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + h * svh + offs_j[:, None] * svt + offs_d[None, :] * svd,
                    mask=in_s[:, None] & mask_d[None, :], other=0.0)             # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]                             # fully masked row: acc = 0
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=(offs_m < T)[:, None] & mask_d[None, :])


# --- decode -------------------------------------------------------------------------------------------------------

def _decode_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in [(64, 4, 2), (128, 4, 2), (64, 2, 3), (32, 2, 3), (128, 8, 2)]]


@triton.autotune(configs=_decode_configs(), key=["L_KEY", "BLOCK_D", "BIAS", "ONE_SPLIT"])
@triton.jit
def _decode_kernel(Q, K, V, Out, M_part, L_part, Acc_part, KPOS, SLOPES, TAB, THR, QPOS, BIAS_T,
                   sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sod,
                   spb, sps, stb, sth, sbh, sbj,
                   H, L, chunk, num_splits, qk_scale, L_KEY,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BIAS: tl.constexpr,
                   T5_BIDIR: tl.constexpr, T5_NB_DIR: tl.constexpr, T5_NLOG: tl.constexpr,
                   ONE_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_d * sqd, mask=mask_d, other=0.0).to(tl.float32)   # (BLOCK_D,)
    if BIAS == 1:
        slope = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
    if BIAS == 2:
        qpos = tl.load(QPOS + b)

    # one query: a dot is too small for tensor cores, so scores are a broadcast multiply + row sum
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    start = pid_s * chunk
    end = tl.minimum(start + chunk, L)
    for start_n in range(start, end, BLOCK_N):
        offs_j = start_n + offs_n
        in_l = offs_j < end
        kpos = tl.load(KPOS + b * spb + offs_j * sps, mask=in_l, other=-1)                    # (BLOCK_N,)
        k = tl.load(K + b * skb + h * skh + offs_j[:, None] * skt + offs_d[None, :] * skd,
                    mask=in_l[:, None] & mask_d[None, :], other=0.0).to(tl.float32)         # (BLOCK_N, BLOCK_D)
        s = tl.sum(q[None, :] * k, 1) * qk_scale                                           # (BLOCK_N,)
        if BIAS == 1:
            s += slope * kpos.to(tl.float32)
        if BIAS == 2:
            s += _t5_bias(kpos - qpos, TAB, THR, h, stb, sth, T5_BIDIR, T5_NB_DIR, T5_NLOG) * 1.4426950408889634
        if BIAS == 3:
            s += tl.load(BIAS_T + h * sbh + offs_j * sbj, mask=in_l, other=0.0) * 1.4426950408889634
        s = tl.where(kpos >= 0, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe)
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 0)
        v = tl.load(V + b * svb + h * svh + offs_j[:, None] * svt + offs_d[None, :] * svd,
                    mask=in_l[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new

    if ONE_SPLIT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)
        tl.store(Out + b * sob + h * soh + offs_d * sod, out.to(Out.dtype.element_ty), mask=mask_d)
    else:   # partial softmax of this split: (max, sum, unnormalised values), merged by _combine_kernel
        part = pid_bh * num_splits + pid_s
        tl.store(M_part + part, m_i)
        tl.store(L_part + part, l_i)
        tl.store(Acc_part + part * BLOCK_D + offs_d, acc)


@triton.jit
def _combine_kernel(Out, M_part, L_part, Acc_part, sob, soh, sod, H, num_splits,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    pid_bh = tl.program_id(0)
    b, h = pid_bh // H, pid_bh % H
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    part = pid_bh * num_splits + offs_s
    m = tl.load(M_part + part, mask=mask_s, other=float("-inf"))                   # (BLOCK_SPLITS,)
    l = tl.load(L_part + part, mask=mask_s, other=0.0)
    acc = tl.load(Acc_part + part[:, None] * BLOCK_D + offs_d[None, :], mask=mask_s[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))           # rescale splits to one max
    l_tot = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0)                                               # (BLOCK_D,)
    out = out / tl.where(l_tot > 0, l_tot, 1.0)
    tl.store(Out + b * sob + h * soh + offs_d * sod, out.to(Out.dtype.element_ty), mask=offs_d < D)


# --- Python wrappers ----------------------------------------------------------------------------------------------

def _check(cond: bool, message: str):
    if not cond:
        raise ValueError(message)


def _check_inputs(q, k, v, key_pos, n_keys: int):
    dev = q.device
    ok, reason = available()
    _check(ok, reason)
    _check(INTERPRET or dev.type == "cuda", f"the Triton attention kernels take CUDA tensors, got {dev}")
    _check(all(t.device == dev for t in (k, v, key_pos)), "q, k, v and key_pos must be on the same device")
    _check(q.dtype in (torch.float32, torch.float16, torch.bfloat16),
           f"q must be float32, float16 or bfloat16, got {q.dtype}")
    _check(k.dtype == q.dtype and v.dtype == q.dtype, f"k and v must have q's dtype {q.dtype}")
    _check(key_pos.dtype == torch.int32, f"key_pos must be int32 (-1 = masked key), got {key_pos.dtype}")
    _check(q.shape[-1] <= 256, f"head dim {q.shape[-1]} > 256 is not supported by these kernels")
    _check(k.shape[2] >= n_keys and v.shape[:3] == k.shape[:3],
           f"k, v {tuple(k.shape)}, {tuple(v.shape)} must hold at least the {n_keys} keys of key_pos")


def _bias_args(q, alibi_slopes, t5_table, t5_bidirectional, t5_max_distance):
    """(mode, slopes, table, thresholds, nb_dir, nlog) for the kernels; unused pointers get a dummy tensor."""
    dummy = q.new_zeros((1, 1), dtype=torch.float32)
    _check(alibi_slopes is None or t5_table is None, "pass alibi_slopes (BLOOM) or t5_table (T5), not both")
    if alibi_slopes is not None:
        _check(alibi_slopes.shape == (q.shape[1],), f"alibi_slopes must be (H,) = ({q.shape[1]},)")
        return ALIBI, alibi_slopes.float().contiguous(), dummy, dummy, 0, 0
    if t5_table is not None:
        _check(t5_table.dim() == 2 and t5_table.shape[1] == q.shape[1],
               f"t5_table must be (num_buckets, H={q.shape[1]}), got {tuple(t5_table.shape)}")
        nb = t5_table.shape[0]
        nb_dir = nb // 2 if t5_bidirectional else nb
        _check(t5_max_distance > nb_dir // 2 >= 1,
               f"t5_max_distance={t5_max_distance} must exceed the exact buckets ({nb_dir // 2})")
        thr = t5_log_thresholds(nb, t5_bidirectional, t5_max_distance, q.device)
        return T5, dummy, t5_table.float(), thr, nb_dir, thr.numel()
    return NO_BIAS, dummy, dummy, dummy, 0, 0


def _bucket(n: int) -> int:
    """Autotuning key: re-tune per power of two of a length, not per length."""
    return triton.next_power_of_2(max(n, 16))


def attention_prefill(q, k, v, key_pos, *, scale, causal, q_offset=0, alibi_slopes=None, t5_table=None,
                      t5_bidirectional=False, t5_max_distance=128):
    """Attention of T queries over S keys per (batch, head); bias, causality and padding in-kernel."""
    _check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "q, k, v must be (B, H, T, D), (B, H, S, D)")
    B, H, T, D = q.shape
    S = key_pos.shape[1]
    _check_inputs(q, k, v, key_pos, S)
    _check(key_pos.shape[0] == B and k.shape[:2] == (B, H) and k.shape[3] == D and v.shape[3] == D,
           f"shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
           f"key_pos {tuple(key_pos.shape)}")
    mode, slopes, table, thr, nb_dir, nlog = _bias_args(q, alibi_slopes, t5_table, t5_bidirectional,
                                                        t5_max_distance)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)             # (B, H, T, D)
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(D))
    dot_f32 = q.dtype == torch.float32 or (INTERPRET and q.dtype == torch.bfloat16)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    _prefill_kernel[grid](
        q, k, v, out, key_pos, slopes, table, thr,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *key_pos.stride(), *table.stride()[:2],
        H, T, S, int(q_offset), float(scale) * LOG2E, _bucket(T), _bucket(S),
        D=D, BLOCK_D=block_d, CAUSAL=bool(causal), BIAS=mode,
        T5_BIDIR=bool(t5_bidirectional), T5_NB_DIR=nb_dir, T5_NLOG=nlog, DOT_F32=dot_f32)
    return out


def _num_splits(BH: int, L: int, device) -> int:
    """Enough (batch, head, split) programs for ~2 waves over the SMs, each split >= SPLIT_MIN_KEYS keys."""
    sms = 4 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(L, SPLIT_MIN_KEYS), triton.cdiv(2 * sms, BH), 64))


def attention_decode(q, k, v, key_pos, *, scale, alibi_slopes=None, t5_table=None, t5_query_pos=None,
                     t5_bidirectional=False, t5_max_distance=128, bias=None):
    """One query per (batch, head) over the first L = key_pos.shape[1] keys of a KV cache; split-K for long L."""
    _check(q.dim() == 3 and k.dim() == 4 and v.dim() == 4, "q must be (B, H, D) and k, v (B, H, S_max, D)")
    B, H, D = q.shape
    L = key_pos.shape[1]
    _check_inputs(q, k, v, key_pos, L)
    _check(key_pos.shape[0] == B and k.shape[:2] == (B, H) and k.shape[3] == D and v.shape[3] == D,
           f"shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
           f"key_pos {tuple(key_pos.shape)}")
    _check(bias is None or (alibi_slopes is None and t5_table is None),
           "pass one of alibi_slopes, t5_table or bias")
    mode, slopes, table, thr, nb_dir, nlog = _bias_args(q, alibi_slopes, t5_table, t5_bidirectional,
                                                        t5_max_distance)
    qpos, dense = key_pos, slopes                                                  # dummies unless used
    if mode == T5:
        _check(t5_query_pos is not None and t5_query_pos.shape == (B,) and t5_query_pos.dtype == torch.int32,
               "t5_table needs t5_query_pos: (B,) int32, the position of each row's query")
        qpos = t5_query_pos
    if bias is not None:
        _check(bias.shape == (H, L), f"bias must be (H, L) = ({H}, {L}), got {tuple(bias.shape)}")
        mode, dense = DENSE, bias.float()

    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(D))
    splits = _num_splits(B * H, L, q.device)
    chunk = triton.cdiv(L, splits)
    splits = triton.cdiv(L, chunk) if L > 0 else 1
    m_part = torch.empty((B * H, splits), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty((B * H, splits, block_d), dtype=torch.float32, device=q.device)
    _decode_kernel[(B * H, splits)](
        q, k, v, out, m_part, l_part, acc_part, key_pos, slopes, table, thr, qpos, dense,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *key_pos.stride(), *table.stride()[:2],
        *dense.stride()[-2:] if mode == DENSE else (0, 0),
        H, L, chunk, splits, float(scale) * LOG2E, _bucket(L),
        D=D, BLOCK_D=block_d, BIAS=mode,
        T5_BIDIR=bool(t5_bidirectional), T5_NB_DIR=nb_dir, T5_NLOG=nlog, ONE_SPLIT=splits == 1)
    if splits > 1:
        _combine_kernel[(B * H,)](out, m_part, l_part, acc_part, *out.stride(), H, splits,
                                  D=D, BLOCK_D=block_d, BLOCK_SPLITS=triton.next_power_of_2(splits))
    return out
