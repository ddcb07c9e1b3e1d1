"""`minibloom bench`: a tiny-shape run of every installed engine, the floor arithmetic, missing peers, bad options.

Only tiny shapes run here; the figures' values are not checked (speed is never measured in tests), only that every
figure exists and is consistent."""
import json
import sys
from pathlib import Path

import pytest
import torch

import minibloom
from minibloom import bench, bench_machine, bench_report, cli
from minibloom.bench_peers import read_bandwidth
from minibloom.checkpoints import TINY_BLOOM, bloom_checkpoint

TINY = ("--shape", "tiny-bloom", "--batch", "2,1", "--prompt-tokens", "8", "--new-tokens", "3", "--repeats", "1",
        "--wait-quiet", "0", "--floor-mib", "32")


def installed_engines():
    return {"minibloom"} | {p for p in bench.PEERS if bench.engine_available(p)[0]}


def test_tiny_run_of_every_installed_engine(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_machine, "QUIET_WINDOW_S", 0.1)
    path, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert cli.main(["bench", *TINY, "--json", str(path), "--plot", str(png)]) == 0
    report = json.loads(path.read_text())
    assert not report["failed"] and report["settings"]["batch"] == [1, 2]
    assert {r["engine"] for r in report["summary"]} == installed_engines()
    assert {r["batch"] for r in report["summary"]} == {1, 2}
    for row in report["summary"]:
        for name in bench_report.FIGURES:
            s = row["figures"][name]
            assert 0 < s["min"] <= s["median"] <= s["max"] and s["n"] == 1, (row["engine"], name)
            assert name in row["ratios"]
        assert row["floor_ms"] > 0 and row["percent_of_floor"] > 0
        assert row["weight_bytes_per_token"] * row["batch"] == row["weight_bytes_per_step"]
        assert row["runs"] == 1 and len(row["tokens"]) == 3
    # every sample is kept, with the machine's load before and during the run
    assert len(report["runs"]) == len({(r["engine"], r["precision"]) for r in report["summary"]})
    for run in report["runs"]:
        assert {"busy_before", "foreign_during", "loaded", "loadavg"} <= set(run)
        assert [b["batch"] for b in run["result"]["batches"]] == [1, 2]
    assert report["floor"]["gbps"] > 0 and report["floor"]["samples"] == 1
    # minibloom and transformers agree on the greedy tokens in float32
    fp32 = {r["engine"]: r["tokens"] for r in report["summary"] if r["precision"] == "float32" and r["batch"] == 1}
    if "transformers" in fp32:
        assert fp32["minibloom"] == fp32["transformers"]
    out = capsys.readouterr().out
    assert "### batch 1 · prompt 8 · 3 new tokens" in out and "| minibloom (" in out
    assert "minibloom bench --shape tiny-bloom --dtype float32 --batch 2,1" in out
    assert png.exists() and png.stat().st_size > 0 or "matplotlib" in capsys.readouterr().err


def fake_spawn(folder, ct2_error=None):
    """bench.spawn without processes: canned results, so that the reporting path runs in milliseconds."""
    def spawn(spec, threads, timeout_s):
        if spec["task"] == "prepare":
            result = {"folder": str(folder), "device": "cpu", "ct2": {}, "ct2_compute_types": ["float32", "int8"],
                      "ct2_error": ct2_error, "device_name": None}
        elif spec["task"] == "floor":
            result = {"gbps": 40.0, "method": "torch.sum float64", "by_method": {}, "bytes": 2**30}
        else:
            result = {"info": {"backend": "reference"}, "load_s": 1.0, "load_call_s": 0.5, "batches": [
                {"ttft_s": 0.01, "decode_s": 0.002, "tokens": [5, 6, 7], "batch": len(b["ids"]),
                 "prompt_tokens": len(b["ids"][0]), "new_tokens": b["new_tokens"], "prefill_tok_s": 800.0,
                 "peak_rss_bytes": 300e6} for b in spec["batches"]]}
        return {"result": result, "foreign": 0.0, "wall_s": 1.0}
    return spawn


def test_missing_peer_is_reported_not_fatal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_machine, "QUIET_WINDOW_S", 0.01)
    monkeypatch.setattr(bench, "spawn", fake_spawn(bloom_checkpoint(TINY_BLOOM)))
    real = bench.engine_available
    monkeypatch.setattr(bench, "engine_available", lambda name: (False, f"{name} is not installed (pip install "
                        "'minibloom[bench]')") if name == "ctranslate2" else real(name))
    path = tmp_path / "bench.json"
    assert cli.main(["bench", *TINY, "--batch", "1", "--peers", "ctranslate2", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["missing"] == ["ctranslate2 is not installed (pip install 'minibloom[bench]')"]
    assert {r["engine"] for r in report["summary"]} == {"minibloom"}
    assert "Missing peers: ctranslate2 is not installed" in capsys.readouterr().out
    assert bench.engine_available("no_such_engine_xyz")[0] is False


def test_peer_that_cannot_convert_is_reported_not_fatal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_machine, "QUIET_WINDOW_S", 0.01)
    monkeypatch.setattr(bench, "spawn", fake_spawn(bloom_checkpoint(TINY_BLOOM), ct2_error="ValueError: no loader"))
    real = bench.engine_available  # ctranslate2 counts as installed (it is not in the test extra): spawn is faked
    monkeypatch.setattr(bench, "engine_available", lambda name: (True, "") if name == "ctranslate2" else real(name))
    assert cli.main(["bench", *TINY, "--batch", "1", "--peers", "ctranslate2"]) == 0
    out = capsys.readouterr().out
    assert "Missing peers: ctranslate2 could not convert the checkpoint (ValueError: no loader)" in out
    assert "| minibloom (reference) | float32 |" in out and "| ctranslate2" not in out


def test_saved_report_is_rendered_again(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_machine, "QUIET_WINDOW_S", 0.01)
    monkeypatch.setattr(bench, "spawn", fake_spawn(bloom_checkpoint(TINY_BLOOM)))
    path = tmp_path / "bench.json"
    assert cli.main(["bench", *TINY, "--peers", "none", "--json", str(path)]) == 0
    first = capsys.readouterr().out
    assert cli.main(["bench", "--report", str(path)]) == 0
    assert capsys.readouterr().out == first
    assert cli.main(["bench", "--report", str(tmp_path / "nope.json")]) == 2
    assert "pass a file written by --json" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (("--shape", "tiny-bloom", "--model", "x"), "either --model"),
    (("--batch", "1,8", "--new-tokens", "1,2,3"), "--new-tokens has 3 values"),
])
def test_bad_options_are_one_clear_error(args, message, capsys):
    base = () if "--shape" in args else ("--shape", "tiny-bloom")
    assert cli.main(["bench", *base, *args]) == 2
    assert message in capsys.readouterr().err


def test_unknown_list_values_are_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--shape", "tiny-bloom", "--peers", "llama.cpp"])
    assert "unknown llama.cpp: choose from transformers, ctranslate2" in capsys.readouterr().err


# -- the floor -----------------------------------------------------------------------------------------------------

def test_decode_weight_bytes_bloom_tied_head():
    shapes = {"word_embeddings.weight": [10, 4], "h.0.mlp.dense_h_to_4h.weight": [16, 4],
              "h.0.mlp.dense_h_to_4h.bias": [16], "ln_f.weight": [4]}
    n = 40 + 64 + 16 + 4
    assert bench_machine.decode_weight_bytes(shapes, "bloom", "float32") == 4 * n
    assert bench_machine.decode_weight_bytes(shapes, "bloom", "bfloat16") == 2 * n
    # int8: one byte per matrix weight and one fp32 scale per row; vectors stay in the activation dtype
    assert bench_machine.decode_weight_bytes(shapes, "bloom", "int8", "float32") == (40 + 4 * 10) + (64 + 4 * 16) + 4 * 20
    assert bench_machine.decode_weight_bytes(shapes, "bloom", "int8", "bfloat16") == (40 + 4 * 10) + (64 + 4 * 16) + 2 * 20
    # an untied head is read instead of the embedding (looked up by rows only)
    untied = dict(shapes, **{"lm_head.weight": [10, 4]})
    assert bench_machine.decode_tensors(untied, "bloom").count("word_embeddings.weight") == 0


def test_decode_weight_bytes_t5_reads_decoder_and_head_only():
    shapes = {"shared.weight": [100, 8], "encoder.block.0.layer.0.SelfAttention.q.weight": [8, 8],
              "decoder.block.0.layer.0.SelfAttention.q.weight": [8, 8],
              "decoder.block.0.layer.1.EncDecAttention.q.weight": [8, 8],
              "decoder.block.0.layer.1.EncDecAttention.k.weight": [8, 8],
              "decoder.block.0.layer.1.EncDecAttention.v.weight": [8, 8],
              "decoder.final_layer_norm.weight": [8], "lm_head.weight": [100, 8]}
    assert sorted(bench_machine.decode_tensors(shapes, "mt5")) == sorted([
        "decoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.0.layer.1.EncDecAttention.q.weight",
        "decoder.final_layer_norm.weight", "lm_head.weight"])
    assert bench_machine.decode_weight_bytes(shapes, "mt5", "float32") == 4 * (64 + 64 + 8 + 800)
    tied = {k: v for k, v in shapes.items() if k != "lm_head.weight"}
    assert "shared.weight" in bench_machine.decode_tensors(tied, "t5")


def test_decode_weight_bytes_match_the_loaded_model():
    folder = bloom_checkpoint(TINY_BLOOM)
    lm = minibloom.load(folder, dtype="float32", backend="reference")
    params = {p.data_ptr(): p.numel() * p.element_size() for p in lm.model.parameters()}  # the tied head once
    shapes = bench_machine.checkpoint_shapes(folder)
    assert bench_machine.decode_weight_bytes(shapes, "bloom", "float32") == sum(params.values())


def test_floor_arithmetic():
    assert bench_machine.floor_ms(1_000_000_000, 40.0) == pytest.approx(25.0)
    assert bench_machine.percent_of_floor(50.0, 25.0) == pytest.approx(200.0)
    assert bench_machine.percent_of_floor(25.0, 25.0) == pytest.approx(100.0)


def test_read_bandwidth_probe():
    bw = read_bandwidth(16 * 2**20, threads=1, repeats=2)
    assert bw["gbps"] == max(bw["by_method"].values()) > 0 and bw["bytes"] == 16 * 2**20
    assert bw["method"] in bw["by_method"]
    if sys.platform.startswith("linux"):           # the floor also reads memory laid out as minibloom's weights
        assert "torch.sum float64, huge pages" in bw["by_method"]


def test_busy_share_from_proc_stat():
    a = bench_machine.cpu_jiffies("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n")
    b = bench_machine.cpu_jiffies("cpu  160 0 70 1000 70 0 0 0 0 0\n")
    assert a == (150, 1000) and b == (230, 1300)
    assert bench_machine.busy_share(a, b) == pytest.approx(80 / 300)
    # the worker's own CPU time is not "foreign"
    own = 40 / bench_machine.os.sysconf("SC_CLK_TCK")
    assert bench_machine.busy_share(a, b, own_cpu_s=own) == pytest.approx(40 / 300)


def test_plan_reports_what_cannot_be_measured():
    variants, notes = bench.plan(["float32", "bfloat16"], ["int8"], ["transformers", "ctranslate2"],
                                 ["float32", "int8", "int8_float32"])
    assert [v.name for v in variants] == [
        "minibloom float32", "transformers float32", "ctranslate2 float32", "minibloom bfloat16",
        "transformers bfloat16", "minibloom int8", "ctranslate2 int8"]
    assert [v.compute_type for v in variants if v.engine == "ctranslate2"] == ["float32", "int8_float32"]
    assert any(n.startswith("ctranslate2 bfloat16: not measured") for n in notes)
    assert any(n.startswith("transformers int8: not measured") for n in notes)
    # without --quantize, CTranslate2 int8 still runs: the fastest CPU peer
    variants, _ = bench.plan(["float32"], [], ["ctranslate2"], ["float32", "int8"])
    assert [v.name for v in variants] == ["minibloom float32", "ctranslate2 float32", "ctranslate2 int8"]


def test_ratios_to_the_best_peer():
    def row(engine, precision, decode, prefill=100.0):
        s = lambda x: {"min": x, "median": x, "max": x, "n": 1}
        return {"engine": engine, "precision": precision, "batch": 1, "figures": {
            "load_s": s(1.0), "ttft_ms": s(10.0), "prefill_tok_s": s(prefill), "decode_ms": s(decode),
            "peak_rss_mb": s(500.0)}}
    rows = [row("minibloom", "float32", 30.0, 200.0), row("transformers", "float32", 60.0, 50.0),
            row("ctranslate2", "float32", 40.0, 100.0), row("ctranslate2", "int8", 20.0)]
    bench_report.add_ratios(rows)
    assert rows[0]["ratios"]["decode_ms"] == pytest.approx(30 / 40)       # best peer: the faster one
    assert rows[0]["ratios"]["prefill_tok_s"] == pytest.approx(200 / 100)  # best peer: the higher throughput
    assert rows[0]["ratios"]["decode_ms_any"] == pytest.approx(30 / 20)   # fastest peer at any precision
    assert rows[3]["ratios"]["decode_ms"] == pytest.approx(1.0)


def test_bench_kv_reports_attention_against_the_kv_floor(capsys, monkeypatch):
    from minibloom import bench_kv
    monkeypatch.setattr(bench_kv, "read_bandwidth", lambda nbytes, threads, repeats: {"gbps": 10.0})
    res = bench_kv.main(["--shape", "tiny-bloom", "--context", "40", "--steps", "2", "--repeats", "2"])
    # repeat 0: prompt 36, steps see 37 and 38 keys (mean 37.5); tiny-bloom: 3 layers x (K, V) x 4 heads x 16 dims x
    # 2 bytes (bf16) per key, read at the mocked 10 GB/s
    assert res[0]["kv_bytes"] == 3 * 2 * 4 * 37.5 * 16 * 2
    assert res[0]["floor_s"] == pytest.approx(res[0]["kv_bytes"] / 10e9)
    assert all(r["attention_s"] > 0 and r["ratio"] == pytest.approx(r["attention_s"] / r["floor_s"]) for r in res)
    out = capsys.readouterr().out
    assert out.count("repeat ") == 2 and "attention / KV floor: median" in out


def test_bench_kv_refuses_an_encoder_decoder(capsys):
    from minibloom import bench_kv
    with pytest.raises(SystemExit, match="BLOOM"):
        bench_kv.main(["--shape", "tiny-mt5", "--context", "40", "--repeats", "1"])


def test_int8_from_a_converted_folder_gives_the_same_tokens(tmp_path, monkeypatch):
    """--int8-from converted: minibloom's int8 runs load a `minibloom convert` folder (as CTranslate2 loads its
    converted model) and generate what quantizing on load generates."""
    monkeypatch.setattr(bench_machine, "QUIET_WINDOW_S", 0.1)
    tokens = {}
    for source in ("hub", "converted"):
        path = tmp_path / f"{source}.json"
        assert cli.main(["bench", *TINY, "--batch", "1", "--peers", "none", "--quantize", "int8",
                         "--int8-from", source, "--json", str(path)]) == 0
        report = json.loads(path.read_text())
        assert not report["failed"] and report["settings"]["int8_from"] == source
        tokens[source] = {r["precision"]: r["tokens"] for r in report["summary"]}
        int8_run = next(r for r in report["runs"] if r["precision"] == "int8")
        folder = report["settings"]["int8_folder"]
        if source == "converted":
            assert json.loads((Path(folder) / "config.json").read_text())["quantization_config"]["mode"] == "int8"
            assert "--int8-from converted" in report["command"]
        else:
            assert folder is None and "--int8-from" not in report["command"]
        assert int8_run["result"]["batches"][0]["new_tokens"] == 3
    assert tokens["hub"] == tokens["converted"]
