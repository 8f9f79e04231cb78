"""Weighted data mixtures: shares by largest remainders, rows drawn with the seed (whole passes before any
row repeats), sources with their own columns, streamed sources read only as far as needed, the mixture in the
summary."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from dpo_cli.data.mixture import draw, mixture_counts
from helpers import write_jsonl


def test_mixture_counts_by_hand():
    # 100 and 50 rows at 0.7 / 0.3: the second runs out first at 50 / 0.3 = 166.7, the first at 142.9 -> 142 rows
    assert mixture_counts([100, 50], [0.7, 0.3], None) == [99, 43]  # 99.4 and 42.6: the larger remainder gets the odd row
    assert mixture_counts([100, 50], [7, 3], 10) == [7, 3]
    assert mixture_counts([5, 5, 5], [1, 1, 1], 10) == [4, 3, 3]  # equal remainders: the first source
    assert mixture_counts([None, 40], [1, 3], 20) == [5, 15]
    with pytest.raises(ValueError):
        mixture_counts([None, 40], [1, 3], None)


def test_draw_repeats_a_row_only_after_a_whole_pass():
    generator = torch.Generator().manual_seed(0)
    assert sorted(draw(10, 10, generator)) == list(range(10))
    few = draw(10, 4, generator)
    assert len(set(few)) == 4
    many = Counter(draw(10, 25, generator))
    assert set(many) == set(range(10)) and set(many.values()) <= {2, 3} and sum(many.values()) == 25


def rows(name: str, n: int, text_column: str = "completion") -> list[dict]:
    return [{"prompt": f"{name} prompt {i}", text_column: f"{name} answer {i}", "origin": name} for i in range(n)]


def test_a_weighted_mixture_of_sources_with_their_own_columns_runs_and_is_in_the_summary(tmp_path, cli, sft_recipe):
    write_jsonl(tmp_path / "a.jsonl", rows("a", 60))
    write_jsonl(tmp_path / "b.jsonl", rows("b", 12, text_column="answer"))
    train = [{"path": "a.jsonl", "weight": 0.75}, {"path": "b.jsonl", "weight": 0.25, "columns": {"completion": "answer"}}]
    recipe = sft_recipe(data={"train": train, "mixture_rows": 40, "eval": None}, train={"max_steps": 2})
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert "data.train mixture:" in err
    mixture = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]["mixture"]
    assert [(m["rows"], m["available"], m["repeated"]) for m in mixture] == [(30, 60, False), (10, 12, False)]
    assert mixture[0]["source"] == str(tmp_path / "a.jsonl") and mixture[1]["share"] == 0.25


def test_mixed_rows_follow_the_seed_and_the_shares(tmp_path):
    from dpo_cli.core.sections import DataSection
    from dpo_cli.data.loading import DataReport, load_splits

    write_jsonl(tmp_path / "a.jsonl", rows("a", 20))
    write_jsonl(tmp_path / "b.jsonl", rows("b", 5))
    cfg = DataSection(train=[{"path": str(tmp_path / "a.jsonl"), "weight": 1}, {"path": str(tmp_path / "b.jsonl"), "weight": 1}], mixture_rows=16)
    first, _ = load_splits(cfg, 1, DataReport())
    again, _ = load_splits(cfg, 1, DataReport())
    other, _ = load_splits(cfg, 2, DataReport())
    assert Counter(first["origin"]) == {"a": 8, "b": 8}  # b's 5 rows: one whole pass, then 3 more
    assert Counter(Counter(r for r, o in zip(first["prompt"], first["origin"]) if o == "b").values()) == {2: 3, 1: 2}
    assert first["prompt"] == again["prompt"] and first["prompt"] != other["prompt"]
    assert first["origin"][:8] != ["a"] * 8  # shuffled together, not one source after the other
    report = DataReport()
    unsized, _ = load_splits(DataSection(train=[str(tmp_path / "a.jsonl"), {"path": str(tmp_path / "b.jsonl"), "weight": 3}]), 1, report)
    # unsized: b's 5 rows at a share of 3/4 allow 6 rows in all without a repeat; 1.5 and 4.5 -> 2 and 4 (a tie: the first)
    assert Counter(unsized["origin"]) == {"a": 2, "b": 4}
    assert report.mixture[1]["repeated"] is False


def test_a_streamed_source_reads_only_what_the_mixture_takes(tmp_path):
    from dpo_cli.core.sections import DataSection
    from dpo_cli.data.loading import DataReport, load_splits

    write_jsonl(tmp_path / "big.jsonl", rows("big", 300))
    write_jsonl(tmp_path / "small.jsonl", rows("small", 10))
    report = DataReport()
    cfg = DataSection(train=[{"path": str(tmp_path / "big.jsonl"), "streaming": True}, {"path": str(tmp_path / "small.jsonl")}], mixture_rows=12)
    mixed, _ = load_splits(cfg, 0, report)
    assert Counter(mixed["origin"]) == {"big": 6, "small": 6}
    assert report.mixture[0] == {**report.mixture[0], "streamed": True, "available": 6, "rows": 6}


def test_bad_mixtures_are_one_line(tmp_path, cli, sft_recipe):
    write_jsonl(tmp_path / "a.jsonl", rows("a", 10))
    cases = [
        ({"train": "a.jsonl", "mixture_rows": 5}, "data.mixture_rows sizes a weighted mixture"),
        ({"train": [{"path": "a.jsonl", "weight": 0}]}, "weight"),
        ({"train": [{"path": "org/some-dataset", "streaming": True}, {"path": "a.jsonl"}]}, "data.train[0]: a streamed source needs a size"),
        ({"train": [{"path": "a.jsonl"}, {"path": "org/not-cached-here", "weight": 2}]}, "data.train[1]: cannot load 'org/not-cached-here'"),
    ]
    for data, message in cases:
        code, _, err = cli("sft", sft_recipe(data={**data, "eval": None}), "--run-dir", tmp_path / "run")
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (data, err)
        assert not (tmp_path / "run").exists()


def test_a_streamed_source_gets_its_column_mapping_and_repeats_never_leak_into_eval(tmp_path):
    from dpo_cli.core.sections import DataSection
    from dpo_cli.data.loading import DataReport, load_splits
    from dpo_cli.data.mixture import SOURCE
    from dpo_cli.data.loading import ROW_NUMBER

    write_jsonl(tmp_path / "plain.jsonl", rows("plain", 10))
    write_jsonl(tmp_path / "other.jsonl", [{"question": f"q{i}", "answer": f"a{i}", "origin": "other"} for i in range(4)])
    streamed = {"path": str(tmp_path / "other.jsonl"), "streaming": True, "max_rows": 4, "columns": {"prompt": "question", "completion": "answer"}}
    cfg = DataSection(train=[str(tmp_path / "plain.jsonl"), streamed], mixture_rows=16, eval=4)
    train, evaluation = load_splits(cfg, 0, DataReport())
    assert {"prompt", "completion"} <= set(train.column_names)
    assert any(p.startswith("q") for p in list(train["prompt"]) + list(evaluation["prompt"]))
    held_out = set(zip(evaluation[SOURCE], evaluation[ROW_NUMBER]))
    assert not held_out & set(zip(train[SOURCE], train[ROW_NUMBER]))  # "other" gave 8 rows from 4: each twice
