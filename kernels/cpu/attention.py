"""Fused CPU attention (C, AVX2/AVX-512, OpenMP): torch.ops.minibloom_attn.{decode, prefill}.

Semantics: kernels/attention_ref.py (attention_decode_ref, attention_prefill_ref). The extension is JIT-built
on first use (~6 s cold, cached afterwards); available() reports whether that worked and never raises.
MINIBLOOM_FORCE_SCALAR=1 (or set_force_scalar(True)) runs the scalar C code instead of the SIMD code.
"""
import os

import torch

from ._jit import load_extension

_NAME = "minibloom_attn"
_SOURCES = ["attention.cpp", "attention_op.cpp"]
_CFLAGS = ["-ffp-contract=fast"]  # the SIMD templates rely on a*b+c becoming one FMA
_SIMD_NAMES = {0: "scalar", 1: "avx2", 2: "avx512", 3: "avx2-w16", 4: "avx512+bf16"}

_state = {"fakes": False, "force_scalar": os.environ.get("MINIBLOOM_FORCE_SCALAR", "") not in ("", "0")}


def available() -> tuple[bool, str]:
    """(True, "") if the kernels are built and loaded, else (False, why). Builds once; never raises."""
    ok, reason = load_extension(_NAME, _SOURCES, _CFLAGS)
    if ok and not _state["fakes"]:
        _register_fakes()
        _state["fakes"] = True
        _apply_simd_cap()
    return ok, reason


def set_force_scalar(flag: bool) -> None:
    """Run the scalar C code (True) or the best SIMD code the CPU has (False)."""
    _state["force_scalar"] = bool(flag)
    if load_extension(_NAME, _SOURCES, _CFLAGS)[0]:
        _apply_simd_cap()


def simd_path() -> str:
    """'avx512+bf16', 'avx512', 'avx2', 'scalar', or 'unavailable: <reason>'."""
    ok, reason = available()
    if not ok:
        return f"unavailable: {reason}"
    return _SIMD_NAMES[torch.ops.minibloom_attn.simd_level(-1)]


def _set_simd_cap(level: int) -> str:
    """Testing hook: cap the SIMD level (0 scalar, 1 AVX2, 2 AVX-512, 4 AVX-512 with AVX512_BF16 dot products,
    3 the AVX-512 code built for AVX2); returns the path now in use."""
    _require()
    return _SIMD_NAMES[torch.ops.minibloom_attn.simd_level(level)]


def _apply_simd_cap():
    torch.ops.minibloom_attn.simd_level(0 if _state["force_scalar"] else 4)


def _require():
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"minibloom CPU attention kernels unavailable: {reason}")


def _register_fakes():
    # Shapes only, so torch.compile / FakeTensorMode can trace through the C++ ops.
    @torch.library.register_fake("minibloom_attn::decode")
    def _decode_fake(q, k, v, key_pos, scale, alibi_slopes, t5_table, t5_query_pos, t5_bidirectional,
                     t5_max_distance, bias):
        return q.new_empty(q.shape)

    @torch.library.register_fake("minibloom_attn::prefill")
    def _prefill_fake(q, k, v, key_pos, scale, causal, q_offset, alibi_slopes, t5_table, t5_bidirectional,
                      t5_max_distance):
        return q.new_empty(q.shape)


# ---- argument checks: one clear message per mistake a caller can make ----

def _check_qkv(q, k, v, qdim):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor; move it with .cpu() or use the GPU kernels")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q has dtype {q.dtype}; the CPU kernels take float32, bfloat16 or float16")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if q.dim() != qdim or k.dim() != 4 or v.dim() != 4:
        want = "(B, H, D)" if qdim == 3 else "(B, H, T, D)"
        raise ValueError(f"expected q {want} and k, v (B, H, S, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)} in B, H or D")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v have different lengths ({k.shape[2]} vs {v.shape[2]})")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim {D} is not supported (1..256)")
    # The kernels take any strides except along the head dim.
    return [t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)]


def _check_key_pos(key_pos, B, L_max, what):
    if not isinstance(key_pos, torch.Tensor) or key_pos.dim() != 2 or key_pos.shape[0] != B:
        raise ValueError(f"key_pos must be a (B={B}, L) integer tensor ({what})")
    if key_pos.dtype not in (torch.int32, torch.int64) or key_pos.device.type != "cpu":
        raise ValueError(f"key_pos must be an int32 CPU tensor, got {key_pos.dtype} on {key_pos.device}")
    if key_pos.shape[1] > L_max:
        raise ValueError(f"key_pos covers {key_pos.shape[1]} keys but the cache holds only {L_max}")
    return key_pos.to(torch.int32).contiguous()


def _check_vec(t, name, shape):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {getattr(t, 'shape', type(t))}")
    return t.to(device="cpu", dtype=torch.int32 if name == "t5_query_pos" else torch.float32).contiguous()


def _check_bias_choice(alibi_slopes, t5_table, bias=None):
    if sum(x is not None for x in (alibi_slopes, t5_table, bias)) > 1:
        raise ValueError("pass at most one of alibi_slopes, t5_table, bias")
    if t5_table is not None and (t5_table.dim() != 2 or t5_table.shape[0] < 2):
        raise ValueError(f"t5_table must be (num_buckets >= 2, H), got {tuple(t5_table.shape)}")


def attention_decode(q, k, v, key_pos, *, scale, alibi_slopes=None, t5_table=None, t5_query_pos=None,
                     t5_bidirectional=False, t5_max_distance=128, bias=None):
    """One query per row vs the KV cache. q (B, H, D); k, v (B, H, S_max, D); key_pos (B, L) int32, -1 = masked.
    Returns (B, H, D) in q's dtype. See attention_decode_ref for the exact math."""
    # A model calls this once per layer per token: the op is tried as it is (its C++ checks guard every pointer it
    # reads, in nanoseconds); if they refuse the arguments, the checks below name the mistake or convert them.
    if available()[0]:
        try:
            return torch.ops.minibloom_attn.decode(q, k, v, key_pos, float(scale), alibi_slopes, t5_table,
                                                   t5_query_pos if t5_table is not None else None,
                                                   bool(t5_bidirectional), int(t5_max_distance), bias)
        except (RuntimeError, TypeError):
            pass
    q, k, v = _check_qkv(q, k, v, 3)
    B, H, _ = q.shape
    key_pos = _check_key_pos(key_pos, B, k.shape[2], "one position per cached key")
    L = key_pos.shape[1]
    _check_bias_choice(alibi_slopes, t5_table, bias)
    if t5_table is not None and t5_query_pos is None:
        raise ValueError("t5_table needs t5_query_pos (B,): the position of each row's query")
    alibi_slopes = _check_vec(alibi_slopes, "alibi_slopes", (H,))
    t5_table = _check_vec(t5_table, "t5_table", (t5_table.shape[0], H) if t5_table is not None else None)
    t5_query_pos = _check_vec(t5_query_pos, "t5_query_pos", (B,)) if t5_table is not None else None
    bias = _check_vec(bias, "bias", (H, L))
    _require()
    return torch.ops.minibloom_attn.decode(q, k, v, key_pos, float(scale), alibi_slopes, t5_table, t5_query_pos,
                                           bool(t5_bidirectional), int(t5_max_distance), bias)


def attention_prefill(q, k, v, key_pos, *, scale, causal, q_offset=0, alibi_slopes=None, t5_table=None,
                      t5_bidirectional=False, t5_max_distance=128):
    """Flash-style attention of T queries over S keys. q (B, H, T, D); k, v (B, H, S, D); key_pos (B, S) int32,
    -1 = masked; causal: query t sees key j <= t + q_offset. Returns (B, H, T, D) in q's dtype.
    See attention_prefill_ref for the exact math."""
    q, k, v = _check_qkv(q, k, v, 4)
    B, H = q.shape[:2]
    key_pos = _check_key_pos(key_pos, B, k.shape[2], "one position per key")
    if key_pos.shape[1] != k.shape[2]:
        raise ValueError(f"key_pos has {key_pos.shape[1]} keys per row, k has {k.shape[2]}")
    _check_bias_choice(alibi_slopes, t5_table)
    if q_offset < 0:
        raise ValueError(f"q_offset must be >= 0, got {q_offset}")
    alibi_slopes = _check_vec(alibi_slopes, "alibi_slopes", (H,))
    t5_table = _check_vec(t5_table, "t5_table", (t5_table.shape[0], H) if t5_table is not None else None)
    _require()
    return torch.ops.minibloom_attn.prefill(q, k, v, key_pos, float(scale), bool(causal), int(q_offset),
                                            alibi_slopes, t5_table, bool(t5_bidirectional), int(t5_max_distance))
