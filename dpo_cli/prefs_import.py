"""Converting existing preference datasets into the canonical prompt/chosen/rejected record.

    trl            prompt, chosen, rejected (strings, or lists of messages)
    hh             chosen and rejected hold whole conversations (Anthropic HH: "\n\nHuman: ...\n\nAssistant: ..."
                   strings, or message lists); the prompt is their shared beginning
    ultrafeedback  a prompt (or instruction) and scored completions; binarised: the best-scored completion is
                   chosen, a seeded random one of those scored lower is rejected
"""

from __future__ import annotations

import random
from typing import Any

from datasets import Dataset

from dpo_cli.encoding import check_messages
from dpo_cli.errors import UserError

ASSISTANT_MARK = "\n\nAssistant:"
FORMATS = ("trl", "hh", "ultrafeedback")


def detect_format(columns: list[str]) -> str:
    if "completions" in columns:
        return "ultrafeedback"
    if {"prompt", "chosen", "rejected"} <= set(columns):
        return "trl"
    if {"chosen", "rejected"} <= set(columns):
        return "hh"
    raise UserError(
        "data.train: cannot tell the preference format from the columns "
        f"{', '.join(c for c in columns if not c.startswith('__'))}: expected prompt/chosen/rejected (trl), "
        "chosen/rejected conversations (hh) or prompt/completions (ultrafeedback); map yours with data.columns"
    )


def _shared_prefix_messages(chosen: list[dict], rejected: list[dict]) -> int:
    count = 0
    for x, y in zip(chosen, rejected):
        if x != y:
            break
        count += 1
    while count > 0 and chosen[count - 1]["role"] == "assistant":  # the prompt ends before an assistant reply
        count -= 1
    return count


def from_hh(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        problem = check_messages(chosen, "chosen") or check_messages(rejected, "rejected")
        if problem:
            raise ValueError(problem)
        split = _shared_prefix_messages(chosen, rejected)
        if split == 0:
            raise ValueError("chosen and rejected share no prompt messages")
        return chosen[:split], chosen[split:], rejected[split:]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise ValueError("'chosen' and 'rejected' must both be strings or both lists of messages")
    shared = 0
    for x, y in zip(chosen, rejected):
        if x != y:
            break
        shared += 1
    cut = chosen.rfind(ASSISTANT_MARK, 0, shared + 1)
    if cut < 0:
        raise ValueError(f"no shared prompt ending in {ASSISTANT_MARK.strip()!r}")
    cut += len(ASSISTANT_MARK)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def from_trl(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise ValueError(f"'{name}' is missing")
        if isinstance(value, list):
            problem = check_messages(value, name)
            if problem:
                raise ValueError(problem)
        elif not isinstance(value, str):
            raise ValueError(f"'{name}' must be a string or a list of messages")
    return prompt, chosen, rejected


def from_ultrafeedback(row: dict[str, Any], rng: random.Random) -> tuple[Any, Any, Any, dict[str, float]]:
    prompt = row.get("prompt", row.get("instruction"))
    completions = row.get("completions")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("'prompt' (or 'instruction') is missing or empty")
    if not isinstance(completions, list) or len(completions) < 2:
        raise ValueError("'completions' must list at least two scored responses")
    scored = []
    for index, item in enumerate(completions):
        if not isinstance(item, dict) or not isinstance(item.get("response"), str):
            raise ValueError(f"completions[{index}] has no 'response'")
        score = item.get("overall_score", item.get("score", item.get("fine-grained_score")))
        if not isinstance(score, (int, float)):
            raise ValueError(f"completions[{index}] has no numeric 'overall_score'")
        scored.append((float(score), item["response"]))
    best = max(score for score, _ in scored)
    lower = [(score, text) for score, text in scored if score < best]
    if not lower:
        raise ValueError("every completion has the same score (a tie)")
    chosen = next(text for score, text in scored if score == best)
    rejected_score, rejected = rng.choice(lower)
    return prompt, chosen, rejected, {"chosen": best, "rejected": rejected_score}


def convert_rows(ds: Dataset, fmt: str, seed: int, stamp: str, source: str) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Canonical records and (row number, problem) for every row that could not be converted."""
    records, problems = [], []
    for position, row in enumerate(ds):
        number = row.get("__row__", position + 1)
        scores = None
        if row.get("chosen") is not None and row.get("chosen") == row.get("rejected"):
            problems.append((number, "'chosen' and 'rejected' are the same"))
            continue
        try:
            if fmt == "ultrafeedback":
                prompt, chosen, rejected, scores = from_ultrafeedback(row, random.Random(f"{seed}:uf:{number}"))
            elif fmt == "hh":
                prompt, chosen, rejected = from_hh(row)
            else:
                prompt, chosen, rejected = from_trl(row)
        except ValueError as exc:
            problems.append((number, str(exc)))
            continue
        if chosen == rejected:
            problems.append((number, "'chosen' and 'rejected' are the same"))
            continue
        if not chosen or not rejected or (isinstance(chosen, str) and not chosen.strip()) or (isinstance(rejected, str) and not rejected.strip()):
            problems.append((number, "an empty completion"))
            continue
        records.append(
            {
                "id": f"import-{number}",
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "tie": False,
                "labeler": f"import:{fmt}",
                "annotator": None,
                "votes": 1,
                "scores": scores,
                "swapped": None,
                "source": source,
                "timestamp": stamp,
            }
        )
    return records, problems
