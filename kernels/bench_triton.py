"""GPU benchmark of the Triton kernels against the stock alternatives (needs a CUDA GPU).

  prefill attention, ALiBi + causal, 1k-4k tokens: ours vs SDPA with a materialised (B, H, T, S) float bias,
      SDPA is_causal without ALiBi (a lower bound: the same work minus the bias), flash-attn (if importable)
  decode attention over 512-8k cached keys: ours (split-K) vs SDPA with a (B, H, 1, L) bias, flash-attn kvcache
  int8 GEMM at M = 1 and 32 on bloomz-560m / bloomz-7b1 shapes: linear_w8a8 (no outliers / 4 outlier columns),
      linear_int8_weight, vs fp16 F.linear (cuBLAS) and torch._int_mm (M > 16 only)

    python -m minibloom.kernels.bench_triton [--quick]

Times are triton.testing.do_bench medians in microseconds (hot L2 for the small GEMMs: a lower bound on what a
decode step sees). Attention inputs are fp16.
"""
import argparse
import math
import sys

import torch
import torch.nn.functional as F

MODELS = {  # name: (heads, head_dim, hidden, ffn)
    "bloomz-560m": (16, 64, 1024, 4096),
    "bloomz-7b1": (32, 128, 4096, 16384),
}


def _require_gpu():
    if not torch.cuda.is_available():
        raise SystemExit("bench_triton.py needs a CUDA GPU (torch.cuda.is_available() is False); the Triton "
                         "kernels are tested without one by tests/kernels/test_triton.py in the interpreter")


def bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3   # ms -> us


def _slopes(H, device):
    c = 2 ** math.floor(math.log2(H))
    s = [2 ** (-8 * (i + 1) / c) for i in range(c)]
    s += [2 ** (-4 * (2 * i + 1) / c) for i in range(H - c)]
    return torch.tensor(s, dtype=torch.float32, device=device)


def _flash_attn():
    try:
        import flash_attn
        return flash_attn
    except ImportError:
        return None


def bench_prefill(A, lengths, rows):
    fa = _flash_attn()
    for name, (H, D, _, _) in MODELS.items():
        for T in lengths:
            q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.float16) for _ in range(3))
            key_pos = torch.arange(T, device="cuda", dtype=torch.int32)[None]
            slopes = _slopes(H, "cuda")
            ours = bench(lambda: A.attention_prefill(q, k, v, key_pos, scale=D ** -0.5, causal=True,
                                                     alibi_slopes=slopes))
            causal = torch.ones(T, T, device="cuda", dtype=torch.bool).tril()
            bias = (slopes[:, None, None] * key_pos.float()).masked_fill(~causal, float("-inf"))[None]  # (1,H,T,T)
            sdpa_bias = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias.half()))
            sdpa_causal = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            flash = float("nan")
            if fa is not None:
                qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))             # (B, T, H, D)
                flash = bench(lambda: fa.flash_attn_func(qt, kt, vt, causal=True, alibi_slopes=slopes))
            flops = 4 * H * T * T * D / 2                                                   # causal half
            rows.append(("prefill", name, f"T={T}", ours, sdpa_bias, sdpa_causal, flash,
                         f"{flops / ours / 1e6:.0f} TFLOP/s"))


def bench_decode(A, lengths, rows, B=1):
    fa = _flash_attn()
    for name, (H, D, _, _) in MODELS.items():
        for L in lengths:
            q = torch.randn(B, H, D, device="cuda", dtype=torch.float16)
            k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.float16) for _ in range(2))
            key_pos = torch.arange(L, device="cuda", dtype=torch.int32).repeat(B, 1)
            slopes = _slopes(H, "cuda")
            ours = bench(lambda: A.attention_decode(q, k, v, key_pos, scale=D ** -0.5, alibi_slopes=slopes))
            bias = (slopes[:, None] * key_pos[:, None, :].float())[:, :, None].half()         # (B, H, 1, L)
            sdpa = bench(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=bias))
            flash = float("nan")
            if fa is not None:
                kt, vt = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()        # (B, L, H, D)
                seqlens = torch.full((B,), L, device="cuda", dtype=torch.int32)
                flash = bench(lambda: fa.flash_attn_with_kvcache(q[:, None], kt, vt, cache_seqlens=seqlens,
                                                                 alibi_slopes=slopes, causal=True))  # (B,1,H,D)
            gbs = 2 * k.numel() * k.element_size() / ours / 1e3
            rows.append(("decode", name, f"B={B} L={L}", ours, sdpa, float("nan"), flash, f"{gbs:.0f} GB/s"))


def bench_int8(I, rows):
    for name, (_, _, C, F4) in MODELS.items():
        for N, K in [(3 * C, C), (C, C), (F4, C), (C, F4)]:
            w = torch.randn(N, K, device="cuda", dtype=torch.float16)
            wq, scale = I.quantize_rows(w)
            for M in (1, 32):
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                x_out = x.clone()
                x_out[0, :4] = 20.0                                                          # 4 outlier columns
                w8a8 = bench(lambda: I.linear_w8a8(x, wq, scale))
                w8a8_out = bench(lambda: I.linear_w8a8(x_out, wq, scale))
                wonly = bench(lambda: I.linear_int8_weight(x, wq, scale))
                fp16 = bench(lambda: F.linear(x, w))
                int_mm = float("nan")
                if M > 16:
                    xq = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
                    int_mm = bench(lambda: torch._int_mm(xq, wq.t()))
                gbs = N * K / w8a8 / 1e3
                rows.append(("int8", name, f"M={M} {N}x{K}", w8a8, fp16, wonly, w8a8_out,
                             f"int8 {gbs:.0f} GB/s, _int_mm {int_mm:.1f}"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one length per benchmark")
    args = parser.parse_args()
    _require_gpu()
    from minibloom.kernels.triton import attention as A, int8 as I

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, flash-attn "
          f"{getattr(_flash_attn(), '__version__', 'not installed')}")
    rows = []
    bench_prefill(A, [1024] if args.quick else [1024, 2048, 4096], rows)
    bench_decode(A, [2048] if args.quick else [512, 2048, 8192], rows)
    bench_decode(A, [2048] if args.quick else [512, 2048, 8192], rows, B=8)
    bench_int8(I, rows)
    heads = {"prefill": ("ours", "SDPA+bias", "SDPA causal", "flash-attn"),
             "decode": ("ours", "SDPA+bias", "-", "flash-attn"),
             "int8": ("w8a8", "fp16 cuBLAS", "int8 weight-only", "w8a8 4 outliers")}
    last = None
    for kind, model, shape, *times, note in rows:
        if kind != last:
            print(f"\n| {kind} | model | shape | " + " | ".join(f"{h} (us)" for h in heads[kind]) + " | note |")
            print("|---" * 8 + "|")
            last = kind
        print(f"| {kind} | {model} | {shape} | " + " | ".join(f"{t:.1f}" for t in times) + f" | {note} |")


if __name__ == "__main__":
    sys.exit(main())
