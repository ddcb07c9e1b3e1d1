"""Generation options: sampling, seeds, stop strings, streaming, batching, validation and memory checks."""
import pytest
import torch

import minibloom
from minibloom import MinibloomError
from minibloom.checkpoints import TINY_BLOOM, bloom_checkpoint
from minibloom.generate import GenerationOptions, apply_repetition_penalty, sample_filter


@pytest.fixture(scope="module")
def lm():
    return minibloom.load(bloom_checkpoint(TINY_BLOOM, scale=3.0), dtype="float32")


def test_seeded_sampling_is_reproducible(lm):
    opts = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    a = lm.generate(["Hello", "Je t'aime"], seed=7, **opts)
    b = lm.generate(["Hello", "Je t'aime"], seed=7, **opts)
    c = lm.generate(["Hello", "Je t'aime"], seed=8, **opts)
    assert a == b and a != c


def test_sampling_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper, RepetitionPenaltyLogitsProcessor)
    torch.manual_seed(0)
    scores = torch.randn(3, 100) * 3
    history = torch.randint(0, 100, (3, 7))
    opts = GenerationOptions(temperature=0.7, top_k=20, top_p=0.8, do_sample=True)
    ours = sample_filter(apply_repetition_penalty(scores, history, 1.3), opts)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(history, scores.clone())
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        theirs = w(history, theirs)
    assert torch.equal(ours, theirs)


def test_greedy_ignores_seed_and_batches_equal_single_rows(lm):
    prompts = ["Translate to English: Je t'aime.", "Hi"]
    batch = lm.generate(prompts, max_new_tokens=12)
    assert batch == [lm.generate(p, max_new_tokens=12, seed=3) for p in prompts]


def test_rows_that_end_early_are_padded_with_pad_id(lm):
    ids, mask = lm.encode_batch(["Hello there", "Translate"])
    out = lm.generate_ids(ids, mask, max_new_tokens=10)
    eos = lm.tokenizer.eos_id
    lm.tokenizer.eos_id = int(out[0, 2])  # pretend row 0's third token is EOS
    try:
        early = lm.generate_ids(ids, mask, max_new_tokens=10)
    finally:
        lm.tokenizer.eos_id = eos
    row = early[0].tolist()
    first = row.index(int(out[0, 2]))
    assert all(t == lm.tokenizer.pad_id for t in row[first + 1:])


def test_stop_strings_end_generation_and_are_cut(lm):
    full = lm.generate("Hello", max_new_tokens=20)
    stop = full[3:5]
    assert stop and lm.generate("Hello", max_new_tokens=20, stop=[stop]) == full[:full.find(stop)]
    streamed = "".join(lm.stream("Hello", max_new_tokens=20, stop=[stop]))
    assert streamed == full[:full.find(stop)]


def test_stream_concatenates_to_generate(lm):
    for prompt in ["Translate to English: Je t'aime.", "一个传奇的开端"]:
        pieces = list(lm.stream(prompt, max_new_tokens=24))
        assert "".join(pieces) == lm.generate(prompt, max_new_tokens=24)


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(repetition_penalty=0), dict(num_beams=0), dict(num_beams=2, do_sample=True),
                                 dict(num_return_sequences=3, num_beams=2), dict(stop=[""]), dict(colour="red")])
def test_invalid_options_are_rejected_with_a_message(lm, bad):
    with pytest.raises(MinibloomError, match="invalid|unknown"):
        lm.generate("Hello", **{"max_new_tokens": 4, **bad})


@pytest.mark.parametrize("prompt", ["", "   ", [], [""]])
def test_empty_prompt(lm, prompt):
    with pytest.raises(MinibloomError, match="prompt"):
        lm.generate(prompt, max_new_tokens=4)


def test_request_that_cannot_fit_in_memory_is_refused_before_allocating(lm):
    with pytest.raises(MinibloomError, match="KV cache.*lower max_new_tokens"):
        lm.generate(["Hello"] * 64, max_new_tokens=10**9)


def test_out_of_vocabulary_ids(lm):
    with pytest.raises(MinibloomError, match="outside the vocabulary"):
        lm.generate_ids(torch.tensor([[10**6]]), max_new_tokens=2)
