"""The labelling screens: a prompt and two responses side by side (order randomised per pair and recorded),
or one response for a thumbs up or down; one key per decision, every label fsynced before the next is shown."""

from __future__ import annotations

import os
import sys
import termios
import tty
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dpo_cli.core.errors import UserError
from dpo_cli.data.labels import LabelLog
from dpo_cli.data.prefs import Pair, shown_swapped
from dpo_cli.data.thumbs import Item

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

    def show(pair: Pair, done: int, message: str) -> Callable[[str], tuple[str, bool]]:
        swapped = shown_swapped(seed, pair.pair_id, annotator)
        left, right = (pair.b, pair.a) if swapped else (pair.a, pair.b)
        render(console, pair, left, right, done, len(pairs), annotator, message)
        return lambda action: ({"left": "B" if swapped else "A", "right": "A" if swapped else "B"}.get(action, action), swapped)

    return _label_loop([(p.pair_id, p) for p in pairs], log, annotator, ACTIONS, HELP, show, "pair")


THUMB_ACTIONS = {"y": "up", "1": "up", "+": "up", "n": "down", "2": "down", "-": "down", "s": "skip", "u": "undo", "q": "quit"}
THUMB_HELP = "[y/1/+] good   [n/2/-] bad   [s] skip   [u] undo last   [q] quit"


def label_thumbs_by_hand(items: list[Item], log: LabelLog, annotator: str, console: Console) -> str:
    """Show unlabelled responses one at a time, thumbs up or down; returns 'done' or 'quit'."""

    def show(item: Item, done: int, message: str) -> Callable[[str], tuple[str, bool]]:
        header = Text.assemble((f"{done} / {len(items)} labelled", "bold"), f"   annotator {annotator}   item {item.item_id}")
        parts: list[Any] = [header, Panel(_prompt_text(item.prompt), title="prompt"), Panel(Text(item.response.strip()), title="response", border_style="cyan")]
        parts += [Text("Is this a good response to the prompt?"), Text(THUMB_HELP, style="dim")] + ([Text(message, style="yellow")] if message else [])
        console.clear()
        console.print(Group(*parts))
        return lambda action: (action, False)

    return _label_loop([(i.item_id, i) for i in items], log, annotator, THUMB_ACTIONS, THUMB_HELP, show, "item")


def _label_loop(
    items: list[tuple[str, Any]], log: LabelLog, annotator: str, actions: dict[str, str], help_line: str,
    show: Callable[[Any, int, str], Callable[[str], tuple[str, bool]]], noun: str,
) -> str:  # fmt: skip
    """The keys loop of both screens: `show(item, done, message)` draws an item and returns how an action
    becomes (choice, swapped); every label is fsynced before the next item is shown."""
    require_terminal()
    message = ""
    with KeyReader() as keys:
        while True:
            standing = log.active()
            pending = [(item_id, item) for item_id, item in items if (item_id, annotator) not in standing]
            if not pending:
                return "done"
            item_id, item = pending[0]
            decide = show(item, len(items) - len(pending), message)
            try:
                key = keys.read()
            except KeyboardInterrupt:
                key = "\x03"
            if key in QUIT_KEYS or actions.get(key.lower()) == "quit":
                return "quit"
            action = actions.get(key.lower())
            if action is None:
                message = f"unknown key {key!r}: {help_line}"
            elif action == "undo":
                undone = log.undo_last(annotator)
                message = f"undid your label of {noun} {undone['pair_id']}" if undone else "nothing to undo"
            else:
                choice, swapped = decide(action)
                log.label(item_id, annotator, choice, "human", swapped=swapped)
                message = ""
