"""The worker side of `minibloom bench`: every measurement runs here, in a fresh process, one engine at a time.

bench.spawn() runs main([SPEC.json]) (SPEC["task"]: "prepare" | "floor" | "run"; the result goes to SPEC["out"]).
This file is loaded by path, not as part of the package, and imports nothing at module level: `import minibloom`
brings in torch, and a CTranslate2 process that paid for a torch import would report a flattered-down load time.

prepare  builds the --shape checkpoint (once, cached) and converts it for CTranslate2 (once per quantization, cached).
floor    measures the machine's read bandwidth: a streaming reduction over a buffer far larger than L3, best of N.
run      loads one engine at one precision (timed from the moment the parent spawned this process), then for every
         batch size: one warm-up generation (not counted), one timed generation, the peak RSS so far.

Every engine gets the same prompt ids, the same thread count and exactly new_tokens greedy tokens per row.
"""
import json
import os
import resource
import sys
import time
from pathlib import Path

WARMUP_TOKENS = 4


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _torch_threads(threads: int):
    import torch
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set: interop threads can only be set before the first parallel op
        pass
    return torch


# -- the floor ---------------------------------------------------------------------------------------------------------

def read_bandwidth(nbytes: int, threads: int, repeats: int, device: str = "cpu") -> dict:
    """Best-of-`repeats` read bandwidth (GB/s) of whole-buffer reductions, as torch does them on `device`.

    Several reductions are tried because torch reads faster with some (fp64 / int64 sums) than others on the same
    memory; the best one is the floor. On the CPU each also reads a buffer in huge pages, as minibloom allocates
    its weights and KV cache (ops.empty_huge): that reads faster, and a floor must be the fastest read the machine
    does. The buffers are filled first so every page is really backed by memory."""
    torch = _torch_threads(threads)
    n = nbytes // 8
    buffers = {"": lambda: torch.ones(n, dtype=torch.float64, device=device)}   # built one at a time
    if not device.startswith("cuda"):
        from minibloom import ops
        buffers[", huge pages"] = lambda: ops.empty_huge((n,), torch.float64, device).fill_(1.0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    by_method = {}
    for pages, make in buffers.items():
        x = make()
        for dtype in (torch.float64, torch.float32, torch.int64):
            view = x.view(dtype)
            view.sum()  # warm-up
            best = float("inf")
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                view.sum()
                sync()
                best = min(best, time.perf_counter() - t0)
            by_method[f"torch.sum {str(dtype).removeprefix('torch.')}{pages}"] = n * 8 / best / 1e9
        del x, view
    method = max(by_method, key=by_method.get)
    return {"gbps": by_method[method], "method": method, "by_method": by_method, "bytes": n * 8}

# -- engines: load(spec) -> info; generate(ids, n) -> {"ttft_s", "decode_s", "tokens"} ------------------------------------

class _Clock:
    """Timestamps of the steps of one generation: t[0] the call, t[i] when token i (1-based) exists."""

    def __init__(self, sync=lambda: None):
        self.sync, self.t = sync, []

    def mark(self):
        self.sync()
        self.t.append(time.perf_counter())

    def figures(self, n: int, tokens) -> dict:
        if len(self.t) != n + 1:
            raise RuntimeError(f"expected {n} generated tokens, the engine reported {len(self.t) - 1}")
        return {"ttft_s": self.t[1] - self.t[0], "decode_s": (self.t[-1] - self.t[1]) / max(n - 1, 1),
                "tokens": tokens}


class MinibloomEngine:
    def load(self, spec):
        torch = _torch_threads(spec["threads"])
        import minibloom
        self.torch = torch
        self.lm = minibloom.load(spec["folder"], dtype=spec["dtype"], device=spec["device"], backend=spec["backend"],
                                 quantize=spec["quantize"], int8_threshold=spec["int8_threshold"],
                                 compile=spec.get("compile", False))
        self.sync = torch.cuda.synchronize if spec["device"].startswith("cuda") else (lambda: None)
        return {"backend": self.lm.model.backend.name + (" + compile" if spec.get("compile") else ""), "version": minibloom.__version__ if hasattr(
            minibloom, "__version__") else "", "torch": torch.__version__}

    def generate(self, ids, n):
        torch, model = self.torch, self.lm.model
        x = torch.tensor(ids, device=self.lm.device)                       # (B, T)
        clock = _Clock(self.sync)
        with torch.inference_mode():
            clock.mark()
            logits, state = model.start(x, torch.ones_like(x), n)          # prefill: (B, V) last-position logits
            tok = model.backend.argmax(logits)                              # (B,) greedy, as generate
            clock.mark()
            out = [tok]
            for _ in range(n - 1):
                tok = model.backend.argmax(model.step(state, tok))
                out.append(tok)
                clock.mark()
        return clock.figures(n, torch.stack(out, 1)[0, :16].tolist())


class TransformersEngine:
    """transformers as its users run it: from_pretrained, eager attention, model.generate (greedy), same dtype."""

    def load(self, spec):
        torch = _torch_threads(spec["threads"])
        import transformers
        self.torch = torch
        config = json.loads((Path(spec["folder"]) / "config.json").read_text())
        cls = (transformers.AutoModelForSeq2SeqLM if config.get("model_type") in ("t5", "mt5")
               else transformers.AutoModelForCausalLM)
        self.model = cls.from_pretrained(spec["folder"], dtype=getattr(torch, spec["dtype"]),
                                         attn_implementation="eager").to(spec["device"]).eval()
        self.device = spec["device"]
        self.sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        self.pad = config.get("pad_token_id") or 0
        return {"version": transformers.__version__, "torch": torch.__version__}

    def generate(self, ids, n):
        torch = self.torch
        x = torch.tensor(ids, device=self.device)
        clock = _Clock(self.sync)

        class Streamer:  # generate() calls put() once with the prompt (or decoder start), then once per new token
            def put(self, value):
                clock.mark()

            def end(self):
                pass

        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=self.pad,
                                      streamer=Streamer())
        clock.t[0] = t0  # the clock starts at the call, not at the first put()
        new = out[0, -n:] if not self.model.config.is_encoder_decoder else out[0, 1:]
        return clock.figures(n, new[:16].tolist())


class CTranslate2Engine:
    """CTranslate2 with its own converted model; a step callback timestamps every generated token."""

    def load(self, spec):
        import ctranslate2
        folder = Path(spec["ct2_folder"])
        self.seq2seq = (folder / "shared_vocabulary.json").exists() or (folder / "source_vocabulary.json").exists()
        cls = ctranslate2.Translator if self.seq2seq else ctranslate2.Generator
        self.model = cls(str(folder), device=spec["device"].split(":")[0], compute_type=spec["compute_type"],
                         intra_threads=spec["threads"], inter_threads=1)
        vocab_file = next(folder / f for f in ("vocabulary.json", "shared_vocabulary.json", "source_vocabulary.json")
                          if (folder / f).exists())
        self.vocab = json.loads(vocab_file.read_text())
        return {"version": ctranslate2.__version__, "compute_type": self.model.compute_type}

    def generate(self, ids, n):
        tokens = [[self.vocab[i] for i in row] for row in ids]
        clock = _Clock()
        steps_seen = set()

        def on_step(step):  # called once per (step, batch row); the first row's call marks the step
            if step.step not in steps_seen:
                steps_seen.add(step.step)
                clock.mark()
            return False

        clock.mark()
        if self.seq2seq:
            res = self.model.translate_batch(tokens, beam_size=1, max_decoding_length=n, min_decoding_length=n,
                                             max_input_length=0, callback=on_step)
            out = res[0].hypotheses[0]
            out = [self.vocab.index(t) for t in out[:16]]
        else:
            res = self.model.generate_batch(tokens, beam_size=1, max_length=n, min_length=n,
                                            include_prompt_in_result=False, callback=on_step)
            out = res[0].sequences_ids[0][:16]
        return clock.figures(n, out)


ENGINE_CLASSES = {"minibloom": MinibloomEngine, "transformers": TransformersEngine, "ctranslate2": CTranslate2Engine}


# -- tasks -------------------------------------------------------------------------------------------------------------

def task_run(spec) -> dict:
    engine = ENGINE_CLASSES[spec["engine"]]()
    t_load = time.perf_counter()
    info = engine.load(spec)
    result = {"info": info, "load_s": time.time() - spec["t_spawn"], "load_call_s": time.perf_counter() - t_load,
              "batches": []}
    for b in spec["batches"]:
        ids, n = b["ids"], b["new_tokens"]
        engine.generate(ids, min(WARMUP_TOKENS, n))  # warm-up: allocator, thread pools, lazy inits
        fig = engine.generate(ids, n)
        B, T = len(ids), len(ids[0])
        fig.update(batch=B, prompt_tokens=T, new_tokens=n, prefill_tok_s=B * T / fig["ttft_s"],
                   peak_rss_bytes=peak_rss_bytes())
        if spec["device"].startswith("cuda") and spec["engine"] != "ctranslate2":
            fig["peak_gpu_bytes"] = engine.torch.cuda.max_memory_allocated()
        result["batches"].append(fig)
    return result


def task_floor(spec) -> dict:
    return read_bandwidth(spec["bytes"], spec["threads"], spec["repeats"], spec["device"])


def task_prepare(spec) -> dict:
    """Resolve the model folder (building a --shape checkpoint), the device, and the CTranslate2 conversions."""
    import torch
    device = spec["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.get("shape"):
        folder = build_shape(spec["shape"])
    else:
        from minibloom.hub import resolve
        folder = resolve(spec["model"])
    out = {"folder": str(folder), "device": device, "ct2": {}, "ct2_compute_types": [], "ct2_error": None,
           "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else None}
    if spec.get("minibloom_int8"):
        out["int8_folder"] = str(convert_minibloom(Path(folder)))
    if spec["ct2_quantizations"]:
        try:
            import ctranslate2
            ct2_device = device.split(":")[0]
            if ct2_device == "cuda" and ctranslate2.get_cuda_device_count() == 0:
                raise RuntimeError("this ctranslate2 build has no CUDA support")
            out["ct2_compute_types"] = sorted(ctranslate2.get_supported_compute_types(ct2_device))
            for q in spec["ct2_quantizations"]:  # only what this device can run
                if any(c == q or c.startswith(q + "_") for c in out["ct2_compute_types"]):
                    out["ct2"][q] = str(convert_ct2(Path(folder), q))
        except Exception as e:  # a peer that cannot run is reported, not fatal
            out["ct2_error"] = f"{type(e).__name__}: {e}"
    return out


SHAPES = {  # --shape name -> (builder in minibloom.checkpoints, shape constant, file dtype as on the Hub)
    "bloomz-560m": ("bloom_checkpoint", "BLOOMZ_560M", "float16"),
    "bloomz-1b7": ("bloom_checkpoint", "BLOOMZ_1B7", "float16"),
    "bloomz-3b": ("bloom_checkpoint", "BLOOMZ_3B", "float16"),
    "mt0-small": ("mt5_checkpoint", "MT0_SMALL", "float32"),
    "mt0-base": ("mt5_checkpoint", "MT0_BASE", "float32"),
    "tiny-bloom": ("bloom_checkpoint", "TINY_BLOOM", "float32"),
    "tiny-mt5": ("mt5_checkpoint", "TINY_MT5", "float32"),
}


def build_shape(name: str) -> Path:
    import torch
    from minibloom import checkpoints
    from minibloom.errors import MinibloomError
    builder, shape, dtype = SHAPES[name]
    if not hasattr(checkpoints, builder) or not hasattr(checkpoints, shape):
        raise MinibloomError(f"--shape {name} needs minibloom.checkpoints.{builder} and {shape}, which this "
                             f"version does not have: pass --model FOLDER instead")
    return getattr(checkpoints, builder)(getattr(checkpoints, shape), dtype=getattr(torch, dtype))


def convert_minibloom(folder: Path) -> Path:
    """`minibloom convert --quantize int8` of the checkpoint, once (the same int8 weights serve both int8 modes)."""
    import minibloom
    from minibloom.checkpoints import CACHE
    stat = (folder / "config.json").stat()
    out = CACHE / "minibloom-int8" / f"{folder.name}-{int(stat.st_mtime)}"
    if (out / ".done").exists():
        return out
    minibloom.load(folder, quantize="int8").save(out, overwrite=True)
    (out / ".done").touch()
    return out


def convert_ct2(folder: Path, quantization: str) -> Path:
    """Convert with CTranslate2's own TransformersConverter, once per (checkpoint, quantization)."""
    from minibloom.checkpoints import CACHE
    stat = (folder / "config.json").stat()
    out = CACHE / "ct2" / f"{folder.name}-{int(stat.st_mtime)}-{quantization}"
    if (out / ".done").exists():
        return out
    from ctranslate2.converters import TransformersConverter

    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]

    class Converter(TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return PaddedVocab(super().load_tokenizer(tokenizer_class, model_name_or_path, **kwargs), vocab_size)

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    Converter(str(folder), low_cpu_mem_usage=True).convert(str(tmp), quantization=quantization, force=True)
    (tmp / ".done").touch()
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    return out


class PaddedVocab:
    """A tokenizer whose get_vocab() has exactly vocab_size entries, one per embedding row.

    CTranslate2 maps token strings to rows through this list. The checkpoints' tokenizers are smaller than their
    embeddings (BLOOM: 250680 tokens, 250880 rows), and the converters' own padding reuses "<extra_id_N>" names that
    mT5 vocabularies already contain, which would give two rows one name. Unique names avoid both problems."""

    def __init__(self, tokenizer, vocab_size: int):
        self._tok, self._size = tokenizer, vocab_size

    def get_vocab(self) -> dict:
        vocab = {t: i for t, i in self._tok.get_vocab().items() if i < self._size}
        taken = set(vocab.values())
        vocab.update({f"<ct2_pad_{i}>": i for i in range(self._size) if i not in taken})
        return vocab

    def __getattr__(self, name):
        return getattr(self._tok, name)


TASKS = {"run": task_run, "floor": task_floor, "prepare": task_prepare}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    try:
        result = TASKS[spec["task"]](spec)
    except Exception as e:
        if type(e).__name__ != "MinibloomError":
            raise
        print(f"minibloom: error: {e}", file=sys.stderr)
        return 2
    Path(spec["out"]).write_text(json.dumps(result))
    return 0
