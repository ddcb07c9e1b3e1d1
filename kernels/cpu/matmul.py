"""CPU matmul kernels: LLM.int8() W8A8, weight-only int8, bf16, fp16 and fp32, y = x @ W^T (+ b) with W (N, K).

Implements kernels/matmul_ref.py (quantize_rows_ref, linear_w8a8_ref, linear_int8_weight_ref, linear_bf16_ref,
linear_f16_ref, linear_f32_ref)
with C kernels (matmul.cpp: AVX-512 VNNI/BF16, AVX2, scalar fallback, picked at run time; OpenMP over output
rows) registered as torch.ops.minibloom_matmul.* through the stable ABI (matmul_op.cpp), JIT-built on first use.
x may have leading batch dims; it is flattened to (M, K). Decode (small M) is the target: every x row is
processed in one pass over the weights. Above a measured M the wrappers hand the GEMM to a stock op with the
same semantics (see PREFILL_MIN_ROWS and MATMUL.md).
Set MINIBLOOM_FORCE_SCALAR=1 (or call set_force_scalar(True)) to run the scalar fallback.
"""
import math
import os

import torch
import torch.nn.functional as F

from . import _jit

_SOURCES = ["matmul.cpp", "matmul_op.cpp"]
_state: tuple[bool, str] | None = None

# Bits of torch.ops.minibloom_matmul.simd_level (matmul.cpp).
_AVX512F, _VNNI, _BF16, _AVX2 = 1, 2, 4, 8

# From this many rows of x on, the wrappers use stock ops with the same semantics (measured, MATMUL.md):
# W8A8 -> our quantization + torch._int_mm (exact int32) + the same fp32 epilogue; bf16 -> F.linear (oneDNN);
# fp32 -> gemm_f32 below; fp16 -> gemm_f32 on W widened ~4 MB of rows at a time (torch's own fp16 GEMM was 1.4-2.2x
# slower than our kernel at 1 to 512 rows).
# Set when the kernels load, from the CPU. Below the threshold the row kernels stream W once for all rows (in
# groups of 8 from 9 rows on). AVX-512 (Zen 4, 24 layers + lm_head cold, bench_matmul --rows N --ours-at-any-rows,
# 2026-12-05): bf16 ours 39.8 ms at 8 rows against oneDNN's 44.0, 69.4 against 50.7 at 12: oneDNN from 9 rows.
# fp16 ours 65.8 against the widened fp32 GEMM's 83.1 at 8, 85.2 against 83.0 at 9, 103 against 89 at 12: from 9.
# fp32 ours 124 against oneDNN's 79 at 9: from 9. W8A8 ours against _int_mm 25.7 / 60.5 ms at 8 rows, 36.2 / 64.3
# at 16, 53.5 / 80.2 at 32 (80.8 with 4 outlier columns), 98 / 109 at 48 where _int_mm wins the layers alone
# (47.6 / 52.2 ms): ours through 32 rows. On AVX2, ours won at every row count measured (1 to 128) for int8 and
# bf16, and fp32 from 256 rows (Zen 2, against MKL's F.linear: ours 1.7x faster at 1 row, 1.15x at 128, even at
# 256); fp16 takes 16 there, unmeasured. Without SIMD kernels, always stock (0). Weight-only int8 has no stock
# equivalent: always ours.
NEVER = 1 << 62
PREFILL_MIN_ROWS = {"w8a8": NEVER, "bf16": NEVER, "int8_weight": NEVER, "f16": NEVER, "f32": 0}


def _prefill_policy(simd_bits: int) -> dict:
    return {"w8a8": 33 if simd_bits & _VNNI else NEVER, "bf16": 9 if simd_bits & _BF16 else NEVER,
            "int8_weight": NEVER, "f16": 9 if simd_bits & _AVX512F else 16 if simd_bits & _AVX2 else 0,
            "f32": 9 if simd_bits & _AVX512F else 256 if simd_bits & _AVX2 else 0}


def _onednn_linear():
    # oneDNN's fp32 GEMM, as inductor calls it (dense weights, no prepacking); None where torch has no oneDNN.
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear()


def gemm_f32(x2, w, bias=None):
    """y = x2 @ w^T (+ b) in fp32 for many rows: oneDNN's GEMM where torch has it (on AMD EPYC Zen 4 it ran prefill
    shapes 1.3-2.6x faster than F.linear, i.e. MKL), else F.linear, also under torch.compile. See stock_gemm_f32()."""
    b = None if bias is None else bias.float()
    # Not under torch.compile: inductor lowers this op only for frozen (constant) weights, and picks its own GEMM
    # for F.linear. Not for empty dims, which oneDNN rejects.
    if (_ONEDNN_LINEAR is not None and not torch.compiler.is_compiling()
            and x2.shape[0] > 0 and w.shape[0] > 0 and w.shape[1] > 0):
        return _ONEDNN_LINEAR(x2, w, b, "none", [], "")
    return F.linear(x2, w, b)


def stock_gemm_f32() -> str:
    """The fp32 GEMM behind prefill rows: 'oneDNN' or 'F.linear'."""
    return "oneDNN" if _ONEDNN_LINEAR is not None else "F.linear"


def _load() -> tuple[bool, str]:
    global _state
    if _state is None:
        try:
            _state = _jit.load_extension("minibloom_matmul", _SOURCES)
            if _state[0]:
                _register_fakes()
                _DECODE_FNS.update({kind: getattr(torch.ops.minibloom_matmul, name).default
                                    for kind, name in _DECODE_OPS.items()})
                PREFILL_MIN_ROWS.update(_prefill_policy(torch.ops.minibloom_matmul.simd_level(2)))
                torch.ops.minibloom_matmul.simd_level(0 if os.environ.get("MINIBLOOM_FORCE_SCALAR", "0") == "1" else 2)
        except Exception as e:  # available() must never raise
            _state = (False, f"loading the minibloom_matmul kernels failed: {e}")
    return _state


def available() -> tuple[bool, str]:
    """(True, "") if the kernels are built and loaded, else (False, why). Never raises."""
    return _load()


def _ops():
    ok, reason = _load()
    if not ok:
        raise RuntimeError(f"CPU matmul kernels unavailable: {reason}. Use the reference backend instead.")
    return torch.ops.minibloom_matmul


def set_force_scalar(flag: bool) -> None:
    """Run the scalar C fallback instead of the SIMD kernels (tests, debugging)."""
    _ops().simd_level(0 if flag else 2)


def _set_simd_cap(level: int) -> str:
    """Testing hook: cap the kernel family (0 scalar, 1 AVX2, 2 all the CPU has); returns the path now in use."""
    _ops().simd_level(level)
    return simd_path()


def simd_path() -> str:
    """The kernel family in use: 'avx512' (+vnni, +bf16), 'avx2' or 'scalar'."""
    bits = _ops().simd_level(-1)
    if bits & _AVX512F:
        return "+".join(["avx512"] + [n for b, n in ((_VNNI, "vnni"), (_BF16, "bf16")) if bits & b])
    return "avx2" if bits & _AVX2 else "scalar"


def _register_fakes():
    # Shapes only, so torch.compile can trace through the ops.
    @torch.library.register_fake("minibloom_matmul::quantize_activations")
    def _(x, threshold):
        n_out = torch.library.get_ctx().new_dynamic_size()
        return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32),
                x.new_empty(n_out, dtype=torch.int32))

    @torch.library.register_fake("minibloom_matmul::tanh_gelu")
    def _(x, c, gate):
        return x.new_empty(x.numel())

    @torch.library.register_fake("minibloom_matmul::rms_norm")
    def _(x, w, eps):
        return x.new_empty(x.shape, dtype=torch.float32 if w.dtype == torch.float16 else w.dtype)

    @torch.library.register_fake("minibloom_matmul::w8a8_epilogue")
    def _(acc, s_x, w_scale, extra, bias, like):
        return acc.new_empty(acc.shape, dtype=like.dtype)

    @torch.library.register_fake("minibloom_matmul::quantize_rows")
    def _(w):
        return w.new_empty(w.shape, dtype=torch.int8), w.new_empty(w.shape[0], dtype=torch.float32)

    @torch.library.register_fake("minibloom_matmul::quantize_rows_into")
    def _(w, q, scale):
        return None

    @torch.library.register_fake("minibloom_matmul::linear_w8a8")
    def _(x, wq, w_scale, bias, threshold):
        return x.new_empty(x.shape[0], wq.shape[0])

    @torch.library.register_fake("minibloom_matmul::linear_int8_weight")
    def _(x, wq, w_scale, bias):
        return x.new_empty(x.shape[0], wq.shape[0])

    @torch.library.register_fake("minibloom_matmul::linear_bf16")
    def _(x, w, bias):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("minibloom_matmul::linear_f16")
    def _(x, w, bias):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("minibloom_matmul::linear_f32")
    def _(x, w, bias):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("minibloom_matmul::argmax_rows")
    def _(x):
        return x.new_empty(x.shape[0], dtype=torch.long)


# --- validation -----------------------------------------------------------------------------------------------

def _check_x(x, K, dtypes, fn):
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu":
        raise ValueError(f"{fn}: x must be a CPU tensor; move it with x.cpu() or use the GPU kernels")
    if x.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{fn}: x must be {names}, got {x.dtype}; convert it with x.to(...)")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{fn}: x's last dim must equal the weight's in_features K={K}, got shape {tuple(x.shape)}")
    return x.reshape(math.prod(x.shape[:-1]), K).contiguous()                     # (M, K); K = 0 too


def _check_w(w, dtype, fn, name="wq"):
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype != dtype or w.device.type != "cpu":
        raise ValueError(f"{fn}: {name} must be a 2-D {dtype} CPU tensor (N, K) in Linear layout"
                         + (", e.g. from quantize_rows(w)" if dtype == torch.int8 else ""))
    return w.contiguous()


def _check_vec(v, N, dtypes, fn, name):
    if v is None:
        return None
    if not isinstance(v, torch.Tensor) or v.shape != (N,) or v.dtype not in dtypes or v.device.type != "cpu":
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        got = (f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')} on {v.device}" if isinstance(v, torch.Tensor)
               else type(v).__name__)
        raise ValueError(f"{fn}: {name} must be a ({N},) {names} CPU tensor, got {got}")
    return v.contiguous()


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


_DECODE_OPS = {"w8a8": "linear_w8a8", "int8_weight": "linear_int8_weight", "bf16": "linear_bf16",
               "f16": "linear_f16", "f32": "linear_f32"}
_DECODE_FNS = {}  # kind -> the op's overload, resolved once the kernels load (a lookup by name cost ~0.5 us a call)


def _decode_call(kind, x, w, bias, *scale_and_extra):
    """The op's result, shaped (*x.shape[:-1], N), for a decode call; None when the full path must run.

    Decode calls the wrappers ~100 times a token, and checking every argument in Python cost 11 us a call (more
    than the matmul of a small layer). So a decode call goes straight to the op, whose own checks (matmul_op.cpp:
    dtypes, shapes, contiguity) are the safety net. Checked here: K, because viewing a wrong-K x as (-1, K) could
    succeed, and the devices, because a meta tensor among CPU ones would dispatch to the fake implementation.
    scale_and_extra: (w_scale, threshold) for W8A8, (w_scale,) for weight-only int8, () for the float kernels.
    If the op refuses, the caller's full checks run and name the mistake."""
    if not (type(x) is torch.Tensor and isinstance(w, torch.Tensor) and x.is_cpu and w.is_cpu and x.dim() >= 1
            and w.dim() == 2 and x.shape[-1] == w.shape[1] > 0 and x.is_contiguous()):
        return None
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.is_cpu):
        return None
    if scale_and_extra and not (isinstance(scale_and_extra[0], torch.Tensor) and scale_and_extra[0].is_cpu):
        return None
    op = _DECODE_FNS.get(kind) if _state is not None and _state[0] else None   # None: not loaded (yet)
    x2 = x.view(-1, w.shape[1])
    if op is None or x2.shape[0] >= PREFILL_MIN_ROWS[kind]:
        return None
    try:
        y = op(x2, w, *scale_and_extra[:1], bias, *scale_and_extra[1:])
    except (RuntimeError, TypeError):
        return None
    return y.view(*x.shape[:-1], w.shape[0])


def _args(fn, x, w, wdtype, xdtypes, bias, w_scale=None):
    """-> (x as (M, K), w, w_scale, bias), checked, with messages that name the mistake."""
    w = _check_w(w, wdtype, fn, name="wq" if wdtype == torch.int8 else "w")
    x2 = _check_x(x, w.shape[1], xdtypes, fn)
    if wdtype == torch.int8:
        if w_scale is None:
            raise ValueError(f"{fn}: w_scale is required: the per-row scales that quantize_rows returned with wq")
        w_scale = _check_vec(w_scale, w.shape[0], (torch.float32,), fn, "w_scale")
    return x2, w, w_scale, _check_vec(bias, w.shape[0], _FLOATS, fn, "bias")


# --- public API -----------------------------------------------------------------------------------------------

def _quantizable_w(w, fn):
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point() or w.device.type != "cpu":
        raise ValueError(f"{fn}: w must be a 2-D floating-point CPU tensor (N, K) in Linear layout")
    return w.contiguous() if w.dtype in _FLOATS else w.float().contiguous()  # fp32, bf16 and fp16 read as they are


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (wq int8 (N, K), scale fp32 (N,)); scale = absmax(row)/127 (zero row -> 1). Load time.
    Bit-equal to matmul_ref.quantize_rows_ref (bf16 and fp16 rows are widened exactly inside the op)."""
    return _ops().quantize_rows(_quantizable_w(w, "quantize_rows"))


def quantize_rows_into(w: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor) -> None:
    """quantize_rows writing into wq (N, K) int8 and scale (N,) fp32, e.g. row slices of a whole matrix's storage."""
    w = _quantizable_w(w, "quantize_rows_into")
    for t, dtype, shape, name in ((wq, torch.int8, tuple(w.shape), "wq"), (scale, torch.float32, (w.shape[0],),
                                                                          "scale")):
        if not (isinstance(t, torch.Tensor) and t.dtype == dtype and tuple(t.shape) == shape and t.is_cpu
                and t.is_contiguous()):
            raise ValueError(f"quantize_rows_into: {name} must be a contiguous {dtype} CPU tensor of shape {shape}")
    _ops().quantize_rows_into(w, wq, scale)


def quantize_activations(x: torch.Tensor, threshold: float = 6.0):
    """x (M, K) fp32|bf16|fp16 -> (xq int8 (M, K), s_x fp32 (M,), outlier columns int32): linear_w8a8's first step."""
    x2 = _check_x(x, x.shape[-1] if isinstance(x, torch.Tensor) else -1, _FLOATS, "quantize_activations")
    return _ops().quantize_activations(x2, float(threshold))


def linear_w8a8(x, wq, w_scale, bias=None, threshold=6.0):
    """LLM.int8() y = x @ deq(wq)^T + b: per-token int8 activations, outlier columns (|x| > threshold) in fp32."""
    if (y := _decode_call("w8a8", x, wq, bias, w_scale, float(threshold))) is not None:
        return y
    x2, wq, w_scale, bias = _args("linear_w8a8", x, wq, torch.int8, _FLOATS, bias, w_scale)
    N = wq.shape[0]
    if x2.shape[0] >= PREFILL_MIN_ROWS["w8a8"]:
        y = _w8a8_int_mm(x2, wq, w_scale, bias, float(threshold))
    else:
        y = _ops().linear_w8a8(x2, wq, w_scale, bias, float(threshold))
    return y.reshape(*x.shape[:-1], N)


def _w8a8_int_mm(x2, wq, w_scale, bias, threshold):
    # Prefill: the same quantization (our kernel), torch._int_mm for the exact int32 GEMM, then the same fp32
    # epilogue as one pass of ours (w8a8_epilogue: torch's four ops over the (M, N) product took a quarter of a
    # batch-16 prefill, MATMUL.md).
    xq, s_x, outliers = _ops().quantize_activations(x2, threshold)
    acc = torch._int_mm(xq, wq.t())                                                      # (M, N) int32
    # Compiled (a decode step of >= PREFILL_MIN_ROWS rows), the correction is always traced: a branch on the number
    # of outlier columns would depend on the data. With none it adds an (M, 0) @ (0, N) product, zeros.
    extra = None
    if torch.compiler.is_compiling() or outliers.numel():
        o = outliers.long()
        extra = x2[:, o].float() @ (wq[:, o].float() * w_scale[:, None]).t()           # (M, N) fp32
    return _ops().w8a8_epilogue(acc, s_x, w_scale, extra, bias, x2)


def linear_int8_weight(x, wq, w_scale, bias=None):
    """Weight-only int8: y = (x @ wq^T) * w_scale (+ b), x fp32|bf16|fp16, fp32 accumulation, y in x's dtype."""
    if (y := _decode_call("int8_weight", x, wq, bias, w_scale)) is not None:
        return y
    x2, wq, w_scale, bias = _args("linear_int8_weight", x, wq, torch.int8, _FLOATS, bias, w_scale)
    N = wq.shape[0]
    return _ops().linear_int8_weight(x2, wq, w_scale, bias).reshape(*x.shape[:-1], N)


def _linear_float(kind, x, w, bias, dtype, stock):
    # The float kernels' wrapper: decode rows go to the op; from PREFILL_MIN_ROWS[kind] rows on, stock(x2, w, bias)
    # computes the same thing with stock ops.
    if (y := _decode_call(kind, x, w, bias)) is not None:
        return y
    x2, w, _, bias = _args(f"linear_{kind}", x, w, dtype, (dtype,), bias)
    if x2.shape[0] >= PREFILL_MIN_ROWS[kind]:
        y = stock(x2, w, bias)
    else:
        y = getattr(_ops(), _DECODE_OPS[kind])(x2, w, bias)
    return y.reshape(*x.shape[:-1], w.shape[0])


def linear_bf16(x, w, bias=None):
    """y = x @ w^T (+ b): bf16 x and w, fp32 accumulation, bf16 out."""
    return _linear_float("bf16", x, w, bias, torch.bfloat16,
                         lambda x2, w, b: F.linear(x2, w, None if b is None else b.to(torch.bfloat16)))


def linear_f16(x, w, bias=None):
    """y = x @ w^T (+ b): fp16 x and w, fp32 accumulation, fp16 out."""
    return _linear_float("f16", x, w, bias, torch.float16, _f16_widened)


def _f16_widened(x2, w, bias):
    # Prefill: the same semantics (fp32 products and sums, one rounding to fp16) through the fp32 GEMM, on W
    # widened ~4 MB of rows at a time, so that no fp32 copy of a whole matrix is ever held.
    xf, N = x2.float(), w.shape[0]
    y = x2.new_empty(x2.shape[0], N)                                              # (M, N) fp16
    rows = max(1, (1 << 20) // max(w.shape[1], 1))
    for n0 in range(0, N, rows):
        y[:, n0:n0 + rows] = gemm_f32(xf, w[n0:n0 + rows].float(), None if bias is None else bias[n0:n0 + rows])
    return y


def linear_f32(x, w, bias=None):
    """y = x @ w^T (+ b) in fp32: our kernel for decode rows, gemm_f32 from PREFILL_MIN_ROWS["f32"] rows on."""
    return _linear_float("f32", x, w, bias, torch.float32, gemm_f32)


def tanh_gelu(x: torch.Tensor, c: float, gate: torch.Tensor | None = None) -> torch.Tensor:
    """x * 0.5 * (1 + tanh(c * x * (1 + 0.044715 x^2))) (* gate) in one pass, in fp32 per element: x (and gate)
    fp32|bf16|fp16 on the CPU, y in x's dtype, rounded once. c = 0.79788456 is BLOOM's GELU (minibloom.ops.bloom_gelu),
    c = sqrt(2/pi) with wi_1's output as the gate T5's gated gelu_new (ops.gated_gelu_new); those references round
    16-bit values after every op, as transformers does; in fp32 the two differ by the exp polynomial's ~1 ulp."""
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dtype not in _FLOATS:
        raise ValueError("tanh_gelu: x must be a float32, bfloat16 or float16 CPU tensor")
    if gate is not None and (not isinstance(gate, torch.Tensor) or gate.shape != x.shape or gate.dtype != x.dtype
                             or gate.device != x.device):
        raise ValueError("tanh_gelu: gate must be a tensor of x's shape, dtype and device")
    x = x.contiguous()
    return _ops().tanh_gelu(x, float(c), None if gate is None else gate.contiguous()).view(x.shape)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """T5's RMSNorm in one pass per row: w * round_w(x / sqrt(mean(x^2) + eps)), statistics in fp32, y in w's dtype
    (fp32 for fp16 weights, whose activations stay fp32). x (..., C) and w (C,) fp32|bf16|fp16 on the CPU. The
    reference is minibloom.ops.rms_norm, equal but for the order of the sum of squares."""
    # Called 25 times a decode step on mt0-small: a well-formed call goes straight to the op (its C++ checks guard
    # what it reads), and the checks below name the mistake when it refuses.
    if type(x) is torch.Tensor and x.is_cpu and x.dim() >= 1:
        try:
            return _ops().rms_norm(x.reshape(-1, x.shape[-1]), w, float(eps)).view(x.shape)
        except (RuntimeError, TypeError):
            pass
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dtype not in _FLOATS or x.dim() < 1:
        raise ValueError("rms_norm: x must be a float32, bfloat16 or float16 CPU tensor (..., C)")
    if (not isinstance(w, torch.Tensor) or w.device.type != "cpu" or w.dtype not in _FLOATS
            or tuple(w.shape) != (x.shape[-1],)):
        raise ValueError(f"rms_norm: w must be a float32, bfloat16 or float16 CPU tensor of shape ({x.shape[-1]},)")
    return _ops().rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), w.contiguous(), float(eps)).view(x.shape)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Greedy pick: x (..., V) fp32|bf16|fp16 logits -> (...,) int64, exactly torch.argmax(x, -1) (first maximum; a NaN
    counts as the maximum). torch's CPU argmax reads lm_head's 250,880 logits at ~2 GB/s (0.4-1 ms a token)."""
    # A decode step's (B, V) logits go straight to the op, whose C++ checks guard what it reads: after a token's
    # weight stream every line of Python runs on cold caches, and the checks below cost ~80 us a token there.
    if type(x) is torch.Tensor and x.is_cpu and x.dim() == 2:
        try:
            return _ops().argmax_rows(x)
        except RuntimeError:
            pass
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dtype not in _FLOATS:
        raise ValueError("argmax: x must be a float32, bfloat16 or float16 CPU tensor of logits (..., V); convert "
                         "it with x.float().cpu(), or use torch.argmax(x, -1) elsewhere")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"argmax: x must have a non-empty last dim (the vocabulary), got shape {tuple(x.shape)}")
    return _ops().argmax_rows(x.reshape(-1, x.shape[-1]).contiguous()).view(x.shape[:-1])
