"""Promise: bad input is one line naming the file, row or template, and a non-zero exit; never a library's
traceback, and an incomplete input run is refused as the incomplete run it is."""

from __future__ import annotations

from helpers import chat_sft_rows, write_jsonl


def one_clear_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err and err.startswith("error: ")


def test_invalid_utf8_names_the_file_and_line(tmp_path, cli, sft_recipe):
    recipe = sft_recipe()
    data = tmp_path / "data" / "train.jsonl"
    lines = data.read_bytes().splitlines(keepends=True)
    data.write_bytes(lines[0] + b'{"prompt": "caf\xe9", "completion": " good"}\n' + b"".join(lines[2:]))  # Latin-1, not UTF-8
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 1 and one_clear_line(err), err
    assert f"{data} line 2: not valid UTF-8 (byte 0xe9 at column 16); save the file as UTF-8" in err


def test_a_broken_chat_template_is_named(tmp_path, cli, sft_recipe):
    write_jsonl(tmp_path / "chat.jsonl", chat_sft_rows(12))
    recipe = sft_recipe(data={"train": "chat.jsonl", "eval": None, "max_length": 96},
                        tokenizer={"chat_template": "{% for m in messages %}{{ m['content'] }"})  # fmt: skip
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 1 and one_clear_line(err), err
    assert "cannot render a conversation (TemplateSyntaxError" in err and "set tokenizer.chat_template" in err


def test_a_collect_prefs_run_killed_before_its_prefs_is_refused_as_incomplete(tmp_path, cli, dpo_recipe):
    run = tmp_path / "collect"
    run.mkdir()
    (run / "recipe.yaml").write_text("stage: collect-prefs\n")
    write_jsonl(run / "candidates.jsonl", [{"prompt": "a", "response": "b"}])
    write_jsonl(run / "pairs.jsonl", [{"pair_id": "0-0-1"}])
    write_jsonl(run / "labels.jsonl", [{"event": "label"}])
    code, _, err = cli("dpo", dpo_recipe(data={"train": str(run), "eval": None}), "--run-dir", tmp_path / "run")
    assert code == 1 and one_clear_line(err), err
    assert f"data.train: run {run} is not complete (status: not started)" in err


def test_a_jsonl_line_that_is_not_an_object_is_named_before_pyarrow_sees_it(tmp_path, cli, sft_recipe):
    """pyarrow's JSON reader (datasets 5.2, pyarrow 26) kills the process with a segfault on a file whose first
    line is `null`: such lines are found and named first (the fuzz suite found this one)."""
    recipe = sft_recipe()
    data = tmp_path / "data" / "train.jsonl"
    data.write_bytes(b"null\n" + data.read_bytes())
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 1 and one_clear_line(err), err
    assert f"{data} line 1: each line must be a JSON object, got null" in err
