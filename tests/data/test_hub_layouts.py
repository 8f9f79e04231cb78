"""Datasets laid out as the hub has them: TRL's standard and conversational formats, HuggingFaceH4's
UltraFeedback, Anthropic HH, OpenAI-style messages, ShareGPT, save_to_disk folders and DatasetDicts, split
files; read alike by sft, dpo, rm-train, score and collect-prefs import."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

from helpers import preference_rows, read_jsonl, write_jsonl, write_recipe
from dpo_cli.data.loading import DataReport, encode_rows, load_splits
from dpo_cli.data.encoding import sft_encoder, sft_format
from dpo_cli.core.errors import UserError
from dpo_cli.losses import IGNORE_INDEX
from dpo_cli.data.preference_pairs import pair_encoder, prepare_pairs
from dpo_cli.data.prefs_import import convert_rows, detect_format
from dpo_cli.core.recipes import DataSection

# ----------------------------------------------------------------------------- rows as the hub has them

QUESTION = "Name a good film about the sea."
H4_ROW = {  # HuggingFaceH4/ultrafeedback_binarized, split train_prefs
    "prompt": QUESTION,
    "prompt_id": "5c1d8e0b",
    "chosen": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Try The Last Harbour: the acting is superb."}],
    "rejected": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Films are dull."}],
    "messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Try The Last Harbour: the acting is superb."}],
    "score_chosen": 8.0,
    "score_rejected": 5.0,
}
TRL_TEXT = {"prompt": "The Last Harbour is a film", "chosen": " with superb acting.", "rejected": " that bores."}  # trl-lib standard
TRL_CHAT = {  # trl-lib conversational, explicit prompt
    "prompt": [{"role": "user", "content": QUESTION}],
    "chosen": [{"role": "assistant", "content": "The Last Harbour."}],
    "rejected": [{"role": "assistant", "content": "None."}],
}
TRL_IMPLICIT = {  # trl-lib conversational, implicit prompt
    "chosen": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "The Last Harbour."}],
    "rejected": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "None."}],
}
HH_ROW = {  # Anthropic/hh-rlhf
    "chosen": "\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: " + QUESTION + "\n\nAssistant: The Last Harbour is superb.",
    "rejected": "\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: " + QUESTION + "\n\nAssistant: I will not.",
}
SHAREGPT_PREFS = {  # LLaMA-Factory's ShareGPT preference format
    "conversations": [{"from": "system", "value": "You review films."}, {"from": "human", "value": QUESTION}],
    "chosen": {"from": "gpt", "value": "The Last Harbour."},
    "rejected": {"from": "gpt", "value": "None."},
}
SHAREGPT_SFT = {  # ShareGPT / OpenHermes style
    "conversations": [
        {"from": "system", "value": "You review films."},
        {"from": "human", "value": QUESTION},
        {"from": "gpt", "value": "The Last Harbour."},
    ]
}
OPENAI_MESSAGES = {"messages": [{"role": "system", "content": "You review films."}, {"role": "user", "content": QUESTION}, {"role": "assistant", "content": "The Last Harbour."}]}
TRL_PROMPT_COMPLETION = {"prompt": "The Last Harbour is", "completion": " a superb film."}
TRL_CHAT_COMPLETION = {"prompt": [{"role": "user", "content": QUESTION}], "completion": [{"role": "assistant", "content": "The Last Harbour."}]}

USER = {"role": "user", "content": QUESTION}
SYSTEM = {"role": "system", "content": "You review films."}
ANSWER, NONE = [{"role": "assistant", "content": "The Last Harbour."}], [{"role": "assistant", "content": "None."}]
PAIRS = {  # layout -> (row, the pair dpo trains on)
    "trl-standard": (TRL_TEXT, (TRL_TEXT["prompt"], TRL_TEXT["chosen"], TRL_TEXT["rejected"])),
    "trl-conversational": (TRL_CHAT, ([USER], ANSWER, NONE)),
    "trl-implicit-prompt": (TRL_IMPLICIT, ([USER], ANSWER, NONE)),
    "h4-ultrafeedback": (H4_ROW, ([USER], H4_ROW["chosen"][1:], H4_ROW["rejected"][1:])),
    "anthropic-hh": (HH_ROW, (HH_ROW["chosen"][: HH_ROW["chosen"].rindex("Assistant:") + 10], " The Last Harbour is superb.", " I will not.")),
    "sharegpt": (SHAREGPT_PREFS, ([SYSTEM, USER], ANSWER, NONE)),
}


def section(**values) -> DataSection:
    return DataSection(**{"train": "unused", **values})


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer with dpo-cli's default chat template, as sft and dpo install it."""
    from transformers import AutoTokenizer

    from dpo_cli.data.tokenization import ensure_chat_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ensure_chat_template(tokenizer, None)
    return tokenizer


def labelled_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])


def trained_pairs(path, tokenizer, **data) -> tuple[list[tuple], dict]:
    """What dpo and rm-train make of a data source: the normalised pairs and one encoded row."""
    rows, _ = load_splits(section(train=str(path), **data), seed=0, report=DataReport())
    pairs = prepare_pairs(rows, "data.train", DataReport(), "train")
    encoded = encode_rows(pairs, pair_encoder(tokenizer, 256, None), "data.train", section(), DataReport(), "train")
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in pairs], encoded[0]


def imported_pairs(path) -> list[dict]:
    """What collect-prefs import makes of the same source."""
    rows, _ = load_splits(section(train=str(path)), seed=0, report=DataReport())
    records, problems = convert_rows(rows, detect_format(rows.column_names), seed=0, stamp="t", source="test")
    assert not problems
    return records


# ----------------------------------------------------------------------------- preference layouts


@pytest.mark.parametrize("layout", PAIRS)
def test_preference_layouts_read_alike_for_dpo_rm_train_and_import(layout, tmp_path, chat_tokenizer):
    row, expected = PAIRS[layout]
    write_jsonl(tmp_path / "prefs.jsonl", [row, row])
    pairs, encoded = trained_pairs(tmp_path / "prefs.jsonl", chat_tokenizer)
    assert pairs[0] == expected
    chosen = expected[1] if isinstance(expected[1], str) else expected[1][-1]["content"]
    assert labelled_text(chat_tokenizer, encoded["chosen_input_ids"], encoded["chosen_labels"]).startswith(chosen)
    records = imported_pairs(tmp_path / "prefs.jsonl")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in records] == pairs
    write_jsonl(tmp_path / "imported.jsonl", records)  # what import writes, dpo reads as it is
    assert trained_pairs(tmp_path / "imported.jsonl", chat_tokenizer)[0] == pairs


def test_an_h4_prompt_that_disagrees_with_its_conversations_is_a_row_problem(tmp_path, chat_tokenizer):
    wrong = {**H4_ROW, "prompt": "Name a good film about the desert."}
    write_jsonl(tmp_path / "prefs.jsonl", [H4_ROW, wrong])
    with pytest.raises(UserError, match=r"data.train row 2: 'prompt' does not match the last user turn that chosen and rejected share"):
        trained_pairs(tmp_path / "prefs.jsonl", chat_tokenizer)
    rows, _ = load_splits(section(train=str(tmp_path / "prefs.jsonl")), seed=0, report=DataReport())
    records, problems = convert_rows(rows, detect_format(rows.column_names), seed=0, stamp="t", source="test")
    assert len(records) == 1 and problems[0][0] == 2 and "does not match" in problems[0][1]


def test_text_prompt_with_answers_only_is_still_refused(chat_tokenizer):
    row = {"prompt": QUESTION, "chosen": ANSWER, "rejected": NONE}
    encoded = pair_encoder(chat_tokenizer, 128, None)
    pairs = prepare_pairs(Dataset.from_list([row]), "data.train", DataReport(), "train")
    assert encoded(pairs[0])["problem"] == "prompt, chosen and rejected must all be text or all be lists of messages"


# ----------------------------------------------------------------------------- sft layouts

SFT = {  # layout -> (row, the assistant text trained on)
    "trl-prompt-completion": (TRL_PROMPT_COMPLETION, " a superb film."),
    "trl-conversational-prompt-completion": (TRL_CHAT_COMPLETION, "The Last Harbour."),
    "openai-messages-with-system": (OPENAI_MESSAGES, "The Last Harbour."),
    "sharegpt": (SHAREGPT_SFT, "The Last Harbour."),
}


@pytest.mark.parametrize("layout", SFT)
def test_sft_layouts_train_on_the_answer_only(layout, tmp_path, chat_tokenizer):
    row, answer = SFT[layout]
    write_jsonl(tmp_path / "train.jsonl", [row, row])
    rows, _ = load_splits(section(train=str(tmp_path / "train.jsonl")), seed=0, report=DataReport())
    encoded = encode_rows(rows, sft_encoder(chat_tokenizer, sft_format(rows.column_names), 256), "data.train", section(), DataReport(), "train")
    assert labelled_text(chat_tokenizer, encoded[0]["input_ids"], encoded[0]["labels"]).startswith(answer)
    if layout == "sharegpt":
        assert rows[0]["messages"][:2] == [SYSTEM, USER]


def test_a_sharegpt_speaker_that_is_not_known_names_the_row(tmp_path, chat_tokenizer):
    odd = {"conversations": [{"from": "narrator", "value": "Once."}, {"from": "gpt", "value": "Yes."}]}
    write_jsonl(tmp_path / "train.jsonl", [SHAREGPT_SFT, odd])
    rows, _ = load_splits(section(train=str(tmp_path / "train.jsonl")), seed=0, report=DataReport())
    with pytest.raises(UserError, match=r"data.train row 2: messages\[0\].role 'narrator' is not one of"):
        encode_rows(rows, sft_encoder(chat_tokenizer, "messages", 256), "data.train", section(), DataReport(), "train")


# ----------------------------------------------------------------------------- file types

WRITERS = {
    "jsonl": lambda ds, path: ds.to_json(path),
    "json": lambda ds, path: path.write_text(json.dumps(ds.to_list())),
    "parquet": lambda ds, path: ds.to_parquet(path),
    "csv": lambda ds, path: ds.to_csv(path, index=False),
}


@pytest.mark.parametrize("suffix", WRITERS)
def test_every_file_type_carries_the_preference_layouts(suffix, tmp_path, chat_tokenizer):
    row = TRL_TEXT if suffix == "csv" else H4_ROW  # CSV holds text columns only
    WRITERS[suffix](Dataset.from_list([row, row]), tmp_path / f"prefs.{suffix}")
    pairs, _ = trained_pairs(tmp_path / f"prefs.{suffix}", chat_tokenizer)
    assert pairs[0] == (PAIRS["trl-standard"] if suffix == "csv" else PAIRS["h4-ultrafeedback"])[1]


# ----------------------------------------------------------------------------- save_to_disk and splits


def split_rows(name: str, n: int = 3) -> list[dict]:
    return [{"prompt": f"{name} {i}", "completion": f" answer {i}"} for i in range(n)]


def test_a_folder_written_by_save_to_disk_loads_and_stays_as_it_was(tmp_path):
    Dataset.from_list(split_rows("train")).save_to_disk(tmp_path / "saved")
    before = sorted(p.name for p in (tmp_path / "saved").iterdir())
    train, _ = load_splits(section(train=str(tmp_path / "saved")), seed=0, report=DataReport())
    assert train["prompt"] == ["train 0", "train 1", "train 2"]
    train.map(lambda row: {"more": 1})  # later steps write their caches elsewhere, never into the user's folder
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == before


def test_a_saved_dataset_dict_gives_the_split_named_by_data_split(tmp_path):
    DatasetDict({"train": Dataset.from_list(split_rows("train")), "test": Dataset.from_list(split_rows("test", 2))}).save_to_disk(tmp_path / "dd")
    folder = str(tmp_path / "dd")
    train, evaluation = load_splits(section(train=folder, eval=folder, eval_split="test"), seed=0, report=DataReport())
    assert train["prompt"][0] == "train 0" and evaluation["prompt"] == ["test 0", "test 1"]
    train, _ = load_splits(section(train=folder, split="test"), seed=0, report=DataReport())
    assert len(train) == 2
    with pytest.raises(UserError, match=r"data.train: .*dd is a DatasetDict saved with save_to_disk with the splits train, test, but no split 'validation'; set data.split"):
        load_splits(section(train=folder, split="validation"), seed=0, report=DataReport())
    with pytest.raises(UserError, match=r"data.eval: .*but no split 'dev'; set data.eval_split to one of them"):
        load_splits(section(train=folder, eval=folder, eval_split="dev"), seed=0, report=DataReport())


def test_a_glob_over_the_splits_of_a_saved_dataset_dict_is_refused(tmp_path):
    DatasetDict({"train": Dataset.from_list(split_rows("train")), "test": Dataset.from_list(split_rows("test"))}).save_to_disk(tmp_path / "dd")
    with pytest.raises(UserError, match=r"matches files of several splits: test \(1 file\), train \(1 file\); to use one split, set data.train to the folder .*dd and data.split"):
        load_splits(section(train=str(tmp_path / "dd" / "**" / "*.arrow")), seed=0, report=DataReport())
    shard = tmp_path / "dd" / "train" / "data-00000-of-00001.arrow"
    (shard.parent / "cache-0123.arrow").write_bytes(shard.read_bytes())  # what a map over the loaded dataset leaves
    train, _ = load_splits(section(train=str(tmp_path / "dd" / "train" / "*")), seed=0, report=DataReport())  # one split: its shards only
    assert train["prompt"] == ["train 0", "train 1", "train 2"]


HUB_LAYOUTS = {
    "sharded-parquet": ("data/{split}-00000-of-00001.parquet", "train", "test"),
    "split-named-files": ("{split}.jsonl", "train", "test"),
    "split-folders": ("{split}/rows.jsonl", "train", "validation"),
    "h4-split-names": ("data/{split}-00000-of-00001.parquet", "train_prefs", "test_prefs"),
}


@pytest.mark.parametrize("layout", HUB_LAYOUTS)
def test_a_folder_laid_out_like_a_hub_dataset_gives_data_split(layout, tmp_path):
    pattern, first, second = HUB_LAYOUTS[layout]
    for split, n in ((first, 3), (second, 2)):
        path = tmp_path / "repo" / pattern.format(split=split)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds = Dataset.from_list(split_rows(split, n))
        ds.to_parquet(path) if path.suffix == ".parquet" else ds.to_json(path)
    (tmp_path / "repo" / "README.md").write_text("# a dataset card\n")
    folder = str(tmp_path / "repo")
    train, evaluation = load_splits(section(train=folder, split=first, eval=folder, eval_split=second), seed=0, report=DataReport())
    assert set(train["prompt"]) == {f"{first} {i}" for i in range(3)} and len(evaluation) == 2
    if first != "train":
        with pytest.raises(UserError, match=rf"is a folder laid out like a hub dataset with the splits .*{first}.*, but no split 'train'; set data.split"):
            load_splits(section(train=folder), seed=0, report=DataReport())
    files = str(tmp_path / "repo" / "**" / f"*{pattern[pattern.rindex('.'):]}")
    with pytest.raises(UserError, match=r"matches files of several splits: .*; to use one split, set data.train to the folder .*repo"):
        load_splits(section(train=files, split=first), seed=0, report=DataReport())


def test_a_folder_of_one_split_loads_every_file_as_before(tmp_path):
    write_jsonl(tmp_path / "a" / "reviews.jsonl", split_rows("r"))
    write_jsonl(tmp_path / "a" / "more.jsonl", split_rows("m"))
    Dataset.from_list(split_rows("train")).to_parquet(tmp_path / "b" / "data" / "train-00000-of-00002.parquet")
    Dataset.from_list(split_rows("train")).to_parquet(tmp_path / "b" / "data" / "train-00001-of-00002.parquet")
    assert len(load_splits(section(train=str(tmp_path / "a")), seed=0, report=DataReport())[0]) == 6
    assert len(load_splits(section(train=str(tmp_path / "b"), split="validation"), seed=0, report=DataReport())[0]) == 6
    assert len(load_splits(section(train=str(tmp_path / "a" / "*.jsonl")), seed=0, report=DataReport())[0]) == 6
    Dataset.from_list(split_rows("one", 2)).save_to_disk(tmp_path / "one")
    Dataset.from_list(split_rows("two", 1)).save_to_disk(tmp_path / "two")
    listed = section(train=[str(tmp_path / "one"), str(tmp_path / "two")])
    assert load_splits(listed, seed=0, report=DataReport())[0]["prompt"] == ["one 0", "one 1", "two 0"]


# ----------------------------------------------------------------------------- score


def test_score_reads_prompt_completion_pairs_and_mapped_columns(tmp_path, cli, tiny_reward_model_dir):
    write_jsonl(tmp_path / "completions.jsonl", [TRL_PROMPT_COMPLETION, {**TRL_PROMPT_COMPLETION, "completion": " dull."}])
    code, _, err = cli("score", tiny_reward_model_dir, "--data", tmp_path / "completions.jsonl", "--out", tmp_path / "a.jsonl")
    assert code == 0, err
    assert [set(r) for r in read_jsonl(tmp_path / "a.jsonl")] == [{"prompt", "completion", "score"}] * 2
    write_jsonl(tmp_path / "chat.jsonl", [TRL_CHAT_COMPLETION])
    code, _, err = cli("score", tiny_reward_model_dir, "--data", tmp_path / "chat.jsonl", "--out", tmp_path / "b.jsonl")
    assert code == 0, err
    write_jsonl(tmp_path / "h4.jsonl", [H4_ROW])
    code, _, err = cli("score", tiny_reward_model_dir, "--data", tmp_path / "h4.jsonl", "--out", tmp_path / "c.jsonl")
    assert code == 0, err
    assert {"chosen_score", "rejected_score", "prompt_id"} <= set(read_jsonl(tmp_path / "c.jsonl")[0])
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "A film?", "answer": " Superb."}])
    code, _, err = cli("score", tiny_reward_model_dir, "--data", tmp_path / "qa.jsonl", "--out", tmp_path / "d.jsonl")
    assert code == 1 and "--column prompt=question" in err and "data.columns" not in err
    args = ("--column", "prompt=question", "--column", "response=answer")
    code, _, err = cli("score", tiny_reward_model_dir, "--data", tmp_path / "qa.jsonl", "--out", tmp_path / "d.jsonl", *args)
    assert code == 0, err
    assert set(read_jsonl(tmp_path / "d.jsonl")[0]) == {"prompt", "response", "score"}
    code, _, err = cli("score", tiny_reward_model_dir, "--data", tmp_path / "qa.jsonl", "--out", tmp_path / "e.jsonl", "--column", "prompt=query")
    assert code == 1 and "--column prompt=query: --data has no column 'query'" in err
    code, _, err = cli("score", tiny_reward_model_dir, "--data", tmp_path / "qa.jsonl", "--out", tmp_path / "e.jsonl", "--column", "prompt")
    assert code == 1 and "expected WANTED=THEIRS" in err


# ----------------------------------------------------------------------------- end to end (tiny model)


def run_stage(cli, tmp_path, stage, data, tiny_model_dir, **sections):
    recipe = {
        "stage": stage,
        "seed": 3,
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"max_length": 96, **data},
        "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "log_every": 1, "save_every": None},
        **sections,
    }
    code, _, err = cli(stage, write_recipe(tmp_path / f"{stage}.yaml", recipe), "--run-dir", tmp_path / "run")
    assert code == 0, err
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def test_h4_ultrafeedback_trains_dpo(tmp_path, cli, tiny_model_dir):
    write_jsonl(tmp_path / "h4.jsonl", [H4_ROW] * 6)
    summary = run_stage(cli, tmp_path, "dpo", {"train": "h4.jsonl", "eval": 2}, tiny_model_dir, dpo={"show_samples": 0})
    assert summary["status"] == "completed" and summary["data"]["rows"] == {"train": 4, "eval": 2}


def test_a_saved_dataset_dict_trains_sft_on_its_splits(tmp_path, cli, tiny_model_dir):
    DatasetDict({"train": Dataset.from_list(split_rows("train", 6)), "test": Dataset.from_list(split_rows("test", 2))}).save_to_disk(tmp_path / "dd")
    data = {"train": "dd", "eval": "dd", "eval_split": "test"}
    summary = run_stage(cli, tmp_path, "sft", data, tiny_model_dir, sft={"show_samples": 0})
    assert summary["status"] == "completed" and summary["data"]["rows"] == {"train": 6, "eval": 2}


def test_sharegpt_trains_sft(tmp_path, cli, tiny_model_dir):
    write_jsonl(tmp_path / "sharegpt.jsonl", [SHAREGPT_SFT] * 4)
    summary = run_stage(cli, tmp_path, "sft", {"train": "sharegpt.jsonl"}, tiny_model_dir, sft={"show_samples": 0})
    assert summary["status"] == "completed" and summary["data_format"] == "conversational"


def test_anthropic_hh_trains_rm_train(tmp_path, cli, tiny_model_dir):
    write_jsonl(tmp_path / "hh.jsonl", [HH_ROW] * 6)
    summary = run_stage(cli, tmp_path, "rm-train", {"train": "hh.jsonl", "eval": 2}, tiny_model_dir)
    assert summary["status"] == "completed" and "eval_accuracy" in summary


def test_a_file_named_for_a_split_beside_others_is_not_mixed_into_training(tmp_path):
    """prefs.jsonl + eval.jsonl: `eval` names the test split, so data.split=train takes prefs.jsonl alone."""
    from dpo_cli.data.loading import DataReport, load_splits
    from dpo_cli.core.recipes import DataSection

    write_jsonl(tmp_path / "data" / "prefs.jsonl", preference_rows(6))
    write_jsonl(tmp_path / "data" / "eval.jsonl", preference_rows(2, seed=9))
    train, _ = load_splits(DataSection(train=str(tmp_path / "data")), 0, DataReport())
    assert len(train) == 6
    evaluation, _ = load_splits(DataSection(train=str(tmp_path / "data"), split="test"), 0, DataReport())
    assert len(evaluation) == 2
