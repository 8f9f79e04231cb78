"""KTO's unpaired examples: TRL's prompt/completion/label rows, pairs split into two examples, the mismatched
completion each row is given for the KL estimate, and the row checks."""

from __future__ import annotations

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from helpers import preference_rows, write_jsonl
from dpo_cli.data.loading import DataReport
from dpo_cli.data.preference_pairs import collate_shared_pairs, sequence_ids
from dpo_cli.data.unpaired import check_example, example_encoder, prepare_examples, weight_note


def unpaired_rows(n: int, seed: int = 0) -> list[dict]:
    """TRL's unpaired layout: the positive continuation desirable, the negative one not, alternating."""
    return [
        {"prompt": pair["prompt"], "completion": pair["chosen"] if i % 2 == 0 else pair["rejected"], "label": i % 2 == 0}
        for i, pair in enumerate(preference_rows(n, seed))
    ]


def test_each_example_is_given_another_rows_completion_by_a_seeded_cycle():
    rows = unpaired_rows(9)
    prepared = prepare_examples(Dataset.from_list(rows), "data.train", DataReport(), "train", seed=3)
    completions, kl = prepared["completion"], prepared["kl_completion"]
    assert completions == [r["completion"] for r in rows] and prepared["label"] == [r["label"] for r in rows]
    assert all(k != c for k, c in zip(kl, completions))  # never its own
    assert sorted(kl) == sorted(completions)  # a cycle: every completion used once
    owner = {r["completion"]: r["prompt"] for r in rows}
    assert all(owner[k] != r["prompt"] for k, r in zip(kl, rows))  # always another prompt's
    again = prepare_examples(Dataset.from_list(rows), "data.train", DataReport(), "train", seed=3)
    other = prepare_examples(Dataset.from_list(rows), "data.train", DataReport(), "train", seed=4)
    assert again["kl_completion"] == kl and other["kl_completion"] != kl


def test_pairs_become_a_desirable_and_an_undesirable_example():
    pairs = preference_rows(4)
    prepared = prepare_examples(Dataset.from_list(pairs), "data.train", DataReport(), "train", seed=0)
    assert len(prepared) == 8 and sum(prepared["label"]) == 4
    assert prepared["completion"][:2] == [pairs[0]["chosen"], pairs[0]["rejected"]] and prepared["label"][:2] == [True, False]
    assert prepared["__row__"][:4] == [1, 1, 2, 2]  # an error names the pair's row in the file
    prompt_of = {c: p for p, c in zip(prepared["prompt"], prepared["completion"])}
    assert all(prompt_of[k] != p for p, k in zip(prepared["prompt"], prepared["kl_completion"]))  # not the same pair's other side


def test_the_mismatch_avoids_a_prompts_own_samples_and_degrades_gracefully():
    from dpo_cli.data.unpaired import mismatched

    prompts = ["a"] * 3 + ["b"] * 3 + ["c"] * 2 + ["d"]  # k samples per prompt, as thumbs labels them
    for seed in range(5):
        partner = mismatched(list(range(9)), prompts, seed)
        assert sorted(partner.values()) == list(range(9)) and all(prompts[r] != prompts[o] for r, o in partner.items())
    assert mismatched([0, 1, 2], ["a"] * 3, 0) != {0: 0, 1: 1, 2: 2}  # one prompt: another sample of it, never itself
    assert all(r != o for r, o in mismatched([0, 1, 2], ["a"] * 3, 0).items())
    assert mismatched([7], ["a"], 0) == {7: 7}


def test_a_long_mismatched_completion_never_refuses_its_row(tiny_tokenizer):
    row = {"prompt": "A film.", "completion": " Fine.", "kl_completion": " word" * 200, "label": True, "__problem__": ""}
    out = example_encoder(tiny_tokenizer, 32, None)(row)
    assert not out["truncated"] and not out["emptied"] and len(out["rejected_input_ids"]) == 32


def test_conversational_examples_use_the_chat_template(zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo("qwen2"))
    rows = [
        {"prompt": [{"role": "user", "content": f"Review film {i}."}], "completion": [{"role": "assistant", "content": text}], "label": i % 2 == 0}
        for i, text in enumerate(["Superb acting.", "Dull.", "A delight.", "Tedious."])
    ]
    prepared = prepare_examples(Dataset.from_list(rows), "data.train", DataReport(), "train", seed=0)
    encode = example_encoder(tokenizer, 128, None)
    for row in prepared:
        out = encode(row)
        assert not out["problem"] and out["desirable"] == row["label"]
        ids, start = sequence_ids(tokenizer, row["prompt"], row["completion"])
        assert out["chosen_input_ids"] == ids and out["chosen_labels"][start:] == ids[start:]
        assert tokenizer.decode(out["chosen_labels"][-2]) == "<|im_end|>"  # the turn's end is trained on
        kl_ids, _ = sequence_ids(tokenizer, row["prompt"], row["kl_completion"])
        assert out["rejected_input_ids"] == kl_ids
    batch = collate_shared_pairs([encode(row) for row in prepared], tokenizer.pad_token_id)
    assert batch["desirable"].tolist() == [True, False, True, False] and batch["num_items"] == 4


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"prompt": "A film.", "completion": " Fine.", "label": "yes"}, "'label' must be true (desirable) or false (undesirable), got 'yes'"),
        ({"prompt": "A film.", "completion": "  ", "label": True}, "'completion' is empty"),
        ({"prompt": [{"role": "user", "content": "Hi"}], "completion": " Fine.", "label": True}, "both be text or both be lists of messages"),
    ],
)
def test_a_bad_example_names_its_problem(row, problem):
    assert problem in check_example(row["prompt"], row["completion"], row["label"])
    assert check_example("A film.", " Fine.", False) is None


def test_the_weight_note_follows_the_papers_advice():
    assert weight_note(10, 10, 1.0, 1.0) == []
    assert weight_note(12, 10, 1.0, 1.0) == []
    note = weight_note(2, 10, 1.0, 1.0)
    assert len(note) == 1 and "dpo.desirable_weight in [5.00, 6.67]" in note[0]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "A film.", "completion": " Fine."}] * 4, "dpo.loss: kto reads prompt/completion/label rows (label true or false) or prompt/chosen/rejected pairs; found prompt, completion"),
        ([{**r, "label": True} for r in unpaired_rows(6)], "data.train: no undesirable (label: false) examples among 6; KTO learns from both kinds"),
        (unpaired_rows(6)[:2] + [{"prompt": "A film.", "completion": " Fine.", "label": "up"}] + unpaired_rows(6)[2:], "data.train row 3: 'label' must be true"),
    ],
)
def test_bad_kto_data_is_one_clear_line(rows, message, tmp_path, cli, dpo_recipe):
    write_jsonl(tmp_path / "examples.jsonl", rows)
    recipe = dpo_recipe(data={"train": "examples.jsonl", "eval": None}, dpo={"loss": "kto", "show_samples": 0}, train={"max_steps": 1})
    code, _, err = cli("dpo", recipe, "--run-dir", tmp_path / "run")
    assert code == 1 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
