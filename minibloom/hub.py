"""Finding a model: a local folder, a Hub repo id, or a short family name.

Hub repos go through huggingface_hub: a snapshot already in its cache is used without the network; otherwise
only the files minibloom reads (json, safetensors, tokenizer) are downloaded, with progress bars.
"""
import os
from pathlib import Path

from .errors import MinibloomError

# Short family names -> Hub repo ids (BLOOMZ & mT0 release, plus the T5 variants the same code runs).
FAMILY = {
    **{f"bloom-{s}": f"bigscience/bloom-{s}" for s in ("560m", "1b1", "1b7", "3b", "7b1")},
    "bloom": "bigscience/bloom",
    **{f"bloomz-{s}": f"bigscience/bloomz-{s}" for s in ("560m", "1b1", "1b7", "3b", "7b1", "7b1-mt", "7b1-p3")},
    "bloomz": "bigscience/bloomz",
    "bloomz-mt": "bigscience/bloomz-mt",
    "bloomz-p3": "bigscience/bloomz-p3",
    **{f"mt5-{s}": f"google/mt5-{s}" for s in ("small", "base", "large", "xl", "xxl")},
    **{f"mt0-{s}": f"bigscience/mt0-{s}" for s in ("small", "base", "large", "xl", "xxl", "xxl-mt", "xxl-p3")},
    **{f"flan-t5-{s}": f"google/flan-t5-{s}" for s in ("small", "base", "large", "xl", "xxl")},
    **{f"t5-{s}": f"google-t5/t5-{s}" for s in ("small", "base", "large", "3b", "11b")},
}

# Everything minibloom reads; nothing else (no .bin, .msgpack, .h5 or .onnx weights) is downloaded.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "spiece.model"]


def resolve(model: str | os.PathLike) -> Path:
    """Return a local folder holding `model`'s config.json, safetensors and tokenizer files."""
    text = os.fspath(model).strip()
    if not text:
        raise MinibloomError("no model given: pass a folder, a Hub repo id or a family name such as bloomz-560m")
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MinibloomError(f"{path} is a file, not a model folder: pass the folder that holds config.json")
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1)
    if looks_like_path:
        raise MinibloomError(f"model folder {path} does not exist: check the path, or pass a Hub repo id")
    if "/" not in text:
        if text not in FAMILY:
            known = ", ".join(sorted(FAMILY))
            raise MinibloomError(f"unknown model name {text!r}: use a folder, a Hub repo id or one of: {known}")
        text = FAMILY[text]
    return _snapshot(text)


def _snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise MinibloomError("huggingface_hub is not installed: pip install huggingface_hub") from e
    try:  # the cache first: no network needed for a model that is already there
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except Exception as e:
        raise MinibloomError(f"cannot read {repo_id} from the Hugging Face cache: {e}") from e
    if _offline():
        raise MinibloomError(
            f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
            f"download it once with network access, or pass a local folder")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
        if isinstance(e, GatedRepoError):
            why = "the repo is gated: accept its license on the Hub and log in with `hf auth login`"
        elif isinstance(e, RepositoryNotFoundError):
            why = "no such repo on the Hub (or it is private): check the repo id"
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            why = f"the Hub is unreachable or the download failed ({first.removeprefix('Got: ')}): check the network"
        raise MinibloomError(f"could not download {repo_id}: {why}, or pass a local folder") from e


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
