"""`minibloom convert` and `LM.save`: write a loaded model back as a Hub-style folder.

    minibloom convert --model bloomz-7b1 --quantize int8 --out bloomz-7b1-int8
    minibloom generate --model bloomz-7b1-int8 "..."          # int8 from the file: nothing to quantize

The folder holds what `load` reads: config.json, model.safetensors (or shards and model.safetensors.index.json)
and the tokenizer files, copied from the source. Tensors keep the Hub's names, so a float folder (e.g. mT0's fp32
converted to bf16) is an ordinary checkpoint that transformers reads too. An int8 folder stores each quantized
weight as `<name>.weight` (int8, (out, in)) with `<name>.weight_scale` (fp32, (out,): the absmax/127 of each row)
and records the mode and outlier threshold in config.json's quantization_config (quant_method "minibloom-int8").
Loading it maps the int8 weights straight from the file, as a float load maps weights kept in their own dtype.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from .errors import MinibloomError
from .loader import dtype_name, write_checkpoint
from .quantize import FORMAT_VERSION, QUANT_METHOD

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def checkpoint_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to save, under their Hub names: parameters and persistent buffers (int8 scales), each stored
    once; a tied head (BLOOM, T5 v1.0) is the embedding and is omitted, as on the Hub."""
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t.detach()
    return out


def saved_config(lm) -> dict:
    """config.json for the saved folder: the source's, with the saved dtype and, for int8, how to read it."""
    config = dict(lm.config)
    config["torch_dtype"] = dtype_name(lm.dtype)
    config.pop("quantization_config", None)
    quantized = [m for m in lm.model.modules() if getattr(m, "weight_scale", None) is not None]
    if quantized:
        modes = {m.quant for m in quantized}
        thresholds = {m.threshold for m in quantized}
        if len(modes) != 1 or len(thresholds) != 1:
            raise MinibloomError(f"cannot save a model whose int8 layers mix modes {sorted(modes)} or thresholds "
                                 f"{sorted(thresholds)}: load it with one quantize= and int8_threshold=")
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "mode": modes.pop(),
            "llm_int8_threshold": thresholds.pop(),
            "weights": "<name>.weight int8 (out, in) and <name>.weight_scale float32 (out,): "
                       "W ~ weight * scale[:, None]",
        }
    return config


def support_files(folder: Path) -> list[Path]:
    """The source's tokenizer and other small files (what hub.ALLOW_PATTERNS fetches), weights and config aside."""
    keep = []
    for p in sorted(folder.iterdir()):
        if p.is_dir() or p.suffix == ".safetensors" or p.name in WEIGHT_FILES + ("config.json",):
            continue
        if p.suffix == ".json" or p.name.startswith("tokenizer") or p.name == "spiece.model":
            keep.append(p)
    return keep


def prepare_destination(out: Path, source: Path, overwrite: bool):
    if out.exists() and not out.is_dir():
        raise MinibloomError(f"{out} is a file: pass a folder to write the model into")
    if out.exists() and out.resolve() == Path(source).resolve():
        raise MinibloomError(f"{out} is the folder the model was loaded from (its weights are read from those "
                             f"files): write to another folder")
    if out.is_dir():
        existing = [p for p in out.iterdir() if p.name == "config.json" or p.suffix == ".safetensors"
                    or p.name in WEIGHT_FILES]
        if existing and not overwrite:
            raise MinibloomError(f"{out} already holds a model ({existing[0].name}): pass another folder, or "
                                 f"overwrite=True (CLI: --overwrite)")
        for p in existing:  # stale shards of an earlier save must not be read with the new index
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def save(lm, folder, *, max_shard_bytes: int = 5 * 10**9, overwrite: bool = False) -> list[str]:
    """Write `lm` (a loaded minibloom.LM) into `folder`; returns the file names written."""
    if max_shard_bytes < 1:
        raise MinibloomError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    out = Path(folder).expanduser()
    config = saved_config(lm)
    prepare_destination(out, lm.folder, overwrite)
    written = write_checkpoint(out, checkpoint_tensors(lm.model), max_shard_bytes)
    for p in support_files(Path(lm.folder)):
        shutil.copyfile(p, out / p.name)  # follows the Hub cache's symlinks
        written.append(p.name)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return written + ["config.json"]


# -- the command -------------------------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    for unit, factor in units.items():
        if t.endswith(unit):
            t, scale = t[: -len(unit)], factor
            break
    else:
        scale = 1
    try:
        value = float(t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return int(value)


def add_arguments(p: argparse.ArgumentParser):
    p.description = ("Load a model (optionally cast or quantized) and write it as a folder that minibloom loads "
                     "directly: an int8 folder needs no quantizing on load; a float one is a plain Hub checkpoint.")
    p.add_argument("--model", "-m", required=True, help="a local folder, a Hub repo id or a family name")
    p.add_argument("--out", "-o", required=True, help="the folder to write")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="dtype of the float tensors (default: the checkpoint's own)")
    p.add_argument("--quantize", choices=["int8", "int8-weight"], default=None,
                   help="save int8 weights with per-row scales; the mode is the default when the folder is loaded")
    p.add_argument("--int8-threshold", type=float, default=None,
                   help="LLM.int8() outlier threshold recorded as the folder's default (default 6.0)")
    p.add_argument("--max-shard-size", type=parse_size, default=5 * 10**9,
                   help="split the weights into shards of at most this size (default 5GB, as the Hub does)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")


def run(args) -> int:
    from .cli import prepare_output
    from .lm import load
    t0 = time.perf_counter()
    args.out = prepare_output(args.out, "--out", folder=True)
    lm = load(args.model, dtype=None if args.dtype == "auto" else args.dtype, quantize=args.quantize,
              int8_threshold=args.int8_threshold)
    if lm.quantize and not args.quantize:
        raise MinibloomError(f"{args.model} holds int8 weights (a folder saved by minibloom convert), so it cannot be "
                             f"written as a float checkpoint: convert the float source instead, or pass --quantize "
                             f"{lm.quantize} to save it as int8 again")
    files = save(lm, args.out, max_shard_bytes=args.max_shard_size, overwrite=args.overwrite)
    size = sum((Path(args.out) / f).stat().st_size for f in files)
    kind = lm.quantize or dtype_name(lm.dtype)
    print(f"[minibloom] wrote {args.out} ({kind}): {len(files)} files, {size / 1e6:,.0f} MB, in "
          f"{time.perf_counter() - t0:.1f} s. Load it with: minibloom generate --model {args.out}", file=sys.stderr)
    return 0
