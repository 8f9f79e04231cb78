"""The runs a pipeline plans: one per stage, seed and sweep point (Run), the recipe values each gets (Planned),
and how a run finds the runs of a stage it reads."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_cli.core.errors import UserError
from dpo_cli.core.recipe_loader import Value


def identity(run_dir: Path) -> str | None:
    """What identifies a finished run for its readers: the hash of its summary.json."""
    summary = run_dir / "summary.json"
    return hashlib.sha256(summary.read_bytes()).hexdigest()[:16] if summary.is_file() else None


def keys_of(dotted: str) -> tuple[str, ...]:
    keys = tuple(part.strip() for part in dotted.split("."))
    if not all(keys):
        raise UserError(f"set: {dotted!r} is not a recipe key (e.g. train.learning_rate)")
    return keys


@dataclass
class Run:
    """One run of a stage: the stage itself, or one of its seeds or sweep points."""

    name: str  # its run dir's name
    stage: str  # the stage in the pipeline file
    seed: int | None = None  # per_seed: the training seed
    point: dict[str, Any] = field(default_factory=dict)  # sweep: key -> value
    suffix: str = ""  # the sweep point's part of the name ("-beta-0.1")


def _text(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.+]+", "_", str(value)).strip("_") or "_"


def point_suffix(point: dict[str, Any]) -> str:
    """How a sweep point shows in run and policy names: -LEAF-VALUE per key (the whole key where leaves repeat)."""
    leaves = [key.split(".")[-1] for key in point]
    return "".join(f"-{leaf if leaves.count(leaf) == 1 else key.replace('.', '-')}-{_text(value)}" for leaf, (key, value) in zip(leaves, point.items()))


def read_runs(run: Run, source: list[Run]) -> list[Run]:
    """The runs of a source stage that `run` reads: its own seed's, or all of them (compare)."""
    if len(source) == 1 or run.seed is None:
        return source
    return [r for r in source if r.seed == run.seed]


@dataclass
class Planned:
    """A run before its action is decided: its name, stage kind, recipe, values and the runs it reads."""

    name: str
    kind: str
    recipe: Path
    values: list[Value]
    overrides: list[str]
    read: list[str]


