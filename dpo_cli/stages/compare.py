"""`dpo-cli compare`: the aligned policies side by side on held-out prompts — quality (a ground-truth judge and
the proxy reward model, with 95% intervals and win rates), KL to the reference, length and diversity, reward
hacking flagged, and what each training path cost — as report.md, report.json, plots and a table."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from dpo_cli.core import ui
from dpo_cli.eval.costs import path_cost
from dpo_cli.data.loading import DataReport, load_prompts
from dpo_cli.core.errors import UserError
from dpo_cli.eval.evaluation import KL_ESTIMATOR, PolicyEval, evaluate_policy, model_reference, text_reference, win_rate
from dpo_cli.eval.judges import Judge, build_judge, reward_model_judge
from dpo_cli.models.io import load_policy
from dpo_cli.core.recipes import CompareRecipe, TrainSection
from dpo_cli.eval.report import human_win_rate, render_report
from dpo_cli.core.rundir import RunDir, read_metrics
from dpo_cli.core.runtime import setup_runtime
from dpo_cli.train.summary import write_summary
from dpo_cli.models.sources import require_complete
from dpo_cli.data.tokenization import chat_template_notes


def _is_run(path: str) -> bool:
    return (Path(path) / "recipe.yaml").is_file()


def training_checkpoints(path: str) -> list[dict[str, Any]]:
    """The policy evaluations a dpo or ppo run logged while training (for the frontier plot)."""
    if not _is_run(path):
        return []
    return [m for m in read_metrics(Path(path) / "metrics.jsonl") if m.get("split") == "policy_eval"]


def reward_hacking(summaries: dict[str, dict], baseline: str) -> dict[str, bool]:
    """A policy whose proxy score rose over the baseline's while its ground-truth score fell."""
    base = summaries[baseline]
    flags = {}
    for name, summary in summaries.items():
        if name == baseline or not summary["judge"] or not summary["proxy"] or not base["judge"] or not base["proxy"]:
            flags[name] = False
            continue
        flags[name] = summary["proxy"]["mean"] > base["proxy"]["mean"] and summary["judge"]["mean"] < base["judge"]["mean"]
    return flags


def run_compare(recipe: CompareRecipe, run: RunDir) -> dict:
    started = time.time()
    runtime = setup_runtime(TrainSection(), recipe.seed)
    for name, path in recipe.policies.items():
        if _is_run(path):
            require_complete(Path(path), f"policies.{name}")
    for path_name, runs in recipe.costs.items():
        for path in runs:
            if not _is_run(path):
                raise UserError(f"costs.{path_name}: {path} is not a dpo-cli run dir")
            require_complete(Path(path), f"costs.{path_name}")
    if recipe.judges.human is not None and runtime.world_size > 1:
        raise UserError("judges.human: the A/B test runs in one process; start compare without torchrun / accelerate launch")
    report = DataReport()
    prompts = load_prompts(recipe.data, recipe.seed, report)
    names = list(recipe.policies)
    baseline = recipe.baseline or names[0]
    reference_name = recipe.reference or baseline

    judge: Judge | None = build_judge(recipe.judges.chosen_judge())
    proxy: Judge | None = None
    if recipe.judges.reward_model:
        proxy = reward_model_judge(recipe.judges.reward_model, runtime.device, "judges.reward_model")

    def policy(name: str) -> tuple[torch.nn.Module, Any]:
        model, tokenizer = load_policy(recipe.policies[name], runtime.device, run.path / "cache", f"policies.{name}")
        for note in chat_template_notes(tokenizer, None, prompts):  # conversational prompts, a policy without a template
            ui.note(f"policies.{name}: {note}")
        return model, tokenizer

    reference_model, reference_tokenizer = policy(reference_name)
    evaluations: dict[str, PolicyEval] = {}
    responses: dict[str, list[str]] = {}
    with ui.TaskProgress("evaluating policies", len(names), runtime.is_main) as progress:
        for name in names:
            model, tokenizer = (reference_model, reference_tokenizer) if name == reference_name else policy(name)
            same_tokens = tokenizer.get_vocab() == reference_tokenizer.get_vocab()
            if not same_tokens:
                ui.note(f"policies.{name} has another tokenizer than the reference: its responses are re-tokenised for the reference's KL")
            reference = model_reference(reference_model) if same_tokens else text_reference(reference_model, reference_tokenizer)
            # several processes: each evaluates a share of the prompts (evaluate_policy gathers them)
            evaluations[name] = evaluate_policy(
                model, tokenizer, prompts, recipe.generation, recipe.seed, runtime.device, recipe.data.max_length, judge, proxy, reference
            )
            responses[name] = evaluations[name].texts
            if model is not reference_model:
                del model
                gc.collect()
            progress.advance(1)

    if not runtime.is_main:
        return {}
    summaries = {name: evaluation.summary() for name, evaluation in evaluations.items()}
    scores_for_wins = {name: (e.judge_scores or e.proxy_scores) for name, e in evaluations.items()}
    for name in names:
        summaries[name]["win_rate"] = win_rate(scores_for_wins[name], scores_for_wins[baseline])
        summaries[name]["samples"] = [
            {"prompt": p if isinstance(p, str) else p[-1]["content"], "response": r} for p, r in list(zip(prompts, responses[name]))[: recipe.show_samples]
        ]
    for name, flagged in reward_hacking(summaries, baseline).items():
        summaries[name]["reward_hacking"] = flagged

    human = None
    if recipe.judges.human is not None:
        human = human_win_rate(recipe, run, prompts, responses)

    costs = {}
    for path_name, runs in recipe.costs.items():
        stage_summaries = [json.loads((Path(path) / "summary.json").read_text()) for path in runs]
        costs[path_name] = {"runs": list(runs), **path_cost(stage_summaries)}

    result = {
        "policies": summaries,
        "baseline": baseline,
        "reference": reference_name,
        "prompts": len(prompts),
        "judges": {"ground_truth": judge.name if judge else None, "proxy": proxy.name if proxy else None},
        "kl_estimator": KL_ESTIMATOR,
        "win_rate": f"against {baseline}, on the {'ground-truth judge' if judge else 'proxy'} scores of responses to the same prompts; ties count half",
        "confidence_intervals": "95%, normal approximation: mean +- 1.96 s / sqrt(n)",
        "costs": costs,
        "checkpoints": {name: training_checkpoints(path) for name, path in recipe.policies.items()},
        "human": human,
        "generation": recipe.generation.model_dump(),
    }
    paths = render_report(run, result, recipe.policies)
    summary = write_summary(
        stage="compare", run=run, runtime=runtime, started=started, results={"report": str(paths["md"])},
        highlights={"report": str(paths["md"]), "plots": ", ".join(str(p) for p in paths["plots"])},
    )  # fmt: skip
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
    return summary
