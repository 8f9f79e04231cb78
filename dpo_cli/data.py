"""Datasets: where rows come from (local files, hub ids, built-in demo sets), column mapping,
row checks with clear errors, and the eval split. Tokenisation lives in encoding.py."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset

from dpo_cli.demo import demo_rows
from dpo_cli.encoding import check_messages
from dpo_cli.errors import UserError
from dpo_cli.recipes import DataSection
from dpo_cli.sources import require_complete

datasets.disable_progress_bars()
datasets.logging.set_verbosity_error()

ROW_NUMBER = "__row__"  # the row's number in its file (from 1), kept through splits so errors point at the file
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".arrow": "arrow"}


@dataclass
class DataReport:
    """Counts a stage reports about its data (dropped and truncated rows are never silent)."""

    rows: dict[str, int] = field(default_factory=dict)
    eval_source: str = "data.eval"  # "data.train" when the eval rows were carved off the training data
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "dropped": self.dropped, "truncated": self.truncated}


def _is_local(value: str) -> bool:
    return os.path.isabs(value) or value.startswith((".", "~")) or os.path.exists(value)


def _local_files(value: str, what: str) -> list[str]:
    path = Path(value)
    if path.is_dir() and (path / "prefs.jsonl").is_file() and (path / "recipe.yaml").is_file():
        require_complete(path, what)
        return [str(path / "prefs.jsonl")]  # a collect-prefs run dir
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in BUILDERS and p.is_file())
        if not files:
            raise UserError(f"{what}: folder {path} holds no data files ({', '.join(BUILDERS)})")
        return files
    files = sorted(glob.glob(value, recursive=True)) if any(ch in value for ch in "*?[") else ([value] if path.exists() else [])
    if not files:
        raise UserError(f"{what}: no file matches {value}")
    return files


def _is_blank(name: str) -> bool:
    """True for an empty file, or a text file with nothing but blank lines (read up to the first content)."""
    if os.path.getsize(name) == 0:
        return True
    if Path(name).suffix.lower() not in (".jsonl", ".json", ".csv", ".txt"):
        return False
    with open(name, encoding="utf-8", errors="replace") as handle:
        return all(not line.strip() for line in handle)


def _first_bad_json_line(files: list[str]) -> str | None:
    for name in files:
        if not name.endswith(".jsonl"):
            continue
        with open(name, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"{name} line {number}: invalid JSON ({exc.msg})"
                if not isinstance(row, dict):
                    return f"{name} line {number}: each line must be a JSON object, got {type(row).__name__}"
    return None


def _load_local(files: list[str], what: str) -> Dataset:
    suffixes = {Path(f).suffix.lower() for f in files}
    unknown = suffixes - set(BUILDERS)
    if unknown:
        raise UserError(f"{what}: unsupported file type {', '.join(sorted(unknown))}; use {', '.join(BUILDERS)}")
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise UserError(f"{what}: mixed file types ({', '.join(sorted(suffixes))}); give files of one type")
    for name in files:
        if _is_blank(name):
            raise UserError(f"{what}: {name} is empty")
    try:
        return datasets.load_dataset(builders.pop(), data_files=files, split="train")
    except Exception as exc:  # datasets wraps parser errors in several exception types
        bad = _first_bad_json_line(files)
        detail = bad or str(exc).strip().splitlines()[-1][:300]
        raise UserError(f"{what}: cannot read {files[0] if len(files) == 1 else f'{len(files)} files'}: {detail}") from None


def load_source(source: str | list[str], cfg: DataSection, what: str, split: str) -> Dataset:
    """Rows from demo:NAME, local files/folders/globs (one or a list), or a hub dataset id."""
    sources = source if isinstance(source, list) else [source]
    if len(sources) == 1 and sources[0].startswith("demo:"):
        return Dataset.from_list(demo_rows(sources[0]))
    if all(_is_local(s) or any(ch in s for ch in "*?[") for s in sources):
        files = [f for s in sources for f in _local_files(s, what)]
        return _load_local(files, what)
    if len(sources) > 1:
        raise UserError(f"{what}: a list may only hold local files; give one hub dataset id")
    try:
        return datasets.load_dataset(sources[0], cfg.subset, split=split)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what}: cannot load {sources[0]!r}: no such local path, and the hub did not provide it ({first})") from None


def rename_columns(ds: Dataset, columns: dict[str, str], what: str) -> Dataset:
    """data.columns maps the names a stage expects to the names in the user's data."""
    for wanted, have in columns.items():
        if wanted == have:
            continue
        if have not in ds.column_names:
            raise UserError(f"data.columns.{wanted}: {what} has no column {have!r} (columns: {', '.join(ds.column_names)})")
        if wanted in ds.column_names:
            ds = ds.remove_columns(wanted)
        ds = ds.rename_column(have, wanted)
    return ds


def _numbered(ds: Dataset) -> Dataset:
    return ds.add_column(ROW_NUMBER, list(range(1, len(ds) + 1))) if ROW_NUMBER not in ds.column_names else ds


def load_splits(cfg: DataSection, seed: int, report: DataReport) -> tuple[Dataset, Dataset | None]:
    """The training rows and the eval rows (given, carved off train, or none)."""
    train = _numbered(rename_columns(load_source(cfg.train, cfg, "data.train", cfg.split), cfg.columns, "data.train"))
    if len(train) == 0:
        raise UserError("data.train: the dataset is empty")
    evaluation: Dataset | None = None
    if isinstance(cfg.eval, str):
        evaluation = rename_columns(load_source(cfg.eval, cfg, "data.eval", cfg.eval_split or cfg.split), cfg.columns, "data.eval")
        evaluation = _numbered(evaluation)
        if len(evaluation) == 0:
            raise UserError("data.eval: the dataset is empty")
    elif cfg.eval is not None:
        report.eval_source = "data.train"
        count = int(cfg.eval) if cfg.eval >= 1 else max(1, round(cfg.eval * len(train)))
        if count >= len(train):
            raise UserError(f"data.eval: carving {count} eval rows off {len(train)} training rows leaves none to train on")
        parts = train.train_test_split(test_size=count, shuffle=True, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    if cfg.max_rows is not None and len(train) > cfg.max_rows:
        train = train.select(range(cfg.max_rows))
    if evaluation is not None and cfg.max_eval_rows is not None and len(evaluation) > cfg.max_eval_rows:
        evaluation = evaluation.select(range(cfg.max_eval_rows))
    report.rows["train"] = len(train)
    if evaluation is not None:
        report.rows["eval"] = len(evaluation)
    return train, evaluation


def require_columns(ds: Dataset, options: list[tuple[str, ...]], what: str) -> tuple[str, ...]:
    """The first set of columns the dataset has out of `options`, else a clear error."""
    for option in options:
        if all(c in ds.column_names for c in option):
            return option
    wanted = " or ".join("/".join(o) for o in options)
    raise UserError(
        f"{what}: expected columns {wanted}, found {', '.join(c for c in ds.column_names if c != ROW_NUMBER)} "
        "(map yours with data.columns, e.g. data.columns.prompt=question)"
    )


def check_bad_rows(problems: list[tuple[int, str]], what: str, cfg: DataSection) -> None:
    """With data.bad_rows: error, the first malformed row (by its number in the file) stops the stage."""
    if problems and cfg.bad_rows == "error":
        number, problem = problems[0]
        more = f" ({len(problems) - 1} more bad rows; data.bad_rows: drop skips them)" if len(problems) > 1 else ""
        raise UserError(f"{what} row {number}: {problem}{more}")


def encode_rows(
    ds: Dataset,
    encode: Callable[[dict[str, Any]], dict[str, Any]],
    what: str,
    cfg: DataSection,
    report: DataReport,
    key: str,
) -> Dataset:
    """Run a row encoder that returns features plus `problem` (malformed row) and `truncated`/`emptied` flags.

    A malformed row stops the stage naming the row (counted from 1), or is dropped and counted with
    data.bad_rows: drop. Over-long rows are truncated, dropped or refused per data.truncation.
    """
    numbers = ds[ROW_NUMBER] if ROW_NUMBER in ds.column_names else list(range(1, len(ds) + 1))
    encoded = ds.map(encode, remove_columns=ds.column_names, desc=None)
    if ROW_NUMBER not in encoded.column_names:
        encoded = encoded.add_column(ROW_NUMBER, numbers)
    problems = [(i, p) for i, p in enumerate(encoded["problem"]) if p]
    check_bad_rows([(numbers[i], p) for i, p in problems], what, cfg)
    long_rows = [i for i, t in enumerate(encoded["truncated"]) if t]
    if long_rows and cfg.truncation == "error":
        raise UserError(
            f"{what} row {numbers[long_rows[0]]}: longer than data.max_length={cfg.max_length} tokens "
            f"({len(long_rows)} such rows); raise max_length or set data.truncation: truncate"
        )
    emptied = set(i for i, e in enumerate(encoded["emptied"]) if e)
    drop = {i for i, _ in problems} | emptied | (set(long_rows) if cfg.truncation == "drop" else set())
    if problems:
        report.dropped[f"{key}/malformed"] = len(problems)
    if emptied:
        report.dropped[f"{key}/no_target_left"] = len(emptied)
    if long_rows:
        if cfg.truncation == "drop":
            report.dropped[f"{key}/too_long"] = len(long_rows)
        else:
            report.truncated[key] = len(long_rows) - len(emptied & set(long_rows))
    if drop:
        encoded = encoded.select([i for i in range(len(encoded)) if i not in drop])
    encoded = encoded.remove_columns(["problem", "truncated", "emptied"])
    if len(encoded) == 0:
        raise UserError(f"{what}: no usable rows left ({len(drop)} dropped: see data.bad_rows / data.truncation)")
    return encoded


def load_prompts(cfg: DataSection, seed: int, report: DataReport) -> list[Any]:
    """Prompts from data.train: a `prompt` column (text or messages) or a `messages` column (a conversation
    that does not end with an assistant turn)."""
    rows, _ = load_splits(cfg, seed, report)
    column = require_columns(rows, [("prompt",), ("messages",)], "data.train")[0]
    prompts, problems = [], []
    for position, row in enumerate(rows):
        value = row[column]
        if isinstance(value, list):
            problem = check_messages(value, column)
            if problem is None and value[-1]["role"] == "assistant":
                problem = f"'{column}' ends with an assistant turn: nothing is left to answer"
        elif not isinstance(value, str):
            problem = f"'{column}' is missing" if value is None else f"'{column}' must be a string or a list of messages"
        else:
            problem = None if value.strip() else f"'{column}' is empty"
        if problem:
            problems.append((row.get("__row__", position + 1), problem))
        else:
            prompts.append(value)
    check_bad_rows(problems, "data.train", cfg)
    if problems:
        report.dropped["prompts/malformed"] = len(problems)
    if not prompts:
        raise UserError("data.train: no usable prompts")
    return prompts
