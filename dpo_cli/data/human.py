"""The labelling screen: a prompt and two responses side by side (order randomised per pair and recorded),
one key per decision, every label fsynced before the next pair is shown."""

from __future__ import annotations

import os
import sys
import termios
import tty
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dpo_cli.core.errors import UserError
from dpo_cli.data.labels import LabelLog
from dpo_cli.data.prefs import Pair, shown_swapped

ACTIONS = {"a": "left", "1": "left", "b": "right", "2": "right", "t": "tie", "s": "skip", "u": "undo", "q": "quit"}
QUIT_KEYS = ("", "\x03", "\x04")  # end of input, Ctrl-C, Ctrl-D
HELP = "[a/1] A is better   [b/2] B is better   [t] tie   [s] skip   [u] undo last   [q] quit"


def resolve_annotator(configured: str | None) -> str:
    name = configured or os.environ.get("DPO_CLI_ANNOTATOR") or os.environ.get("USER") or "annotator"
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


class KeyReader:
    """Single key presses from the terminal (cbreak mode), restored on exit whatever happens."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno()
        self._saved: Any = None

    def __enter__(self) -> KeyReader:
        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def read(self) -> str:
        data = os.read(self.fd, 1)
        return data.decode("utf-8", errors="replace")


def _prompt_text(prompt: Any) -> Text:
    if isinstance(prompt, list):
        return Text("\n".join(f"{m['role']}: {m['content']}" for m in prompt))
    return Text(prompt)


def render(console: Console, pair: Pair, left: str, right: str, done: int, total: int, annotator: str, message: str) -> None:
    columns = Table.grid(expand=True, padding=(0, 1))
    columns.add_column(ratio=1)
    columns.add_column(ratio=1)
    columns.add_row(Panel(Text(left.strip()), title="A", border_style="cyan"), Panel(Text(right.strip()), title="B", border_style="magenta"))
    header = Text.assemble((f"{done} / {total} labelled", "bold"), f"   annotator {annotator}   pair {pair.pair_id}")
    parts: list[Any] = [header, Panel(_prompt_text(pair.prompt), title="prompt"), columns, Text(HELP, style="dim")]
    if message:
        parts.append(Text(message, style="yellow"))
    console.clear()
    console.print(Group(*parts))


def require_terminal() -> None:
    """Human labelling reads keys from a terminal; refuse at once (not hang) where there is none."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UserError(
            "label.by: human needs an interactive terminal, but stdin/stdout is not one; "
            "run it in a terminal, or label with label.by: judge / reward-model"
        )


def label_by_hand(pairs: list[Pair], log: LabelLog, annotator: str, seed: int, console: Console) -> str:
    """Show unlabelled pairs until all are done or the annotator quits; returns 'done' or 'quit'."""
    require_terminal()
    message = ""
    with KeyReader() as keys:
        while True:
            standing = log.active()
            pending = [p for p in pairs if (p.pair_id, annotator) not in standing]
            if not pending:
                return "done"
            pair = pending[0]
            swapped = shown_swapped(seed, pair.pair_id, annotator)
            left, right = (pair.b, pair.a) if swapped else (pair.a, pair.b)
            render(console, pair, left, right, len(pairs) - len(pending), len(pairs), annotator, message)
            try:
                key = keys.read()
            except KeyboardInterrupt:
                key = "\x03"
            if key in QUIT_KEYS or ACTIONS.get(key.lower()) == "quit":
                return "quit"
            action = ACTIONS.get(key.lower())
            if action is None:
                message = f"unknown key {key!r}: {HELP}"
            elif action == "undo":
                undone = log.undo_last(annotator)
                message = f"undid your label of pair {undone['pair_id']}" if undone else "nothing to undo"
            else:
                choice = {"left": "B" if swapped else "A", "right": "A" if swapped else "B"}.get(action, action)
                log.label(pair.pair_id, annotator, choice, "human", swapped=swapped)
                message = ""
