"""`minibloom parity` on tiny checkpoints: verdicts, the first divergence of a perturbed layer, JSON, bad inputs."""
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from minibloom import cli, parity
from minibloom.checkpoints import TINY_BLOOM, TINY_MT5, bloom_checkpoint, mt5_checkpoint
from test_mt5 import one_thread  # noqa: F401 (autouse fixture: tiny models run single-threaded)

BLOOM_LAYERS = ["embeddings", "h.0", "h.1", "h.2", "ln_f", "logits"]
MT5_LAYERS = ["encoder.embeddings", "encoder.block.0", "encoder.block.1", "encoder.final_layer_norm",
              "decoder.embeddings", "decoder.block.0", "decoder.block.1", "decoder.final_layer_norm", "logits"]


@pytest.fixture(scope="module")
def bloom():
    return str(bloom_checkpoint(TINY_BLOOM))


@pytest.fixture(scope="module")
def mt5():
    return str(mt5_checkpoint(TINY_MT5))


def run_parity(capsys, *args):
    code = cli.main(["parity", "--backend", "reference", "--new-tokens", "6", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bloom_bit_exact_with_json_of_every_layer_and_plot(bloom, tmp_path, capsys):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    code, out, err = run_parity(capsys, "--model", bloom, "--json", str(js), "--plot", str(png))
    assert code == 0, err
    assert "verdict: bit-exact" in out
    data = json.loads(js.read_text())
    assert [l["name"] for l in data["layers"]] == BLOOM_LAYERS
    assert all(l["max_abs"] == 0 and l["ref_max_abs"] > 0 for l in data["layers"])
    assert data["verdict"] == "bit-exact" and data["exit_code"] == 0
    assert data["top1"]["fraction"] == 1.0 and data["tokenizer"]["identical"] == len(parity.PROMPTS)
    assert data["greedy"]["identical_rows"] == len(parity.PROMPTS) and len(data["greedy"]["ours"][0]) == 6
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("dtype, verdict", [("float32", "bit-exact"), ("bfloat16", "bit-exact"),
                                            ("float16", "within tolerance")])
def test_mt5_encoder_decoder_and_beam_search(mt5, dtype, verdict, tmp_path, capsys):
    js = tmp_path / "r.json"
    code, out, err = run_parity(capsys, "--model", mt5, "--dtype", dtype, "--json", str(js))
    assert code == 0, err
    data = json.loads(js.read_text())
    assert data["verdict"] == verdict, out
    assert [l["name"] for l in data["layers"]] == MT5_LAYERS
    beam = data["beam"]
    assert beam["num_beams"] == 4 and beam["rows"] == len(parity.PROMPTS)
    # fp16 rounding differs between CPUs: a differing beam is allowed only as a near tie (checked by the tool)
    assert beam["identical_rows"] == len(parity.PROMPTS) or (dtype == "float16" and beam["tie"] is True
                                                             and beam["identical_rows"] >= len(parity.PROMPTS) - 1)
    if dtype == "float16":  # mT5 fp16: our activations are fp32, transformers' fp16 with fp32 `wo` (parity.md)
        assert f"<= {parity.TOLERANCES['float16']:g}" in out
        assert 0 < max(l["rel"] for l in data["layers"]) <= parity.TOLERANCES["float16"]


def perturbed_copy(folder, tmp_path, key):
    """A copy of the checkpoint with noise added to one tensor (transformers loads the original)."""
    copy = tmp_path / "perturbed"
    shutil.copytree(folder, copy)
    sd = load_file(copy / "model.safetensors")
    torch.manual_seed(0)
    sd[key] = sd[key] + 0.05 * torch.randn_like(sd[key])
    save_file(sd, copy / "model.safetensors", metadata={"format": "pt"})
    return str(copy)


@pytest.mark.parametrize("family, key, layer", [
    ("bloom", "h.1.self_attention.dense.weight", "h.1"),
    ("mt5", "decoder.block.1.layer.0.SelfAttention.v.weight", "decoder.block.1"),
])
def test_perturbed_layer_is_named_first_divergence_and_exits_nonzero(family, key, layer, bloom, mt5, tmp_path,
                                                                    capsys):
    original = bloom if family == "bloom" else mt5
    js = tmp_path / "r.json"
    code, out, _ = run_parity(capsys, "--model", perturbed_copy(original, tmp_path, key), "--reference-model",
                              original, "--json", str(js), "--num-beams", "1")
    assert code == 1
    assert "verdict: DIVERGED" in out
    line = next(l for l in out.splitlines() if l.startswith(layer + " "))
    assert "<- first divergence" in line
    data = json.loads(js.read_text())
    assert data["first_divergence"] == layer and data["exit_code"] == 1
    names = [l["name"] for l in data["layers"]]
    before = data["layers"][:names.index(layer)]
    assert all(l["max_abs"] == 0 for l in before if not l["name"].startswith("decoder.") or family == "bloom")


def test_transformers_missing_is_one_clear_message(bloom, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    code, _, err = run_parity(capsys, "--model", bloom)
    assert code == 2
    assert "pip install 'minibloom[parity]'" in err and "Traceback" not in err


def test_different_vocab_is_refused(bloom, capsys):
    other = str(bloom_checkpoint(dict(TINY_BLOOM, vocab_size=704)))
    code, _, err = run_parity(capsys, "--model", bloom, "--reference-model", other)
    assert code == 2 and "different vocabularies" in err and "640" in err and "704" in err


def test_checkpoint_transformers_cannot_load(bloom, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(bloom, bad)
    config = json.loads((bad / "config.json").read_text())
    config["hidden_dropout"] = "none"  # minibloom ignores dropout; transformers' strict config refuses it
    (bad / "config.json").write_text(json.dumps(config))
    code, _, err = run_parity(capsys, "--model", str(bad))
    assert code == 2 and "transformers cannot load" in err and "hidden_dropout" in err


@pytest.mark.parametrize("args, message", [
    (("--prompts", "/nonexistent/prompts.txt"), "no such file"),
    (("--new-tokens", "-1"), "must be >= 0"),
    (("--tolerance", "-1"), "must be >= 0"),
])
def test_bad_arguments(bloom, args, message, capsys):
    code, _, err = run_parity(capsys, "--model", bloom, *args)
    assert code == 2 and message in err


def test_prompts_file_and_no_model(bloom, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello world\n\nBonjour le monde\n")
    code, out, _ = run_parity(capsys, "--model", bloom, "--prompts", str(prompts), "--new-tokens", "0")
    assert code == 0 and "2 prompts" in out and "greedy" not in out
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    assert run_parity(capsys, "--model", bloom, "--prompts", str(empty))[0] == 2
    code, _, err = run_parity(capsys)
    assert code == 2 and "needs --model" in err


def test_first_jump_and_first_divergence():
    L = parity.LayerDiff
    layers = [L("a", 0, 0, 0.0, 1), L("b", 1e-7, 0, 1e-7, 1), L("c", 2e-7, 0, 2e-7, 1), L("d", 1e-3, 0, 1e-3, 1)]
    assert parity.mark_layers(layers, tol=1e-4) == ("d", "d")
    assert parity.mark_layers(layers, tol=1e-2) == (None, "b")
    assert parity.mark_layers(layers[:1], tol=1e-4) == (None, None)


def test_top1_decisive_disagreement_needs_a_margin():
    theirs = torch.tensor([[[0.95, 1.0, 0.0], [0.0, 5.0, 0.0]]])
    ours = torch.tensor([[[1.01, 1.0, 0.0], [9.0, 5.0, 0.0]]])            # row 0: a near tie; row 1: not
    valid = torch.ones(1, 2, dtype=torch.bool)
    t = parity.top1_agreement(ours, theirs, valid, atol=0.1)
    assert t["agree"] == 0 and t["decisive_disagreements"] == 1
