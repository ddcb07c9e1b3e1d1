"""The `minibloom` command as a user runs it: help, generate from an argument or stdin, and clear errors."""
import json
import os
import subprocess
import sys

import pytest

from minibloom.checkpoints import TINY_BLOOM, bloom_checkpoint


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "minibloom", *args], capture_output=True, text=True, input=stdin)


@pytest.fixture(scope="module")
def folder():
    return str(bloom_checkpoint(TINY_BLOOM))


def test_help_explains_everything():
    out = run("--help")
    assert out.returncode == 0 and "generate" in out.stdout and "bench" in out.stdout
    out = run("generate", "--help")
    for flag in ("--model", "--dtype", "--max-new-tokens", "--do-sample", "--temperature", "--top-k", "--top-p",
                 "--repetition-penalty", "--no-repeat-ngram-size", "--min-new-tokens", "--seed", "--stop", "--backend",
                 "--quantize", "--compile", "--num-beams", "--length-penalty", "--early-stopping",
                 "--num-return-sequences"):
        assert flag in out.stdout


def test_generate_streams_to_stdout_and_reports_on_stderr(folder):
    out = run("generate", "--model", folder, "--max-new-tokens", "8", "Translate to English: Je t'aime.")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "loaded" in out.stderr and " s" in out.stderr


def test_generate_compiled_prints_the_same_text(folder):
    args = ("generate", "--model", folder, "--max-new-tokens", "6", "Translate to English: Je t'aime.")
    eager, compiled = run(*args), run(*args, "--compile")
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout and "--compile" in compiled.stderr


def test_generation_flags_reach_generate(folder):
    """--no-repeat-ngram-size and --min-new-tokens print what lm.generate returns with the same options."""
    import minibloom
    prompt = "Translate to English: Je t'aime."
    out = run("generate", "--model", folder, "--max-new-tokens", "12", "--no-repeat-ngram-size", "1",
              "--min-new-tokens", "4", prompt)
    assert out.returncode == 0, out.stderr
    expected = minibloom.load(folder).generate(prompt, max_new_tokens=12, no_repeat_ngram_size=1, min_new_tokens=4)
    assert out.stdout == expected + "\n"
    assert expected != minibloom.load(folder).generate(prompt, max_new_tokens=12)


def test_beam_flags_reach_generate(folder, tmp_path):
    """--length-penalty, --early-stopping and --num-return-sequences print what lm.generate returns with the same
    options: the N best beams under '--- k ---' lines, or a "completions" list per --prompts record."""
    import minibloom
    prompt = "Translate to English: Je t'aime."
    options = dict(max_new_tokens=6, num_beams=3, length_penalty=0.5, early_stopping="never", num_return_sequences=2)
    flags = ("--max-new-tokens", "6", "--num-beams", "3", "--length-penalty", "0.5", "--early-stopping", "never",
             "--num-return-sequences", "2", "--backend", "reference")
    expected = minibloom.load(folder, backend="reference").generate([prompt], **options)
    assert len(expected) == 2
    out = run("generate", "--model", folder, *flags, prompt)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"--- 1 ---\n{expected[0]}\n--- 2 ---\n{expected[1]}\n"
    prompts = tmp_path / "p.txt"
    prompts.write_text(prompt + "\n")
    record = json.loads(run("generate", "--model", folder, "--prompts", str(prompts), *flags).stdout)
    assert record["completions"] == expected and record["completion"] == expected[0]
    bad = run("generate", "--model", folder, "--num-beams", "2", "--num-return-sequences", "3", prompt)
    assert bad.returncode == 2 and "num_return_sequences" in bad.stderr and "Traceback" not in bad.stderr
    bad = run("generate", "--model", folder, "--early-stopping", "maybe", prompt)
    assert bad.returncode == 2 and "true, false or never" in bad.stderr


def test_stop_flag_reads_backslash_escapes():
    """`--stop "\\n"` reaches the shell's argv as a backslash and an n: it means a newline, as users type it."""
    from minibloom import cli
    args = cli.parser().parse_args(["generate", "--stop", "\\n", "--stop", "a\\tb", "--stop", "\\\\n", "--stop",
                                    "Answer:", "x"])
    assert args.stop == ["\n", "a\tb", "\\n", "Answer:"]
    out = run("generate", "--stop", "", "hi")
    assert out.returncode == 2 and "must not be empty" in out.stderr


def test_stdin_prompt_equals_the_argument_and_bytes_that_are_not_utf8_are_named(folder):
    """`echo "..." |` adds a newline that the same prompt as an argument lacks: it is dropped."""
    args = ("generate", "--model", folder, "--max-new-tokens", "6", "--backend", "reference")
    piped = subprocess.run([sys.executable, "-m", "minibloom", *args], capture_output=True,
                           input="Why is the sky blue?\n".encode())
    assert piped.returncode == 0 and piped.stdout.decode() == run(*args, "Why is the sky blue?").stdout
    bad = subprocess.run([sys.executable, "-m", "minibloom", *args], capture_output=True, input=b"caf\xe9 au lait")
    assert bad.returncode == 2 and b"stdin is not UTF-8 text (byte 0xe9 at offset 3)" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "minibloom", *args, b"caf\xe9"], capture_output=True)
    assert bad.returncode == 2 and b"not valid UTF-8 text (bytes e9 at character 3)" in bad.stderr


def test_outputs_that_cannot_be_written_are_refused_before_the_work(folder, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for args, message in [
        (("convert", "--model", folder, "--out", ""), "--out is empty"),
        (("convert", "--model", folder, "--out", str(tmp_path / ("x" * 300))), "File name too long"),
        (("convert", "--model", folder, "--out", str(a_file / "sub")), "is a file, not a folder"),
        (("convert", "--model", folder, "--out", str(a_file)), "is a file: pass a folder"),
        (("inspect", "--model", folder, "--plot", str(a_file), "--prompt", "hi"), "is a file: pass a folder"),
        (("parity", "--model", folder, "--json", str(tmp_path)), "is a folder: pass a file name"),
        (("parity", "--model", folder, "--plot", str(a_file / "x.png")), "is a file, not a folder"),
        (("bench", "--model", folder, "--json", str(tmp_path)), "is a folder: pass a file name"),
    ]:
        out = run(*args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
        assert "loaded" not in out.stderr                 # refused before the model was loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]               # and nothing left behind


def test_output_paths_expand_the_home_folder(folder, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    out = subprocess.run([sys.executable, "-m", "minibloom", "convert", "--model", folder, "--out", "~/converted"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert (home / "converted" / "config.json").is_file() and not (tmp_path / "~").exists()


def test_prompt_from_stdin_and_seeded_sampling(folder):
    args = ("generate", "--model", folder, "--max-new-tokens", "8", "--do-sample", "--seed", "3")
    a = run(*args, stdin="Why is the sky blue?")
    b = run(*args, stdin="Why is the sky blue?")
    assert a.returncode == 0 and a.stdout == b.stdout


@pytest.mark.parametrize("args, message", [
    (("--model", "./missing-folder", "hi"), "does not exist"),
    (("--max-new-tokens", "0", "hi"), "must be >= 1"),
    (("--temperature", "-1", "hi"), "temperature"),
    (("--top-p", "2", "hi"), "top_p"),
    (("--no-repeat-ngram-size", "-2", "hi"), "no_repeat_ngram_size"),
    (("--min-new-tokens", "100", "--max-new-tokens", "8", "hi"), "min_new_tokens"),
    (("--dtype", "float8", "hi"), "invalid choice"),
    (("   ",), "empty prompt"),
])
def test_bad_input_is_one_message_and_nonzero_exit(folder, args, message):
    if "--model" not in args:
        args = ("--model", folder) + args
    out = run("generate", *args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_no_prompt_and_no_stdin(folder):
    out = run("generate", "--model", folder, stdin="")
    assert out.returncode == 2 and "empty prompt" in out.stderr


def test_a_slow_quantized_or_cast_load_suggests_convert(folder, monkeypatch, capsys):
    from minibloom import cli
    monkeypatch.setattr(cli, "CONVERT_TIP_S", 0.0)
    assert cli.main(["generate", "--model", folder, "--quantize", "int8", "--max-new-tokens", "2", "Hello"]) == 0
    assert f"minibloom convert --model {folder} --quantize int8 --out DIR" in capsys.readouterr().err
    assert cli.main(["generate", "--model", folder, "--dtype", "bfloat16", "--max-new-tokens", "2", "Hello"]) == 0
    err = capsys.readouterr().err
    assert "casting the float32 weights to bfloat16" in err
    assert f"minibloom convert --model {folder} --dtype bfloat16 --out DIR" in err
    assert cli.main(["generate", "--model", folder, "--dtype", "float32", "--max-new-tokens", "2", "Hello"]) == 0
    assert "minibloom convert" not in capsys.readouterr().err      # the file's own dtype: nothing to save
    monkeypatch.setattr(cli, "CONVERT_TIP_S", 1e9)
    assert cli.main(["generate", "--model", folder, "--quantize", "int8", "--max-new-tokens", "2", "Hello"]) == 0
    assert "minibloom convert" not in capsys.readouterr().err


def test_prompts_file_in_batches_keeps_order_and_fields(folder, tmp_path):
    """--prompts: JSON lines out in the file's order, the same completions whatever the batch size (greedy
    batches equal single rows); .jsonl records keep their other fields."""
    text = tmp_path / "prompts.txt"
    text.write_text("Translate to English: Je t'aime.\n\nHi\nA much longer prompt than the others, to sort last\n")
    outs = [run("generate", "--model", folder, "--prompts", str(text), "--max-new-tokens", "5", "--batch-size", b,
                "--backend", "reference") for b in ("1", "3")]
    assert all(o.returncode == 0 for o in outs), outs[0].stderr
    rows = [json.loads(line) for line in outs[0].stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["Translate to English: Je t'aime.", "Hi",
                                           "A much longer prompt than the others, to sort last"]
    assert all(r["completion"] for r in rows) and outs[0].stdout == outs[1].stdout
    assert "3 prompts in" in outs[1].stderr
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"id": 7, "prompt": "Hi", "label": "x"}\n"Hi"\n')
    out = run("generate", "--model", folder, "--prompts", str(jsonl), "--max-new-tokens", "5", "--backend", "reference")
    first, second = (json.loads(line) for line in out.stdout.splitlines())
    assert first["id"] == 7 and first["label"] == "x" and first["completion"] == rows[1]["completion"] == \
        second["completion"]


def test_prompts_file_lines_end_at_newlines_and_json_files_are_read_as_json(folder, tmp_path):
    """Form feeds and U+2028 inside a prompt do not split it (str.splitlines would); a .json file may be a JSON
    array or JSON lines; a UTF-8 BOM is skipped."""
    from minibloom.cli import read_prompt_file

    def records(name, content):
        (tmp_path / name).write_text(content)
        return read_prompt_file(str(tmp_path / name))

    assert [r["prompt"] for r in records("p.txt", "\ufeffone\x0cstill one\u2028and one\r\ntwo\n")] == \
        ["one\x0cstill one\u2028and one", "two"]
    assert records("p.jsonl", '{"prompt": "a\u2028b", "id": 1}\n') == [{"prompt": "a\u2028b", "id": 1}]
    assert records("p.json", '[\n  {"prompt": "Hi", "id": 2},\n  "Bonjour"\n]\n') == \
        [{"prompt": "Hi", "id": 2}, {"prompt": "Bonjour"}]
    assert [r["prompt"] for r in records("q.json", '{"prompt": "Hi"}\n{"prompt": "Yo"}\n')] == ["Hi", "Yo"]
    assert records("one.json", '{\n  "prompt": "Hi",\n  "id": 3\n}\n') == [{"prompt": "Hi", "id": 3}]


def test_prompts_from_stdin_with_a_dash(folder):
    out = run("generate", "--model", folder, "--prompts", "-", "--max-new-tokens", "3", "--backend", "reference",
              stdin="Hi\nBonjour\n")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["prompt"] for line in out.stdout.splitlines()] == ["Hi", "Bonjour"]


@pytest.mark.parametrize("content,args,message", [
    (None, ("--prompts", "/nonexistent/prompts.txt"), "no such file"),
    ("Hi\n", ("Hello",), "not both"),
    ('{"prompt": "Hi"}\nnot json\n', (), "line 2 is not JSON"),
    ('{"text": "Hi"}\n', (), 'line 1 has no "prompt" string'),
    ("\n\n", (), "has no prompts"),
    ('{"prompt": "  "}\n', (), 'line 1 has an empty "prompt"'),
    (b"Hi\ncaf\xe9\n", (), "line 2 is not UTF-8 text (byte 0xe9)"),
])
def test_prompts_file_mistakes(folder, tmp_path, content, args, message):
    path = tmp_path / ("p.jsonl" if isinstance(content, str) and content.startswith("{") else "p.txt")
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        args = ("--prompts", str(path), *args)
    out = run("generate", "--model", folder, *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
