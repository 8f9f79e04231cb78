"""Thumbs up / down labels (`collect.mode: thumbs`): each sampled response judged alone, desirable or not,
written as KTO's unpaired examples (prompt, completion, label). The labels go through the same fsynced,
append-only LabelLog as pair labels, an item's id in place of a pair's and `up` / `down` / `skip` as choices."""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from dpo_cli.data.prefs import Prompt, agreement, completion, majority, mean_or_none, response_text

UP, DOWN, SKIP = "up", "down", "skip"


@dataclass
class Item:
    item_id: str  # "{prompt index}-{sample i}": stable across reruns
    prompt: Prompt
    response: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def form_items(candidates: list[dict[str, Any]]) -> tuple[list[Item], dict[str, int]]:
    """Every sampled response as an item to judge, and what was left out (counted): a response repeating an
    earlier one of its prompt (no text is labelled twice) and an empty one (no completion to train on)."""
    items: list[Item] = []
    left_out: Counter = Counter()
    for candidate in candidates:
        seen: set[str] = set()
        for i, response in enumerate(candidate["responses"]):
            if not response.strip() or response.strip() in seen:
                left_out["empty_responses" if not response.strip() else "repeated_responses"] += 1
                continue
            seen.add(response.strip())
            items.append(Item(f"{candidate['prompt_index']}-{i}", candidate["prompt"], response))
    return items, dict(left_out)


def median_threshold(scores: list[float | None]) -> float:
    """The default bar for a machine judge's thumbs up: the median score, so about half the items pass."""
    known = [s for s in scores if s is not None]
    return statistics.median(known) if known else 0.0


def thumb_choice(score: float, threshold: float, noise: float | None, rng: random.Random) -> str:
    """Up at or above the threshold; with noise T, up with probability sigmoid((score - threshold) / T)."""
    if noise is None:
        return UP if score >= threshold else DOWN
    z = max(-60.0, min(60.0, (score - threshold) / noise))
    return UP if rng.random() < 1 / (1 + math.exp(-z)) else DOWN


def build_thumb_records(
    items: list[Item], standing: list[dict[str, Any]], aggregate: str, provenance: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Unpaired records (TRL's prompt/completion/label) from the labels that stand, and what was left out."""
    by_item: dict[str, list[dict[str, Any]]] = {}
    for label in standing:
        by_item.setdefault(label["pair_id"], []).append(label)
    counts: Counter = Counter()
    records = []
    for item in items:
        labels = by_item.get(item.item_id, [])
        if not labels:
            counts["unlabelled"] += 1
            continue
        for group in [[label] for label in labels] if aggregate == "all" else [labels]:
            choice = majority(group)
            if choice is None:
                counts["skipped" if all(g["choice"] == SKIP for g in group) else "no_majority"] += 1
                continue
            scores = group[0]["scores"] if len(group) == 1 else None
            records.append({
                "id": item.item_id,
                "prompt": item.prompt,
                "completion": completion(item.prompt, item.response),
                "label": choice == UP,
                "labeler": group[0]["labeler"],
                "annotator": ",".join(sorted({g["annotator"] for g in group})),
                "votes": len(group),
                "score": scores[0] if scores else None,
                "threshold": scores[1] if scores and len(scores) > 1 else None,  # a machine's bar for a thumbs up
                **provenance,
                "timestamp": max(g["time"] for g in group),
            })  # fmt: skip
    return records, dict(counts)


def thumb_stats(items: list[Item], standing: list[dict[str, Any]], records: list[dict[str, Any]], left_out: dict[str, int]) -> dict[str, Any]:
    """Counts, per-annotator counts, agreement on the items two annotators judged, and length bias."""
    per_annotator: dict[str, Counter] = {}
    for label in standing:
        per_annotator.setdefault(label["annotator"], Counter())[label["choice"]] += 1
    words = lambda wanted: [len(response_text(r["completion"]).split()) for r in records if r["label"] is wanted]  # noqa: E731
    return {
        "items": len(items),
        "labels": len(standing),
        "records": len(records),
        "desirable": sum(1 for r in records if r["label"]),
        "undesirable": sum(1 for r in records if not r["label"]),
        "skips": sum(1 for label in standing if label["choice"] == SKIP),
        "left_out": left_out,
        "per_annotator": {name: dict(counts) for name, counts in sorted(per_annotator.items())},
        "agreement": agreement(standing),
        "length_bias": {"desirable_mean_words": mean_or_none(words(True)), "undesirable_mean_words": mean_or_none(words(False))},
        "thresholds": sorted({label["scores"][1] for label in standing if label.get("scores") and len(label["scores"]) > 1}),
    }
