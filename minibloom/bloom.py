"""BLOOM / BLOOMZ: a decoder-only transformer with ALiBi, read top to bottom.

    ids -> word_embeddings -> word_embeddings_layernorm
        -> n_layer x [ x + dense(ALiBiAttention(LN(x))) ; x + dense_4h_to_h(gelu(dense_h_to_4h(LN(x)))) ]
        -> ln_f -> logits = x @ word_embeddings^T   (the head is tied to the input embedding)

Module and parameter names are the Hub's (h.{i}.self_attention.query_key_value.weight, ...), so loading is the
identity map plus an optional "transformer." prefix. Shapes: B batch, T new tokens, S keys (cached + new),
H heads, D head dim, C hidden size.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .errors import MinibloomError
from .loader import config_fields


@dataclass
class BloomConfig:
    vocab_size: int = 250880
    hidden_size: int = 1024          # C; legacy config.json name: n_embed
    n_layer: int = 24                # legacy: num_hidden_layers
    n_head: int = 16                 # legacy: num_attention_heads
    layer_norm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 3

    @classmethod
    def from_dict(cls, d: dict) -> "BloomConfig":
        aliases = {"n_embed": "hidden_size", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}
        d = {aliases.get(k, k): v for k, v in d.items()}
        if d.get("n_head") is None:  # the weights' shapes do not tell the head count; transformers would assume 8
            raise MinibloomError("config.json has no n_head (num_attention_heads): add the model's head count, "
                                 "or re-download config.json")
        cfg = cls(**config_fields(cls, d, sizes=("vocab_size", "hidden_size", "n_layer", "n_head"),
                                  token_ids=("bos_token_id", "eos_token_id", "pad_token_id")))
        if cfg.hidden_size % cfg.n_head:
            raise MinibloomError(f"config.json: hidden_size {cfg.hidden_size} is not divisible by n_head {cfg.n_head}")
        tp = d.get("pretraining_tp")
        if isinstance(tp, (int, float)) and tp > 1 and d.get("slow_but_exact"):
            raise MinibloomError("config.json sets slow_but_exact with pretraining_tp > 1, which minibloom does not "
                                 "replicate: set slow_but_exact to false")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head


class LayerNorm(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(C, device="meta"), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(C, device="meta"), requires_grad=False)

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)  # fp32 accumulation inside


class BloomAttention(nn.Module):
    def __init__(self, cfg: BloomConfig):
        super().__init__()
        self.H, self.D = cfg.n_head, cfg.head_dim
        self.query_key_value = ops.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = ops.Linear(cfg.hidden_size, cfg.hidden_size)
        self.backend = ops.REFERENCE

    def forward(self, x, key_pos, slopes, cache: ops.KVCache | None, start: int):
        B, T, C = x.shape
        # The fused projection is interleaved per head: [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], not [Q | K | V].
        qkv = self.query_key_value(x).view(B, T, self.H, 3, self.D)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)                         # (B, H, T, D) each
        if cache is not None:
            k, v = cache.update(start, k, v)                                   # (B, H, S, D), S = start + T
        y = self.backend.alibi_attention(q, k, v, key_pos, slopes, q_offset=start)  # (B, H, T, D)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))                  # heads back side by side


class BloomMLP(nn.Module):
    def __init__(self, cfg: BloomConfig):
        super().__init__()
        self.dense_h_to_4h = ops.Linear(cfg.hidden_size, 4 * cfg.hidden_size)
        self.dense_4h_to_h = ops.Linear(4 * cfg.hidden_size, cfg.hidden_size)
        self.backend = ops.REFERENCE

    def forward(self, x):
        # tanh GELU, x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715 * x^2))): ops.bloom_gelu
        return self.dense_4h_to_h(self.backend.bloom_gelu(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(self, cfg: BloomConfig):
        super().__init__()
        self.post_ln_residual = cfg.apply_residual_connection_post_layernorm
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.self_attention = BloomAttention(cfg)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mlp = BloomMLP(cfg)

    def forward(self, x, key_pos, slopes, cache, start):
        h = self.input_layernorm(x)
        x = (h if self.post_ln_residual else x) + self.self_attention(h, key_pos, slopes, cache, start)
        h = self.post_attention_layernorm(x)
        return (h if self.post_ln_residual else x) + self.mlp(h)


class Bloom(nn.Module):
    """BloomForCausalLM without transformers. Call it for logits; `start`/`step` drive generation."""
    is_encoder_decoder = False

    def __init__(self, cfg: BloomConfig):
        super().__init__()
        self.config = cfg
        self.word_embeddings = ops.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.word_embeddings_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.h = nn.ModuleList(BloomBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.lm_head = ops.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # tied: shares the embedding
        self.register_buffer("slopes", ops.alibi_slopes(cfg.n_head), persistent=False)  # (H,) fp32
        self.backend = ops.REFERENCE
        self.taps = None  # {name: tensor} when tracing (see minibloom.trace); None costs nothing
        self.compiled_decode = None  # `decode` through torch.compile, for `step` (compile_step)

    # -- the forward pass ------------------------------------------------------------------------------------------
    def hidden(self, ids, key_pos, caches=None, start=0):
        """ids (B, T) -> final hidden states (B, T, C). key_pos covers every key: (B, start + T)."""
        x = self.word_embeddings_layernorm(self.word_embeddings(ids))
        self._tap("embeddings", x)
        for i, block in enumerate(self.h):
            x = block(x, key_pos, self.slopes, None if caches is None else caches[i], start)
            self._tap(f"h.{i}", x)
        x = self.ln_f(x)
        self._tap("ln_f", x)
        return x

    def logits(self, x):
        return self.lm_head(x)

    def decode(self, tokens, mask, caches, start):
        """tokens (B, T) after `start` cached ones -> logits (B, T, V); mask (B, start + T) covers every key."""
        return self.logits(self.hidden(tokens, ops.positions_from_mask(mask), caches, start))

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None):
        """Logits (B, T, vocab) for every position; padding positions are garbage (masked), as in transformers."""
        if decoder_input_ids is not None:
            raise MinibloomError("BLOOM is decoder-only: it takes no decoder_input_ids. Append the tokens to "
                                 "input_ids instead (decoder_input_ids is for mT5/mT0/T5)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.logits(self.hidden(input_ids, ops.positions_from_mask(attention_mask)))

    # -- incremental decoding: prefill once, then one token per step -------------------------------------------------
    def start(self, input_ids, attention_mask, max_new_tokens: int):
        """Prefill the prompt into a fresh preallocated cache. Returns (last-position logits (B, V), state)."""
        B, T = input_ids.shape
        cfg = self.config
        S_max = T + max_new_tokens
        dtype = self.ln_f.weight.dtype
        state = DecoderState(
            caches=[ops.KVCache(B, cfg.n_head, S_max, cfg.head_dim, dtype, input_ids.device) for _ in self.h],
            mask=torch.zeros(B, S_max, dtype=torch.long, device=input_ids.device), length=T)
        state.mask[:, :T] = attention_mask
        state.history = input_ids
        x = self.hidden(input_ids, ops.positions_from_mask(state.mask[:, :T]), state.caches, 0)
        return self.logits(x[:, -1]), state

    def step(self, state: "DecoderState", tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,) and return the next logits (B, V)."""
        L = state.length
        state.mask[:, L] = 1
        state.length = L + 1
        decode = self.compiled_decode if self.compiled_decode and self.taps is None else self.decode
        return decode(tokens[:, None], state.mask[:, :L + 1], state.caches, L)[:, -1]

    def compile_step(self):
        """Run `step` through torch.compile (ops.compile_decode); prefill stays eager."""
        self.compiled_decode = ops.compile_decode(self.decode)

    def cache_bytes(self, B: int, S: int, dtype) -> int:
        """Bytes of the KV cache for B rows of S tokens: keys and values for every layer."""
        return 2 * self.config.n_layer * B * S * self.config.hidden_size * dtype.itemsize

    def _tap(self, name, x):
        if self.taps is not None:
            self.taps[name] = x.detach()


@dataclass
class DecoderState:
    caches: list
    mask: torch.Tensor     # (B, S_max) 1 for real tokens, 0 for padding and not-yet-generated slots
    length: int            # tokens in the cache so far
    history: torch.Tensor | None = None  # (B, n) ids the repetition penalty looks at

    def reorder(self, index: torch.Tensor):
        for c in self.caches:
            c.reorder(index)
        self.mask = self.mask.index_select(0, index)


# -- loading -----------------------------------------------------------------------------------------------------------

def checkpoint_names(model: Bloom, ckpt) -> dict[str, list[str]]:
    """Parameter name -> checkpoint keys to try. The bigscience files have no prefix; models saved from
    BloomForCausalLM prefix every key with "transformer.". lm_head.weight is usually absent: the head is tied."""
    names = {p: [p, "transformer." + p] for p, _ in model.named_parameters()}
    if "lm_head.weight" not in ckpt:
        del names["lm_head.weight"]
    return names


def ignored_key(key: str) -> bool:
    return False


def tie(model: Bloom, ckpt):
    """Tie the head to the embedding when the checkpoint has no lm_head.weight, or stores an identical copy."""
    head, emb = model.lm_head, model.word_embeddings
    if head.weight.is_meta or (head.weight.dtype == emb.weight.dtype and torch.equal(head.weight, emb.weight)):
        head.weight = emb.weight
        head.weight_scale, head.quant, head.threshold = emb.weight_scale, emb.quant, emb.threshold


def build(config: dict) -> Bloom:
    return Bloom(BloomConfig.from_dict(config))
