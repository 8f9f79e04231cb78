"""Preference pairs and the canonical preference record: forming pairs from samples, turning standing labels
into prefs.jsonl records, and the statistics people check before trusting labels (agreement, biases)."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

Prompt = Any  # a string, or a list of {role, content} messages


@dataclass
class Pair:
    pair_id: str  # "{prompt index}-{sample i}-{sample j}": stable across reruns
    prompt: Prompt
    a: str
    b: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def form_pairs(candidates: list[dict[str, Any]], pairs_per_prompt: int | None, seed: int) -> tuple[list[Pair], dict[str, int]]:
    """Pairs of different responses to the same prompt: all of them, or a seeded choice of `pairs_per_prompt`.
    Returns the pairs and what was left out: pairs of the same text twice, and pairs with an empty response
    (no completion to train on: dpo and rm-train would refuse the record)."""
    pairs: list[Pair] = []
    left_out: Counter = Counter()
    for candidate in candidates:
        responses = candidate["responses"]
        combos = list(itertools.combinations(range(len(responses)), 2))
        if pairs_per_prompt is not None and pairs_per_prompt < len(combos):
            combos = sorted(random.Random(f"{seed}:pairs:{candidate['prompt_index']}").sample(combos, pairs_per_prompt))
        for i, j in combos:
            if not responses[i].strip() or not responses[j].strip():
                left_out["empty_responses"] += 1
            elif responses[i].strip() == responses[j].strip():
                left_out["identical_responses"] += 1
            else:
                pairs.append(Pair(f"{candidate['prompt_index']}-{i}-{j}", candidate["prompt"], responses[i], responses[j]))
    return pairs, dict(left_out)


def shown_swapped(seed: int, pair_id: str, annotator: str) -> bool:
    """Whether the pair is shown as (B, A) to this annotator: random per pair, fixed for a seed."""
    return random.Random(f"{seed}:swap:{pair_id}:{annotator}").random() < 0.5


def completion(prompt: Prompt, response: str) -> Any:
    """A response in the prompt's format: text after a text prompt, an assistant message after a conversation."""
    if isinstance(prompt, list):
        return [{"role": "assistant", "content": response.strip()}]
    return response


def _scores_for(scores: list[float] | None, choice: str) -> dict[str, float] | None:
    if not scores:
        return None
    score_a, score_b = scores
    return {"chosen": score_b, "rejected": score_a} if choice == "B" else {"chosen": score_a, "rejected": score_b}


def majority(labels: list[dict[str, Any]]) -> str | None:
    """The choice most annotators made among A/B/tie (skips do not vote); None when there is no majority."""
    votes = Counter(label["choice"] for label in labels if label["choice"] != "skip")
    if not votes:
        return None
    ranked = votes.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None
    return ranked[0][0]


def build_records(
    pairs: list[Pair], standing: list[dict[str, Any]], aggregate: str, ties: str, provenance: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Canonical prefs.jsonl records from the labels that stand, and counts of what was left out."""
    by_pair: dict[str, list[dict[str, Any]]] = {}
    for label in standing:
        by_pair.setdefault(label["pair_id"], []).append(label)
    counts = Counter()
    records = []
    for pair in pairs:
        labels = by_pair.get(pair.pair_id, [])
        if not labels:
            counts["unlabelled"] += 1
            continue
        groups = [[label] for label in labels] if aggregate == "all" else [labels]
        for group in groups:
            choice = majority(group)
            if choice is None:
                counts["skipped" if all(g["choice"] == "skip" for g in group) else "no_majority"] += 1
                continue
            if choice == "tie" and ties == "drop":
                counts["ties_dropped"] += 1
                continue
            chosen, rejected = (pair.b, pair.a) if choice == "B" else (pair.a, pair.b)
            scores = group[0]["scores"] if len(group) == 1 else None
            record = {
                "id": pair.pair_id,
                "prompt": pair.prompt,
                "chosen": completion(pair.prompt, chosen),
                "rejected": completion(pair.prompt, rejected),
                "tie": choice == "tie",
                "labeler": group[0]["labeler"],
                "annotator": ",".join(sorted({g["annotator"] for g in group})),
                "votes": len(group),
                "scores": _scores_for(scores, choice),
                "swapped": group[0]["swapped"] if len(group) == 1 else None,
                **provenance,
                "timestamp": max(g["time"] for g in group),
            }
            records.append(record)
    return records, dict(counts)


def cohen_kappa(first: list[str], second: list[str]) -> float | None:
    """Cohen's kappa of two raters' categorical labels of the same items; None when chance agreement is total."""
    n = len(first)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(first, second)) / n
    count_first, count_second = Counter(first), Counter(second)
    expected = sum(count_first[c] * count_second[c] for c in set(first) | set(second)) / (n * n)
    if expected == 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(first: list[float], second: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on ranks, ties averaged); None when either side is constant."""
    if len(first) < 2:
        return None
    x, y = _ranks(first), _ranks(second)
    mean_x, mean_y = statistics.fmean(x), statistics.fmean(y)
    covariance = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y))
    spread = math.sqrt(sum((a - mean_x) ** 2 for a in x) * sum((b - mean_y) ** 2 for b in y))
    return covariance / spread if spread else None


def agreement(standing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Percent agreement and Cohen's kappa for each pair of annotators over the pairs both decided (skips excluded)."""
    by_annotator: dict[str, dict[str, str]] = {}
    for label in standing:
        if label["choice"] != "skip":
            by_annotator.setdefault(label["annotator"], {})[label["pair_id"]] = label["choice"]
    rows = []
    for x, y in itertools.combinations(sorted(by_annotator), 2):
        shared = sorted(set(by_annotator[x]) & set(by_annotator[y]))
        if not shared:
            continue
        first = [by_annotator[x][p] for p in shared]
        second = [by_annotator[y][p] for p in shared]
        rows.append(
            {
                "annotators": [x, y],
                "overlap": len(shared),
                "percent_agreement": 100.0 * sum(a == b for a, b in zip(first, second)) / len(shared),
                "cohen_kappa": cohen_kappa(first, second),
            }
        )
    return rows


def mean_or_none(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def response_text(value: Any) -> str:
    return value[-1]["content"] if isinstance(value, list) else value


def preference_stats(
    pairs: list[Pair], standing: list[dict[str, Any]], records: list[dict[str, Any]], left_out: dict[str, int]
) -> dict[str, Any]:
    """Counts, per-annotator counts, agreement, position bias and length bias."""
    per_annotator: dict[str, Counter] = {}
    for label in standing:
        per_annotator.setdefault(label["annotator"], Counter())[label["choice"]] += 1
    decided = [label for label in standing if label["choice"] in ("A", "B")]
    # Position bias: how often the response shown on the left (or generated first, for machine labels) wins.
    left_wins = [(label["choice"] == "A") != bool(label["swapped"]) for label in decided]
    first_wins = [label["choice"] == "A" for label in decided]
    chosen_text = [response_text(r["chosen"]) for r in records if not r["tie"]]
    rejected_text = [response_text(r["rejected"]) for r in records if not r["tie"]]
    return {
        "pairs": len(pairs),
        "labels": len(standing),
        "records": len(records),
        "ties": sum(1 for label in standing if label["choice"] == "tie"),
        "skips": sum(1 for label in standing if label["choice"] == "skip"),
        "left_out": left_out,
        "per_annotator": {name: dict(counts) for name, counts in sorted(per_annotator.items())},
        "agreement": agreement(standing),
        "position_bias": {
            "shown_left_chosen_rate": mean_or_none([float(x) for x in left_wins]),
            "first_sample_chosen_rate": mean_or_none([float(x) for x in first_wins]),
            "decided_labels": len(decided),
        },
        "length_bias": {
            "chosen_mean_chars": mean_or_none([len(t) for t in chosen_text]),
            "rejected_mean_chars": mean_or_none([len(t) for t in rejected_text]),
            "chosen_mean_words": mean_or_none([len(t.split()) for t in chosen_text]),
            "rejected_mean_words": mean_or_none([len(t.split()) for t in rejected_text]),
            "chosen_longer_rate": mean_or_none([float(len(c) > len(r)) for c, r in zip(chosen_text, rejected_text)]),
        },
    }
