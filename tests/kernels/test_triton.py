"""Triton kernels (kernels/triton) vs plain-PyTorch references.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 is set before the
kernel modules are imported, then restored); with CUDA the same cases run compiled on the GPU. Shapes are tiny
because the interpreter is slow. fp32: within 1e-5 of the fp32 reference; fp16 within 2e-3; bf16 (dots upcast to
fp32 in the interpreter, native on GPU) within 2x the reference's own bf16 error. int8: quantized values and int32
accumulators bit-exact, outputs within fp32 epilogue rounding. One test compiles the kernels for sm_90 (no GPU
needed) so that CI catches what only the real compiler rejects.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter flag must be set before triton itself is imported (tl.zeros etc. are @triton.jit functions),
# and stay set (triton imports more of itself lazily while kernels run).
TRITON_WAS_IMPORTED = "triton" in sys.modules
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from minibloom.kernels import attention_ref as R  # noqa: E402
from minibloom.ops import alibi_slopes, positions_from_mask  # noqa: E402

pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and TRITON_WAS_IMPORTED and not triton.knobs.runtime.interpret,
    reason="triton was imported before TRITON_INTERPRET=1 could be set: run with TRITON_INTERPRET=1 "
           "or this file first")


def _import_kernels():
    """The kernel modules, (re)built for the interpreter when there is no GPU (read at @triton.jit time)."""
    mods = [importlib.import_module(f"minibloom.kernels.triton.{m}") for m in ("attention", "int8")]
    return [m if m.INTERPRET == (DEVICE == "cpu") else importlib.reload(m) for m in mods]


A, I = _import_kernels()
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(DEVICE, dtype)


def check(out, ref_fn, args, kwargs):
    """Kernel output vs the fp32 reference; bf16 by the 2x rule against the reference run in bf16."""
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t
    args, kwargs = [cpu(a) for a in args], {k: cpu(v) for k, v in kwargs.items()}
    ref = ref_fn(*args, **kwargs).float()
    err = (out.cpu().float() - ref).abs().max().item()
    if out.dtype == torch.bfloat16:
        own = (ref_fn(*args, **kwargs, upcast=False).float() - ref).abs().max().item()
        assert err <= 2 * own + 1e-3, (err, own)
    else:
        assert err <= TOL[out.dtype], err
    return ref


# --- attention: prefill -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prefill_alibi_left_padding(dtype):
    """BLOOM: 12 heads (slopes of the non-power-of-two rule), causal, a left-padded row; padded queries -> 0."""
    torch.manual_seed(0)
    B, H, T, D = 2, 12, 21, 16
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :5] = 0
    key_pos = positions_from_mask(mask).int().to(DEVICE)
    q, k, v = (rand(B, H, T, D, dtype=dtype) for _ in range(3))
    kw = dict(scale=D ** -0.5, causal=True, alibi_slopes=alibi_slopes(H).to(DEVICE))
    out = A.attention_prefill(q, k, v, key_pos, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    check(out, R.attention_prefill_ref, (q, k, v, key_pos), kw)
    assert torch.all(out[1, :, :5] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_chunk_with_offset_and_ragged_rows(dtype):
    """Chunked prefill (q_offset) over a non-contiguous cache view; rows of different lengths (right padding)."""
    torch.manual_seed(1)
    B, H, T, S, D = 2, 2, 7, 27, 24                      # D not a power of two
    key_pos = torch.arange(S).repeat(B, 1).int()
    key_pos[1, 20:] = -1
    cache = rand(B, S + 5, H, 2, D, dtype=dtype)          # (B, S_max, H, k|v, D): strided views
    k, v = cache[:, :S, :, 0].transpose(1, 2), cache[:, :S, :, 1].transpose(1, 2)
    q = rand(B, H, T, D, dtype=dtype)
    kw = dict(scale=0.3, causal=True, q_offset=S - T, alibi_slopes=alibi_slopes(H).to(DEVICE))
    check(A.attention_prefill(q, k, v, key_pos.to(DEVICE), **kw), R.attention_prefill_ref, (q, k, v, key_pos), kw)


@pytest.mark.parametrize("bidirectional,causal,max_distance,T,dtype", [
    (True, False, 16, 40, torch.float32),      # encoder; far buckets and the last bucket reached at short range
    (True, False, 16, 40, torch.float16),
    (False, True, 24, 40, torch.float32),      # decoder self-attention, causal
    (False, True, 24, 40, torch.float16),
])
def test_prefill_t5(bidirectional, causal, max_distance, T, dtype):
    torch.manual_seed(2)
    B, H, D = 2, 2, 16
    key_pos = torch.arange(T).repeat(B, 1).int()
    key_pos[1, T - 9:] = -1                               # padded encoder row
    q, k, v = (rand(B, H, T, D, dtype=dtype) for _ in range(3))
    kw = dict(scale=1.0, causal=causal, t5_table=rand(32, H), t5_bidirectional=bidirectional,
              t5_max_distance=max_distance)
    check(A.attention_prefill(q, k, v, key_pos.to(DEVICE), **kw), R.attention_prefill_ref, (q, k, v, key_pos), kw)


def test_t5_thresholds_match_reference():
    """The kernel's bucket boundaries reproduce transformers' fp32 log formula at every distance."""
    rel = torch.arange(-400, 401)
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (32, 24), (16, 64)):
            thr = A.t5_log_thresholds(nb, bidirectional, md, "cpu")
            nb_dir = nb // 2 if bidirectional else nb
            r = rel.abs() if bidirectional else (-rel).clamp(min=0)
            large = nb_dir // 2 + (r[:, None] >= thr[None, :].long()).sum(1)
            bucket = torch.where(r < nb_dir // 2, r, large) + ((rel > 0) * nb_dir if bidirectional else 0)
            assert torch.equal(bucket, R.t5_bucket_ref(rel, bidirectional, nb, md)), (bidirectional, nb, md)


# --- attention: decode --------------------------------------------------------------------------------------------

@pytest.fixture
def small_splits(monkeypatch):
    """Split the KV cache every 16 keys so that split-K and the combine kernel run at tiny lengths."""
    monkeypatch.setattr(A, "SPLIT_MIN_KEYS", 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_alibi_split_k(dtype, small_splits):
    """BLOOM decode over a preallocated cache (only the first L keys read), left padding, a fully masked row."""
    torch.manual_seed(3)
    B, H, S_max, L, D = 3, 3, 80, 70, 16
    key_pos = torch.arange(L).repeat(B, 1).int()
    key_pos[0, :9] = -1
    key_pos[0, 9:] -= 9
    key_pos[2] = -1
    q = rand(B, H, D, dtype=dtype)
    k, v = (rand(B, H, S_max, D, dtype=dtype) for _ in range(2))
    kw = dict(scale=D ** -0.5, alibi_slopes=alibi_slopes(H).to(DEVICE))
    out = A.attention_decode(q, k, v, key_pos.to(DEVICE), **kw)
    assert out.shape == (B, H, D) and out.dtype == dtype
    check(out, R.attention_decode_ref, (q, k, v, key_pos), kw)
    assert torch.all(out[2] == 0)


@pytest.mark.parametrize("splits", ["one", "many"])
def test_decode_t5_and_dense_bias(splits, monkeypatch):
    """T5 decoder self-attention (bucket of key_pos - query_pos) and the precomputed (H, L) bias row."""
    monkeypatch.setattr(A, "SPLIT_MIN_KEYS", 16 if splits == "many" else 1 << 20)
    torch.manual_seed(4)
    B, H, L, D = 2, 2, 50, 16
    key_pos = torch.arange(L).repeat(B, 1).int()
    key_pos[1, 30:] = -1
    q = rand(B, H, D)
    k, v = (rand(B, H, L, D) for _ in range(2))
    kw = dict(scale=1.0, t5_table=rand(32, H), t5_query_pos=torch.tensor([L - 1, 29]).int().to(DEVICE),
              t5_bidirectional=False, t5_max_distance=24)
    check(A.attention_decode(q, k, v, key_pos.to(DEVICE), **kw), R.attention_decode_ref, (q, k, v, key_pos), kw)
    kw = dict(scale=1.0, bias=rand(H, L))
    check(A.attention_decode(q, k, v, key_pos.to(DEVICE), **kw), R.attention_decode_ref, (q, k, v, key_pos), kw)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_decode_t5_far_buckets(bidirectional):
    """max_distance 128 over 150 keys: |rel| beyond 91 (encoder) / 113 (decoder) lands in the last bucket."""
    torch.manual_seed(8)
    B, H, L, D = 1, 2, 150, 16
    key_pos = torch.arange(L).repeat(B, 1).int()
    q = rand(B, H, D)
    k, v = (rand(B, H, L, D) for _ in range(2))
    table = torch.zeros(32, H)
    table[31] = 3.0                                       # far keys stand out only if bucketed correctly
    kw = dict(scale=1.0, t5_table=(table + 0.1 * torch.randn(32, H)).to(DEVICE),
              t5_query_pos=torch.tensor([20 if bidirectional else L - 1]).int().to(DEVICE),
              t5_bidirectional=bidirectional, t5_max_distance=128)
    check(A.attention_decode(q, k, v, key_pos.to(DEVICE), **kw), R.attention_decode_ref, (q, k, v, key_pos), kw)


def test_attention_errors():
    q, k = rand(1, 2, 4, 16), rand(1, 2, 4, 16)
    with pytest.raises(ValueError, match="int32"):
        A.attention_prefill(q, k, k, torch.zeros(1, 4, dtype=torch.long, device=DEVICE), scale=1.0, causal=True)
    key_pos = torch.zeros(1, 4, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="not both"):
        A.attention_prefill(q, k, k, key_pos, scale=1.0, causal=True, alibi_slopes=rand(2), t5_table=rand(32, 2))
    with pytest.raises(ValueError, match="t5_query_pos"):
        A.attention_decode(q[:, :, 0], k, k, key_pos, scale=1.0, t5_table=rand(32, 2))


# --- int8 ---------------------------------------------------------------------------------------------------------

def quantize_rows_ref(w):
    w = w.float()
    scale = w.abs().amax(1) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def linear_w8a8_ref(x, wq, w_scale, bias=None, threshold=6.0):
    xf = x.float()
    outl = xf.abs().amax(0) > threshold if threshold > 0 else torch.zeros(x.shape[1], dtype=torch.bool)
    xq, sx = quantize_rows_ref(xf.masked_fill(outl[None], 0))
    y = (xq.int() @ wq.int().T).float() * sx[:, None] * w_scale[None]
    y += xf[:, outl] @ (wq[:, outl].float() * w_scale[:, None]).T
    return y + (bias.float() if bias is not None else 0)


def weight(N, K):
    w = torch.randn(N, K)
    w[3] = 0                                                   # all-zero row -> scale 1
    w[5, :6] = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5, 127.0]) / 127 * 3   # exact halves: round half to even
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_rows_exact(dtype):
    w = weight(20, 150).to(dtype)
    wq, scale = I.quantize_rows(w.to(DEVICE))
    wq_ref, scale_ref = quantize_rows_ref(w)
    assert wq.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(wq.cpu(), wq_ref) and torch.equal(scale.cpu(), scale_ref)


@pytest.mark.parametrize("M", [1, 33])
def test_w8a8_int32_accumulators_exact(M):
    """Integer x with row absmax 127 and unit weight scales: y is the int32 accumulator itself."""
    torch.manual_seed(5)
    K, N = 150, 70                                             # neither a multiple of the blocks
    x = torch.randint(-127, 128, (M, K)).float()
    x[:, 0] = 127
    wq = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    y = I.linear_w8a8(x.to(DEVICE), wq.to(DEVICE), torch.ones(N, device=DEVICE), threshold=0.0)
    assert torch.equal(y.cpu(), (x.int() @ wq.int().T).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_w8a8_outliers(dtype, threshold):
    """LLM.int8(): outlier columns (> threshold in any row) in float, the rest int8; bias; x's dtype out."""
    torch.manual_seed(6)
    M, K, N = 5, 150, 70
    x = torch.randn(M, K)
    x[1, 7], x[3, 100], x[0, 101] = 9.0, -12.0, 6.5            # three outlier columns in two K blocks
    x = x.to(dtype)
    wq, w_scale = quantize_rows_ref(weight(N, K))
    bias = torch.randn(N)
    y = I.linear_w8a8(x.to(DEVICE), wq.to(DEVICE), w_scale.to(DEVICE), bias.to(DEVICE), threshold)
    assert y.dtype == dtype and y.shape == (M, N)
    ref = linear_w8a8_ref(x, wq, w_scale, bias, threshold)
    # fp32: only the epilogue rounds differently; fp16/bf16: plus one rounding of the output
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(y.cpu().float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_weight_only(dtype):
    torch.manual_seed(7)
    x = torch.randn(3, 150).to(dtype)
    wq, w_scale = quantize_rows_ref(weight(70, 150))
    bias = torch.randn(70)
    y = I.linear_int8_weight(x.to(DEVICE), wq.to(DEVICE), w_scale.to(DEVICE), bias.to(DEVICE))
    ref = (x.float() @ wq.float().T) * w_scale + bias
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(y.cpu().float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_int8_errors():
    wq = torch.zeros(4, 8, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="features"):
        I.linear_w8a8(rand(2, 9), wq, torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="int8"):
        I.linear_int8_weight(rand(2, 8), wq.float(), torch.ones(4, device=DEVICE))


# --- the GPU compiler, without a GPU ------------------------------------------------------------------------------

COMPILE_SCRIPT = r"""
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from minibloom.kernels.triton import attention as A, int8 as I

def compile_ptx(kernel, types, constexprs):
    fn = kernel if isinstance(kernel, triton.runtime.JITFunction) else kernel.fn    # unwrap autotune
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]

f32 = {"qk_scale": "fp32", "threshold": "fp32"}
attn = dict(Q="*bf16", K="*bf16", V="*bf16", Out="*bf16", KPOS="*i32", SLOPES="*fp32", TAB="*fp32", THR="*i32",
            M_part="*fp32", L_part="*fp32", Acc_part="*fp32", QPOS="*i32", BIAS_T="*fp32", **f32)
ptx = compile_ptx(A._prefill_kernel, attn, dict(D=64, BLOCK_D=64, CAUSAL=True, BIAS=A.ALIBI, T5_BIDIR=False,
                                                T5_NB_DIR=0, T5_NLOG=0, DOT_F32=False, BLOCK_M=64, BLOCK_N=32))
assert re.search(r"\b(mma|wgmma)\.", ptx), "no tensor-core MMA in the prefill kernel"
compile_ptx(A._decode_kernel, attn, dict(D=80, BLOCK_D=128, BIAS=A.T5, T5_BIDIR=False, T5_NB_DIR=32, T5_NLOG=15,
                                         ONE_SPLIT=False, BLOCK_N=64))
compile_ptx(A._combine_kernel, attn, dict(D=64, BLOCK_D=64, BLOCK_SPLITS=8))
mm = dict(A="*i8", B="*i8", C="*bf16", SX="*fp32", WS="*fp32", BIAS="*fp32", XF="*bf16", FLAGS="*i8",
          X="*bf16", XQ="*i8", SCALE="*fp32", **f32)
assert "div.rn.f32" in compile_ptx(I._quantize_rows_kernel, mm, dict(HAS_FLAGS=True, BLOCK_K=1024))
compile_ptx(I._outlier_columns_kernel, mm, dict(BLOCK_M=16, BLOCK_K=64))
ptx = compile_ptx(I._matmul_kernel, mm, dict(W8A8=True, OUTLIERS=True, HAS_BIAS=True, DOT_F32=False,
                                             BLOCK_M=16, BLOCK_N=32, BLOCK_K=64))
assert re.search(r"\b(mma|wgmma)\S*s8", ptx), "no int8 tensor-core MMA in the GEMM"
print("compiled")
"""


def _ptxas_available():
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _ptxas_available(), reason="triton wheel without the bundled ptxas")
def test_kernels_compile_for_sm90():
    """The real compiler (not the interpreter) accepts the kernels for sm_90, no GPU needed. A subprocess:
    this process's kernels are built for the interpreter. Asserts IEEE division and tensor-core MMAs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
