"""Reading and writing Hub checkpoints: config.json and safetensors (single file or sharded), memory-mapped.

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw tensor bytes. We parse the header ourselves so that a truncated or corrupt file is named in the error,
and we map the data with mmap: a tensor loaded in the checkpoint's own dtype is a view of the file's pages (no second
copy in memory). A tensor that must change dtype (or be quantized) is read with a plain file read instead, so the
file's pages never pile up in memory next to the converted copy.
"""
import json
import math
import mmap
import os
import struct
from pathlib import Path

import torch

from . import ops
from .errors import MinibloomError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_NAMES = {dt: name for name, dt in SAFETENSORS_DTYPES.items()}
CHUNK_BYTES = 8 << 20  # a tensor converted to another dtype or quantized is read this much at a time
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (config.json's torch_dtype spelling)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'float32' | 'bfloat16' | 'float16' (or None / 'auto' for the checkpoint's own dtype)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in DTYPES:
        raise MinibloomError(f"unknown dtype {name!r}: use one of float32, bfloat16, float16 (or auto)")
    return DTYPES[name]


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MinibloomError(f"{folder} has no config.json: pass the folder of a Hugging Face checkpoint")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinibloomError(f"{path} is not valid JSON ({e}): re-download it") from e
    if not isinstance(config, dict):
        raise MinibloomError(f"{path} holds a JSON {type(config).__name__}, not an object of settings: re-download it")
    return config


def config_fields(cls, d: dict, *, sizes: tuple = (), token_ids: tuple = ()) -> dict:
    """The fields of the config dataclass `cls` present in `d` (not None), checked against their annotated types
    (an integral float such as 250880.0 counts as an int). `sizes` must be >= 1; `token_ids` in [0, vocab_size)."""
    fields = {}
    for name, field in cls.__dataclass_fields__.items():
        v = d.get(name)
        if v is None:
            continue
        kinds = getattr(field.type, "__args__", (field.type,))   # int | None -> (int, NoneType)
        if int in kinds and isinstance(v, float) and v.is_integer():
            v = int(v)
        ok = any(isinstance(v, k) and not (k in (int, float) and isinstance(v, bool)) for k in kinds if k is not
                 type(None)) or (float in kinds and isinstance(v, int) and not isinstance(v, bool))
        if not ok:
            want = " or ".join(k.__name__ for k in kinds if k is not type(None))
            raise MinibloomError(f"config.json: {name} must be {want}, got {v!r}: fix config.json or re-download it")
        if name in sizes and v < 1:
            raise MinibloomError(f"config.json: {name} must be at least 1, got {v}: fix config.json or re-download it")
        fields[name] = v
    vocab = fields.get("vocab_size", cls.vocab_size)
    for name in token_ids:
        if name in fields and not 0 <= fields[name] < vocab:
            raise MinibloomError(f"config.json: {name} {fields[name]} is not a token id of the vocabulary [0, {vocab}):"
                                 f" fix config.json or re-download it")
    return fields


class SafetensorsFile:
    """One .safetensors file: its header, and its tensors as views of a private memory map."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MinibloomError(f"missing checkpoint file {self.path}: re-download the model")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MinibloomError(f"{self.path} is truncated ({size} bytes): re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise MinibloomError(f"{self.path} is corrupt or truncated (header length {n}, file {size} bytes): "
                                     f"re-download it")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise MinibloomError(f"{self.path} has a corrupt header ({e}): re-download it") from e
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = {}
        for name, e in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[e["dtype"]]
                begin, end = e["data_offsets"]
                shape = tuple(e["shape"])
            except (KeyError, TypeError, ValueError) as err:
                raise MinibloomError(f"{self.path}: bad header entry for {name!r}: re-download the file") from err
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * dtype.itemsize or self.data_start + end > size:
                raise MinibloomError(
                    f"{self.path} is truncated or corrupt: tensor {name!r} needs bytes {begin}..{end} of the data "
                    f"section but the file has {size - self.data_start}. Re-download it")
            self.entries[name] = (dtype, shape, begin, end)
        self._map = None

    def view(self, name: str) -> torch.Tensor:
        """The tensor as a view of the file (copy-on-write private mapping: writes never reach the file)."""
        dtype, shape, begin, end = self.entries[name]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            if ops.huge_pages_wanted() and hasattr(mmap, "MADV_HUGEPAGE"):
                # Before any page is read: the page cache then fills with 2 MiB folios that map as huge pages
                # (ext4 and xfs on recent kernels), and each decode step streams the weights with fewer TLB misses.
                # fp16 bloomz-560m shape: 0.93x the step, same process (kernels/MATMUL.md). Advice only.
                try:
                    self._map.madvise(mmap.MADV_HUGEPAGE)
                except OSError:
                    pass
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=self.data_start + begin)
        return flat.view(dtype).view(shape)

    def read(self, name: str, rows: slice = slice(None), buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor (or a range of its rows) read into fresh memory, or into `buffer` (uint8, large enough; reused
        across chunks it saves a page fault per 4 KiB read), with plain file reads: the file's pages are not kept
        mapped, so converting or quantizing never holds two full copies."""
        dtype, shape, begin, end = self.entries[name]
        start, stop, _ = rows.indices(shape[0] if shape else 1)
        row_bytes = (end - begin) // max(shape[0], 1) if shape else end - begin
        nbytes = (stop - start) * row_bytes
        out = torch.empty(nbytes, dtype=torch.uint8) if buffer is None else buffer[:nbytes]
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin + start * row_bytes)
            if f.readinto(out.numpy()) != nbytes:
                raise MinibloomError(f"{self.path} is truncated while reading {name!r}: re-download it")
        return out.view(dtype).view((stop - start, *shape[1:]) if shape else shape)


class Checkpoint:
    """All tensors of a checkpoint folder: model.safetensors, or shards listed in model.safetensors.index.json."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._buffer = torch.empty(0, dtype=torch.uint8)  # row_chunks' file reads, reused
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise MinibloomError(f"{index} is corrupt (no weight_map): re-download it") from e
            names = sorted(set(weight_map.values()))  # shard names come from the index, never from a pattern
            missing = [n for n in names if not (self.folder / n).is_file()]
            if missing:
                raise MinibloomError(f"missing shard(s) {', '.join(missing)} listed in {index}: re-download the model")
            files = {n: SafetensorsFile(self.folder / n) for n in names}
            self.where = {}
            for key, shard in weight_map.items():
                if key not in files[shard].entries:
                    raise MinibloomError(f"{index} lists {key!r} in {shard}, but that file does not hold it: "
                                         f"re-download the model")
                self.where[key] = files[shard]
        elif single.is_file():
            file = SafetensorsFile(single)
            self.where = {key: file for key in file.entries}
        else:
            others = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(p.name for p in self.folder.glob("*.pt"))
            hint = (f" (found {', '.join(others[:3])}: convert them to safetensors, e.g. with the Hub's "
                    f"'convert to safetensors' space)") if others else ""
            raise MinibloomError(f"{self.folder} has no model.safetensors or model.safetensors.index.json{hint}")

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def file_of(self, key: str) -> str:
        return self.where[key].path.name

    def shape(self, key: str) -> tuple:
        return self.where[key].entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self.where[key].entries[key][0]

    def tensor(self, key: str, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """The tensor in `dtype` on `device` (default CPU): a memory-mapped view if no conversion or move is needed,
        else a converted copy, on the CPU in memory that asks for huge pages (ops.empty_huge)."""
        file = self.where[key]
        device = torch.device(device or "cpu")
        if dtype is None or dtype == self.dtype(key):
            return file.view(key).to(device)
        if device.type != "cpu":
            return file.read(key).to(device=device, dtype=dtype)
        out = ops.empty_huge(self.shape(key), dtype, device)
        if out.dim() == 0:
            return out.copy_(file.read(key))
        for rows, chunk in self.row_chunks(key):
            out[rows].copy_(chunk)
        return out

    def row_chunks(self, key: str):
        """(rows, tensor) pieces of a tensor (dim >= 1) in its own dtype, about CHUNK_BYTES each, for converting or
        quantizing a chunk at a time. They are read one after another into one reused buffer (no fresh pages per
        read), so each piece is valid only until the next is read."""
        shape, itemsize = self.shape(key), self.dtype(key).itemsize
        row_bytes = math.prod(shape[1:]) * itemsize
        step = max(1, CHUNK_BYTES // max(1, row_bytes))
        if self._buffer.numel() < min(step, shape[0]) * row_bytes:
            self._buffer = torch.empty(min(step, shape[0]) * row_bytes, dtype=torch.uint8)
        for start in range(0, shape[0], step):
            rows = slice(start, min(start + step, shape[0]))
            yield rows, self.where[key].read(key, rows, self._buffer)

    def float_dtype(self) -> torch.dtype:
        """The dtype most floating-point tensors are stored in."""
        counts: dict = {}
        for key, file in self.where.items():
            dt, shape = file.entries[key][:2]
            if dt.is_floating_point:
                n = 1
                for d in shape:
                    n *= d
                counts[dt] = counts.get(dt, 0) + n
        return max(counts, key=counts.get) if counts else torch.float32


def load_tensors(model: torch.nn.Module, ckpt: Checkpoint, names: dict[str, list[str]], ignored,
                 dtype: torch.dtype | None, device: torch.device, quantize=None) -> None:
    """Fill every parameter of `model` (built on the meta device) from `ckpt`.

    names:   parameter name -> checkpoint keys to try, in order (aliases, prefixes)
    ignored: predicate on checkpoint keys that may be present but are not used (redundant copies)
    quantize: optional callable(module, attr, ckpt, key) -> the checkpoint keys it consumed when it stored the
              weight itself (quantized on load, or saved in int8 with its scales), else an empty tuple
    Every checkpoint tensor must be used or ignored, and every parameter found with the right shape.
    """
    used = set()
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    for pname, target in params.items():
        if pname not in names:
            continue  # derived buffers (e.g. quantization scales) are filled by their owner
        candidates = names[pname]
        key = next((k for k in candidates if k in ckpt), None)
        if key is None:
            raise MinibloomError(
                f"missing tensor {candidates[0]!r} (for {pname}) in {ckpt.folder}: the checkpoint does not match "
                f"its config.json. Re-download it, or check that config.json belongs to these weights")
        want = tuple(target.shape)
        have = ckpt.shape(key)
        if have != want:
            raise MinibloomError(
                f"tensor {key!r} in {ckpt.file_of(key)} has shape {list(have)}, but config.json implies {list(want)}: "
                f"the weights and the config do not match")
        used.add(key)
        module_name, _, attr = pname.rpartition(".")
        module = model.get_submodule(module_name)
        consumed = quantize(module, attr, ckpt, key) if quantize is not None else ()
        if consumed:
            used.update(consumed)
            continue
        if target.is_floating_point() and not ckpt.dtype(key).is_floating_point:
            raise MinibloomError(
                f"tensor {key!r} in {ckpt.file_of(key)} is stored as {ckpt.dtype(key)}, but config.json declares no "
                f"minibloom quantization_config: keep the config.json that `minibloom convert` wrote beside these "
                f"weights, or load a float checkpoint")
        value = ckpt.tensor(key, dtype if ckpt.dtype(key).is_floating_point else None, device)
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value
    unexpected = [k for k in ckpt.keys() if k not in used and not ignored(k)]
    if unexpected:
        k = unexpected[0]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise MinibloomError(
            f"unexpected tensor {k!r}{more} in {ckpt.file_of(k)}: the checkpoint has weights the model does not use. "
            f"Check that config.json matches the weights")


ALIGN = 64  # bytes: a cache line, and an AVX-512 vector


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Write one .safetensors file (the format SafetensorsFile reads), tensor by tensor from their own memory.

    The data section starts at a multiple of 64 bytes (the header is padded with spaces, which the format allows),
    and tensors whose size is a multiple of 64 bytes come first, so each maps back as a view on a cache-line
    boundary: the decode kernels' 64-byte loads then never straddle two lines (a bf16 step over misaligned weights
    took up to 6-10% longer when the host read fast). The rest follow, wider dtypes first, so every tensor starts at
    a multiple of its element size. The file is written under a temporary name and renamed: an interrupted write
    never leaves a truncated file.
    """
    path = Path(path)
    order = sorted(tensors, key=lambda k: (tensors[k].nbytes % ALIGN != 0, -tensors[k].element_size()))  # stable
    header, offset = {}, 0
    for name in order:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_NAMES:
            raise MinibloomError(f"cannot write {name!r}: safetensors has no {t.dtype}")
        nbytes = t.nbytes
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % ALIGN)  # after the 8-byte length, the data starts 64-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in order:
            t = tensors[name].detach().to("cpu").contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """model.safetensors, or shards of at most max_shard_bytes (a larger tensor gets a shard of its own) listed in
    model.safetensors.index.json, as the Hub stores them. Returns the file names written."""
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", tensors, meta)
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file, {n: tensors[n] for n in names}, meta)
        files.append(file)
        weight_map.update({n: file for n in names})
    total = sum(t.nbytes for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return files + ["model.safetensors.index.json"]


def check_loaded(model: torch.nn.Module) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise MinibloomError(f"internal error: parameter {left[0]} was not loaded")
