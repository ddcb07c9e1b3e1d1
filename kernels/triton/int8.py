"""int8 matmuls in Triton: LLM.int8() W8A8 (arXiv 2208.07339) and weight-only int8, W in (N, K) Linear layout.

Implements the contract of kernels/matmul_ref.py (quantize_rows_ref, linear_w8a8_ref, linear_int8_weight_ref):
  quantize_rows(w)          per-row absmax int8: scale = absmax / 127, wq = round(w / scale), zero row -> scale 1
  linear_w8a8(x, wq, ...)   three kernels:
      1. column absmax over the M rows -> outlier flags (|x| > threshold somewhere in the column)
      2. per-row quantization of x with the outlier columns zeroed (the same kernel as quantize_rows)
      3. int8 x int8 -> int32 tl.dot GEMM; epilogue acc * s_x[m] * w_scale[n]; the outlier columns' float
         contribution x[:, O] @ wq[:, O]^T * w_scale is added in the same kernel, only for the K blocks that
         hold an outlier column (a branch per block, so the usual no-outlier case costs one flag load per block)
  linear_int8_weight(x, ...) the same GEMM with float x and the int8 weight converted in registers
Rounding is half-to-even on an IEEE division (x / s, never x * (1/s)), so the int8 values and the int32
accumulators are bit-identical to the torch reference; only the fp32 epilogue rounds differently.

Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (tests). int8 tl.dot is exact in the interpreter; bf16
tl.dot is not (triton-lang/triton#11584), so there bf16 activations are upcast to fp32 before the dot.
"""
import torch
import triton
import triton.language as tl

from .attention import INTERPRET, available  # noqa: F401  (available: same condition for every Triton kernel)


@triton.jit
def _round_half_even(x):
    """torch.round for |x| < 2^23: floor, then +1 above the half and at an exact half with an odd floor."""
    f = tl.floor(x)
    d = x - f                                                  # exact for |x| < 2^23
    fi = f.to(tl.int32)
    up = (d > 0.5) | ((d == 0.5) & ((fi & 1) != 0))
    return fi + up.to(tl.int32)


@triton.jit
def _outlier_columns_kernel(X, FLAGS, M, K, sxm, sxk, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """FLAGS[k] = max_m |x[m, k]| > threshold."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    colmax = tl.zeros([BLOCK_K], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        x = tl.load(X + offs_m[:, None] * sxm + offs_k[None, :] * sxk,
                    mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)   # (BLOCK_M, BLOCK_K)
        colmax = tl.maximum(colmax, tl.max(tl.abs(x.to(tl.float32)), 0))
    tl.store(FLAGS + offs_k, (colmax > threshold).to(tl.int8), mask=offs_k < K)


@triton.jit
def _quantize_rows_kernel(X, FLAGS, XQ, SCALE, K, sxm, sxk, sqm, sqk,
                          HAS_FLAGS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row m: scale = absmax / 127 over the non-outlier columns (0 -> 1); xq = round(x / scale), outliers -> 0."""
    m = tl.program_id(0)
    absmax = tl.max(tl.zeros([BLOCK_K], tl.float32), 0)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + m * sxm + offs_k * sxk, mask=offs_k < K, other=0.0).to(tl.float32)
        if HAS_FLAGS:
            x = tl.where(tl.load(FLAGS + offs_k, mask=offs_k < K, other=0) != 0, 0.0, x)
        absmax = tl.maximum(absmax, tl.max(tl.abs(x), 0))
    scale = tl.where(absmax > 0, tl.div_rn(absmax, 127.0), 1.0)   # div_rn: IEEE division, as torch computes it
    tl.store(SCALE + m, scale)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + m * sxm + offs_k * sxk, mask=offs_k < K, other=0.0).to(tl.float32)
        if HAS_FLAGS:
            x = tl.where(tl.load(FLAGS + offs_k, mask=offs_k < K, other=0) != 0, 0.0, x)
        q = _round_half_even(tl.div_rn(x, tl.zeros_like(x) + scale))
        tl.store(XQ + m * sqm + offs_k * sqk, q.to(tl.int8), mask=offs_k < K)


def _matmul_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(16, 64, 256, 4, 4), (16, 128, 128, 4, 4), (16, 32, 256, 2, 5),
                                     (32, 64, 256, 4, 4), (64, 128, 128, 4, 4), (128, 128, 128, 8, 3),
                                     (128, 256, 128, 8, 3)]]


@triton.autotune(configs=_matmul_configs(), key=["M_KEY", "N", "K", "W8A8", "OUTLIERS"])
@triton.jit
def _matmul_kernel(A, B, C, SX, WS, BIAS, XF, FLAGS, M, N, K, M_KEY,
                   sam, sak, sbn, sbk, scm, scn, sxm, sxk,
                   W8A8: tl.constexpr, OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C = A @ B^T * scales (+ bias). W8A8: A = xq int8, int32 accumulator; else A = x float, B converted."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    if W8A8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_out = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)        # sum over outlier columns of x * wq
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        a = tl.load(A + offs_m[:, None] * sam + ks[None, :] * sak, mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(B + ks[:, None] * sbk + offs_n[None, :] * sbn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0)                  # (BLOCK_K, BLOCK_N) int8
        if W8A8:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            if OUTLIERS:
                flags = tl.load(FLAGS + ks, mask=mask_k, other=0)
                if tl.max(flags, 0) != 0:     # rare: this K block holds an outlier column
                    xf = tl.load(XF + offs_m[:, None] * sxm + ks[None, :] * sxk,
                                 mask=mask_m[:, None] & (flags != 0)[None, :], other=0.0)
                    acc_out = tl.dot(xf.to(tl.float32), b.to(tl.float32), acc_out, input_precision="ieee")
        elif DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)                                       # int8 -> fp16/bf16 is exact

    ws = tl.load(WS + offs_n, mask=mask_n, other=0.0)
    if W8A8:
        sx = tl.load(SX + offs_m, mask=mask_m, other=0.0)
        y = acc.to(tl.float32) * sx[:, None] * ws[None, :]
        if OUTLIERS:
            y += acc_out * ws[None, :]
    else:
        y = acc * ws[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(C + offs_m[:, None] * scm + offs_n[None, :] * scn, y.to(C.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# --- Python wrappers ----------------------------------------------------------------------------------------------

QUANT_BLOCK_K = 1024 if not INTERPRET else 64


def _check(cond: bool, message: str):
    if not cond:
        raise ValueError(message)


def _check_device(*tensors):
    dev = tensors[0].device
    _check(INTERPRET or dev.type == "cuda",
           f"the Triton int8 kernels take CUDA tensors, got {dev} (or set TRITON_INTERPRET=1 before import)")
    _check(all(t.device == dev for t in tensors if t is not None), "all tensors must be on the same device")


def _quantize(x, flags):
    """(xq int8 (M, K), scale fp32 (M,)) of a 2-D float tensor; columns with flags != 0 quantize to 0."""
    M, K = x.shape
    xq = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0:
        _quantize_rows_kernel[(M,)](x, flags if flags is not None else xq, xq, scale, K, *x.stride(), *xq.stride(),
                                    HAS_FLAGS=flags is not None, BLOCK_K=QUANT_BLOCK_K)
    return xq, scale


def quantize_rows(w):
    """Per-row symmetric int8: (wq int8 (N, K), scale fp32 (N,)), scale = absmax / 127 (all-zero row -> 1)."""
    _check(w.dim() == 2 and w.dtype in (torch.float32, torch.float16, torch.bfloat16),
           f"quantize_rows takes a 2-D float weight (N, K), got {tuple(w.shape)} {w.dtype}")
    _check_device(w)
    return _quantize(w, None)


def _check_linear(x, wq, w_scale, bias):
    _check(x.dtype in (torch.float32, torch.float16, torch.bfloat16),
           f"x must be float32, float16 or bfloat16, got {x.dtype}")
    _check(wq.dtype == torch.int8 and wq.dim() == 2, f"wq must be int8 (N, K), got {tuple(wq.shape)} {wq.dtype}")
    _check(x.shape[-1] == wq.shape[1], f"x has {x.shape[-1]} features but wq is (N, K) = {tuple(wq.shape)}")
    _check(w_scale.shape == (wq.shape[0],), f"w_scale must be (N,) = ({wq.shape[0]},)")
    _check(bias is None or bias.shape == (wq.shape[0],), f"bias must be (N,) = ({wq.shape[0]},)")
    _check_device(x, wq, w_scale, bias)


def _gemm(a, wq, w_scale, bias, out_dtype, sx=None, xf=None, flags=None):
    M, K = a.shape
    N = wq.shape[0]
    y = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0:
        return y
    w8a8 = a.dtype == torch.int8
    xf = xf if xf is not None else a
    dummy = w_scale
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
    _matmul_kernel[grid](
        a, wq, y, sx if sx is not None else dummy, w_scale.float(), bias if bias is not None else dummy,
        xf, flags if flags is not None else a, M, N, K, min(triton.next_power_of_2(M), 256),
        *a.stride(), *wq.stride(), *y.stride(), *xf.stride(),
        W8A8=w8a8, OUTLIERS=flags is not None, HAS_BIAS=bias is not None,
        DOT_F32=not w8a8 and (a.dtype == torch.float32 or (INTERPRET and a.dtype == torch.bfloat16)))
    return y


def linear_w8a8(x, wq, w_scale, bias=None, threshold=6.0):
    """LLM.int8(): y = x @ (wq * w_scale)^T (+ bias) with x quantized per row; columns of x above `threshold`
    (in any row) stay in float. x (..., K) fp32/fp16/bf16; y has x's dtype."""
    _check_linear(x, wq, w_scale, bias)
    x2 = x.reshape(-1, x.shape[-1])                                           # (M, K)
    M, K = x2.shape
    flags = None
    if threshold > 0:
        flags = torch.empty(K, dtype=torch.int8, device=x.device)
        block_k = 64
        _outlier_columns_kernel[(triton.cdiv(K, block_k),)](x2, flags, M, K, *x2.stride(), float(threshold),
                                                           BLOCK_M=16, BLOCK_K=block_k)
    xq, sx = _quantize(x2, flags)
    y = _gemm(xq, wq, w_scale, bias, x.dtype, sx=sx, xf=x2, flags=flags)
    return y.reshape(*x.shape[:-1], -1)


def linear_int8_weight(x, wq, w_scale, bias=None):
    """Weight-only int8: y = (x @ wq^T) * w_scale (+ bias), fp32 accumulation. x (..., K); y has x's dtype."""
    _check_linear(x, wq, w_scale, bias)
    x2 = x.reshape(-1, x.shape[-1])
    return _gemm(x2, wq, w_scale, bias, x.dtype).reshape(*x.shape[:-1], -1)
