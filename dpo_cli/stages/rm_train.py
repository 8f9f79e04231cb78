"""`dpo-cli rm-train`: a reward model from preference pairs (Bradley-Terry): a scalar score head on a base or
SFT model, trained so that chosen responses score above rejected ones."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch

from dpo_cli.core import ui
from dpo_cli.data.loading import DataReport
from dpo_cli.models.forward import RewardScores, packed_rows_allowed, pair_scores
from dpo_cli.eval.judges import Judge, RewardModelJudge, build_judge
from dpo_cli.train.loop import StepFn, batch_streams, train
from dpo_cli.losses import reward_loss
from dpo_cli.models.io import save_final_model
from dpo_cli.models.build import build_model
from dpo_cli.data.preference_pairs import collate_pairs, collate_shared_pairs, load_preference_sets
from dpo_cli.data.prefs import spearman
from dpo_cli.core.recipes import RmRecipe, RmSection
from dpo_cli.core.rundir import RunDir
from dpo_cli.core.runtime import setup_runtime
from dpo_cli.train.summary import Trained, write_summary


def make_step(cfg: RmSection) -> StepFn:
    def step(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        rewards = pair_scores(model, batch)  # (2B,): chosen first, then rejected
        pairs = rewards.size(0) // 2
        return reward_loss(rewards[:pairs], rewards[pairs:], batch.get("margins"), cfg.center_rewards_coef)

    return step


def judge_correlation(judge: Judge, scorer: RewardModelJudge, rows: Any) -> float | None:
    """Spearman rank correlation between the learned scores and a judge's, over held-out responses."""
    prompts = [row["prompt"] for row in rows for _ in (0, 1)]
    responses = [row[side] if isinstance(row[side], str) else row[side][-1]["content"] for row in rows for side in ("chosen", "rejected")]
    learned = scorer.score(prompts, responses).values
    judged = judge.score(prompts, responses)
    pairs = [(a, b) for a, b in zip(learned, judged.values) if a is not None and b is not None]
    return spearman([a for a, _ in pairs], [b for _, b in pairs])


def run_rm_train(recipe: RmRecipe, run: RunDir) -> dict:
    started = time.time()
    runtime = setup_runtime(recipe.train, recipe.seed, recipe.distributed)

    # Data: preference records -> chosen and rejected sequences, scored at their last token.
    report = DataReport()
    data = load_preference_sets(recipe, report, None, with_margin=recipe.rm.margin)
    tokenizer, eval_rows, train_set, eval_set = data.tokenizer, data.eval_rows, data.train_set, data.eval_set

    # Model: the body of a base or SFT model with a fresh scalar head; full, LoRA (head trained in full) or 4-bit.
    bundle = build_model(recipe.model, tokenizer, runtime.device, recipe.seed, cache_dir=run.path, head="reward")
    shared, layout_notes = packed_rows_allowed("rm.share_prompt", recipe.rm.share_prompt, [bundle.model], recipe.data.max_length, scored=True)
    collate = partial(collate_shared_pairs if shared else collate_pairs, pad_id=tokenizer.pad_token_id)
    ui.notes(data.notes + bundle.notes + layout_notes)
    judge = build_judge(recipe.rm.chosen_judge())  # user code is named (and a bad name refused) before training

    train_stream, eval_stream = batch_streams(train_set, eval_set, collate, recipe.train, recipe.seed, runtime)
    result = train(
        stage="rm-train", model=RewardScores(bundle.model), train_stream=train_stream, eval_stream=eval_stream, step_fn=make_step(recipe.rm),
        cfg=recipe.train, run=run, runtime=runtime,
    )  # fmt: skip
    if result.trained:  # an evaluation-only run changed nothing to save
        save_final_model(run, runtime, bundle, prepared=result.model)

    results: dict[str, Any] = {"pairs": result.state.items, "pairs_per_sec": result.state.items / max(result.state.train_seconds, 1e-9), "models": ["reward model"]}
    highlights: dict[str, Any] = {"pairs/s": results["pairs_per_sec"]}
    if result.eval_metrics:
        results["eval_accuracy"] = highlights["held-out accuracy"] = result.eval_metrics["accuracy"]
    if judge is not None and eval_rows is not None:
        scorer = RewardModelJudge("rm", bundle.model, tokenizer, eval_stream.batch_size, runtime.device, recipe.data.max_length)
        correlation = judge_correlation(judge, scorer, eval_rows)
        judge_name = judge.name.removeprefix("judge:")
        results["judge_rank_correlation"] = {"judge": judge_name, "spearman": correlation, "responses": 2 * len(eval_rows)}
        highlights[f"rank correlation with {judge_name}"] = correlation
    summary = write_summary(
        stage="rm-train", run=run, runtime=runtime, started=started, trained=Trained.from_loop(bundle.model, result), data=report,
        results=results, highlights=highlights,
    )  # fmt: skip
    if "eval_accuracy" in results:
        ui.note(f"held-out accuracy {results['eval_accuracy']:.3f} on {len(eval_set)} pairs")
    return summary
