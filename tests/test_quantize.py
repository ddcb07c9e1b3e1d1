"""int8 on load (LLM.int8() and weight-only), whole models: bounded logit error, generation, low peak memory."""
import subprocess
import sys

import pytest
import torch

import minibloom
from minibloom import MinibloomError
from minibloom.checkpoints import BLOOMZ_560M, TINY_BLOOM, TINY_MT5, bloom_checkpoint, mt5_checkpoint


def relative_logit_error(folder, quantize, backend, prompts, **kw):
    f32 = minibloom.load(folder, dtype="float32", backend="reference")
    q = minibloom.load(folder, dtype="float32", backend=backend, quantize=quantize)
    ids, mask = f32.encode_batch(prompts)
    with torch.no_grad():
        a, b = f32.model(ids, mask, **kw), q.model(ids, mask, **kw)
    if not f32.is_encoder_decoder:
        a, b = a[mask.bool()], b[mask.bool()]
    return float((a - b).abs().max() / a.abs().max()), float((a.argmax(-1) == b.argmax(-1)).float().mean()), q


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("mode", ["int8", "int8-weight"])
def test_bloom_int8_logits_bounded_and_generation_runs(mode, backend):
    folder = bloom_checkpoint(TINY_BLOOM, scale=3.0)
    err, agree, lm = relative_logit_error(folder, mode, backend, ["Translate to English: Je t'aime.", "Hi"])
    assert err < 0.05 and agree >= 0.9
    w = lm.model.h[0].mlp.dense_h_to_4h.weight
    assert w.dtype == torch.int8 and lm.model.lm_head.weight is lm.model.word_embeddings.weight
    assert len(lm.generate_ids(*lm.encode_batch(["Hello"]), max_new_tokens=6)[0]) == 6


@pytest.mark.parametrize("mode", ["int8", "int8-weight"])
def test_mt5_int8_without_fp32_wo(mode):
    folder = mt5_checkpoint(TINY_MT5)
    dec = torch.tensor([[0, 5, 9, 13]])
    err, agree, lm = relative_logit_error(folder, mode, "auto", ["Translate to English: Je t'aime."],
                                          decoder_input_ids=dec)
    assert err < 0.05 and agree >= 0.75
    assert all(m.weight.dtype == torch.int8 for n, m in lm.model.named_modules() if n.endswith(".wo"))
    assert lm.generate("Hello", max_new_tokens=4) is not None


def test_fused_int8_matches_reference_semantics():
    """The same quantization (the kernels' W8A8 is bit-exact, tests/kernels). The fused float ops around it (the
    online softmax, the GELU's exp polynomial) differ from torch's by an ulp or so, and an activation that moves
    by an ulp may round to the neighbouring int8 level: logits agree to 1% (0.36% measured), the argmax everywhere,
    and the error against the fp32 model is the reference int8's."""
    folder = bloom_checkpoint(TINY_BLOOM, scale=3.0)
    ref = minibloom.load(folder, dtype="float32", backend="reference", quantize="int8")
    fus = minibloom.load(folder, dtype="float32", backend="auto", quantize="int8")
    f32 = minibloom.load(folder, dtype="float32", backend="reference")
    ids, mask = ref.encode_batch(["Translate to English: Je t'aime.", "Hi"])
    with torch.no_grad():
        a, b = ref.model(ids, mask)[mask.bool()], fus.model(ids, mask)[mask.bool()]
        exact = f32.model(ids, mask)[mask.bool()]
    assert (a - b).abs().max() <= 1e-2 * a.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert (b - exact).abs().mean() <= 1.05 * (a - exact).abs().mean()
    assert (b - exact).abs().max() <= 1.2 * (a - exact).abs().max()


def test_load_time_quantization_kernel_equals_reference():
    """backend=fused quantizes on load with the CPU kernel, backend=reference with the torch-op reference: the
    same int8 weights and scales, bit for bit."""
    folder = bloom_checkpoint(TINY_BLOOM, scale=3.0, dtype=torch.bfloat16)
    ref = minibloom.load(folder, backend="reference", quantize="int8")
    fus = minibloom.load(folder, backend="fused", quantize="int8")
    assert fus.model.h[0].mlp.dense_h_to_4h.weight.dtype == torch.int8
    for (name, a), (_, b) in zip(ref.model.state_dict().items(), fus.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mode", ["int8", "int8-weight"])
def test_fp16_checkpoint_quantized_on_cpu_fused_matches_reference(mode):
    """An fp16 checkpoint (bloomz's own dtype) loaded with quantize and no dtype: fp16 activations reach the
    CPU int8 kernels, which compute in fp32 as the reference does and round back to fp16."""
    folder = bloom_checkpoint(TINY_BLOOM, scale=3.0, dtype=torch.float16)
    ref = minibloom.load(folder, backend="reference", quantize=mode)
    fus = minibloom.load(folder, backend="fused", quantize=mode)
    assert ref.dtype == fus.dtype == torch.float16
    ids, mask = ref.encode_batch(["Translate to English: Je t'aime.", "Hi"])
    with torch.no_grad():
        a, b = ref.model(ids, mask)[mask.bool()].float(), fus.model(ids, mask)[mask.bool()].float()
    assert torch.isfinite(b).all() and (a - b).abs().max() <= 1e-2 * a.abs().max()
    assert len(fus.generate_ids(*fus.encode_batch(["Hello"]), max_new_tokens=4)[0]) == 4


def test_bad_quantize_values():
    folder = bloom_checkpoint(TINY_BLOOM)
    with pytest.raises(MinibloomError, match="unknown quantize"):
        minibloom.load(folder, quantize="int4")
    with pytest.raises(MinibloomError, match="threshold"):
        minibloom.load(folder, quantize="int8", int8_threshold=-1)


def peak_rss(folder, **kw):
    code = (f"import resource, minibloom; minibloom.load({str(folder)!r}, backend='reference', **{kw!r}); "
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_quantized_load_peak_memory_at_most_0_4x_an_fp32_load():
    folder = bloom_checkpoint(BLOOMZ_560M, dtype=torch.float16)
    base = peak_rss(bloom_checkpoint(TINY_BLOOM), dtype="float32")   # interpreter + torch
    fp32 = peak_rss(folder, dtype="float32") - base
    int8 = peak_rss(folder, dtype="float32", quantize="int8") - base
    assert int8 <= 0.4 * fp32, int8 / fp32
