"""`dpo-cli score`: score rows with a reward model (an rm-train run or any scalar sequence classifier), so any
tool can use the reward model through a file. Rows are prompt + response (or TRL's prompt + completion, text
or conversational), or preference pairs in any layout dpo reads (scored side by side, with the accuracy)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from dpo_cli.core import ui
from dpo_cli.data.loading import ROW_NUMBER, load_source, rename_columns, require_columns, standard_layout
from dpo_cli.data.encoding import check_messages
from dpo_cli.core.errors import UserError
from dpo_cli.eval.judges import RewardModelJudge
from dpo_cli.models.io import load_reward_model
from dpo_cli.data.prefs_import import normalize_pair
from dpo_cli.core.recipes import DataSection
from dpo_cli.core.atomic import atomic_write_jsonl

LAYOUTS = [("prompt", "response"), ("prompt", "completion"), ("chosen", "rejected")]  # chosen/rejected: with or without a prompt
COLUMN_HINT = "map yours with --column, e.g. --column prompt=question"


def parse_columns(specs: list[str]) -> dict[str, str]:
    """--column WANTED=THEIRS (repeatable), like a recipe's data.columns."""
    columns = {}
    for spec in specs:
        wanted, sep, theirs = spec.partition("=")
        if not sep or not wanted.strip() or not theirs.strip():
            raise UserError(f"--column {spec!r}: expected WANTED=THEIRS, e.g. --column prompt=question")
        columns[wanted.strip()] = theirs.strip()
    return columns


def _text(value: Any, name: str) -> str:
    """A response as text: a string, or the content of the last of a list of assistant messages."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"'{name}' is empty")
        return value
    if isinstance(value, list):
        problem = check_messages(value, name)
        if problem:
            raise ValueError(problem)
        if value[-1]["role"] != "assistant":
            raise ValueError(f"'{name}' must end with an assistant message")
        return value[-1]["content"]
    raise ValueError(f"'{name}' is missing" if value is None else f"'{name}' must be a string or a list of assistant messages")


def _prompt(value: Any) -> Any:
    if isinstance(value, list):
        problem = check_messages(value, "prompt")
        if problem:
            raise ValueError(problem)
        return value
    if not isinstance(value, str):
        raise ValueError("'prompt' is missing" if value is None else "'prompt' must be a string or a list of messages")
    return value


def scoring_inputs(rows: Any, columns: tuple[str, ...]) -> tuple[list[Any], list[str], int]:
    """(prompt, response text) to score for every row, and how many per row (1, or 2 for chosen + rejected)."""
    prompts, texts = [], []
    for position, row in enumerate(rows):
        try:
            if columns == ("chosen", "rejected"):
                prompt, chosen, rejected = normalize_pair(row)
                pair = [(prompt, _text(chosen, "chosen")), (prompt, _text(rejected, "rejected"))]
            else:
                pair = [(_prompt(row["prompt"]), _text(row[columns[1]], columns[1]))]
        except ValueError as exc:
            raise UserError(f"--data row {row.get(ROW_NUMBER, position + 1)}: {exc}") from None
        for prompt, text in pair:
            prompts.append(prompt)
            texts.append(text)
    return prompts, texts, 2 if columns == ("chosen", "rejected") else 1


def score_file(
    model: str,
    data: Path,
    out: Path,
    batch_size: int,
    max_length: int,
    trust_remote_code: bool = False,
    columns: dict[str, str] | None = None,
) -> dict:
    if out.exists():
        raise UserError(f"--out {out} exists; choose another file (nothing is overwritten)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = load_source(str(data.resolve()), DataSection(train=str(data)), "--data", "train")
    if len(rows) == 0:
        raise UserError(f"--data {data}: no rows")
    rows = standard_layout(rename_columns(rows, columns or {}, "--data", option="--column {wanted}={have}"))
    layout = require_columns(rows, LAYOUTS, "--data", hint=COLUMN_HINT)
    prompts, texts, per_row = scoring_inputs(rows, layout)
    reward_model, tokenizer = load_reward_model(model, device, what="RUN_OR_MODEL", trust_remote_code=trust_remote_code)
    judge = RewardModelJudge(model, reward_model, tokenizer, batch_size, device, max_length)
    with ui.TaskProgress("scoring", 1) as progress:
        values = judge.score(prompts, texts).values
        progress.advance(1)
    scored = []
    for index, row in enumerate(rows):
        own = values[index * per_row : (index + 1) * per_row]
        record = {k: v for k, v in row.items() if not k.startswith("__")}
        if per_row == 1:
            record["score"] = own[0]
        else:
            record["chosen_score"], record["rejected_score"] = own
        scored.append(record)
    atomic_write_jsonl(out, scored)
    summary: dict[str, Any] = {"rows": len(scored), "mean score": statistics.fmean(values), "score std": statistics.pstdev(values), "written to": str(out)}
    if per_row == 2:
        summary["accuracy (chosen > rejected)"] = statistics.fmean(float(r["chosen_score"] > r["rejected_score"]) for r in scored)
    ui.summary_table({"stage": "score", "status": "completed", "highlights": {"reward model": model, **summary}})
    return summary
