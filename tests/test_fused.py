"""Whole models with backend="fused" (the kernels in minibloom.kernels) against transformers and the reference."""
import pytest
import torch

import minibloom
from minibloom import MinibloomError, fused
from minibloom.checkpoints import TINY_BLOOM, TINY_MT5, bloom_checkpoint, hf_from_folder, mt5_checkpoint

pytestmark = pytest.mark.skipif(not fused.available(torch.device("cpu"))[0],
                                reason=f"CPU kernels unavailable: {fused.available(torch.device('cpu'))[1]}")
PROMPTS = ["Translate to English: Je t'aime.", "一个传奇的开端，一个不灭的神话", "Hi"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_bloom_fused_fp32_matches_transformers():
    folder = bloom_checkpoint(TINY_BLOOM, scale=3.0)
    lm = minibloom.load(folder, dtype="float32", backend="fused")
    assert lm.model.backend.name == "fused"
    hf = hf_from_folder(folder)
    ids, mask = lm.encode_batch(PROMPTS)
    with torch.no_grad():
        ours, theirs = lm.model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs)[mask.bool()].abs().max() <= 1e-4
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                               eos_token_id=2, pad_token_id=3)[:, ids.shape[1]:]
    assert torch.equal(lm.generate_ids(ids, mask, max_new_tokens=16), expected)


def test_mt5_fused_fp32_matches_transformers():
    folder = mt5_checkpoint(TINY_MT5)
    lm = minibloom.load(folder, dtype="float32", backend="fused")
    hf = hf_from_folder(folder)
    ids, mask = lm.encode_batch(["Translate to English: Je t'aime. " * 12, "Hi"])  # > 128 tokens: far buckets
    dec = torch.tensor([[0, 5, 9, 13, 4], [0, 7, 7, 2, 11]])
    with torch.no_grad():
        ours = lm.model(ids, mask, decoder_input_ids=dec)
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert (ours - theirs).abs().max() <= 1e-4
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)[:, 1:]
    assert torch.equal(lm.generate_ids(ids, mask, max_new_tokens=12), expected)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_bloom_fused_half_close_to_reference(dtype):
    folder = bloom_checkpoint(TINY_BLOOM, scale=3.0)
    ref = minibloom.load(folder, dtype=dtype, backend="reference")
    fus = minibloom.load(folder, dtype=dtype, backend="fused")
    f32 = minibloom.load(folder, dtype="float32", backend="reference")
    ids, mask = ref.encode_batch(PROMPTS)
    with torch.no_grad():
        exact = f32.model(ids, mask)[mask.bool()]
        err_ref = (ref.model(ids, mask)[mask.bool()].float() - exact).abs().max()
        err_fused = (fus.model(ids, mask)[mask.bool()].float() - exact).abs().max()
    assert err_fused <= 2 * err_ref + 1e-3
    assert fus.generate(PROMPTS, max_new_tokens=8)


def test_fused_raises_when_kernels_are_unavailable(monkeypatch):
    monkeypatch.setattr(fused, "available", lambda device: (False, "no compiler"))
    with pytest.raises(MinibloomError, match="no compiler"):
        minibloom.load(bloom_checkpoint(TINY_BLOOM), backend="fused")
    lm = minibloom.load(bloom_checkpoint(TINY_BLOOM), backend="auto")
    assert lm.model.backend.name == "reference"


def test_fused_argmax_equals_torch_for_every_dtype():
    backend = fused.FusedBackend(torch.device("cpu"))
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):  # float64: torch's own argmax
        x = torch.randn(2, 3, 1003, generator=torch.Generator().manual_seed(0)).to(dtype)
        assert torch.equal(backend.argmax(x), x.argmax(-1))


@pytest.mark.parametrize("family", ["bloom", "mt5"])
def test_fused_models_run_their_gelu_through_the_kernel(family, monkeypatch):
    """Every FFN of an eager fused forward calls matmul.tanh_gelu (a silent fallback to torch's ops would only be
    slower, so it is checked here); the parity tests above bound what it computes."""
    from minibloom.kernels.cpu import matmul as mm
    folder = bloom_checkpoint(TINY_BLOOM) if family == "bloom" else mt5_checkpoint(TINY_MT5)
    lm = minibloom.load(folder, dtype="bfloat16", backend="fused")
    calls = []
    kernel = mm.tanh_gelu
    monkeypatch.setattr(mm, "tanh_gelu", lambda *a, **k: calls.append(a[1]) or kernel(*a, **k))
    ids, mask = lm.encode_batch(PROMPTS)
    with torch.no_grad():
        lm.model(ids, mask) if family == "bloom" else lm.model(ids, mask, decoder_input_ids=ids[:, :1] * 0)
    cfg = lm.model.config
    layers = cfg.n_layer if family == "bloom" else cfg.num_layers + cfg.num_decoder_layers
    assert len(calls) == layers


def test_fused_mt5_runs_its_norms_through_the_kernel(monkeypatch):
    """Every RMSNorm of an eager fused mT5 forward calls matmul.rms_norm (25 in an mt0-small decode step, eight torch
    ops each); test_mt5_fused_fp32_matches_transformers bounds what it computes."""
    from minibloom.kernels.cpu import matmul as mm
    lm = minibloom.load(mt5_checkpoint(TINY_MT5), dtype="bfloat16", backend="fused")
    calls = []
    kernel = mm.rms_norm
    monkeypatch.setattr(mm, "rms_norm", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    ids, mask = lm.encode_batch(PROMPTS)
    with torch.no_grad():
        lm.model(ids, mask, decoder_input_ids=ids[:, :1] * 0)
    cfg = lm.model.config
    assert len(calls) == 2 * cfg.num_layers + 1 + 3 * cfg.num_decoder_layers + 1
