"""mT5 / mT0 / T5 (v1.0, v1.1, Flan-T5): an encoder-decoder transformer with a relative position bias.

    enc: x = shared[ids]                                   (no sqrt(d) scaling, no position embedding)
         n x [ x + o(Attn(RMS(x), bias_enc)) ; x + FFN(RMS(x)) ]            -> RMS_final -> h_enc
    dec: y = shared[dec_ids]                               (dec_ids start with decoder_start_token_id = <pad> = 0)
         n x [ y + o(CausalAttn(RMS(y), bias_dec)) ; y + o(CrossAttn(RMS(y), h_enc)) ; y + FFN(RMS(y)) ]
         -> RMS_final -> (* d_model**-0.5, original T5 only) -> lm_head -> logits

T5 specifics (Raffel et al. 2020, arXiv 1910.10683; mT5: arXiv 2010.11934):
  - RMSNorm with the variance in fp32, no mean, no bias.
  - Attention has no 1/sqrt(D) scaling (folded into the initialisation); inner width = heads * d_kv, which need
    not equal d_model (mt0-small: 6 * 64 = 384 vs 512).
  - One relative position bias table per stack, owned by block 0 and shared by every block: bidirectional
    buckets in the encoder, causal in the decoder (ops.t5_bucket). Cross-attention has no bias.
  - FFN: gated-GELU (wi_0, wi_1, wo; tanh "gelu_new") for mT5/T5 v1.1/Flan-T5, ReLU (wi, wo) for T5 v1.0.
  - Head: mT5/T5 v1.1 store an untied lm_head.weight, used as is; T5 v1.0 ties it to `shared` and rescales the
    decoder output by d_model**-0.5 first.

Module and parameter names are the Hub's (encoder.block.{i}.layer.0.SelfAttention.q.weight, ...), so loading is
the identity map. Shapes: B batch, T new tokens, S keys, H heads, D = d_kv, C = d_model, I = H * D.

fp16. mT5 was trained in bf16: its residual stream and FFN outputs exceed fp16's range (65504), and a plain fp16
run gives inf/NaN. transformers keeps every `wo` in fp32 (more memory). We keep the weights in fp16 and instead:
  1. carry the activations (residual stream, attention, the gated product) in fp32: a per-token cost only;
  2. run every fp16 matmul on an input scaled by a power of two chosen so that no sum can overflow:
         |y_j| = |sum_i W_ji x_i| <= amax(x) * max_j sum_i |W_ji|  =  amax(x) * w_l1
     w_l1 is computed once per layer at load time (one float); amax(x) per token at run time. The input is
     multiplied by 2^-e with e = ceil(log2(amax * w_l1 / 2^14)) (>= 0), cast to fp16, multiplied, and the fp32
     result multiplied by 2^e. Powers of two are exact, so the only rounding is fp16's 11-bit mantissa on
     the inputs and outputs: an error below bf16's. The bound covers every partial sum too, so it holds for
     GEMMs that accumulate in fp16. Memory: the fp16 weights plus one float per Linear.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .errors import MinibloomError
from .loader import config_fields

FP16_TARGET = 2.0 ** 14   # scaled matmul outputs stay below this: 4x headroom under fp16's max (65504)


@dataclass
class T5Config:
    model_type: str = "mt5"
    vocab_size: int = 250112
    d_model: int = 512               # C
    d_kv: int = 64                   # D
    d_ff: int = 1024
    num_layers: int = 8              # encoder blocks
    num_decoder_layers: int | None = None   # None: as many as the encoder
    num_heads: int = 6               # H
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"   # "gated-<act>" or "<act>"; T5 v1.0: "relu"
    tie_word_embeddings: bool | None = None
    decoder_start_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        aliases = {"hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers",
                   "head_dim": "d_kv"}
        d = {aliases.get(k, k): v for k, v in d.items()}
        if d.get("model_type") == "t5" and "feed_forward_proj" not in d:
            d["feed_forward_proj"] = "relu"  # original T5 configs predate the field
        for k in ("eos_token_id", "decoder_start_token_id", "pad_token_id"):
            if isinstance(d.get(k), list):
                d[k] = d[k][0] if d[k] else None
        cfg = cls(**config_fields(cls, d, sizes=("vocab_size", "d_model", "d_kv", "d_ff", "num_layers",
                                                  "num_decoder_layers", "num_heads", "relative_attention_num_buckets",
                                                  "relative_attention_max_distance"),
                                  token_ids=("decoder_start_token_id", "eos_token_id", "pad_token_id")))
        if cfg.num_decoder_layers is None:
            cfg.num_decoder_layers = cfg.num_layers
        parts = cfg.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or cfg.activation not in ACTIVATIONS:
            raise MinibloomError(f"config.json: feed_forward_proj {cfg.feed_forward_proj!r} is not supported: use "
                                 f"'gated-gelu' (mT5, T5 v1.1, Flan-T5), 'relu' (T5 v1.0) or '[gated-]"
                                 f"{{{','.join(ACTIVATIONS)}}}'")
        return cfg

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # transformers maps "gated-gelu" to the tanh approximation (gelu_new), for backward compatibility
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @property
    def inner(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def rescale_head(self) -> bool:
        """T5 v1.0 (model_type t5, head tied) multiplies the decoder output by d_model**-0.5; mT5 never does."""
        return self.model_type == "t5" and self.tie_word_embeddings is not False


ACTIVATIONS = {"gelu_new": ops.gelu_new, "gelu": F.gelu, "relu": F.relu, "silu": F.silu}  # gelu_new: tanh GELU


class Linear(ops.Linear):
    """ops.Linear without bias. With fp16 weights the input is fp32 and the matmul is overflow-safe (see top)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.w_l1 = None  # fp16 weights: max_j sum_i |W_ji|, set at load time by `tie`

    def forward(self, x):
        if self.weight.dtype != torch.float16:
            return self.backend.linear(x, self)
        amax = x.abs().amax(-1, keepdim=True).float()                                # (..., 1) per token
        e = torch.ceil(torch.log2(amax * (self.w_l1 / FP16_TARGET))).clamp(min=0)   # log2(0) = -inf -> 0
        y = self.backend.linear((x * torch.exp2(-e)).half(), self)                  # |y| <= 2^14: finite
        return y.float() * torch.exp2(e)


def max_row_l1(w: torch.Tensor, chunk: int = 4096) -> float:
    """max_j sum_i |W_ji|, read a few MB of rows at a time (no full-size temporary)."""
    return max(float(rows.float().abs().sum(1).max()) for rows in w.split(chunk))


class RMSNorm(nn.Module):
    """T5LayerNorm: x / sqrt(mean(x^2) + eps) * weight, the variance in fp32 (ops.rms_norm); no mean subtraction,
    no bias. 16-bit activations go back to the weight's dtype before the weight, as transformers does."""

    def __init__(self, C: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(C, device="meta"), requires_grad=False)
        self.backend = ops.REFERENCE

    def forward(self, x):
        return self.backend.rms_norm(x, self.weight, self.eps)


class BiasTable(nn.Module):
    """relative_attention_bias.weight (num_buckets, H): block 0 of each stack owns it."""

    def __init__(self, num_buckets: int, H: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_buckets, H, device="meta"), requires_grad=False)


class Attention(nn.Module):
    """Multi-head attention with q, k, v: C -> I and o: I -> C, no biases, no 1/sqrt(D) scaling."""

    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.H, self.D = cfg.num_heads, cfg.d_kv
        self.q, self.k, self.v = (Linear(cfg.d_model, cfg.inner) for _ in range(3))
        self.o = Linear(cfg.inner, cfg.d_model)
        if has_bias:
            self.relative_attention_bias = BiasTable(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.backend = ops.REFERENCE

    def heads(self, proj, x):
        B, T, _ = x.shape
        return proj(x).view(B, T, self.H, self.D).transpose(1, 2)   # (B, H, T, D)

    def kv(self, x):
        """Keys and values (B, H, S, D), contiguous as transformers' caches hold them (the matmuls then round
        identically in half precision)."""
        return self.heads(self.k, x).contiguous(), self.heads(self.v, x).contiguous()

    def forward(self, x, k, v, key_pos, bias, causal: bool, q_offset: int):
        B, T, _ = x.shape
        y = self.backend.t5_attention(self.heads(self.q, x), k, v, key_pos, bias, causal, q_offset)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(B, T, self.H * self.D))


class SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.SelfAttention = Attention(cfg, has_bias)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, key_pos, bias, causal, cache: ops.KVCache | None, start: int):
        h = self.layer_norm(x)
        k, v = self.SelfAttention.kv(h)
        if cache is not None:
            k, v = cache.update(start, k, v)       # (B, H, start + T, D)
        return x + self.SelfAttention(h, k, v, key_pos, bias, causal, start)


class CrossAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.EncDecAttention = Attention(cfg, has_bias=False)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, cross_kv, enc_pos):
        k, v = cross_kv                            # (B, H, S_enc, D), projected once per prompt
        return x + self.EncDecAttention(self.layer_norm(x), k, v, enc_pos, None, False, 0)


class FFN(nn.Module):
    """Gated: wo(act(wi_0 x) * wi_1 x). Plain (T5 v1.0): wo(relu(wi x)). Names as on the Hub."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        if cfg.is_gated_act:
            self.wi_0, self.wi_1 = Linear(cfg.d_model, cfg.d_ff), Linear(cfg.d_model, cfg.d_ff)
        else:
            self.wi = Linear(cfg.d_model, cfg.d_ff)
        self.wo = Linear(cfg.d_ff, cfg.d_model)
        self.backend = ops.REFERENCE

    def forward(self, x):
        if not hasattr(self, "wi_0"):
            return self.wo(self.act(self.wi(x)))
        if self.act is ops.gelu_new:   # mT5, T5 v1.1: gelu_new(wi_0 x) * wi_1 x, one pass with the fused backend
            return self.wo(self.backend.gated_gelu_new(self.wi_0(x), self.wi_1(x)))        # (B, T, d_ff) inside
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class FFNLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = FFN(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    """layer.0 self-attention, (decoder: layer.1 cross-attention), then the FFN."""

    def __init__(self, cfg: T5Config, is_decoder: bool, has_bias: bool):
        super().__init__()
        self.is_decoder = is_decoder
        layers = [SelfAttentionLayer(cfg, has_bias)] + ([CrossAttentionLayer(cfg)] if is_decoder else [])
        self.layer = nn.ModuleList(layers + [FFNLayer(cfg)])

    def forward(self, x, key_pos, bias, cache=None, start=0, cross_kv=None, enc_pos=None):
        x = self.layer[0](x, key_pos, bias, self.is_decoder, cache, start)
        if self.is_decoder:
            x = self.layer[1](x, cross_kv, enc_pos)
        return self.layer[-1](x)


class Stack(nn.Module):
    def __init__(self, cfg: T5Config, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.block = nn.ModuleList(Block(cfg, is_decoder, has_bias=(i == 0)) for i in range(n))
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.max_distance = cfg.relative_attention_max_distance

    def bias(self) -> ops.T5Bias:
        """Block 0's table, shared by every block; the dense bias is computed once per forward (ops.T5Bias)."""
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        return ops.T5Bias(table, bidirectional=not self.is_decoder, max_distance=self.max_distance)


class T5(nn.Module):
    """MT5ForConditionalGeneration / T5ForConditionalGeneration without transformers.

    Call it for logits; `encode`, `start` and `step` drive generation (the contract of generate.py)."""
    is_encoder_decoder = True

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = ops.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, is_decoder=False)
        self.decoder = Stack(cfg, is_decoder=True)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size)   # untied (mT5) or tied to `shared` by `tie`
        self.backend = ops.REFERENCE
        self.taps = None  # {name: tensor} when tracing; None costs nothing
        self.compiled_decode = None  # `decode` through torch.compile, for `step` (compile_step)

    @property
    def act_dtype(self) -> torch.dtype:
        """The activations' dtype: the weights' own, except fp32 for fp16 weights (see the top of this file)."""
        dtype = self.encoder.final_layer_norm.weight.dtype
        return torch.float32 if dtype == torch.float16 else dtype

    # -- the forward pass ------------------------------------------------------------------------------------------
    def encode(self, input_ids, attention_mask=None):
        """ids (B, S) -> encoder output (B, S, C) and key positions (B, S): the index, -1 on padding."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        S = input_ids.shape[1]
        enc_pos = torch.arange(S, device=input_ids.device).expand_as(input_ids)
        enc_pos = torch.where(attention_mask.bool(), enc_pos, -1)
        x = self.shared(input_ids).to(self.act_dtype)
        self._tap("encoder.embeddings", x)
        bias = self.encoder.bias()
        for i, block in enumerate(self.encoder.block):
            x = block(x, enc_pos, bias)
            self._tap(f"encoder.block.{i}", x)
        x = self.encoder.final_layer_norm(x)
        self._tap("encoder.final_layer_norm", x)
        return x, enc_pos

    def cross_kv(self, enc):
        """Each decoder block's cross-attention keys and values (B, H, S_enc, D): computed once per prompt."""
        return [block.layer[1].EncDecAttention.kv(enc) for block in self.decoder.block]

    def decode(self, ids, cross, enc_pos, caches=None, start=0):
        """Decoder ids (B, T) at positions start.. -> logits (B, T, vocab)."""
        B, T = ids.shape
        x = self.shared(ids).to(self.act_dtype)
        self._tap("decoder.embeddings", x)
        key_pos = torch.arange(start + T, device=ids.device).expand(B, -1)   # decoder keys are never padding
        bias = self.decoder.bias()
        for i, block in enumerate(self.decoder.block):
            x = block(x, key_pos, bias, None if caches is None else caches[i], start, cross[i], enc_pos)
            self._tap(f"decoder.block.{i}", x)
        x = self.decoder.final_layer_norm(x)
        self._tap("decoder.final_layer_norm", x)
        if self.config.rescale_head:
            x = x * self.config.d_model ** -0.5
        return self.lm_head(x)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None):
        """Logits (B, T_dec, vocab). Without decoder_input_ids: the logits after the start token (T_dec = 1).
        Encoder inputs may be padded on either side (the bias depends on relative positions only)."""
        B = input_ids.shape[0]
        if decoder_input_ids is None:
            decoder_input_ids = torch.full((B, 1), self.config.decoder_start_token_id, device=input_ids.device)
        if (not isinstance(decoder_input_ids, torch.Tensor) or decoder_input_ids.dim() != 2
                or decoder_input_ids.shape[0] != B or decoder_input_ids.shape[1] == 0):
            shape = tuple(decoder_input_ids.shape) if isinstance(decoder_input_ids, torch.Tensor) else None
            raise MinibloomError(f"decoder_input_ids must be a (batch={B}, length >= 1) LongTensor, got {shape}: "
                                 f"start each row with decoder_start_token_id={self.config.decoder_start_token_id}")
        enc, enc_pos = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, self.cross_kv(enc), enc_pos)

    # -- incremental decoding: encode once, then one decoder token per step ------------------------------------------
    def start(self, input_ids, attention_mask, max_new_tokens: int, num_beams: int = 1):
        """Encode the prompts, project the cross-attention K/V, run the start token.
        Returns (logits (B * num_beams, V), state). With beams, the encoder runs once per prompt and its output
        is repeated per beam, as transformers does."""
        enc, enc_pos = self.encode(input_ids, attention_mask)
        if num_beams > 1:
            enc, enc_pos = enc.repeat_interleave(num_beams, 0), enc_pos.repeat_interleave(num_beams, 0)
        B, cfg = enc.shape[0], self.config
        state = Seq2SeqState(
            caches=[ops.KVCache(B, cfg.num_heads, max_new_tokens + 1, cfg.d_kv, self.act_dtype, enc.device)
                    for _ in self.decoder.block],
            cross=self.cross_kv(enc), enc_pos=enc_pos, length=0)
        tokens = torch.full((B,), cfg.decoder_start_token_id, dtype=torch.long, device=enc.device)
        state.history = tokens[:, None]
        return self.step(state, tokens), state

    def step(self, state: "Seq2SeqState", tokens: torch.Tensor) -> torch.Tensor:
        """Append one decoder token per row (B,) and return the next logits (B, V)."""
        L = state.length
        state.length = L + 1
        # The start token (L = 0) runs eagerly: torch.compile specializes a size-1 cache, so compiling it would
        # cost a second compile.
        decode = self.compiled_decode if L > 0 and self.compiled_decode and self.taps is None else self.decode
        return decode(tokens[:, None], state.cross, state.enc_pos, state.caches, L)[:, -1]

    def compile_step(self):
        """Run `step` through torch.compile (ops.compile_decode); the encoder and the start token stay eager."""
        self.compiled_decode = ops.compile_decode(self.decode)

    def cache_bytes(self, B: int, S: int, dtype) -> int:
        """Bytes of the caches for B rows of S tokens (prompt + new): self-attention K/V for the new tokens and
        cross-attention K/V for the prompt, in every decoder block."""
        itemsize = 4 if dtype == torch.float16 else dtype.itemsize   # fp16 weights: fp32 activations
        return 2 * self.config.num_decoder_layers * B * S * self.config.inner * itemsize

    def _tap(self, name, x):
        if self.taps is not None:
            self.taps[name] = x.detach()


@dataclass
class Seq2SeqState:
    caches: list                 # decoder self-attention KVCache per block
    cross: list                  # (k, v) per block, (B, H, S_enc, D)
    enc_pos: torch.Tensor        # (B, S_enc) encoder key positions, -1 on padding
    length: int                  # decoder tokens in the cache so far
    history: torch.Tensor | None = None  # (B, n) decoder ids the repetition penalty looks at

    def reorder(self, index: torch.Tensor):
        """Beam search: row b becomes old row index[b]."""
        for c in self.caches:
            c.reorder(index)
        self.cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross]
        self.enc_pos = self.enc_pos.index_select(0, index)


# -- loading -----------------------------------------------------------------------------------------------------------

EMBEDDING_KEYS = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
UNUSED_KEYS = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",   # redundant copies (mt0-xxl)
               "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}


def checkpoint_names(model: T5, ckpt) -> dict[str, list[str]]:
    """Parameter name -> checkpoint keys to try. The input embedding may be stored under any alias of `shared`,
    never taken from lm_head.weight; lm_head.weight absent means a tied head."""
    names = {p: [p] for p, _ in model.named_parameters()}
    names["shared.weight"] = EMBEDDING_KEYS
    if "lm_head.weight" not in ckpt:
        del names["lm_head.weight"]
    return names


def ignored_key(key: str) -> bool:
    return key in UNUSED_KEYS


def tie(model: T5, ckpt):
    """Tie the head to `shared` when the checkpoint stores none (T5 v1.0, or a freshly saved MT5); then give every
    fp16 Linear its overflow bound."""
    head, emb = model.lm_head, model.shared
    if head.weight.is_meta:
        head.weight = emb.weight
        head.weight_scale, head.quant, head.threshold = emb.weight_scale, emb.quant, emb.threshold
    for m in model.modules():
        if isinstance(m, Linear) and m.weight.dtype == torch.float16:
            m.w_l1 = max_row_l1(m.weight)


def build(config: dict) -> T5:
    return T5(T5Config.from_dict(config))
