"""`compile=True`: the decode step through torch.compile equals the eager step, without recompiling per token."""
import pytest
import torch

import minibloom
from minibloom import ops
from minibloom.checkpoints import TINY_BLOOM, TINY_MT5, bloom_checkpoint, mt5_checkpoint
from minibloom.errors import MinibloomError


@pytest.fixture(scope="module")
def folders():
    return {"bloom": bloom_checkpoint(TINY_BLOOM, scale=3.0), "mt5": mt5_checkpoint(TINY_MT5)}


def _steps(lm, n, rows=1):
    """Logits of the start and n greedy steps (B = 2 * rows, left-padded prompts)."""
    ids, mask = lm.encode_batch(["Translate to English: Je t'aime.", "Hi"] * rows)
    out = []
    with torch.inference_mode():
        logits, state = lm.model.start(ids, mask, n + 1)
        out.append(logits)
        for _ in range(n):
            logits = lm.model.step(state, logits.argmax(-1))
            out.append(logits)
    return torch.stack(out)                                              # (n + 1, B, V)


@pytest.mark.parametrize("arch,backend,quantize", [("bloom", "fused", None), ("bloom", "fused", "int8"),
                                                   ("bloom", "reference", None), ("bloom", "reference", "int8"),
                                                   ("mt5", "fused", None)])
def test_compiled_step_equals_eager_and_compiles_once(folders, arch, backend, quantize):
    torch._dynamo.reset()
    kw = dict(dtype="float32", backend=backend, quantize=quantize)
    eager = _steps(minibloom.load(folders[arch], **kw), 6)
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = _steps(minibloom.load(folders[arch], compile=True, **kw), 6)
    # one graph for every step although the cache grows each token (dynamic=True), and no graph breaks
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))
    # Inductor may reorder fp32 reductions (norms, softmax): a few ulp of the logits' magnitude
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("arch", ["bloom", "mt5"])
def test_compiled_fp16_step_close_to_eager(folders, arch):
    """fp16 through the fp16 kernels (linear_f16, fp16 attention caches for BLOOM, mT5's scaled inputs). Inductor
    fuses fp16 pointwise ops in fp32 and rounds once where eager rounds after each op: close, not equal."""
    torch._dynamo.reset()
    kw = dict(dtype="float16", backend="fused")
    eager = _steps(minibloom.load(folders[arch], **kw), 6).float()
    compiled = _steps(minibloom.load(folders[arch], compile=True, **kw), 6).float()
    assert compiled.isfinite().all()
    assert (compiled - eager).abs().max() <= 2e-3 * eager.abs().max()               # measured: 5e-4 and 0
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))


@pytest.mark.parametrize("quantize,kind", [("int8", "w8a8"), (None, "f32")])
def test_compiled_step_with_as_many_rows_as_a_prefill(folders, quantize, kind):
    """From PREFILL_MIN_ROWS rows on, the wrappers run stock ops: W8A8 torch._int_mm plus the outlier columns,
    which traced must not branch on how many outlier columns the data has (a graph break, so an error with
    fullgraph); fp32 oneDNN's GEMM (gemm_f32)."""
    from minibloom.kernels.cpu import matmul as mm
    torch._dynamo.reset()
    kw = dict(dtype="float32", backend="fused", quantize=quantize)
    rows = 17                                                            # B = 34 >= 33 (with VNNI / AVX-512)
    assert mm.PREFILL_MIN_ROWS[kind] > 64 or 2 * rows >= mm.PREFILL_MIN_ROWS[kind]
    eager = _steps(minibloom.load(folders["bloom"], **kw), 3, rows)
    compiled = _steps(minibloom.load(folders["bloom"], compile=True, **kw), 3, rows)
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-5)


def test_compile_failure_names_the_remedy():
    def breaks(x):
        torch._dynamo.graph_break()                                      # what an untraceable op would cause
        return x + 1

    step = ops.compile_decode(breaks)
    with pytest.raises(MinibloomError, match="torch.compile failed on the decode step.*without compile=True"):
        step(torch.ones(3))


def test_compiled_step_keeps_input_guards_and_taps(folders):
    """A compiled model serves another batch size with the eager numbers; while taps are set, `step` runs eagerly
    (a compiled step would need a second graph for them) and records them."""
    torch._dynamo.reset()
    kw = dict(dtype="float32", backend="fused")
    lm = minibloom.load(folders["bloom"], compile=True, **kw)
    eager = minibloom.load(folders["bloom"], **kw)
    _steps(lm, 3)                                                        # B = 2 first
    results = {}
    for name, model in (("compiled", lm), ("eager", eager)):
        ids, mask = model.encode_batch(["Hi"])                           # then B = 1
        with torch.inference_mode():
            logits, state = model.model.start(ids, mask, 4)
            model.model.taps = {}
            try:
                first = model.model.step(state, logits.argmax(-1))
                taps = sorted(model.model.taps)
            finally:
                model.model.taps = None
            second = model.model.step(state, first.argmax(-1))
        results[name] = (first, second, taps)
    (c1, c2, ctaps), (e1, e2, etaps) = results["compiled"], results["eager"]
    assert ctaps == etaps and "h.0" in ctaps
    torch.testing.assert_close(c1, e1, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(c2, e2, rtol=1e-6, atol=1e-5)
