"""CPU fused attention kernels vs their plain-PyTorch references (kernels/attention_ref.py).

Every kernel case runs on each code path this CPU can run: the scalar C code, the SIMD build for the CPU (AVX2 or
AVX-512, with or without the AVX512_BF16 dot products) and every lower one: the AVX-512 code without AVX512_BF16,
the AVX2 code and the AVX-512 template logic compiled for AVX2 ("avx2-w16").
fp32: within 1e-5 of the fp32 reference. bf16 and fp16: error vs the fp32 reference at most 2x the error of
PyTorch's own path in that dtype (the reference run on those tensors with upcast=False) vs the same fp32 reference.
"""
import subprocess
import sys

import pytest
import torch

from minibloom.kernels import attention_ref as R
from minibloom.kernels.cpu import _jit
from minibloom.kernels.cpu import attention as A
from minibloom.ops import positions_from_mask  # BLOOM key positions: (cumsum - 1), -1 on padding

OK, WHY = A.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"CPU attention extension not built: {WHY}")

LEVELS = {"scalar": 0, "avx2": 1, "avx512": 2, "avx2-w16": 3, "avx512+bf16": 4}


def _cpu_paths():
    if not OK:
        return ["scalar"]
    best = A._set_simd_cap(4)
    A._apply_simd_cap()
    lower = {"avx512+bf16": ["avx512", "avx2", "avx2-w16"], "avx512": ["avx2", "avx2-w16"],
             "avx2": ["avx2-w16"]}.get(best, [])  # every path this CPU can run
    return ["scalar"] + ([best] if best != "scalar" else []) + lower


PATHS = _cpu_paths()


@pytest.fixture(params=PATHS)
def path(request):
    assert A._set_simd_cap(LEVELS[request.param]) == request.param
    yield request.param
    A._apply_simd_cap()


def alibi_slopes(n_head):
    """BLOOM slopes taken from transformers itself: build_alibi_tensor at key position 1 is slope[h]."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    return build_alibi_tensor(torch.ones(1, 2), n_head, torch.float32)[:, 0, 1].contiguous()


def ragged_mask(B, L, g):
    """Row 0 full, row 1 left-padded, row 2 shorter with holes, more rows random."""
    mask = torch.ones(B, L, dtype=torch.int64)
    if B > 1:
        mask[1, : L // 3] = 0
    if B > 2:
        mask[2, L // 2 :] = 0
        mask[2, 1 : L // 2 : 3] = 0
    for b in range(3, B):
        mask[b] = (torch.rand(L, generator=g) > 0.3).long()
    return mask


def bias_kwargs(kind, H, B, L, g):
    if kind == "alibi":
        return dict(alibi_slopes=alibi_slopes(H))
    if kind.startswith("t5"):
        kw = dict(t5_table=torch.randn(32, H, generator=g), t5_bidirectional=kind == "t5_bi")
        return kw
    if kind == "bias":
        return dict(bias=torch.randn(H, L, generator=g))
    return {}


def assert_close_fp32(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out - ref).abs().max().item()
    assert err <= 1e-5, f"max abs error {err:.3g} > 1e-5"


def assert_half_within_2x(out, ref_fp32, ref_pt, dtype):
    """A bf16 or fp16 result: its error against fp32 math is at most 2x that of PyTorch in the same dtype."""
    assert out.dtype == dtype
    err = (out.float() - ref_fp32).abs().max().item()
    err_pt = (ref_pt.float() - ref_fp32).abs().max().item()
    assert err <= 2 * err_pt + 1e-6, f"kernel {dtype} error {err:.3g} > 2 x PyTorch's {err_pt:.3g}"


# ---------------------------------------------------------------------------------------------------------
# Decode


DECODE_CASES = [  # (B, H, L, D, bias kind)
    (3, 12, 1, 64, "alibi"),
    (3, 12, 7, 80, "alibi"),
    (4, 12, 33, 96, "t5_bi"),
    (3, 4, 129, 128, "t5_causal"),
    (2, 112, 65, 64, "alibi"),
    (3, 5, 300, 64, "bias"),
    (1, 2, 1030, 80, "alibi"),  # B*H small, S large: split-K over key chunks
    (3, 3, 200, 72, "none"),  # head dim not a multiple of the vector width
]


@pytest.mark.parametrize("B,H,L,D,kind", DECODE_CASES)
def test_decode_fp32(path, B, H, L, D, kind):
    g = torch.Generator().manual_seed(L * 7 + D)
    S_max = L + 5  # a preallocated cache longer than the filled part
    q = torch.randn(B, H, D, generator=g)
    # cache stored (B, S, H, D) and viewed as (B, H, S, D): strided, last dim contiguous
    k = torch.randn(B, S_max, H, D, generator=g).transpose(1, 2)
    v = torch.randn(B, S_max, H, D, generator=g).transpose(1, 2)
    key_pos = positions_from_mask(ragged_mask(B, L, g))
    kw = bias_kwargs(kind, H, B, L, g)
    if "t5_table" in kw:  # queries far from the keys: far buckets (|rel| > 128) are used
        kw["t5_query_pos"] = torch.tensor([L, L + 300, 2][:B] + [L] * max(0, B - 3), dtype=torch.int32)
    out = A.attention_decode(q, k, v, key_pos, scale=D**-0.5, **kw)
    ref = R.attention_decode_ref(q, k, v, key_pos, scale=D**-0.5, **kw)
    assert_close_fp32(out, ref)


def test_decode_fully_masked_row_is_zero(path):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 3, 64, generator=g), torch.randn(2, 3, 40, 64, generator=g), torch.randn(2, 3, 40, 64)
    key_pos = torch.arange(40, dtype=torch.int32).repeat(2, 1)
    key_pos[1] = -1
    out = A.attention_decode(q, k, v, key_pos, scale=0.125, alibi_slopes=alibi_slopes(3))
    assert torch.equal(out[1], torch.zeros(3, 64))
    assert_close_fp32(out, R.attention_decode_ref(q, k, v, key_pos, scale=0.125, alibi_slopes=alibi_slopes(3)))


@pytest.mark.parametrize("B,L", [(2, 0), (0, 5)])
def test_decode_empty_batch_or_cache(path, B, L):
    # An empty cache (no visible key) gives zeros, an empty batch an empty result: no crash (these once divided by 0).
    q, k, v = torch.randn(B, 3, 64), torch.randn(B, 3, 8, 64), torch.randn(B, 3, 8, 64)
    key_pos = torch.zeros(B, L, dtype=torch.int32)
    out = A.attention_decode(q, k, v, key_pos, scale=0.125, alibi_slopes=alibi_slopes(3))
    assert torch.equal(out, R.attention_decode_ref(q, k, v, key_pos, scale=0.125, alibi_slopes=alibi_slopes(3)))
    assert out.shape == (B, 3, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["alibi", "t5_causal"])
@pytest.mark.parametrize("D", [64, 80, 96, 128])  # the bf16 layouts and vdpbf16ps need whole blocks of 16 / 32
def test_decode_half_within_2x_of_torch(path, kind, D, dtype):
    g = torch.Generator().manual_seed(D)
    B, H, L = 3, 12, 257
    q = torch.randn(B, H, D, generator=g)
    # a preallocated cache (B, S_max, H, D) viewed as (B, H, S_max, D), longer than the filled part
    k, v = (torch.randn(B, L + 3, H, D, generator=g).transpose(1, 2) for _ in range(2))
    key_pos = positions_from_mask(ragged_mask(B, L, g))
    kw = bias_kwargs(kind, H, B, L, g)
    if "t5_table" in kw:
        kw["t5_query_pos"] = torch.full((B,), L, dtype=torch.int32)
    qb, kb, vb = q.to(dtype), k.to(dtype), v.to(dtype)
    out = A.attention_decode(qb, kb, vb, key_pos, scale=D**-0.5, **kw)
    ref = R.attention_decode_ref(qb, kb, vb, key_pos, scale=D**-0.5, **kw)  # fp32 math on the rounded inputs
    ref_pt = R.attention_decode_ref(qb, kb, vb, key_pos, scale=D**-0.5, upcast=False, **kw)
    assert_half_within_2x(out, ref, ref_pt, dtype)


# ---------------------------------------------------------------------------------------------------------
# Prefill


PREFILL_CASES = [  # (B, H, T, S, D, causal, q_offset, bias kind)
    (3, 12, 1, 1, 64, True, 0, "alibi"),
    (3, 12, 33, 33, 80, True, 0, "alibi"),  # BLOOM prompt with left padding / holes
    (2, 4, 7, 136, 96, True, 129, "alibi"),  # chunked prefill: queries after a cached prefix
    (1, 112, 9, 9, 128, True, 0, "alibi"),
    (3, 4, 150, 150, 64, False, 0, "t5_bi"),  # T5 encoder, far buckets
    (2, 4, 140, 140, 64, True, 0, "t5_causal"),  # T5 decoder self-attention
    (2, 3, 5, 70, 64, False, 0, "none"),  # cross-attention shape: few queries, all keys
    (2, 3, 40, 100, 72, True, 60, "none"),
]


@pytest.mark.parametrize("B,H,T,S,D,causal,q_offset,kind", PREFILL_CASES)
def test_prefill_fp32(path, B, H, T, S, D, causal, q_offset, kind):
    g = torch.Generator().manual_seed(T * 13 + S)
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)  # (B, H, T, D) view of (B, T, H, D)
    k = torch.randn(B, H, S, D, generator=g)
    v = torch.randn(B, S, H, D, generator=g).transpose(1, 2)
    key_pos = positions_from_mask(ragged_mask(B, S, g)) if kind != "t5_bi" else torch.arange(S).repeat(B, 1)
    kw = bias_kwargs(kind, H, B, S, g)
    out = A.attention_prefill(q, k, v, key_pos, scale=D**-0.5, causal=causal, q_offset=q_offset, **kw)
    ref = R.attention_prefill_ref(q, k, v, key_pos, scale=D**-0.5, causal=causal, q_offset=q_offset, **kw)
    assert_close_fp32(out, ref)


def test_prefill_fully_masked_rows_are_zero(path):
    # left padding + causal: the first queries of row 1 see only padding keys
    g = torch.Generator().manual_seed(2)
    B, H, T, D = 2, 3, 20, 64
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[1, :6] = 0
    key_pos = positions_from_mask(mask)
    out = A.attention_prefill(q, k, v, key_pos, scale=0.125, causal=True, alibi_slopes=alibi_slopes(H))
    assert torch.equal(out[1, :, :6], torch.zeros(H, 6, D))
    ref = R.attention_prefill_ref(q, k, v, key_pos, scale=0.125, causal=True, alibi_slopes=alibi_slopes(H))
    assert_close_fp32(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["alibi", "t5_bi"])
def test_prefill_half_within_2x_of_torch(path, kind, dtype):
    g = torch.Generator().manual_seed(3)
    B, H, T, D = 2, 4, 150, 64
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(3))
    key_pos = positions_from_mask(ragged_mask(B, T, g))
    kw = dict(bias_kwargs(kind, H, B, T, g), causal=kind == "alibi", scale=D**-0.5)
    out = A.attention_prefill(q, k, v, key_pos, **kw)
    ref = R.attention_prefill_ref(q, k, v, key_pos, **kw)
    ref_pt = R.attention_prefill_ref(q, k, v, key_pos, upcast=False, **kw)
    assert_half_within_2x(out, ref, ref_pt, dtype)


# ---------------------------------------------------------------------------------------------------------
# References, API, build fallback


def test_t5_bucket_ref_matches_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-3000, 3001)
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (64, 256)):
            want = T5Attention._relative_position_bucket(rel, bidirectional, nb, md)
            assert torch.equal(R.t5_bucket_ref(rel, bidirectional, nb, md), want)
    # spot values from parity.md §3.6: the last bucket starts at 91 (encoder) / -113 (decoder)
    b = R.t5_bucket_ref(torch.tensor([90, 91, -90, -91]), True, 32, 128)
    assert b.tolist() == [30, 31, 14, 15]
    assert R.t5_bucket_ref(torch.tensor([-112, -113, 5]), False, 32, 128).tolist() == [30, 31, 0]


def test_t5_kernel_buckets_match_for_far_positions(path):
    # keys every 7 positions over 0..3000 around one query: all 32 buckets of both kinds, each with its own
    # large random bias per head, so a bucket computed differently in C shows up as a large error
    H, D = 8, 16
    key_pos = torch.arange(0, 3000, 7, dtype=torch.int32)[None]
    L = key_pos.shape[1]
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.zeros(1, H, D), torch.zeros(1, H, L, D), torch.randn(1, H, L, D, generator=g)
    for bidirectional in (True, False):
        kw = dict(scale=1.0, t5_table=3 * torch.randn(32, H, generator=g), t5_bidirectional=bidirectional,
                  t5_query_pos=torch.tensor([1500], dtype=torch.int32))
        assert_close_fp32(A.attention_decode(q, k, v, key_pos, **kw), R.attention_decode_ref(q, k, v, key_pos, **kw))


def test_force_scalar_switch():
    A.set_force_scalar(True)
    try:
        assert A.simd_path() == "scalar"
    finally:
        A.set_force_scalar(False)
    assert A.simd_path() == PATHS[1] if len(PATHS) > 1 else A.simd_path() == "scalar"


def test_force_scalar_env_var():
    code = "from minibloom.kernels.cpu import attention as A; print(A.simd_path())"
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "MINIBLOOM_FORCE_SCALAR": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "scalar", out.stderr


def test_fake_impl_traces_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(2, 4, 64), torch.empty(2, 4, 100, 64), torch.empty(2, 4, 100, 64)
        key_pos = torch.zeros(2, 90, dtype=torch.int32)
        out = torch.ops.minibloom_attn.decode(q, k, v, key_pos, 0.125, None, None, None, False, 128, None)
        assert out.shape == (2, 4, 64) and out.dtype == torch.float32
        qp = torch.empty(2, 4, 10, 64, dtype=torch.bfloat16)
        kp = torch.empty(2, 4, 30, 64, dtype=torch.bfloat16)
        out = torch.ops.minibloom_attn.prefill(qp, kp, kp, torch.zeros(2, 30, dtype=torch.int32), 0.125, True, 20,
                                               None, None, False, 128)
        assert out.shape == (2, 4, 10, 64) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.randn(2, 3, 64, dtype=torch.float64)), "float32, bfloat16 or float16"),
    (dict(k=torch.randn(2, 3, 10, 64, dtype=torch.bfloat16)), "dtypes differ"),
    (dict(k=torch.randn(2, 4, 10, 64)), "do not match"),
    (dict(key_pos=torch.zeros(2, 11, dtype=torch.int32)), "cache holds only"),
    (dict(key_pos=torch.zeros(2, 5)), "int32"),
    (dict(alibi_slopes=torch.ones(3), t5_table=torch.ones(32, 3), t5_query_pos=torch.zeros(2)), "at most one"),
    (dict(t5_table=torch.ones(32, 3)), "t5_query_pos"),
    (dict(alibi_slopes=torch.ones(4)), "alibi_slopes must have shape"),
    (dict(q=torch.randn(2, 3, 300), k=torch.randn(2, 3, 10, 300), v=torch.randn(2, 3, 10, 300)), "head dim"),
    (dict(v=torch.randn(2, 3, 9, 64)), "different lengths"),
    (dict(t5_table=torch.ones(32, 4), t5_query_pos=torch.zeros(2, dtype=torch.int32)), "t5_table must have shape"),
    (dict(t5_table=torch.ones(32, 3), t5_query_pos=torch.zeros(3, dtype=torch.int32)), "t5_query_pos must have"),
])
def test_decode_validation(bad, match):
    """Each mistake ends in the Python checks' message (the op's C++ checks refuse it first)."""
    args = dict(q=torch.randn(2, 3, 64), k=torch.randn(2, 3, 10, 64), v=torch.randn(2, 3, 10, 64),
                key_pos=torch.zeros(2, 5, dtype=torch.int32))
    args.update(bad)
    q, k, v, key_pos = (args.pop(n) for n in ("q", "k", "v", "key_pos"))
    with pytest.raises(ValueError, match=match):
        A.attention_decode(q, k, v, key_pos, scale=0.125, **args)


@pytest.mark.parametrize("bad", [
    dict(alibi_slopes=torch.ones(2)), dict(alibi_slopes=torch.ones(3, dtype=torch.float64)),
    dict(bias=torch.ones(3, 4)), dict(t5_table=torch.ones(32, 3)),
    dict(t5_table=torch.ones(32, 3), t5_query_pos=torch.zeros(1, dtype=torch.int32)),
    dict(t5_table=torch.ones(32, 2), t5_query_pos=torch.zeros(2, dtype=torch.int32)),
    dict(k=torch.randn(1, 3, 10, 64)), dict(v=torch.randn(2, 3, 10, 32)), dict(v=torch.randn(2, 3, 11, 64)),
    dict(key_pos=torch.zeros(3, 5, dtype=torch.int32)), dict(key_pos=torch.zeros(2, 11, dtype=torch.int32)),
    dict(key_pos=torch.zeros(5, 2, dtype=torch.int32).t()),
])
def test_decode_op_refuses_what_it_cannot_read(bad):
    """The op is called without the Python checks: its own checks must refuse any argument it would read wrongly."""
    args = dict(q=torch.randn(2, 3, 64), k=torch.randn(2, 3, 10, 64), v=torch.randn(2, 3, 10, 64),
                key_pos=torch.zeros(2, 5, dtype=torch.int32), alibi_slopes=None, t5_table=None, t5_query_pos=None,
                bias=None)
    args.update(bad)
    with pytest.raises(RuntimeError):
        torch.ops.minibloom_attn.decode(args["q"], args["k"], args["v"], args["key_pos"], 0.125,
                                        args["alibi_slopes"], args["t5_table"], args["t5_query_pos"], False, 128,
                                        args["bias"])


def test_decode_fast_and_checked_paths_agree():
    """int32 key_pos and fp32 vectors go straight to the op; the op's C++ checks refuse int64 / fp64 inputs, and
    the Python checks then convert them: the same numbers either way."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g) for s in ((2, 3, 64), (2, 3, 20, 64), (2, 3, 20, 64)))
    pos = torch.arange(16, dtype=torch.int32).expand(2, -1).contiguous()
    slopes, table = torch.rand(3), torch.randn(32, 3)
    qpos = torch.tensor([15, 15], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="key_pos"):
        torch.ops.minibloom_attn.decode(q, k, v, pos.long(), 0.125, slopes, None, None, False, 128, None)
    fast = A.attention_decode(q, k, v, pos, scale=0.125, alibi_slopes=slopes)
    full = A.attention_decode(q, k, v, pos.long(), scale=0.125, alibi_slopes=slopes.double())
    assert torch.equal(fast, full)
    fast = A.attention_decode(q, k, v, pos, scale=1.0, t5_table=table, t5_query_pos=qpos)
    full = A.attention_decode(q, k, v, pos.long(), scale=1.0, t5_table=table, t5_query_pos=qpos.long())
    assert torch.equal(fast, full)


def test_prefill_validation():
    q = torch.randn(1, 2, 4, 64)
    with pytest.raises(ValueError, match="keys per row"):
        A.attention_prefill(q, q, q, torch.zeros(1, 3, dtype=torch.int32), scale=1.0, causal=True)
    with pytest.raises(ValueError, match="q_offset"):
        A.attention_prefill(q, q, q, torch.zeros(1, 4, dtype=torch.int32), scale=1.0, causal=True, q_offset=-1)
    with pytest.raises(ValueError, match="CPU tensor"):
        A.attention_prefill(q, q, "k", torch.zeros(1, 4, dtype=torch.int32), scale=1.0, causal=True)


def test_unavailable_build_falls_back_cleanly(monkeypatch):
    monkeypatch.setattr(_jit, "_cache", {})
    monkeypatch.setattr(A, "_NAME", "minibloom_attn_missing_source")
    monkeypatch.setattr(A, "_SOURCES", ["no_such_file.cpp"])
    ok, reason = A.available()
    assert not ok and "no_such_file.cpp" in reason
    assert A.simd_path().startswith("unavailable")
    with pytest.raises(RuntimeError, match="unavailable"):
        A.attention_decode(torch.randn(1, 1, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8),
                           torch.zeros(1, 2, dtype=torch.int32), scale=1.0)

    monkeypatch.setattr(_jit, "_cache", {})
    monkeypatch.setattr(_jit.shutil, "which", lambda name: None)
    ok, reason = A.available()
    assert not ok and "compiler" in reason
