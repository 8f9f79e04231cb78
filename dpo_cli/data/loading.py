"""Datasets: where rows come from (local files - see files.py -, hub ids, built-in demo sets), column mapping,
row checks with clear errors, and the eval split. Tokenisation lives in encoding.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets
from datasets import Dataset

from dpo_cli.data.files import is_local, load_local, local_files
from dpo_cli.demo import demo_rows
from dpo_cli.data.encoding import check_messages
from dpo_cli.core.errors import UserError
from dpo_cli.core.recipes import DataSection
from dpo_cli.core.sections import DataSource
from dpo_cli.data.mixture import SOURCE, is_mixture, load_mixture

datasets.disable_progress_bars()
datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors come back as exceptions, said in our one line

ROW_NUMBER = "__row__"  # the row's number in its file (from 1), kept through splits so errors point at the file


@dataclass
class DataReport:
    """Counts a stage reports about its data (dropped and truncated rows are never silent)."""

    rows: dict[str, int] = field(default_factory=dict)
    eval_source: str = "data.eval"  # "data.train" when the eval rows were carved off the training data
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    mixture: list[dict[str, Any]] | None = None  # what each source of a weighted mixture gave

    def as_dict(self) -> dict[str, Any]:
        found = {"rows": self.rows, "dropped": self.dropped, "truncated": self.truncated}
        return {**found, "mixture": self.mixture} if self.mixture is not None else found


def load_source(source: str | list[str], cfg: DataSection, what: str, split: str) -> Dataset:
    """Rows from demo:NAME, local files/folders/globs (one or a list), a save_to_disk folder (of a DatasetDict:
    its `split`), or a hub dataset id."""
    sources = source if isinstance(source, list) else [source]
    if len(sources) == 1 and sources[0].startswith("demo:"):
        return Dataset.from_list(demo_rows(sources[0]))
    if all(is_local(s) or any(ch in s for ch in "*?[") for s in sources):
        return load_local([f for s in sources for f in local_files(s, what, split)], what)
    if len(sources) > 1:
        raise UserError(
            f"{what}: a list of plain paths is one dataset of local files; to mix hub datasets write each entry as {{path: ID, weight: W}}"
        )
    try:
        return datasets.load_dataset(sources[0], cfg.subset, split=split)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what}: cannot load {sources[0]!r}: no such local path, and the hub did not provide it ({first})") from None


def rename_columns(ds: Dataset, columns: dict[str, str], what: str, option: str = "data.columns.{wanted}") -> Dataset:
    """data.columns (score: --column) maps the names a stage expects to the names in the user's data."""
    for wanted, have in columns.items():
        if wanted == have:
            continue
        if have not in ds.column_names:
            where = option.format(wanted=wanted, have=have)
            raise UserError(f"{where}: {what} has no column {have!r} (columns: {', '.join(c for c in ds.column_names if c != ROW_NUMBER)})")
        if wanted in ds.column_names:
            ds = ds.remove_columns(wanted)
        ds = ds.rename_column(have, wanted)
    return ds


# ShareGPT names the speaker `from` (human, gpt, system) and the text `value`; everything else here is role/content.
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant", "system": "system", "tool": "tool",
}  # fmt: skip
MESSAGE_COLUMNS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected")


def as_role_content(value: Any) -> Any:
    """A ShareGPT message ({from, value}) or a list of them as {role, content} messages; anything else unchanged
    (an unknown speaker keeps its name, for the row check to report)."""
    if isinstance(value, list):
        return [as_role_content(message) for message in value]
    if isinstance(value, dict) and "from" in value and "role" not in value:
        speaker = value["from"]
        return {"role": SHAREGPT_ROLES.get(speaker.lower(), speaker) if isinstance(speaker, str) else speaker, "content": value.get("value")}
    return value


def _sharegpt_columns(ds: Dataset) -> list[str]:
    found = []
    for name in MESSAGE_COLUMNS:
        feature = ds.features.get(name)
        inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", feature)  # datasets 3 / 4+ lists
        if isinstance(inner, dict) and {"from", "value"} <= set(inner) and "role" not in inner:
            found.append(name)
    return found


def standard_layout(ds: Dataset) -> Dataset:
    """ShareGPT data as role/content messages: its messages converted, and a `conversations` column (the
    conversation of an sft set) named `messages`; a preference set keeps `conversations` (its prompt)."""
    columns = _sharegpt_columns(ds)
    if columns:
        ds = ds.map(lambda row: {name: as_role_content(row[name]) for name in columns}, desc=None)
    if "conversations" in ds.column_names and "messages" not in ds.column_names and not {"chosen", "rejected"} & set(ds.column_names):
        ds = ds.rename_column("conversations", "messages")
    return ds


def _numbered(ds: Dataset) -> Dataset:
    return ds.add_column(ROW_NUMBER, list(range(1, len(ds) + 1))) if ROW_NUMBER not in ds.column_names else ds


def _mixture_source(cfg: DataSection) -> tuple[Callable[[DataSource, str, str], Dataset], Callable[[Dataset, DataSource, str], Dataset]]:
    """How a mixture's source is read (a whole one) and prepared (every one, streamed ones too): the column
    mappings (data.columns, then the source's own), the standard layout, row numbers."""

    def prepare(rows: Dataset, source: DataSource, what: str) -> Dataset:
        rows = rename_columns(rename_columns(rows, cfg.columns, what), source.columns, what, option=f"{what}.columns.{{wanted}}")
        return _numbered(standard_layout(rows))

    def load_one(source: DataSource, what: str, split: str) -> Dataset:
        return prepare(load_source(source.path, cfg.model_copy(update={"subset": source.subset or cfg.subset}), what, split), source, what)

    return load_one, prepare


def load_splits(cfg: DataSection, seed: int, report: DataReport) -> tuple[Dataset, Dataset | None]:
    """The training rows (one source, or a weighted mixture) and the eval rows (given, carved off train, or none)."""
    if is_mixture(cfg.train):
        train, report.mixture = load_mixture(cfg, seed, *_mixture_source(cfg))
        shares = ", ".join(f"{m['source']} {m['rows']} rows ({m['share']:.0%}{', repeated' if m['repeated'] else ''})" for m in report.mixture)
        report.notes.append(f"data.train mixture: {shares}")
    else:
        train = _numbered(standard_layout(rename_columns(load_source(cfg.train, cfg, "data.train", cfg.split), cfg.columns, "data.train")))
    if len(train) == 0:
        raise UserError("data.train: the dataset is empty")
    evaluation: Dataset | None = None
    if isinstance(cfg.eval, str):
        evaluation = rename_columns(load_source(cfg.eval, cfg, "data.eval", cfg.eval_split or cfg.split), cfg.columns, "data.eval")
        evaluation = _numbered(standard_layout(evaluation))
        if len(evaluation) == 0:
            raise UserError("data.eval: the dataset is empty")
    elif cfg.eval is not None:
        report.eval_source = "data.train"
        count = int(cfg.eval) if cfg.eval >= 1 else max(1, round(cfg.eval * len(train)))
        if count >= len(train):
            raise UserError(f"data.eval: carving {count} eval rows off {len(train)} training rows leaves none to train on")
        parts = train.train_test_split(test_size=count, shuffle=True, seed=seed)
        train, evaluation = parts["train"], parts["test"]
        if report.mixture is not None:  # a repeated source's copies of an eval row never train
            held_out = set(zip(evaluation[SOURCE], evaluation[ROW_NUMBER]))
            train = train.filter(lambda row: (row[SOURCE], row[ROW_NUMBER]) not in held_out)
    if cfg.max_rows is not None and len(train) > cfg.max_rows:
        train = train.select(range(cfg.max_rows))
    if evaluation is not None and cfg.max_eval_rows is not None and len(evaluation) > cfg.max_eval_rows:
        evaluation = evaluation.select(range(cfg.max_eval_rows))
    report.rows["train"] = len(train)
    if evaluation is not None:
        report.rows["eval"] = len(evaluation)
    return train, evaluation


def require_columns(
    ds: Dataset, options: list[tuple[str, ...]], what: str, hint: str = "map yours with data.columns, e.g. data.columns.prompt=question"
) -> tuple[str, ...]:
    """The first set of columns the dataset has out of `options`, else a clear error ending in `hint`."""
    for option in options:
        if all(c in ds.column_names for c in option):
            return option
    wanted = " or ".join("/".join(o) for o in options)
    found = ", ".join(c for c in ds.column_names if not c.startswith("__")) or "none"
    raise UserError(f"{what}: expected columns {wanted}, found {found} ({hint})")


def check_bad_rows(problems: list[tuple[int, str]], what: str, cfg: DataSection) -> None:
    """With data.bad_rows: error, the first malformed row (by its number in the file) stops the stage."""
    if problems and cfg.bad_rows == "error":
        number, problem = problems[0]
        more = f" ({len(problems) - 1} more bad rows; data.bad_rows: drop skips them)" if len(problems) > 1 else ""
        raise UserError(f"{what} row {number}: {problem}{more}")


def _encoded_features(ds: Dataset, encode: Callable[[dict[str, Any]], dict[str, Any]]) -> datasets.Features | None:
    """The feature types of the first row that encodes: without them the writer would fix each column's type by
    the first 1000 rows, which may all be malformed (empty token lists), and then refuse the good ones."""
    for row in ds:
        out = encode(row)
        if not out["problem"]:
            return Dataset.from_list([out]).features
    return None


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
    encoded = ds.map(encode, remove_columns=ds.column_names, features=_encoded_features(ds, encode), desc=None)
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
    prompts, problems, answered = [], [], 0
    for position, row in enumerate(rows):
        value = row[column]
        if isinstance(value, list):
            problem = check_messages(value, column)
            if problem is None and column == "messages" and value[-1]["role"] == "assistant":
                asked = [i for i, message in enumerate(value) if message["role"] != "assistant"]
                if asked:  # a chat dataset's conversation: the prompt is everything before its last answer
                    value, answered = value[: asked[-1] + 1], answered + 1
                else:
                    problem = "'messages' holds only assistant turns: nothing to answer"
            elif problem is None and value[-1]["role"] == "assistant":
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
    if answered:
        report.notes.append(f"{answered} conversations end with an assistant answer: the prompt is the conversation before it")
    return prompts
