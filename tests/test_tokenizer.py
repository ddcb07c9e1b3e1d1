"""BLOOM's byte-level BPE tokenizer against transformers', and streaming detokenization."""
import pytest
from transformers import AutoTokenizer

import minibloom
from minibloom.checkpoints import CORPUS, TINY_BLOOM, bloom_checkpoint

TEXTS = CORPUS + ["  leading spaces", "trailing  ", "</s> typed special tokens <pad>", "", "\n\n\t",
                  "mixed 中文 and हिंदी and తెలుగు and عربي and Tiếng Việt 🤖🤖"]


@pytest.fixture(scope="module")
def folder():
    return bloom_checkpoint(TINY_BLOOM)


@pytest.fixture(scope="module")
def tokenizers_pair(folder):
    return minibloom.load(folder, dtype="float32").tokenizer, AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tokenizers_pair, text):
    ours, theirs = tokenizers_pair
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)


def test_no_bos_or_eos_added(tokenizers_pair):
    ours, _ = tokenizers_pair
    assert ours.bos_id == 1 and ours.eos_id == 2 and ours.pad_id == 3
    ids = ours.encode("Hello")
    assert 1 not in ids and 2 not in ids


@pytest.mark.parametrize("text", [t for t in TEXTS if t.strip()])
def test_streaming_pieces_concatenate_to_the_full_decode_without_broken_characters(tokenizers_pair, text):
    ours, _ = tokenizers_pair
    ids = ours.encode(text)
    stream = ours.streamer()
    pieces = [stream.put(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == ours.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_byte_level_splits_a_character_across_tokens(tokenizers_pair):
    """The test tokenizer is small, so emoji and Telugu are split into several byte tokens: the streaming path
    above is really exercised."""
    ours, _ = tokenizers_pair
    ids = ours.encode("🤖")
    assert len(ids) > 1 and any("\ufffd" in ours.decode([i]) for i in ids)
