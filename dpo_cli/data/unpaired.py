"""Unpaired examples for KTO (`dpo.loss: kto`): a prompt, one completion and a label, true for a desirable
completion and false for an undesirable one - TRL's unpaired preference format. Preference pairs are read too:
each pair gives its chosen completion as desirable and its rejected one as undesirable (TRL's
unpair_preference_dataset).

KTO's reference point needs the policy's KL to the reference on mismatched pairs: each row is given the
completion of a row with another prompt (a seeded cycle over the rows, `mismatched`), its `kl_completion`. Encoded rows reuse the pair
columns so the pair machinery (shared-prompt rows, precomputed and cached reference log-probs) serves as is:
`chosen_*` holds the row's own completion and `rejected_*` the mismatched one, plus a `desirable` flag.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset

from dpo_cli.core.errors import UserError
from dpo_cli.data.encoding import check_messages
from dpo_cli.data.loading import ROW_NUMBER, DataReport, as_role_content, encode_rows, load_splits
from dpo_cli.data.preference_pairs import PROBLEM, PreferenceSets, encode_sides, prepare_pairs
from dpo_cli.data.tokenization import chat_template_notes
from dpo_cli.core.recipes import TrainingRecipe
from dpo_cli.models.build import build_tokenizer

UNPAIRED_COLUMNS = ("prompt", "completion", "label")
PAIR_COLUMNS = ("chosen", "rejected")


def check_example(prompt: Any, completion: Any, label: Any) -> str | None:
    """Why an unpaired example cannot be trained on, or None."""
    if not isinstance(label, bool):
        return f"'label' must be true (desirable) or false (undesirable), got {label!r}"
    for name, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            return f"'{name}' is missing"
        if isinstance(value, list):
            problem = check_messages(value, name)
            if problem:
                return problem
        elif not isinstance(value, str):
            return f"'{name}' must be a string or a list of messages"
    if isinstance(prompt, list) != isinstance(completion, list):
        return "prompt and completion must both be text or both be lists of messages"
    if isinstance(prompt, list):
        if prompt[-1]["role"] == "assistant":
            return "the prompt ends with an assistant turn; the completion should hold it"
        if completion[-1]["role"] != "assistant":
            return "the completion must end with an assistant message"
    elif not completion.strip():
        return "'completion' is empty"
    return None


def unpair(rows: Dataset) -> Dataset:
    """Preference pairs (any layout prepare_pairs reads) as unpaired examples: chosen desirable, rejected not."""
    columns: dict[str, list[Any]] = {"prompt": [], "completion": [], "label": [], PROBLEM: [], ROW_NUMBER: []}
    for number, row in enumerate(rows, start=1):
        for side, label in (("chosen", True), ("rejected", False)):
            columns["prompt"].append(row["prompt"])
            columns["completion"].append(row[side])
            columns["label"].append(label)
            columns[PROBLEM].append(row[PROBLEM])
            columns[ROW_NUMBER].append(row.get(ROW_NUMBER, number))  # errors name the pair's row in the file
    return Dataset.from_dict(columns)


def prepare_examples(rows: Dataset, what: str, report: DataReport, key: str, seed: int) -> Dataset:
    """Rows ready to encode: unpaired examples checked (a PROBLEM per row), each with its `kl_completion`."""
    names = set(rows.column_names)
    numbers = rows[ROW_NUMBER] if ROW_NUMBER in names else list(range(1, len(rows) + 1))
    if set(UNPAIRED_COLUMNS) <= names:
        prompts = [as_role_content(value) for value in rows["prompt"]]
        completions = [as_role_content(value) for value in rows["completion"]]
        completions = [[value] if isinstance(value, dict) else value for value in completions]
        labels = rows["label"]
        problems = [check_example(p, c, label) or "" for p, c, label in zip(prompts, completions, labels)]
    elif set(PAIR_COLUMNS) <= names:
        unpaired = unpair(prepare_pairs(rows, what, report, key))
        prompts, completions, labels = unpaired["prompt"], unpaired["completion"], unpaired["label"]
        problems, numbers = unpaired[PROBLEM], unpaired[ROW_NUMBER]
    else:
        found = ", ".join(c for c in rows.column_names if not c.startswith("__")) or "none"
        raise UserError(
            f"{what}: dpo.loss: kto reads prompt/completion/label rows (label true or false) or prompt/chosen/rejected pairs; "
            f"found {found} (map yours with data.columns, e.g. data.columns.label=thumbs_up)"
        )
    usable = [i for i, problem in enumerate(problems) if not problem]
    if len({isinstance(completions[i], list) for i in usable}) > 1:
        raise UserError(f"{what}: text and message completions are mixed; KTO scores each prompt with another row's completion, so use one kind")
    kl_completions = list(completions)
    for row, other in mismatched(usable, [json.dumps(prompts[i], sort_keys=True) for i in usable], seed).items():
        kl_completions[row] = completions[other]
    empty = type(completions[usable[0]])() if usable else ""
    fill = lambda values: [empty if value is None or not isinstance(value, (str, list)) else value for value in values]  # noqa: E731
    return Dataset.from_dict({
        "prompt": fill(prompts), "completion": fill(completions), "kl_completion": fill(kl_completions),
        "label": [label if isinstance(label, bool) else False for label in labels], PROBLEM: list(problems), ROW_NUMBER: list(numbers),
    })  # fmt: skip


def mismatched(rows: list[int], prompts: list[str], seed: int) -> dict[int, int]:
    """Each row -> the row whose completion it is scored with for the KL estimate: the prompts' groups in a
    seeded order, rows shuffled within them, then each row takes the row as many places on as the largest
    group has rows. No row gets a completion of its own prompt unless one prompt holds more than half the
    rows (a pair unpaired, or k samples of a prompt, share one); every completion is used once."""
    generator = torch.Generator().manual_seed(seed)
    groups: dict[str, list[int]] = {}
    for row, prompt in zip(rows, prompts):
        groups.setdefault(prompt, []).append(row)
    keys = list(groups)
    ordered = [groups[keys[g]][i] for g in torch.randperm(len(keys), generator=generator).tolist() for i in torch.randperm(len(groups[keys[g]]), generator=generator).tolist()]
    shift = max((len(group) for group in groups.values()), default=1) % max(len(ordered), 1) or 1
    return {row: ordered[(k + shift) % len(ordered)] for k, row in enumerate(ordered)}


def example_encoder(tokenizer: Any, max_length: int, max_prompt_length: int | None) -> Callable[[dict], dict]:
    """A row encoder for data.encode_rows: the completion as `chosen_*`, the mismatched completion as
    `rejected_*` (see the module's docstring), the `desirable` flag and the row flags."""

    def encode(row: dict) -> dict:
        out: dict[str, Any] = {"chosen_input_ids": [], "chosen_labels": [], "rejected_input_ids": [], "rejected_labels": [], "desirable": bool(row["label"])}
        out.update(problem=row[PROBLEM], truncated=False, emptied=False)
        if row[PROBLEM]:
            return out
        encode_sides(out, tokenizer, row["prompt"], {"chosen": row["completion"]}, max_length, max_prompt_length)
        # the mismatched completion is only a KL probe: cut to fit, never a reason to refuse or drop the row
        probe = encode_sides({"truncated": False, "emptied": False}, tokenizer, row["prompt"], {"rejected": row["kl_completion"]}, max_length, max_prompt_length)
        out["rejected_input_ids"], out["rejected_labels"] = probe["rejected_input_ids"], probe["rejected_labels"]
        return out

    return encode


def class_counts(encoded: Dataset, what: str) -> tuple[int, int]:
    """Desirable and undesirable examples of an encoded set; a set without one of the two is refused."""
    desirable = sum(encoded["desirable"])
    undesirable = len(encoded) - desirable
    if not desirable or not undesirable:
        missing = "desirable (label: true)" if not desirable else "undesirable (label: false)"
        raise UserError(f"{what}: no {missing} examples among {len(encoded)}; KTO learns from both kinds (check the label column)")
    return desirable, undesirable


def weight_note(desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float) -> list[str]:
    """The KTO paper's advice: desirable_weight * desirable / (undesirable_weight * undesirable) in [1, 4/3]."""
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if 1.0 <= ratio <= 4 / 3 + 1e-9:
        return []
    low, high = undesirable_weight * undesirable / desirable, undesirable_weight * undesirable / desirable * 4 / 3
    return [
        f"dpo.loss kto: {desirable} desirable / {undesirable} undesirable examples weigh {ratio:.2f} : 1; the KTO paper advises 1 to 4/3 "
        f"(e.g. dpo.desirable_weight in [{low:.2f}, {high:.2f}])"
    ]


def load_example_sets(recipe: TrainingRecipe, report: DataReport, max_prompt_length: int | None, weights: tuple[float, float]) -> PreferenceSets:
    """KTO's data: rows read (pairs unpaired), checked, given their mismatched completions, tokenised, truncated;
    a training set needs both kinds (`weights`: desirable and undesirable, for the balance note)."""
    train_rows, eval_rows = load_splits(recipe.data, recipe.seed, report)
    train_rows = prepare_examples(train_rows, "data.train", report, "train", recipe.seed)
    eval_rows = prepare_examples(eval_rows, report.eval_source, report, "eval", recipe.seed) if eval_rows is not None else None
    tokenizer, notes = build_tokenizer(recipe.model, recipe.tokenizer)
    prompts = list(train_rows["prompt"]) + (list(eval_rows["prompt"]) if eval_rows is not None else [])
    notes = report.notes + notes + chat_template_notes(tokenizer, recipe.tokenizer.chat_template, prompts)
    encoder = example_encoder(tokenizer, recipe.data.max_length, max_prompt_length)
    train_set = encode_rows(train_rows, encoder, "data.train", recipe.data, report, "train")
    if recipe.train.max_steps != 0:  # an evaluation-only run reads the eval rows alone
        notes += weight_note(*class_counts(train_set, "data.train"), *weights)
    eval_set = encode_rows(eval_rows, encoder, report.eval_source, recipe.data, report, "eval") if eval_rows is not None else None
    readable = lambda rows: rows.filter(lambda row: not row[PROBLEM]) if rows is not None else rows  # noqa: E731
    return PreferenceSets(readable(train_rows), readable(eval_rows), train_set, eval_set, tokenizer, notes)
