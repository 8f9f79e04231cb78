"""Importing preference datasets: TRL, Anthropic HH, UltraFeedback, from small local fixtures."""

from __future__ import annotations

import pytest
from datasets import Dataset

from dpo_cli.core.errors import UserError
from dpo_cli.data.prefs_import import convert_rows, detect_format, from_hh


def convert(rows, fmt):
    return convert_rows(Dataset.from_list(rows), fmt, seed=0, stamp="t", source="test")


def test_detect_format():
    assert detect_format(["prompt", "chosen", "rejected"]) == "trl"
    assert detect_format(["chosen", "rejected"]) == "hh"
    assert detect_format(["instruction", "completions"]) == "ultrafeedback"
    with pytest.raises(UserError, match="cannot tell the preference format from the columns text"):
        detect_format(["text", "__row__"])


def test_trl_plain_and_conversational():
    records, problems = convert([{"prompt": "Q?", "chosen": " yes", "rejected": " no"}], "trl")
    assert not problems and (records[0]["prompt"], records[0]["chosen"], records[0]["rejected"]) == ("Q?", " yes", " no")
    messages = {
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    records, _ = convert([messages], "trl")
    assert records[0]["chosen"] == [{"role": "assistant", "content": "yes"}] and records[0]["labeler"] == "import:trl"


def test_hh_strings_split_at_the_last_shared_assistant_turn():
    row = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A film?\n\nAssistant: Try The Last Road.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A film?\n\nAssistant: No.",
    }
    prompt, chosen, rejected = from_hh(row)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A film?\n\nAssistant:"
    assert (chosen, rejected) == (" Try The Last Road.", " No.")


def test_hh_messages():
    shared = [{"role": "user", "content": "A film?"}]
    row = {"chosen": shared + [{"role": "assistant", "content": "Yes."}], "rejected": shared + [{"role": "assistant", "content": "No."}]}
    records, _ = convert([row], "hh")
    assert records[0]["prompt"] == shared and records[0]["rejected"] == [{"role": "assistant", "content": "No."}]


def test_ultrafeedback_binarised_by_score():
    row = {
        "instruction": "Name a film.",
        "completions": [
            {"response": "The Last Road.", "overall_score": 9.0},
            {"response": "No.", "overall_score": 2.0},
            {"response": "Maybe.", "overall_score": 5.0},
        ],
    }
    records, _ = convert([row], "ultrafeedback")
    assert records[0]["chosen"] == "The Last Road." and records[0]["rejected"] in ("No.", "Maybe.")
    assert records[0]["scores"]["chosen"] == 9.0
    again, _ = convert([row], "ultrafeedback")
    assert again[0]["rejected"] == records[0]["rejected"]  # seeded


def test_bad_rows_are_reported_with_their_number():
    rows = [
        {"prompt": "Q", "chosen": " a", "rejected": " b"},
        {"prompt": "Q", "chosen": " same", "rejected": " same"},
        {"prompt": "Q", "chosen": None, "rejected": " b"},
        {"prompt": "Q", "chosen": "  ", "rejected": " b"},
    ]
    records, problems = convert(rows, "trl")
    assert len(records) == 1
    assert problems == [(2, "'chosen' and 'rejected' are the same"), (3, "'chosen' is missing"), (4, "'chosen' is empty")]
    _, problems = convert([{"instruction": "Q", "completions": [{"response": "a", "overall_score": 1}, {"response": "b", "overall_score": 1}]}], "ultrafeedback")
    assert "same score" in problems[0][1]
