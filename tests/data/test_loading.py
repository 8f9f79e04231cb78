"""Data sources, column mapping, eval splits and row checks: clear errors naming file, line or row."""

from __future__ import annotations

import pytest
from datasets import Dataset

from helpers import write_jsonl
from dpo_cli.data.loading import DataReport, encode_rows, load_source, load_splits, rename_columns, require_columns
from dpo_cli.data.encoding import sft_encoder
from dpo_cli.core.errors import UserError
from dpo_cli.core.recipes import DataSection


def section(**values) -> DataSection:
    return DataSection(**{"train": "unused", **values})


ROWS = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(10)]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_local_formats(tmp_path, suffix):
    path = tmp_path / f"rows.{suffix}"
    ds = Dataset.from_list(ROWS)
    {"jsonl": lambda: ds.to_json(path), "json": lambda: ds.to_json(path), "csv": lambda: ds.to_csv(path), "parquet": lambda: ds.to_parquet(path)}[suffix]()
    loaded = load_source(str(path), section(), "data.train", "train")
    assert loaded["prompt"] == [r["prompt"] for r in ROWS]


def test_text_files_globs_folders_and_lists(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.txt").write_text("three\n")
    assert load_source(str(tmp_path / "*.txt"), section(), "data.train", "train")["text"] == ["one", "two", "three"]
    assert len(load_source(str(tmp_path), section(), "data.train", "train")) == 3
    assert len(load_source([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], section(), "data.train", "train")) == 3


def test_demo_source():
    rows = load_source("demo:sft?n=5", section(), "data.train", "train")
    assert len(rows) == 5 and set(rows.column_names) == {"prompt", "completion"}
    with pytest.raises(UserError, match="unknown demo dataset"):
        load_source("demo:nope", section(), "data.train", "train")


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(UserError, match=r"data.train: no file matches .*missing.jsonl"):
        load_source(str(tmp_path / "missing.jsonl"), section(), "data.train", "train")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty.jsonl is empty"):
        load_source(str(tmp_path / "empty.jsonl"), section(), "data.train", "train")


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    with pytest.raises(UserError, match=r"bad.jsonl line 2: invalid JSON"):
        load_source(str(path), section(), "data.train", "train")


def test_unreachable_hub_dataset_is_one_clear_error():
    with pytest.raises(UserError, match=r"cannot load 'no-such-org/no-such-dataset'"):
        load_source("no-such-org/no-such-dataset", section(), "data.train", "train")


def test_column_mapping(tmp_path):
    ds = Dataset.from_list([{"question": "q", "answer": "a"}])
    mapped = rename_columns(ds, {"prompt": "question", "completion": "answer"}, "data.train")
    assert mapped.column_names == ["prompt", "completion"]
    with pytest.raises(UserError, match="data.columns.prompt: data.train has no column 'query'"):
        rename_columns(ds, {"prompt": "query"}, "data.train")
    with pytest.raises(UserError, match="expected columns messages or prompt/completion, found question, answer"):
        require_columns(ds, [("messages",), ("prompt", "completion")], "data.train")


def test_eval_split_by_fraction_count_and_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "eval.jsonl", ROWS[:3])
    report = DataReport()
    train, evaluation = load_splits(section(train=str(tmp_path / "train.jsonl"), eval=0.2), seed=1, report=report)
    assert (len(train), len(evaluation)) == (8, 2) and report.rows == {"train": 8, "eval": 2}
    assert not set(train["prompt"]) & set(evaluation["prompt"])
    train, evaluation = load_splits(section(train=str(tmp_path / "train.jsonl"), eval=3), seed=1, report=DataReport())
    assert (len(train), len(evaluation)) == (7, 3)
    train, evaluation = load_splits(section(train=str(tmp_path / "train.jsonl"), eval=str(tmp_path / "eval.jsonl"), max_rows=4), seed=1, report=DataReport())
    assert (len(train), len(evaluation)) == (4, 3)
    with pytest.raises(UserError, match="leaves none to train on"):
        load_splits(section(train=str(tmp_path / "train.jsonl"), eval=10), seed=1, report=DataReport())


def test_bad_row_is_an_error_naming_the_row(tiny_tokenizer):
    ds = Dataset.from_list([{"prompt": "a", "completion": " b"}, {"prompt": "a", "completion": " b"}, {"prompt": "a", "completion": ""}])
    with pytest.raises(UserError, match=r"data.train row 3: 'completion' is empty"):
        encode_rows(ds, sft_encoder(tiny_tokenizer, "prompt_completion", 64), "data.train", section(), DataReport(), "train")


def test_bad_rows_dropped_and_counted_when_allowed(tiny_tokenizer):
    ds = Dataset.from_list([{"prompt": "a", "completion": " b"}, {"prompt": "a", "completion": ""}, {"prompt": "x", "completion": " y"}])
    report = DataReport()
    out = encode_rows(ds, sft_encoder(tiny_tokenizer, "prompt_completion", 64), "data.train", section(bad_rows="drop"), report, "train")
    assert len(out) == 2 and report.dropped == {"train/malformed": 1}


def test_long_rows_truncate_drop_or_error(tiny_tokenizer):
    long_row = {"prompt": "a", "completion": " the acting is superb and the story is great and the score is lovely"}
    ds = Dataset.from_list([{"prompt": "a", "completion": " b"}, long_row])
    encoder = sft_encoder(tiny_tokenizer, "prompt_completion", 10)
    report = DataReport()
    out = encode_rows(ds, encoder, "data.train", section(max_length=10), report, "train")
    assert len(out) == 2 and max(len(x) for x in out["input_ids"]) == 10 and report.truncated == {"train": 1}
    report = DataReport()
    assert len(encode_rows(ds, encoder, "data.train", section(max_length=10, truncation="drop"), report, "train")) == 1
    assert report.dropped == {"train/too_long": 1}
    with pytest.raises(UserError, match=r"data.train row 2: longer than data.max_length=10"):
        encode_rows(ds, encoder, "data.train", section(max_length=10, truncation="error"), DataReport(), "train")


def test_nothing_left_is_an_error(tiny_tokenizer):
    ds = Dataset.from_list([{"prompt": "a", "completion": ""}])
    with pytest.raises(UserError, match="no usable rows left"):
        encode_rows(ds, sft_encoder(tiny_tokenizer, "prompt_completion", 64), "data.train", section(bad_rows="drop"), DataReport(), "train")


def test_validate_refuses_local_data_paths_that_do_not_exist(cli, tmp_path):
    """Relative paths resolve against the recipe's folder, as the stages resolve them; hub ids and demo sets
    are not checked (offline)."""
    from helpers import write_recipe

    def validate(data: dict) -> tuple[int, str]:
        recipe = write_recipe(tmp_path / "recipes" / "sft.yaml", {"model": {"name_or_path": "Qwen/Qwen2.5-0.5B"}, "data": data})
        code, _, err = cli("validate", recipe)
        return code, err

    write_jsonl(tmp_path / "recipes" / "data" / "train.jsonl", ROWS)
    assert validate({"train": "data/train.jsonl", "eval": "data/*.jsonl"})[0] == 0
    assert validate({"train": "trl-lib/Capybara", "eval": "demo:sft"})[0] == 0
    code, err = validate({"train": "data/missing.jsonl"})
    assert code == 1 and f"data.train: {tmp_path / 'recipes' / 'data' / 'missing.jsonl'} does not exist" in err and "Traceback" not in err
    code, err = validate({"train": ["data/train.jsonl", "./gone"], "eval": "data/*.parquet"})
    assert code == 1 and "2 data path errors" in err
    assert "data.train[1]: " in err and "data.eval: no file matches" in err
    code, err = validate({"train": "data/sub/folder"})  # more separators than a hub id has
    assert code == 1 and "data.train: data/sub/folder does not exist" in err


def test_a_data_fingerprint_reuses_hashes_of_unchanged_files_and_names_the_hub_commit(tmp_path, monkeypatch):
    import huggingface_hub.constants

    import dpo_cli.data.files
    from dpo_cli.data.files import data_fingerprint, fingerprint_changes

    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    local = DataSection(train=str(tmp_path / "a.jsonl"))
    first = data_fingerprint(local)
    hashed = []
    monkeypatch.setattr(dpo_cli.data.files, "sha256_file", lambda name: hashed.append(name) or "fresh")
    assert data_fingerprint(local, first) == first and hashed == []  # size, mtime and inode unchanged: not re-read

    cache = tmp_path / "hub"
    (cache / "datasets--acme--reviews" / "refs").mkdir(parents=True)
    (cache / "datasets--acme--reviews" / "refs" / "main").write_text("1111111111111111111111111111111111111111")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    hub = DataSection(train="acme/reviews")
    before = data_fingerprint(hub)
    assert before["data.train acme/reviews"]["revision"] == "1" * 40
    (cache / "datasets--acme--reviews" / "refs" / "main").write_text("2" * 40)  # a newer download of the dataset
    assert fingerprint_changes(before, data_fingerprint(hub)) == ["data.train acme/reviews changed"]


def test_a_hub_dataset_fingerprinted_before_its_first_download_gets_its_commit_after_it(tmp_path, monkeypatch):
    """Before the stage downloads it, a hub dataset's commit is unknown; the runner fills it in afterwards, so
    a later newer download is seen as a change."""
    import huggingface_hub.constants

    from dpo_cli.data.files import data_fingerprint, fingerprint_changes, with_hub_revisions

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    hub = DataSection(train="acme/reviews")
    before = data_fingerprint(hub)
    assert before["data.train acme/reviews"]["revision"] is None and with_hub_revisions(before) == before  # nothing cached yet
    (cache / "datasets--acme--reviews" / "refs").mkdir(parents=True)
    (cache / "datasets--acme--reviews" / "refs" / "main").write_text("1" * 40)  # the stage downloaded it
    pinned = with_hub_revisions(before)
    assert pinned["data.train acme/reviews"]["revision"] == "1" * 40
    (cache / "datasets--acme--reviews" / "refs" / "main").write_text("2" * 40)
    assert fingerprint_changes(pinned, data_fingerprint(hub)) == ["data.train acme/reviews changed"]
    assert fingerprint_changes(before, data_fingerprint(hub)) == []  # unpinned, the change would pass unseen
