"""Preference pairs as model inputs (dpo, and rm-train later): row checks, tokenisation, truncation, collation.

Tokenisation follows the common convention so results agree with other tools: the prompt and
prompt+completion are tokenised without extra special tokens, the tokenizer's EOS is appended to each
plain-text completion, and the completion starts where the two token sequences diverge. Conversations are
rendered with the chat template, whose end-of-turn marker ends the completion. Prompts are cut from the
left to max_prompt_length, completions from the right to fit max_length; a pair left without a completion
token is dropped and counted, never trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset

from dpo_cli.data import DataReport, require_columns
from dpo_cli.encoding import check_messages, divergence, pad, render_chat
from dpo_cli.losses import IGNORE_INDEX
from dpo_cli.prefs_import import from_hh


def implicit_prompts(ds: Dataset) -> Dataset:
    """chosen/rejected that hold whole conversations (no prompt column): split off the shared prompt."""

    def split(row: dict) -> dict:
        try:
            prompt, chosen, rejected = from_hh(row)
        except ValueError:
            return {"prompt": None, "chosen": row["chosen"], "rejected": row["rejected"]}
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    return ds.map(split)


def _check_pair(row: dict) -> str | None:
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if value is None:
            return f"'{name}' is missing"
    conversational = [isinstance(v, list) for v in (prompt, chosen, rejected)]
    if any(conversational) and not all(conversational):
        return "prompt, chosen and rejected must all be text or all be lists of messages"
    if all(conversational):
        problem = check_messages(prompt, "prompt") or check_messages(chosen, "chosen") or check_messages(rejected, "rejected")
        if problem:
            return problem
        if prompt[-1]["role"] == "assistant":
            return "the prompt ends with an assistant turn; the completions should hold it"
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            return "chosen and rejected must end with an assistant message"
    elif not all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        return "prompt, chosen and rejected must be strings (or lists of messages)"
    elif not chosen.strip() or not rejected.strip():
        return f"'{'chosen' if not chosen.strip() else 'rejected'}' is empty"
    if chosen == rejected:
        return "'chosen' and 'rejected' are the same"
    return None


def sequence_ids(tokenizer: Any, prompt: Any, completion: Any) -> tuple[list[int], int]:
    """Token ids of prompt + completion (as trained on and as scored), and where the completion starts."""
    if isinstance(prompt, list):
        prompt_ids = tokenizer(render_chat(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(render_chat(tokenizer, prompt + completion, add_generation_prompt=False), add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return full_ids, divergence(prompt_ids, full_ids)


def _fit(ids: list[int], start: int, max_length: int, max_prompt_length: int | None) -> tuple[list[int], list[int], bool]:
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
        for side in ("chosen", "rejected"):
            ids, start = sequence_ids(tokenizer, row["prompt"], row[side])
            ids, labels, cut = _fit(ids, start, max_length, max_prompt_length)
            out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, labels
            out["truncated"] |= cut
            out["emptied"] |= all(label == IGNORE_INDEX for label in labels[1:])
        return out

    return encode


def drop_ties(ds: Dataset) -> tuple[Dataset, int]:
    """Records that collect-prefs kept as ties (`tie: true`) carry no preference to train on."""
    if "tie" not in ds.column_names:
        return ds, 0
    keep = [i for i, tie in enumerate(ds["tie"]) if not tie]
    return (ds.select(keep) if len(keep) < len(ds) else ds), len(ds) - len(keep)


def prepare_pairs(rows: Dataset, what: str, report: DataReport, key: str) -> Dataset:
    """Preference rows ready to encode: implicit prompts split off, the columns checked, ties left out (counted)."""
    if "prompt" not in rows.column_names and {"chosen", "rejected"} <= set(rows.column_names):
        rows = implicit_prompts(rows)
    require_columns(rows, [("prompt", "chosen", "rejected")], what)
    rows, ties = drop_ties(rows)
    if ties:
        report.dropped[f"{key}/ties"] = ties
    return rows


def collate_pairs(rows: list[dict], pad_id: int) -> dict[str, Any]:
    """B pairs -> 2B right-padded sequences, all chosen first, then all rejected (one forward pass).
    `num_items` is the number of pairs; precomputed reference log-probs ride along when present."""
    input_ids, attention_mask = pad([r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows], pad_id)  # (2B, T)
    labels, _ = pad([r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows], IGNORE_INDEX)  # (2B, T)
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if "margin" in rows[0]:
        batch["margins"] = torch.tensor([r["margin"] for r in rows], dtype=torch.float32)  # (B,)
    if "ref_chosen_logps" in rows[0]:
        batch["ref_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows] + [r["ref_rejected_logps"] for r in rows], dtype=torch.float32)
    batch["num_items"] = len(rows)
    batch["num_tokens"] = int(attention_mask.sum())
    return batch
