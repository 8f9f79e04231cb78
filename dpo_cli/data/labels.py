"""The label log: every preference label is an event appended to RUN/labels.jsonl and fsynced before the
next pair is shown. Nothing is rewritten in place: an undo is a new event that retracts an earlier one.
A line torn by a crash (kill -9, power loss) is detected when the log is opened and cut off; a malformed
line elsewhere is skipped and reported by its number. Nothing that is dropped or skipped is lost: its bytes
are appended to RUN/labels.quarantine (once).

Events:
    {"event": "label", "id": "ann-7", "pair_id": "12-0-1", "annotator": "ann", "choice": "A"|"B"|"tie"|"skip",
     "swapped": false, "labeler": "human", "scores": [sA, sB] | null, "time": "...", "reason": "..." (optional)}
    {"event": "undo", "id": "ann-8", "target": "ann-7", "annotator": "ann", "time": "..."}
Choices are in the pair's own order (A = the pair's first response), whatever side it was shown on.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def _parse(raw: bytes) -> dict[str, Any] | None:
    """A label event from one line of the log, or None for a blank, torn or foreign line."""
    try:
        event = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) and event.get("event") in ("label", "undo") else None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class LabelLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.quarantine_path = self.path.with_suffix(".quarantine")
        self.repaired_bytes = self._repair()
        self.events: list[dict[str, Any]] = []
        self.skipped: list[int] = []  # line numbers (from 1) of malformed lines, kept in the file and skipped
        self._skipped_bytes = b""
        if self.path.exists():
            for number, raw in enumerate(self.path.read_bytes().splitlines(keepends=True), start=1):
                event = _parse(raw)
                if event is not None:
                    self.events.append(event)
                elif raw.strip():
                    self.skipped.append(number)
                    self._skipped_bytes += raw
                    self._quarantine(raw)
        self._handle = open(self.path, "a", encoding="utf-8")

    def _quarantine(self, raw: bytes) -> None:
        """Keep a dropped or skipped line verbatim (once): a person may still read a label from it."""
        line = raw if raw.endswith(b"\n") else raw + b"\n"
        if self.quarantine_path.exists() and line in self.quarantine_path.read_bytes().splitlines(keepends=True):
            return
        with open(self.quarantine_path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def problems(self) -> list[str]:
        """What opening the log found, for the user."""
        found = []
        if self.repaired_bytes:
            found.append(f"{self.path.name} ended in a torn line ({self.repaired_bytes} bytes, from a crash): cut off, every complete label kept")
        if self.skipped:
            lines = ", ".join(map(str, self.skipped[:5])) + (" ..." if len(self.skipped) > 5 else "")
            found.append(f"{self.path.name} line {lines}: not a label event; skipped, every other label kept")
        if found:
            found.append(f"what was cut off or skipped is kept verbatim in {self.quarantine_path}")
        return found

    def _repair(self) -> int:
        """Cut a torn last line (no newline, or not JSON); returns how many bytes were dropped."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        keep = len(data)
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
        lines = data[:keep].splitlines(keepends=True)
        while lines and lines[-1].strip() and _parse(lines[-1]) is None:  # a complete-looking last line that does not parse is torn too
            keep -= len(lines.pop())
        if keep == len(data):
            return 0
        self._quarantine(data[keep:])
        with open(self.path, "r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
        return len(data) - keep

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _next_id(self, annotator: str) -> str:
        """One past the highest number this annotator's ids reached, in readable events and in skipped lines
        (a count would repeat an id after a skipped line, and an undo would then retract two labels)."""
        prefix = f"{annotator}-"
        numbers = [int(e["id"][len(prefix):]) for e in self.events if str(e.get("id", "")).startswith(prefix) and e["id"][len(prefix):].isdigit()]
        numbers += [int(n) for n in re.findall(rb'"id": *"' + re.escape(prefix.encode()) + rb'(\d+)"', self._skipped_bytes)]
        return f"{prefix}{max(numbers, default=0) + 1}"

    def _append(self, event: dict[str, Any], sync: bool) -> dict[str, Any]:
        self._handle.write(json.dumps(event) + "\n")
        self._handle.flush()
        if sync:
            os.fsync(self._handle.fileno())
        self.events.append(event)
        return event

    def sync(self) -> None:
        os.fsync(self._handle.fileno())

    def label(
        self,
        pair_id: str,
        annotator: str,
        choice: str,
        labeler: str,
        swapped: bool = False,
        scores: tuple[float, ...] | None = None,
        sync: bool = True,
        reason: str | None = None,
    ) -> dict[str, Any]:
        event = {
            "event": "label",
            "id": self._next_id(annotator),
            "pair_id": pair_id,
            "annotator": annotator,
            "choice": choice,
            "swapped": swapped,
            "labeler": labeler,
            "scores": list(scores) if scores is not None else None,
            "time": now(),
            **({"reason": reason} if reason else {}),
        }
        return self._append(event, sync)

    def undo_last(self, annotator: str) -> dict[str, Any] | None:
        """Retract this annotator's most recent label that still stands; returns it, or None."""
        standing = [e for e in self.active_events() if e["annotator"] == annotator]
        if not standing:
            return None
        target = standing[-1]
        self._append({"event": "undo", "id": self._next_id(annotator), "target": target["id"], "annotator": annotator, "time": now()}, True)
        return target

    def active_events(self) -> list[dict[str, Any]]:
        """Label events not retracted, in the order they were given; a relabelled pair keeps its last label."""
        undone = {e["target"] for e in self.events if e["event"] == "undo"}
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for event in self.events:
            if event["event"] == "label" and event["id"] not in undone:
                key = (event["pair_id"], event["annotator"])
                latest.pop(key, None)
                latest[key] = event
        return list(latest.values())

    def active(self) -> dict[tuple[str, str], dict[str, Any]]:
        """(pair_id, annotator) -> the label that stands."""
        return {(e["pair_id"], e["annotator"]): e for e in self.active_events()}
