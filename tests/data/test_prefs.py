"""Pairs, records and statistics on hand-made cases (Cohen's kappa against a hand-computed value)."""

from __future__ import annotations

import pytest

from dpo_cli.data.prefs import Pair, agreement, build_records, cohen_kappa, form_pairs, majority, preference_stats, shown_swapped


def label(pair_id, annotator, choice, swapped=False, scores=None):
    return {"pair_id": pair_id, "annotator": annotator, "choice": choice, "swapped": swapped, "labeler": "human", "scores": scores, "time": "t"}


CANDIDATES = [
    {"prompt_index": 0, "prompt": "p0", "responses": [" a", " b", " c"]},
    {"prompt_index": 1, "prompt": "p1", "responses": [" same", " same ", " other"]},
    {"prompt_index": 2, "prompt": "p2", "responses": [" ", " fine"]},
]


def test_all_pairs_and_identical_or_empty_responses_left_out():
    pairs, left_out = form_pairs(CANDIDATES, None, seed=0)
    assert [p.pair_id for p in pairs] == ["0-0-1", "0-0-2", "0-1-2", "1-0-2", "1-1-2"]
    assert left_out == {"identical_responses": 1, "empty_responses": 1}
    assert (pairs[0].a, pairs[0].b) == (" a", " b")


def test_pairs_per_prompt_is_a_seeded_choice():
    first, _ = form_pairs(CANDIDATES[:1], 1, seed=3)
    again, _ = form_pairs(CANDIDATES[:1], 1, seed=3)
    assert len(first) == 1 and first[0].pair_id == again[0].pair_id


def test_swaps_are_random_per_pair_but_fixed_for_a_seed():
    swaps = [shown_swapped(0, f"{i}-0-1", "ann") for i in range(200)]
    assert 70 < sum(swaps) < 130
    assert swaps == [shown_swapped(0, f"{i}-0-1", "ann") for i in range(200)]


def test_majority():
    assert majority([label("p", "x", "A"), label("p", "y", "A"), label("p", "z", "B")]) == "A"
    assert majority([label("p", "x", "A"), label("p", "y", "B")]) is None
    assert majority([label("p", "x", "skip"), label("p", "y", "B")]) == "B"
    assert majority([label("p", "x", "skip")]) is None


def test_records_map_choices_and_scores_and_handle_ties():
    pairs = [Pair("0-0-1", "p0", " a", " b"), Pair("0-0-2", "p0", " a", " c"), Pair("0-1-2", "p0", " b", " c")]
    standing = [label("0-0-1", "j", "B", scores=[0.1, 0.9]), label("0-0-2", "j", "tie", scores=[0.5, 0.5])]
    records, counts = build_records(pairs, standing, "majority", "drop", {"generation": {"seed": 1}})
    assert len(records) == 1 and counts == {"ties_dropped": 1, "unlabelled": 1}
    record = records[0]
    assert (record["chosen"], record["rejected"]) == (" b", " a")
    assert record["scores"] == {"chosen": 0.9, "rejected": 0.1} and record["generation"] == {"seed": 1}
    kept, _ = build_records(pairs, standing, "majority", "keep", {})
    assert [r["tie"] for r in kept] == [False, True]


def test_conversational_records_use_assistant_messages():
    prompt = [{"role": "user", "content": "Review it."}]
    records, _ = build_records([Pair("0-0-1", prompt, " Great. ", "Bad.")], [label("0-0-1", "x", "A")], "majority", "drop", {})
    assert records[0]["chosen"] == [{"role": "assistant", "content": "Great."}]


def test_several_annotators_majority_or_all():
    pairs = [Pair("0-0-1", "p", " a", " b")]
    standing = [label("0-0-1", "x", "A"), label("0-0-1", "y", "A"), label("0-0-1", "z", "B")]
    records, _ = build_records(pairs, standing, "majority", "drop", {})
    assert len(records) == 1 and records[0]["votes"] == 3 and records[0]["annotator"] == "x,y,z"
    every, _ = build_records(pairs, standing, "all", "drop", {})
    assert [r["chosen"] for r in every] == [" a", " a", " b"]
    split, counts = build_records(pairs, standing[1:], "majority", "drop", {})
    assert split == [] and counts == {"no_majority": 1}


def test_cohen_kappa_hand_computed():
    # agree on 4 of 6 (p_o = 2/3); each rater says A half the time (p_e = 1/2); kappa = (2/3 - 1/2) / (1/2) = 1/3
    assert cohen_kappa(list("AAABBB"), list("AABBBA")) == pytest.approx(1 / 3)
    assert cohen_kappa(list("AB"), list("AB")) == pytest.approx(1.0)
    assert cohen_kappa(list("AA"), list("AA")) is None  # chance agreement is total: undefined
    # 3 categories: p_o = 3/5; marginals x: A2 B2 t1, y: A2 B1 t2 -> p_e = (4 + 2 + 2) / 25 = 0.32
    assert cohen_kappa(["A", "A", "B", "B", "tie"], ["A", "B", "B", "tie", "tie"]) == pytest.approx((0.6 - 0.32) / 0.68)


def test_agreement_over_shared_decided_pairs():
    standing = [label(f"p{i}", "x", c) for i, c in enumerate("AAABBB")] + [label(f"p{i}", "y", c) for i, c in enumerate("AABBBA")]
    standing += [label("p9", "x", "A"), label("p8", "y", "skip")]
    rows = agreement(standing)
    assert rows == [{"annotators": ["x", "y"], "overlap": 6, "percent_agreement": pytest.approx(66.666, abs=1e-2), "cohen_kappa": pytest.approx(1 / 3)}]


def test_position_and_length_bias():
    pairs = [Pair(f"{i}-0-1", "p", " short", " a much longer answer") for i in range(4)]
    standing = [
        label("0-0-1", "x", "A", swapped=False),  # left chosen
        label("1-0-1", "x", "B", swapped=True),  # B shown left, chosen: left
        label("2-0-1", "x", "B", swapped=False),  # right chosen
        label("3-0-1", "x", "skip"),
    ]
    records, counts = build_records(pairs, standing, "majority", "drop", {})
    stats = preference_stats(pairs, standing, records, counts)
    assert stats["position_bias"]["shown_left_chosen_rate"] == pytest.approx(2 / 3)
    assert stats["position_bias"]["first_sample_chosen_rate"] == pytest.approx(1 / 3)
    assert stats["length_bias"]["chosen_longer_rate"] == pytest.approx(2 / 3)
    assert stats["skips"] == 1 and stats["per_annotator"] == {"x": {"A": 1, "B": 2, "skip": 1}}


def test_spearman_hand_computed():
    from dpo_cli.data.prefs import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)  # 1 - 6 * (0 + 0 + 1 + 1) / (4 * 15)
    # ties share the mean rank: x ranks 1, 2.5, 2.5, 4 -> covariance 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
