"""The math that has a fused counterpart, in plain PyTorch, and the one switch that picks kernels.

Every model calls attention and linear layers through a `Backend`:
  - `Reference`: plain PyTorch, op for op what transformers computes (bit-exact on CPU; see tests/).
  - `Fused`: the kernels in minibloom.kernels (C/AVX-512 on CPU, Triton on CUDA), checked against the reference.
`backend="auto"` takes the kernels when they build and falls back to the reference, saying so once.

Conventions shared with the kernels (kernels/attention_ref.py is their executable spec):
  q: (B, H, T, D); k, v: (B, H, S, D) (views of a preallocated cache are fine)
  key_pos: (B, S) int — the position of each key (BLOOM: from the attention mask's cumsum; T5: its index),
           -1 for a masked (padding) key
  causal: query t sees key j only if j <= t + q_offset
"""
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import MinibloomError

BACKENDS = ("auto", "reference", "fused")


# --- ALiBi (BLOOM) ------------------------------------------------------------------------------------------------

def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head ALiBi slopes, (H,) fp32, computed as transformers does (fp32 torch.pow) for bit-exactness.

    For a power of two n: 2^(-8/n), 2^(-16/n), ... For other n (bloom-176B has 112 heads): the slopes of the
    closest lower power of two c, then the odd powers of 2^(-4/c) (every other slope of the 2c-head model).
    """
    c = 2 ** math.floor(math.log2(n_head))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(c) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + c, dtype=torch.int32))
    if c != n_head:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * c) - 3))), dtype=torch.float32)
        r = min(c, n_head - c)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 2 * r, 2, dtype=torch.int32))])
    return slopes


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 0/1 attention mask -> (B, S) key positions: 0, 1, 2, ... over the real tokens, -1 on padding.

    Left padding therefore does not shift positions: every row gets the positions it has when run alone.
    """
    mask = mask.long()
    return torch.where(mask.bool(), mask.cumsum(-1) - 1, -1)


def causal_mask(key_pos: torch.Tensor, T: int, q_offset: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, T, S): 0 where query t may see key j (causal and not padding), finfo.min elsewhere."""
    S = key_pos.shape[1]
    j = torch.arange(S, device=key_pos.device)
    t = torch.arange(T, device=key_pos.device)[:, None] + q_offset
    allowed = (j[None, :] <= t)[None, None] & (key_pos >= 0)[:, None, None, :]  # (B, 1, T, S)
    return torch.zeros(allowed.shape, dtype=dtype, device=key_pos.device).masked_fill(~allowed, torch.finfo(dtype).min)


def alibi_attention_ref(q, k, v, key_pos, slopes, q_offset: int) -> torch.Tensor:
    """Causal attention with ALiBi, exactly as transformers' BloomAttention computes it.

    scores = alibi + (q . k) / sqrt(D) in ONE baddbmm (beta=1, alpha=1/sqrt(D)): the bias is not scaled,
    and a separate matmul + add rounds differently in bf16. The bias depends on the key position only
    (slope * pos_j, no -i term): softmax is shift-invariant per query row.
    """
    B, H, T, D = q.shape
    S = k.shape[2]
    pos = key_pos.clamp(min=0)                                                   # padding keys are masked below
    alibi = (slopes.to(q.device)[None, :, None] * pos[:, None, :]).reshape(B * H, 1, S).to(q.dtype)  # cast after *
    scores = alibi.baddbmm(q.reshape(B * H, T, D), k.reshape(B * H, S, D).transpose(1, 2),
                           beta=1.0, alpha=1.0 / math.sqrt(D))                   # (B*H, T, S)
    scores = scores.view(B, H, T, S) + causal_mask(key_pos, T, q_offset, q.dtype)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)           # softmax in fp32
    return torch.bmm(probs.view(B * H, T, S), v.reshape(B * H, S, D)).view(B, H, T, D)


# The references materialize (B, H, T, S) scores: a 14k-token prompt needed 12 GB. Above this many bytes of fp32
# scores the queries go in chunks, each seeing every key; a query's output does not depend on the other queries.
REF_SCORES_BYTES = 256 << 20


def in_query_chunks(attend, q, S: int, q_offset: int) -> torch.Tensor:
    """attend(q_chunk, its q_offset) -> (B, H, T_chunk, D), over chunks of q's T queries, concatenated."""
    B, H, T, _ = q.shape
    if T == 1:                                    # a decode step (also keeps a compiled step free of guards on S)
        return attend(q, q_offset)
    rows = max(1, REF_SCORES_BYTES // max(1, B * H * S * 4))
    if rows >= T:
        return attend(q, q_offset)
    return torch.cat([attend(q[:, :, t:t + rows], q_offset + t) for t in range(0, T, rows)], dim=2)


# --- T5 relative position bias ------------------------------------------------------------------------------------

def t5_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Relative position (key - query) -> bucket, as Mesh TensorFlow and transformers define it.

    Half of the buckets (per direction) are exact distances 0..max_exact-1; the rest grow logarithmically up to
    max_distance, beyond which everything shares the last bucket. The log is fp32, as in transformers.
    """
    bucket = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.min(rel, torch.zeros_like(rel))
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return bucket + torch.where(rel < max_exact, rel, large)


@dataclass
class T5Bias:
    """The relative position bias of one T5 stack: block 0's table, shared by every layer of the stack."""
    table: torch.Tensor          # (num_buckets, H): relative_attention_bias.weight
    bidirectional: bool          # encoder: True; decoder self-attention: False
    max_distance: int

    def dense(self, T: int, S: int, q_offset: int) -> torch.Tensor:
        """(1, H, T, S) bias for queries q_offset..q_offset+T-1 against keys 0..S-1 (transformers' compute_bias)."""
        key = (T, S, q_offset)
        if getattr(self, "_key", None) != key:  # computed once per forward, reused by every layer
            query_pos = torch.arange(T, device=self.table.device)[:, None] + q_offset
            rel = torch.arange(S, device=self.table.device)[None, :] - query_pos
            buckets = t5_bucket(rel, self.bidirectional, self.table.shape[0], self.max_distance)
            self._key, self._dense = key, F.embedding(buckets, self.table).permute(2, 0, 1).unsqueeze(0)
        return self._dense


def t5_attention_ref(q, k, v, key_pos, bias: T5Bias | None, causal: bool, q_offset: int) -> torch.Tensor:
    """T5 attention as transformers' eager path computes it: no 1/sqrt(D) scaling (folded into the init),
    scores + position bias + additive mask, softmax in the activation dtype (CPU upcasts internally)."""
    B, H, T, D = q.shape
    S = k.shape[2]
    scores = torch.matmul(q, k.transpose(2, 3))                                  # (B, H, T, S)
    if bias is not None:
        scores = scores + bias.dense(T, S, q_offset).to(scores.dtype)
    if causal:
        mask = causal_mask(key_pos, T, q_offset, q.dtype)
    else:
        mask = torch.zeros(key_pos.shape, dtype=q.dtype, device=q.device).masked_fill(
            key_pos < 0, torch.finfo(q.dtype).min)[:, None, None, :]            # (B, 1, 1, S)
    probs = F.softmax(scores + mask, dim=-1)
    return torch.matmul(probs, v)                                                # (B, H, T, D)


# --- tanh GELUs: BLOOM's, and T5's gated gelu_new ---------------------------------------------------------------------

BLOOM_GELU_C = 0.79788456            # Megatron's literal for sqrt(2/pi)
GELU_NEW_C = math.sqrt(2.0 / math.pi)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5LayerNorm: x / sqrt(mean(x^2) + eps) * weight, the statistics in fp32, no mean subtraction, no bias.
    16-bit activations go back to the weight's dtype before the weight (transformers' order); fp16 weights leave
    them in fp32 (mt5.py's fp16 recipe)."""
    var = x.float().pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(var + eps)                # fp32 (type promotion)
    if weight.dtype == torch.float16:
        return weight.float() * x
    return weight * x.to(weight.dtype)


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """BLOOM's tanh GELU with Megatron's literal constant 0.79788456 (~sqrt(2/pi)), in the activation dtype.
    F.gelu(approximate="tanh") is equal in fp32 but rounds differently in bf16."""
    return x * 0.5 * (1.0 + torch.tanh(BLOOM_GELU_C * x * (1 + 0.044715 * x * x)))


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """tanh GELU, written as transformers' NewGELUActivation (the same ops, so the same bits in bf16)."""
    return 0.5 * x * (1.0 + torch.tanh(GELU_NEW_C * (x + 0.044715 * torch.pow(x, 3.0))))


# --- Memory that decoding streams: weights and the KV cache ---------------------------------------------------------

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux
_libc = None


def huge_pages_wanted() -> bool:
    """Whether to ask Linux for 2 MiB pages (MINIBLOOM_HUGE_PAGES=0 says no)."""
    return sys.platform.startswith("linux") and os.environ.get("MINIBLOOM_HUGE_PAGES", "1") != "0"


def empty_huge(shape, dtype, device) -> torch.Tensor:
    """torch.empty in its own fresh mapping, 2 MiB-aligned and advised MADV_HUGEPAGE before anything touches it
    (CPU, Linux, 2 MiB or more; the tail past the last whole 2 MiB stays in 4 KiB pages).

    Decoding streams every weight and the whole KV cache once per token; in 4 KiB pages each stream takes a TLB
    miss and loses the hardware prefetcher every 4 KiB (huge pages: decode step -7 to -10% in int8 and bf16,
    kernels/MATMUL.md). Linux grants them to untouched anonymous memory that asked (THP mode "madvise"), hence a
    mapping of our own rather than malloc's reused pages. Costs: up to 2 MiB of untouched address space per tensor,
    and a slower load: the first touch of each 2 MiB page took 2.5-3 ms on the project's VM (1 GiB of huge pages
    ~1.4 s, against ~0.6 s in 4 KiB pages). MINIBLOOM_HUGE_PAGES=0 turns it off."""
    global _libc
    shape = tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    device = torch.device(device)
    if device.type != "cpu" or nbytes < HUGE_PAGE or not huge_pages_wanted():
        return torch.empty(shape, dtype=dtype, device=device)
    import ctypes
    import mmap
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # untouched
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    skip = -base % HUGE_PAGE
    _libc.madvise(base + skip, nbytes // HUGE_PAGE * HUGE_PAGE, _MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=skip).view(dtype).view(shape)


def mallopt(param: int, value: int):
    """glibc's mallopt; a no-op where glibc is absent."""
    import ctypes
    try:
        ctypes.CDLL(None).mallopt(param, value)
    except (OSError, AttributeError):  # no glibc: nothing to tune
        pass


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4


def reuse_freed_memory():
    """After a CPU load: keep the memory of freed activations for the next op instead of giving it back to the OS.

    glibc serves a block above its mmap threshold (32 MiB at most) from a fresh mapping, unmapped when freed, and
    trims the heap's free top above 2x that: a prefill's activations ((B*T, 4h) floats, 2-32 MB each for a batch
    of 16 on the bloomz-560m shape) were page-faulted in afresh by every op, 0.8-2.5 M faults of 4 KiB per
    prefill, a third to a half of its time. So every block comes from the heap (M_MMAP_MAX 0) and the heap keeps
    up to 1 GiB free (M_TRIM_THRESHOLD): batch-16 prefill int8 4.0-4.7 -> 2.1 s, bf16 2.6-2.9 -> 2.0 s, fp32
    5.4-5.6 -> 3.6 s (2026-12-05). The peak RSS is the same; memory freed after a prefill stays with the process
    for the next. The weights and the KV cache have mappings of their own (empty_huge, file views). Left alone
    when GLIBC_TUNABLES sets malloc's own tunables: the user has chosen."""
    if not sys.platform.startswith("linux") or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


# --- KV cache -----------------------------------------------------------------------------------------------------

class KVCache:
    """Preallocated keys and values for one attention layer (gpt-fast style): no reallocation while decoding.

    k, v: (B, H, S_max, D). Positions [0, length) are filled; `update` writes new keys at `start`.
    """

    def __init__(self, B: int, H: int, S_max: int, D: int, dtype, device):
        shape = (B, H, S_max, D)
        (self.k, k_buf), (self.v, v_buf) = _kv_tensor(shape, dtype, device), _kv_tensor(shape, dtype, device)
        self._buffers = [b for b in (k_buf, v_buf) if b is not None]
        self.k.zero_()
        self.v.zero_()

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at [start, start+T) and return views of everything cached so far."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: torch.Tensor):
        """Beam search: row b of the cache becomes old row index[b]."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)

    def release(self):
        """The generation is over (generate.py, beam.py): its huge-page buffers serve the next cache, whose pages
        are then already faulted in. The cache cannot be used afterwards."""
        _spare_kv.extend(self._buffers)
        self._buffers, self.k, self.v = [], None, None
        while sum(b.numel() for b in _spare_kv) > SPARE_KV_BYTES:
            _spare_kv.pop(0)                                             # the oldest go back to the OS


# Huge-page KV buffers of finished generations, flat uint8, oldest first. A fresh 2 MiB page costs 2.5-3 ms to
# fault in on the project's VM (and up to 2 s per GiB after the host has been idle): a batch-16 bloomz-560m cache
# in fp32 (600 MB) took 18-650 ms to allocate, every batch of `--prompts` again, where a reused one is zeroed.
SPARE_KV_BYTES = 2 << 30
_spare_kv: list[torch.Tensor] = []


def _kv_tensor(shape, dtype, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(an uninitialised tensor, its flat uint8 buffer if it is one to keep for reuse, else None)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < HUGE_PAGE or not huge_pages_wanted():
        return torch.empty(shape, dtype=dtype, device=device), None
    for i, buf in enumerate(_spare_kv):
        if nbytes <= buf.numel() <= 2 * nbytes:                          # fits, and wastes at most half
            del _spare_kv[i]
            return buf[:nbytes].view(dtype).view(shape), buf
    t = empty_huge(shape, dtype, device)
    return t, t.view(-1).view(torch.uint8)


# --- Linear layers ------------------------------------------------------------------------------------------------

class Linear(torch.nn.Module):
    """y = x W^T + b, with W in the Hub's (out_features, in_features) layout.

    Holds float weights, or int8 weights with per-output-row scales (`weight_scale`) after quantization.
    The math is chosen by the backend the model was loaded with.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, device="meta"), requires_grad=False)
        self.bias = (torch.nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False)
                     if bias else None)
        self.register_buffer("weight_scale", None)   # (out,) fp32 once the weight is int8
        self.quant, self.threshold = None, 6.0        # "int8" | "int8-weight", LLM.int8() outlier threshold
        self.backend: "Backend" = REFERENCE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.linear(x, self)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class Embedding(torch.nn.Module):
    """Token embedding (vocab, C). Stores float rows, or int8 rows with one scale per token after quantization."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(num_embeddings, dim, device="meta"), requires_grad=False)
        self.register_buffer("weight_scale", None)   # (vocab,) fp32 once the rows are int8
        self.quant, self.threshold = None, 6.0
        self.dtype = None                             # the model's compute dtype, for dequantized rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight)
        if self.weight_scale is None:
            return rows
        return (rows.float() * self.weight_scale[ids][..., None]).to(self.dtype)    # dequantize what was read


# --- Backends -----------------------------------------------------------------------------------------------------

class Backend:
    """Plain PyTorch: the reference every kernel is checked against."""
    name = "reference"

    def linear(self, x, layer: Linear):
        if layer.weight.dtype == torch.int8:
            return self.linear_int8(x, layer)
        return F.linear(x, layer.weight, layer.bias)

    def linear_int8(self, x, layer: Linear):
        """LLM.int8() or weight-only int8 in plain PyTorch (minibloom/kernels/matmul_ref.py)."""
        from .kernels import matmul_ref
        if layer.quant == "int8":
            y = matmul_ref.linear_w8a8_ref(x.reshape(-1, x.shape[-1]), layer.weight, layer.weight_scale,
                                           layer.bias, layer.threshold)
        else:
            y = matmul_ref.linear_int8_weight_ref(x.reshape(-1, x.shape[-1]), layer.weight, layer.weight_scale,
                                                  layer.bias)
        return y.reshape(*x.shape[:-1], -1)

    def alibi_attention(self, q, k, v, key_pos, slopes, q_offset):
        return in_query_chunks(lambda qc, offset: alibi_attention_ref(qc, k, v, key_pos, slopes, offset),
                               q, k.shape[2], q_offset)

    def t5_attention(self, q, k, v, key_pos, bias, causal, q_offset):
        return in_query_chunks(lambda qc, offset: t5_attention_ref(qc, k, v, key_pos, bias, causal, offset),
                               q, k.shape[2], q_offset)

    def argmax(self, logits):
        """Greedy pick: (..., V) -> (...,) int64, the first index of the maximum."""
        return logits.argmax(-1)

    def bloom_gelu(self, x):
        return bloom_gelu(x)

    def rms_norm(self, x, weight, eps):
        return rms_norm(x, weight, eps)

    def gated_gelu_new(self, x, gate):
        """T5 v1.1's gated FFN activation: gelu_new(wi_0 x) * wi_1 x."""
        return gelu_new(x) * gate

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        """Route every layer of `model` through this backend."""
        for m in model.modules():
            if hasattr(m, "backend"):
                m.backend = self
        model.backend = self
        return model


REFERENCE = Backend()
_said = set()


def compile_decode(fn):
    """torch.compile for the one-token decode step (`load(..., compile=True)`, `--compile`).

    In eager mode a BLOOM decode step spends ~4.5 ms in Python and small ops between the kernels (two layer
    norms, GELU, residuals, cache writes: ~190 us per layer on a 2-core EPYC); inductor fuses those into C++.
    The custom kernels are traced through their fake implementations and run as they are. cpp_wrapper: the
    graph's ~130 calls (kernels and inductor's fused loops) are made from generated C++, not from a generated
    Python function: about -1 ms of a 26 ms int8 step (bloomz-560m shape, same process), +25% compile time.
    dynamic=True: the cache grows every step and must not trigger a recompile. fullgraph=True: a graph break
    would be a silent slowdown, so it is an error. The first step compiles (about 20-70 s on 2 cores; cached on
    disk by torch)."""
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, options={"cpp_wrapper": True})

    def step(*args):
        try:
            return compiled(*args)
        except torch._dynamo.exc.TorchDynamoException as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise MinibloomError(f"torch.compile failed on the decode step ({type(e).__name__}: {first}). "
                                 f"Load without compile=True (CLI: drop --compile); inductor needs a C++ compiler "
                                 f"on CPU") from e
    return step


def _say_once(message: str):
    if message not in _said:
        _said.add(message)
        print(f"minibloom: {message}", file=sys.stderr)


def get_backend(name: str, device: torch.device | str = "cpu") -> Backend:
    """'reference' | 'fused' | 'auto'. 'fused' raises if the kernels are unavailable; 'auto' falls back once."""
    if name not in BACKENDS:
        raise MinibloomError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    if name == "reference":
        return REFERENCE
    from . import fused

    ok, reason = fused.available(torch.device(device))
    if ok:
        return fused.FusedBackend(torch.device(device))
    if name == "fused":
        raise MinibloomError(f"backend='fused' but the kernels are unavailable: {reason}. "
                             f"Use backend='reference' (or 'auto' to fall back automatically)")
    _say_once(f"fused kernels unavailable ({reason}); using the reference PyTorch path")
    return REFERENCE
