"""BLOOM against transformers (the oracle), on random-weight checkpoints saved as the Hub stores them."""
import pytest
import torch

import minibloom
from minibloom import ops
from minibloom.checkpoints import BLOOMZ_560M, TINY_BLOOM, bloom_checkpoint, hf_from_folder
from minibloom.generate import GenerationOptions, decode_tokens

PROMPTS = ["Translate to English: Je t'aime.", "一个传奇的开端，一个不灭的神话",
           "Suggest at least five related search terms to \"Mạng neural nhân tạo\".", "Hi"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def tiny():
    return bloom_checkpoint(TINY_BLOOM, scale=3.0)  # larger weights: peakier softmax, sharper tests


def both(folder, dtype):
    lm = minibloom.load(folder, dtype=dtype, backend="reference")
    return lm, hf_from_folder(folder, DTYPES[dtype])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_logits_bit_exact_left_padded_batch(tiny, dtype):
    lm, hf = both(tiny, dtype)
    ids, mask = lm.encode_batch(PROMPTS)
    assert (mask[:, 0] == 0).any(), "the batch must contain left padding"
    with torch.no_grad():
        ours = lm.model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert ours.dtype == theirs.dtype == DTYPES[dtype]
    valid = mask.bool()
    assert torch.equal(ours[valid], theirs[valid]), (ours[valid] - theirs[valid]).abs().max()


@pytest.mark.parametrize("n_head", [6, 12, 112])
def test_alibi_slopes_any_head_count(n_head):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
    assert torch.equal(ops.alibi_slopes(n_head), _get_alibi_slopes(n_head, "cpu"))


def test_alibi_slopes_112_heads_closed_form():
    s = ops.alibi_slopes(112)
    assert torch.allclose(s[:64], 2 ** (-(torch.arange(64) + 1) / 8), rtol=1e-6)
    assert torch.allclose(s[64:], 2 ** (-(2 * torch.arange(48) + 1) / 16), rtol=1e-6)


def test_non_power_of_two_heads_bit_exact():
    folder = bloom_checkpoint(dict(vocab_size=640, hidden_size=96, n_layer=2, n_head=12), seed=1)
    lm, hf = both(folder, "float32")
    ids, mask = lm.encode_batch(PROMPTS[:2])
    with torch.no_grad():
        assert torch.equal(lm.model(ids, mask)[mask.bool()], hf(input_ids=ids, attention_mask=mask).logits[mask.bool()])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_left_padded_row_equals_row_alone(tiny, dtype):
    lm = minibloom.load(tiny, dtype=dtype, backend="reference")
    ids, mask = lm.encode_batch(PROMPTS)
    with torch.no_grad():
        batch = lm.model(ids, mask)
        for b, p in enumerate(PROMPTS):
            alone_ids, _ = lm.encode_batch([p])
            alone = lm.model(alone_ids)[0]
            got = batch[b, mask[b].bool()]
            if dtype == "float32":
                torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
            else:  # different batch shapes take different GEMM blockings: bf16 rounding differs slightly
                assert (got.float() - alone.float()).abs().max() < 0.1
                assert torch.equal(got.argmax(-1), alone.argmax(-1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_decoding_matches_full_forward_every_step(tiny, dtype):
    lm = minibloom.load(tiny, dtype=dtype, backend="reference")
    ids, mask = lm.encode_batch(PROMPTS[:3])
    torch.manual_seed(0)
    extra = torch.randint(4, 600, (3, 6))
    with torch.no_grad():
        logits, state = lm.model.start(ids, mask, max_new_tokens=6)
        full_ids, full_mask = ids, mask
        for t in range(6):
            full = lm.model(full_ids, full_mask)[:, -1]
            tol = 1e-5 if dtype == "float32" else 0.05
            assert (logits.float() - full.float()).abs().max() <= tol, t
            logits = lm.model.step(state, extra[:, t])
            full_ids = torch.cat([full_ids, extra[:, t:t + 1]], 1)
            full_mask = torch.cat([full_mask, torch.ones(3, 1, dtype=torch.long)], 1)


def test_greedy_generation_matches_transformers_64_tokens(tiny):
    lm, hf = both(tiny, "float32")
    ids, mask = lm.encode_batch(PROMPTS)
    ours = lm.generate_ids(ids, mask, max_new_tokens=64)
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                             eos_token_id=2, pad_token_id=3)[:, ids.shape[1]:]
    assert torch.equal(ours, theirs)


def test_greedy_with_repetition_penalty_matches_transformers(tiny):
    lm, hf = both(tiny, "float32")
    ids, mask = lm.encode_batch(PROMPTS[:2])
    ours = lm.generate_ids(ids, mask, max_new_tokens=24, repetition_penalty=1.3)
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                             repetition_penalty=1.3, eos_token_id=2, pad_token_id=3)[:, ids.shape[1]:]
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("options", [dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=1),
                                     dict(min_new_tokens=5, no_repeat_ngram_size=2),
                                     dict(min_new_tokens=4, repetition_penalty=1.2, no_repeat_ngram_size=3)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_greedy_options_match_transformers_with_early_eos(tiny, options):
    """EOS is a frequent token of the random model's answers that ends a row under these options, so that rows
    finish early (and leave the batch)."""
    lm, hf = both(tiny, "float32")
    ids, mask = lm.encode_batch(PROMPTS)
    opts = GenerationOptions.from_kwargs(dict(max_new_tokens=24, **options))
    free = torch.stack(list(decode_tokens(lm.model, ids, mask, opts, None, 3)), 1)   # no EOS at all
    for eos in torch.bincount(free[:, opts.min_new_tokens:].flatten()).argsort(descending=True)[:10].tolist():
        ours = torch.stack(list(decode_tokens(lm.model, ids, mask, opts, eos, 3)), 1)
        if (ours == eos).any():
            break
    assert (ours == eos).any(), "no frequent token ends a row: the test would not test early EOS"
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                             eos_token_id=eos, pad_token_id=3, **options)[:, ids.shape[1]:]
    assert torch.equal(ours, theirs)


def test_repetition_penalty_leaves_out_left_padding_as_transformers(tiny):
    """transformers 5 does not penalize the tokens of a prompt's left padding: pad a row with the very token it
    picks next under the penalty, so that penalizing the padding would change the answer."""
    lm, hf = both(tiny, "float32")
    ids, mask = lm.encode_batch([PROMPTS[0], PROMPTS[3]])
    row = int((mask[:, 0] == 0).nonzero()[0, 0])                      # a left-padded row
    favourite = int(lm.generate_ids(ids, mask, max_new_tokens=1, repetition_penalty=5.0)[row, 0])
    assert favourite not in ids[row, mask[row] == 1].tolist()
    ids = ids.masked_fill(mask == 0, favourite)
    ours = lm.generate_ids(ids, mask, max_new_tokens=8, repetition_penalty=5.0)
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             repetition_penalty=5.0, eos_token_id=2, pad_token_id=3)[:, ids.shape[1]:]
    assert torch.equal(ours, theirs)
    assert ours[row, 0] == favourite


@pytest.fixture(scope="module")
def bloomz_560m_shape():
    return bloom_checkpoint(BLOOMZ_560M, dtype=torch.float16)


def test_bloomz_560m_shape_parity(bloomz_560m_shape):
    """The real configuration: hidden 1024, 24 layers, 16 heads, vocab 250880 (random weights, fp16 on disk)."""
    lm, hf = both(bloomz_560m_shape, "float32")
    assert lm.model.lm_head.weight is lm.model.word_embeddings.weight  # tied, as the Hub files imply
    ids, mask = lm.encode_batch(PROMPTS[:2])
    with torch.no_grad():
        ours = lm.model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (ours[valid] - theirs[valid]).abs().max() <= 1e-4
    del hf
    ours = lm.generate_ids(ids, mask, max_new_tokens=8)
    assert ours.shape == (2, 8)


def test_trace_returns_named_intermediates_and_costs_nothing_after(tiny):
    lm = minibloom.load(tiny, dtype="float32", backend="reference")
    taps = lm.trace("Translate to English: Je t'aime.")
    assert list(taps)[:2] == ["embeddings", "h.0"] and "ln_f" in taps and "logits" in taps
    assert len([k for k in taps if k.startswith("h.")]) == lm.model.config.n_layer
    assert lm.model.taps is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_recipe_half_precision_close_to_transformers(tiny, dtype):
    """The model cards' GPU recipe: fp16/bf16 on one GPU. GPU kernels differ from CPU: not bit-exact."""
    lm = minibloom.load(tiny, dtype=dtype, device="cuda", backend="reference")
    hf = hf_from_folder(tiny, DTYPES[dtype]).cuda()
    ids, mask = lm.encode_batch(PROMPTS)
    with torch.no_grad():
        ours = lm.model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (ours[valid].float() - theirs[valid].float()).abs().max() < (0.1 if dtype == "bfloat16" else 0.03)
    assert lm.generate(PROMPTS, max_new_tokens=8)


def test_encoder_decoder_only_arguments_get_a_clear_message(tiny):
    lm = minibloom.load(tiny, dtype="float32")
    ids, mask = lm.encode_batch(["Hi"])
    with pytest.raises(minibloom.MinibloomError, match="decoder-only"):
        lm.model(ids, mask, decoder_input_ids=ids)


def test_float_integers_in_config_are_accepted():
    from minibloom.bloom import BloomConfig
    assert BloomConfig.from_dict({"vocab_size": 640.0, "n_embed": 64, "n_layer": 2, "n_head": 4}).vocab_size == 640
    with pytest.raises(minibloom.MinibloomError, match="n_layer must be int"):
        BloomConfig.from_dict({"n_layer": "two", "n_head": 4})


def test_long_prompts_run_the_reference_attention_in_chunks_of_queries(tiny, monkeypatch):
    """Above ops.REF_SCORES_BYTES of (B, H, T, S) scores the reference attends chunks of queries (a 14k-token
    prompt took 12 GB in one piece): the logits stay equal to transformers'."""
    lm, hf = both(tiny, "float32")
    ids, mask = lm.encode_batch(PROMPTS)
    B, T = ids.shape
    seen = []
    ref = ops.alibi_attention_ref
    monkeypatch.setattr(ops, "alibi_attention_ref", lambda q, *a: seen.append(q.shape[2]) or ref(q, *a))
    monkeypatch.setattr(ops, "REF_SCORES_BYTES", 3 * B * lm.model.config.n_head * T * 4)   # 3 queries a chunk
    with torch.no_grad():
        ours = lm.model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert max(seen) == 3 and len(seen) == lm.model.config.n_layer * -(-T // 3)
    valid = mask.bool()
    assert torch.allclose(ours[valid], theirs[valid], rtol=0, atol=1e-5), (ours[valid] - theirs[valid]).abs().max()
