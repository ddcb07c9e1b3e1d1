"""int8 quantization on load: LLM.int8() (arXiv 2208.07339) and weight-only int8.

Each Linear weight (out, in) becomes int8 with one fp32 scale per output row (absmax / 127) as it is read from the
safetensors file: the file's tensor is read into fresh memory, quantized and dropped, one tensor at a time, so the
full-precision model never exists in memory.

  quantize="int8"         W8A8: activations are quantized per token (row absmax) at run time, int8 x int8 products
                          accumulate in int32; activation columns whose magnitude exceeds `threshold` (6.0) are
                          "outlier features" and are multiplied in float with the dequantized weight columns.
  quantize="int8-weight"  int8 weights, float activations: the most accurate int8 mode.

The embedding is stored in int8 too (one scale per token row); a lookup dequantizes the rows it reads. BLOOM's
output head is tied to that embedding (46% of bloomz-560m's weights), so the head reuses the same int8 rows and
scales and runs through the same W8A8 path as every other Linear: one copy of the matrix, read at int8 width on
every decoded token. Its input is the final LayerNorm output, whose rare large features take the outlier path.
The semantics are written out in plain PyTorch in minibloom/kernels/matmul_ref.py; kernels are tested against it.

`minibloom convert --quantize int8` (minibloom/convert.py) saves the int8 weights with their scales
(`<name>.weight` int8 and `<name>.weight_scale` fp32) and a `quantization_config` in config.json; loading that
folder maps them from the file as they are (`SavedInt8`), with nothing to quantize.
"""
import contextlib

import torch

from . import ops
from .errors import MinibloomError

MODES = ("int8", "int8-weight")
QUANT_METHOD = "minibloom-int8"   # config.json quantization_config.quant_method of a saved int8 folder
FORMAT_VERSION = 1


def check_options(mode: str, threshold: float):
    if mode not in MODES:
        raise MinibloomError(f"unknown quantize={mode!r}: use one of {', '.join(MODES)}")
    if not threshold >= 0:
        raise MinibloomError(f"invalid int8 threshold {threshold!r}: must be >= 0 (0 disables outliers)")


def quantizable(module, attr: str) -> bool:
    """Whether quantize= stores this parameter in int8: the weight matrices of Linear and Embedding modules."""
    return (attr == "weight" and isinstance(module, (ops.Linear, ops.Embedding))
            and not getattr(module, "keep_float", False))


class Quantizer:
    """Passed to loader.load_tensors: stores int8 weights for Linear and Embedding modules."""

    def __init__(self, mode: str, threshold: float, device: torch.device, kernel: bool = False):
        """kernel: quantize with the CPU kernel (one pass, straight into the int8 matrix; bit-equal to
        matmul_ref.quantize_rows_ref, which runs otherwise)."""
        check_options(mode, threshold)
        self.mode, self.threshold, self.device = mode, float(threshold), device
        self.into = None
        if kernel and device.type == "cpu":
            from .kernels.cpu.matmul import quantize_rows_into
            self.into = quantize_rows_into
        from .kernels.matmul_ref import quantize_rows_ref
        self.quantize_rows = quantize_rows_ref

    @contextlib.contextmanager
    def loading(self):
        """Around the load: glibc raises its mmap threshold after large frees, so the float chunks we read and drop
        would be served from the heap, where they fragment around the int8 weights and stay counted in RSS. A fixed
        1 MiB threshold keeps every chunk in its own mapping, returned to the OS when freed. Afterwards `load` has
        activations reuse freed memory instead (ops.reuse_freed_memory)."""
        ops.mallopt(ops.M_MMAP_THRESHOLD, 1 << 20)
        try:
            yield
        finally:
            ops.mallopt(ops.M_MMAP_THRESHOLD, 32 << 20)   # where glibc's dynamic threshold settles on 64-bit

    def __call__(self, module, attr: str, ckpt, key: str) -> tuple:
        if not quantizable(module, attr) or not ckpt.dtype(key).is_floating_point:
            return ()  # an integer tensor where a weight belongs is then refused by the loader, by name
        N, K = ckpt.shape(key)
        wq = ops.empty_huge((N, K), torch.int8, self.device)
        scale = torch.empty(N, dtype=torch.float32, device=self.device)
        for rows, w in ckpt.row_chunks(key):  # a few MB of float rows in memory at a time
            if self.into is not None:
                self.into(w, wq[rows], scale[rows])
            else:
                q, s = self.quantize_rows(w)
                wq[rows], scale[rows] = q.to(self.device), s.to(self.device)
        if not torch.isfinite(scale).all():  # an inf weight would zero the rest of its row
            raise MinibloomError(f"tensor {key!r} in {ckpt.file_of(key)} holds infinite values: the checkpoint is "
                                 f"corrupt; re-download it")
        module._parameters["weight"] = torch.nn.Parameter(wq, requires_grad=False)
        module._buffers["weight_scale"] = scale
        module.quant = self.mode
        module.threshold = self.threshold
        return (key,)


def saved_quantization(config: dict, folder) -> dict | None:
    """{"mode", "threshold"} of a folder written by `minibloom convert --quantize`, None for a float checkpoint.
    Weights quantized by other tools (bitsandbytes, GPTQ, ...) are refused by name rather than misread."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != QUANT_METHOD:
        raise MinibloomError(
            f"{folder}/config.json: the weights are quantized with {method!r}, a format minibloom does not read. "
            f"Load the original float checkpoint (minibloom quantizes on load: quantize='int8'), or a folder written "
            f"by `minibloom convert --quantize int8`")
    if qc.get("format_version", 1) > FORMAT_VERSION:
        raise MinibloomError(f"{folder} was written by a newer minibloom (int8 format version "
                             f"{qc['format_version']}): upgrade minibloom")
    mode, threshold = qc.get("mode"), qc.get("llm_int8_threshold", 6.0)
    try:
        check_options(mode, threshold)
    except (MinibloomError, TypeError) as e:
        raise MinibloomError(f"{folder}/config.json: bad quantization_config ({e}); re-run minibloom convert") from e
    return {"mode": mode, "threshold": float(threshold)}


class SavedInt8:
    """Passed to loader.load_tensors for a folder `minibloom convert --quantize` wrote: each int8 weight and its
    scales are taken as saved (views of the file's pages on the CPU, like any tensor kept in its own dtype)."""

    def __init__(self, mode: str, threshold: float, device: torch.device):
        check_options(mode, threshold)
        self.mode, self.threshold, self.device = mode, float(threshold), device

    def loading(self):
        return contextlib.nullcontext()

    def __call__(self, module, attr: str, ckpt, key: str) -> tuple:
        if attr != "weight" or ckpt.dtype(key) != torch.int8:
            return ()  # a float tensor: loaded as usual
        scale_key = key[: -len("weight")] + "weight_scale"
        N = ckpt.shape(key)[0]
        if not isinstance(module, (ops.Linear, ops.Embedding)) or scale_key not in ckpt:
            raise MinibloomError(f"{key!r} in {ckpt.file_of(key)} is int8 but {scale_key!r} is missing: the folder "
                                 f"is incomplete; run minibloom convert again")
        if ckpt.shape(scale_key) != (N,) or ckpt.dtype(scale_key) != torch.float32:
            raise MinibloomError(f"{scale_key!r} in {ckpt.file_of(scale_key)} has shape {list(ckpt.shape(scale_key))} "
                                 f"and dtype {ckpt.dtype(scale_key)}, expected [{N}] float32: run minibloom convert "
                                 f"again")
        module._parameters["weight"] = torch.nn.Parameter(ckpt.tensor(key, None, self.device), requires_grad=False)
        module._buffers["weight_scale"] = ckpt.tensor(scale_key, None, self.device)
        module.quant, module.threshold = self.mode, self.threshold
        return (key, scale_key)
