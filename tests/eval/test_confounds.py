"""The confounds compare warns about: parametrisation, training length against evaluation length, budget."""

from __future__ import annotations

from dpo_cli.eval.confounds import confounds, parametrisation


def run(stage: str, lora: int | None = None, tokens: int | None = None, params: float = 1e6, trained_tokens: int = 1000, four_bit: bool = False):
    recipe = {"stage": stage, "model": {"lora": {"r": lora} if lora else None, "quantization": {} if four_bit else None}, "generation": {"max_new_tokens": tokens}}
    summary = {"compute": {"params": params, "layers": 2, "hidden": 64, "context": 100, "train_tokens": trained_tokens}}
    return recipe, summary


def test_like_for_like_runs_raise_nothing():
    assert confounds({"ppo": run("ppo", 16, 64), "dpo": run("dpo", 16, 128, trained_tokens=500)}, 64) == []


def test_each_confound_is_named():
    assert parametrisation(run("dpo")[0]) == "full weights" and parametrisation(run("ppo", 8, four_bit=True)[0]) == "4-bit LoRA r=8"
    warnings = confounds({"ppo": run("ppo", 16, 48), "dpo": run("dpo", trained_tokens=100)}, 64)
    assert warnings[0].startswith("they train different weights (ppo: LoRA r=16; dpo: full weights)")
    assert warnings[1].startswith("trained on responses of another length than evaluated (ppo: 48 tokens; evaluated at 64)")
    assert warnings[2].startswith("their training budgets differ by 10.0x in estimated compute (ppo:") and len(warnings) == 3
