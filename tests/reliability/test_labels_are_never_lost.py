"""Promise: a label, once given, is never lost - not to a failed run, a malformed log line or a full disk."""

from __future__ import annotations

import errno
import json

import pytest

import dpo_cli.stages.collect_prefs
from helpers import read_jsonl, write_recipe
from dpo_cli.data.labels import LabelLog


@pytest.fixture()
def labelled(tmp_path, cli, tiny_model_dir):
    """A finished collect-prefs run whose labels (by a judge, standing in for people) are in labels.jsonl."""
    recipe = write_recipe(tmp_path / "collect-prefs.yaml", {
        "stage": "collect-prefs", "seed": 3, "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": "demo:prompts?n=6", "max_length": 64}, "generation": {"max_new_tokens": 6, "batch_size": 8},
        "collect": {"samples_per_prompt": 2}, "label": {"by": "judge", "judge": "length"},
    })  # fmt: skip
    return recipe


def test_a_failed_second_session_keeps_every_label(tmp_path, cli, labelled, monkeypatch):
    """alice labels by hand (her key presses stood in for); bob then starts without a terminal and is refused at
    once. Before, that failure discarded the run dir (no checkpoint, no final/): every label with it."""

    def alice_labels_two(pairs, log, annotator, seed, console):
        for pair in pairs[:2]:
            log.label(pair.pair_id, annotator, "A", "human")
        return "quit"

    human = ["--set", "label.by=human"]
    with monkeypatch.context() as patch:
        patch.setattr(dpo_cli.stages.collect_prefs, "require_terminal", lambda: None)
        patch.setattr(dpo_cli.stages.collect_prefs, "label_by_hand", alice_labels_two)
        assert cli("collect-prefs", labelled, "--run-dir", tmp_path / "run", *human, "--annotator", "alice")[0] == 0
    before = (tmp_path / "run" / "labels.jsonl").read_bytes()
    assert len(LabelLog(tmp_path / "run" / "labels.jsonl").events) == 2
    code, _, err = cli("collect-prefs", labelled, "--run-dir", tmp_path / "run", *human, "--annotator", "bob")
    assert code == 1 and "terminal" in err and "Traceback" not in err
    assert (tmp_path / "run" / "labels.jsonl").read_bytes() == before
    assert (tmp_path / "run" / "candidates.jsonl").exists() and (tmp_path / "run" / "pairs.jsonl").exists()


def test_a_full_disk_when_writing_prefs_keeps_the_labels_and_a_rerun_finishes(tmp_path, cli, labelled, monkeypatch):
    assert cli("collect-prefs", labelled, "--run-dir", tmp_path / "reference")[0] == 0
    real = dpo_cli.stages.collect_prefs.atomic_write_jsonl

    def disk_full(path, rows):
        if path.name == "prefs.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, rows)

    with monkeypatch.context() as patch:
        patch.setattr(dpo_cli.stages.collect_prefs, "atomic_write_jsonl", disk_full)
        code, _, err = cli("collect-prefs", labelled, "--run-dir", tmp_path / "run")
    labels = LabelLog(tmp_path / "run" / "labels.jsonl").events
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "no space left on the device mounted at" in err and f"{len(labels)} label events are safe" in err and len(labels) > 0
    code, _, err = cli("collect-prefs", labelled, "--run-dir", tmp_path / "run")  # space freed: the same command finishes
    assert code == 0, err
    strip = lambda rows: [{k: v for k, v in row.items() if k != "timestamp"} for row in rows]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "run" / "prefs.jsonl")) == strip(read_jsonl(tmp_path / "reference" / "prefs.jsonl"))


def test_a_malformed_line_in_the_middle_of_the_log_is_skipped_and_kept(tmp_path):
    path = tmp_path / "labels.jsonl"
    log = LabelLog(path)
    for pair in ("p1", "p2", "p3"):
        log.label(pair, "ann", "A", "human")
    log.close()
    lines = path.read_bytes().splitlines(keepends=True)
    garbled = b'{"event": "label", "id": "ann-2", "pair_id": "p2", "annot\xff\n'
    path.write_bytes(lines[0] + garbled + lines[2])  # a bad sector, an editor accident
    reopened = LabelLog(path)
    assert [e["pair_id"] for e in reopened.events] == ["p1", "p3"] and reopened.skipped == [2]
    assert any("line 2: not a label event; skipped" in problem for problem in reopened.problems())
    assert (tmp_path / "labels.quarantine").read_bytes() == garbled
    reopened.label("p4", "ann", "B", "human")  # the log goes on; the bad line stays where it was
    assert reopened.events[-1]["id"] == "ann-4"  # never ann-3 again: an undo would then retract two labels
    assert reopened.undo_last("ann")["id"] == "ann-4" and [p for p, _ in reopened.active()] == ["p1", "p3"]
    reopened.close()
    assert path.read_bytes().splitlines(keepends=True)[1] == garbled
    assert LabelLog(path).skipped == [2] and (tmp_path / "labels.quarantine").read_bytes() == garbled  # quarantined once


def test_a_torn_last_line_is_cut_but_kept_in_quarantine(tmp_path):
    path = tmp_path / "labels.jsonl"
    log = LabelLog(path)
    log.label("p1", "ann", "A", "human")
    log.close()
    with open(path, "ab") as handle:
        handle.write(b'{"event": "label", "id": "ann-2", "pa')  # kill -9 mid-write
    reopened = LabelLog(path)
    assert reopened.repaired_bytes > 0 and len(reopened.events) == 1
    assert (tmp_path / "labels.quarantine").read_bytes() == b'{"event": "label", "id": "ann-2", "pa\n'
    assert json.loads(path.read_text().splitlines()[-1])["pair_id"] == "p1"
