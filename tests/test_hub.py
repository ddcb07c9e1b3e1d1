"""Finding models through the Hugging Face cache, laid out exactly as huggingface_hub lays it out, offline."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import minibloom
from minibloom import MinibloomError, hub
from minibloom.checkpoints import TINY_BLOOM, bloom_checkpoint


def make_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """models--org--name/{blobs/<sha>, refs/main, snapshots/<commit>/<file> -> ../../blobs/<sha>}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in source.iterdir():
        if f.name.startswith("."):
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    make_hub_cache(cache, "bigscience/bloomz-560m", bloom_checkpoint(TINY_BLOOM))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_family_name_and_repo_id_resolve_to_the_cached_snapshot(hub_cache):
    for name in ("bloomz-560m", "bigscience/bloomz-560m"):
        folder = hub.resolve(name)
        assert (folder / "config.json").is_file() and "models--bigscience--bloomz-560m" in str(folder)
    lm = minibloom.load("bloomz-560m", dtype="float32")
    assert lm.generate("Hello", max_new_tokens=3) is not None


def test_not_cached_and_offline_is_one_clear_error(hub_cache):
    with pytest.raises(MinibloomError, match="not in the Hugging Face cache and HF_HUB_OFFLINE"):
        minibloom.load("bigscience/bloomz-1b7")


def test_family_table_covers_the_release():
    for name in ("bloom-560m", "bloom-1b7", "bloomz-7b1-mt", "bloomz-p3", "bloom", "mt0-xxl-mt", "mt5-small",
                 "flan-t5-base", "t5-small"):
        assert name in hub.FAMILY
    assert hub.FAMILY["bloomz-7b1-mt"] == "bigscience/bloomz-7b1-mt"


def test_only_needed_files_are_downloaded():
    assert "*.safetensors" in hub.ALLOW_PATTERNS and not any(".bin" in p for p in hub.ALLOW_PATTERNS)


def test_cli_generate_from_the_hub_cache(hub_cache):
    env = dict(os.environ, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "minibloom", "generate", "--max-new-tokens", "4",
                          "--dtype", "float32", "Translate to English: Je t'aime."],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "loaded" in out.stderr and "models--bigscience--bloomz-560m" in out.stderr


def test_no_network_and_nothing_cached_is_one_clear_error(tmp_path):
    """Online mode, but the Hub is unreachable (a closed port on loopback) and the cache is empty."""
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "empty"), HF_HUB_OFFLINE="0",
               HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    out = subprocess.run([sys.executable, "-m", "minibloom", "generate", "--model", "bloomz-560m", "hi"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert "could not download bigscience/bloomz-560m" in out.stderr and "Traceback" not in out.stderr
