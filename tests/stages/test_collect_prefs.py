"""`dpo-cli collect-prefs` end to end on a tiny policy: judges, reward models, import, resume, bad input."""

from __future__ import annotations

import json

import datasets
import pytest

from helpers import read_jsonl, torchrun, with_sections, write_jsonl, write_recipe
from dpo_cli.data.loading import load_source
from dpo_cli.core.recipes import DataSection


@pytest.fixture()
def prefs_recipe(tmp_path, tiny_model_dir):
    def make(name: str = "collect-prefs.yaml", **sections):
        recipe = {
            "stage": "collect-prefs",
            "seed": 3,
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": "demo:prompts?n=10", "max_length": 64},
            "generation": {"max_new_tokens": 8, "batch_size": 8},
            "collect": {"samples_per_prompt": 3},
            "label": {"by": "judge", "judge": "length"},
        }
        return write_recipe(tmp_path / name, with_sections(recipe, sections))

    return make


def without_times(records):
    return [{k: v for k, v in r.items() if k != "timestamp"} for r in records]


def test_judge_labels_end_to_end(tmp_path, cli, prefs_recipe):
    code, out, err = cli("collect-prefs", prefs_recipe(), "--run-dir", tmp_path / "run")
    assert code == 0, err
    run = tmp_path / "run"
    candidates = read_jsonl(run / "candidates.jsonl")
    assert len(candidates) == 10 and all(len(c["responses"]) == 3 for c in candidates)
    records = read_jsonl(run / "prefs.jsonl")
    stats = json.loads((run / "stats.json").read_text())
    assert stats["pairs"] == 30 - stats["left_out"].get("identical_responses", 0) - stats["left_out"].get("empty_responses", 0)
    assert stats["records"] == len(records) > 0
    for record in records:
        assert len(record["chosen"].split()) >= len(record["rejected"].split())  # the length judge, no noise
        assert record["labeler"] == "judge:length" and record["generation"]["samples_per_prompt"] == 3
    loaded = datasets.load_dataset("json", data_files=str(run / "prefs.jsonl"), split="train")
    assert len(loaded) == len(records) and {"prompt", "chosen", "rejected"} <= set(loaded.column_names)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert "collect-prefs · completed" in out


def test_same_seed_same_dataset_and_rerun_is_complete(tmp_path, cli, prefs_recipe):
    recipe = prefs_recipe(label={"judge": "sentiment", "noise": 0.3})
    assert cli("collect-prefs", recipe, "--run-dir", tmp_path / "one")[0] == 0
    assert cli("collect-prefs", recipe, "--run-dir", tmp_path / "two")[0] == 0
    assert (tmp_path / "one" / "candidates.jsonl").read_text() == (tmp_path / "two" / "candidates.jsonl").read_text()
    assert without_times(read_jsonl(tmp_path / "one" / "prefs.jsonl")) == without_times(read_jsonl(tmp_path / "two" / "prefs.jsonl"))
    code, _, err = cli("collect-prefs", recipe, "--run-dir", tmp_path / "one")
    assert code == 0 and "already complete" in err


def test_interrupted_labelling_continues_without_sampling_again(tmp_path, cli, prefs_recipe):
    recipe = prefs_recipe()
    run = tmp_path / "run"
    assert cli("collect-prefs", recipe, "--run-dir", run)[0] == 0
    reference = without_times(read_jsonl(run / "prefs.jsonl"))
    # A crash after 4 labels, the fifth half-written, before prefs.jsonl and summary.json were written:
    lines = (run / "labels.jsonl").read_text().splitlines(keepends=True)
    (run / "labels.jsonl").write_text("".join(lines[:4]) + lines[4][:20])
    for name in ("prefs.jsonl", "stats.json", "summary.json"):
        (run / name).unlink()
    sampled = (run / "candidates.jsonl").stat().st_mtime_ns
    code, _, err = cli("collect-prefs", recipe, "--run-dir", run)
    assert code == 0, err
    assert "torn line" in err
    assert (run / "candidates.jsonl").stat().st_mtime_ns == sampled
    events = read_jsonl(run / "labels.jsonl")
    assert len(events) == len(lines) and len({e["pair_id"] for e in events}) == len(events)  # none lost, none twice
    assert without_times(read_jsonl(run / "prefs.jsonl")) == reference


def test_reward_model_labeler(tmp_path, cli, prefs_recipe, tiny_reward_model_dir):
    recipe = prefs_recipe(label={"by": "reward-model", "reward_model": str(tiny_reward_model_dir)})
    code, _, err = cli("collect-prefs", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    records = read_jsonl(tmp_path / "run" / "prefs.jsonl")
    assert records and all(r["scores"]["chosen"] > r["scores"]["rejected"] for r in records)
    assert records[0]["labeler"].startswith("reward-model:")
    compute = json.loads((tmp_path / "run" / "summary.json").read_text())["compute"]
    assert compute["extra"][0]["tokens"] == compute["forward_tokens"] > 0  # the reward model's passes are counted in the cost


def test_a_model_that_is_not_a_reward_model_is_refused(tmp_path, cli, prefs_recipe, tiny_model_dir):
    recipe = prefs_recipe(label={"by": "reward-model", "reward_model": str(tiny_model_dir)})
    code, _, err = cli("collect-prefs", recipe, "--run-dir", tmp_path / "run")
    assert code == 1 and "is not a reward model" in err and "Traceback" not in err


def test_failing_user_judge_skips_and_reports_pairs(tmp_path, cli, prefs_recipe, monkeypatch):
    (tmp_path / "flaky.py").write_text(
        "def judge(prompt, response):\n    if len(response) % 2 == 0:\n        raise ValueError('cannot score')\n    return float(len(response))\n"
    )
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("collect-prefs", prefs_recipe(label={"judge": "sentiment", "python": "flaky:judge"}), "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert f"running user code judge from {tmp_path / 'flaky.py'}" in err
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    failed = stats["left_out"].get("judge_failed", 0)
    assert failed > 0 and "raised ValueError: cannot score" in err
    assert stats["labels"] + failed == stats["pairs"]


def test_human_labelling_without_a_terminal_is_a_clear_error(tmp_path, cli, prefs_recipe):
    code, _, err = cli("collect-prefs", prefs_recipe(label={"by": "human"}), "--run-dir", tmp_path / "run")
    assert code == 1 and "needs an interactive terminal" in err
    assert not (tmp_path / "run" / "candidates.jsonl").exists()


def test_bad_prompt_data(tmp_path, cli, prefs_recipe):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "A film."}, {"prompt": "  "}])
    code, _, err = cli("collect-prefs", prefs_recipe(data={"train": "prompts.jsonl"}), "--run-dir", tmp_path / "a")
    assert code == 1 and "data.train row 2: 'prompt' is empty" in err
    write_jsonl(tmp_path / "questions.jsonl", [{"question": "A film?"}])
    code, _, err = cli("collect-prefs", prefs_recipe(data={"train": "questions.jsonl"}), "--run-dir", tmp_path / "b")
    assert code == 1 and "expected columns prompt or messages, found question" in err
    code, _, err = cli("collect-prefs", prefs_recipe(collect={"samples_per_prompt": 1}), "--run-dir", tmp_path / "c")
    assert code == 1 and "collect.samples_per_prompt: pairs need at least 2 responses per prompt" in err


def test_conversational_prompts(tmp_path, cli, prefs_recipe):
    rows = [{"messages": [{"role": "user", "content": f"Review film {i}."}]} for i in range(4)]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    recipe = prefs_recipe(data={"train": "chat.jsonl"}, tokenizer={"chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"})
    code, _, err = cli("collect-prefs", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    record = read_jsonl(tmp_path / "run" / "prefs.jsonl")[0]
    assert record["prompt"][0]["role"] == "user" and record["chosen"][0]["role"] == "assistant"


def test_import_and_use_the_run_dir_as_data(tmp_path, cli):
    write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello, friend.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
        {"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi"},
    ])  # fmt: skip
    recipe = write_recipe(tmp_path / "import.yaml", {"stage": "collect-prefs", "data": {"train": "hh.jsonl", "bad_rows": "drop"}, "collect": {"source": "import"}})
    code, _, err = cli("collect-prefs", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert "imported 1 pairs in hh format" in err
    rows = load_source(str(tmp_path / "run"), DataSection(train="x"), "data.train", "train")
    assert rows["chosen"] == [" Hello, friend."] and rows["prompt"] == ["\n\nHuman: Hi\n\nAssistant:"]
    strict = write_recipe(tmp_path / "strict.yaml", {"stage": "collect-prefs", "data": {"train": "hh.jsonl"}, "collect": {"source": "import"}})
    code, _, err = cli("collect-prefs", strict, "--run-dir", tmp_path / "strict")
    assert code == 1 and "data.train row 2: 'chosen' and 'rejected' are the same" in err


def test_smoke(tmp_path, cli, prefs_recipe):
    code, _, err = cli("collect-prefs", prefs_recipe(data={"train": "demo:prompts"}), "--smoke", "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert len(read_jsonl(tmp_path / "run" / "candidates.jsonl")) == 32


def test_two_processes_sample_and_score_their_shares(tmp_path, prefs_recipe, tiny_reward_model_dir):
    """torchrun: each process samples half the prompts and scores half the responses; the main process
    alone writes candidates, labels and prefs (each label once)."""
    recipe = prefs_recipe(label={"by": "reward-model", "reward_model": str(tiny_reward_model_dir)})
    done = torchrun("collect-prefs", recipe, "--run-dir", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    candidates = read_jsonl(run / "candidates.jsonl")
    assert [c["prompt_index"] for c in candidates] == list(range(10)) and all(len(c["responses"]) == 3 for c in candidates)
    labels = read_jsonl(run / "labels.jsonl")
    stats = json.loads((run / "stats.json").read_text())
    assert len(labels) == stats["pairs"] == len({label["pair_id"] for label in labels})
    assert all(label["scores"] is not None for label in labels)
    assert done.stdout.count("collect-prefs · completed") == 1


def test_thumbs_by_a_judge_write_kto_examples_that_dpo_trains_on(tmp_path, cli, prefs_recipe, dpo_recipe):
    """collect.mode thumbs: every response judged alone against the median score; prefs.jsonl holds TRL's
    unpaired examples, which a kto run reads from the run dir as they are (and datasets loads as is)."""
    recipe = prefs_recipe(collect={"mode": "thumbs", "samples_per_prompt": 3})
    code, out, err = cli("collect-prefs", recipe, "--run-dir", tmp_path / "thumbs")
    assert code == 0, err
    run = tmp_path / "thumbs"
    records, items = read_jsonl(run / "prefs.jsonl"), read_jsonl(run / "items.jsonl")
    stats = json.loads((run / "stats.json").read_text())
    assert {"prompt", "completion", "label", "score", "labeler"} <= set(records[0]) and isinstance(records[0]["label"], bool)
    scores = sorted(r["score"] for r in records)
    median = (scores[len(scores) // 2] + scores[(len(scores) - 1) // 2]) / 2
    assert all(r["label"] == (r["score"] >= median) and r["threshold"] == median for r in records)  # the length judge against the median
    assert stats["records"] == len(records) == len(items) == stats["items"] and stats["left_out"].get("empty_responses")  # left out, counted
    assert stats["desirable"] + stats["undesirable"] == len(records) and stats["desirable"] >= len(records) / 2
    assert "thumbs up at a score of" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["examples"] == len(records)
    assert summary["samples"] == 10 * 3 and summary["models"] == ["policy"] and summary["estimated_flops"] > 0  # compare's cost of sampling
    from dpo_cli.eval.costs import run_cost

    assert run_cost(summary)["samples"] == 30 and run_cost(summary)["flops"] == summary["estimated_flops"]
    assert len(datasets.load_dataset("json", data_files=str(run / "prefs.jsonl"), split="train")) == len(records)
    assert stats["thresholds"] == [median]

    dpo = dpo_recipe(data={"train": str(run), "eval": None, "max_length": 64}, dpo={"loss": "kto", "show_samples": 0}, train={"max_steps": 2})
    code, _, err = cli("dpo", dpo, "--run-dir", tmp_path / "kto")
    assert code == 0, err
    assert json.loads((tmp_path / "kto" / "summary.json").read_text())["examples"] == 2 * 4


def test_thumbs_options_are_checked(cli, prefs_recipe):
    for sections, message in [
        ({"collect": {"samples_per_prompt": 1}}, "pairs need at least 2 responses per prompt"),
        ({"collect": {"mode": "thumbs", "source": "import"}, "data": {"train": "x.jsonl"}}, "collect.mode: thumbs labels sampled responses"),
        ({"label": {"by": "judge", "threshold": 0.5}}, "label.threshold is the bar of a thumbs up"),
        ({"collect": {"mode": "thumbs"}, "label": {"by": "judge", "tie_margin": 0.1}}, "label.tie_margin: pairs only"),
    ]:
        code, _, err = cli("validate", prefs_recipe(**sections))
        assert code == 1 and message in err, err
