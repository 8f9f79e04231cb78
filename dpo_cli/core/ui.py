"""What people see: the progress bar, summary and sample tables, notes and errors (rich)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

# Logs and pipes get 120 columns (rich's default of 80 folds the comparison table); a terminal keeps its own.
console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, highlight=False)


_MAIN_PROCESS = True


def only_main_process(is_main: bool) -> None:
    """With several processes only the main one prints tables and notes; errors come from every process."""
    global _MAIN_PROCESS
    _MAIN_PROCESS = is_main
    console.quiet = not is_main


def note(message: str) -> None:
    if not _MAIN_PROCESS:
        return
    err_console.print(Text.assemble(("note:", "cyan"), " ", message), soft_wrap=True)


def notes(messages: list[str]) -> None:
    for message in messages:
        note(message)


def error(message: str) -> None:
    """User text (values, paths, model output) is never read as rich markup."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return str(count)


def human_count(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.1f}{unit}"
    return f"{count:.3g}" if 0 < abs(count) < 10 else str(int(count))


def _bar(title: str, *fields: TextColumn) -> Progress:
    """title, bar, n/total, the given fields, elapsed, ETA; on stderr, left on screen only in a terminal."""
    return Progress(
        TextColumn(f"[bold]{title}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        *fields,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        transient=not err_console.is_terminal,
    )


class TrainProgress:
    """A rich progress bar over optimizer steps with loss, lr and tokens/s; silent off the main process."""

    def __init__(self, stage: str, total: int, start: int, enabled: bool, value: str = "loss", speed: str = "tok/s"):
        self.enabled = enabled
        self.value_name, self.speed_name = value, speed
        self._progress: Progress | None = None
        if enabled and _MAIN_PROCESS:
            self._progress = _bar(stage, TextColumn(f"{value} {{task.fields[loss]}}  lr {{task.fields[lr]}}  {{task.fields[speed]}} {speed}"))
            self._task = self._progress.add_task(stage, total=total, completed=start, loss="-", lr="-", speed="-")

    def __enter__(self) -> TrainProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, step: int, loss: float, lr: float, tokens_per_sec: float, logged: bool) -> None:
        """Move the bar; without a terminal (CI, batch jobs), print a plain line at each logged step instead."""
        if self._progress is None:
            return
        fields = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
        if logged:
            fields["speed"] = human_count(tokens_per_sec)
        self._progress.update(self._task, completed=step, **fields)
        if logged and not err_console.is_terminal:
            total = self._progress.tasks[0].total
            err_console.print(Text(f"step {step}/{total}  {self.value_name} {loss:.4f}  lr {lr:.2e}  {human_count(tokens_per_sec)} {self.speed_name}"))


class TaskProgress:
    """A progress bar over a count of items (generation, scoring); silent when disabled."""

    def __init__(self, description: str, total: int, enabled: bool = True):
        self._progress = None
        if enabled and total > 0 and _MAIN_PROCESS:
            self._progress = _bar(description)
            self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> TaskProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, count: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, count)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_table(summary: dict[str, Any]) -> None:
    table = Table(title=f"{summary['stage']} · {summary['status']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("run dir", summary.get("run_dir")),
        ("steps", summary.get("steps")),
        ("wall time", f"{summary['wall_time_s']:.1f} s") if "wall_time_s" in summary else None,
        ("tokens", human_count(summary["tokens"])) if "tokens" in summary else None,
        ("tokens/s", human_count(summary["tokens_per_sec"])) if "tokens_per_sec" in summary else None,
        ("peak memory", f"{human_bytes(summary['peak_memory_bytes'])} ({summary.get('peak_memory_kind')})")
        if "peak_memory_bytes" in summary
        else None,
        ("device", summary.get("device")),
        ("parameters", f"{human_count(summary['parameters']['trainable'])} trainable of {human_count(summary['parameters']['total'])}")
        if "parameters" in summary
        else None,
    ]
    for key, value in (summary.get("highlights") or {}).items():
        rows.append((key, _fmt(value)))
    for key, value in (summary.get("final_metrics") or {}).items():
        rows.append((f"train {key}", _fmt(value)))
    for key, value in (summary.get("eval_metrics") or {}).items():
        rows.append((f"eval {key}", _fmt(value)))
    data = summary.get("data") or {}
    for kind in ("dropped", "truncated"):
        for key, value in (data.get(kind) or {}).items():
            rows.append((f"{kind} {key}", str(value)))
    if summary.get("final_dir"):
        rows.append(("final", summary["final_dir"]))
    if summary.get("plot"):
        rows.append(("plot", summary["plot"]))
    for row in rows:
        if row is not None and row[1] is not None:
            table.add_row(row[0], Text(str(row[1])))
    console.print(table)


def samples_table(samples: list[dict[str, str]], title: str, columns: tuple[str, ...] = ("prompt", "response")) -> None:
    """Generations side by side: the prompt column narrower than the response columns."""
    if not samples:
        return
    table = Table(title=title, title_justify="left", show_lines=True)
    for index, column in enumerate(columns):
        table.add_column(column, ratio=1 if index == 0 else 2, overflow="fold")
    for sample in samples:
        table.add_row(*(Text(sample[column]) for column in columns))
    console.print(table)


def is_interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()
