"""One generation loop for both families: greedy, sampling, repetition penalty, stop strings, streaming.

A model exposes two calls (prefill and decode kept apart, as in gpt-fast):
    logits, state = model.start(input_ids, attention_mask, max_new_tokens)   # (B, V) for the next token
    logits = model.step(state, tokens)                                         # tokens (B,) -> (B, V)
and `state.history` (B, n): the ids the repetition penalty looks at (the prompt for a decoder-only model, the
decoder's start token for an encoder-decoder, as in transformers). Beam search lives in beam.py.
"""
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
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        if not self.temperature > 0:
            bad("temperature", self.temperature, "must be > 0 (use do_sample=False for greedy decoding)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "must be an integer >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", self.repetition_penalty, "must be > 0 (1.0 turns it off)")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            bad("num_beams", self.num_beams, "must be an integer >= 1")
        if not isinstance(self.num_return_sequences, int) or not 1 <= self.num_return_sequences <= self.num_beams:
            bad("num_return_sequences", self.num_return_sequences, f"must be between 1 and num_beams={self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            bad("do_sample", True, "beam sampling is not supported: use num_beams=1 with do_sample, or greedy beams")
        if self.early_stopping not in (True, False, "never"):
            bad("early_stopping", self.early_stopping, "must be True, False or 'never'")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", self.stop, "must be non-empty strings")


def apply_repetition_penalty(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive logits (multiply negative ones) of every token already in `history` by `penalty`."""
    if penalty == 1.0:
        return scores
    score = torch.gather(scores, 1, history)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter(1, history, score)


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
    """Yield the next token of every row (B,), step by step. Finished rows yield pad_id, as in transformers."""
    generator = None
    if opts.do_sample:
        generator = torch.Generator(device=input_ids.device)
        generator.manual_seed(opts.seed if opts.seed is not None else torch.seed())
    logits, state = model.start(input_ids, attention_mask, opts.max_new_tokens)
    history = state.history
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for i in range(opts.max_new_tokens):
        scores = apply_repetition_penalty(logits.float(), history, opts.repetition_penalty)
        if opts.do_sample:
            probs = sample_filter(scores, opts).softmax(dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            tokens = model.backend.argmax(scores)
        if pad_id is not None:
            tokens = torch.where(unfinished, tokens, pad_id)
        history = torch.cat([history, tokens[:, None]], dim=1)
        yield tokens
        if eos_id is not None:
            unfinished &= tokens != eos_id
        if stop_check is not None:
            unfinished &= ~stop_check(history[:, state.history.shape[1]:])
        if not unfinished.any() or i + 1 == opts.max_new_tokens:
            return
        logits = model.step(state, tokens)
