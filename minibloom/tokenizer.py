"""tokenizer.json through the `tokenizers` library, plus streaming detokenization.

BLOOM: byte-level BPE, no BOS/EOS added, prompts left-padded with <pad>.
mT5/mT0/T5: Unigram with Metaspace; every encoded text ends with </s>; the decoder starts from <pad> (id 0).
The sentinels <extra_id_N> are ordinary pieces of the mT5 vocabulary: decoding keeps them.
"""
import base64
import json
from pathlib import Path

from .errors import MinibloomError


class Tokenizer:
    def __init__(self, folder: Path, config: dict):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise MinibloomError(f"{folder} has no tokenizer.json: copy the model's tokenizer.json next to its "
                                 f"config.json (minibloom reads only tokenizer.json)")
        try:
            self.backend = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise MinibloomError(f"cannot read {path}: {e}. Re-download it") from e
        data = json.loads(path.read_text())
        self.is_unigram = data.get("model", {}).get("type") == "Unigram"
        if self.is_unigram and config.get("model_type") in ("t5", "mt5"):
            _t5_pipeline(self.backend, data)
        self.eos_id = _first_int(config.get("eos_token_id"), self.backend.token_to_id("</s>"))
        self.pad_id = _first_int(config.get("pad_token_id"), self.backend.token_to_id("<pad>"), 0)
        self.bos_id = _first_int(config.get("bos_token_id"), None)
        self.special_ids = {i for i in (self.eos_id, self.pad_id, self.bos_id, self.backend.token_to_id("<unk>"))
                            if i is not None}
        # Special tokens that the tokenizer.json marks as such (added tokens with "special": true).
        for tok in json.loads(path.read_text()).get("added_tokens", []):
            if tok.get("special"):
                self.special_ids.add(tok["id"])
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids, with the special tokens the checkpoint's pipeline adds (</s> for T5-family models)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8 (argv, stdin), or a bad str
            try:
                bad = "bytes " + text[e.start:e.end].encode("utf-8", "surrogateescape").hex(" ")
            except UnicodeEncodeError:
                bad = ascii(text[e.start:e.end])
            raise MinibloomError(f"the prompt is not valid UTF-8 text ({bad} at character {e.start}): "
                                 f"convert it to UTF-8 (e.g. iconv -t UTF-8)") from None
        return self.backend.encode(text).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def streamer(self) -> "StreamDecoder":
        return StreamDecoder(self)


def _t5_pipeline(backend, data: dict):
    """Rebuild the pipeline as transformers 5's T5Tokenizer does, rather than take tokenizer.json's (the two
    differ on runs of spaces, tabs and newlines): the file's SentencePiece charsmap as the only normalizer, split
    on any whitespace, then Metaspace ("▁" before every word). The vocabulary and the </s> template stay."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    norm = data.get("normalizer") or {}
    parts = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    charsmap = next((p["precompiled_charsmap"] for p in parts
                     if p.get("type") == "Precompiled" and p.get("precompiled_charsmap")), None)
    backend.normalizer = normalizers.Precompiled(base64.b64decode(charsmap)) if charsmap else normalizers.Sequence([])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)


def _first_int(*values):
    for v in values:
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int):
            return v
    return None


class StreamDecoder:
    """Turns a growing list of token ids into text pieces that are safe to print.

    Byte-level BPE can split one UTF-8 character over several tokens, and a Metaspace/Unigram decoder drops the
    leading space of the first piece. So we decode the whole tail since the last emitted point and emit only the
    new text once it no longer ends in U+FFFD (an incomplete character). The pieces concatenate to exactly
    decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of the character
        return self._emit(text)

    def flush(self) -> str:
        return self._emit(self.tok.decode(self.ids))

    def _emit(self, text: str) -> str:
        if not text.startswith(self.emitted):
            # A decoder that rewrites earlier text (rare): emit nothing new rather than repeat or corrupt.
            common = 0
            while common < min(len(text), len(self.emitted)) and text[common] == self.emitted[common]:
                common += 1
            self.emitted = text[:common]
        piece = text[len(self.emitted):]
        self.emitted = text
        return piece
