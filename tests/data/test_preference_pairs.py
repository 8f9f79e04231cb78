"""Preference pairs as model inputs: the TRL tokenisation convention, truncation, row checks, collation."""

from __future__ import annotations

from datasets import Dataset

from dpo_cli.data.encoding import divergence
from dpo_cli.losses import IGNORE_INDEX
from dpo_cli.data.preference_pairs import collate_pairs, drop_ties, normalize_pairs, pair_encoder, collate_shared_pairs, shared_prefix
from dpo_cli.data.tokenization import DEFAULT_CHAT_TEMPLATE

PAIR = {"prompt": "The Last Road is a drama.", "chosen": " The acting is superb.", "rejected": " Dull."}


def test_plain_pairs_follow_the_convention(tiny_tokenizer):
    out = pair_encoder(tiny_tokenizer, 128, None)(PAIR)
    prompt_ids = tiny_tokenizer(PAIR["prompt"], add_special_tokens=False)["input_ids"]
    for side in ("chosen", "rejected"):
        ids, labels = out[f"{side}_input_ids"], out[f"{side}_labels"]
        full = tiny_tokenizer(PAIR["prompt"] + PAIR[side], add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
        start = divergence(prompt_ids, full)
        assert ids == full  # no extra special tokens; EOS appended
        assert labels == [IGNORE_INDEX] * start + full[start:]
    assert not out["problem"] and not out["truncated"] and not out["emptied"]


def test_conversational_pairs_use_the_template(tiny_tokenizer):
    tiny_tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    row = {
        "prompt": [{"role": "user", "content": "Review it."}],
        "chosen": [{"role": "assistant", "content": "Superb."}],
        "rejected": [{"role": "assistant", "content": "Dull."}],
    }
    out = pair_encoder(tiny_tokenizer, 128, None)(row)
    labelled = tiny_tokenizer.decode([t for t, l in zip(out["chosen_input_ids"], out["chosen_labels"]) if l != IGNORE_INDEX])
    assert labelled == f"Superb.{tiny_tokenizer.eos_token}\n"


def test_truncation_cuts_prompt_left_and_completion_right(tiny_tokenizer):
    row = {"prompt": "one two three four five six seven eight", "chosen": " nine ten eleven twelve", "rejected": " no"}
    full = pair_encoder(tiny_tokenizer, 512, None)(row)
    prompt_len = full["chosen_labels"].count(IGNORE_INDEX)
    out = pair_encoder(tiny_tokenizer, 7, 4)(row)  # 4 prompt tokens + 3 completion tokens
    ids, labels = out["chosen_input_ids"], out["chosen_labels"]
    assert out["truncated"] and len(ids) == 7 and labels[:4] == [IGNORE_INDEX] * 4
    assert ids[:4] == full["chosen_input_ids"][prompt_len - 4 : prompt_len]  # the end of the prompt is kept
    assert ids[4:] == full["chosen_input_ids"][prompt_len : prompt_len + 3]  # the start of the completion
    emptied = pair_encoder(tiny_tokenizer, prompt_len, None)(row)
    assert emptied["emptied"]  # the prompt fills the budget: dropped, never trained on


def test_bad_rows_are_named(tiny_tokenizer):
    encode = pair_encoder(tiny_tokenizer, 128, None)
    assert encode({"prompt": "p", "chosen": " a"})["problem"] == "'rejected' is missing"
    assert encode({"prompt": "p", "chosen": " a", "rejected": " a"})["problem"] == "'chosen' and 'rejected' are the same"
    assert encode({"prompt": "p", "chosen": " ", "rejected": " a"})["problem"] == "'chosen' is empty"
    messages = [{"role": "user", "content": "x"}]
    assert "must all be text or all be lists" in encode({"prompt": messages, "chosen": " a", "rejected": " b"})["problem"]
    wrong_role = {"prompt": messages, "chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    assert encode(wrong_role)["problem"] == "chosen and rejected must end with an assistant message"
    ends_with_answer = {"prompt": [{"role": "assistant", "content": "x"}], "chosen": wrong_role["rejected"], "rejected": [{"role": "assistant", "content": "c"}]}
    assert "the prompt ends with an assistant turn" in encode(ends_with_answer)["problem"]


def test_collate_puts_chosen_then_rejected_in_one_batch():
    rows = [
        {"chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3], "rejected_input_ids": [1, 4], "rejected_labels": [-100, 4]},
        {"chosen_input_ids": [5, 6], "chosen_labels": [-100, 6], "rejected_input_ids": [5, 7, 8, 9], "rejected_labels": [-100, 7, 8, 9]},
    ]
    batch = collate_pairs(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [5, 6, 0, 0], [1, 4, 0, 0], [5, 7, 8, 9]]
    assert batch["labels"][1].tolist() == [-100, 6, -100, -100]
    assert batch["num_items"] == 2 and batch["num_tokens"] == 11
    with_ref = collate_pairs([{**r, "ref_chosen_logps": -1.0 - i, "ref_rejected_logps": -3.0 - i} for i, r in enumerate(rows)], 0)
    assert with_ref["ref_logps"].tolist() == [-1.0, -2.0, -3.0, -4.0]


def test_implicit_prompts_and_ties():
    ds = Dataset.from_list([{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go.", "tie": False}])
    split = normalize_pairs(ds)
    assert split[0]["prompt"] == "\n\nHuman: Hi\n\nAssistant:" and split[0]["chosen"] == " Hello."
    kept, ties = drop_ties(Dataset.from_list([{"tie": False}, {"tie": True}, {"tie": False}]))
    assert len(kept) == 2 and ties == 1


def test_unreadable_rows_before_readable_ones_are_dropped_and_counted(tiny_tokenizer):
    """More unreadable rows than one write batch (1000) before the first readable one still give a column
    of messages, and with data.bad_rows: drop only the readable rows are trained on."""
    from dpo_cli.data.loading import DataReport, encode_rows
    from dpo_cli.data.preference_pairs import prepare_pairs
    from dpo_cli.core.recipes import DataSection

    tiny_tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    ask = [{"role": "user", "content": "A film?"}]
    good = {"prompt": "A film?", "chosen": ask + [{"role": "assistant", "content": "Yes."}], "rejected": ask + [{"role": "assistant", "content": "No."}]}
    same = {**good, "rejected": good["chosen"]}
    report = DataReport()
    pairs = prepare_pairs(Dataset.from_list([same] * 1001 + [good] * 2), "data.train", report, "train")
    assert pairs[0]["prompt"] == [] and pairs[-1]["prompt"] == ask
    out = encode_rows(pairs, pair_encoder(tiny_tokenizer, 128, None), "data.train", DataSection(train="x", bad_rows="drop"), report, "train")
    assert len(out) == 2 and report.dropped == {"train/malformed": 1001}


def test_shared_prompt_rows_hold_the_prompt_once_with_positions_restarting_for_the_rejected_completion():
    rows = [
        # prompt [1, 2]; the completions start alike ([3]): shared only up to the first trained token
        {"chosen_input_ids": [1, 2, 3, 4], "chosen_labels": [-100, -100, 3, 4], "rejected_input_ids": [1, 2, 3, 5, 6], "rejected_labels": [-100, -100, 3, 5, 6]},
        # a prompt whose last token the chosen completion merged into (tokenised apart): shared [7] only
        {"chosen_input_ids": [7, 9], "chosen_labels": [-100, 9], "rejected_input_ids": [7, 8, 10], "rejected_labels": [-100, -100, 10]},
    ]
    batch = collate_shared_pairs(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 3, 5, 6], [7, 9, 8, 10, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 1, 2, 0, 0, 0]]
    assert batch["segments"].tolist() == [[0, 0, 1, 1, 2, 2, 2], [3, 4, 5, 5, -1, -1, -1]]  # 3k: pair k's prompt, 3k+1, 3k+2
    assert batch["labels"].tolist() == [[-100, -100, 3, 4, 3, 5, 6], [-100, 9, -100, 10, -100, -100, -100]]
    assert batch["num_items"] == 2 and batch["num_tokens"] == 4 + 5 + 2 + 3  # as two rows each would count


def test_shared_prefix_is_the_common_untrained_beginning():
    assert shared_prefix([1, 2, 3], [1, 2, 4], [-100, -100, 3], [-100, -100, 4]) == 2
    assert shared_prefix([1, 2, 3], [1, 2, 3, 4], [-100, 2, 3], [-100, -100, 3, 4]) == 1
    assert shared_prefix([5, 2], [1, 2], [-100, 2], [-100, 2]) == 0


def test_short_pairs_share_a_row_as_long_as_the_longest():
    pair = lambda first, n: {"chosen_input_ids": [first] + [1] * n, "chosen_labels": [-100] + [1] * n, "rejected_input_ids": [first, 2], "rejected_labels": [-100, 2]}  # noqa: E731
    batch = collate_shared_pairs([pair(5, 1), pair(6, 7), pair(7, 1)], pad_id=0)  # 3, 9 and 3 tokens, prompt once
    assert batch["input_ids"].tolist() == [[6, 1, 1, 1, 1, 1, 1, 1, 2], [5, 1, 2, 7, 1, 2, 0, 0, 0]]
    assert batch["segments"][1].tolist() == [0, 1, 2, 6, 7, 8, -1, -1, -1]
    assert batch["position_ids"][1].tolist() == [0, 1, 1, 0, 1, 1, 0, 0, 0]
