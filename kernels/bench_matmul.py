"""Cold-weight microbenchmark of the CPU matmul kernels on bloomz-560m shapes (not a test).

One "token" runs the 24 layers' qkv (3072x1024), dense (1024x1024), fc1 (4096x1024) and fc2 (1024x4096)
with 24 DISTINCT weight sets, then lm_head (250880x1024): ~560 M weights, far more than the 32 MiB L3, so the
weights come from DRAM as in real decoding (one hot layer would sit in L3 and overstate speed 2-3x).
Reports the median over repeats, per variant, and the floor = weight bytes / measured read bandwidth.

    python -m minibloom.kernels.bench_matmul                  # decode, M=1
    python -m minibloom.kernels.bench_matmul --rows 8         # batched decode
    python -m minibloom.kernels.bench_matmul --prefill 128    # prefill, 24 layers without lm_head
    python -m minibloom.kernels.bench_matmul --crossover      # one fc1 layer, M sweep: where stock ops win
    python -m minibloom.kernels.bench_matmul --rows 12 --ours-at-any-rows   # our kernels past PREFILL_MIN_ROWS
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from .cpu import matmul as mm

LAYER_SHAPES = [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)]  # (N, K): qkv, dense, fc1, fc2
LM_HEAD = (250880, 1024)


def _shapes(n_layers, lm_head):
    return [s for _ in range(n_layers) for s in LAYER_SHAPES] + ([LM_HEAD] if lm_head else [])


def read_bandwidth(reps=5):
    """GB/s of torch's fp32 sum over 512 MiB (a lower bound on what a streaming kernel can read)."""
    t = torch.ones(128 << 20)
    best = min(_timed(lambda: t.sum()) for _ in range(reps))
    return t.numel() * 4 / best / 1e9


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _x(M, K, dtype, outliers):
    x = torch.randn(M, K) * 0.5
    if outliers:                                         # 4 LLM.int8()-style outlier features
        x[:, [3, 100, 501, 900]] = 8.0
    return x.to(dtype)


def _int_mm_linear(x, wq, ws):
    # Stock int8 GEMM with per-token quantization in torch ops (no outliers).
    s = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    xq = torch.round(x / s).to(torch.int8)
    return torch._int_mm(xq, wq.t()).float() * s * ws


def variants():
    """name -> (make_weights(w fp32 (N, K)) -> state, run(x, state), x dtype, outliers in x)."""
    def q(w):
        return mm.quantize_rows(w)

    def fbgemm(w):
        s = w.abs().amax(dim=1) / 127
        qw = torch.quantize_per_channel(w, s.double(), torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(qw, None)

    return {
        "fp32 F.linear": (lambda w: w, lambda x, w: F.linear(x, w), torch.float32, False),
        "ours fp32": (lambda w: w, lambda x, w: mm.linear_f32(x, w), torch.float32, False),
        "fp32 gemm_f32 (oneDNN)": (lambda w: w, lambda x, w: mm.gemm_f32(x.reshape(-1, x.shape[-1]), w), torch.float32,
                                   False),
        "bf16 F.linear": (lambda w: w.bfloat16(), lambda x, w: F.linear(x, w), torch.bfloat16, False),
        "ours bf16": (lambda w: w.bfloat16(), lambda x, w: mm.linear_bf16(x, w), torch.bfloat16, False),
        "fp16 F.linear": (lambda w: w.half(), lambda x, w: F.linear(x, w), torch.float16, False),
        "ours fp16": (lambda w: w.half(), lambda x, w: mm.linear_f16(x, w), torch.float16, False),
        "fp16 widened, gemm_f32": (lambda w: w.half(), lambda x, w: mm._f16_widened(x.reshape(-1, x.shape[-1]), w,
                                                                                      None), torch.float16, False),
        "torch._int_mm (+torch quant)": (q, lambda x, s: _int_mm_linear(x, *s), torch.float32, False),
        "fbgemm dynamic int8": (fbgemm, lambda x, p: torch.ops.quantized.linear_dynamic(x, p), torch.float32, False),
        "ours W8A8, no outliers": (q, lambda x, s: mm.linear_w8a8(x, *s, threshold=6.0), torch.float32, False),
        "ours W8A8, 4 outlier cols": (q, lambda x, s: mm.linear_w8a8(x, *s, threshold=6.0), torch.float32, True),
        "ours W8A8 via _int_mm": (q, lambda x, s: mm._w8a8_int_mm(x, *s, None, 6.0), torch.float32, True),
        "ours weight-only int8, fp32 x": (q, lambda x, s: mm.linear_int8_weight(x, *s), torch.float32, False),
        "ours weight-only int8, bf16 x": (q, lambda x, s: mm.linear_int8_weight(x, *s), torch.bfloat16, False),
    }


def bench(names, M, n_layers, lm_head, reps):
    shapes = _shapes(n_layers, lm_head)
    results = {}
    for name in names:
        make, run, dtype, outliers = variants()[name]
        g = torch.Generator().manual_seed(0)
        states = [make(torch.randn(N, K, generator=g) * 0.02) for N, K in shapes]
        xs = {K: _x(M, K, dtype, outliers) for K in (1024, 4096)}
        layer_t, head_t = [], []
        for r in range(reps + 1):                        # first pass warms up (page faults, JIT)
            t0 = time.perf_counter()
            for (N, K), st in zip(shapes[:4 * n_layers], states):
                run(xs[K], st)
            t1 = time.perf_counter()
            if lm_head:
                run(xs[1024], states[-1])
            t2 = time.perf_counter()
            if r:
                layer_t.append(t1 - t0)
                head_t.append(t2 - t1)
        results[name] = (statistics.median(layer_t) * 1e3, statistics.median(head_t) * 1e3)
        tot = sum(results[name])
        print(f"{name:32s} layers {results[name][0]:8.2f} ms  lm_head {results[name][1]:8.2f} ms  "
              f"total {tot:8.2f} ms", flush=True)
        del states
    return results


def crossover(rows=(1, 4, 8, 16, 32, 64, 128), N=4096, K=1024, reps=15, only=()):
    """Best-of-reps time of each kernel vs the stock op with the same semantics, one (hot) layer, per M.

    Interleaved and best-of so that a contended machine biases both sides alike: the measurement behind
    matmul.PREFILL_MIN_ROWS."""
    w = torch.randn(N, K) * 0.02
    wq, ws = mm.quantize_rows(w)
    wb, wh = w.bfloat16(), w.half()
    pairs = {
        "w8a8": (lambda x: mm._ops().linear_w8a8(x, wq, ws, None, 6.0), lambda x: mm._w8a8_int_mm(x, wq, ws, None, 6.0),
                 torch.float32),
        "bf16": (lambda x: mm._ops().linear_bf16(x, wb, None), lambda x: F.linear(x, wb), torch.bfloat16),
        "f32": (lambda x: mm._ops().linear_f32(x, w, None), lambda x: mm.gemm_f32(x, w), torch.float32),
        "f16": (lambda x: mm._ops().linear_f16(x, wh, None), lambda x: mm._f16_widened(x, wh, None), torch.float16),
    }
    for name, (ours, stock, dtype) in pairs.items():
        if only and name not in only:
            continue
        for M in rows:
            x = _x(M, K, dtype, outliers=False)
            t_ours, t_stock = [], []
            for _ in range(reps):
                t_ours.append(_timed(lambda: ours(x)))
                t_stock.append(_timed(lambda: stock(x)))
            a, b = min(t_ours) * 1e3, min(t_stock) * 1e3
            print(f"{name} M={M:4d}: ours {a:8.3f} ms  stock {b:8.3f} ms  ({'ours' if a <= b else 'stock'} faster)",
                  flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1, help="rows of x (batched decode)")
    p.add_argument("--prefill", type=int, default=0, help="M for a prefill run (24 layers, no lm_head)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated substrings of variant names")
    p.add_argument("--crossover", action="store_true", help="M sweep on one layer, ours vs stock")
    p.add_argument("--ours-at-any-rows", action="store_true",
                   help="our kernels at every M (PREFILL_MIN_ROWS off), to measure where stock ops should take over")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ok, reason = mm.available()
    if not ok:
        raise SystemExit(f"kernels unavailable: {reason}")
    if a.ours_at_any_rows:
        mm.PREFILL_MIN_ROWS.update(dict.fromkeys(mm.PREFILL_MIN_ROWS, mm.NEVER))
    if a.crossover:
        return crossover(only=tuple(a.only.split(",")) if a.only else ())
    names = [n for n in variants() if not a.only or any(s in n for s in a.only.split(","))]
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    bw = read_bandwidth()
    print(f"threads {torch.get_num_threads()}, simd {mm.simd_path()}, loadavg {load}, torch-sum read {bw:.1f} GB/s")
    M = a.prefill or a.rows
    lm_head = not a.prefill
    n_w = sum(N * K for N, K in _shapes(24, lm_head))
    print(f"M={M}, {'24 layers + lm_head' if lm_head else '24 layers'}: {n_w / 1e6:.1f} M weights; floor at "
          f"{bw:.1f} GB/s: int8 {n_w / bw / 1e6:.2f} ms, bf16/fp16 {2 * n_w / bw / 1e6:.2f} ms, "
          f"fp32 {4 * n_w / bw / 1e6:.2f} ms")
    bench(names, M, 24, lm_head, a.reps)


if __name__ == "__main__":
    main()
