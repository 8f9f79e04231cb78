"""The labelling screen driven through a real pseudo-terminal: label, undo, kill -9, resume, quit,
a torn last line, and a second annotator."""

from __future__ import annotations

import json
import os
import signal
import sys

import pexpect
import pytest

from helpers import read_jsonl, write_recipe


@pytest.fixture()
def human_recipe(tmp_path, tiny_model_dir):
    return write_recipe(
        tmp_path / "human.yaml",
        {
            "stage": "collect-prefs",
            "seed": 5,
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": "demo:prompts?n=4", "max_length": 64},
            "generation": {"max_new_tokens": 6},
            "label": {"by": "human"},
        },
    )


def spawn(recipe, run, annotator: str) -> pexpect.spawn:
    env = {**os.environ, "TERM": "xterm", "PYTHONUNBUFFERED": "1"}
    args = ["-m", "dpo_cli", "collect-prefs", str(recipe), "--run-dir", str(run), "--annotator", annotator]
    return pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=120, dimensions=(60, 160))


def test_label_undo_kill_resume_quit_and_a_second_annotator(tmp_path, human_recipe):
    run = tmp_path / "run"
    child = spawn(human_recipe, run, "alice")
    child.expect(r"0 / (\d+) labelled")
    total = int(child.match.group(1))
    assert total == 4
    child.send("a")
    child.expect(f"1 / {total} labelled")
    child.send("b")
    child.expect(f"2 / {total} labelled")
    child.send("u")
    child.expect("undid your label of pair")
    child.send("t")
    child.expect(f"2 / {total} labelled")
    child.kill(signal.SIGKILL)  # no handler runs: only what was fsynced survives
    child.close(force=True)

    events = read_jsonl(run / "labels.jsonl")
    assert [e["event"] for e in events] == ["label", "label", "undo", "label"]
    assert events[2]["target"] == events[1]["id"] and events[3]["pair_id"] == events[1]["pair_id"]
    assert [e["choice"] for e in events if e["event"] == "label"][2] == "tie"
    assert all(isinstance(e["swapped"], bool) for e in events if e["event"] == "label")

    child = spawn(human_recipe, run, "alice")  # resumes at the next unlabelled pair
    child.expect(f"2 / {total} labelled")
    child.send("s")
    child.expect(f"3 / {total} labelled")
    child.send("q")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert json.loads((run / "summary.json").read_text())["status"] == "partial"
    stats = json.loads((run / "stats.json").read_text())
    assert stats["per_annotator"]["alice"] == {"A": 1, "tie": 1, "skip": 1}

    with open(run / "labels.jsonl", "a") as handle:
        handle.write('{"event": "label", "id": "alice-9", "pa')  # a torn line from a crash
    child = spawn(human_recipe, run, "bob")
    child.expect("torn line")
    child.expect(f"0 / {total} labelled")
    for count in range(1, total + 1):
        child.send("a")
        child.expect(f"{count} / {total} labelled" if count < total else pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    stats = json.loads((run / "stats.json").read_text())
    assert stats["per_annotator"]["bob"]["A"] + stats["per_annotator"]["bob"].get("B", 0) == total
    assert stats["agreement"][0]["annotators"] == ["alice", "bob"] and stats["agreement"][0]["overlap"] == 2
    assert len(read_jsonl(run / "labels.jsonl")) == 5 + total  # alice 4 + her skip, bob: the torn line cut, nothing lost


def test_thumbs_up_and_down_by_hand_undo_kill_resume(tmp_path, human_recipe):
    """collect.mode thumbs at the terminal: one response at a time, y / n / s / u, every label fsynced (a
    kill -9 loses nothing), the next run resumes, and prefs.jsonl holds the unpaired examples."""
    text = human_recipe.read_text().replace("label:", "collect:\n  mode: thumbs\n  samples_per_prompt: 1\nlabel:")
    recipe = tmp_path / "thumbs.yaml"
    recipe.write_text(text)
    run = tmp_path / "run"
    child = spawn(recipe, run, "alice")
    child.expect(r"0 / (\d+) labelled")
    total = int(child.match.group(1))
    assert 1 < total <= 4
    child.expect("Is this a good response")
    child.send("y")
    child.expect(f"1 / {total} labelled")
    child.send("n")
    child.expect(f"2 / {total} labelled")
    child.send("u")
    child.expect("undid your label of item")
    child.kill(signal.SIGKILL)
    child.close(force=True)
    events = read_jsonl(run / "labels.jsonl")
    assert [(e["event"], e.get("choice")) for e in events] == [("label", "up"), ("label", "down"), ("undo", None)]

    child = spawn(recipe, run, "alice")
    child.expect(f"1 / {total} labelled")
    for count in range(2, total + 1):
        child.send("-" if count % 2 else "+")
        child.expect(f"{count} / {total} labelled" if count < total else pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    records = read_jsonl(run / "prefs.jsonl")
    assert len(records) == total and records[0]["label"] is True and {"prompt", "completion", "label"} <= set(records[0])
    assert [r["label"] for r in records] == [True] + [count % 2 == 0 for count in range(2, total + 1)]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
