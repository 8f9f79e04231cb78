"""`dpo-cli runs [DIR]`: the run dirs under a folder — stage, status, steps, the metrics that matter for its
stage, size and age — read from recipe.yaml, summary.json, the checkpoints and the lock, never changing them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from dpo_cli.core.errors import UserError
from dpo_cli.core.rundir import RunDir

# what a glance at a finished run wants to see, per stage: (label, where it is in summary.json)
KEY_METRICS = {
    "pretrain": (("loss", ("final_metrics", "loss")), ("eval loss", ("eval_metrics", "loss")), ("eval ppl", ("eval_perplexity",))),
    "sft": (("loss", ("final_metrics", "loss")), ("eval loss", ("eval_metrics", "loss")), ("eval ppl", ("eval_perplexity",))),
    "dpo": (("loss", ("final_metrics", "loss")), ("eval acc", ("eval_metrics", "rewards/accuracies")), ("eval margin", ("eval_metrics", "rewards/margins"))),
    "rm-train": (("loss", ("final_metrics", "loss")), ("eval acc", ("eval_metrics", "accuracy"))),
    "ppo": (("reward", ("final_metrics", "reward")), ("kl", ("final_metrics", "kl"))),
    "collect-prefs": (("pairs", ("pairs",)), ("records", ("records",))),
    "compare": (),
}


def find_runs(root: Path, archived: bool = False, depth: int = 4) -> list[Path]:
    """Every folder under `root` (itself included) that holds recipe.yaml, not looking inside run dirs;
    runs set aside by --fresh (NAME.prev-TIME) only with `archived`."""
    if not root.is_dir():
        raise UserError(f"runs: {root} is not a folder (give the folder your run dirs are in, e.g. runs/)")
    found: list[Path] = []

    def visit(folder: Path, level: int) -> None:
        if (folder / "recipe.yaml").is_file():
            if archived or ".prev-" not in folder.name:
                found.append(folder)
            return
        if level >= depth:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            visit(child, level + 1)

    visit(root, 0)
    return found


def describe(path: Path) -> dict[str, Any]:
    """One run dir's line; a run dir that cannot be read is listed as unreadable, never stopping the list."""
    try:
        return _describe(path)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        return {"run": str(path), "stage": None, "status": f"unreadable ({type(exc).__name__})", "steps": None, "metrics": {}, "size_bytes": 0, "modified": 0.0}


def _describe(path: Path) -> dict[str, Any]:
    run = RunDir(path)
    try:
        summary = run.summary() or {}
    except (OSError, ValueError):
        summary = {}
    if not isinstance(summary, dict):
        summary = {}
    stage = summary.get("stage") or _recipe_stage(path)
    checkpoints = run.checkpoints()
    steps = summary.get("steps") if summary.get("status") == "completed" else (checkpoints[-1][0] if checkpoints else summary.get("steps"))
    return {
        "run": str(path),
        "stage": stage,
        "status": _status(run, summary, checkpoints),
        "steps": steps,
        "metrics": {label: value for label, keys in KEY_METRICS.get(stage or "", ()) if (value := _dig(summary, keys)) is not None},
        "size_bytes": _size(path),
        "modified": _modified(path),
    }


def _recipe_stage(path: Path) -> str | None:
    try:
        stage = (yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8")) or {}).get("stage")
    except (OSError, yaml.YAMLError, UnicodeDecodeError, AttributeError):
        return None
    return stage if isinstance(stage, str) else None


def _status(run: RunDir, summary: dict[str, Any], checkpoints: list) -> str:
    if run.is_locked():
        return "running"
    if summary.get("status"):
        return str(summary["status"])
    return "stopped (resumable)" if checkpoints else "not started"


def _dig(summary: dict[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = summary
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _size(path: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total


def _modified(path: Path) -> float:
    newest = path.stat().st_mtime
    for name in ("summary.json", "metrics.jsonl", "recipe.yaml"):
        if (path / name).exists():
            newest = max(newest, (path / name).stat().st_mtime)
    return newest


def list_runs(root: Path, archived: bool, as_json: bool) -> list[dict[str, Any]]:
    from dpo_cli.core import ui

    rows = [describe(path) for path in find_runs(root.expanduser().resolve(), archived)]
    if as_json:
        ui.console.print_json(json.dumps(rows)) if ui.console.is_terminal else print(json.dumps(rows, indent=1))
        return rows
    if not rows:
        ui.note(f"no run dirs under {root} (a run dir holds recipe.yaml)")
        return rows
    from rich.table import Table

    table = Table(title=f"runs under {root}")
    for column in ("run", "stage", "status", "steps", "metrics", "size", "modified"):
        table.add_column(column, justify="right" if column in ("steps", "size") else "left")
    base = root.expanduser().resolve()
    for row in rows:
        metrics = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row["metrics"].items())
        name = os.path.relpath(row["run"], base) if row["run"] != str(base) else "."
        table.add_row(
            name, row["stage"] or "?", row["status"], "" if row["steps"] is None else str(row["steps"]), metrics,
            ui.human_bytes(row["size_bytes"]), time.strftime("%Y-%m-%d %H:%M", time.localtime(row["modified"])),
        )  # fmt: skip
    ui.console.print(table)
    return rows
