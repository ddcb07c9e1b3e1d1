"""`minibloom inspect`: parameter counts against the checkpoint's tensors, tables against transformers, plots."""
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import minibloom
from minibloom import cli, inspect_model
from minibloom.checkpoints import (TINY_BLOOM, TINY_MT5, TINY_T5, bloom_checkpoint, hf_from_folder,
                                   mt5_checkpoint)
from test_mt5 import one_thread  # noqa: F401 (autouse fixture: tiny models run single-threaded)

CHECKPOINTS = {"bloom": lambda: bloom_checkpoint(TINY_BLOOM), "mt5": lambda: mt5_checkpoint(TINY_MT5),
               "t5-tied": lambda: mt5_checkpoint(TINY_T5)}


def tensors_in_file(folder: Path) -> int:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


@pytest.mark.parametrize("family", CHECKPOINTS)
def test_parameter_counts_equal_the_checkpoint_tensors(family):
    folder = CHECKPOINTS[family]()
    lm = minibloom.load(folder, backend="reference")
    counts = inspect_model.parameter_counts(lm.model)
    assert sum(counts.values()) == tensors_in_file(folder) == inspect_model.checkpoint_count(lm)
    tied = family in ("bloom", "t5-tied")
    assert (counts["head"] == 0) == tied   # a tied head is the embedding, counted once
    assert counts["embeddings"] == lm.model.config.vocab_size * (lm.config.get("n_embed") or lm.config["d_model"])
    mem = inspect_model.memory_bytes(lm.model)
    assert mem["float32"] == 4 * sum(counts.values()) and mem["bfloat16"] == mem["float16"] == mem["float32"] // 2
    assert mem["int8"] < mem["bfloat16"]


@pytest.mark.parametrize("family, plots", [("bloom", ["alibi.png", "attention_layer1.png"]),
                                           ("mt5", ["t5_buckets.png", "attention_layer1.png"])])
def test_cli_prints_everything_and_writes_plots(family, plots, tmp_path, capsys):
    folder = str(CHECKPOINTS[family]())
    code = cli.main(["inspect", "--model", folder, "--backend", "reference", "--plot", str(tmp_path),
                     "--layer", "1", "--prompt", "Why is the sky blue?"])
    out = capsys.readouterr().out
    assert code == 0
    for text in ("config", "vocab_size", "parameters per component", "attention", "MLP", "norms", "embeddings",
                 "float32", "bfloat16", "int8", ", equal)"):
        assert text in out
    assert ("ALiBi slopes" in out and "h.0..2" in out) if family == "bloom" else ("relative position buckets" in out
                                                                                  and "<= -91" in out)
    for name in plots:
        data = (tmp_path / name).read_bytes()
        assert data[:4] == b"\x89PNG" and 1000 < len(data) < 200_000


@pytest.mark.parametrize("family", ["bloom", "mt5"])
def test_attention_maps_equal_transformers_attentions(family):
    folder = CHECKPOINTS[family]()
    lm = minibloom.load(folder, backend="reference")
    hf = hf_from_folder(folder)
    prompt = "Translate to English: Je t'aime."
    tokens, probs = inspect_model.attention_probs(lm, prompt, layer=1)
    ids = torch.tensor([lm.tokenizer.encode(prompt)])
    with torch.no_grad():
        if family == "bloom":
            theirs = hf(input_ids=ids, output_attentions=True).attentions[1][0]
        else:
            theirs = hf(input_ids=ids, decoder_input_ids=ids[:, :1] * 0, output_attentions=True).encoder_attentions[1][0]
    assert len(tokens) == ids.shape[1]
    torch.testing.assert_close(probs, theirs.float(), atol=1e-6, rtol=0)


def test_bucket_table_matches_transformers():
    from transformers.models.mt5.modeling_mt5 import MT5Attention

    rel = torch.arange(-300, 301)
    for bidirectional in (True, False):
        runs = inspect_model.bucket_runs(bidirectional, 32, 128)
        theirs = MT5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32,
                                                        max_distance=128)
        for r, b in zip(rel.tolist(), theirs.tolist()):
            if bidirectional or r <= 0:
                lo, hi = runs[b]
                assert lo <= r <= hi or (lo == -256 and r < lo) or (hi == 256 and r > hi), (r, b, runs[b])


def test_alibi_table_lists_every_head():
    lines = inspect_model.alibi_table(12)
    assert len(lines) == 2 + 12 and lines[2].split()[:3] == ["0", "0.5", "1"]


def test_bad_layer_missing_model_and_no_matplotlib(monkeypatch, capsys):
    folder = str(CHECKPOINTS["bloom"]())
    assert cli.main(["inspect", "--model", folder, "--plot", "/tmp/unused", "--layer", "3"]) == 2
    assert "--layer 3: the model has layers 0..2" in capsys.readouterr().err
    assert cli.main(["inspect"]) == 2
    assert "needs --model" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` raises ImportError
    assert cli.main(["inspect", "--model", folder, "--plot", "/tmp/unused"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
