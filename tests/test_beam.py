"""Beam search (minibloom/beam.py) against transformers' generate(num_beams=...), both families: same tokens, same
sequences_scores. EOS is set to a token the random model emits often, so that hypotheses really finish early."""
import pytest
import torch

import minibloom
from minibloom import MinibloomError
from minibloom.beam import beam_search
from minibloom.checkpoints import TINY_BLOOM, TINY_MT5, bloom_checkpoint, hf_from_folder, mt5_checkpoint
from minibloom.generate import GenerationOptions, decode_tokens
from test_mt5 import one_thread  # noqa: F401 (autouse fixture: tiny models run single-threaded)

PROMPTS = ["Translate to English: Je t'aime.", "一个传奇的开端，一个不灭的神话",
           "Suggest at least five related search terms to \"Mạng neural nhân tạo\".", "Hi"]
OPTIONS = [dict(), dict(length_penalty=0.5, early_stopping=True), dict(early_stopping="never", length_penalty=2.0),
           dict(num_return_sequences=4, length_penalty=-1.0), dict(repetition_penalty=1.3),
           dict(no_repeat_ngram_size=2), dict(min_new_tokens=3, no_repeat_ngram_size=2)]


@pytest.fixture(scope="module", params=["mt5", "bloom"])
def family(request):
    folder = (mt5_checkpoint(TINY_MT5, scale=2.0) if request.param == "mt5"
              else bloom_checkpoint(TINY_BLOOM, scale=3.0))
    lm = minibloom.load(folder, dtype="float32", backend="reference")
    ids, mask = lm.encode_batch(PROMPTS)
    eos = int(torch.mode(lm.generate_ids(ids, mask, max_new_tokens=12).flatten()).values)
    return lm, hf_from_folder(folder, torch.float32), ids, mask, eos


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_beams_match_transformers_tokens_and_scores(family, options):
    lm, hf, ids, mask, eos = family
    pad = lm.tokenizer.pad_id
    opts = GenerationOptions.from_kwargs(dict(num_beams=4, max_new_tokens=16, **options))
    ours, scores = beam_search(lm.model, ids, mask, opts, eos, pad, return_scores=True)
    if not (ours == eos).any():   # n-gram blocking moves the answers away: EOS must be a token they still emit
        free = torch.stack(list(decode_tokens(lm.model, ids, mask, GenerationOptions.from_kwargs(
            dict(max_new_tokens=16, **options)), None, pad)), 1)
        for eos in torch.bincount(free[:, opts.min_new_tokens:].flatten()).argsort(descending=True)[:10].tolist():
            ours, scores = beam_search(lm.model, ids, mask, opts, eos, pad, return_scores=True)
            if (ours == eos).any():
                break
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, num_beams=4, max_new_tokens=16, do_sample=False,
                          eos_token_id=eos, pad_token_id=pad, output_scores=True, return_dict_in_generate=True,
                          **options)
    theirs = out.sequences[:, 1:] if lm.is_encoder_decoder else out.sequences[:, ids.shape[1]:]
    hit = (theirs == eos).long()
    theirs = theirs.masked_fill(hit.cumsum(1) - hit > 0, pad)   # transformers fills T5 rows with EOS, we with pad
    assert torch.equal(ours, theirs)
    assert torch.equal(scores, out.sequences_scores)
    if options.get("early_stopping") != "never":
        assert (ours == eos).any(), "some hypotheses must finish early for this test to mean anything"


def test_lm_generate_ids_with_beams_returns_best_first(family):
    lm, _, ids, mask, _ = family
    out = lm.generate_ids(ids, mask, max_new_tokens=8, num_beams=3, num_return_sequences=2)
    assert out.shape[0] == 2 * len(PROMPTS) and out.shape[1] <= 8
    best = lm.generate_ids(ids, mask, max_new_tokens=8, num_beams=3)
    assert torch.equal(out[::2, :best.shape[1]], best)


def test_bad_beam_options(family):
    lm, _, ids, mask, _ = family
    with pytest.raises(MinibloomError, match="num_return_sequences"):
        lm.generate_ids(ids, mask, num_beams=2, num_return_sequences=3)
    with pytest.raises(MinibloomError, match="early_stopping"):
        lm.generate_ids(ids, mask, num_beams=2, early_stopping="sometimes")
