"""`minibloom.load`: find a checkpoint, build the model for its model_type, load weights and tokenizer."""
import contextlib
import importlib
import math
import os
import time
from pathlib import Path

import torch

from . import ops
from .errors import MinibloomError
from .generate import GenerationOptions, decode_tokens
from .hub import resolve
from .loader import Checkpoint, check_loaded, dtype_name, load_tensors, parse_dtype, read_config
from .tokenizer import Tokenizer


# model_type in config.json -> the minibloom module that implements it
ARCHITECTURES = {"bloom": "bloom", "mt5": "mt5", "t5": "mt5"}


def parse_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise MinibloomError(f"invalid device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MinibloomError(f"device {device!r} requested but no CUDA GPU is available (this torch build: "
                                 f"{torch.__version__}); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MinibloomError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) present")
    elif dev.type != "cpu":
        raise MinibloomError(f"unsupported device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")
    return dev


def load(model: str | os.PathLike, *, dtype=None, device="cpu", backend: str = "auto", quantize=None,
         int8_threshold: float | None = None, compile: bool = False) -> "LM":
    """Load a BLOOM/BLOOMZ or mT5/mT0/T5 checkpoint: a folder, a Hub repo id or a family name (bloomz-560m).

    dtype: 'float32' | 'bfloat16' | 'float16' | None (the checkpoint's own dtype).
    device: 'cpu' | 'cuda' | 'cuda:N'.  backend: 'auto' | 'reference' | 'fused'.
    quantize: None | 'int8' (LLM.int8(): int8 weights and activations) | 'int8-weight' (int8 weights only).
      A folder saved by `minibloom convert --quantize` (LM.save) is int8 already: None keeps its saved mode.
    int8_threshold: LLM.int8() outlier threshold (activation columns above it are computed in float); None: 6.0,
      or the one a saved int8 folder records.
    compile: run each decode step through torch.compile (faster steps; the first one compiles, see
    ops.compile_decode).
    """
    t0 = time.perf_counter()
    dev = parse_device(device)
    want_dtype = parse_dtype(dtype)
    if backend not in ops.BACKENDS:
        raise MinibloomError(f"unknown backend {backend!r}: use one of {', '.join(ops.BACKENDS)}")
    folder = resolve(model)
    config = read_config(folder)
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise MinibloomError(f"{folder}/config.json has model_type {model_type!r}, which minibloom does not support: "
                             f"supported model types are {', '.join(sorted(ARCHITECTURES))}")
    arch = importlib.import_module(f".{ARCHITECTURES[model_type]}", __package__)
    ckpt = Checkpoint(folder)
    be = ops.get_backend(backend, dev)
    file_dtype = ckpt.float_dtype()
    dtype = want_dtype or _config_dtype(config) or file_dtype
    net = arch.build(config)
    from .quantize import Quantizer, SavedInt8, saved_quantization
    saved = saved_quantization(config, folder)
    quantizer = None
    if saved:  # int8 on disk (minibloom convert): the mode and threshold may still be chosen at load
        quantizer = SavedInt8(quantize or saved["mode"], saved["threshold"] if int8_threshold is None else
                              int8_threshold, dev)
    elif quantize is not None:
        quantizer = Quantizer(quantize, 6.0 if int8_threshold is None else int8_threshold, dev,
                              kernel=be.name == "fused" and dev.type == "cpu")
    elif int8_threshold is not None:
        raise MinibloomError("int8_threshold (--int8-threshold) applies to int8 models only: pass quantize='int8' "
                             "(--quantize int8) too, or leave it out")
    names = arch.checkpoint_names(net, ckpt)
    check_weight_memory(net, ckpt, names, dtype, dev, quantizer, folder)
    with quantizer.loading() if quantizer else contextlib.nullcontext():
        load_tensors(net, ckpt, names, arch.ignored_key, dtype, dev, quantizer)
    arch.tie(net, ckpt)
    for name, buf in list(net.named_buffers()):  # derived buffers (ALiBi slopes) follow the device
        module_name, _, attr = name.rpartition(".")
        net.get_submodule(module_name)._buffers[attr] = buf.to(dev)
    check_loaded(net)
    for m in net.modules():
        if isinstance(m, ops.Embedding):
            m.dtype = dtype
    net.eval()
    be.attach(net)
    if dev.type == "cpu":
        ops.reuse_freed_memory()
    if compile:
        net.compile_step()
    lm = LM(net, Tokenizer(folder, config), config, folder, dtype, dev)
    lm.quantize = quantizer.mode if quantizer else None
    lm.file_dtype = file_dtype
    lm.load_seconds = time.perf_counter() - t0
    return lm


def _config_dtype(config: dict):
    name = config.get("torch_dtype") or config.get("dtype")
    return parse_dtype(name) if name in ("float32", "bfloat16", "float16") else None


class LM:
    """A loaded model: `.model` (the nn.Module), `.tokenizer`, `.config` (the config.json dict)."""

    def __init__(self, model, tokenizer: Tokenizer, config: dict, folder: Path, dtype, device):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.folder, self.dtype, self.device = folder, dtype, device
        self.is_encoder_decoder = model.is_encoder_decoder
        self.load_seconds = 0.0
        self.quantize = None  # None | "int8" | "int8-weight": how the weights were loaded
        self.file_dtype = dtype  # the dtype most weights are stored in on disk

    # -- prompts -> tensors ------------------------------------------------------------------------------------------
    def encode_batch(self, prompts: list[str]):
        """Token ids (B, T) and mask (B, T). Decoder-only prompts are left-padded (the new tokens line up at the
        right); encoder inputs are right-padded (the T5 bias depends on relative positions only)."""
        if not prompts:
            raise MinibloomError("no prompt given: pass a non-empty string or list of strings")
        rows = []
        for p in prompts:
            if not isinstance(p, str):
                raise MinibloomError(f"prompts must be strings, got {type(p).__name__}")
            if not p.strip():
                raise MinibloomError("empty prompt: give the model some text to continue")
            rows.append(self.tokenizer.encode(p))
        T = max(len(r) for r in rows)
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, r in enumerate(rows):
            sl = slice(0, len(r)) if self.is_encoder_decoder else slice(T - len(r), T)
            ids[b, sl] = torch.tensor(r, dtype=torch.long)
            mask[b, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- generation --------------------------------------------------------------------------------------------------
    def generate_ids(self, input_ids, attention_mask=None, **options) -> torch.Tensor:
        """New tokens only, (B * num_return_sequences, N); rows that end early are padded with the pad id."""
        opts = GenerationOptions.from_kwargs(options)
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, opts)
        if opts.num_beams > 1:
            from .beam import beam_search
            return beam_search(self.model, input_ids, attention_mask, opts, self.tokenizer.eos_id,
                               self.tokenizer.pad_id)
        steps = list(decode_tokens(self.model, input_ids, attention_mask, opts, self.tokenizer.eos_id,
                                   self.tokenizer.pad_id, self._stop_check(opts)))
        return torch.stack(steps, dim=1)

    def generate(self, prompt_or_prompts, **options):
        """The completion (str) of a prompt, or a list of completions for a list of prompts."""
        single = isinstance(prompt_or_prompts, str)
        if not single and not isinstance(prompt_or_prompts, (list, tuple)):
            raise MinibloomError(f"generate takes a prompt (str) or a list of prompts, got "
                                 f"{type(prompt_or_prompts).__name__}")
        prompts = [prompt_or_prompts] if single else list(prompt_or_prompts)
        ids, mask = self.encode_batch(prompts)
        out = self.generate_ids(ids, mask, **options)
        stop = GenerationOptions.from_kwargs(options).stop
        texts = [_cut_at_stop(self.tokenizer.decode(row), stop) for row in out.tolist()]
        return texts[0] if single and len(texts) == 1 else texts

    def stream(self, prompt: str, **options):
        """Yield text pieces of the completion as they are generated (greedy or sampling)."""
        opts = GenerationOptions.from_kwargs(options)
        if opts.num_beams > 1:
            raise MinibloomError("streaming works with greedy decoding or sampling, not beam search: "
                                 "use num_beams=1, or generate() for beams")
        ids, mask = self.encode_batch([prompt])
        self._check_inputs(ids, mask, opts)
        decoder = self.tokenizer.streamer()
        held = ""  # text withheld because it could be the start of a stop string
        for tokens in decode_tokens(self.model, ids, mask, opts, self.tokenizer.eos_id, self.tokenizer.pad_id,
                                    self._stop_check(opts)):
            token = int(tokens[0])
            if token == self.tokenizer.eos_id:
                break
            held += decoder.put(token)
            piece, held, stopped = _split_stop(held, opts.stop)
            if piece:
                yield piece
            if stopped:
                return
        held += decoder.flush()
        piece, _, _ = _split_stop(held, opts.stop, final=True)
        if piece:
            yield piece

    def _stop_check(self, opts):
        if not opts.stop:
            return None
        def check(generated: torch.Tensor) -> torch.Tensor:
            return torch.tensor([any(s in self.tokenizer.decode(row) for s in opts.stop)
                                 for row in generated.tolist()], device=generated.device)
        return check

    def _check_inputs(self, input_ids, attention_mask, opts):
        if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape
                or input_ids.dtype not in (torch.long, torch.int32) or input_ids.is_meta):
            got = (f"a {tuple(input_ids.shape)} {input_ids.dtype} tensor on {input_ids.device}"
                   if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__)
            raise MinibloomError(f"input_ids must be a (batch, length) LongTensor with at least one row and one "
                                 f"token, got {got}")
        input_ids = input_ids.long()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else \
                type(attention_mask).__name__
            raise MinibloomError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, "
                                 f"got {got}")
        vocab = self.model.config.vocab_size
        if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
            raise MinibloomError(f"input_ids contain a token id outside the vocabulary [0, {vocab})")
        check_memory(self.model, input_ids.shape[0] * opts.num_beams, input_ids.shape[1], opts.max_new_tokens,
                     self.dtype, self.device)
        return input_ids.to(self.device), attention_mask.to(self.device)

    def save(self, folder, *, max_shard_bytes: int = 5 * 10**9, overwrite: bool = False) -> list[str]:
        """Write this model as a Hub-style folder (config.json, safetensors, tokenizer files) that `load` reads
        back: int8 weights stay int8 with their scales (no quantizing on the next load), float weights are saved
        in the loaded dtype and read by transformers too. See minibloom/convert.py."""
        from .convert import save
        return save(self, folder, max_shard_bytes=max_shard_bytes, overwrite=overwrite)

    def trace(self, prompt: str, decoder_prompt: str | None = None) -> dict:
        """Named intermediates of one forward pass: {"embeddings": ..., "h.0": ..., ..., "logits": ...}."""
        if decoder_prompt is not None and not self.is_encoder_decoder:
            raise MinibloomError("decoder_prompt is for encoder-decoder models (mT5/mT0/T5), and this model is "
                                 "decoder-only: put the whole text in the prompt")
        ids, mask = self.encode_batch([prompt])
        self.model.taps = {}
        try:
            with torch.no_grad():
                if self.is_encoder_decoder:
                    dec = torch.tensor([[self.model.config.decoder_start_token_id] +
                                        (self.tokenizer.encode(decoder_prompt)[:-1] if decoder_prompt else [])])
                    logits = self.model(ids, mask, decoder_input_ids=dec.to(self.device))
                else:
                    logits = self.model(ids, mask)
            taps = self.model.taps
            taps["logits"] = logits
            return taps
        finally:
            self.model.taps = None


def weight_bytes(net, ckpt, names, dtype, device, quantized_on_load: bool, views: bool = False) -> int:
    """Bytes the weights will take in fresh memory: tensors converted to `dtype`, quantized on load, or copied to a
    GPU. A CPU tensor kept in the file's dtype (int8 of a saved folder too) is a view of the file: no fresh memory;
    views=True counts those instead (read from the file's pages in place)."""
    from .quantize import quantizable
    fresh = mapped = 0
    for pname, keys in names.items():
        key = next((k for k in keys if k in ckpt), None)
        if key is None:
            continue  # load_tensors names it
        numel, stored = math.prod(ckpt.shape(key)), ckpt.dtype(key)
        module_name, _, attr = pname.rpartition(".")
        if quantized_on_load and quantizable(net.get_submodule(module_name), attr):
            fresh += numel + 4 * ckpt.shape(key)[0]           # int8 + one fp32 scale per row
        elif device.type != "cpu":
            fresh += numel * (dtype.itemsize if stored.is_floating_point else stored.itemsize)
        elif stored.is_floating_point and stored != dtype:
            fresh += numel * dtype.itemsize
        else:
            mapped += numel * stored.itemsize
    return mapped if views else fresh


def check_weight_memory(net, ckpt, names, dtype, device, quantizer, folder):
    """Refuse a load whose weights cannot fit, before allocating them: the kernel's OOM killer says nothing."""
    from .quantize import Quantizer
    if os.environ.get("MINIBLOOM_SKIP_MEMORY_CHECK") == "1":
        return
    need = weight_bytes(net, ckpt, names, dtype, device, isinstance(quantizer, Quantizer))
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _available_ram()
    total = _total_ram() if device.type == "cpu" else None
    mapped = weight_bytes(net, ckpt, names, dtype, device, isinstance(quantizer, Quantizer), views=True)
    if total is not None and mapped > 0 and mapped + need > total:
        int8 = weight_bytes(net, ckpt, names, dtype, device, True) + weight_bytes(
            net, ckpt, names, dtype, device, True, views=True)
        ops._say_once(f"the weights of {folder} ({_size(mapped)} read from the file in place, {_size(need)} in memory) "
                      f"exceed this machine's {_size(total)} of RAM: every token will read them from disk. In int8 "
                      f"(quantize='int8', or a minibloom convert --quantize int8 folder) they take {_size(int8)}")
    if free is None or need <= 0.95 * free:
        return
    own = ckpt.float_dtype()
    hints = []
    if device.type == "cpu" and own != dtype and own.itemsize < dtype.itemsize:
        hints.append(f"load it in the file's own dtype ({dtype_name(own)}: dtype=None, CLI --dtype "
                     f"auto), mapped from the file")
    if quantizer is None:
        int8 = weight_bytes(net, ckpt, names, dtype, device, True)
        hints.append(f"quantize it to int8 (quantize='int8', CLI --quantize int8: about {_size(int8)})")
    if isinstance(quantizer, Quantizer) and device.type == "cpu":
        hints.append("quantize it once elsewhere (minibloom convert --quantize int8) and load that folder, whose int8 "
                     "weights are mapped from the file")
    hints.append("use a smaller model")
    advice = "; or ".join(hints)
    how = dtype_name(dtype) + (f" with quantize={quantizer.mode}" if quantizer else "")
    raise MinibloomError(
        f"loading {folder} in {how} "
        f"needs {_size(need)} of {'GPU ' if device.type == 'cuda' else ''}memory for its weights, but only "
        f"{_size(free)} is available. {advice[0].upper() + advice[1:]} (MINIBLOOM_SKIP_MEMORY_CHECK=1 "
        f"skips this check)")


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_memory(model, batch: int, prompt_len: int, new_tokens: int, dtype, device):
    """Refuse a request whose KV cache cannot fit, before allocating it."""
    need = model.cache_bytes(batch, prompt_len + new_tokens, dtype)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = _available_ram()
    if free is not None and need > 0.9 * free:
        raise MinibloomError(
            f"batch {batch} x ({prompt_len} prompt + {new_tokens} new) tokens needs {need / 2**30:.1f} GiB of "
            f"KV cache, but only {free / 2**30:.1f} GiB is free: lower max_new_tokens, the batch or the prompt length")


def _meminfo(field: str):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _available_ram():
    return _meminfo("MemAvailable")


def _total_ram():
    return _meminfo("MemTotal")


def _cut_at_stop(text: str, stop) -> str:
    cuts = [text.find(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


def _split_stop(text: str, stop, final=False):
    """Split streamed text into (safe to print, held back, stopped). Text that could begin a stop string is held."""
    if not stop:
        return text, "", False
    cut = _cut_at_stop(text, stop)
    if len(cut) < len(text):
        return cut, "", True
    if final:
        return text, "", False
    hold = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[:len(text) - hold], text[len(text) - hold:], False
