"""`minibloom bench`: minibloom, transformers and CTranslate2 on one checkpoint, in one run, next to the floor.

    minibloom bench --shape bloomz-560m --dtype float32,bfloat16 --batch 1,8 --prompt-tokens 128 --new-tokens 128

Method (each point is there because the number would lie without it):
  * every measurement is a fresh process (python -m minibloom.bench_peers), engines alternate A B C A B C ...,
    so a slow period of the machine hits every engine, not one;
  * whole models only: the weights (hundreds of MB) cannot sit in the 32 MiB L3 between tokens, as one layer in a
    loop would (2-3x flattering);
  * a warm-up generation precedes every timed one and is not counted;
  * every engine gets the same thread count (torch.set_num_threads, CTranslate2 intra_threads, OMP_NUM_THREADS),
    the same prompt ids and exactly --new-tokens greedy tokens;
  * before each run the machine must be quiet (/proc/stat busy share over 1 s); the CPU used by others during the
    run is measured too (machine busy time minus the worker's own). Loaded runs are kept and marked, never hidden;
  * the floor is the machine's read bandwidth measured in the same run (a reduction over a buffer far larger than
    L3, best of N): a decode step cannot be faster than (weight bytes it reads) / (bandwidth).
The worker code (engine loading, timing, conversion, the bandwidth probe) is in bench_peers.py; the floor's
arithmetic, the quiet-machine check and the machine's description in bench_machine.py; the statistics, tables and
chart in bench_report.py. This file, in order: running workers, planning (which engine and precision runs), then
the command itself: run -> make_batches -> run_rounds -> finish -> show.
"""
import argparse
import datetime
import importlib.util
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import bench_peers
from .bench_machine import (QUANT_MODES, busy_share, checkpoint_shapes, cpu_jiffies, decode_weight_bytes,
                            machine_info, quiet_check)
from .bench_report import markdown, plot, summarize
from .bench_peers import SHAPES
from .cli import add_model_arguments, positive_int
from .errors import MinibloomError

PEERS = ("transformers", "ctranslate2")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Variant:
    engine: str        # minibloom | transformers | ctranslate2
    precision: str     # float32 | bfloat16 | float16 | int8 | int8-weight
    dtype: str         # activation dtype
    compute_type: str | None = None  # CTranslate2's name for the precision

    @property
    def name(self) -> str:
        return f"{self.engine} {self.precision}"


# -- running workers ---------------------------------------------------------------------------------------------------

def spawn(spec: dict, threads: int, timeout_s: float) -> dict:
    """Run one bench_peers task in a fresh process (bench_peers.py loaded by path: no package import, no torch).
    Returns {"result" | "error", "foreign", "wall_s"}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    boot = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('minibloom_bench_worker', "
            "sys.argv[1]); m = importlib.util.module_from_spec(s); s.loader.exec_module(m); sys.exit(m.main(sys.argv[2:]))")
    with tempfile.TemporaryDirectory(prefix="minibloom-bench-") as tmp:
        spec = dict(spec, out=os.path.join(tmp, "out.json"))
        spec_path = os.path.join(tmp, "spec.json")
        log_path = os.path.join(tmp, "log.txt")
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        j0 = cpu_jiffies()
        spec["t_spawn"] = time.time()
        Path(spec_path).write_text(json.dumps(spec))
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-c", boot, bench_peers.__file__, spec_path], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, cwd=tmp)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        out = {"foreign": busy_share(j0, cpu_jiffies(), own), "wall_s": wall}
        if proc.returncode == 0 and os.path.exists(spec["out"]):
            out["result"] = json.loads(Path(spec["out"]).read_text())
        else:
            tail = Path(log_path).read_text().strip().splitlines()
            reason = f"timed out after {timeout_s:.0f} s" if proc.returncode in (-9, 137) else \
                (tail[-1] if tail else f"exit status {proc.returncode}")
            out["error"] = reason
            out["log_tail"] = tail[-20:]
        return out


def measure(spec: dict, args) -> dict:
    """One counted run: warm the model's files into the page cache, wait for a quiet machine, run the worker."""
    _warm_files(spec["ct2_folder"] or spec["folder"])
    quiet = quiet_check(args.quiet_threshold, args.wait_quiet)
    out = spawn(spec, args.threads, args.timeout)
    rec = {"busy_before": quiet["busy"], "waited_s": quiet["waited_s"], "loadavg": quiet["loadavg"],
           "foreign_during": out["foreign"], "wall_s": out["wall_s"],
           "loaded": not quiet["quiet"] or out["foreign"] > args.quiet_threshold,
           "foreign_max": max(quiet["busy"], out["foreign"])}
    for key in ("result", "error", "log_tail"):
        if key in out:
            rec[key] = out[key]
    return rec


def _warm_files(folder: str | None):
    """Read a model's files once so every load starts from the page cache, not from the disk."""
    if not folder:
        return
    for path in Path(folder).iterdir():
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".json"):
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


# -- planning ----------------------------------------------------------------------------------------------------------

def engine_available(name: str) -> tuple[bool, str]:
    if name == "minibloom":
        return True, ""
    if importlib.util.find_spec(name) is None:
        return False, f"{name} is not installed (pip install 'minibloom[bench]')"
    return True, ""


def ct2_compute_type(precision: str, dtype: str, supported: list[str]) -> str | None:
    if precision == "int8":
        options = [f"int8_{dtype}", "int8"]
    elif precision in FLOAT_DTYPES:
        options = [precision]
    else:
        return None  # CTranslate2 has no weight-only int8
    return next((c for c in options if c in supported), None)


def plan(dtypes, quantize, peers, ct2_types) -> tuple[list[Variant], list[str]]:
    """The variants to run, in alternation order, and notes on the combinations that cannot be measured."""
    variants, notes = [], []
    precisions = [(d, d) for d in dtypes] + [(q, dtypes[0]) for q in quantize]
    if "ctranslate2" in peers and "int8" not in quantize:
        precisions.append(("int8", dtypes[0]))  # CTranslate2 int8: the fastest CPU peer, always worth a row
    for precision, dtype in precisions:
        if precision in dtypes or precision in quantize:
            variants.append(Variant("minibloom", precision, dtype))
        if "transformers" in peers:
            if precision in FLOAT_DTYPES:
                variants.append(Variant("transformers", precision, dtype))
            elif precision in quantize:
                notes.append(f"transformers {precision}: not measured (its int8 is bitsandbytes, a CUDA library)")
        if "ctranslate2" in peers:
            ct = ct2_compute_type(precision, dtype, ct2_types)
            if ct:
                variants.append(Variant("ctranslate2", precision, dtype, ct))
            else:
                notes.append(f"ctranslate2 {precision}: not measured (this device supports "
                             f"{', '.join(ct2_types) or 'nothing'})")
    return variants, notes


# -- the command -------------------------------------------------------------------------------------------------------

def _list(kind, allowed=None):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if kind is int:
            try:
                items = [positive_int(t) for t in items]
            except (ValueError, argparse.ArgumentTypeError):
                raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
        if allowed is not None:
            bad = [t for t in items if t not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}: choose from {', '.join(allowed)}")
        return items
    return parse


def add_arguments(p: argparse.ArgumentParser):
    add_model_arguments(p, default_model=None)
    # The shared --dtype / --quantize / --device take one value; here they take lists (and CUDA when present).
    shared = {a.dest: a for a in p._actions}
    for dest, kind, default, help_text in (
            ("dtype", _list(str, FLOAT_DTYPES), ["float32"],
             "comma-separated dtypes to measure, e.g. float32,bfloat16 (default float32)"),
            ("quantize", _list(str, QUANT_MODES + ("none",)), [],
             "also measure these int8 modes: int8 (W8A8, against CTranslate2 int8), int8-weight"),
            ("device", str, "auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N")):
        shared[dest].type, shared[dest].choices, shared[dest].default, shared[dest].help = kind, None, default, \
            help_text
    p.add_argument("--int8-from", choices=["hub", "converted"], default="hub",
                   help="where minibloom's int8 runs load from: hub (the float checkpoint, quantized on every load, "
                        "as `generate --quantize int8`; default) or converted (a folder written once by `minibloom "
                        "convert`, as CTranslate2 loads its converted model)")
    p.add_argument("--shape", choices=list(SHAPES),
                   help="a random-weight checkpoint of this real configuration, built once with transformers and "
                        "cached (instead of --model)")
    p.add_argument("--batch", type=_list(int), default=[1, 8], help="batch sizes (default 1,8)")
    p.add_argument("--prompt-tokens", type=positive_int, default=128, help="prompt length in tokens (default 128)")
    p.add_argument("--new-tokens", type=_list(int), default=[128],
                   help="tokens to generate: one number, or one per --batch entry (e.g. 128,32)")
    p.add_argument("--threads", type=positive_int, default=len(os.sched_getaffinity(0)),
                   help="threads for every engine (default: all CPUs this process may use)")
    p.add_argument("--repeats", type=positive_int, default=3, help="counted runs per engine and precision (default 3)")
    p.add_argument("--peers", type=_list(str, PEERS + ("none",)), default=list(PEERS),
                   help="comma-separated peers: transformers,ctranslate2 (default both; none for minibloom only)")
    p.add_argument("--json", metavar="PATH", help="write every sample and the summary as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG chart of decode ms/token with the floor")
    p.add_argument("--quiet-threshold", type=float, default=0.15,
                   help="busy share of the machine above which a run is marked loaded (default 0.15)")
    p.add_argument("--wait-quiet", type=float, default=15.0,
                   help="seconds to wait for a quiet machine before each run (default 15)")
    p.add_argument("--floor-mib", type=positive_int, default=None,
                   help="buffer for the bandwidth floor (default 1024 on CPU, 4096 on CUDA)")
    p.add_argument("--timeout", type=positive_int, default=1200, help="seconds before a run is abandoned")
    p.add_argument("--report", metavar="JSON", help="measure nothing: print the table (and --plot) of a saved --json")


def _tokenizer_size(folder: Path) -> int | None:
    """Tokens of tokenizer.json's model vocabulary: prompt ids stay below it (CTranslate2 maps ids through it)."""
    path = folder / "tokenizer.json"
    try:
        return len(json.loads(path.read_text())["model"]["vocab"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def make_batches(vocab_size: int, folder: Path, prompt_tokens: int, batch: list[int], new_tokens: list[int]):
    """One prompt for everyone: random ids, no special tokens (ids >= 4), one row per batch entry. Ascending batch
    size, so that the peak RSS read after each batch is its own."""
    import random
    rng = random.Random(0)
    hi = min(vocab_size, _tokenizer_size(folder) or vocab_size)
    prompts = [[rng.randrange(4, hi) for _ in range(prompt_tokens)] for _ in range(max(batch))]
    return [{"ids": prompts[:B], "new_tokens": n} for B, n in sorted(zip(batch, new_tokens))]


def run_rounds(report: dict, variants: list[Variant], args, device: str, folder: str, ct2_folders: dict,
               batches: list[dict], floor_bytes: int, log, int8_folder: str | None = None):
    """args.repeats rounds: a quiet check, the floor, then every variant in turn; samples go into the report.
    int8_folder: minibloom's int8 variants load this `minibloom convert` folder instead of `folder`."""
    broken = set()
    for rnd in range(args.repeats):
        quiet = quiet_check(args.quiet_threshold, args.wait_quiet)
        fl = spawn({"task": "floor", "bytes": floor_bytes, "threads": args.threads, "repeats": 5, "device": device},
                   args.threads, 600)
        if "result" in fl:
            loaded = not quiet["quiet"] or fl["foreign"] > args.quiet_threshold
            report["floor_samples"].append(dict(fl["result"], round=rnd, loaded=loaded, busy_before=quiet["busy"],
                                                foreign=fl["foreign"]))
            log(f"round {rnd + 1}/{args.repeats} floor {fl['result']['gbps']:.1f} GB/s" + (" ⚠ loaded" if loaded else ""))
        else:
            log(f"floor measurement failed: {fl['error']}")
        for v in variants:
            if v.name in broken:
                continue
            spec = {"task": "run", "engine": v.engine, "precision": v.precision, "dtype": v.dtype,
                    "quantize": v.precision if v.precision in QUANT_MODES else None,
                    "int8_threshold": args.int8_threshold, "backend": args.backend, "compile": args.compile,
                    "device": device,
                    "folder": int8_folder if int8_folder and v.engine == "minibloom" and v.precision in QUANT_MODES
                    else folder,
                    "ct2_folder": ct2_folders.get(v.precision) if v.engine == "ctranslate2" else None,
                    "compute_type": v.compute_type, "threads": args.threads, "batches": batches}
            rec = dict(measure(spec, args), variant=v.name, engine=v.engine, precision=v.precision, round=rnd)
            if "result" in rec:
                dec = ", ".join(f"b{b['batch']} {b['decode_s'] * 1e3:.1f}" for b in rec["result"]["batches"])
                log(f"round {rnd + 1}/{args.repeats} {v.name}: load {rec['result']['load_s']:.1f} s, decode ms/token "
                    f"{dec}" + (f" ⚠ loaded ({rec['foreign_max']:.0%} busy)" if rec["loaded"] else ""))
            else:
                broken.add(v.name)
                report["failed"].append(f"{v.name}: {rec['error']}")
                log(f"{v.name} failed: {rec['error']}")
            report["runs"].append(rec)
            if args.json and report["floor_samples"]:  # a run cut short still leaves every sample so far
                Path(args.json).write_text(json.dumps(finish(report), indent=1))


def run(args) -> int:
    from .cli import prepare_output
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)
    if args.json:
        args.json = prepare_output(args.json, "--json")
    if args.plot:
        args.plot = prepare_output(args.plot, "--plot")
    if args.report:
        try:
            return show(finish(json.loads(Path(args.report).read_text())), args.plot, log)
        except (OSError, ValueError, KeyError) as e:
            raise MinibloomError(f"cannot read the bench report {args.report} ({e}): pass a file written by --json")
    if bool(args.model) == bool(args.shape):
        raise MinibloomError("pass either --model (a folder, Hub repo id or family name) or --shape "
                             f"({', '.join(SHAPES)}), not both and not neither")
    quantize = [q for q in args.quantize if q != "none"]
    peers = [p for p in args.peers if p != "none"]
    if len(args.new_tokens) not in (1, len(args.batch)):
        raise MinibloomError(f"--new-tokens has {len(args.new_tokens)} values for {len(args.batch)} batch sizes: "
                             "give one number, or one per --batch entry")
    new_tokens = args.new_tokens * len(args.batch) if len(args.new_tokens) == 1 else args.new_tokens
    missing = []
    for peer in list(peers):
        ok, reason = engine_available(peer)
        if not ok:
            missing.append(reason)
            peers.remove(peer)
    command = command_line(args)

    log("preparing the checkpoint" + (" and its CTranslate2 conversions" if "ctranslate2" in peers else ""))
    ct2_quants = ["float32"] + (["bfloat16"] if "bfloat16" in args.dtype else []) + \
                 (["float16"] if "float16" in args.dtype else []) + ["int8"]
    prep = spawn({"task": "prepare", "shape": args.shape, "model": args.model, "device": args.device,
                  "ct2_quantizations": ct2_quants if "ctranslate2" in peers else [],
                  "minibloom_int8": bool(quantize) and args.int8_from == "converted"}, args.threads, 3600)
    if "error" in prep:
        raise MinibloomError(f"could not prepare the model: {prep['error']}")
    prep = prep["result"]
    device, folder = prep["device"], prep["folder"]
    if "ctranslate2" in peers and prep["ct2_error"]:
        missing.append(f"ctranslate2 could not convert the checkpoint ({prep['ct2_error']})")
        peers.remove("ctranslate2")
    variants, not_measured = plan(args.dtype, quantize, peers, prep["ct2_compute_types"])
    config = json.loads((Path(folder) / "config.json").read_text())
    model_type = config.get("model_type", "bloom")
    shapes = checkpoint_shapes(Path(folder))
    weight_bytes = {v.precision: decode_weight_bytes(shapes, model_type, v.precision, v.dtype) for v in variants}

    batches = make_batches(config["vocab_size"], Path(folder), args.prompt_tokens, args.batch, new_tokens)
    batch_sizes, new_tokens = [len(b["ids"]) for b in batches], [b["new_tokens"] for b in batches]
    floor_bytes = (args.floor_mib or (4096 if device.startswith("cuda") else 1024)) * 2**20

    report = {
        "version": 1, "date": datetime.date.today().isoformat(), "command": command, "device": device,
        "machine": machine_info(prep.get("device_name")),
        "settings": {"model": args.model, "shape": args.shape, "model_name": args.shape or args.model,
                     "folder": folder, "dtype": args.dtype, "quantize": quantize, "peers": peers,
                     "batch": batch_sizes, "prompt_tokens": args.prompt_tokens, "new_tokens": new_tokens,
                     "threads": args.threads, "repeats": args.repeats, "backend": args.backend,
                     "compile": args.compile, "quiet_threshold": args.quiet_threshold,
                     "int8_from": args.int8_from, "int8_folder": prep.get("int8_folder")},
        "variants": [v.__dict__ for v in variants], "weight_bytes_per_step": weight_bytes,
        "missing": missing, "not_measured": not_measured, "failed": [], "floor_samples": [], "runs": [],
    }
    run_rounds(report, variants, args, device, folder, prep["ct2"], batches, floor_bytes, log, prep.get("int8_folder"))

    if not report["floor_samples"]:
        raise MinibloomError("the bandwidth floor could not be measured (see the messages above)")
    finish(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        log(f"every sample written to {args.json}")
    return show(report, args.plot, log)


def finish(report: dict) -> dict:
    """(Re)compute the floor and the summary from the samples in the report."""
    floors = report["floor_samples"]
    best = max(floors, key=lambda f: f["gbps"])
    gb = [f["gbps"] for f in floors]
    l3 = report["machine"].get("l3_bytes")
    report["floor"] = {"gbps": best["gbps"], "method": best["method"], "bytes": best["bytes"],
                       "samples": len(floors), "min": min(gb), "max": max(gb),
                       "cache_resident": bool(l3 and report["device"] == "cpu" and
                                              max(report["weight_bytes_per_step"].values(), default=0) < l3)}
    variants = [Variant(**v) for v in report["variants"]]
    report["summary"] = summarize(report["runs"], variants, report["settings"]["batch"],
                                  report["weight_bytes_per_step"], best["gbps"])
    return report


def show(report: dict, plot_path: str | None, log) -> int:
    """The Markdown table on stdout and the chart; exit status 1 when nothing was measured."""
    print(markdown(report), end="")
    if plot_path:
        problem = plot(report, plot_path) if report["summary"] else "nothing succeeded: no chart"
        log(problem or f"chart written to {plot_path}")
    return 0 if report["summary"] else 1


def command_line(args) -> str:
    """The command that reproduces this run, every setting that shapes the numbers spelled out."""
    j = lambda xs: ",".join(map(str, xs)) or "none"
    parts = ["minibloom", "bench", "--shape" if args.shape else "--model", args.shape or args.model,
             "--dtype", j(args.dtype), "--batch", j(args.batch), "--prompt-tokens", str(args.prompt_tokens),
             "--new-tokens", j(args.new_tokens), "--threads", str(args.threads), "--repeats", str(args.repeats),
             "--peers", j(p for p in args.peers if p != "none")]
    if [q for q in args.quantize if q != "none"]:
        parts += ["--quantize", j(q for q in args.quantize if q != "none")]
    for flag, value, default in (("--device", args.device, "auto"), ("--backend", args.backend, "auto"),
                                 ("--int8-threshold", args.int8_threshold, None)):
        if value != default:
            parts += [flag, str(value)]
    if args.int8_from != "hub":
        parts += ["--int8-from", args.int8_from]
    if args.compile:
        parts.append("--compile")
    return " ".join(shlex.quote(p) for p in parts)
