"""Microbenchmark of the CPU attention kernels (not a test). Run: python -m minibloom.kernels.bench_attention

Decode: one token over 24 layers' worth of KV cache (bloomz-560m shape: H=16, D=64), every layer in its own
buffers, so the cache is cold (> L3) as in real decoding. Compared with the floor: the KV bytes over the read
bandwidth of torch's fp32 sum over 512 MiB, timed interleaved with ours (best of the reps each), so that a host
whose bandwidth drifts moves both alike; also SDPA with a float ALiBi mask, and a naive torch path (fp32 math).
Prefill: causal ALiBi attention over T tokens (H=16, D=64), vs SDPA with a materialised float ALiBi+causal mask.
Prints the foreign CPU load next to the numbers: on a shared machine, timings taken under load are meaningless.
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F

from .cpu import attention as A

LAYERS, H, D = 24, 16, 64
STREAM = torch.ones(128 * 2**20)  # 512 MiB fp32: its sum measures the read bandwidth


def foreign_load(seconds=0.5):
    """Fraction of all CPUs busy during `seconds` of idling here (i.e. used by other processes)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def best_ms_interleaved(fns: dict, reps: int) -> dict:
    """Best-of-reps ms of each function, the functions alternating within every repetition."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: b * 1e3 for name, b in best.items()}


def best_ms(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def read_bandwidth_gbs():
    ms = best_ms(lambda: STREAM.sum(), 5)
    return STREAM.numel() * 4 / ms / 1e6


def slopes(n):
    return torch.tensor([2 ** (-8 * (i + 1) / n) for i in range(n)], dtype=torch.float32)  # n a power of two


def bench_decode(S, dtype, reps):
    layers = [tuple(torch.randn(1, H, S, D).to(dtype) for _ in range(2)) for _ in range(LAYERS)]
    q = torch.randn(1, H, D).to(dtype)
    key_pos = torch.arange(S, dtype=torch.int32)[None]
    sl, scale = slopes(H), 1 / math.sqrt(D)
    mask = (sl[:, None] * key_pos.float())[None, :, None, :].to(dtype)  # (1, H, 1, S), built once

    def ours():
        for k, v in layers:
            A.attention_decode(q, k, v, key_pos, scale=scale, alibi_slopes=sl)

    def sdpa():
        for k, v in layers:
            F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale)

    def naive():
        for k, v in layers:
            s = torch.einsum("bhd,bhsd->bhs", q.float(), k.float()) * scale + mask[:, :, 0].float()
            torch.einsum("bhs,bhsd->bhd", torch.softmax(s, -1), v.float()).to(dtype)

    kv_bytes = LAYERS * 2 * H * S * D * layers[0][0].element_size()
    t = best_ms_interleaved({"ours": ours, "read": lambda: STREAM.sum()}, reps)
    floor = kv_bytes / (STREAM.numel() * 4 / t["read"])                          # ms at that read rate
    t.update({name: best_ms(fn, reps) for name, fn in (("sdpa", sdpa), ("naive", naive))})
    return kv_bytes, floor, t


def bench_prefill(T, dtype, reps):
    q, k, v = (torch.randn(1, H, T, D).to(dtype) for _ in range(3))
    key_pos = torch.arange(T, dtype=torch.int32)[None]
    sl, scale = slopes(H), 1 / math.sqrt(D)

    def build_mask():  # (1, H, T, T): ALiBi on the key position, -inf above the diagonal
        causal = torch.full((T, T), float("-inf")).triu(1)
        return (sl[:, None, None] * key_pos.float()[:, None, :] + causal).unsqueeze(0).to(dtype)

    mask = build_mask()
    t = {
        "ours": best_ms(lambda: A.attention_prefill(q, k, v, key_pos, scale=scale, causal=True, alibi_slopes=sl),
                        reps),
        "sdpa_mask": best_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), reps),
        "sdpa_mask_build": best_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=build_mask(),
                                                                          scale=scale), reps),
        "sdpa_causal_no_alibi": best_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                               scale=scale), reps),
    }
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtype", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    args = ap.parse_args()
    if bad := [n for n in args.dtype.split(",") if n not in ("float32", "bfloat16", "float16")]:
        ap.error(f"--dtype: unknown {', '.join(bad)}; use float32, bfloat16 or float16")
    dtypes = [getattr(torch, name) for name in args.dtype.split(",")]
    torch.set_num_threads(args.threads)
    ok, why = A.available()
    if not ok:
        raise SystemExit(f"kernels unavailable: {why}")
    print(f"threads {args.threads}, kernel path {A.simd_path()}, foreign CPU load {foreign_load():.0%}")
    bw = read_bandwidth_gbs()
    print(f"read bandwidth (torch sum, 512 MiB): {bw:.1f} GB/s\n")
    print("decode, 24 layers cold, per token (ms); floor = KV bytes at the read rate measured between our reps")
    print("| S | dtype | KV MB | floor | floor GB/s | ours | ours/floor | SDPA+mask | naive | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        for S in (512, 1024, 2048):
            kv, floor, t = bench_decode(S, dtype, args.reps)
            print(f"| {S} | {str(dtype)[6:]} | {kv / 1e6:.0f} | {floor:.2f} | {kv / floor / 1e6:.1f} | {t['ours']:.2f} | "
                  f"{t['ours'] / floor:.2f}x | {t['sdpa']:.2f} | {t['naive']:.2f} | {foreign_load(0.2):.0%} |")
    print("\nprefill, causal ALiBi, B=1 H=16 D=64 (ms)")
    print("| T | dtype | ours | SDPA+mask | SDPA+mask build | speedup vs SDPA+mask | SDPA causal, no ALiBi | load |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        for T in (512, 1024):
            t = bench_prefill(T, dtype, max(3, args.reps // 2))
            print(f"| {T} | {str(dtype)[6:]} | {t['ours']:.1f} | {t['sdpa_mask']:.1f} | {t['sdpa_mask_build']:.1f} | "
                  f"{t['sdpa_mask'] / t['ours']:.2f}x | {t['sdpa_causal_no_alibi']:.1f} | {foreign_load(0.2):.0%} |")


if __name__ == "__main__":
    main()
