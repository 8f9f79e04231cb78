"""`dpo-cli compare`: the aligned policies side by side on held-out prompts — quality (a ground-truth judge and
the proxy reward model, with 95% intervals and win rates), KL to the reference, length and diversity, reward
hacking flagged, and what each training path cost — as report.md, report.json, plots and a table."""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from dpo_cli.core import ui
from dpo_cli.eval.comparison import SCORES, differences, length_controlled, length_slope, policy_summary, quality_key, reward_hacking, trajectory_hacking
from dpo_cli.eval.confounds import confounds
from dpo_cli.eval.costs import add_costs, estimate_flops, mean_cost, path_cost
from dpo_cli.data.loading import DataReport, load_prompts
from dpo_cli.core.errors import UserError
from dpo_cli.eval.stats import mean_ci
from dpo_cli.eval.evaluation import KL_ESTIMATOR, PolicyEval, evaluate_policy, evaluation_settings, model_reference, periodic_settings, text_reference
from dpo_cli.eval.judges import Judge, build_ground_truth, ground_truth_name, reward_model_judge
from dpo_cli.models.io import load_policy
from dpo_cli.core.recipes import CompareRecipe, PolicyEvalSection, TrainSection
from dpo_cli.eval.report import human_win_rate, render_report
from dpo_cli.core.rundir import RunDir, read_metrics
from dpo_cli.core.runtime import setup_runtime
from dpo_cli.train.summary import write_summary
from dpo_cli.models.sources import require_complete
from dpo_cli.data.tokenization import chat_template_notes


def _is_run(path: str) -> bool:
    return (Path(path) / "recipe.yaml").is_file()


def seed_runs(value: str | list[str]) -> list[str]:
    """A policy as its runs: one, or one per training seed."""
    return [value] if isinstance(value, str) else list(value)


def training_checkpoints(path: str) -> list[dict[str, Any]]:
    """The policy evaluations a dpo or ppo run logged while training (for the frontier plot)."""
    if not _is_run(path):
        return []
    return [m for m in read_metrics(Path(path) / "metrics.jsonl") if m.get("split") == "policy_eval"]


def run_trajectory(path: str, settings: dict[str, Any], available: int | None) -> dict[str, Any]:
    """A run's path as its policy evaluations logged it: whether they are this comparison's evaluation (the
    same prompts, length, sampling and seed: then its points and the final points lie on one scale) and the
    over-optimisation check on them."""
    points = training_checkpoints(path)
    saved = RunDir(Path(path)).saved_recipe() if _is_run(path) else None
    same = False
    if points and saved and saved.get("policy_eval"):
        try:
            cfg = PolicyEvalSection.model_validate(saved["policy_eval"])
        except ValidationError:  # a run of another dpo-cli version: its curve is shown, not compared
            cfg = None
        same = cfg is not None and periodic_settings(cfg, saved.get("seed", 0), available) == settings
    return {"run": Path(path).name, "points": len(points), "same_evaluation": same, "hacking": trajectory_hacking(points)}


CEILING_ROWS = 1000  # reference answers scored at most: the ceiling's mean, not a second evaluation


def ceiling_answers(source: str, seed: int) -> tuple[list[Any], list[str]]:
    """Reference answers (prompt + completion or response), read before any policy is evaluated."""
    from dpo_cli.core.recipes import DataSection
    from dpo_cli.data.loading import load_splits

    try:
        rows, _ = load_splits(DataSection(train=source, max_rows=CEILING_ROWS), seed, DataReport())
    except UserError as exc:  # the loader names the key it usually reads
        raise UserError(str(exc).replace("data.train", "judges.ceiling", 1)) from None
    answer = next((c for c in ("completion", "response") if c in rows.column_names), None)
    if "prompt" not in rows.column_names or answer is None:
        columns = ", ".join(c for c in rows.column_names if not c.startswith("__"))
        raise UserError(f"judges.ceiling: {source} needs a prompt column and a completion (or response) column; it has {columns}")
    return list(rows["prompt"]), [str(a).strip() for a in rows[answer]]


def ceiling(source: str, answers: tuple[list[Any], list[str]], judge: Judge) -> dict[str, Any]:
    """The ground truth of reference answers: how high the scale goes."""
    return {"data": source, **mean_ci(judge.score(*answers).values)}


def trained_runs(runs: dict[str, list[str]]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """The policies a preference method trained (dpo, ppo): their first run's saved recipe and summary."""
    found = {}
    for name, paths in runs.items():
        saved = RunDir(Path(paths[0])).saved_recipe() if _is_run(paths[0]) else None
        if saved and saved.get("stage") in ("dpo", "ppo"):
            found[name] = (saved, _stage_summary(paths[0]))
    return found


def lineage_flops(path: str) -> float:
    """The training FLOPs of a run and of the preference runs (dpo, ppo) it started from, followed back through
    model.name_or_path: online DPO's last round started from the round before it."""
    total, seen = 0.0, set()
    while _is_run(path) and path not in seen:
        seen.add(path)
        saved = RunDir(Path(path)).saved_recipe() or {}
        if saved.get("stage") not in ("dpo", "ppo"):
            break
        summary = _stage_summary(path)
        total += estimate_flops(summary["compute"]) if summary.get("compute") else 0.0
        path = str((saved.get("model") or {}).get("name_or_path") or "")
    return total


def labelling_judge(path: str) -> str | None:
    """The judge that labelled the preferences a run learned from, followed back through its inputs (dpo:
    data.train; ppo: its reward model's data.train) to a collect-prefs run that labelled by judge."""
    for _ in range(4):
        saved = RunDir(Path(path)).saved_recipe() if _is_run(path) else None
        if not saved:
            return None
        stage = saved.get("stage")
        if stage == "collect-prefs":
            label = saved.get("label") or {}
            return f"judge:{label.get('python') or label.get('judge', 'sentiment')}" if label.get("by", "judge") == "judge" else None
        ppo = saved.get("ppo") or {}
        if stage == "ppo" and (ppo.get("reward_judge") or ppo.get("reward_python")):  # PPO-GT: the judge is its reward
            fluency = ppo.get("reward_fluency_model")
            return f"judge:{ppo.get('reward_python') or ppo.get('reward_judge')}" + (f" x fluency under {fluency}" if fluency else "")
        source = (saved.get("ppo") or {}).get("reward_model") if stage == "ppo" else (saved.get("data") or {}).get("train")
        if not isinstance(source, str):
            return None
        path = source
    return None


def _stage_summary(path: str) -> dict[str, Any]:
    return json.loads((Path(path) / "summary.json").read_text())


def training_cost(entries: list[str | list[str]]) -> dict[str, Any]:
    """A training path's cost: its stages' costs added up; a stage run with several seeds (a list) counts
    as the mean of its runs, the cost of training it once."""
    parts = [path_cost([_stage_summary(e)]) if isinstance(e, str) else mean_cost([path_cost([_stage_summary(p)]) for p in e]) for e in entries]
    labels = [Path(e).name if isinstance(e, str) else f"mean of {len(e)} runs ({Path(e[0]).name}, ...)" for e in entries]
    ranges = [part["train_time_s_range"] for part in parts if "train_time_s_range" in part]
    total = {"runs": labels, "run_dirs": [p for e in entries for p in seed_runs(e)], **add_costs(parts)}
    if ranges:  # the path's time with each repeated stage at its fastest and slowest run
        fixed = total["train_time_s"] - sum(part["train_time_s"] for part in parts if "train_time_s_range" in part)
        total["train_time_s_range"] = [fixed + sum(r[0] for r in ranges), fixed + sum(r[1] for r in ranges)]
    return total


def run_compare(recipe: CompareRecipe, run: RunDir) -> dict:
    started = time.time()
    runtime = setup_runtime(TrainSection(), recipe.seed)
    runs = {name: seed_runs(value) for name, value in recipe.policies.items()}
    for name, paths in runs.items():
        for path in paths:
            if _is_run(path):
                require_complete(Path(path), f"policies.{name}")
    for path_name, entries in recipe.costs.items():
        for path in (p for e in entries for p in seed_runs(e)):
            if not _is_run(path):
                raise UserError(f"costs.{path_name}: {path} is not a dpo-cli run dir")
            require_complete(Path(path), f"costs.{path_name}")
    if recipe.judges.human is not None and runtime.world_size > 1:
        raise UserError("judges.human: the A/B test runs in one process; start compare without torchrun / accelerate launch")
    report = DataReport()
    prompts = load_prompts(recipe.data, recipe.seed, report)
    ceiling_rows = ceiling_answers(recipe.judges.ceiling, recipe.seed) if recipe.judges.ceiling else None
    names = list(recipe.policies)
    baseline = recipe.baseline or names[0]
    reference_name = recipe.reference or baseline

    judge: Judge | None = build_ground_truth(recipe.judges.chosen_judge(), recipe.judges.fluency_model, runtime.device, "judges.fluency_model")
    proxy: Judge | None = None
    if recipe.judges.reward_model:
        proxy = reward_model_judge(recipe.judges.reward_model, runtime.device, "judges.reward_model")

    def policy(name: str, path: str) -> tuple[torch.nn.Module, Any]:
        model, tokenizer = load_policy(path, runtime.device, run.path / "cache", f"policies.{name}")
        for note in chat_template_notes(tokenizer, None, prompts):  # conversational prompts, a policy without a template
            ui.note(f"policies.{name}: {note}")
        return model, tokenizer

    reference_model, reference_tokenizer = policy(reference_name, runs[reference_name][0])
    # every run of every policy: the same prompts, the same sampling seed (differences pair up per prompt)
    evaluations: dict[str, list[PolicyEval]] = {name: [] for name in names}
    with ui.TaskProgress("evaluating policies", sum(len(p) for p in runs.values()), runtime.is_main) as progress:
        for name in names:
            for path in runs[name]:
                is_reference = name == reference_name and path == runs[reference_name][0]
                model, tokenizer = (reference_model, reference_tokenizer) if is_reference else policy(name, path)
                same_tokens = tokenizer.get_vocab() == reference_tokenizer.get_vocab()
                if not same_tokens:
                    ui.note(f"policies.{name} has another tokenizer than the reference: its responses are re-tokenised for the reference's KL")
                reference = model_reference(reference_model) if same_tokens else text_reference(reference_model, reference_tokenizer)
                # several processes: each evaluates a share of the prompts (evaluate_policy gathers them)
                evaluations[name].append(evaluate_policy(
                    model, tokenizer, prompts, recipe.generation, recipe.seed, runtime.device, recipe.data.max_length, judge, proxy, reference
                ))  # fmt: skip
                if model is not reference_model:
                    del model
                    gc.collect()
                progress.advance(1)

    if not runtime.is_main:
        return {}
    responses = {name: evaluations[name][0].texts for name in names}  # samples and the human A/B: the first seed's
    summaries = {name: policy_summary(evaluations[name], evaluations[baseline]) for name in names}
    for name in names:
        summaries[name]["samples"] = [
            {"prompt": p if isinstance(p, str) else p[-1]["content"], "response": r} for p, r in list(zip(prompts, responses[name]))[: recipe.show_samples]
        ]
    quality = quality_key(evaluations[baseline])
    slope = length_slope(evaluations, SCORES[quality])
    if slope is not None:
        baseline_length = statistics.fmean(n for run in evaluations[baseline] for n in run.lengths)
        for name in names:
            summaries[name]["length_controlled"] = length_controlled(evaluations[name], SCORES[quality], slope, baseline_length)
    judge_spec = recipe.judges.chosen_judge()
    settings = evaluation_settings(recipe.data.train, len(prompts), recipe.data.max_length, recipe.generation, recipe.seed, ground_truth_name(judge_spec, recipe.judges.fluency_model))
    available = len(prompts) if recipe.data.max_rows is None else None  # all the source holds
    trajectories = {name: [run_trajectory(path, settings, available) for path in runs[name]] for name in names}
    for name, flagged in reward_hacking(evaluations, baseline).items():
        on_path = [t["run"] for t in trajectories[name] if t["hacking"] and t["hacking"]["flag"]]
        summaries[name]["reward_hacking"] = flagged or bool(on_path)
        summaries[name]["hacking_runs"] = on_path

    human = None
    if recipe.judges.human is not None:
        human = human_win_rate(recipe, run, prompts, responses)

    costs = {path_name: training_cost(entries) for path_name, entries in recipe.costs.items()}
    trained = trained_runs(runs)
    warnings = confounds(trained, recipe.generation.max_new_tokens, {name: lineage_flops(runs[name][0]) for name in trained})
    for warning in warnings:
        ui.note(f"compare: the policies are not like for like: {warning}")

    result = {
        "policies": summaries,
        "baseline": baseline,
        "reference": reference_name,
        "prompts": len(prompts),
        "judges": {"ground_truth": judge.name if judge else None, "proxy": proxy.name if proxy else None},
        "kl_estimator": KL_ESTIMATOR,
        "quality": quality,
        "methods": recipe.methods,
        "length_slope": slope,
        "confounds": warnings,
        "labelled_by": {name: labelling_judge(runs[name][0]) for name in names},
        "ceiling": ceiling(recipe.judges.ceiling, ceiling_rows, judge) if ceiling_rows and judge else None,
        "differences": differences(evaluations, baseline),
        "win_rate": f"against {baseline}, on the {'ground-truth judge' if judge else 'proxy'} scores of responses to the same prompts; ties count half",
        "confidence_intervals": (
            "95%. A policy trained once: over its responses to the prompts, mean +- 1.96 s / sqrt(n) (sampling noise only, not the "
            "noise of retraining). A policy trained with several seeds: over seeds, the mean of each run's mean +- t(n-1) s / sqrt(n), "
            "widened by the prompts' own sampling error (the seeds share the prompts; the two half-widths in quadrature). "
            "Differences pair runs by seed (a single run pairs with every seed of the other) on the same prompts; between a policy "
            "trained once and one with seeds no direction is claimed (the baseline excepted)"
        ),
        "costs": costs,
        "checkpoints": {name: [training_checkpoints(path) for path in paths] for name, paths in runs.items()},
        "evaluation": settings,
        "trajectories": trajectories,
        "human": human,
        "generation": recipe.generation.model_dump(),
    }
    paths = render_report(run, result, runs)
    summary = write_summary(
        stage="compare", run=run, runtime=runtime, started=started, results={"report": str(paths["md"])},
        highlights={"report": str(paths["md"]), "plots": ", ".join(str(p) for p in paths["plots"])},
    )  # fmt: skip
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
    return summary
