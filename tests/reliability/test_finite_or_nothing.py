"""Promise: a run never finishes on NaN. A non-finite loss, gradient norm, eval loss or weight stops it before
anything is written as final/ (or, with train.nonfinite: skip, the step is skipped and counted)."""

from __future__ import annotations

import json

import torch

import dpo_cli.stages.sft
from helpers import read_jsonl


def poisoned_lm_step(calls: set[int], in_eval: bool = False):
    """lm_step whose loss is NaN on the given training calls (or in every eval pass)."""
    real = dpo_cli.stages.sft.lm_step
    count = {"n": 0}

    def step(model, batch):
        loss, metrics = real(model, batch)
        if torch.is_grad_enabled():
            count["n"] += 1
            if count["n"] in calls:
                return loss * float("nan"), metrics
        elif in_eval:
            return loss * float("nan"), metrics
        return loss, metrics

    return step


def status(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_an_overflowing_update_stops_before_final(tmp_path, cli, sft_recipe):
    recipe = sft_recipe(train={"optimizer": "sgd", "learning_rate": 1e38, "max_grad_norm": None, "save_every": 2})
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 1 and "the weights became non-finite in the update of step 1" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "final").exists()  # nothing resumable was made either: no run dir is left


def test_a_nan_loss_stops_with_a_checkpoint_of_the_last_good_step_and_can_resume_skipping(tmp_path, cli, sft_recipe, monkeypatch):
    recipe = sft_recipe(train={"save_every": 10})
    with monkeypatch.context() as patch:
        patch.setattr(dpo_cli.stages.sft, "lm_step", poisoned_lm_step({3}))
        code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 1 and "the loss became nan at step 3: stopped with a checkpoint of step 2, the last good state" in err
    assert (tmp_path / "run" / "checkpoints" / "step-2").is_dir() and not (tmp_path / "run" / "final").exists()
    with monkeypatch.context() as patch:  # the same batch is poisoned again: skip it this time
        patch.setattr(dpo_cli.stages.sft, "lm_step", poisoned_lm_step({1}))
        code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run", "--set", "train.nonfinite=skip")
    assert code == 0, err
    summary = status(tmp_path / "run")
    assert summary["status"] == "completed" and summary["skipped_steps"] == 1 and summary["steps"] == 6
    assert [m["skipped"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "skipped" in m] == ["the loss became nan"]


def test_skipping_stops_past_its_cap(tmp_path, cli, sft_recipe, monkeypatch):
    recipe = sft_recipe(train={"nonfinite": "skip", "max_skipped_steps": 1})
    monkeypatch.setattr(dpo_cli.stages.sft, "lm_step", poisoned_lm_step({2, 4}))
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 1 and "more than train.max_skipped_steps=1 steps were skipped" in err
    assert not (tmp_path / "run" / "final").exists()


def test_a_nan_eval_loss_stops_before_final(tmp_path, cli, sft_recipe, monkeypatch):
    monkeypatch.setattr(dpo_cli.stages.sft, "lm_step", poisoned_lm_step(set(), in_eval=True))
    code, _, err = cli("sft", sft_recipe(), "--run-dir", tmp_path / "run")
    assert code == 1 and "the eval loss became nan" in err and not (tmp_path / "run" / "final").exists()


def test_ppo_whose_every_iteration_was_skipped_fails(tmp_path, cli, ppo_recipe, tiny_reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    broken = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir)
    with torch.no_grad():
        broken.score.weight.fill_(float("nan"))
    broken.save_pretrained(tmp_path / "nan-rm")
    AutoTokenizer.from_pretrained(tiny_reward_model_dir).save_pretrained(tmp_path / "nan-rm")
    recipe = ppo_recipe(ppo={"reward_model": str(tmp_path / "nan-rm"), "mini_batch_size": 2, "ppo_epochs": 1})
    code, _, err = cli("ppo", recipe, "--run-dir", tmp_path / "run")
    assert code == 1 and "all 3 iterations were skipped" in err and not (tmp_path / "run" / "final").exists()


def test_a_ppo_update_with_a_nan_loss_is_never_applied(tmp_path, cli, ppo_recipe, monkeypatch):
    import dpo_cli.stages.ppo

    real, calls = dpo_cli.stages.ppo.ppo_policy_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), metrics

    monkeypatch.setattr(dpo_cli.stages.ppo, "ppo_policy_loss", poisoned)
    code, _, err = cli("ppo", ppo_recipe(), "--run-dir", tmp_path / "stop")
    assert code == 1 and "the loss became nan in an update of iteration 1; it was not applied" in err and "Traceback" not in err
    assert not (tmp_path / "stop" / "final").exists()
    calls["n"] = 0
    code, _, err = cli("ppo", ppo_recipe("skip.yaml", train={"nonfinite": "skip"}), "--run-dir", tmp_path / "skip")
    assert code == 0, err
    summary = status(tmp_path / "skip")
    assert summary["status"] == "completed" and summary["skipped_updates"] == 1
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "skip" / "final" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
