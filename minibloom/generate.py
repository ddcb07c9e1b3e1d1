"""One generation loop for both families: greedy, sampling, repetition penalty, n-gram blocking, minimum length,
stop strings, streaming.

A model exposes two calls (prefill and decode kept apart, as in gpt-fast):
    logits, state = model.start(input_ids, attention_mask, max_new_tokens)   # (B, V) for the next token
    logits = model.step(state, tokens)                                         # tokens (B,) -> (B, V)
and `state.history` (B, n): the ids generated so far (the prompt for a decoder-only model, the decoder's start
token for an encoder-decoder), which the score processors look at, as transformers' do. Beam search lives in
beam.py; it uses the same processors.
"""
import math
import numbers
from dataclasses import dataclass, field, fields

import torch

from .errors import MinibloomError


@dataclass
class GenerationOptions:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0                      # 0 = off
    top_p: float = 1.0                  # 1.0 = off
    repetition_penalty: float = 1.0     # 1.0 = off; > 1 discourages tokens already present (CTRL, arXiv 1909.05858)
    no_repeat_ngram_size: int = 0       # 0 = off; n > 0: no n-gram of the sequence occurs twice (fairseq)
    min_new_tokens: int = 0             # EOS is not allowed before this many new tokens
    stop: list = field(default_factory=list)   # strings that end a row's generation (not included in the text)
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "GenerationOptions":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise MinibloomError(f"unknown generation option(s) {', '.join(unknown)}: valid ones are "
                                 f"{', '.join(sorted(names))}")
        opts = cls(**{k: v for k, v in kwargs.items() if v is not None})
        if isinstance(opts.stop, str):
            opts.stop = [opts.stop]
        opts.validate()
        return opts

    def validate(self):
        def bad(name, value, want):
            raise MinibloomError(f"invalid {name}={value!r}: {want}")
        # NumPy scalars and one-element tensors count as the numbers they hold.
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                bad(name, value, "must be a finite number")
            setattr(self, name, float(value))
        for name in ("max_new_tokens", "top_k", "no_repeat_ngram_size", "min_new_tokens", "num_beams",
                     "num_return_sequences", "seed"):
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                setattr(self, name, int(value))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        if not self.temperature > 0:
            bad("temperature", self.temperature, "must be > 0")
        if self.do_sample and self.temperature < 1e-6:  # logits / temperature would overflow fp32: greedy in effect
            bad("temperature", self.temperature, "must be >= 1e-6 when sampling (do_sample=False is greedy decoding)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "must be an integer >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", self.repetition_penalty, "must be > 0 (1.0 turns it off)")
        if not -50 <= self.length_penalty <= 50:  # length ** length_penalty must stay a finite float
            bad("length_penalty", self.length_penalty, "must be in [-50, 50] (1.0: average log-probability)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2**63 <= self.seed < 2**64):
            bad("seed", self.seed, "must be an integer in [-2**63, 2**64)")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            bad("no_repeat_ngram_size", self.no_repeat_ngram_size, "must be an integer >= 0 (0 turns it off)")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            bad("min_new_tokens", self.min_new_tokens,
                f"must be an integer in [0, max_new_tokens={self.max_new_tokens}]")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            bad("num_beams", self.num_beams, "must be an integer >= 1")
        if not isinstance(self.num_return_sequences, int) or not 1 <= self.num_return_sequences <= self.num_beams:
            bad("num_return_sequences", self.num_return_sequences, f"must be between 1 and num_beams={self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            bad("do_sample", True, "beam sampling is not supported: use num_beams=1 with do_sample, or greedy beams")
        if self.early_stopping not in (True, False, "never"):
            bad("early_stopping", self.early_stopping, "must be True, False or 'never'")
        if not isinstance(self.stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", self.stop, "must be a non-empty string or a list of them")


def apply_repetition_penalty(scores: torch.Tensor, history: torch.Tensor, penalty: float,
                             skip: torch.Tensor | None = None) -> torch.Tensor:
    """Divide positive logits (multiply negative ones) of every token already in `history` by `penalty`.
    skip (B,): leading positions of each row left out, a decoder-only prompt's left padding (transformers 5 leaves
    it out too); they are replaced by the row's first token looked at, which gathers and scatters the same value."""
    if penalty == 1.0:
        return scores
    if skip is not None:
        pos = torch.arange(history.shape[1], device=history.device)
        first = history.gather(1, skip[:, None])                                   # (B, 1)
        history = torch.where(pos[None, :] < skip[:, None], first, history)
    score = torch.gather(scores, 1, history)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter(1, history, score)


def ban_repeated_ngrams(scores: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """No n-gram occurs twice: a token that would complete an n-gram already in the row gets -inf.
    history (B, L): the whole sequence, padding included, as transformers' NoRepeatNGramLogitsProcessor reads it."""
    L = history.shape[1]
    if n == 0 or L < n:
        return scores
    prefix = history[:, L + 1 - n:]                                    # (B, n-1) what the next n-gram starts with
    grams = history.unfold(1, n, 1)                                    # (B, L-n+1, n) every n-gram so far
    repeats = (grams[..., :-1] == prefix[:, None]).all(-1)             # (B, L-n+1) n-grams that start the same way
    V = scores.shape[-1]
    banned = torch.zeros(scores.shape[0], V + 1, dtype=torch.bool, device=scores.device)   # column V: no ban
    banned.scatter_(1, torch.where(repeats, grams[..., -1].clamp(max=V), V), True)
    return scores.masked_fill(banned[:, :V], float("-inf"))


def process_scores(scores: torch.Tensor, history: torch.Tensor, skip, new_tokens: int, opts: "GenerationOptions",
                   eos_id) -> torch.Tensor:
    """The score processors in transformers' order: repetition penalty, n-gram blocking, minimum length.
    scores (B, V) fp32; history (B, L); new_tokens: tokens generated so far."""
    scores = apply_repetition_penalty(scores, history, opts.repetition_penalty, skip)
    scores = ban_repeated_ngrams(scores, history, opts.no_repeat_ngram_size)
    if new_tokens < opts.min_new_tokens and eos_id is not None:
        scores = scores.index_fill(1, torch.tensor([eos_id], device=scores.device), float("-inf"))
    return scores


def check_logits(logits: torch.Tensor):
    """The prompt's logits (B, V), once per generation: NaN there would otherwise decode as token 0 or garbage."""
    if torch.isnan(logits).any():
        raise MinibloomError("the model's logits for the prompt are NaN: the checkpoint holds NaN or inf weights, or "
                             "float16 overflowed; check the checkpoint, or load with dtype='bfloat16' or 'float32'")


def left_padding(model, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """(B,) leading padding positions of a decoder-only prompt, which the repetition penalty leaves out."""
    return None if model.is_encoder_decoder else (attention_mask != 0).int().argmax(1)


def sample_filter(scores: torch.Tensor, opts: GenerationOptions) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), in transformers' order. Removed tokens get -inf."""
    scores = scores / opts.temperature
    if opts.top_k > 0:
        k = min(opts.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - opts.top_p)
        remove[..., -1:] = False                        # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores


def decode_tokens(model, input_ids, attention_mask, opts: GenerationOptions, eos_id, pad_id, stop_check=None):
    """Yield the next token of every row (B,), step by step. Finished rows yield pad_id, as in transformers.

    Finished rows leave the batch: once a quarter of the rows still computed have finished, the state keeps only
    the running ones (`state.reorder`), so that a long answer does not carry a batch of finished ones. Not with a
    compiled step, where a new batch size would recompile it, nor without a pad id to yield for them."""
    generator = None
    if opts.do_sample:
        generator = torch.Generator(device=input_ids.device)
        generator.manual_seed(opts.seed if opts.seed is not None else torch.seed())
    logits, state = model.start(input_ids, attention_mask, opts.max_new_tokens)
    check_logits(logits)
    B, P = input_ids.shape[0], state.history.shape[1]
    history, skip = state.history, left_padding(model, attention_mask)          # (B, P), (B,) or None
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    rows = torch.arange(B, device=input_ids.device)   # the rows the state holds, in its order
    shrink = pad_id is not None and not model.compiled_decode
    try:
        for i in range(opts.max_new_tokens):
            scores = process_scores(logits.float(), history[rows], None if skip is None else skip[rows], i, opts,
                                    eos_id)
            if opts.do_sample:
                probs = sample_filter(scores, opts).softmax(dim=-1)
                try:
                    picked = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                except RuntimeError as e:
                    raise MinibloomError(f"sampling failed ({e}): the probabilities are not finite; a higher "
                                         f"temperature, or greedy decoding, avoids it") from e
            else:
                picked = model.backend.argmax(scores)
            tokens = picked if len(rows) == B else picked.new_full((B,), pad_id).index_copy(0, rows, picked)
            if pad_id is not None:
                tokens = torch.where(unfinished, tokens, pad_id)
            history = torch.cat([history, tokens[:, None]], dim=1)
            yield tokens
            if eos_id is not None:
                unfinished &= tokens != eos_id
            if stop_check is not None:
                unfinished &= ~stop_check(history[:, P:])
            if not unfinished.any() or i + 1 == opts.max_new_tokens:
                return
            running = unfinished[rows]
            if shrink and len(rows) - int(running.sum()) >= max(1, len(rows) // 4):
                state.reorder(running.nonzero()[:, 0])
                rows = rows[running]
            logits = model.step(state, tokens[rows])
    finally:                                          # the caches' buffers serve the next generation
        for cache in state.caches:
            cache.release()
