"""What a `minibloom bench` run is measured against: the floor (the weight bytes one decode step reads, streamed at
the machine's read bandwidth), whether the machine is quiet, and what the machine is. See bench.py for the method."""
import json
import math
import os
import platform
import struct
import time
from pathlib import Path

from .errors import MinibloomError

QUANT_MODES = ("int8", "int8-weight")
QUIET_WINDOW_S = 1.0  # the busy share is sampled over this window
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


# -- the floor ---------------------------------------------------------------------------------------------------------

def checkpoint_shapes(folder: Path) -> dict[str, list[int]]:
    """{tensor name: shape} from the safetensors headers (8-byte length + JSON), without reading any weights."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    shapes = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise MinibloomError(f"{folder} has no {name}: pass the folder of a safetensors checkpoint")
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def decode_tensors(shapes: dict, model_type: str) -> list[str]:
    """The tensors one decode step must read in full.

    BLOOM: all of them; the input embedding is also the output head (tied), so the whole matrix is read.
    T5 family: the decoder, minus the cross-attention K/V projections (applied to the encoder output once, before
    decoding), plus the head (lm_head, or the shared embedding when tied). The encoder and the embedding lookup
    (B rows) are not read per token."""
    names = list(shapes)
    if model_type not in ("t5", "mt5"):
        tied = "lm_head.weight" not in shapes
        return [n for n in names if tied or not n.endswith("word_embeddings.weight")]
    out = [n for n in names if n.startswith("decoder.") and "embed_tokens" not in n
           and ".EncDecAttention.k." not in n and ".EncDecAttention.v." not in n]
    return out + ["lm_head.weight" if "lm_head.weight" in shapes else "shared.weight"]


def decode_weight_bytes(shapes: dict, model_type: str, precision: str, dtype: str = "float32") -> int:
    """Bytes of weights read per decode step. int8: 1 byte per weight of every matrix plus one fp32 scale per row;
    vectors (biases, norms) stay in the activation dtype."""
    total = 0
    for name in decode_tensors(shapes, model_type):
        shape = shapes[name]
        n = math.prod(shape)
        if precision in QUANT_MODES and len(shape) == 2:
            total += n + 4 * shape[0]
        else:
            total += n * ITEMSIZE[precision if precision in ITEMSIZE else dtype]
    return total


def floor_ms(weight_bytes: int, bandwidth_gbps: float) -> float:
    """The fastest a decode step can be: its weight bytes streamed once at the measured read bandwidth."""
    return weight_bytes / (bandwidth_gbps * 1e9) * 1e3


def percent_of_floor(measured_ms: float, floor: float) -> float:
    """Measured time as a % of the floor: 100% is at the floor, 200% twice as slow as the floor."""
    return 100.0 * measured_ms / floor


# -- is the machine quiet? ---------------------------------------------------------------------------------------------

def cpu_jiffies(stat_text: str | None = None) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from the first line of /proc/stat (guest time is already in user)."""
    if stat_text is None:
        stat_text = Path("/proc/stat").read_text()
    fields = [int(v) for v in stat_text.split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int], after: tuple[int, int], own_cpu_s: float = 0.0) -> float:
    """Share of the machine's CPU time used by other processes between two cpu_jiffies() readings."""
    busy, total = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return 0.0
    own = own_cpu_s * os.sysconf("SC_CLK_TCK")
    return max(0.0, min(1.0, (busy - own) / total))


def quiet_check(threshold: float, max_wait_s: float) -> dict:
    """Sample the machine's busy share over QUIET_WINDOW_S, until it is below threshold or max_wait_s has passed."""
    t0 = time.monotonic()
    while True:
        before = cpu_jiffies()
        time.sleep(QUIET_WINDOW_S)
        share = busy_share(before, cpu_jiffies())
        waited = time.monotonic() - t0
        if share <= threshold or waited >= max_wait_s:
            return {"busy": share, "quiet": share <= threshold, "waited_s": waited, "loadavg": _loadavg()}


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# -- the machine -----------------------------------------------------------------------------------------------------

def machine_info(device_name: str | None) -> dict:
    info = {"python": platform.python_version(), "os": platform.platform(terse=True),
            "logical_cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["l3_bytes"] = _cache_size("/sys/devices/system/cpu/cpu0/cache/index3/size")
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version
    for pkg in ("torch", "transformers", "ctranslate2"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    parts = [info["cpu"], f"{info['logical_cpus']} logical CPUs"]
    if info.get("l3_bytes"):
        parts.append(f"L3 {info['l3_bytes'] / 2**20:.0f} MiB")
    if info.get("ram_bytes"):
        parts.append(f"{info['ram_bytes'] / 2**30:.0f} GiB RAM")
    if device_name:
        parts.insert(0, device_name)
    versions = ", ".join(f"{p} {info[p]}" for p in ("torch", "transformers", "ctranslate2") if p in info)
    info["summary"] = f"{'; '.join(parts)}; Python {info['python']}, {versions}"
    return info


def _cache_size(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
