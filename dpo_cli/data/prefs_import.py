"""Converting existing preference datasets into the canonical prompt/chosen/rejected record.

    trl            prompt, chosen, rejected (strings, or lists of messages); also a text prompt with chosen and
                   rejected conversations that repeat it (HuggingFaceH4/ultrafeedback_binarized)
    hh             chosen and rejected hold whole conversations (Anthropic HH: "\n\nHuman: ...\n\nAssistant: ..."
                   strings, or message lists: TRL's implicit prompt); the prompt is their shared beginning. A
                   ShareGPT `conversations` column, when present, is the prompt
    ultrafeedback  a prompt (or instruction) and scored completions; binarised: the best-scored completion is
                   chosen, a seeded random one of those scored lower is rejected
"""

from __future__ import annotations

import random
from typing import Any

from datasets import Dataset

from dpo_cli.data.loading import as_role_content
from dpo_cli.data.encoding import check_messages
from dpo_cli.core.errors import UserError

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


def _answers_after_text_prompt(prompt: str, chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """A text prompt with chosen/rejected conversations that repeat it (HuggingFaceH4/ultrafeedback_binarized):
    the prompt becomes their shared turns before the final answer, whose last user turn must hold the text."""
    problem = check_messages(chosen, "chosen") or check_messages(rejected, "rejected")
    if problem:
        raise ValueError(problem)
    split = _shared_prefix_messages(chosen, rejected)
    if split == 0:
        raise ValueError(
            "'prompt' is text but chosen and rejected are conversations that share no prompt turns; give all three as text or as messages"
        )
    asked = [m for m in chosen[:split] if m["role"] == "user"]
    if not asked or prompt.strip() not in asked[-1]["content"]:
        raise ValueError("'prompt' does not match the last user turn that chosen and rejected share; the columns disagree")
    return chosen[:split], chosen[split:], rejected[split:]


def validate_pair(prompt: Any, chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """The checks every pair passes before training (dpo, rm-train) or import: ValueError naming the problem."""
    prompt, chosen, rejected = from_trl({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    conversational = [isinstance(v, list) for v in (prompt, chosen, rejected)]
    if any(conversational) and not all(conversational):
        raise ValueError("prompt, chosen and rejected must all be text or all be lists of messages")
    if all(conversational):
        if prompt[-1]["role"] == "assistant":
            raise ValueError("the prompt ends with an assistant turn; the completions should hold it")
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise ValueError("chosen and rejected must end with an assistant message")
    elif not chosen.strip() or not rejected.strip():
        raise ValueError(f"'{'chosen' if not chosen.strip() else 'rejected'}' is empty")
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are the same")
    return prompt, chosen, rejected


def normalize_pair(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    """A preference row in any layout dpo-cli reads, as TRL's explicit-prompt pair (prompt, chosen, rejected),
    checked; the one place dpo, rm-train, score and collect-prefs import read pairs. Raises ValueError naming
    the problem.

    - prompt + chosen + rejected, text or messages (TRL standard and conversational): as they are;
    - a text prompt + chosen/rejected conversations that repeat it (HuggingFaceH4/ultrafeedback_binarized): the
      prompt is their shared turns before the final answer (the text must be the last shared user turn);
    - a conversational prompt that chosen and rejected both repeat: the answers after it;
    - no prompt, whole conversations or Anthropic HH strings (TRL's implicit prompt): the shared beginning;
    - ShareGPT ({from, value} messages; `conversations` as the prompt, one message as a completion).
    """
    prompt = row.get("prompt")
    if prompt is None and row.get("conversations") is not None:
        prompt = row["conversations"]
    prompt, chosen, rejected = (as_role_content(v) for v in (prompt, row.get("chosen"), row.get("rejected")))
    chosen, rejected = ([v] if isinstance(v, dict) else v for v in (chosen, rejected))
    if chosen is not None and chosen == rejected:  # said first: splitting identical conversations finds no prompt
        raise ValueError("'chosen' and 'rejected' are the same")
    if prompt is None and chosen is not None and rejected is not None:
        prompt, chosen, rejected = from_hh({"chosen": chosen, "rejected": rejected})
    elif isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list) and any(
        isinstance(m, dict) and m.get("role") != "assistant" for m in chosen
    ):
        prompt, chosen, rejected = _answers_after_text_prompt(prompt, chosen, rejected)
    elif isinstance(prompt, list) and prompt and isinstance(chosen, list) and isinstance(rejected, list):
        turns = len(prompt)
        if min(len(chosen), len(rejected)) > turns and chosen[:turns] == prompt and rejected[:turns] == prompt:
            chosen, rejected = chosen[turns:], rejected[turns:]
    return validate_pair(prompt, chosen, rejected)


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
        try:
            if fmt == "ultrafeedback":
                prompt, chosen, rejected, scores = from_ultrafeedback(row, random.Random(f"{seed}:uf:{number}"))
                prompt, chosen, rejected = validate_pair(prompt, chosen, rejected)
            else:  # trl and hh: every pair layout goes through the normaliser dpo and rm-train use
                prompt, chosen, rejected = normalize_pair(row if fmt == "trl" else {k: v for k, v in row.items() if k != "prompt"})
        except ValueError as exc:  # validate_pair's checks: the same pairs are refused here as in dpo and rm-train
            problems.append((number, str(exc)))
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
