"""Random-weight checkpoints of real shapes, for the tests and the bench (never used by the runtime path).

transformers builds the models (it is imported inside the functions, only here); they are saved the way the Hub
stores them, with tokenizer.json files trained with `tokenizers` on the real models' pipelines. Nothing is
downloaded. Builds are cached in $MINIBLOOM_CACHE (default ~/.cache/minibloom/checkpoints).
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

CACHE = Path(os.environ.get("MINIBLOOM_CACHE", Path.home() / ".cache" / "minibloom" / "checkpoints"))

# Multilingual text for training tokenizers and for tokenizer parity tests.
CORPUS = [
    "Translate to English: Je t'aime.", "Explain in a sentence in Telugu what is backpropagation in neural networks.",
    "Suggest at least five related search terms to \"Mạng neural nhân tạo\".",
    "Write a fairy tale about a troll saving a princess from a dangerous dragon.",
    "一个传奇的开端，一个不灭的神话，这不仅仅是一部电影，而是作为一个走进新时代的标签，永远彪炳史册。",
    "Why is the sky blue? Because of Rayleigh scattering of sunlight in the atmosphere.",
    "हिंदी भारत की राजभाषा है और यह देवनागरी लिपि में लिखी जाती है।",
    "తెలుగు ఒక ద్రావిడ భాష. ఇది ఆంధ్ర ప్రదేశ్ మరియు తెలంగాణ రాష్ట్రాల అధికార భాష.",
    "اللغة العربية هي أكثر اللغات السامية تحدثا، وإحدى أكثر اللغات انتشارا في العالم.",
    "Tiếng Việt là ngôn ngữ chính thức của Việt Nam, với khoảng 85 triệu người nói.",
    "Emoji: 😀 🎉 👍🏽 🇫🇷 ❤️ — and “quotes”, tabs\tand\nnew lines.  Double  spaces.",
    "Is this review positive or negative? Review: this is the best cast iron skillet you will ever buy.",
    "Les réseaux de neurones apprennent par rétropropagation du gradient. Ça marche très bien!",
    "Die Katze sitzt auf der Matte. Der schnelle braune Fuchs springt über den faulen Hund.",
    "¿Dónde está la biblioteca? La biblioteca está cerca de la plaza mayor, a la derecha.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "日本語の文章も少し含めます。東京は日本の首都です。",
    "def f(x):\n    return x * 2  # code, too\n",
]


def _digest(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _cached(name: str, key, build) -> Path:
    """Build once into CACHE/<name>-<hash>, atomically; later runs reuse it."""
    folder = CACHE / f"{name}-{_digest(key)}"
    if (folder / ".done").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".done").touch()
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


# -- tokenizers --------------------------------------------------------------------------------------------------------

def bloom_tokenizer_json(vocab_size: int = 600) -> dict:
    """A byte-level BPE tokenizer with BLOOM's pipeline (tokenizer.json of bigscience/bloom*)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" ?[^(\\s|[.,!?…。，、।۔،])]+"), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return json.loads(tok.to_str())


def write_bloom_tokenizer(folder: Path, vocab_size: int = 600):
    (folder / "tokenizer.json").write_text(json.dumps(bloom_tokenizer_json(vocab_size), ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BloomTokenizer", "padding_side": "left", "add_prefix_space": False,
        "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))


# -- BLOOM -----------------------------------------------------------------------------------------------------------

TINY_BLOOM = dict(vocab_size=640, hidden_size=64, n_layer=3, n_head=4)
BLOOMZ_560M = dict(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16)
BLOOMZ_1B7 = dict(vocab_size=250880, hidden_size=2048, n_layer=24, n_head=16)    # head dim 128
BLOOMZ_3B = dict(vocab_size=250880, hidden_size=2560, n_layer=30, n_head=32)     # head dim 80


def hf_bloom(shape: dict, seed: int = 0, scale: float = 1.0):
    """A transformers BloomForCausalLM with random weights (std 0.02 * scale, LayerNorms perturbed too)."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    cfg = BloomConfig(**shape, layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = BloomForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
            else:
                p.mul_(scale)
    return model


def save_bloom(model, folder: Path, *, layout: str = "hub", shards: int = 1, dtype=torch.float16,
               legacy_config: bool = True, shard_style: str = "dash"):
    """Save as on the Hub. layout "hub": bigscience's keys without prefix and no lm_head.weight;
    "prefixed": keys of BloomForCausalLM.save_pretrained ("transformer." prefix)."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if layout == "hub":
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    _save_safetensors(sd, folder, shards, shard_style)
    cfg = model.config.to_dict()
    cfg = {k: v for k, v in cfg.items() if k not in ("transformers_version",)}
    cfg["model_type"] = "bloom"
    cfg["torch_dtype"] = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    cfg.pop("dtype", None)
    if legacy_config:  # bigscience's config.json uses the old names
        cfg["n_embed"] = cfg.pop("hidden_size")
        cfg["num_attention_heads"] = cfg.pop("n_head")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def _save_safetensors(sd: dict, folder: Path, shards: int, style: str):
    if shards == 1:
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = list(sd)
    per = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        sep = "-" if style == "dash" else "_"
        name = f"model{sep}{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def bloom_checkpoint(shape: dict = TINY_BLOOM, *, layout="hub", shards=1, dtype=torch.float32, seed=0,
                     scale=1.0, legacy_config=True, shard_style="dash") -> Path:
    key = ("bloom", shape, layout, shards, str(dtype), seed, scale, legacy_config, shard_style, 3)

    def build(folder):
        save_bloom(hf_bloom(shape, seed, scale), folder, layout=layout, shards=shards, dtype=dtype,
                   legacy_config=legacy_config, shard_style=shard_style)
        write_bloom_tokenizer(folder)
    return _cached("bloom", key, build)


def hf_from_folder(folder: Path, dtype=torch.float32):
    """transformers' model for a checkpoint folder, eager attention, explicit dtype (the parity oracle)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = json.loads((Path(folder) / "config.json").read_text())
    cls = AutoModelForSeq2SeqLM if cfg["model_type"] in ("t5", "mt5") else AutoModelForCausalLM
    return cls.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()


# -- T5 family: mT5 / mT0, T5 v1.1 / Flan-T5, original T5 ------------------------------------------------------------

# The same architecture in several shapes. inner = num_heads * d_kv differs from d_model in TINY_MT5 and MT0_SMALL,
# as in mt0-small.
TINY_MT5 = dict(model_type="mt5", vocab_size=1024, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2,
                num_heads=6, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
TINY_T5_V11 = dict(TINY_MT5, model_type="t5")                # T5 v1.1 / Flan-T5: untied
TINY_T5 = dict(model_type="t5", vocab_size=1024, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
               feed_forward_proj="relu", tie_word_embeddings=True)                   # T5 v1.0: ReLU, tied + rescale
MT0_SMALL = dict(model_type="mt5", vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False)
MT0_BASE = dict(MT0_SMALL, d_model=768, d_ff=2048, num_layers=12, num_heads=12)


def hf_mt5(shape: dict, seed: int = 0, scale: float = 1.0, wo_scale: float = 1.0):
    """A transformers MT5/T5ForConditionalGeneration with random weights (linear weights * scale, RMSNorm weights
    perturbed, a relative bias of std 1 so that the buckets matter). An untied shape gets its own lm_head.weight:
    transformers 5 ties every freshly built MT5, so we untie by construction.
    wo_scale multiplies the FFN output weights: large values grow the residual stream past fp16's range, as in
    the real mT5 checkpoints."""
    from transformers import MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

    shape = dict(shape)
    model_type, tied = shape.pop("model_type"), shape.pop("tie_word_embeddings")
    config_cls, model_cls = ((MT5Config, MT5ForConditionalGeneration) if model_type == "mt5"
                             else (T5Config, T5ForConditionalGeneration))
    torch.manual_seed(seed)
    cfg = config_cls(**shape, tie_word_embeddings=tied, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif "relative_attention_bias" in name:
                p.normal_(0, 1.0)
            elif name != "shared.weight":
                p.mul_(scale * (wo_scale if name.endswith(".wo.weight") else 1.0))
        if not tied:
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * scale)
    return model


def save_t5(model, folder: Path, *, shards: int = 1, dtype=torch.float32, embed_copies: bool = False,
            shard_style: str = "dash"):
    """Save as on the Hub: shared.weight, encoder.*, decoder.*, and lm_head.weight when the head is untied (mT5).
    embed_copies: also store encoder/decoder.embed_tokens.weight as separate copies, as some checkpoints do."""
    folder.mkdir(parents=True, exist_ok=True)
    shared = model.shared.weight
    tied = model.lm_head.weight is shared
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("embed_tokens.weight") and not embed_copies or k == "lm_head.weight" and tied:
            continue
        sd[k] = v.detach().to(dtype).clone().contiguous()
    _save_safetensors(sd, folder, shards, shard_style)
    cfg = {k: v for k, v in model.config.to_dict().items()
           if k not in ("transformers_version", "dtype", "scale_decoder_outputs", "dense_act_fn", "is_gated_act")}
    cfg["architectures"] = [type(model).__name__]
    cfg["tie_word_embeddings"] = tied   # what the Hub configs say (transformers 5 rewrites it to True)
    cfg["torch_dtype"] = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def t5_tokenizer_json(vocab_size: int = 700, extra_ids: int = 100) -> dict:
    """A Unigram tokenizer with mt0's tokenizer.json pipeline: collapse runs of spaces, Metaspace, append </s>.
    <pad>=0, </s>=1, <unk>=2; the sentinels <extra_id_99> .. <extra_id_0> are the last (ordinary) pieces, as in mT5
    (<extra_id_0> has the highest id)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    data = json.loads(tok.to_str())
    data["model"]["vocab"] += [[f"<extra_id_{i}>", 0.0] for i in reversed(range(extra_ids))]
    return data


def write_t5_tokenizer(folder: Path, vocab_size: int = 700):
    (folder / "tokenizer.json").write_text(json.dumps(t5_tokenizer_json(vocab_size), ensure_ascii=False))
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "extra_ids": 0, "additional_special_tokens": None, **special}))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))


def mt5_checkpoint(shape: dict = TINY_MT5, *, shards=1, dtype=torch.float32, seed=0, scale=1.0, wo_scale=1.0,
                   embed_copies=False, shard_style="dash") -> Path:
    key = ("t5", shape, shards, str(dtype), seed, scale, wo_scale, embed_copies, shard_style, 1)

    def build(folder):
        save_t5(hf_mt5(shape, seed, scale, wo_scale), folder, shards=shards, dtype=dtype, embed_copies=embed_copies,
                shard_style=shard_style)
        write_t5_tokenizer(folder)
    return _cached("t5", key, build)
