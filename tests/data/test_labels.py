"""The label log: appended and fsynced, undo as a new event, torn lines cut off on open."""

from __future__ import annotations

import json

from dpo_cli.data.labels import LabelLog


def test_labels_survive_reopening_and_undo_appends(tmp_path):
    path = tmp_path / "labels.jsonl"
    log = LabelLog(path)
    log.label("0-0-1", "ann", "A", "human", swapped=True)
    log.label("1-0-1", "ann", "B", "human")
    before = path.read_bytes()
    undone = log.undo_last("ann")
    assert undone["pair_id"] == "1-0-1"
    log.close()
    after = path.read_bytes()
    assert after.startswith(before) and len(after) > len(before)  # appended; nothing rewritten
    reopened = LabelLog(path)
    assert list(reopened.active()) == [("0-0-1", "ann")]
    assert reopened.active()[("0-0-1", "ann")]["swapped"] is True
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in events] == ["label", "label", "undo"] and events[2]["target"] == events[1]["id"]


def test_annotators_are_kept_apart(tmp_path):
    log = LabelLog(tmp_path / "labels.jsonl")
    log.label("0-0-1", "ann", "A", "human")
    log.label("0-0-1", "bob", "B", "human")
    assert log.undo_last("bob")["annotator"] == "bob"
    assert list(log.active()) == [("0-0-1", "ann")]
    assert log.undo_last("bob") is None


def test_torn_last_line_is_cut_off(tmp_path):
    path = tmp_path / "labels.jsonl"
    log = LabelLog(path)
    log.label("0-0-1", "ann", "A", "human")
    log.close()
    good = path.read_bytes()
    with open(path, "ab") as handle:
        handle.write(b'{"event": "label", "id": "ann-2", "pair_')  # kill -9 mid-write
    repaired = LabelLog(path)
    assert repaired.repaired_bytes > 0 and path.read_bytes() == good
    repaired.label("1-0-1", "ann", "B", "human")
    repaired.close()
    assert len(LabelLog(path).active()) == 2


def test_a_complete_but_garbled_last_line_is_cut_off_too(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"event": "label", "id": "a-1", "pair_id": "p", "annotator": "a", "choice": "A", "swapped": false, '
                    '"labeler": "human", "scores": null, "time": "t"}\n{"event": "lab\n')
    log = LabelLog(path)
    assert log.repaired_bytes == len('{"event": "lab\n') and len(log.active()) == 1
