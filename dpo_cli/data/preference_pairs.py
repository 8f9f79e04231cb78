"""Preference pairs as model inputs (dpo, and rm-train later): row checks, tokenisation, truncation, collation.

Tokenisation follows the common convention so results agree with other tools (TRL's DPOTrainer): the prompt
and prompt+completion are tokenised with the tokenizer's own special tokens (a Llama BOS), the tokenizer's
EOS is appended to each plain-text completion, and the completion starts where the two token sequences diverge. Conversations are
rendered with the chat template, whose end-of-turn marker ends the completion. Prompts are cut from the
left to max_prompt_length, completions from the right to fit max_length; a pair left without a completion
token is dropped and counted, never trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset

from dpo_cli.data.loading import DataReport, encode_rows, load_splits, require_columns
from dpo_cli.data.encoding import divergence, pad, plain_sequence, render_chat
from dpo_cli.data.layout import CHOSEN, OWN, REJECTED, Piece, pack, segment_id
from dpo_cli.losses import IGNORE_INDEX
from dpo_cli.core.errors import UserError
from dpo_cli.models.build import build_tokenizer
from dpo_cli.data.prefs_import import normalize_pair, validate_pair
from dpo_cli.core.recipes import TrainingRecipe
from dpo_cli.data.tokenization import chat_template_notes

PROBLEM = "__problem__"  # why normalize_pairs could not read a row


def normalize_pairs(ds: Dataset) -> Dataset:
    """Every row as TRL's explicit-prompt pair (prefs_import.normalize_pair: implicit prompts and Anthropic HH
    split at their shared beginning, HuggingFaceH4's repeated prompts cut off, ShareGPT messages converted).
    A row that cannot be read keeps its problem in PROBLEM, reported with its row number by the encoder, and
    empty fields of the type the other rows have (text, or lists of messages)."""
    names = ("prompt", "chosen", "rejected")
    columns: dict[str, list[Any]] = {name: [] for name in (*names, PROBLEM)}
    for row in ds:
        try:
            values, problem = normalize_pair(row), ""
        except ValueError as exc:
            values, problem = (None, None, None), str(exc)
        for name, value in zip(names, values):
            columns[name].append(value)
        columns[PROBLEM].append(problem)
    read = next((i for i, problem in enumerate(columns[PROBLEM]) if not problem), None)
    if read is not None:
        for name in names:
            empty = type(columns[name][read])()
            columns[name] = [empty if value is None else value for value in columns[name]]
    # Added as whole columns, whose Arrow type is read off every row (a map's writer fixes it by the first rows).
    for name, values in columns.items():
        ds = ds.add_column(f"__new_{name}", values)
    ds = ds.remove_columns([name for name in columns if name in ds.column_names])
    return ds.rename_columns({f"__new_{name}": name for name in columns})


def _check_pair(row: dict) -> str | None:
    """Why a pair cannot be trained on, or None (the same checks as normalize_pair, which prepare_pairs ran)."""
    if row.get(PROBLEM):
        return row[PROBLEM]
    try:
        validate_pair(row.get("prompt"), row.get("chosen"), row.get("rejected"))
    except ValueError as exc:
        return str(exc)
    return None


def sequence_ids(tokenizer: Any, prompt: Any, completion: Any) -> tuple[list[int], int]:
    """Token ids of prompt + completion (as trained on and as scored), and where the completion starts."""
    if isinstance(prompt, list):
        prompt_ids = tokenizer(render_chat(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(render_chat(tokenizer, prompt + completion, add_generation_prompt=False), add_special_tokens=False)["input_ids"]
    else:
        return plain_sequence(tokenizer, prompt, completion)
    return full_ids, divergence(prompt_ids, full_ids)


def fit_to_length(ids: list[int], start: int, max_length: int, max_prompt_length: int | None) -> tuple[list[int], list[int], bool]:
    """Cut the prompt from the left, then the completion from the right; labels ignore the prompt."""
    prompt, completion = ids[:start], ids[start:]
    cut = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, cut = prompt[len(prompt) - max_prompt_length :], True
    if len(prompt) + len(completion) > max_length:
        keep_prompt = min(len(prompt), max_length)
        prompt = prompt[len(prompt) - keep_prompt :]
        completion, cut = completion[: max_length - keep_prompt], True
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, cut


def pair_encoder(tokenizer: Any, max_length: int, max_prompt_length: int | None, with_margin: bool = False) -> Callable[[dict], dict]:
    """A row encoder for data.encode_rows: chosen and rejected token ids and labels, plus the row flags
    (and a per-pair `margin` column, for reward models trained with margins)."""

    def encode(row: dict) -> dict:
        out = {"chosen_input_ids": [], "chosen_labels": [], "rejected_input_ids": [], "rejected_labels": []}
        out.update(problem="", truncated=False, emptied=False)
        problem = _check_pair(row)
        if with_margin:
            margin = row.get("margin")
            out["margin"] = float(margin) if isinstance(margin, (int, float)) and not isinstance(margin, bool) else 0.0
            if problem is None and out["margin"] != margin:
                problem = f"'margin' must be a number, got {margin!r}"
        if problem:
            out["problem"] = problem
            return out
        return encode_sides(out, tokenizer, row["prompt"], {"chosen": row["chosen"], "rejected": row["rejected"]}, max_length, max_prompt_length)

    return encode


def encode_sides(out: dict, tokenizer: Any, prompt: Any, completions: dict[str, Any], max_length: int, max_prompt_length: int | None) -> dict:
    """`out` with SIDE_input_ids / SIDE_labels of prompt + each completion, and its truncated / emptied flags."""
    for side, completion in completions.items():
        ids, start = sequence_ids(tokenizer, prompt, completion)
        ids, labels, cut = fit_to_length(ids, start, max_length, max_prompt_length)
        out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, labels
        out["truncated"] |= cut
        out["emptied"] |= all(label == IGNORE_INDEX for label in labels[1:])
    return out


def drop_ties(ds: Dataset) -> tuple[Dataset, int]:
    """Records that collect-prefs kept as ties (`tie: true`) carry no preference to train on."""
    if "tie" not in ds.column_names:
        return ds, 0
    keep = [i for i, tie in enumerate(ds["tie"]) if not tie]
    return (ds.select(keep) if len(keep) < len(ds) else ds), len(ds) - len(keep)


def prepare_pairs(rows: Dataset, what: str, report: DataReport, key: str) -> Dataset:
    """Preference rows ready to encode: every layout normalised to prompt/chosen/rejected, ties left out (counted)."""
    require_columns(rows, [("prompt", "chosen", "rejected"), ("chosen", "rejected")], what)
    rows, ties = drop_ties(rows)
    if ties:
        report.dropped[f"{key}/ties"] = ties
    return normalize_pairs(rows)


def _per_pair(rows: list[dict]) -> dict[str, torch.Tensor]:
    """What rides along with the pairs' tokens: reward margins (B,), KTO's desirable flags (B,), precomputed
    reference log-probs (2B,), chosen first."""
    extra: dict[str, torch.Tensor] = {}
    if "margin" in rows[0]:
        extra["margins"] = torch.tensor([r["margin"] for r in rows], dtype=torch.float32)
    if "desirable" in rows[0]:
        extra["desirable"] = torch.tensor([r["desirable"] for r in rows], dtype=torch.bool)
    if "ref_chosen_logps" in rows[0]:
        extra["ref_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows] + [r["ref_rejected_logps"] for r in rows], dtype=torch.float32)
    return extra


def collate_pairs(rows: list[dict], pad_id: int) -> dict[str, Any]:
    """B pairs -> 2B right-padded sequences, all chosen first, then all rejected (one forward pass).
    `num_items` is the number of pairs; precomputed reference log-probs ride along when present."""
    input_ids, attention_mask = pad([r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows], pad_id)  # (2B, T)
    labels, _ = pad([r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows], IGNORE_INDEX)  # (2B, T)
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **_per_pair(rows)}
    batch["num_items"] = len(rows)
    batch["num_tokens"] = int(attention_mask.sum())
    return batch


def _first_label(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def shared_prefix(chosen_ids: list[int], rejected_ids: list[int], chosen_labels: list[int], rejected_labels: list[int]) -> int:
    """How many leading tokens both sequences share and neither trains on: their common prompt, computed once."""
    limit = min(_first_label(chosen_labels), _first_label(rejected_labels))
    length = 0
    while length < limit and chosen_ids[length] == rejected_ids[length]:
        length += 1
    return length


def collate_shared_pairs(rows: list[dict], pad_id: int) -> dict[str, Any]:
    """B pairs -> rows of prompt, chosen completion, rejected completion, packed without padding waste
    (data.layout): each prompt passes the model once instead of twice. Position ids restart at the end of the
    prompt for the rejected completion, and segments let each completion see its prompt and itself only, so
    each gets the log-probs (or score) of a row of its own (models.forward reads the layout). Otherwise as
    collate_pairs: `num_tokens` counts the tokens of both sequences, prompt twice."""
    pieces = []
    for item, row in enumerate(rows):
        chosen, rejected = row["chosen_input_ids"], row["rejected_input_ids"]
        chosen_labels, rejected_labels = row["chosen_labels"], row["rejected_labels"]
        length = shared_prefix(chosen, rejected, chosen_labels, rejected_labels)
        own_rejected = rejected_labels[length:] if length else [IGNORE_INDEX] + rejected_labels[1:]  # no predecessor: no target
        pieces.append(Piece(
            ids=chosen + rejected[length:],
            labels=[IGNORE_INDEX] + chosen_labels[1:] + own_rejected,
            positions=list(range(len(chosen))) + list(range(length, len(rejected))),
            segments=[segment_id(item, OWN)] * length + [segment_id(item, CHOSEN)] * (len(chosen) - length)
            + [segment_id(item, REJECTED)] * (len(rejected) - length),
        ))  # fmt: skip
    batch: dict[str, Any] = {**pack(pieces, pad_id, sequences=2 * len(rows)), **_per_pair(rows)}
    batch["num_items"] = len(rows)
    batch["num_tokens"] = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    return batch


@dataclass
class PreferenceSets:
    """Preference pairs of a training stage: the raw rows (for samples and judges) and the encoded sets."""

    train_rows: Dataset
    eval_rows: Dataset | None
    train_set: Dataset
    eval_set: Dataset | None
    tokenizer: Any
    notes: list[str] = field(default_factory=list)


def load_preference_sets(recipe: TrainingRecipe, report: DataReport, max_prompt_length: int | None, with_margin: bool = False) -> PreferenceSets:
    """dpo and rm-train data: rows checked (implicit prompts split, ties dropped), tokenised, truncated."""
    train_rows, eval_rows = load_splits(recipe.data, recipe.seed, report)
    train_rows = prepare_pairs(train_rows, "data.train", report, "train")
    eval_rows = prepare_pairs(eval_rows, report.eval_source, report, "eval") if eval_rows is not None else None
    if with_margin and "margin" not in train_rows.column_names:
        raise UserError("rm.margin: data.train has no `margin` column (map yours with data.columns.margin=NAME)")
    tokenizer, notes = build_tokenizer(recipe.model, recipe.tokenizer)
    prompts = list(train_rows["prompt"]) + (list(eval_rows["prompt"]) if eval_rows is not None else [])
    notes = report.notes + notes + chat_template_notes(tokenizer, recipe.tokenizer.chat_template, prompts)
    encoder = pair_encoder(tokenizer, recipe.data.max_length, max_prompt_length, with_margin=with_margin)
    train_set = encode_rows(train_rows, encoder, "data.train", recipe.data, report, "train")
    eval_set = encode_rows(eval_rows, encoder, report.eval_source, recipe.data, report, "eval") if eval_rows is not None else None
    readable = lambda rows: rows.filter(lambda row: not row[PROBLEM]) if rows is not None and PROBLEM in rows.column_names else rows  # noqa: E731
    return PreferenceSets(readable(train_rows), readable(eval_rows), train_set, eval_set, tokenizer, notes)  # samples and judges read these
