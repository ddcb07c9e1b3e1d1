"""Loading: key layouts, shards, config spellings, dtypes, memory mapping, and every error a user can cause."""
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import minibloom
from minibloom import MinibloomError
from minibloom.checkpoints import BLOOMZ_560M, TINY_BLOOM, bloom_checkpoint, hf_from_folder


def logits(folder, dtype="float32"):
    lm = minibloom.load(folder, dtype=dtype, backend="reference")
    ids, mask = lm.encode_batch(["Translate to English: Je t'aime.", "Hi there"])
    with torch.no_grad():
        return lm.model(ids, mask)[mask.bool()]


@pytest.fixture(scope="module")
def reference_logits():
    return logits(bloom_checkpoint(TINY_BLOOM))


@pytest.mark.parametrize("variant", [
    dict(layout="prefixed"), dict(shards=3), dict(shards=3, shard_style="underscore"),
    dict(layout="prefixed", shards=2), dict(legacy_config=False)])
def test_layouts_shards_and_config_names_load_the_same_model(reference_logits, variant):
    assert torch.equal(logits(bloom_checkpoint(TINY_BLOOM, **variant)), reference_logits)


def copy(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def test_dtype_choices_and_checkpoint_default(tmp_path):
    folder = bloom_checkpoint(TINY_BLOOM, dtype=torch.bfloat16)
    assert minibloom.load(folder).dtype == torch.bfloat16            # config's torch_dtype
    for name, dt in [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]:
        lm = minibloom.load(folder, dtype=name, backend="reference")
        assert lm.model.h[0].self_attention.query_key_value.weight.dtype == dt
    with pytest.raises(MinibloomError, match="unknown dtype"):
        minibloom.load(folder, dtype="float8")


def test_same_dtype_load_is_memory_mapped():
    folder = bloom_checkpoint(TINY_BLOOM, dtype=torch.float16)
    lm = minibloom.load(folder, dtype="float16", backend="reference")
    w = lm.model.h[0].mlp.dense_h_to_4h.weight
    # A view of the file mapping is not resizable storage owned by torch's allocator.
    assert not w.untyped_storage().resizable()


def test_untied_lm_head_is_used_and_equal_copy_is_tied(tmp_path):
    src = bloom_checkpoint(TINY_BLOOM)
    folder = copy(src, tmp_path)
    sd = load_file(folder / "model.safetensors")
    sd["lm_head.weight"] = sd["word_embeddings.weight"].clone()
    save_file(sd, str(folder / "model.safetensors"))
    lm = minibloom.load(folder, dtype="float32")
    assert lm.model.lm_head.weight is lm.model.word_embeddings.weight
    sd["lm_head.weight"] = sd["word_embeddings.weight"] + 0.01
    save_file(sd, str(folder / "model.safetensors"))
    lm = minibloom.load(folder, dtype="float32", backend="reference")
    hf = hf_from_folder(folder)
    ids, mask = lm.encode_batch(["Hello world"])
    with torch.no_grad():
        assert torch.equal(lm.model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits)


def peak_rss_of_load(folder, dtype):
    code = f"""
import resource, torch, minibloom
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
lm = minibloom.load({str(folder)!r}, dtype={dtype!r}, backend="reference")
print(base * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), int(out[1])


def test_peak_rss_while_loading_in_checkpoint_dtype_under_1_3x_weights():
    folder = bloom_checkpoint(BLOOMZ_560M, dtype=torch.float16)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    base, peak = peak_rss_of_load(folder, "float16")
    assert peak - base < 1.3 * weights, (peak - base) / weights


def page_faults_of_reused_activations(folder, env=None):
    """Minor page faults of 20 rounds of allocating, filling and freeing a 64 MB tensor (16,384 pages of 4 KiB), as
    a prefill's ops do, in a fresh process after a load."""
    code = f"""
import resource, torch, minibloom
lm = minibloom.load({str(folder)!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    x = torch.ones(16 << 20)
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    env = {**os.environ, **(env or {})}
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=env).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc malloc setting")
def test_activations_reuse_freed_memory_after_a_cpu_load():
    """ops.reuse_freed_memory: large activations come back from the heap, not from fresh page faults. The heap
    still grows now and then (torch's 64-byte aligned blocks do not always fit the hole a freed one left: 1-4 of
    20 rounds measured), where glibc's defaults map and fault in every round; unless GLIBC_TUNABLES chose."""
    folder = bloom_checkpoint(TINY_BLOOM)
    rounds = 20 * 16384
    assert page_faults_of_reused_activations(folder) < 0.4 * rounds
    assert page_faults_of_reused_activations(folder, {"GLIBC_TUNABLES": "glibc.malloc.check=0"}) > 0.9 * rounds


def test_path_that_does_not_exist():
    with pytest.raises(MinibloomError, match="does not exist"):
        minibloom.load("./no/such/folder")


def test_unknown_family_name_lists_known_ones():
    with pytest.raises(MinibloomError, match="bloomz-560m"):
        minibloom.load("bloomz-999m")


def test_folder_without_config(tmp_path):
    with pytest.raises(MinibloomError, match="config.json"):
        minibloom.load(tmp_path)


def test_unsupported_model_type_lists_supported(tmp_path):
    folder = copy(bloom_checkpoint(TINY_BLOOM), tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MinibloomError, match="'llama'.*bloom, mt5, t5"):
        minibloom.load(folder)


def test_truncated_safetensors_names_the_file(tmp_path):
    folder = copy(bloom_checkpoint(TINY_BLOOM), tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(MinibloomError, match=r"model\.safetensors is truncated"):
        minibloom.load(folder)


def test_corrupt_header_names_the_file(tmp_path):
    folder = copy(bloom_checkpoint(TINY_BLOOM), tmp_path)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"garbage!"
    path.write_bytes(bytes(data))
    with pytest.raises(MinibloomError, match=r"model\.safetensors has a corrupt header"):
        minibloom.load(folder)
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(MinibloomError, match="corrupt or truncated"):
        minibloom.load(folder)


def test_missing_shard(tmp_path):
    folder = copy(bloom_checkpoint(TINY_BLOOM, shards=3), tmp_path)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(MinibloomError, match="missing shard.*model-00002-of-00003"):
        minibloom.load(folder)


def test_missing_unexpected_and_misshapen_tensors_name_key_file_and_shapes(tmp_path):
    folder = copy(bloom_checkpoint(TINY_BLOOM), tmp_path)
    path = folder / "model.safetensors"
    sd = load_file(path)
    missing = dict(sd)
    del missing["h.1.mlp.dense_h_to_4h.bias"]
    save_file(missing, str(path))
    with pytest.raises(MinibloomError, match="missing tensor 'h.1.mlp.dense_h_to_4h.bias'"):
        minibloom.load(folder)
    save_file({**sd, "h.7.extra.weight": torch.zeros(3)}, str(path))
    with pytest.raises(MinibloomError, match=r"unexpected tensor 'h.7.extra.weight'.*model\.safetensors"):
        minibloom.load(folder)
    save_file({**sd, "ln_f.weight": torch.zeros(65)}, str(path))
    with pytest.raises(MinibloomError, match=r"'ln_f.weight' in model\.safetensors has shape \[65\].*\[64\]"):
        minibloom.load(folder)


def test_no_safetensors_file(tmp_path):
    folder = copy(bloom_checkpoint(TINY_BLOOM), tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(MinibloomError, match="no model.safetensors.*pytorch_model.bin"):
        minibloom.load(folder)


def test_missing_tokenizer(tmp_path):
    folder = copy(bloom_checkpoint(TINY_BLOOM), tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(MinibloomError, match="no tokenizer.json"):
        minibloom.load(folder)


def test_bad_device():
    with pytest.raises(MinibloomError, match="device"):
        minibloom.load(bloom_checkpoint(TINY_BLOOM), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MinibloomError, match="no CUDA GPU"):
            minibloom.load(bloom_checkpoint(TINY_BLOOM), device="cuda")


def test_bad_backend():
    with pytest.raises(MinibloomError, match="unknown backend"):
        minibloom.load(bloom_checkpoint(TINY_BLOOM), backend="fast")


def _smaps_field(ptr: int, field: str) -> str | None:
    """A field (e.g. VmFlags) of the mapping that holds ptr, from /proc/self/smaps; None where absent."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= ptr < hi
        elif inside and line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return None


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="no transparent huge pages in this kernel")
@pytest.mark.parametrize("wanted", [True, False])
def test_file_views_are_advised_for_huge_pages(monkeypatch, wanted):
    """Weights loaded in the file's own dtype stay views of the file; the mapping asks for huge pages (VmFlags
    "hg") unless MINIBLOOM_HUGE_PAGES=0."""
    if not wanted:
        monkeypatch.setenv("MINIBLOOM_HUGE_PAGES", "0")
    folder = bloom_checkpoint(dict(TINY_BLOOM, vocab_size=40000, hidden_size=64), dtype=torch.float16)
    lm = minibloom.load(folder, dtype="float16")
    flags = _smaps_field(lm.model.word_embeddings.weight.data_ptr(), "VmFlags")
    assert flags is not None
    assert ("hg" in flags.split()) == wanted, flags


def _thp_eligible(ptr: int) -> bool | None:
    """THPeligible of the mapping that holds ptr, None where the kernel does not say."""
    v = _smaps_field(ptr, "THPeligible")
    return None if v is None else v == "1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux memory advice")
def test_streamed_memory_is_aligned_and_advised_for_huge_pages():
    from minibloom import ops
    t = ops.empty_huge((3, 1 << 20), torch.float32, "cpu")                  # 12 MiB
    assert t.shape == (3, 1 << 20) and t.dtype == torch.float32 and t.data_ptr() % ops.HUGE_PAGE == 0
    t.fill_(2.0)
    assert float(t.sum()) == 2.0 * t.numel()
    small = ops.empty_huge((10,), torch.int8, "cpu")                      # below 2 MiB: a plain tensor
    assert small.shape == (10,)
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read() if \
        os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled") else "[never]"
    if "[never]" not in thp:
        assert _thp_eligible(t.data_ptr()) in (True, None)
    # what decoding streams goes through it: quantized weights, converted float weights, the KV cache
    folder = bloom_checkpoint(dict(TINY_BLOOM, vocab_size=40000, hidden_size=64), dtype=torch.float16)
    lm = minibloom.load(folder, quantize="int8", dtype="float32")
    assert lm.model.word_embeddings.weight.data_ptr() % ops.HUGE_PAGE == 0          # 40000 x 64 int8
    lm = minibloom.load(folder, dtype="float32")                                     # converted from fp16
    assert lm.model.word_embeddings.weight.data_ptr() % ops.HUGE_PAGE == 0
    cache = ops.KVCache(1, 4, 4096, 128, torch.float32, "cpu")
    assert cache.k.data_ptr() % ops.HUGE_PAGE == 0 and not cache.k.any()


def test_huge_pages_can_be_turned_off(monkeypatch):
    from minibloom import ops
    monkeypatch.setenv("MINIBLOOM_HUGE_PAGES", "0")
    t = ops.empty_huge((3, 1 << 20), torch.float32, "cpu")
    assert t.untyped_storage().resizable()                      # torch's own allocation, not a separate mapping


def test_a_load_that_cannot_fit_in_memory_is_refused_before_allocating(monkeypatch):
    """The OOM killer ends a process without a word: the weights' fresh memory is checked against MemAvailable
    first. Weights kept in the file's dtype are views of the file and need none."""
    import minibloom.lm as lm_module
    folder = bloom_checkpoint(TINY_BLOOM)                          # fp32 on disk
    params = sum(p.numel() for p in minibloom.load(folder).model.parameters())
    monkeypatch.setattr(lm_module, "_available_ram", lambda: 64 * 1024)
    assert minibloom.load(folder, dtype="float32").dtype == torch.float32  # mapped: nothing to allocate
    with pytest.raises(MinibloomError, match=r"in bfloat16 needs 0.4 MiB of memory for its weights, but only 0.1 "
                                             r"MiB is available. Quantize it to int8.*MINIBLOOM_SKIP_MEMORY_CHECK"):
        minibloom.load(folder, dtype="bfloat16")
    with pytest.raises(MinibloomError, match="with quantize=int8 needs.*minibloom convert --quantize int8"):
        minibloom.load(folder, quantize="int8")
    monkeypatch.setenv("MINIBLOOM_SKIP_MEMORY_CHECK", "1")
    assert minibloom.load(folder, dtype="bfloat16").dtype == torch.bfloat16
    monkeypatch.undo()
    # the estimate: 2 bytes per parameter in bf16 (the tied head once); int8 1 byte per matrix weight + row scales
    from minibloom import bloom
    from minibloom.loader import Checkpoint
    net, ckpt = bloom.build(json.loads((folder / "config.json").read_text())), Checkpoint(folder)
    names = bloom.checkpoint_names(net, ckpt)
    cpu = torch.device("cpu")
    assert lm_module.weight_bytes(net, ckpt, names, torch.bfloat16, cpu, False) == 2 * params
    assert lm_module.weight_bytes(net, ckpt, names, torch.float32, cpu, False) == 0
    matrices = {id(m.weight): m.weight.shape for m in minibloom.load(folder, quantize="int8").model.modules()
                if getattr(m, "weight_scale", None) is not None}
    assert lm_module.weight_bytes(net, ckpt, names, torch.float32, cpu, True) == sum(
        n * k + 4 * n for n, k in matrices.values())      # norms and biases stay views of the file


def test_memory_refusal_is_one_cli_error(tmp_path):
    folder = bloom_checkpoint(TINY_BLOOM)
    code = ("import sys, minibloom.lm as m; m._available_ram = lambda: 1024; from minibloom.cli import main; "
            "sys.exit(main(['generate', '--model', sys.argv[1], '--dtype', 'bfloat16', 'Hello']))")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    assert out.returncode == 2 and "minibloom: error: loading" in out.stderr and "Traceback" not in out.stderr


def test_dtype_conversion_in_chunks_equals_a_whole_tensor_cast(monkeypatch):
    """A tensor loaded in another dtype is read through one reused buffer, a few rows at a time."""
    from minibloom import loader
    folder = bloom_checkpoint(TINY_BLOOM)
    monkeypatch.setattr(loader, "CHUNK_BYTES", 1000)               # 3 rows of 64 fp32 per read
    ckpt = loader.Checkpoint(folder)
    for key in ("word_embeddings.weight", "h.0.self_attention.query_key_value.weight", "h.0.input_layernorm.bias"):
        assert torch.equal(ckpt.tensor(key, torch.bfloat16), load_file(folder / "model.safetensors")[key].bfloat16())
    assert ckpt._buffer.numel() <= 1000                                     # never a whole tensor


def test_weights_larger_than_ram_are_mapped_with_a_warning(monkeypatch, capsys):
    """Weights kept in the file's dtype load as views whatever their size, but if they exceed the machine's RAM
    every token reads them from disk: said once on stderr, with the int8 size."""
    import minibloom.lm as lm_module
    folder = bloom_checkpoint(TINY_BLOOM)
    monkeypatch.setattr(lm_module, "_total_ram", lambda: 100 * 1024)
    minibloom.load(folder, dtype="float32")
    err = capsys.readouterr().err
    assert "read from the file in place" in err and "every token will read them from disk" in err and "In int8" in err
    monkeypatch.setattr(lm_module, "_total_ram", lambda: 2**40)
    minibloom.load(bloom_checkpoint(TINY_BLOOM, seed=1), dtype="float32")
    assert "from disk" not in capsys.readouterr().err


@pytest.mark.parametrize("family, change, message", [
    ("bloom", {"n_head": None, "num_attention_heads": None}, "has no n_head"),
    ("bloom", {"n_head": 0}, "n_head must be at least 1"),
    ("bloom", {"n_layer": 3.5}, "n_layer must be int"),
    ("bloom", {"vocab_size": -1}, "vocab_size must be at least 1"),
    ("bloom", {"pad_token_id": 640}, r"pad_token_id 640 is not a token id of the vocabulary \[0, 640\)"),
    ("bloom", {"layer_norm_epsilon": "abc"}, "layer_norm_epsilon must be float"),
    ("mt5", {"num_heads": "abc"}, "num_heads must be int"),
    ("mt5", {"d_ff": 4.5}, "d_ff must be int"),
    ("mt5", {"d_kv": -1}, "d_kv must be at least 1"),
    ("mt5", {"decoder_start_token_id": -1}, "decoder_start_token_id -1 is not a token id"),
    ("mt5", {"tie_word_embeddings": "yes"}, "tie_word_embeddings must be bool"),
])
def test_config_values_are_checked_by_name(tmp_path, family, change, message):
    """A config.json value of the wrong type or range is named, never a raw error or a silent default (the
    weights' shapes do not tell BLOOM's head count: transformers would assume 8, minibloom 16)."""
    from minibloom.checkpoints import TINY_MT5, mt5_checkpoint
    folder = copy(bloom_checkpoint(TINY_BLOOM) if family == "bloom" else mt5_checkpoint(TINY_MT5), tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg = {k: v for k, v in {**cfg, **change}.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MinibloomError, match=message):
        minibloom.load(folder)


def test_config_that_is_not_an_object(tmp_path):
    folder = copy(bloom_checkpoint(TINY_BLOOM), tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(MinibloomError, match="holds a JSON list, not an object"):
        minibloom.load(folder)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_integer_weights_are_refused_when_quantizing_too(tmp_path, backend):
    folder = copy(bloom_checkpoint(TINY_BLOOM), tmp_path)
    path = folder / "model.safetensors"
    sd = load_file(path)
    save_file({**sd, "word_embeddings.weight": sd["word_embeddings.weight"].to(torch.int32)}, str(path))
    for quantize in (None, "int8"):
        with pytest.raises(MinibloomError, match="'word_embeddings.weight'.*stored as torch.int32"):
            minibloom.load(folder, quantize=quantize, backend=backend)


def test_nan_weights_end_in_a_message_not_a_silent_completion(tmp_path):
    folder = copy(bloom_checkpoint(TINY_BLOOM), tmp_path)
    path = folder / "model.safetensors"
    sd = load_file(path)
    save_file({**sd, "ln_f.weight": torch.full_like(sd["ln_f.weight"], float("nan"))}, str(path))
    lm = minibloom.load(folder, backend="reference")
    for options in (dict(), dict(num_beams=2)):
        with pytest.raises(MinibloomError, match="logits for the prompt are NaN"):
            lm.generate("Hello", max_new_tokens=4, **options)


def test_int8_threshold_needs_an_int8_model():
    with pytest.raises(MinibloomError, match="int8_threshold.*applies to int8 models"):
        minibloom.load(bloom_checkpoint(TINY_BLOOM), int8_threshold=4.0)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_infinite_weights_are_named_when_quantizing(tmp_path, backend):
    folder = copy(bloom_checkpoint(TINY_BLOOM), tmp_path)
    path = folder / "model.safetensors"
    sd = load_file(path)
    w = sd["h.0.mlp.dense_h_to_4h.weight"].clone()
    w[3, 5] = float("inf")
    save_file({**sd, "h.0.mlp.dense_h_to_4h.weight": w}, str(path))
    with pytest.raises(MinibloomError, match="'h.0.mlp.dense_h_to_4h.weight'.*infinite values"):
        minibloom.load(folder, quantize="int8", backend=backend)


def test_config_spellings_transformers_accepts_still_load():
    from minibloom.bloom import BloomConfig
    from minibloom.mt5 import T5Config
    assert T5Config.from_dict({"eos_token_id": [], "num_heads": 6}).eos_token_id == 1     # no list item: the default
    assert T5Config.from_dict({"eos_token_id": [1, 5], "layer_norm_epsilon": 1}).layer_norm_epsilon == 1.0
    assert BloomConfig.from_dict({"n_head": 4, "pretraining_tp": None, "n_inner": None}).n_head == 4
    assert BloomConfig.from_dict({"num_attention_heads": 4, "n_embed": 64, "vocab_size": 640.0}).hidden_size == 64
