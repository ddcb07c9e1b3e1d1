"""CPU matmul kernels (kernels/cpu/matmul.py) against the plain-PyTorch references (kernels/matmul_ref.py).

The int32 path of W8A8 is exact: the quantized activations and int32 accumulators match the reference bit for
bit, and the fp32 output differs at most by the rounding of the fp32 epilogue. Every case runs on the SIMD path
of this CPU and on the forced scalar fallback.
"""
import pytest
import torch
import torch.nn.functional as F

from minibloom.kernels import matmul_ref as ref
from minibloom.kernels.cpu import matmul as mm

OK, REASON = mm.available()
needs_ext = pytest.mark.skipif(not OK, reason=f"CPU matmul extension unavailable: {REASON}")


def _paths():
    # The best SIMD family, the scalar fallback and, on an AVX-512 CPU that also has AVX2, the AVX2 kernels.
    if not OK:
        return ["simd", "scalar"]
    best = mm.simd_path()
    has_avx2 = mm._set_simd_cap(1) == "avx2"
    mm._set_simd_cap(2)
    return ["simd", "scalar"] + (["avx2"] if has_avx2 and best.startswith("avx512") else [])


@pytest.fixture(params=_paths())
def path(request):
    mm._set_simd_cap({"simd": 2, "avx2": 1, "scalar": 0}[request.param])
    yield request.param
    mm._set_simd_cap(2)


def _x(M, K, dtype=torch.float32, outliers=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    for k in outliers:                                                            # LLM.int8()-style feature
        x[:, k % K] *= 15
    return x.to(dtype)


def _w(N, K, seed=1):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05


# (1, 21, 1024), (1, 19, 2560), (2, 64, 4096): decode rows where the AVX-512 row kernels read x in the scrambled
# chunk order (matmul.cpp: scramble_rows; fp32 at K = 1024, W8A8 and weight-only int8 at 2560 and 4096)
SHAPES = [(1, 1, 1), (1, 37, 100), (3, 17, 63), (8, 33, 1030), (33, 5, 130), (1, 21, 1024), (1, 19, 2560),
          (2, 64, 4096)]
# Batched decode past 8 rows: the row kernels sweep x in groups of 8 and a tail (matmul.cpp: ROW_GROUPS_MAX_M),
# run even where PREFILL_MIN_ROWS hands such M to a stock op; scrambled x at K = 1024 (fp32) and 2560, 4096.
ROW_GROUP_SHAPES = [(9, 19, 2560), (12, 40, 1030), (17, 21, 1024), (24, 33, 4096), (64, 9, 200)]


def _rows(monkeypatch, M, N, K):
    """Our kernels for the ROW_GROUP_SHAPES, whatever the stock-op policy (the tests of other shapes keep it)."""
    if (M, N, K) in ROW_GROUP_SHAPES:
        monkeypatch.setattr(mm, "PREFILL_MIN_ROWS", dict.fromkeys(mm.PREFILL_MIN_ROWS, mm.NEVER))


@needs_ext
@pytest.mark.parametrize("M,N,K", [(0, 8, 16), (2, 0, 16), (2, 8, 0)])
def test_empty_dims_equal_the_reference(path, M, N, K):
    # K = 0 is a sum over nothing: y = bias, as F.linear gives.
    x, w, b = _x(M, K), _w(N, K), torch.randn(N)
    wq, s = mm.quantize_rows(w)
    torch.testing.assert_close(mm.linear_f32(x, w, b), ref.linear_f32_ref(x, w, b))
    torch.testing.assert_close(mm.linear_bf16(x.bfloat16(), w.bfloat16(), b), ref.linear_bf16_ref(x.bfloat16(), w.bfloat16(), b))
    torch.testing.assert_close(mm.linear_f16(x.half(), w.half(), b), ref.linear_f16_ref(x.half(), w.half(), b))
    torch.testing.assert_close(mm.linear_w8a8(x, wq, s, b), ref.linear_w8a8_ref(x, wq, s, b))
    torch.testing.assert_close(mm.linear_int8_weight(x, wq, s, b), ref.linear_int8_weight_ref(x, wq, s, b))


# --- W8A8 ---------------------------------------------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("M,N,K", SHAPES + ROW_GROUP_SHAPES)
@pytest.mark.parametrize("threshold,outliers", [(6.0, (5, 77)), (6.0, ()), (0.0, (5,))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_w8a8_matches_ref(path, monkeypatch, M, N, K, threshold, outliers, dtype):
    _rows(monkeypatch, M, N, K)
    x = _x(M, K, dtype, outliers)
    wq, ws = mm.quantize_rows(_w(N, K))
    bias = torch.randn(N)
    for a, b in zip(mm.quantize_activations(x, threshold), ref.quantize_activations_ref(x, threshold)):
        assert torch.equal(a, b)                                                  # xq, s_x, outlier columns
    if threshold > 0 and outliers:
        assert mm.quantize_activations(x, threshold)[2].numel() > 0
    y, r = mm.linear_w8a8(x, wq, ws, bias, threshold), ref.linear_w8a8_ref(x, wq, ws, bias, threshold)
    assert y.dtype == dtype and y.shape == (M, N)
    tol = 1e-6 * r.float().abs().max().item()
    if dtype != torch.float32:                                                    # one rounding of the output
        tol = max(tol, (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10) * r.float().abs().max().item())
    torch.testing.assert_close(y.float(), r.float(), rtol=1e-6, atol=tol)
    if not (threshold > 0 and outliers):                                          # same fp32 ops, same order
        assert torch.equal(mm.linear_w8a8(x, wq, ws, None, threshold), ref.linear_w8a8_ref(x, wq, ws, None, threshold))


@needs_ext
@pytest.mark.parametrize("M,K", [(1, 4097), (1, 4096), (5, 300)])
def test_w8a8_int32_accumulators_exact(path, M, K):
    # Rows with absmax 127 and integer values quantize to themselves (s_x = 1); with w_scale = 1, y is the
    # int32 accumulator itself (< 2^24, so exact in fp32).
    g = torch.Generator().manual_seed(3)
    xq = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    xq[:, 0] = 127
    wq = torch.randint(-127, 128, (19, K), generator=g, dtype=torch.int8)
    acc = xq.long() @ wq.long().t()
    y = mm.linear_w8a8(xq.float(), wq, torch.ones(19), None, threshold=0.0)
    assert torch.equal(y, acc.float())
    assert torch.equal(mm._w8a8_int_mm(xq.float(), wq, torch.ones(19), None, 0.0), acc.float())


@needs_ext
@pytest.mark.parametrize("M", [1, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_w8a8_prefill_int_mm_path_same_semantics(M, dtype):
    x = _x(M, 200, dtype, outliers=(7,))
    wq, ws = mm.quantize_rows(_w(48, 200))
    bias = torch.randn(48).to(dtype)
    y, r = mm._w8a8_int_mm(x, wq, ws, bias, 6.0), ref.linear_w8a8_ref(x, wq, ws, bias, 6.0)
    assert y.dtype == r.dtype == dtype
    tol = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}.get(dtype, 1e-6) * r.float().abs().max().item()
    torch.testing.assert_close(y.float(), r.float(), rtol=1e-6, atol=tol)           # the outlier GEMM's order
    assert torch.equal(mm._w8a8_int_mm(x, wq, ws, bias, 0.0), ref.linear_w8a8_ref(x, wq, ws, bias, 0.0))


@needs_ext
@pytest.mark.parametrize("M,K", [(300, 1030), (128, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_prefill_activation_quantization_in_row_blocks_equals_ref(path, M, K, dtype, threshold):
    """From 2^18 values on, threads quantize blocks of rows and merge their column maxima: the same xq, s_x and
    outlier columns as the reference, bit for bit, and the same int32 path after it."""
    x = _x(M, K, dtype, outliers=(3, 700, 1029))
    for a, b in zip(mm.quantize_activations(x, threshold), ref.quantize_activations_ref(x, threshold)):
        assert torch.equal(a, b)
    wq, ws = mm.quantize_rows(_w(40, K))                     # the op itself: its VNNI correction sums per block too
    y = torch.ops.minibloom_matmul.linear_w8a8(x.contiguous(), wq, ws, None, 0.0)
    assert torch.equal(y, ref.linear_w8a8_ref(x, wq, ws, None, 0.0))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_extra,with_bias", [(False, False), (True, False), (False, True), (True, True)])
def test_w8a8_epilogue_is_torch_ops_in_one_pass(dtype, with_extra, with_bias):
    """After torch._int_mm: acc * s_x * w_scale (+ extra) (+ bias), rounded once to the output dtype, bit for bit
    what torch's ops give in that order (linear_w8a8_ref's)."""
    g = torch.Generator().manual_seed(5)
    M, N = 37, 301
    acc = torch.randint(-2 ** 20, 2 ** 20, (M, N), generator=g, dtype=torch.int32)
    s_x, w_scale = torch.rand(M, generator=g) / 100, torch.rand(N, generator=g) / 100
    extra = torch.randn(M, N, generator=g) if with_extra else None
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    y = torch.ops.minibloom_matmul.w8a8_epilogue(acc, s_x, w_scale, extra, bias, torch.empty(0, dtype=dtype))
    r = acc.float() * s_x[:, None] * w_scale[None, :]
    if extra is not None:
        r = r + extra
    if bias is not None:
        r = r + bias.float()
    assert y.dtype == dtype and torch.equal(y, r.to(dtype))


@needs_ext
def test_w8a8_outliers_reduce_error():
    x = _x(4, 512, outliers=(3, 100, 400))
    w = _w(64, 512)
    wq, ws = mm.quantize_rows(w)
    exact = x @ (wq.float() * ws[:, None]).t()
    err_with = (mm.linear_w8a8(x, wq, ws, threshold=6.0) - exact).abs().max()
    err_without = (mm.linear_w8a8(x, wq, ws, threshold=0.0) - exact).abs().max()
    assert err_with < err_without / 4


# --- weight-only int8, bf16 and fp16 ----------------------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("M,N,K", SHAPES + ROW_GROUP_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_weight_matches_ref(path, monkeypatch, M, N, K, dtype):
    _rows(monkeypatch, M, N, K)
    x = _x(M, K, dtype)
    wq, ws = mm.quantize_rows(_w(N, K))
    bias = torch.randn(N).to(dtype)
    y, r = mm.linear_int8_weight(x, wq, ws, bias), ref.linear_int8_weight_ref(x, wq, ws, bias)
    assert y.dtype == dtype and y.shape == (M, N)
    scale = r.float().abs().max().item()
    rtol = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}.get(dtype, 1e-5)  # one rounding; fp32 sum order
    torch.testing.assert_close(y.float(), r.float(), rtol=rtol, atol=rtol * scale)


@needs_ext
@pytest.mark.parametrize("M,N,K", SHAPES + ROW_GROUP_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_within_2x_torch_error(path, monkeypatch, M, N, K, with_bias, dtype):
    _rows(monkeypatch, M, N, K)
    linear, linear_ref, ulp = {torch.bfloat16: (mm.linear_bf16, ref.linear_bf16_ref, 2 ** -7),
                               torch.float16: (mm.linear_f16, ref.linear_f16_ref, 2 ** -10)}[dtype]
    x, w = _x(M, K, dtype), _w(N, K).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    y = linear(x, w, bias)
    assert y.dtype == dtype and y.shape == (M, N)
    y32 = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    err_kernel = (y.float() - y32).abs().max().item()
    err_torch = (F.linear(x, w, bias).float() - y32).abs().max().item()
    assert err_kernel <= 2 * err_torch + 1e-6
    r = linear_ref(x, w, bias).float()
    torch.testing.assert_close(y.float(), r, rtol=ulp, atol=ulp * r.abs().max().item())


@needs_ext
@pytest.mark.parametrize("M", [1, 130])
def test_f16_prefill_widened_path_same_semantics(M):
    # From PREFILL_MIN_ROWS["f16"] rows on, F.linear in fp32 on W widened by blocks of rows (3 blocks here).
    x, w, bias = _x(M, 2048, torch.float16), _w(1100, 2048).half(), torch.randn(1100).half()
    r = ref.linear_f16_ref(x, w, bias).float()
    for y in (mm._f16_widened(x, w, bias), mm.linear_f16(x, w, bias)):
        assert y.dtype == torch.float16 and y.shape == (M, 1100)
        torch.testing.assert_close(y.float(), r, rtol=2 ** -10, atol=2 ** -10 * r.abs().max().item())


@needs_ext
@pytest.mark.parametrize("M,N,K", [(64, 300, 130), (17, 5, 1), (0, 8, 16), (20, 0, 16), (20, 8, 0)])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
def test_gemm_f32_is_an_fp32_gemm(M, N, K, bias_dtype):
    # The stock fp32 GEMM behind prefill rows (oneDNN where torch has it), also on W widened from fp16.
    assert mm.stock_gemm_f32() in ("oneDNN", "F.linear")
    x, w = _x(M, K), _w(N, K)
    bias = None if bias_dtype is None else torch.randn(N).to(bias_dtype)
    y = mm.gemm_f32(x, w, bias)
    exact = ref.linear_f32_ref(x.double(), w.double(), None if bias is None else bias.double())
    assert y.dtype == torch.float32 and y.shape == (M, N)
    scale = (x.double().abs() @ w.double().abs().t()).max().item() + 1.0 if M * N else 1.0
    assert (y.double() - exact).abs().max().item() <= 4 * max(K, 1) * 2 ** -24 * scale if M * N else True


@needs_ext
def test_f16_conversions_are_torchs(path):
    # Every fp16 bit pattern widens exactly and rounds back to itself (1.0 * w, K = 1); fp32 values round to
    # fp16 as torch rounds them (0 * w + bias): tiny, subnormal, halfway, overflowing, infinite. NaN stays NaN.
    # The one exception is -0.0, which comes out +0.0: the fp32 sums start from +0.0, as the bf16 kernel's do.
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    y = mm.linear_f16(torch.ones(1, 1, dtype=torch.float16), every[:, None])[0]
    g = torch.Generator().manual_seed(0)
    floats = torch.cat([torch.randn(20000, generator=g) * 10.0 ** torch.randint(-9, 6, (20000,), generator=g),
                        torch.tensor([65504.0, 65519.99, 65520.0, 1e10, float("inf"), -float("inf"), 2.0 ** -24,
                                      2.0 ** -25, 1.5 * 2.0 ** -25, 2.0 ** -26, 1 + 2 ** -11, 1 + 3 * 2 ** -11,
                                      float("nan")])])
    z = mm.linear_f16(torch.ones(1, 1, dtype=torch.float16), torch.zeros(len(floats), 1, dtype=torch.float16),
                      floats)[0]
    for got, want in ((y, every), (z, floats.half())):
        nan, neg0 = want.isnan(), (want == 0) & want.signbit()
        assert got[nan].isnan().all()
        keep = ~nan & ~neg0
        assert torch.equal(got[keep].view(torch.int16), want[keep].view(torch.int16))


@needs_ext
@pytest.mark.parametrize("M,N,K", SHAPES + ROW_GROUP_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_f32_matches_ref(path, monkeypatch, M, N, K, with_bias):
    _rows(monkeypatch, M, N, K)
    x, w = _x(M, K), _w(N, K)
    bias = torch.randn(N) if with_bias else None
    exact = ref.linear_f32_ref(x.double(), w.double(), None if bias is None else bias.double())
    scale = (x.double().abs() @ w.double().abs().t()).max().item() + 1.0          # bound of the sum's size
    ref_err = (ref.linear_f32_ref(x, w, bias) - exact).abs().max().item()
    for y in (torch.ops.minibloom_matmul.linear_f32(x, w, bias), mm.linear_f32(x, w, bias)):  # kernel, wrapper
        assert y.dtype == torch.float32 and y.shape == (M, N)
        err = (y.double() - exact).abs().max().item()
        assert err <= max(2 * ref_err, 4 * K * 2 ** -24 * scale)                 # summation order only


# --- tanh GELUs: BLOOM's, and T5's gated gelu_new ---------------------------------------------------------------------

def _gelu_refs():
    from minibloom import ops
    return {"bloom": (ops.BLOOM_GELU_C, lambda x, g: ops.bloom_gelu(x)),
            "gated gelu_new": (ops.GELU_NEW_C, lambda x, g: ops.gelu_new(x) * g)}


@needs_ext
@pytest.mark.parametrize("shape", [(1,), (17,), (3, 5, 7), (2, 1025), (16, 4096)])   # tails; the last one threaded
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["bloom", "gated gelu_new"])
def test_tanh_gelu_matches_the_model_reference(path, shape, dtype, kind):
    c, reference = _gelu_refs()[kind]
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    gate = (torch.randn(shape, generator=g) * 2).to(dtype) if kind != "bloom" else None
    y = mm.tanh_gelu(x, c, gate)
    assert y.dtype == dtype and y.shape == x.shape
    exact = reference(x.double(), None if gate is None else gate.double())
    if dtype == torch.float32:                                         # the exp polynomial's ~1 ulp, no more
        torch.testing.assert_close(y, reference(x, gate), rtol=2e-6, atol=2e-6)
    else:                                                              # rounded once: at most the reference's error
        half_ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11                # relative, at most
        assert ((y.double() - exact).abs() <= half_ulp * exact.abs() * 1.01 + 1e-5).all()
        assert (y.double() - exact).abs().max() <= (reference(x, gate).double() - exact).abs().max()


@needs_ext
def test_tanh_gelu_special_values(path):
    c, reference = _gelu_refs()["bloom"]
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 300.0, -300.0, 1e-30])
    torch.testing.assert_close(mm.tanh_gelu(x, c), reference(x, None), equal_nan=True, rtol=1e-6, atol=0)


# --- T5's RMSNorm ----------------------------------------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("shape", [(1, 1), (1, 512), (3, 7, 100), (2, 130, 1024), (64, 4096)])   # tails; threaded
@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float32, torch.float16), (torch.float16, torch.float16)])
def test_rms_norm_matches_the_model_reference(path, shape, x_dtype, w_dtype):
    """Only the sum of squares runs in another order: fp32 within ~1 ulp, 16-bit outputs off by an ulp of one of
    their two roundings in rare elements (fp16 weights give fp32 outputs, as mt5.py's fp16 recipe wants)."""
    from minibloom import ops
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=g) * 3).to(x_dtype)
    x.view(-1, shape[-1])[0] = 0                                                   # an all-zero row: y = 0
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(w_dtype)
    y, want = mm.rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6)
    assert y.dtype == want.dtype and y.shape == want.shape == x.shape
    assert torch.equal(y.view(-1, shape[-1])[0], want.view(-1, shape[-1])[0])
    if y.dtype == torch.float32:
        torch.testing.assert_close(y, want, rtol=2e-6 + shape[-1] * 2 ** -25, atol=1e-7)   # a sum of C squares
    else:
        torch.testing.assert_close(y.float(), want.float(), rtol=2 ** -6, atol=0)   # t and w * t: two roundings
        assert (y != want).float().mean() <= 0.01


@needs_ext
def test_rms_norm_mistakes_are_named():
    with pytest.raises(ValueError, match="w must be .* of shape \\(8,\\)"):
        mm.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="x must be"):
        mm.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.ones(8), 1e-6)


# --- API ----------------------------------------------------------------------------------------------------------

@needs_ext
def test_leading_batch_dims_and_simd_switch():
    x = _x(6, 40).reshape(2, 3, 40)
    wq, ws = mm.quantize_rows(_w(9, 40))
    assert mm.linear_w8a8(x, wq, ws).shape == (2, 3, 9)
    assert mm.linear_int8_weight(x, wq, ws).shape == (2, 3, 9)
    assert mm.linear_bf16(x.bfloat16(), _w(9, 40).bfloat16()).shape == (2, 3, 9)
    assert mm.linear_f16(x.half(), _w(9, 40).half()).shape == (2, 3, 9)
    assert mm.linear_f32(x, _w(9, 40)).shape == (2, 3, 9)
    mm.set_force_scalar(True)
    try:
        assert mm.simd_path() == "scalar"
    finally:
        mm.set_force_scalar(False)
    assert mm.simd_path() in ("avx512", "avx512+vnni", "avx512+bf16", "avx512+vnni+bf16", "avx2", "scalar")


@needs_ext
def test_validation_errors():
    wq, ws = mm.quantize_rows(_w(8, 16))
    x = _x(2, 16)
    with pytest.raises(ValueError, match="last dim"):
        mm.linear_w8a8(_x(2, 15), wq, ws)
    with pytest.raises(ValueError, match="int8"):
        mm.linear_w8a8(x, wq.float(), ws)
    with pytest.raises(ValueError, match="w_scale"):
        mm.linear_int8_weight(x, wq, ws[:4])
    with pytest.raises(ValueError, match="bias"):
        mm.linear_w8a8(x, wq, ws, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="x must be"):
        mm.linear_w8a8(x.double(), wq, ws)
    with pytest.raises(ValueError, match="x must be bfloat16"):
        mm.linear_bf16(x, _w(8, 16).bfloat16())
    with pytest.raises(ValueError, match="x must be float32"):
        mm.linear_f32(x.bfloat16(), _w(8, 16))
    with pytest.raises(ValueError, match="x must be float16"):
        mm.linear_f16(x.bfloat16(), _w(8, 16).half())
    with pytest.raises(ValueError, match="w must be a 2-D torch.float16"):
        mm.linear_f16(x.half(), _w(8, 16).bfloat16())
    with pytest.raises(ValueError, match="floating-point"):
        mm.quantize_rows(wq)


@needs_ext
@pytest.mark.parametrize("fn", ["w8a8", "int8_weight", "bf16", "f16", "f32"])
def test_decode_fast_path_still_names_the_mistake(fn):
    # Decode calls skip the Python checks and rely on the op's own; every mistake must still end in the message.
    w = _w(8, 16)
    wq, ws = mm.quantize_rows(w)
    call = {"w8a8": lambda x, b=None, s=ws: mm.linear_w8a8(x, wq, s, b),
            "int8_weight": lambda x, b=None, s=ws: mm.linear_int8_weight(x, wq, s, b),
            "bf16": lambda x, b=None, s=None: mm.linear_bf16(x.bfloat16(), w.bfloat16(), b),
            "f16": lambda x, b=None, s=None: mm.linear_f16(x.half(), w.half(), b),
            "f32": lambda x, b=None, s=None: mm.linear_f32(x, w, b)}[fn]
    x = _x(1, 16)
    with pytest.raises(ValueError, match="last dim"):
        call(_x(2, 8))                                        # numel 16: viewing it as (-1, 16) would succeed
    with pytest.raises(ValueError, match="bias.*meta"):
        call(x, torch.zeros(8, device="meta"))                # would dispatch to the fake implementation
    with pytest.raises(ValueError, match="bias"):
        call(x, "not a tensor")
    with pytest.raises(ValueError, match="bias"):
        call(x, torch.zeros(8)[::2].repeat(2)[:7])
    if fn in ("w8a8", "int8_weight"):
        with pytest.raises(ValueError, match="w_scale is required"):
            call(x, None, None)
        with pytest.raises(ValueError, match="w_scale"):
            call(x, None, ws.double())
    strided = _x(2, 32)[:1, ::2]                              # not contiguous: the full path copies it
    assert torch.equal(call(strided), call(strided.contiguous()))


def test_quantize_rows_ref():
    w = _w(5, 33)
    w[2] = 0
    wq, s = ref.quantize_rows_ref(w)
    assert wq.dtype == torch.int8 and s[2] == 1 and wq[2].abs().sum() == 0
    assert torch.equal(wq, torch.round(w / s[:, None]).to(torch.int8))
    assert wq.abs().amax(dim=1)[[0, 1, 3, 4]].eq(127).all()


@needs_ext
@pytest.mark.parametrize("N,K", [(1, 1), (5, 33), (37, 100), (300, 1030), (3, 20000)])  # 16-bit rows: 15, 1 per block
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_rows_kernel_equals_ref(path, N, K, dtype):
    w = (_w(N, K) * 40).to(dtype)
    w[N // 2] = 0                                                                 # a zero row: scale 1
    w[0, 0] = 2.5 * (w[0].float().abs().amax() / 127).to(dtype)                   # a half-way case
    q, s = mm.quantize_rows(w)
    rq, rs = ref.quantize_rows_ref(w)
    assert torch.equal(q, rq) and torch.equal(s, rs)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_rows_into_slices_of_the_whole_matrix(path, dtype):
    """The load path: chunks of rows quantized straight into row slices of the int8 matrix and its scales."""
    w = (_w(50, 70) * 40).to(dtype)
    wq, scale = torch.full((50, 70), 99, dtype=torch.int8), torch.full((50,), -1.0)
    for start in range(0, 50, 16):
        rows = slice(start, min(start + 16, 50))
        mm.quantize_rows_into(w[rows], wq[rows], scale[rows])
    rq, rs = ref.quantize_rows_ref(w)
    assert torch.equal(wq, rq) and torch.equal(scale, rs)
    with pytest.raises(ValueError, match="wq must be a contiguous torch.int8"):
        mm.quantize_rows_into(w, wq[:, :10], scale)
    with pytest.raises(ValueError, match="scale must be a contiguous torch.float32"):
        mm.quantize_rows_into(w, wq, scale.double())


@needs_ext
def test_fake_impls_trace_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    ops = torch.ops.minibloom_matmul
    with FakeTensorMode(shape_env=ShapeEnv()):
        x, xb = torch.empty(3, 64), torch.empty(3, 64, dtype=torch.bfloat16)
        wq, ws, wb = torch.empty(10, 64, dtype=torch.int8), torch.empty(10), torch.empty(10, 64, dtype=torch.bfloat16)
        assert ops.linear_w8a8(xb, wq, ws, None, 6.0).shape == (3, 10)
        assert ops.linear_w8a8(xb, wq, ws, None, 6.0).dtype == torch.bfloat16
        assert ops.linear_int8_weight(x, wq, ws, ws).shape == (3, 10)
        assert ops.linear_bf16(xb, wb, None).dtype == torch.bfloat16
        xh, wh = torch.empty(3, 64, dtype=torch.float16), torch.empty(10, 64, dtype=torch.float16)
        assert ops.linear_f16(xh, wh, None).shape == (3, 10) and ops.linear_f16(xh, wh, None).dtype == torch.float16
        assert ops.linear_f32(x, torch.empty(10, 64), None).shape == (3, 10)
        xq, s_x, outl = ops.quantize_activations(x, 6.0)
        assert xq.shape == (3, 64) and xq.dtype == torch.int8 and s_x.shape == (3,) and outl.dtype == torch.int32
        assert ops.argmax_rows(xb).shape == (3,) and ops.argmax_rows(xb).dtype == torch.long


def test_unavailable_extension_reports_reason(monkeypatch):
    monkeypatch.setattr(mm, "_state", None)
    monkeypatch.setattr(mm._jit, "load_extension", lambda name, sources: (False, "no C/C++ compiler found"))
    assert mm.available() == (False, "no C/C++ compiler found")
    with pytest.raises(RuntimeError, match="no C/C\\+\\+ compiler found"):
        mm.linear_bf16(torch.zeros(1, 4, dtype=torch.bfloat16), torch.zeros(2, 4, dtype=torch.bfloat16))
    monkeypatch.setattr(mm, "_state", None)
    monkeypatch.setattr(mm._jit, "load_extension", lambda name, sources: 1 / 0)
    ok, reason = mm.available()                                                   # never raises
    assert not ok and "division by zero" in reason


@pytest.mark.parametrize("N", [1, 15, 16, 17, 250880])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_argmax_equals_torch(path, N, dtype):
    g = torch.Generator().manual_seed(N)
    x = torch.randn(3, N, generator=g).to(dtype)
    assert torch.equal(mm.argmax(x), ref.argmax_ref(x))
    assert torch.equal(mm.argmax(x[0]), ref.argmax_ref(x[0]))                       # (V,) -> ()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_argmax_ties_infinities_and_nans_as_torch(path, dtype):
    N = 1000
    rows = torch.zeros(7, N)
    rows[0, [17, 300, 999]] = 5.0                    # ties: the first wins, across lanes and vectors
    rows[1, [3, 19]] = 5.0                           # ties within the first two vectors, different lanes
    rows[2] = float("-inf")                          # all -inf -> 0
    rows[3, 998] = float("inf")                      # +inf in the tail
    rows[4, [40, 500]] = float("nan")                # NaN counts as the maximum: the first NaN
    rows[4, 7] = float("inf")
    rows[5, 996:] = 9.0                              # the maximum only in the tail (N % 16 = 8)
    rows[6] = -3.0                                   # all equal -> 0
    x = rows.to(dtype)
    assert torch.equal(mm.argmax(x), ref.argmax_ref(x))


def test_argmax_of_a_strided_view_as_torch():
    # (B, V) logits go to the op first; it refuses a non-contiguous view and the full path copies it
    x = torch.randn(300, 5).t()                                                    # (5, 300), strides (1, 5)
    assert torch.equal(mm.argmax(x), ref.argmax_ref(x))
    assert torch.equal(mm.argmax(x[:, ::2]), ref.argmax_ref(x[:, ::2]))


def test_argmax_validation():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        mm.argmax(torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-empty last dim"):
        mm.argmax(torch.zeros(2, 0))


_PREFETCH_CHECK = """
import torch
from minibloom.kernels import matmul_ref as ref
from minibloom.kernels.cpu import matmul as mm
assert mm.available()[0]
g = torch.Generator().manual_seed(0)
for cap, M, N, K in [(c, *shape) for c in (2, 1) for shape in [(1, 37, 1030), (3, 40, 4096), (8, 9, 64)]]:
    mm._set_simd_cap(cap)                                    # AVX-512 (where present) and AVX2 row kernels, M <= 8
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.05, torch.randn(N, generator=g)
    wq, s = mm.quantize_rows(w)
    torch.testing.assert_close(mm.linear_w8a8(x, wq, s, b), ref.linear_w8a8_ref(x, wq, s, b))
    torch.testing.assert_close(mm.linear_int8_weight(x, wq, s, b), ref.linear_int8_weight_ref(x, wq, s, b))
    torch.testing.assert_close(mm.linear_f32(x, w, b), ref.linear_f32_ref(x, w, b))
    xb, wb = x.bfloat16(), w.bfloat16()
    torch.testing.assert_close(mm.linear_bf16(xb, wb, b), ref.linear_bf16_ref(xb, wb, b), atol=0.05, rtol=0.02)
print("ok")
"""


@needs_ext
@pytest.mark.parametrize("flag", ["0", "1"])
def test_row_kernels_with_and_without_software_prefetch(flag):
    # The prefetch choice is made once per process (MINIBLOOM_SW_PREFETCH or the CPU rule) and compiled into
    # separate row-kernel instances: run both instances, whichever this CPU would pick.
    import os
    import subprocess
    import sys
    env = dict(os.environ, MINIBLOOM_SW_PREFETCH=flag)
    out = subprocess.run([sys.executable, "-c", _PREFETCH_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
