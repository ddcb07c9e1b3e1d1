"""`minibloom parity`: run one checkpoint in minibloom and in transformers and compare them layer by layer.

Both models see the same token ids (minibloom's tokenizer; the tokenizers are compared separately). On our side
the hidden states come from the model's named taps (`model.taps`, the mechanism behind `LM.trace`); on the
transformers side from forward hooks on the modules that produce the same tensors:

    tap                         transformers module (BLOOM)          (MT5 / T5)
    embeddings                  word_embeddings_layernorm            encoder.block.0 input (after embed + dropout)
    h.{i}                       h.{i} output[0]                      encoder.block.{i} output[0]
    ln_f                        ln_f                                 encoder.final_layer_norm, then decoder.*
    logits                      the model's logits                   the model's logits

(transformers' `hidden_states` tuple is not used: BLOOM's replaces the last block's output with ln_f's.)

Per layer we report, over valid (non-padding) positions only, max |ours - theirs|, its mean, and the relative
difference  rel = max|ours - theirs| / max|theirs|, the number the tolerance applies to. Then the top-1 agreement
of the logits, greedy decoding for N tokens and (by default for encoder-decoders) beam search.

Verdict: "bit-exact" (every difference is 0 and the tokens are identical), "within tolerance" (every layer's rel
<= TOLERANCES[mode]; a token that differs is a near tie: the reference's margin between the two tokens is within
the logits' tolerance), or "diverged" (exit code 1).
"""
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import MinibloomError
from .loader import dtype_name
from .quantize import QUANT_METHOD

# rel = max|ours - transformers| / max|transformers| allowed per layer. fp32: summation order only (fused kernels,
# other GEMM blockings); bf16/fp16: a few units in the last place of the format, compounded over the layers;
# int8: the quantization error itself (per-row absmax scales: ~1/254 of a row's largest weight per element).
TOLERANCES = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2, "int8-weight": 0.1, "int8": 0.15}
JUMP = 10.0   # a layer whose rel is 10x the previous layer's (or the first nonzero one) is where a difference grows

PROMPTS = [  # different lengths on purpose: the batch is padded
    "Translate to English: Je t'aime.",
    "Explain in a sentence in Telugu what is backpropagation in neural networks.",
    "一个传奇的开端，一个不灭的神话。",
    "हिंदी भारत की राजभाषा है।",
    "Suggest at least five related search terms to \"Mạng neural nhân tạo\".",
    "اللغة العربية هي أكثر اللغات السامية تحدثا.",
    "Why is the sky blue?",
    "Съешь же ещё этих мягких французских булок.",
]


@dataclass
class LayerDiff:
    name: str
    max_abs: float
    mean_abs: float
    rel: float
    ref_max_abs: float   # max |transformers| over valid positions: what rel is relative to


@dataclass
class Report:
    model: str
    reference_model: str
    dtype: str
    backend: str
    quantize: str | None
    device: str
    tolerance: float
    tolerance_mode: str
    prompts: list
    layers: list = field(default_factory=list)
    first_jump: str | None = None
    first_divergence: str | None = None
    tokenizer: dict = field(default_factory=dict)
    top1: dict = field(default_factory=dict)
    greedy: dict = field(default_factory=dict)
    beam: dict | None = None
    verdict: str = ""
    reasons: list = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.verdict == "diverged" else 0


# -- transformers, lazily -----------------------------------------------------------------------------------------

def import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise MinibloomError("minibloom parity compares against transformers, which is not installed: "
                             "pip install 'minibloom[parity]'") from e
    return transformers


def load_transformers(folder, dtype: torch.dtype, device):
    """transformers' model for `folder`: eager attention, our dtype, every weight from the file."""
    transformers = import_transformers()
    config = json.loads((Path(folder) / "config.json").read_text())
    if (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD:
        raise MinibloomError(f"{folder} holds minibloom's int8 weights (minibloom convert), which transformers "
                             f"cannot read: compare against the float checkpoint they came from, "
                             f"--reference-model SOURCE")
    cls = (transformers.AutoModelForSeq2SeqLM if config.get("model_type") in ("t5", "mt5")
           else transformers.AutoModelForCausalLM)
    try:
        model, info = cls.from_pretrained(folder, dtype=dtype, attn_implementation="eager", output_loading_info=True)
    except Exception as e:  # transformers raises many types (OSError, ValueError, KeyError, RuntimeError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MinibloomError(f"transformers cannot load {folder}: {first}. parity needs a checkpoint that both "
                             f"transformers and minibloom load") from e
    bad = list(info.get("missing_keys", [])) + [str(m[0]) if isinstance(m, tuple) else str(m)
                                                for m in info.get("mismatched_keys", [])]
    if bad:
        raise MinibloomError(f"transformers loads {folder} with {len(bad)} weight(s) missing or mis-shaped "
                             f"({bad[0]}...): it would fill them with random values, so the comparison would mean "
                             f"nothing. Check that the files and config.json belong together")
    return model.to(device).eval()


def _tap_hooks(hf, out: dict) -> list:
    """Forward hooks that store transformers' intermediates in `out` under our tap names."""
    def save(name, index=None):
        def hook(module, args, output):
            out[name] = (output[index] if index is not None else output).detach()
        return hook

    def save_input(name):
        def hook(module, args, kwargs):
            out[name] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    handles = []
    if hf.config.model_type == "bloom":
        base = hf.transformer
        handles.append(base.word_embeddings_layernorm.register_forward_hook(save("embeddings")))
        handles += [b.register_forward_hook(save(f"h.{i}", 0)) for i, b in enumerate(base.h)]
        handles.append(base.ln_f.register_forward_hook(save("ln_f")))
        return handles
    for stack_name in ("encoder", "decoder"):
        stack = getattr(hf, stack_name)
        handles.append(stack.block[0].register_forward_pre_hook(save_input(f"{stack_name}.embeddings"),
                                                                with_kwargs=True))
        handles += [b.register_forward_hook(save(f"{stack_name}.block.{i}", 0)) for i, b in enumerate(stack.block)]
        handles.append(stack.final_layer_norm.register_forward_hook(save(f"{stack_name}.final_layer_norm")))
    return handles


# -- the comparison -------------------------------------------------------------------------------------------------

def decoder_inputs(lm, ids, mask, length: int = 8) -> torch.Tensor:
    """Teacher-forced decoder ids (B, Td) for an encoder-decoder: the start token, then each row's first prompt
    tokens (any ids exercise the decoder; all rows get the same length so that no decoder position is padding)."""
    Td = max(1, min(length, int(mask.sum(1).min())))
    start = torch.full((ids.shape[0], 1), lm.model.config.decoder_start_token_id, dtype=ids.dtype, device=ids.device)
    return torch.cat([start, ids[:, :Td - 1]], 1)


def forward_both(lm, hf, ids, mask):
    """(ours, theirs, valid): {tap name: tensor} for both models and {tap name: (B, T) bool} of valid positions."""
    ours, theirs = {}, {}
    extra = {"decoder_input_ids": decoder_inputs(lm, ids, mask)} if lm.is_encoder_decoder else {}
    handles = _tap_hooks(hf, theirs)
    lm.model.taps = ours
    try:
        with torch.no_grad():
            ours["logits"] = lm.model(ids, mask, **extra)
            theirs["logits"] = hf(input_ids=ids, attention_mask=mask, **extra).logits
    finally:
        lm.model.taps = None
        for h in handles:
            h.remove()
    if set(ours) != set(theirs):
        missing = sorted(set(ours) ^ set(theirs))
        raise MinibloomError(f"the two models have different layers ({', '.join(missing[:4])}): compare the same "
                             f"architecture (same config.json)")
    valid = {name: mask.bool() for name in ours}
    if extra:  # the decoder's positions are all valid
        valid.update({name: torch.ones_like(extra["decoder_input_ids"], dtype=torch.bool) for name in ours
                      if name == "logits" or name.startswith("decoder.")})
    return ours, theirs, valid


def layer_diff(name, a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> LayerDiff:
    """Differences over valid positions: a, b (B, T, C), valid (B, T)."""
    if a.shape != b.shape:
        raise MinibloomError(f"{name}: minibloom gives shape {tuple(a.shape)}, transformers {tuple(b.shape)}: "
                             f"the checkpoints differ in shape")
    a, b = a[valid].float(), b[valid].float()
    finite = b[b.isfinite()]
    ref = float(finite.abs().max()) if finite.numel() else 0.0
    if torch.equal(a, b):
        return LayerDiff(name, 0.0, 0.0, 0.0, ref)
    d = (a - b).abs()
    if not d.isfinite().all():                   # inf or NaN on one side only (fp16 overflow, a broken kernel)
        return LayerDiff(name, math.inf, math.inf, math.inf, ref)
    max_abs = float(d.max())
    return LayerDiff(name, max_abs, float(d.double().mean()), max_abs / ref if ref > 0 else math.inf, ref)


def mark_layers(layers: list, tol: float):
    """(first layer above the tolerance, first layer where the difference jumps): where a difference is born."""
    first_div = next((l.name for l in layers if not l.rel <= tol), None)
    jump, prev = None, 0.0
    for l in layers:
        if l.rel > 0 and (prev == 0 or l.rel > JUMP * prev):
            jump = l.name
            break
        prev = l.rel
    return first_div, first_div or jump


def top1_agreement(ours: torch.Tensor, theirs: torch.Tensor, valid: torch.Tensor, atol: float) -> dict:
    """Argmax agreement over valid positions. A disagreement is decisive when transformers prefers its token by
    more than atol (the logits' tolerance): then a numerical difference within tolerance cannot explain it."""
    a, b = ours[valid].float(), theirs[valid].float()
    ta, tb = a.argmax(-1), b.argmax(-1)
    margin = b.gather(-1, tb[:, None]) - b.gather(-1, ta[:, None])        # (N, 1) transformers' preference
    differ = ta != tb
    return {"positions": int(valid.sum()), "agree": int((~differ).sum()),
            "fraction": float((~differ).float().mean()),
            "decisive_disagreements": int((differ & (margin[:, 0] > atol)).sum())}


def _pad_right(t: torch.Tensor, n: int, pad: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, n - t.shape[1]), value=pad) if t.shape[1] < n else t


def compare_greedy(lm, hf, ids, mask, new_tokens: int, tie: float) -> dict:
    """Greedy decoding on both sides. At the first token that differs in a row, transformers' logits give the
    margin between its token and ours: within `tie` it is a near tie (both are right), beyond it a divergence."""
    pad, eos = lm.tokenizer.pad_id, lm.tokenizer.eos_id
    ours = lm.generate_ids(ids, mask, max_new_tokens=new_tokens)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          num_beams=1, eos_token_id=eos, pad_token_id=pad, return_dict_in_generate=True,
                          output_logits=True)
    skip = 1 if lm.is_encoder_decoder else ids.shape[1]                  # the decoder start token / the prompt
    theirs = out.sequences[:, skip:]
    n = max(ours.shape[1], theirs.shape[1])
    ours, theirs = _pad_right(ours, n, pad).cpu(), _pad_right(theirs, n, pad).cpu()
    mismatches = []
    for row in (ours != theirs).any(1).nonzero()[:, 0].tolist():
        step = int((ours[row] != theirs[row]).nonzero()[0])
        logits = out.logits[step][row].float()
        mismatches.append({"row": row, "step": step, "ours": int(ours[row, step]),
                           "transformers": int(theirs[row, step]),
                           "margin": float(logits[theirs[row, step]] - logits[ours[row, step]])})
    return {"new_tokens": new_tokens, "ours": ours.tolist(), "transformers": theirs.tolist(),
            "identical_rows": ours.shape[0] - len(mismatches), "rows": ours.shape[0], "mismatches": mismatches,
            "tie": all(m["margin"] <= tie for m in mismatches) if mismatches else None, "tie_margin": tie}


def compare_beam(lm, hf, ids, mask, new_tokens: int, num_beams: int, tie: float) -> dict:
    """Beam search on both sides: the best sequence per prompt and its score (transformers' sequences_scores).
    Sequences that differ are a near tie when their scores agree within 2 * tie (a score is a mean of log-probs,
    each within about `tie`)."""
    from .beam import beam_search
    from .generate import GenerationOptions

    pad, eos = lm.tokenizer.pad_id, lm.tokenizer.eos_id
    opts = GenerationOptions.from_kwargs(dict(max_new_tokens=new_tokens, num_beams=num_beams))
    with torch.no_grad():
        ours, our_scores = beam_search(lm.model, ids, mask, opts, eos, pad, return_scores=True)
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          num_beams=num_beams, length_penalty=1.0, early_stopping=False, eos_token_id=eos,
                          pad_token_id=pad, return_dict_in_generate=True, output_scores=True)
    skip = 1 if lm.is_encoder_decoder else ids.shape[1]
    theirs = out.sequences[:, skip:]
    n = max(ours.shape[1], theirs.shape[1])
    ours, theirs = _pad_right(ours, n, pad).cpu(), _pad_right(theirs, n, pad).cpu()
    same = (ours == theirs).all(1)
    score_diff = (our_scores.float().cpu() - out.sequences_scores.float().cpu()).abs()
    return {"num_beams": num_beams, "new_tokens": new_tokens, "ours": ours.tolist(), "transformers": theirs.tolist(),
            "scores_ours": our_scores.tolist(), "scores_transformers": out.sequences_scores.tolist(),
            "identical_rows": int(same.sum()), "rows": ours.shape[0],
            "max_score_diff": float(score_diff.max()),
            "tie": bool((score_diff[~same] <= 2 * tie).all()) if not same.all() else None}


def compare_tokenizers(lm, prompts: list) -> dict:
    """transformers' tokenizer against ours on the prompts (skipped, with the reason, when it cannot load)."""
    transformers = import_transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(lm.folder)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return {"checked": False, "reason": f"transformers cannot load the tokenizer: {first}"}
    differ = [p for p in prompts if tok(p)["input_ids"] != lm.tokenizer.encode(p)]
    return {"checked": True, "prompts": len(prompts), "identical": len(prompts) - len(differ), "differ": differ}


def check(lm, hf, prompts: list, *, new_tokens: int = 16, num_beams: int = 1, tolerance: float | None = None,
          quantize: str | None = None, reference_model: str | None = None) -> Report:
    """Compare a loaded minibloom LM with a transformers model on `prompts`. Returns the Report.
    quantize: how `lm` was loaded (None, 'int8', 'int8-weight'): picks the default tolerance."""
    t0 = time.perf_counter()
    if lm.model.config.vocab_size != hf.config.vocab_size:
        raise MinibloomError(f"different vocabularies: minibloom's model has {lm.model.config.vocab_size} rows, "
                             f"transformers' {hf.config.vocab_size}: compare the same checkpoint")
    mode = quantize or dtype_name(lm.dtype)
    tol = TOLERANCES[mode] if tolerance is None else tolerance
    report = Report(model=str(lm.folder), reference_model=str(reference_model or lm.folder),
                    dtype=dtype_name(lm.dtype), backend=lm.model.backend.name, quantize=quantize,
                    device=str(lm.device), tolerance=tol, tolerance_mode=mode if tolerance is None else "user",
                    prompts=list(prompts))
    ids, mask = lm.encode_batch(prompts)
    ours, theirs, valid = forward_both(lm, hf, ids, mask)
    report.layers = [layer_diff(name, ours[name], theirs[name], valid[name]) for name in ours]
    report.first_divergence, report.first_jump = mark_layers(report.layers, tol)
    logits = report.layers[-1]
    atol = tol * logits.ref_max_abs                                       # the logits' tolerance in logit units
    report.top1 = top1_agreement(ours["logits"], theirs["logits"], valid["logits"], atol)
    # A generated token may differ only where the two models' logits could swap it: by the difference actually
    # measured (x2 for the steps that follow), and never more than the tolerance. A bit-exact forward allows none.
    tie = min(atol, 2 * logits.max_abs)
    del ours, theirs
    report.tokenizer = compare_tokenizers(lm, prompts)
    if new_tokens > 0:
        report.greedy = compare_greedy(lm, hf, ids, mask, new_tokens, tie)
    if num_beams > 1 and new_tokens > 0:
        report.beam = compare_beam(lm, hf, ids, mask, new_tokens, num_beams, tie)
    report.verdict, report.reasons = verdict(report)
    report.versions = _versions()
    report.seconds = time.perf_counter() - t0
    return report


def verdict(r: Report) -> tuple[str, list]:
    reasons = []
    if r.first_divergence:
        l = next(l for l in r.layers if l.name == r.first_divergence)
        reasons.append(f"{l.name}: relative difference {l.rel:.3g} > tolerance {r.tolerance:g}")
    if r.top1.get("decisive_disagreements"):
        reasons.append(f"logits: {r.top1['decisive_disagreements']} position(s) where the top-1 token differs "
                       f"by more than the tolerance")
    if r.tokenizer.get("checked") and r.tokenizer["differ"]:
        reasons.append(f"tokenizer: {len(r.tokenizer['differ'])} prompt(s) tokenized differently")
    if r.greedy and r.greedy["tie"] is False:
        m = max(r.greedy["mismatches"], key=lambda m: m["margin"])
        reasons.append(f"greedy: row {m['row']} step {m['step']} gives {m['ours']} instead of {m['transformers']} "
                       f"(transformers' margin {m['margin']:.3g}, not a near tie)")
    if r.beam and r.beam["tie"] is False:
        reasons.append(f"beam search: {r.beam['rows'] - r.beam['identical_rows']} prompt(s) differ, scores by up "
                       f"to {r.beam['max_score_diff']:.3g}")
    if reasons:
        return "diverged", reasons
    exact = (all(l.max_abs == 0 for l in r.layers) and (not r.greedy or not r.greedy["mismatches"])
             and (r.beam is None or r.beam["max_score_diff"] == 0 and r.beam["tie"] is None))
    return ("bit-exact" if exact else "within tolerance"), reasons


# -- output ---------------------------------------------------------------------------------------------------------

def format_report(r: Report) -> str:
    lines = [f"minibloom parity: {r.model}" + (f" vs transformers on {r.reference_model}"
                                               if r.reference_model != r.model else " vs transformers"),
             f"dtype {r.dtype}, backend {r.backend}, quantize {r.quantize or 'none'}, device {r.device}, "
             f"{len(r.prompts)} prompts, tolerance {r.tolerance:g} ({r.tolerance_mode})",
             "", f"{'layer':<28} {'max abs':>10} {'mean abs':>10} {'relative':>10}"]
    for l in r.layers:
        mark = ("  <- first divergence" if l.name == r.first_divergence else
                "  <- first jump" if l.name == r.first_jump else "")
        lines.append(f"{l.name:<28} {l.max_abs:>10.3g} {l.mean_abs:>10.3g} {l.rel:>10.3g}{mark}")
    t = r.top1
    lines += ["", f"top-1 agreement: {t['agree']}/{t['positions']} positions ({100 * t['fraction']:.1f}%), "
                  f"{t['decisive_disagreements']} decisive disagreement(s)"]
    if r.tokenizer.get("checked"):
        lines.append(f"tokenizer: {r.tokenizer['identical']}/{r.tokenizer['prompts']} prompts identical")
    else:
        lines.append(f"tokenizer: not compared ({r.tokenizer.get('reason')})")
    for name, g in (("greedy", r.greedy), (f"beam search (num_beams={r.beam['num_beams']})" if r.beam else "", r.beam)):
        if not g:
            continue
        line = f"{name}: {g['identical_rows']}/{g['rows']} sequences identical ({g['new_tokens']} new tokens)"
        if name == "greedy" and g["mismatches"]:
            m = max(g["mismatches"], key=lambda m: m["margin"])
            line += (f"; largest margin where they part: row {m['row']} step {m['step']}, {m['ours']} vs "
                     f"{m['transformers']}, margin {m['margin']:.3g} ({'near tie' if g['tie'] else 'NOT a near tie'})")
        elif name != "greedy":
            line += f"; max score difference {g['max_score_diff']:.3g}"
        lines.append(line)
    desc = {"bit-exact": "bit-exact: every difference is exactly 0",
            "within tolerance": f"within tolerance: every layer's relative difference <= {r.tolerance:g} "
                                f"({r.tolerance_mode})",
            "diverged": "DIVERGED"}[r.verdict]
    lines += ["", f"verdict: {desc}"] + [f"  - {reason}" for reason in r.reasons]
    return "\n".join(lines)


def write_json(r: Report, path):
    data = asdict(r)
    data["exit_code"] = r.exit_code
    Path(path).write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str))


def plot(r: Report, path):
    """Per-layer relative and max-abs differences on a log scale, with the tolerance. Exact zeros sit on the floor."""
    from .inspect_model import pyplot

    plt = pyplot()
    names = [l.name for l in r.layers]
    nonzero = [v for l in r.layers for v in (l.rel, l.max_abs) if 0 < v < math.inf]
    floor = min(nonzero + [r.tolerance]) / 10
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 3.6), dpi=100)
    for attr, style, label in (("rel", "o-", "relative (max|diff| / max|ref|)"), ("max_abs", "s--", "max |diff|")):
        ax.plot(x, [max(getattr(l, attr), floor) for l in r.layers], style, ms=3.5, lw=1.2, label=label)
    ax.axhline(r.tolerance, color="tab:red", lw=1, ls=":", label=f"tolerance {r.tolerance:g} (relative)")
    ax.axhline(floor, color="0.6", lw=0.8, label="exactly 0")
    if r.first_jump:
        ax.axvline(names.index(r.first_jump), color="tab:orange", lw=1,
                   label=("first divergence: " if r.first_divergence else "first jump: ") + r.first_jump)
    ax.set_yscale("log")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("difference vs transformers")
    ax.set_title(f"{Path(r.model).name}  {r.dtype} {r.backend}{' ' + r.quantize if r.quantize else ''}: {r.verdict}",
                 fontsize=9)
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3, which="both", lw=0.4)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _versions() -> dict:
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def read_prompts(path) -> list:
    p = Path(path)
    if not p.is_file():
        raise MinibloomError(f"--prompts {path}: no such file (give a text file with one prompt per line)")
    prompts = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise MinibloomError(f"--prompts {path} has no prompts: write one prompt per line")
    return prompts


# -- the command ----------------------------------------------------------------------------------------------------

def add_arguments(p):
    from .cli import add_model_arguments, positive_int

    add_model_arguments(p, default_model=None)
    p.add_argument("--reference-model", default=None,
                   help="the checkpoint transformers loads (default: the same as --model); e.g. the original of a "
                        "converted or re-sharded checkpoint")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (default: a built-in "
                                                   f"multilingual set of {len(PROMPTS)})")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy (and beam) tokens to compare; 0 skips "
                                                              "generation (default 16)")
    p.add_argument("--num-beams", type=positive_int, default=None,
                   help="beam search width to compare (1 = off; default 4 for encoder-decoders, 1 otherwise)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="allowed relative difference per layer (default per mode: "
                        + ", ".join(f"{k} {v:g}" for k, v in TOLERANCES.items()) + ")")
    p.add_argument("--json", default=None, metavar="PATH", help="write everything (all layers, tokens) as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of the per-layer error (matplotlib)")


def run(args) -> int:
    from .cli import load_from_args, prepare_output

    if args.model is None:
        raise MinibloomError("minibloom parity needs --model: a checkpoint folder, a Hub repo id or a family name")
    if args.new_tokens < 0:
        raise MinibloomError(f"--new-tokens {args.new_tokens}: must be >= 0 (0 skips generation)")
    if args.tolerance is not None and not args.tolerance >= 0:
        raise MinibloomError(f"--tolerance {args.tolerance}: must be >= 0")
    import_transformers()
    if args.json:                                    # fail before the long run, not after it
        args.json = prepare_output(args.json, "--json")
    if args.plot:
        args.plot = prepare_output(args.plot, "--plot")
    if args.plot:
        from .inspect_model import pyplot
        pyplot()
    prompts = read_prompts(args.prompts) if args.prompts else PROMPTS
    lm = load_from_args(args)
    reference = args.reference_model or args.model
    if args.reference_model:
        from .hub import resolve
        reference = resolve(args.reference_model)
    hf = load_transformers(lm.folder if args.reference_model is None else reference, lm.dtype, lm.device)
    num_beams = args.num_beams or (4 if lm.is_encoder_decoder else 1)
    report = check(lm, hf, prompts, new_tokens=args.new_tokens, num_beams=num_beams, tolerance=args.tolerance,
                   quantize=lm.quantize, reference_model=str(reference) if args.reference_model else None)
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
        print(f"[minibloom] wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(report, args.plot)
        print(f"[minibloom] wrote {args.plot}", file=sys.stderr)
    return report.exit_code
