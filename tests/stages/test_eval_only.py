"""Evaluation only (`dpo-cli eval`, `--eval-only`, train.max_steps: 0): a stage's evaluation on its eval data
with no update. Evaluating a trained run's final/ gives the eval metrics its training run reported at its end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import read_jsonl


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm-train"])
def test_evaluating_a_trained_run_gives_the_metrics_its_training_reported(stage, tmp_path, cli, sft_recipe, dpo_recipe, rm_recipe, tiny_model_dir):
    make = {"sft": sft_recipe, "dpo": dpo_recipe, "rm-train": rm_recipe}[stage]
    recipe = make()
    code, _, err = cli(stage, recipe, "--run-dir", tmp_path / "trained")
    assert code == 0, err
    trained = summary(tmp_path / "trained")
    # the trained policy, against the model it started from as DPO's reference: what training evaluated
    model = ["--set", f"model.name_or_path={tmp_path / 'trained'}"] + (["--set", f"dpo.ref_model={tiny_model_dir}"] if stage == "dpo" else [])
    code, _, err = cli("eval", recipe, *model, "--run-dir", tmp_path / "evaluated")
    assert code == 0, err
    evaluated = summary(tmp_path / "evaluated")
    assert evaluated["status"] == "completed" and evaluated["evaluation_only"] and evaluated["steps"] == 0
    assert not (tmp_path / "evaluated" / "final").exists() and "final_dir" not in evaluated
    assert not list((tmp_path / "evaluated").glob("checkpoints/step-*"))
    assert set(evaluated["eval_metrics"]) == set(trained["eval_metrics"])
    for key, value in trained["eval_metrics"].items():
        assert evaluated["eval_metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    if stage == "sft":
        assert evaluated["eval_perplexity"] == pytest.approx(trained["eval_perplexity"], rel=1e-4)
    if stage == "rm-train":
        assert evaluated["eval_accuracy"] == pytest.approx(trained["eval_accuracy"])
    assert [r["split"] for r in read_jsonl(tmp_path / "evaluated" / "metrics.jsonl")] == ["eval"]


def test_eval_only_flag_run_dir_and_bad_input(tmp_path, cli, sft_recipe, ppo_recipe, dpo_recipe, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = sft_recipe()
    code, _, err = cli("sft", recipe, "--eval-only")
    assert code == 0, err
    assert summary(tmp_path / "runs" / "sft-eval")["evaluation_only"]
    code, _, err = cli("eval", recipe, "--set", "data.eval=null", "--run-dir", tmp_path / "no-eval")
    assert code == 1 and "set data.eval" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "no-eval").exists()
    code, _, err = cli("eval", ppo_recipe())
    assert code == 1 and "no evaluation-only mode" in err
    code, _, err = cli("eval", dpo_recipe(), "--run-dir", tmp_path / "dpo-eval")
    assert code == 1 and "set dpo.ref_model to the model the policy started from" in err
    code, _, err = cli("eval", dpo_recipe(dpo={"loss": "simpo"}), "--run-dir", tmp_path / "simpo-eval")
    assert code == 0, err  # reference-free: nothing to compare against
