"""`minibloom convert` / `LM.save`: a saved folder loads back to the same numbers; int8 stays int8 on disk."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import minibloom
from minibloom import MinibloomError
from minibloom.checkpoints import (BLOOMZ_560M, TINY_BLOOM, TINY_MT5, TINY_T5, bloom_checkpoint, hf_from_folder,
                                   mt5_checkpoint)

PROMPTS = ["Translate to English: Je t'aime.", "Hi"]


def logits(lm, **kw):
    ids, mask = lm.encode_batch(PROMPTS)
    if lm.is_encoder_decoder:
        kw = dict(decoder_input_ids=torch.tensor([[0, 5, 9, 13]] * len(PROMPTS)))
    with torch.no_grad():
        out = lm.model(ids, mask, **kw)
    return out if lm.is_encoder_decoder else out[mask.bool()]


@pytest.mark.parametrize("family", ["bloom", "mt5", "t5-tied"])
@pytest.mark.parametrize("quantize", ["int8", "int8-weight", None])
def test_saved_folder_loads_back_bit_equal(tmp_path, family, quantize):
    folder = {"bloom": lambda: bloom_checkpoint(TINY_BLOOM, scale=3.0), "mt5": lambda: mt5_checkpoint(TINY_MT5),
              "t5-tied": lambda: mt5_checkpoint(TINY_T5)}[family]()
    a = minibloom.load(folder, quantize=quantize)
    files = a.save(tmp_path / "out")
    b = minibloom.load(tmp_path / "out")
    assert torch.equal(logits(a), logits(b))
    assert a.generate("Hello", max_new_tokens=6) == b.generate("Hello", max_new_tokens=6)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    emb, head = (b.model.word_embeddings, b.model.lm_head) if family == "bloom" else (b.model.shared, b.model.lm_head)
    if family != "mt5":
        assert head.weight is emb.weight  # a tied head is saved once, as on the Hub, and tied again on load
    if quantize:
        assert config["quantization_config"]["quant_method"] == "minibloom-int8"
        assert config["quantization_config"]["mode"] == quantize
        assert emb.weight.dtype == torch.int8 and emb.quant == quantize and head.quant == quantize
    else:
        assert "quantization_config" not in config
    # every weight whose size allows it is mapped on a 64-byte boundary (the kernels' vector loads)
    params = list(b.model.named_parameters())
    assert all(p.data_ptr() % 64 == 0 for _, p in params if p.numel() * p.element_size() % 64 == 0)
    assert sum(p.numel() * p.element_size() % 64 == 0 for _, p in params) > 0.9 * len(params)


def test_saved_int8_weights_are_file_views_and_the_mode_can_change_on_load(tmp_path):
    folder = bloom_checkpoint(TINY_BLOOM, scale=3.0)
    minibloom.load(folder, quantize="int8").save(tmp_path)
    saved = minibloom.load(tmp_path, quantize="int8-weight")  # same int8 weights, float activations
    w = saved.model.h[0].mlp.dense_h_to_4h
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert torch.equal(w.weight, f.get_tensor("h.0.mlp.dense_h_to_4h.weight"))
        assert torch.equal(w.weight_scale, f.get_tensor("h.0.mlp.dense_h_to_4h.weight_scale"))
    assert w.quant == "int8-weight"
    assert torch.equal(logits(saved), logits(minibloom.load(folder, quantize="int8-weight")))
    # the load maps the file: the weight's memory is the file's pages, not a copy
    assert mapping_of(saved.model.h[0].mlp.dense_h_to_4h.weight) == str(tmp_path / "model.safetensors")
    assert mapping_of(minibloom.load(folder, quantize="int8").model.h[0].mlp.dense_h_to_4h.weight) is None


def mapping_of(t: torch.Tensor):
    """The file whose mapping holds t's memory (from /proc/self/maps), None for anonymous memory."""
    addr = t.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= addr < hi:
            path = fields[5].strip() if len(fields) > 5 else ""
            return path if path.startswith("/") else None
    return None


def test_threshold_is_recorded_and_can_be_overridden(tmp_path):
    folder = bloom_checkpoint(TINY_BLOOM, scale=3.0)
    minibloom.load(folder, quantize="int8", int8_threshold=2.5).save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["llm_int8_threshold"] == 2.5
    assert minibloom.load(tmp_path).model.h[1].self_attention.dense.threshold == 2.5
    assert minibloom.load(tmp_path, int8_threshold=0.0).model.h[1].self_attention.dense.threshold == 0.0
    with pytest.raises(MinibloomError, match="threshold"):
        minibloom.load(tmp_path, int8_threshold=-1.0)


def test_float_folder_is_a_hub_checkpoint_transformers_reads(tmp_path):
    """fp32 -> bf16: minibloom and transformers load the written folder; BLOOM bf16 stays bit-exact."""
    folder = bloom_checkpoint(TINY_BLOOM)
    minibloom.load(folder, dtype="bfloat16", backend="reference").save(tmp_path)
    ours = minibloom.load(tmp_path, backend="reference")
    assert ours.dtype == torch.bfloat16
    hf = hf_from_folder(tmp_path, dtype=torch.bfloat16)
    ids, mask = ours.encode_batch(PROMPTS)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        mine = ours.model(ids, mask)
    assert torch.equal(mine[mask.bool()], theirs[mask.bool()])


def test_shards_and_index_like_the_hub(tmp_path):
    folder = mt5_checkpoint(TINY_MT5)
    a = minibloom.load(folder, quantize="int8")
    files = a.save(tmp_path, max_shard_bytes=100_000)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:  # the official reader agrees with every header we wrote
        with safe_open(str(tmp_path / shard), "pt") as f:
            for key in f.keys():
                total += f.get_tensor(key).numel() * f.get_tensor(key).element_size()
                assert index["weight_map"][key] == shard
    assert total == index["metadata"]["total_size"]
    assert torch.equal(logits(a), logits(minibloom.load(tmp_path)))


def test_refuses_to_overwrite_or_to_write_over_its_source(tmp_path):
    folder = bloom_checkpoint(TINY_BLOOM)
    lm = minibloom.load(folder, quantize="int8")
    lm.save(tmp_path)
    with pytest.raises(MinibloomError, match="already holds a model.*overwrite"):
        lm.save(tmp_path)
    lm.save(tmp_path, overwrite=True, max_shard_bytes=50_000)  # shards replace the single file, none left stale
    assert not (tmp_path / "model.safetensors").exists()
    assert torch.equal(logits(lm), logits(minibloom.load(tmp_path)))
    with pytest.raises(MinibloomError, match="loaded from"):
        minibloom.load(tmp_path).save(tmp_path, overwrite=True)
    with pytest.raises(MinibloomError, match="is a file"):
        lm.save(tmp_path / "config.json")


def test_int8_folders_that_cannot_be_read_say_why(tmp_path):
    folder = bloom_checkpoint(TINY_BLOOM)
    minibloom.load(folder, quantize="int8").save(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())

    def rewrite(**changes):
        c = json.loads(json.dumps(config))
        c.update(changes)
        config_path.write_text(json.dumps(c))

    rewrite(quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
    with pytest.raises(MinibloomError, match="quantized with 'bitsandbytes'.*original float checkpoint"):
        minibloom.load(tmp_path)
    rewrite(quantization_config=dict(config["quantization_config"], format_version=99))
    with pytest.raises(MinibloomError, match="newer minibloom"):
        minibloom.load(tmp_path)
    rewrite(quantization_config=dict(config["quantization_config"], mode="int4"))
    with pytest.raises(MinibloomError, match="bad quantization_config"):
        minibloom.load(tmp_path)
    rewrite(quantization_config=None)
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "quantization_config"}))
    with pytest.raises(MinibloomError, match="stored as torch.int8.*quantization_config"):
        minibloom.load(tmp_path)


def test_missing_scale_is_named(tmp_path):
    from minibloom.loader import write_safetensors
    folder = bloom_checkpoint(TINY_BLOOM)
    minibloom.load(folder, quantize="int8").save(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "h.0.mlp.dense_4h_to_h.weight_scale"}
    write_safetensors(tmp_path / "model.safetensors", tensors)
    with pytest.raises(MinibloomError, match="'h.0.mlp.dense_4h_to_h.weight_scale' is missing"):
        minibloom.load(tmp_path)


def test_cli_convert_then_generate(tmp_path):
    folder = str(bloom_checkpoint(TINY_BLOOM))
    run = lambda *a: subprocess.run([sys.executable, "-m", "minibloom", *a], capture_output=True, text=True)
    out = run("convert", "--model", folder, "--quantize", "int8", "--out", str(tmp_path / "q"))
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stderr and "minibloom generate --model" in out.stderr
    direct = run("generate", "--model", folder, "--quantize", "int8", "--max-new-tokens", "6", "Hello")
    saved = run("generate", "--model", str(tmp_path / "q"), "--max-new-tokens", "6", "Hello")
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout == direct.stdout
    again = run("convert", "--model", folder, "--out", str(tmp_path / "q"))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    bad = run("convert", "--model", folder, "--out", str(tmp_path / "s"), "--max-shard-size", "lots")
    assert bad.returncode == 2 and "not a size" in bad.stderr
    # An int8 folder cannot become a float checkpoint; saved again as int8 it says so.
    bad = run("convert", "--model", str(tmp_path / "q"), "--dtype", "float32", "--out", str(tmp_path / "f"))
    assert bad.returncode == 2 and "holds int8 weights" in bad.stderr and "--quantize int8" in bad.stderr
    again = run("convert", "--model", str(tmp_path / "q"), "--quantize", "int8", "--out", str(tmp_path / "q2"))
    assert again.returncode == 0 and "(int8)" in again.stderr


def test_saved_int8_load_maps_the_weights_instead_of_copying_them(tmp_path):
    """bloomz-560m shape: quantizing on load puts ~560 MB of int8 weights in anonymous memory; loading the saved
    folder maps them from the file (shared between processes, clean pages the kernel may drop)."""
    folder = bloom_checkpoint(BLOOMZ_560M, dtype=torch.float16)
    minibloom.load(folder, quantize="int8").save(tmp_path)
    code = ("import sys, minibloom; lm = minibloom.load(sys.argv[1], quantize='int8'); "
            "print(sum(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')))")
    anon = lambda f: int(subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True,
                                        check=True).stdout) * 1024
    on_load, saved = anon(folder), anon(tmp_path)
    assert on_load - saved > 0.8 * 559e6, (on_load, saved)


def test_parity_and_inspect_on_a_saved_int8_folder(tmp_path):
    """transformers cannot read the int8 folder, so parity names the fix (--reference-model) and then judges the
    int8 model with int8's tolerance; inspect counts the same parameters as in the float source."""
    folder = str(bloom_checkpoint(TINY_BLOOM))
    minibloom.load(folder, quantize="int8").save(tmp_path)
    run = lambda *a: subprocess.run([sys.executable, "-m", "minibloom", *a], capture_output=True, text=True)
    refused = run("parity", "--model", str(tmp_path), "--new-tokens", "4")
    assert refused.returncode == 2 and "--reference-model" in refused.stderr
    ok = run("parity", "--model", str(tmp_path), "--reference-model", folder, "--new-tokens", "4")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "quantize int8" in ok.stdout and "within tolerance" in ok.stdout
    totals = [next(line for line in run("inspect", "--model", f).stdout.splitlines() if "checkpoint tensors" in line)
              for f in (folder, str(tmp_path))]
    assert totals[0] == totals[1] and totals[1].endswith("equal)")
