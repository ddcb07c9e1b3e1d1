"""The `minibloom` command: generate (here), bench, parity and inspect (each in its own module)."""
import argparse
import importlib
import json
import os
import re
import sys
import time
from pathlib import Path

from .errors import MinibloomError

DEFAULT_MODEL = "bigscience/bloomz-560m"
CONVERT_TIP_S = 5.0  # a load that quantized or cast the weights and took longer suggests `minibloom convert`
# subcommand -> module with `add_arguments(parser)` and `run(args) -> int`
SUBCOMMANDS = {
    "bench": ("bench", "benchmark minibloom against transformers and CTranslate2 and the machine's floor"),
    "parity": ("parity", "verify a checkpoint against transformers, layer by layer"),
    "inspect": ("inspect_model", "print the architecture, parameter counts, ALiBi slopes or T5 buckets"),
    "convert": ("convert", "save a model cast or quantized to int8, as a folder minibloom loads directly"),
}


def add_model_arguments(p: argparse.ArgumentParser, default_model=DEFAULT_MODEL):
    """--model, --dtype, --device, --backend, --quantize: shared by every subcommand."""
    p.add_argument("--model", "-m", default=default_model,
                   help="a local folder, a Hub repo id or a family name such as bloomz-560m, mt0-small "
                        f"(default: {default_model})")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights and activations dtype (default: the checkpoint's own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--backend", choices=["auto", "reference", "fused"], default="auto",
                   help="auto: fused kernels when they build, else the reference PyTorch path (default)")
    p.add_argument("--quantize", choices=["int8", "int8-weight"], default=None,
                   help="int8: LLM.int8() weights and activations; int8-weight: int8 weights, float activations")
    p.add_argument("--int8-threshold", type=float, default=None,
                   help="LLM.int8() outlier threshold: activation columns above it stay in float (default 6.0, or "
                        "the one an int8 folder from `minibloom convert` records)")
    p.add_argument("--compile", action="store_true",
                   help="run each decode step through torch.compile: faster steps, but the first one compiles "
                        "(20-70 s on a 2-core CPU, cached on disk); pays off for long generations")


def prepare_output(path, flag: str, folder: bool = False) -> str:
    """Before any work: refuse an output path that cannot be written (empty, a folder where a file goes or the
    reverse, a file among its parents, no write permission, a name the file system refuses). Returns the path with
    ~ expanded; a file's folders are created (a folder output is created by its writer, after the work)."""
    if not str(path).strip():
        raise MinibloomError(f"{flag} is empty: pass a {'folder' if folder else 'file name'}")
    p = Path(path).expanduser()
    try:
        if folder and p.exists() and not p.is_dir():
            raise MinibloomError(f"{flag} {path} is a file: pass a folder")
        if not folder and p.is_dir():
            raise MinibloomError(f"{flag} {path} is a folder: pass a file name")
        parent = p if folder else p.parent
        existing = next(q for q in [parent, *parent.parents] if q.exists())
        if not existing.is_dir():
            raise MinibloomError(f"{flag} {path}: {existing} is a file, not a folder: pass another path")
        if not os.access(existing, os.W_OK):
            raise MinibloomError(f"{flag} {path}: no permission to write in {existing}: pass another path")
        if not folder:
            parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MinibloomError(f"{flag} {path}: {e.strerror or e}: pass another path") from None
    return str(p)


def positive_int(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def stdin_bytes() -> bytes:
    return sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()


def utf8_text(data: bytes, what: str, by_line: bool) -> str:
    """data as text (a leading BOM dropped), or one error that places the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        byte, line = f"byte {data[e.start]:#04x}", data[:e.start].count(b"\n") + 1
        where = (f"{what} line {line} is not UTF-8 text ({byte})" if by_line
                 else f"{what} is not UTF-8 text ({byte} at offset {e.start})")
        raise MinibloomError(f"{where}: convert it to UTF-8 (e.g. iconv -t UTF-8)") from None


def stop_string(text):
    """--stop "\\n" means a newline: the shell passes backslash escapes through double quotes as they are."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return re.sub(r"\\(n|t|\\)", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def early_stopping(text):
    value = {"true": True, "false": False, "never": "never"}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"must be true, false or never, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minibloom",
        description="BLOOM/BLOOMZ and mT5/mT0 inference from Hub safetensors, without transformers.",
        epilog="Examples:\n  minibloom generate \"Translate to English: Je t'aime.\"\n"
               "  minibloom generate --model mt0-small \"Translate to English: Je t'aime.\"\n"
               "  echo 'Why is the sky blue?' | minibloom generate --max-new-tokens 40 --do-sample --seed 0\n"
               "  minibloom convert --model bloomz-560m --quantize int8 --out bloomz-560m-int8",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    g = sub.add_parser("generate", help="generate text from a prompt (argument or stdin), streamed to stdout",
                       description="Generate a completion. Tokens stream to stdout as they are made; load time "
                                   "and speed go to stderr.")
    g.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    g.add_argument("--prompts", metavar="FILE", default=None,
                   help="generate for every prompt of FILE (- for stdin), in batches: one prompt per line, or JSON "
                        "lines (.jsonl, .json) with a \"prompt\" field; writes one JSON line per prompt, its fields "
                        "plus \"completion\", in the file's order")
    g.add_argument("--batch-size", type=positive_int, default=8,
                   help="prompts per batch with --prompts (default 8); prompts of similar length are batched together")
    add_model_arguments(g)
    g.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate at most (default 64)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0, default 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass (1.0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1.0 = off)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="no n-gram of this size occurs twice in a sequence, prompt included (0 = off)")
    g.add_argument("--min-new-tokens", type=int, default=0, help="no end-of-sequence before this many new tokens")
    g.add_argument("--num-beams", type=positive_int, default=1, help="beam search width (1 = off; no streaming)")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="beams: a finished beam's score is its log-probability / length**this (default 1.0)")
    g.add_argument("--early-stopping", type=early_stopping, default=False, metavar="{true,false,never}",
                   help="beams: when to stop, as transformers' early_stopping (default false)")
    g.add_argument("--num-return-sequences", type=positive_int, default=1,
                   help="beams: return the best N beams (<= --num-beams); printed one after another under a "
                        "'--- k ---' line, or a \"completions\" list with --prompts")
    g.add_argument("--stop", action="append", default=[], type=stop_string,
                   help="stop when this string appears (repeatable); \\n, \\t and \\\\ stand for a newline, a tab "
                        "and a backslash")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        try:
            importlib.import_module(f".{module}", __package__).add_arguments(sp)
        except ImportError:
            sp.set_defaults(unavailable=f"'minibloom {name}' is not available in this installation")
    return p


def load_from_args(args):
    from .lm import load
    return load(args.model, dtype=None if args.dtype == "auto" else args.dtype, device=args.device,
                backend=args.backend, quantize=args.quantize, int8_threshold=args.int8_threshold,
                compile=args.compile)


def load_and_report(args):
    """load_from_args, with the load time on stderr, and a hint when quantizing or casting on load was slow."""
    lm = load_from_args(args)
    print(f"[minibloom] loaded {lm.folder} ({lm.dtype}, {lm.device}, backend {lm.model.backend.name}) "
          f"in {lm.load_seconds:.2f} s", file=sys.stderr)
    if lm.load_seconds > CONVERT_TIP_S and "quantization_config" not in lm.config:
        if lm.quantize:
            print(f"[minibloom] quantizing took most of that: `minibloom convert --model {args.model} --quantize "
                  f"{lm.quantize} --out DIR` saves the int8 weights once, and DIR loads without quantizing",
                  file=sys.stderr)
        elif lm.device.type == "cpu" and lm.dtype != lm.file_dtype:
            from .loader import dtype_name
            name = dtype_name(lm.dtype)
            print(f"[minibloom] casting the {dtype_name(lm.file_dtype)} weights to {name} took most of that: "
                  f"`minibloom convert --model {args.model} --dtype {name} --out DIR` saves them once, and DIR "
                  f"loads in a fraction of a second (mapped from the file)", file=sys.stderr)
    return lm


def read_prompt_file(path: str) -> list[dict]:
    """Records with a "prompt": one per non-empty line of a text file, or one per line of a .jsonl or .json file (an
    object with a "prompt" string, kept whole so ids or labels come back with the completion, or a bare JSON string;
    a .json file may also be one JSON array of them)."""
    p = Path(path).expanduser()
    if path != "-" and (not p.exists() or p.is_dir()):
        raise MinibloomError(f"--prompts {path}: no such file (one prompt per line, or JSON lines with \"prompt\")")
    # p.read_bytes() reads a pipe such as <(cmd) or /dev/stdin too
    text = utf8_text(stdin_bytes() if path == "-" else p.read_bytes(), path, by_line=True)
    # Lines end at \n only: str.splitlines would also split at form feeds, U+2028 and other separators.
    lines = [(i, line.removesuffix("\r")) for i, line in enumerate(text.split("\n"), 1) if line.strip()]
    whole = None
    if p.suffix == ".json":  # a JSON array of prompts, or JSON lines
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            pass
    if p.suffix not in (".jsonl", ".json"):
        records = [{"prompt": line} for _, line in lines]
    else:
        records = []
        whole = [whole] if isinstance(whole, dict) else whole            # one pretty-printed object
        items = enumerate(whole, 1) if isinstance(whole, list) else lines
        for i, line in items:
            where = f"{path} item {i}" if isinstance(whole, list) else f"{path} line {i}"
            try:
                rec = line if isinstance(whole, list) else json.loads(line)
            except json.JSONDecodeError as e:
                raise MinibloomError(f"{where} is not JSON ({e}): write one JSON object per line") from e
            rec = {"prompt": rec} if isinstance(rec, str) else rec
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise MinibloomError(f"{where} has no \"prompt\" string: write {{\"prompt\": \"...\"}}")
            if not rec["prompt"].strip():
                raise MinibloomError(f"{where} has an empty \"prompt\": give the model some text to continue")
            records.append(rec)
    if not records:
        raise MinibloomError(f"--prompts {path} has no prompts")
    return records


def generate_file(args, options) -> int:
    """--prompts: batches of similar-length prompts (less padding), JSON lines out in the file's order."""
    records = read_prompt_file(args.prompts)
    lm = load_and_report(args)
    lengths = [len(lm.tokenizer.encode(r["prompt"])) for r in records]
    order = sorted(range(len(records)), key=lambda i: lengths[i])
    completions = [None] * len(records)
    n_seq = options["num_return_sequences"]
    t0, tokens = time.perf_counter(), 0
    for start in range(0, len(order), args.batch_size):
        batch = order[start:start + args.batch_size]
        texts = lm.generate([records[i]["prompt"] for i in batch], **options)  # n_seq per prompt, best first
        for j, i in enumerate(batch):
            completions[i] = texts[j * n_seq:(j + 1) * n_seq]
            tokens += sum(len(lm.tokenizer.encode(text)) for text in completions[i])
        print(f"[minibloom] {min(start + args.batch_size, len(order))}/{len(order)} prompts, "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for rec, texts in zip(records, completions):
        extra = {"completions": texts} if n_seq > 1 else {}
        sys.stdout.write(json.dumps({**rec, "completion": texts[0], **extra}, ensure_ascii=False) + "\n")
    dt = time.perf_counter() - t0
    print(f"[minibloom] {len(records)} prompts in {dt:.2f} s, {tokens / dt:.1f} tokens/s", file=sys.stderr)
    return 0


def generate(args) -> int:
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                   no_repeat_ngram_size=args.no_repeat_ngram_size, min_new_tokens=args.min_new_tokens,
                   stop=args.stop, seed=args.seed, num_beams=args.num_beams, length_penalty=args.length_penalty,
                   early_stopping=args.early_stopping, num_return_sequences=args.num_return_sequences)
    if args.prompts is not None:
        if args.prompt is not None:
            raise MinibloomError("pass a prompt or --prompts FILE, not both")
        return generate_file(args, options)
    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise MinibloomError("no prompt: pass it as an argument or pipe it on stdin")
        prompt = utf8_text(stdin_bytes(), "stdin", by_line=False)
        prompt = prompt.removesuffix("\n").removesuffix("\r")  # `echo "..." |` adds a newline the text lacks
    if not prompt.strip():
        raise MinibloomError("empty prompt: give the model some text to continue")
    lm = load_and_report(args)
    if args.compile:
        print("[minibloom] --compile: the first decode step compiles (20-70 s on 2 cores; cached on disk)",
              file=sys.stderr)
    t0 = time.perf_counter()
    n = 0
    if args.num_beams > 1:
        texts = lm.generate([prompt], **options)                                  # best first
        n = sum(len(lm.tokenizer.encode(text)) for text in texts)
        if len(texts) == 1:
            sys.stdout.write(texts[0])
        else:
            sys.stdout.write("\n".join(f"--- {k} ---\n{text}" for k, text in enumerate(texts, 1)))
    else:
        for piece in lm.stream(prompt, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
            n += 1
    sys.stdout.write("\n")
    dt = time.perf_counter() - t0
    print(f"[minibloom] {dt:.2f} s, {n / dt:.1f} pieces/s" if args.num_beams == 1 else f"[minibloom] {dt:.2f} s",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    if getattr(args, "unavailable", None):
        print(f"minibloom: error: {args.unavailable}", file=sys.stderr)
        return 2
    try:
        if args.command == "generate":
            return generate(args)
        module = importlib.import_module(f".{SUBCOMMANDS[args.command][0]}", __package__)
        return module.run(args)
    except MinibloomError as e:
        print(f"minibloom: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
