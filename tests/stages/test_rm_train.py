"""`dpo-cli rm-train` and `dpo-cli score`: the score token, reload exactness, learning, resume, and use by
collect-prefs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import dpo_cli.stages.rm_train
from helpers import model_modes, interrupt_at_call, preference_rows, read_jsonl, torchrun, write_jsonl, write_recipe
from dpo_cli.models.forward import RewardScores
from dpo_cli.models.io import load_reward_model
from helpers import assert_same_run

MODES = model_modes()
CPU = torch.device("cpu")


def test_score_is_read_at_the_last_real_token_with_any_padding(tiny_reward_model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir).eval()
    scorer = RewardScores(model)
    eos = model.config.eos_token_id
    sequences = [[5, 17, 42, 99, eos], [8, 9, eos]]  # both end with EOS, which some tokenizers also pad with
    alone = [scorer(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() for s in sequences]
    right = torch.tensor([[5, 17, 42, 99, eos], [8, 9, eos, eos, eos]])
    left = torch.tensor([[5, 17, 42, 99, eos], [eos, eos, 8, 9, eos]])
    right_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    left_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        assert scorer(right, right_mask).tolist() == pytest.approx(alone, abs=1e-5)
        assert scorer(left, left_mask).tolist() == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_end_to_end_and_the_saved_model_scores_as_trained(mode, tmp_path, cli, rm_recipe, tiny_model_dir):
    recipe = rm_recipe(model={"name_or_path": str(tiny_model_dir), **MODES[mode]})
    code, _, err = cli("rm-train", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    names = {"loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"}
    assert names <= set(metrics[0]) and names <= set(metrics[-1]) and metrics[-1]["split"] == "eval"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_accuracy"] == metrics[-1]["accuracy"]
    final = tmp_path / "run" / "final"
    if mode == "full":
        plain = AutoModelForSequenceClassification.from_pretrained(final)
    else:
        from peft import AutoPeftModelForSequenceClassification

        plain = AutoPeftModelForSequenceClassification.from_pretrained(final, num_labels=1)  # the base is a causal LM
        assert any("score" in k for k in __import__("safetensors.torch").torch.load_file(str(final / "adapter_model.safetensors")))
    assert plain.config.pad_token_id is not None
    # Reloaded (plainly, and through dpo-cli's loader), the model scores the held-out pairs as it did in training.
    code, _, err = cli("score", tmp_path / "run", "--data", tmp_path / "eval.jsonl", "--out", tmp_path / "scored.jsonl")
    assert code == 0, err
    scored = read_jsonl(tmp_path / "scored.jsonl")
    accuracy = sum(r["chosen_score"] > r["rejected_score"] for r in scored) / len(scored)
    mean_chosen = sum(r["chosen_score"] for r in scored) / len(scored)
    assert accuracy == pytest.approx(summary["eval_accuracy"])  # a 4-bit run is reloaded in 4-bit
    assert mean_chosen == pytest.approx(metrics[-1]["rewards/chosen"], abs=1e-4)
    loaded, tokenizer = load_reward_model(str(final), CPU)
    ids = torch.tensor([tokenizer("The Last Road is a drama. Superb.")["input_ids"]])
    with torch.no_grad():
        ours = RewardScores(loaded)(ids, torch.ones_like(ids)).item()
        theirs = RewardScores(plain.eval())(ids, torch.ones_like(ids)).item()
    assert ours == pytest.approx(theirs, abs=1e-4 if mode != "qlora" else 0.05)  # plain peft: full-precision base


def test_learns_a_learnable_preference(tmp_path, cli, rm_recipe):
    recipe = rm_recipe(train={"max_steps": 40, "batch_size": 8, "learning_rate": 2e-3, "save_every": None, "eval_every": None}, rm={"correlate_with": "sentiment"})
    code, _, err = cli("rm-train", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_accuracy"] >= 0.8  # chance is 0.5
    assert summary["judge_rank_correlation"]["spearman"] > 0.5 and summary["judge_rank_correlation"]["responses"] == 32


def test_resume_is_exact(tmp_path, cli, rm_recipe, monkeypatch):
    recipe = rm_recipe(model={"lora": {"r": 4, "dropout": 0.1}})
    assert cli("rm-train", recipe, "--run-dir", tmp_path / "reference")[0] == 0
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, dpo_cli.stages.rm_train, "reward_loss", 3)
        assert cli("rm-train", recipe, "--run-dir", tmp_path / "run")[0] == 143
    code, _, err = cli("rm-train", recipe, "--run-dir", tmp_path / "run")
    assert code == 0 and "resuming from" in err
    assert_same_run(tmp_path / "run", tmp_path / "reference")


def test_margins_and_a_base_without_pad_token(tmp_path, cli, rm_recipe, tiny_model_dir):
    rows = [{**r, "margin": 0.5} for r in preference_rows(16)]
    write_jsonl(tmp_path / "margins.jsonl", rows)
    no_pad = tmp_path / "no-pad"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = None
    model.save_pretrained(no_pad)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(no_pad)
    recipe = rm_recipe(model={"name_or_path": str(no_pad)}, data={"train": "margins.jsonl", "eval": None}, rm={"margin": True}, train={"max_steps": 2})
    code, _, err = cli("rm-train", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert "has no pad token" in err
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final").config.pad_token_id is not None
    missing = rm_recipe("missing.yaml", rm={"margin": True})
    code, _, err = cli("rm-train", missing, "--run-dir", tmp_path / "missing")
    assert code == 1 and "rm.margin: data.train has no `margin` column" in err


def test_collect_prefs_labels_with_an_rm_train_run(tmp_path, cli, rm_recipe, tiny_model_dir):
    assert cli("rm-train", rm_recipe(train={"max_steps": 2}), "--run-dir", tmp_path / "rm")[0] == 0
    recipe = write_recipe(
        tmp_path / "collect.yaml",
        {
            "stage": "collect-prefs",
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": "demo:prompts?n=4"},
            "generation": {"max_new_tokens": 6},
            "label": {"by": "reward-model", "reward_model": str(tmp_path / "rm")},
        },
    )
    code, _, err = cli("collect-prefs", recipe, "--run-dir", tmp_path / "prefs")
    assert code == 0, err
    records = read_jsonl(tmp_path / "prefs" / "prefs.jsonl")
    assert records and all(r["scores"]["chosen"] >= r["scores"]["rejected"] for r in records)


def test_score_command_inputs(tmp_path, cli, tiny_reward_model_dir, tiny_model_dir):
    write_jsonl(tmp_path / "responses.jsonl", [{"prompt": "A film.", "response": " Superb."}, {"prompt": "A film.", "response": " Dull."}])
    code, _, err = cli("score", tiny_reward_model_dir, "--data", tmp_path / "responses.jsonl", "--out", tmp_path / "out.jsonl")
    assert code == 0, err
    assert [set(r) for r in read_jsonl(tmp_path / "out.jsonl")] == [{"prompt", "response", "score"}] * 2
    code, _, err = cli("score", tiny_reward_model_dir, "--data", tmp_path / "responses.jsonl", "--out", tmp_path / "out.jsonl")
    assert code == 1 and "exists" in err
    code, _, err = cli("score", tiny_model_dir, "--data", tmp_path / "responses.jsonl", "--out", tmp_path / "other.jsonl")
    assert code == 1 and "is not a reward model" in err


def test_two_processes_equal_one_with_twice_the_batch(tmp_path, cli, rm_recipe):
    from helpers import assert_equivalent

    one = rm_recipe("one.yaml")
    two = rm_recipe("two.yaml", train={"batch_size": 4})
    assert cli("rm-train", one, "--run-dir", tmp_path / "one")[0] == 0
    done = torchrun("rm-train", two, "--run-dir", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_equivalent(tmp_path / "two", tmp_path / "one", ("loss", "accuracy", "grad_norm"))


def test_shared_prompt_rows_train_like_a_row_per_sequence(tmp_path, cli, rm_recipe):
    from helpers import assert_equivalent

    for name, share in (("shared", True), ("rows", False)):
        code, _, err = cli("rm-train", rm_recipe(f"{name}.yaml", rm={"share_prompt": share}), "--run-dir", tmp_path / name)
        assert code == 0, err
    assert_equivalent(tmp_path / "shared", tmp_path / "rows", ("loss", "accuracy", "grad_norm"))
