"""Whole models through the GPU backend (the Triton kernels behind backend="fused" on CUDA) against the reference.

On a GPU: load(device="cuda", backend="fused") against the reference backend on the same GPU. Without one (CI):
the same backend class with the same routing (float linears to torch, attention and int8 to Triton), its kernels
run by Triton's interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1 before triton is imported). The
kernels alone are tested in tests/kernels/test_triton.py; this file checks the model <-> kernel wiring: cache
views, key positions, ALiBi slopes, T5 tables and query positions, int8 layers, decode steps.
"""
import pytest
import torch

import minibloom
from minibloom import fused
from minibloom.checkpoints import TINY_BLOOM, TINY_MT5, bloom_checkpoint, mt5_checkpoint

triton = pytest.importorskip("triton")  # in the test extra: present wherever the tests are installed as documented
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
PROMPTS = ["Translate to English: Je t'aime.", "Hi"]


class InterpretedTriton(fused.FusedBackend):
    """FusedBackend as on a CUDA device, its Triton kernels run by the interpreter on CPU tensors."""

    def __init__(self):
        from minibloom.kernels.triton import attention, int8
        self.device = torch.device("cuda")  # routes as on a GPU: float linears to F.linear, argmax to torch
        self.attn, self.mm = attention, int8


def load_pair(folder, dtype, quantize):
    ref = minibloom.load(folder, dtype=dtype, device=DEVICE, backend="reference", quantize=quantize)
    if GPU:
        tri = minibloom.load(folder, dtype=dtype, device=DEVICE, backend="fused", quantize=quantize)
    else:
        tri = minibloom.load(folder, dtype=dtype, backend="reference", quantize=quantize)
        InterpretedTriton().attach(tri.model)
    assert tri.model.backend.name == "fused"
    return ref, tri


CASES = [("bloom", "float32", None), ("bloom", "float16", None), ("bloom", "float32", "int8"),
         ("mt5", "float32", None), ("mt5", "float16", None), ("mt5", "float32", "int8-weight")]


@pytest.mark.parametrize("family,dtype,quantize", CASES)
def test_model_through_triton_kernels_matches_reference(family, dtype, quantize):
    folder = bloom_checkpoint(TINY_BLOOM, scale=3.0) if family == "bloom" else mt5_checkpoint(TINY_MT5)
    ref, tri = load_pair(folder, dtype, quantize)
    ids, mask = ref.encode_batch(PROMPTS)  # ragged rows: left padding (BLOOM) or right padding (encoder)
    kw = dict(decoder_input_ids=torch.tensor([[0, 5, 9, 13]] * len(PROMPTS), device=ids.device)) \
        if ref.is_encoder_decoder else {}
    with torch.no_grad():
        a, b = ref.model(ids, mask, **kw).float(), tri.model(ids, mask, **kw).float()
    if not ref.is_encoder_decoder:
        a, b = a[mask.bool()], b[mask.bool()]
    tolerance = 2e-3 if dtype == "float16" else 1e-4  # measured in the interpreter: fp16 5e-4, fp32 <= 6e-7
    assert float((a - b).abs().max() / a.abs().max()) <= tolerance
    # prefill, then decode steps through the cache: the same greedy tokens
    assert torch.equal(ref.generate_ids(ids, mask, max_new_tokens=3), tri.generate_ids(ids, mask, max_new_tokens=3))
