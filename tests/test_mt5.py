"""mT5 / mT0 / T5 against transformers (the oracle), on random-weight checkpoints saved as the Hub stores them."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as RawTokenizer
from transformers import AutoTokenizer

import minibloom
from minibloom import MinibloomError, mt5, ops
from minibloom.checkpoints import (CORPUS, MT0_SMALL, TINY_BLOOM, TINY_MT5, TINY_T5, TINY_T5_V11, bloom_checkpoint,
                                   hf_from_folder, mt5_checkpoint)
from minibloom.generate import GenerationOptions, decode_tokens

PROMPTS = ["Translate to English: Je t'aime.", "一个传奇的开端，一个不灭的神话",
           "Suggest at least five related search terms to \"Mạng neural nhân tạo\".", "Hi"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPES = {"mt5": TINY_MT5, "t5-v1.0": TINY_T5, "t5-v1.1": TINY_T5_V11,
          "mt5-deeper-decoder": dict(TINY_MT5, num_decoder_layers=3)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: a second OpenMP thread costs more than it gives (and spins when the machine is busy)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope="module")
def tiny():
    return mt5_checkpoint(TINY_MT5, scale=2.0)  # larger weights: peakier softmax, sharper tests


def both(folder, dtype):
    return minibloom.load(folder, dtype=dtype, backend="reference"), hf_from_folder(folder, DTYPES[dtype])


def long_batch(seed=0):
    """Encoder inputs of 200 tokens (the far buckets: >= 91 and beyond max_distance 128), right-padded rows,
    and decoder inputs of 140 tokens (the decoder's last bucket starts at 113)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (3, 200), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 150:] = 0
    mask[2, 7:] = 0
    ids[mask == 0] = 0
    dec = torch.randint(3, 500, (3, 140), generator=g)
    dec[:, 0] = 0
    return ids, mask, dec


@pytest.mark.parametrize("variant, dtype", [(v, "float32") for v in SHAPES] +
                         [("mt5", "bfloat16"), ("t5-v1.0", "bfloat16")])
def test_logits_bit_exact_long_padded_batch(variant, dtype):
    lm, hf = both(mt5_checkpoint(SHAPES[variant], scale=2.0), dtype)
    ids, mask, dec = long_batch()
    with torch.no_grad():
        ours = lm.model(ids, mask, decoder_input_ids=dec)
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert ours.dtype == theirs.dtype == DTYPES[dtype] and ours.shape == (3, 140, 1024)
    assert torch.equal(ours, theirs), (ours.float() - theirs.float()).abs().max()


def test_long_inputs_run_the_reference_attention_in_chunks_of_queries(tiny, monkeypatch):
    """Encoder (bidirectional) and decoder (causal) attention in chunks of 7 queries, each with its own part of the
    T5 bias: the logits stay equal to transformers'."""
    lm, hf = both(tiny, "float32")
    ids, mask, dec = long_batch()
    seen = []
    ref = ops.t5_attention_ref
    monkeypatch.setattr(ops, "t5_attention_ref", lambda q, *a: seen.append(q.shape[2]) or ref(q, *a))
    monkeypatch.setattr(ops, "REF_SCORES_BYTES", 7 * 3 * lm.model.config.num_heads * 200 * 4)
    with torch.no_grad():
        ours = lm.model(ids, mask, decoder_input_ids=dec)
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert max(seen) <= 10 and len(seen) > 10
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours - theirs).abs().max()


def test_head_tied_and_rescaled_only_for_original_t5():
    t5 = minibloom.load(mt5_checkpoint(TINY_T5, scale=2.0), dtype="float32").model
    assert t5.lm_head.weight is t5.shared.weight and t5.config.rescale_head
    assert hasattr(t5.encoder.block[0].layer[1].DenseReluDense, "wi")  # ReLU FFN
    for shape in (TINY_MT5, TINY_T5_V11):
        m = minibloom.load(mt5_checkpoint(shape, scale=2.0), dtype="float32").model
        assert m.lm_head.weight is not m.shared.weight and not m.config.rescale_head
        assert not torch.equal(m.lm_head.weight, m.shared.weight)
        assert m.config.inner == 96 != m.config.d_model


def test_decoder_input_defaults_to_the_start_token(tiny):
    lm, hf = both(tiny, "float32")
    ids, mask = lm.encode_batch(PROMPTS)
    with torch.no_grad():
        ours = lm.model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.zeros(4, 1, dtype=torch.long)).logits
    assert ours.shape == (4, 1, 1024) and torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_decoding_matches_transformers_cached_steps_and_the_full_forward(tiny, dtype):
    lm, hf = both(tiny, dtype)
    ids, mask, dec = long_batch(1)
    dec = dec[:, :12]
    calls = []
    lm.model.decoder.block[1].layer[1].EncDecAttention.k.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        full = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.float()
        enc = hf.get_encoder()(input_ids=ids, attention_mask=mask)
        past = None
        logits, state = lm.model.start(ids, mask, max_new_tokens=12)
        for t in range(12):
            out = hf(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, t:t + 1],
                     past_key_values=past, use_cache=True)
            past = out.past_key_values
            assert torch.equal(logits, out.logits[:, -1]), t                 # cached step: bit-exact
            tol = (1e-5 if dtype == "float32" else 0.05) * full.abs().max()  # full forward: other GEMM shapes
            assert (logits.float() - full[:, t]).abs().max() <= tol, t
            if t < 11:
                logits = lm.model.step(state, dec[:, t + 1])
    assert len(calls) == 1  # cross-attention K/V: projected once per prompt, not per step


def after_eos(seq, eos):
    """Positions after a row's first EOS (transformers pads those with its own fill value)."""
    hit = (seq == eos).long()
    return hit.cumsum(1) - hit > 0


def frequent_token(lm, ids, mask):
    """A token the random model emits often: used as EOS so that rows really finish early."""
    return int(torch.mode(lm.generate_ids(ids, mask, max_new_tokens=12).flatten()).values)


def test_greedy_generation_matches_transformers_with_early_eos(tiny):
    lm, hf = both(tiny, "float32")
    ids, mask = lm.encode_batch(PROMPTS)
    frequent = frequent_token(lm, ids, mask)
    for eos, options in [(1, {}), (frequent, {}), (1, dict(repetition_penalty=1.3)),
                         (frequent, dict(no_repeat_ngram_size=2)), (frequent, dict(min_new_tokens=5))]:
        opts = GenerationOptions.from_kwargs(dict(max_new_tokens=24, **options))
        ours = torch.stack(list(decode_tokens(lm.model, ids, mask, opts, eos, 0)), 1)
        with torch.no_grad():
            theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                 eos_token_id=eos, pad_token_id=0, **options)[:, 1:]
        assert torch.equal(ours, theirs), (eos, options)
        if eos != 1:   # rows really finished early, and are padded with <pad> afterwards, as in transformers
            assert after_eos(ours, eos).any() and (ours[after_eos(ours, eos)] == 0).all()


def test_generate_text_and_stream_agree(tiny):
    lm = minibloom.load(tiny, dtype="float32", backend="reference")
    text = lm.generate(PROMPTS[0], max_new_tokens=16)
    assert isinstance(text, str) and text
    assert "".join(lm.stream(PROMPTS[0], max_new_tokens=16)) == text
    assert lm.generate(PROMPTS, max_new_tokens=8, num_beams=2, num_return_sequences=2).__len__() == 8


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_fp16_does_not_overflow_and_stays_close_to_fp32(backend):
    """FFN output weights scaled by 5e4: the residual stream leaves fp16's range (65504)."""
    folder = mt5_checkpoint(TINY_MT5, wo_scale=5e4, seed=1)
    ids, mask, dec = long_batch(2)
    ids, mask, dec = ids[:, :60], mask[:, :60], dec[:, :20]
    fp32 = hf_from_folder(folder, torch.float32)
    plain_half = hf_from_folder(folder, torch.float32).half()   # every weight fp16 (transformers' inf clamp left on)
    ours16 = minibloom.load(folder, dtype="float16", backend=backend)
    oursbf = minibloom.load(folder, dtype="bfloat16", backend="reference")
    naive = minibloom.load(folder, dtype="float16", backend="reference")
    for m in naive.model.modules():
        if isinstance(m, mt5.Linear):
            m.w_l1 = 0.0   # no input scaling: plain fp16 matmuls
    with torch.no_grad():
        ref = fp32(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        run = lambda m: m(ids, mask, decoder_input_ids=dec)
        got, bf, bad = run(ours16.model), run(oursbf.model), run(naive.model)
        clamped = plain_half(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert not bad.isfinite().all(), "the naive fp16 run must overflow for this test to mean anything"
    assert got.isfinite().all()
    err = (got - ref).abs().max()
    assert err <= (bf.float() - ref).abs().max()                 # better than bf16 ...
    assert err < 0.01 * ref.abs().max()                          # ... and well under 1% of the logit range
    assert err * 20 < (clamped.float() - ref).abs().nan_to_num(float("inf")).max()   # clamping is garbage
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95   # random logits have near-ties
    assert ours16.model.lm_head.weight.dtype == torch.float16   # no fp32 copy of any weight
    assert all(p.dtype == torch.float16 for p in ours16.model.parameters())
    assert ours16.generate(PROMPTS[:2], max_new_tokens=6)


@pytest.fixture(scope="module")
def tokenizers(tiny):
    return (minibloom.load(tiny, dtype="float32").tokenizer, AutoTokenizer.from_pretrained(tiny),
            RawTokenizer.from_file(str(tiny / "tokenizer.json")))


TEXTS = CORPUS + ["  leading spaces", "trailing  ", "a  b\n\nc\td", "</s> typed special tokens <pad>", "",
                  "The <extra_id_0> walks in <extra_id_1> park.", "mixed 中文 and हिंदी and తెలుగు and عربي 🤖"]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(tokenizers, text):
    ours, theirs, raw = tokenizers
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"] and ids[-1] == 1          # </s> appended
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
    plain = " " * 2 not in text and not any(c in text for c in "\n\t") and text == text.strip()
    if plain and "</s>" not in text and "<pad>" not in text:
        assert ids == raw.encode(text).ids   # where the file's pipeline and transformers 5's agree


def test_sentinels_encode_to_their_ids_and_decode_back(tokenizers):
    ours, theirs, _ = tokenizers
    s0, s1 = theirs.convert_tokens_to_ids("<extra_id_0>"), theirs.convert_tokens_to_ids("<extra_id_1>")
    assert s0 == s1 + 1 == ours.vocab_size - 1   # <extra_id_0> is the last piece, as in mT5
    ids = ours.encode("The <extra_id_0> walks in <extra_id_1> park.")
    assert s0 in ids and s1 in ids
    assert ours.decode(ids) == "The <extra_id_0> walks in <extra_id_1> park."
    assert ours.pad_id == 0 and ours.eos_id == 1


def test_loads_sharded_with_redundant_embedding_copies():
    folder = mt5_checkpoint(TINY_MT5, scale=2.0, shards=3, embed_copies=True)
    assert "encoder.embed_tokens.weight" in json.loads((folder / "model.safetensors.index.json").read_text())[
        "weight_map"]
    lm, hf = both(folder, "float32")
    ids, mask, dec = long_batch()
    with torch.no_grad():
        assert torch.equal(lm.model(ids, mask, decoder_input_ids=dec),
                           hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)


def rewrite(src, dst, drop=(), rename=None):
    dst.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (dst / name).write_text((src / name).read_text())
    sd = load_file(str(src / "model.safetensors"))
    sd = {(rename or {}).get(k, k): v for k, v in sd.items() if k not in drop}
    save_file(sd, str(dst / "model.safetensors"))
    return dst


def test_embedding_from_an_alias_never_from_lm_head(tiny, tmp_path):
    alias = rewrite(tiny, tmp_path / "alias", rename={"shared.weight": "decoder.embed_tokens.weight"})
    lm = minibloom.load(alias, dtype="float32")
    ref = minibloom.load(tiny, dtype="float32")
    assert torch.equal(lm.model.shared.weight, ref.model.shared.weight)
    none = rewrite(tiny, tmp_path / "none", drop={"shared.weight"})
    with pytest.raises(MinibloomError, match="shared.weight"):
        minibloom.load(none, dtype="float32")   # lm_head.weight is there, but it is not the input embedding


def test_bad_inputs_get_clear_messages(tiny, tmp_path):
    lm = minibloom.load(tiny, dtype="float32")
    ids, mask = lm.encode_batch(PROMPTS[:2])
    with pytest.raises(MinibloomError, match="decoder_input_ids"):
        lm.model(ids, mask, decoder_input_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(MinibloomError, match="vocabulary"):
        lm.generate_ids(ids + 5000, mask)
    with pytest.raises(MinibloomError, match="beam search"):
        list(lm.stream("Hi", num_beams=2))
    bloom = minibloom.load(bloom_checkpoint(TINY_BLOOM), dtype="float32")
    with pytest.raises(MinibloomError, match="decoder-only"):
        bloom.trace("Hello", decoder_prompt="Bonjour")
    cfg = json.loads((tiny / "config.json").read_text())
    bad = rewrite(tiny, tmp_path / "bad")
    (bad / "config.json").write_text(json.dumps(dict(cfg, feed_forward_proj="gated-tanh-x")))
    with pytest.raises(MinibloomError, match="feed_forward_proj"):
        minibloom.load(bad)


def test_trace_names_both_stacks(tiny):
    lm = minibloom.load(tiny, dtype="float32")
    taps = lm.trace("Translate to English: Je t'aime.", decoder_prompt="I love")
    assert list(taps)[:2] == ["encoder.embeddings", "encoder.block.0"]
    assert {"encoder.final_layer_norm", "decoder.block.1", "decoder.final_layer_norm", "logits"} <= set(taps)
    assert taps["logits"].shape[1] == len(lm.tokenizer.encode("I love"))   # start token + the prompt minus </s>
    assert lm.model.taps is None


@pytest.fixture(scope="module")
def mt0_small_shape():
    return mt5_checkpoint(MT0_SMALL)   # ~1.2 GB fp32: built once, cached


def test_mt0_small_shape_parity(mt0_small_shape):
    """The real configuration: d_model 512, d_ff 1024, 6 heads x d_kv 64 = 384, 8 + 8 layers, vocab 250112."""
    lm, hf = both(mt0_small_shape, "float32")
    ids, mask = lm.encode_batch(PROMPTS[:2])
    dec = torch.tensor([[0, 5, 17, 99], [0, 8, 250099, 3]])
    with torch.no_grad():
        ours = lm.model(ids, mask, decoder_input_ids=dec)
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert (ours - theirs).abs().max() <= 1e-4
        greedy = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)[:, 1:]
    assert torch.equal(lm.generate_ids(ids, mask, max_new_tokens=6), greedy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_half_precision_close_to_fp32(tiny, dtype):
    lm = minibloom.load(tiny, dtype=dtype, device="cuda", backend="reference")
    hf = hf_from_folder(tiny, torch.float32)
    ids, mask, dec = long_batch()
    with torch.no_grad():
        ours = lm.model(ids.cuda(), mask.cuda(), decoder_input_ids=dec.cuda()).float().cpu()
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert ours.isfinite().all()
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()
