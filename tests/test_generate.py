"""Generation options: sampling, seeds, stop strings, streaming, batching, validation and memory checks."""
import pytest
import torch

import minibloom
from minibloom import MinibloomError
from minibloom.checkpoints import TINY_BLOOM, TINY_MT5, bloom_checkpoint, mt5_checkpoint
from minibloom.generate import GenerationOptions, apply_repetition_penalty, decode_tokens, sample_filter


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


@pytest.mark.parametrize("family", ["bloom", "mt5"])
def test_finished_rows_leave_the_batch_and_the_rest_is_unchanged(family):
    """Rows that hit EOS stop being computed (the state keeps the running rows only); every row's tokens stay
    those of a run that keeps the whole batch (a compiled step does: a new batch size would recompile it)."""
    folder = bloom_checkpoint(TINY_BLOOM, scale=3.0) if family == "bloom" else mt5_checkpoint(TINY_MT5, scale=2.0)
    lm = minibloom.load(folder, dtype="float32")
    model = lm.model
    ids, mask = lm.encode_batch(["Hello there", "Translate to English: Je t'aime.", "Hi", "一个传奇的开端"])
    opts = GenerationOptions.from_kwargs(dict(max_new_tokens=16, no_repeat_ngram_size=2))
    pad = lm.tokenizer.pad_id
    free = torch.stack(list(decode_tokens(model, ids, mask, opts, None, pad)), 1)
    eos = int(free[0, 3])                      # row 0 ends at its fourth token; other rows may later
    sizes = []
    step = model.step
    model.step = lambda state, tokens: sizes.append(tokens.shape[0]) or step(state, tokens)
    try:
        ours = torch.stack(list(decode_tokens(model, ids, mask, opts, eos, pad)), 1)
        shrunk, sizes[:] = list(sizes), []
        model.compiled_decode = model.decode   # stands in for a compiled step: the batch must keep its size
        whole = torch.stack(list(decode_tokens(model, ids, mask, opts, eos, pad)), 1)
    finally:
        model.step, model.compiled_decode = step, None
    assert torch.equal(ours, whole)
    assert shrunk[0] == 4 and min(shrunk) < 4 and shrunk == sorted(shrunk, reverse=True)
    assert set(sizes) == {4}
    for row in range(4):    # and each row's answer is the one it gets alone
        alone = torch.stack(list(decode_tokens(model, ids[row:row + 1], mask[row:row + 1], opts, eos, pad)), 1)
        assert torch.equal(ours[row, :alone.shape[1]], alone[0])


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
                                 dict(num_return_sequences=3, num_beams=2), dict(stop=[""]), dict(colour="red"),
                                 dict(no_repeat_ngram_size=-1), dict(no_repeat_ngram_size=1.5),
                                 dict(min_new_tokens=-1), dict(min_new_tokens=5),
                                 dict(do_sample=True, temperature=float("inf")),
                                 dict(do_sample=True, temperature=1e-300), dict(temperature="hot"),
                                 dict(top_p=float("nan")), dict(repetition_penalty="1.2"),
                                 dict(num_beams=3, length_penalty=400), dict(num_beams=3, length_penalty=float("nan")),
                                 dict(do_sample=True, seed=2**64), dict(do_sample=True, seed="abc"),
                                 dict(do_sample=True, seed=1.5), dict(stop=5)])
def test_invalid_options_are_rejected_with_a_message(lm, bad):
    with pytest.raises(MinibloomError, match="invalid|unknown"):
        lm.generate("Hello", **{"max_new_tokens": 4, **bad})


@pytest.mark.parametrize("call, message", [
    (lambda lm: lm.generate(None), "a prompt .str. or a list of prompts, got NoneType"),
    (lambda lm: lm.generate(5), "got int"),
    (lambda lm: lm.generate_ids(torch.tensor([[1.0, 2.0]])), "LongTensor.*torch.float32"),
    (lambda lm: lm.generate_ids(torch.zeros(0, 3, dtype=torch.long)), "at least one row"),
    (lambda lm: lm.generate_ids(torch.ones(1, 3, dtype=torch.long, device="meta")), "on meta"),
    (lambda lm: lm.generate_ids(torch.ones(1, 3, dtype=torch.long), [[1, 1, 1]]), "attention_mask must be a tensor"),
    (lambda lm: lm.generate("caf\udce9"), "not valid UTF-8 text .bytes e9 at character 3."),
])
def test_bad_python_inputs_are_one_message(lm, call, message):
    with pytest.raises(MinibloomError, match=message):
        call(lm)


def test_numpy_scalars_and_one_element_tensors_are_numbers(lm):
    import numpy as np
    opts = dict(max_new_tokens=np.int64(5), do_sample=True, temperature=np.float32(0.7), top_p=torch.tensor(0.9),
                seed=np.int64(3))
    assert lm.generate("Hello", **opts) == lm.generate("Hello", max_new_tokens=5, do_sample=True,
                                                       temperature=float(np.float32(0.7)),
                                                       top_p=float(torch.tensor(0.9)), seed=3)
    assert lm.generate("Hello", max_new_tokens=4, temperature=1e-7) == lm.generate("Hello", max_new_tokens=4)


def test_extreme_but_valid_sampling_settings_run(lm):
    """The smallest temperature allowed is greedy decoding in effect; a hot one with banned tokens stays finite."""
    greedy = lm.generate("Hello", max_new_tokens=6)
    assert lm.generate("Hello", max_new_tokens=6, do_sample=True, temperature=1e-6, seed=0) == greedy
    assert isinstance(lm.generate("Hello", max_new_tokens=6, do_sample=True, temperature=1e6, min_new_tokens=3,
                                  no_repeat_ngram_size=1, seed=0), str)


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


def test_kv_cache_buffers_serve_the_next_generation(lm, monkeypatch):
    """A finished generation's huge-page KV buffers are kept (a fresh 2 MiB page costs milliseconds to fault in)
    and the next generation's caches take them: the same buffers, zeroed, and the same tokens."""
    from minibloom import ops
    monkeypatch.setattr(ops, "HUGE_PAGE", 4096)        # the tiny model's caches count as huge-page ones
    monkeypatch.setattr(ops, "_spare_kv", [])
    prompts = ["Translate to English: Je t'aime.", "Hi", "Hello there"]
    first = lm.generate(prompts, max_new_tokens=12)
    spares = {b.data_ptr() for b in ops._spare_kv}
    assert len(spares) == 2 * lm.model.config.n_layer
    assert lm.generate(prompts, max_new_tokens=12) == first
    assert {b.data_ptr() for b in ops._spare_kv} == spares
    assert lm.generate(prompts, max_new_tokens=12, num_beams=2) == lm.generate(prompts, max_new_tokens=12,
                                                                                   num_beams=2)
    monkeypatch.setattr(ops, "SPARE_KV_BYTES", 3 * ops._spare_kv[0].numel())
    lm.generate(prompts, max_new_tokens=12)
    assert len(ops._spare_kv) == 3                     # the rest went back to the OS
