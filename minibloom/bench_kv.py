"""Attention's share of a whole decode step at a long context, against the floor of its KV-cache reads.

    python -m minibloom.bench_kv --shape bloomz-560m --context 2048 --dtype bfloat16 --repeats 8

A BLOOM model (random weights in the real shape, or --model FOLDER) prefills a prompt of `context - steps` tokens,
then decodes `steps` tokens per repeat under torch.profiler. Per step it reports the self time of the fused decode
attention (minibloom_attn::decode, all layers) and the floor: the KV bytes the step must read (24 layers x K and V,
(B, H, S, D)) at the read bandwidth measured just before and after (bench_peers.read_bandwidth, best of its
methods, huge pages included). The fused attention issue's target is <= 1.3x that floor. A benchmark, not a test.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import minibloom
from minibloom.bench_peers import build_shape, read_bandwidth


def main(argv=None) -> list[dict]:
    """Prints one line per repeat and a summary; returns the repeats (attention_s, kv_bytes, floor_s, ratio)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", help="bloomz-560m or tiny-bloom (random weights in that shape)")
    src.add_argument("--model", help="a local BLOOM checkpoint folder")
    p.add_argument("--context", type=int, default=2048, help="cache length at the last profiled step")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=2, help="decode steps per repeat")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    folder = build_shape(a.shape) if a.shape else a.model
    lm = minibloom.load(folder, dtype=a.dtype, backend="fused")
    if lm.is_encoder_decoder:
        raise SystemExit("bench_kv measures BLOOM's ALiBi decode attention: pass a BLOOM shape or folder")
    cfg = lm.model.config
    H, D, L = cfg.n_head, cfg.hidden_size // cfg.n_head, cfg.n_layer
    prompt = a.context - a.steps * a.repeats
    ids = torch.randint(5, min(1000, cfg.vocab_size), (1, prompt), generator=torch.Generator().manual_seed(0))
    elt = torch.empty((), dtype=getattr(torch, a.dtype)).element_size()
    print(f"{a.shape or a.model}, {a.dtype}, {a.threads} threads, prompt {prompt}, {a.steps} steps x {a.repeats}")
    results = []
    with torch.inference_mode():
        logits, state = lm.model.start(ids, torch.ones_like(ids), a.steps * a.repeats)
        tok = lm.model.backend.argmax(logits)
        for rep in range(a.repeats):
            before = read_bandwidth(256 << 20, a.threads, 3)["gbps"]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(a.steps):
                    tok = lm.model.backend.argmax(lm.model.step(state, tok))
            after = read_bandwidth(256 << 20, a.threads, 3)["gbps"]
            attn = [e for e in prof.key_averages() if e.key == "minibloom_attn::decode"]
            if not attn:
                raise SystemExit("no minibloom_attn::decode in the profile: the fused kernels did not run")
            step_s = attn[0].self_cpu_time_total / 1e6 / a.steps
            S = prompt + rep * a.steps + (a.steps + 1) / 2                  # mean cache length over the steps
            kv_bytes = L * 2 * H * S * D * elt
            floor_s = kv_bytes / (max(before, after) * 1e9)
            results.append({"attention_s": step_s, "kv_bytes": kv_bytes, "floor_s": floor_s, "ratio": step_s / floor_s})
            print(f"repeat {rep}: attention {step_s * 1e3:.2f} ms/step, KV {kv_bytes / 1e6:.0f} MB, floor "
                  f"{floor_s * 1e3:.2f} ms at {max(before, after):.1f} GB/s -> {step_s / floor_s:.2f}x", flush=True)
    ratios = sorted(r["ratio"] for r in results)
    print(f"attention / KV floor: median {ratios[len(ratios) // 2]:.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x "
          f"over {len(ratios)} repeats (target <= 1.3x)")
    return results


if __name__ == "__main__":
    main()
