"""`minibloom inspect`: look inside a checkpoint's architecture.

Prints the config, the module tree (shapes and parameter counts, identical blocks folded), the parameters per
component (embeddings, attention, MLP, norms, head), the bytes in fp32 / bf16 / fp16 / int8, and BLOOM's ALiBi slopes
or T5's relative-position bucket table. With --plot DIR it draws the ALiBi bias per head or the T5 bucket map, and
the attention maps of a prompt (one layer, every head), recomputed from the tapped input of that layer.
"""
import dataclasses
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import ops
from .errors import MinibloomError

COMPONENTS = ("embeddings", "attention", "position bias", "MLP", "norms", "head")
DEFAULT_PROMPT = "Translate to English: Je t'aime."


def component(name: str) -> str:
    """The component a parameter belongs to, from its Hub name."""
    if name in ("word_embeddings.weight", "shared.weight"):
        return "embeddings"
    if name.startswith("lm_head."):
        return "head"
    if "relative_attention_bias" in name:
        return "position bias"
    if "layernorm" in name or "layer_norm" in name or name.startswith("ln_f."):
        return "norms"
    if ".mlp." in name or ".DenseReluDense." in name:
        return "MLP"
    if "attention" in name.lower():   # self_attention, SelfAttention, EncDecAttention
        return "attention"
    raise MinibloomError(f"internal error: parameter {name} belongs to no component")


def parameter_counts(model: torch.nn.Module) -> dict:
    """Parameters per component. A tied head shares the embedding's tensor and is counted once (named_parameters
    yields a shared tensor once)."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():
        counts[component(name)] += p.numel()
    return counts


def checkpoint_count(lm) -> int:
    """Elements over the checkpoint's tensors, leaving out redundant copies the model ignores and the per-row
    scales of a saved int8 folder (buffers, not parameters)."""
    from .lm import ARCHITECTURES
    import importlib
    from .loader import Checkpoint

    arch = importlib.import_module(f".{ARCHITECTURES[lm.config['model_type']]}", __package__)
    ckpt = Checkpoint(lm.folder)
    return sum(math.prod(ckpt.shape(k)) for k in ckpt.keys()
               if not arch.ignored_key(k) and not k.endswith(".weight_scale"))


def memory_bytes(model: torch.nn.Module) -> dict:
    """Bytes of the weights per storage format. int8: Linear and Embedding matrices at 1 byte plus one fp32 scale
    per row (as quantize.py stores them); biases and norms stay 16-bit."""
    n = sum(p.numel() for p in model.parameters())
    int8 = 0
    seen = set()
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            matrix = isinstance(m, (ops.Linear, ops.Embedding)) and p.dim() == 2 and not getattr(m, "keep_float", False)
            int8 += p.numel() + 4 * p.shape[0] if matrix else 2 * p.numel()
    return {"float32": 4 * n, "bfloat16": 2 * n, "float16": 2 * n, "int8": int8}


def _signature(module: torch.nn.Module) -> tuple:
    return tuple((n, tuple(p.shape)) for n, p in module.named_parameters())


def _fmt_shapes(module: torch.nn.Module) -> str:
    return " ".join(f"{n}{list(p.shape)}" for n, p in module.named_parameters(recurse=False))


def module_tree(model: torch.nn.Module) -> list:
    """Lines of the module tree (indented names relative to the parent): class, own parameter shapes, parameters
    below. Consecutive blocks with the same shapes are shown once (h.0..23, counted 24 times)."""
    lines = []
    tied = {id(p) for m in model.modules() if isinstance(m, ops.Embedding) for p in m.parameters()}

    def walk(module, name, depth, repeat=1):
        own = list(module.parameters(recurse=False))
        shared = own and all(id(p) in tied for p in own) and not isinstance(module, ops.Embedding)
        per = sum(p.numel() for p in module.parameters())
        count = 0 if shared else repeat * per
        note = ("  (tied to the embedding: counted once)" if shared else
                f"  ({repeat} blocks x {per:,}; the lines below: one block)" if repeat > 1 else "")
        lines.append(f"{'  ' * depth + name:<40} {type(module).__name__:<20} {_fmt_shapes(module):<34} "
                     f"{count:>14,}{note}")
        for child_name, child in module.named_children():
            if not isinstance(child, torch.nn.ModuleList):
                walk(child, child_name, depth + 1)
                continue
            items, i = list(child), 0
            while i < len(items):   # fold a run of blocks with the same shapes into one entry
                j = i
                while j + 1 < len(items) and _signature(items[j + 1]) == _signature(items[i]):
                    j += 1
                walk(items[i], f"{child_name}.{i}" if i == j else f"{child_name}.{i}..{j}", depth + 1,
                     j - i + 1)
                i = j + 1

    walk(model, "(model)", 0)
    return lines


def bucket_runs(bidirectional: bool, num_buckets: int, max_distance: int) -> dict:
    """bucket -> (lowest, highest) relative position (key - query) it covers, over +-2 * max_distance. The
    outermost buckets extend to infinity; in the decoder, keys after the query (masked anyway) share bucket 0."""
    rel = torch.arange(-2 * max_distance, 2 * max_distance + 1)
    buckets = ops.t5_bucket(rel, bidirectional, num_buckets, max_distance)
    runs = {}
    for r, b in zip(rel.tolist(), buckets.tolist()):
        if not bidirectional and r > 0:
            continue
        lo, hi = runs.get(b, (r, r))
        runs[b] = (min(lo, r), max(hi, r))
    return runs


def _fmt_run(lo, hi, edge) -> str:
    if lo == -edge:
        return f"<= {hi}"
    if hi == edge:
        return f">= {lo}"
    return str(lo) if lo == hi else f"{lo}..{hi}"


def bucket_table(cfg) -> list:
    n, d = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
    enc, dec = bucket_runs(True, n, d), bucket_runs(False, n, d)
    lines = [f"relative position buckets (num_buckets {n}, max_distance {d}; relative = key - query)",
             f"{'bucket':>6}  {'encoder (bidirectional)':<24} decoder (causal)"]
    for b in range(n):
        e = _fmt_run(*enc[b], 2 * d) if b in enc else "-"
        c = _fmt_run(*dec[b], 2 * d) if b in dec else "-"
        lines.append(f"{b:>6}  {e:<24} {c}")
    return lines


def alibi_table(n_head: int) -> list:
    slopes = ops.alibi_slopes(n_head)
    lines = [f"ALiBi slopes ({n_head} heads): score(i, j) += slope * j, the key position (softmax makes this equal "
             f"to -slope * (i - j))", f"{'head':>6} {'slope':>12} {'= 2^-x, x':>10}"]
    lines += [f"{h:>6} {s:>12.6g} {-math.log2(s):>10.4g}" for h, s in enumerate(slopes.tolist())]
    return lines


# -- attention maps, recomputed from the tapped input of a layer -----------------------------------------------------

def attention_probs(lm, prompt: str, layer: int) -> tuple[list, torch.Tensor]:
    """(tokens, probs (H, T, T)) of one self-attention layer on `prompt` (the encoder's for T5 models).

    The model is traced once; the layer's input is the previous tap, and q, k are recomputed with the layer's
    own modules. The scores are the reference's: BLOOM alibi + q.k/sqrt(D), T5 q.k + position bias."""
    cfg = lm.model.config
    n_layer = cfg.num_layers if lm.is_encoder_decoder else cfg.n_layer
    if not 0 <= layer < n_layer:
        raise MinibloomError(f"--layer {layer}: the model has layers 0..{n_layer - 1}")
    taps = lm.trace(prompt)
    ids = lm.tokenizer.encode(prompt)
    tokens = [lm.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    with torch.no_grad():
        if lm.is_encoder_decoder:
            x = taps["encoder.embeddings" if layer == 0 else f"encoder.block.{layer - 1}"]   # (1, T, C)
            sa = lm.model.encoder.block[layer].layer[0]
            attn = sa.SelfAttention
            h = sa.layer_norm(x)
            q, k = attn.heads(attn.q, h), attn.heads(attn.k, h)                             # (1, H, T, D)
            T = q.shape[2]
            scores = torch.matmul(q, k.transpose(2, 3)) + lm.model.encoder.bias().dense(T, T, 0).to(q.dtype)
        else:
            x = taps["embeddings" if layer == 0 else f"h.{layer - 1}"]
            block = lm.model.h[layer]
            attn = block.self_attention
            B, T, _ = x.shape
            qkv = attn.query_key_value(block.input_layernorm(x)).view(B, T, attn.H, 3, attn.D)
            q, k = (qkv[..., i, :].transpose(1, 2) for i in range(2))                      # (1, H, T, D)
            key_pos = torch.arange(T, device=x.device)[None]
            alibi = lm.model.slopes[None, :, None, None] * key_pos[:, None, None, :]          # (1, H, 1, T)
            scores = alibi.to(q.dtype) + torch.matmul(q, k.transpose(2, 3)) / math.sqrt(attn.D)
            scores = scores + ops.causal_mask(key_pos, T, 0, q.dtype)
        return tokens, F.softmax(scores.float(), dim=-1)[0]


# -- plots ----------------------------------------------------------------------------------------------------------

def pyplot():
    """matplotlib.pyplot without a display, or one clear error (matplotlib is optional: it comes with the extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MinibloomError("--plot needs matplotlib, which is not installed: pip install 'minibloom[parity]' "
                             "(or leave out --plot)") from e
    return plt


def _grid(n: int):
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def plot_alibi(n_head: int, path, T: int = 24):
    """The bias each head adds to a causal score matrix, written as -slope * (i - j) (the paper's form)."""
    plt = pyplot()
    slopes = ops.alibi_slopes(n_head)
    heads = list(range(n_head)) if n_head <= 16 else torch.linspace(0, n_head - 1, 16).round().long().tolist()
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    rows, cols = _grid(len(heads))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 1.4, 1.6 * rows + 0.4), dpi=80, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    lowest = float(-slopes[heads].max() * (T - 1))   # one color scale for every head: the slopes show
    for ax, h in zip(axes.flat, heads):
        bias = (-slopes[h] * (i - j)).masked_fill(j > i, float("nan"))
        im = ax.imshow(bias.numpy(), cmap="viridis", vmin=lowest, vmax=0)
        ax.set_title(f"head {h}: slope {slopes[h]:.3g}", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="bias added to the score")
    shown = "" if n_head <= 16 else f", 16 of {n_head} heads"
    fig.suptitle(f"ALiBi bias per head: -slope * (i - j), query i, key j <= i ({T} tokens{shown})", fontsize=9)
    fig.savefig(path)
    plt.close(fig)


def plot_buckets(lm, path, T: int = 64):
    """Encoder and decoder bucket maps (query x key) and the encoder's learned bias table (bucket x head)."""
    plt = pyplot()
    cfg = lm.model.config
    rel = torch.arange(T)[None] - torch.arange(T)[:, None]                                   # (T, T) key - query
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), dpi=80)
    for ax, bidir, title in ((axes[0], True, "encoder (bidirectional)"), (axes[1], False, "decoder (causal)")):
        b = ops.t5_bucket(rel, bidir, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
        im = ax.imshow(b.float().masked_fill((rel > 0) & (not bidir), float("nan")).numpy(), cmap="tab20c")
        ax.set_title(f"bucket, {title}", fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        fig.colorbar(im, ax=ax, fraction=0.046)
    table = lm.model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.float().cpu()  # (buckets, H)
    im = axes[2].imshow(table.numpy(), aspect="auto", cmap="coolwarm")
    axes[2].set_title("encoder bias table (block 0)", fontsize=9)
    axes[2].set_xlabel("head")
    axes[2].set_ylabel("bucket")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_attention(tokens: list, probs: torch.Tensor, layer: int, path, title: str):
    plt = pyplot()
    H, T, _ = probs.shape
    rows, cols = _grid(H)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.1 * rows + 0.5), dpi=80, squeeze=False)
    labels = [t.replace("\n", "\\n") for t in tokens]
    for ax in axes.flat:
        ax.axis("off")
    for h, ax in enumerate(axes.flat[:H]):
        ax.axis("on")
        ax.imshow(probs[h].cpu().numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"head {h}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        if T <= 24 and h % cols == 0:
            ax.set_yticks(range(T))
            ax.set_yticklabels(labels, fontsize=5)
    fig.suptitle(f"{title}: attention probabilities, layer {layer} (query rows, key columns)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- the command ----------------------------------------------------------------------------------------------------

def report(lm) -> str:
    model, cfg = lm.model, lm.model.config
    derived = {"head_dim (D)": cfg.d_kv, "inner (H * D)": cfg.inner} if lm.is_encoder_decoder else \
        {"head_dim (D)": cfg.head_dim}
    lines = [f"minibloom inspect: {lm.folder} ({lm.dtype}, {lm.device})", "",
             f"config ({type(cfg).__name__}, read from config.json; legacy names mapped):"]
    lines += [f"  {k} = {v}" for k, v in {**dataclasses.asdict(cfg), **derived}.items()]
    lines += ["", f"{'module':<40} {'class':<20} {'own parameters':<34} {'parameters':>14}"]
    lines += module_tree(model)
    counts = parameter_counts(model)
    total = sum(counts.values())
    lines += ["", "parameters per component:"]
    lines += [f"  {c:<14} {n:>14,}  {100 * n / total:5.1f}%" for c, n in counts.items() if n]
    in_file = checkpoint_count(lm)
    lines.append(f"  {'total':<14} {total:>14,}  (checkpoint tensors: {in_file:,}"
                 f"{', equal' if in_file == total else ', DIFFERENT'})")
    lines += ["", "weights in memory:"]
    lines += [f"  {k:<9} {v / 2**20:>12,.1f} MiB" for k, v in memory_bytes(model).items()]
    lines[-1] += "  (Linear/Embedding matrices in int8 + one fp32 scale per row; biases, norms 16-bit)"
    lines.append("")
    lines += bucket_table(cfg) if lm.is_encoder_decoder else alibi_table(cfg.n_head)
    return "\n".join(lines)


def add_arguments(p):
    from .cli import add_model_arguments

    add_model_arguments(p, default_model=None)
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNGs to DIR: the ALiBi bias per head or the "
                                                               "T5 bucket map, and the attention maps of --prompt")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the prompt for the attention maps "
                                                            f"(default: {DEFAULT_PROMPT!r})")
    p.add_argument("--layer", type=int, default=0, help="the layer whose attention maps are drawn (encoder layer "
                                                        "for T5 models; default 0)")


def run(args) -> int:
    from .cli import load_from_args, prepare_output

    if args.model is None:
        raise MinibloomError("minibloom inspect needs --model: a checkpoint folder, a Hub repo id or a family name")
    if args.plot:
        args.plot = prepare_output(args.plot, "--plot", folder=True)
        pyplot()
    lm = load_from_args(args)
    print(report(lm))
    if args.plot:
        tokens, probs = attention_probs(lm, args.prompt, args.layer)
        out = Path(args.plot)
        out.mkdir(parents=True, exist_ok=True)
        name = Path(lm.folder).name
        written = [out / ("t5_buckets.png" if lm.is_encoder_decoder else "alibi.png"),
                   out / f"attention_layer{args.layer}.png"]
        if lm.is_encoder_decoder:
            plot_buckets(lm, written[0])
        else:
            plot_alibi(lm.model.config.n_head, written[0])
        plot_attention(tokens, probs, args.layer, written[1], name)
        for path in written:
            print(f"[minibloom] wrote {path}", file=sys.stderr)
    return 0
