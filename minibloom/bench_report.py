"""The report of a `minibloom bench` run: its statistics, the Markdown tables and the decode chart (see bench.py for
the method)."""
import statistics

from .bench_machine import floor_ms, percent_of_floor

# figure -> (column title, digits, True when lower is better)
FIGURES = {
    "load_s": ("load s", 2, True),
    "ttft_ms": ("TTFT ms", 1, True),
    "prefill_tok_s": ("prefill tok/s", 0, False),
    "decode_ms": ("decode ms/token", 1, True),
    "peak_rss_mb": ("peak RSS MB", 0, True),
}


# -- statistics ------------------------------------------------------------------------------------------------------

def stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict], variants: list, batches: list[int], weight_bytes: dict,
              bandwidth: float) -> list[dict]:
    """One row per (variant, batch): every figure's min/median/max over the counted runs, the floor, the ratios."""
    rows = []
    for v in variants:
        mine = [r for r in runs if r["variant"] == v.name and "result" in r]
        for i, B in enumerate(batches):
            samples = [(r, r["result"]["batches"][i]) for r in mine]
            if not samples:
                continue
            figs = {
                "load_s": stats([r["result"]["load_s"] for r, _ in samples]),
                "ttft_ms": stats([b["ttft_s"] * 1e3 for _, b in samples]),
                "prefill_tok_s": stats([b["prefill_tok_s"] for _, b in samples]),
                "decode_ms": stats([b["decode_s"] * 1e3 for _, b in samples]),
                "peak_rss_mb": stats([b["peak_rss_bytes"] / 1e6 for _, b in samples]),
            }
            if any("peak_gpu_bytes" in b for _, b in samples):
                figs["peak_gpu_mb"] = stats([b["peak_gpu_bytes"] / 1e6 for _, b in samples if "peak_gpu_bytes" in b])
            wb = weight_bytes[v.precision]
            fl = floor_ms(wb, bandwidth)
            rows.append({
                "engine": v.engine, "precision": v.precision, "dtype": v.dtype, "compute_type": v.compute_type,
                "info": mine[0]["result"]["info"], "batch": B, "prompt_tokens": samples[0][1]["prompt_tokens"],
                "new_tokens": samples[0][1]["new_tokens"], "figures": figs,
                "weight_bytes_per_step": wb, "weight_bytes_per_token": wb / B, "floor_ms": fl,
                "percent_of_floor": percent_of_floor(figs["decode_ms"]["median"], fl),
                "runs": len(samples), "loaded_runs": sum(r["loaded"] for r, _ in samples),
                "tokens": samples[0][1]["tokens"],
            })
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]):
    """ratios[figure] = median / best peer's median at the same precision and batch (None without a peer);
    ratios["decode_ms_any"] = decode median / the fastest peer's at any precision."""
    for row in rows:
        ratios = {}
        for fig, (_, _, lower) in FIGURES.items():
            peers = [p["figures"][fig]["median"] for p in rows if p["engine"] != "minibloom"
                     and p["batch"] == row["batch"] and p["precision"] == row["precision"]]
            best = (min if lower else max)(peers) if peers else None
            ratios[fig] = row["figures"][fig]["median"] / best if best else None
        any_peer = [p["figures"]["decode_ms"]["median"] for p in rows
                    if p["engine"] != "minibloom" and p["batch"] == row["batch"]]
        ratios["decode_ms_any"] = row["figures"]["decode_ms"]["median"] / min(any_peer) if any_peer else None
        row["ratios"] = ratios



# -- tables and chart -------------------------------------------------------------------------------------------------

def _cell(s: dict | None, digits: int) -> str:
    if s is None:
        return "–"
    f = f"{{:,.{digits}f}}"
    if s["n"] == 1 or f.format(s["min"]) == f.format(s["max"]):
        return f.format(s["median"])
    return f"{f.format(s['median'])} ({f.format(s['min'])}–{f.format(s['max'])})"


def _label(row) -> str:
    backend = row["info"].get("backend")
    return f"{row['engine']} ({backend})" if backend else row["engine"]


def _mb(nbytes: float) -> str:
    mb = nbytes / 1e6
    return f"{mb:,.1f}" if mb >= 1 else f"{mb:.3g}"


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.3g}×"


def markdown(report: dict) -> str:
    s = report["settings"]
    fl = report["floor"]
    lines = [f"## minibloom bench · {s['model_name']} · {report['device']} · {s['threads']} threads · "
             f"{report['date']}", "",
             f"Machine: {report['machine']['summary']}.  ",
             f"Command: `{report['command']}`.  ",
             f"Floor: read bandwidth {fl['gbps']:.1f} GB/s (best of {fl['samples']} samples, {fl['method']}, "
             f"{fl['bytes'] / 2**20:,.0f} MiB buffer; samples {fl['min']:.1f}–{fl['max']:.1f} GB/s).  ",
             f"Each cell: median (min–max) over the counted runs (*quiet runs*: quiet / counted; {s['repeats']} "
             f"asked for), each a fresh process; engines alternate; "
             f"a warm-up generation before each timed one is not counted; greedy, exactly the new tokens asked for. "
             f"Decode ms/token is per step (one token for every sequence of the batch); *vs floor* is that time as "
             f"a % of the floor (weight bytes read per step / bandwidth; 100% = at the floor); load is process "
             f"start to model ready, from the page cache.", ""]
    done, planned = len(report["runs"]), len(report["variants"]) * s["repeats"]
    if done < planned and not report["failed"]:
        lines += [f"**Partial: {done} of {planned} runs were done when this report was written.**", ""]
    if fl["cache_resident"]:
        lines += ["**The weights fit in the L3 cache: the floor does not apply to this shape (not shown).**", ""]
    for B in s["batch"]:
        rows = [r for r in report["summary"] if r["batch"] == B]
        if not rows:
            continue
        lines += [f"### batch {B} · prompt {rows[0]['prompt_tokens']} · {rows[0]['new_tokens']} new tokens", "",
                  "| engine | precision | " + " | ".join(FIGURES[f][0] for f in FIGURES if f != "peak_rss_mb")
                  + " | floor ms | vs floor | weights MB/token | peak RSS MB | quiet runs |",
                  "|---|---|" + "---:|" * 8 + "---|"]
        for r in rows:
            f = r["figures"]
            quiet = f"{r['runs'] - r['loaded_runs']}/{r['runs']}" + (" ⚠" if r["loaded_runs"] else "")
            floor = "– | –" if fl["cache_resident"] else f"{r['floor_ms']:.3g} | {r['percent_of_floor']:.0f}%"
            lines.append(
                f"| {_label(r)} | {r['precision']} | "
                + " | ".join(_cell(f[k], FIGURES[k][1]) for k in FIGURES if k != "peak_rss_mb")
                + f" | {floor} | {_mb(r['weight_bytes_per_token'])}"
                f" | {_cell(f['peak_rss_mb'], 0)} | {quiet} |")
        lines += ["", "Ratio of the median to the best peer's at the same precision (times, RSS: < 1 is better; "
                      "prefill tok/s: > 1 is better); last column: decode vs the fastest peer at any precision.", "",
                  "| engine | precision | load | TTFT | prefill | decode | peak RSS | decode vs fastest peer |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            q = r["ratios"]
            lines.append(f"| {_label(r)} | {r['precision']} | " + " | ".join(_ratio(q[k]) for k in FIGURES)
                         + f" | {_ratio(q['decode_ms_any'])} |")
        lines.append("")
    for title, items in (("Not measured", report["not_measured"]), ("Missing peers", report["missing"]),
                         ("Failed", report["failed"])):
        if items:
            lines.append(f"{title}: " + "; ".join(items) + ".  ")
    loaded = [r for r in report["runs"] if r.get("loaded")]
    if loaded:
        lines.append(f"⚠ Loaded machine: {len(loaded)} of {len(report['runs'])} runs saw more than "
                     f"{report['settings']['quiet_threshold']:.0%} of the CPU used by other processes (before or "
                     f"during the run; up to {max(r['foreign_max'] for r in loaded):.0%}). Their numbers are kept.")
    return "\n".join(lines).rstrip() + "\n"


def plot(report: dict, path: str) -> str | None:
    """Decode ms/token per engine and precision, min–max bars, the floor drawn over each. None if no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install 'minibloom[bench]')"
    batches = [B for B in report["settings"]["batch"] if any(r["batch"] == B for r in report["summary"])]
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    colors = {"minibloom": "#2a7ab9", "transformers": "#f0a030", "ctranslate2": "#6aaa55"}
    for ax, B in zip(axes[0], batches):
        rows = [r for r in report["summary"] if r["batch"] == B]
        for x, r in enumerate(rows):
            d = r["figures"]["decode_ms"]
            ax.bar(x, d["median"], color=colors[r["engine"]], hatch="//" if r["loaded_runs"] else None,
                   yerr=[[d["median"] - d["min"]], [d["max"] - d["median"]]], capsize=3)
            ax.hlines(r["floor_ms"], x - 0.45, x + 0.45, colors="black", linestyles="--", linewidth=1.2,
                      label="floor (weights / bandwidth)" if x == 0 else None)
        ax.set_xticks(range(len(rows)), [f"{r['engine']}\n{r['precision']}" for r in rows], fontsize=8)
        ax.set_ylabel("decode ms/token (lower is better)")
        ax.set_title(f"batch {B}, prompt {rows[0]['prompt_tokens']}, {rows[0]['new_tokens']} new tokens",
                     fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"{report['settings']['model_name']} on {report['device']} ({report['settings']['threads']} "
                 f"threads), {report['date']}; hatched: loaded machine", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
