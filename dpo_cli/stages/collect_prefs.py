"""`dpo-cli collect-prefs`: sample the policy, form pairs, have a person, a reward model or a judge pick the
better response, and write prefs.jsonl + stats.json. Or import an existing preference dataset.

Phases: prompts -> candidates (sampled once, saved) -> pairs -> labels (an fsynced, append-only log) -> records.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from dpo_cli.core import distributed, ui
from dpo_cli.data.loading import DataReport, check_bad_rows, load_prompts, load_splits
from dpo_cli.data.encoding import prompt_ids_for_generation
from dpo_cli.core.errors import UserError
from dpo_cli.models.generate import generate
from dpo_cli.data.human import label_by_hand, require_terminal, resolve_annotator
from dpo_cli.eval.judges import Judge, bradley_terry_choice, build_judge, reward_model_judge, score_in_shards
from dpo_cli.data.labels import LabelLog, now
from dpo_cli.data.tokenization import chat_template_notes
from dpo_cli.models.build import build_causal_lm, build_tokenizer
from dpo_cli.data.prefs import Pair, build_records, form_pairs, preference_stats
from dpo_cli.data.prefs_import import convert_rows, detect_format
from dpo_cli.core.recipes import CollectPrefsRecipe, TrainSection
from dpo_cli.core.rundir import RunDir
from dpo_cli.core.atomic import atomic_write_json, atomic_write_jsonl
from dpo_cli.core.runtime import Runtime, setup_runtime
from dpo_cli.train.summary import write_summary


def _read_jsonl(path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sample_candidates(recipe: CollectPrefsRecipe, run: RunDir, runtime: Runtime, prompts: list[Any], report: DataReport) -> list[dict]:
    """`samples_per_prompt` responses per prompt, saved to candidates.jsonl before any labelling (reused on rerun).
    With several processes each samples its share of the prompts; the main process writes them all."""
    path = run.path / "candidates.jsonl"
    if distributed.main_has(path):
        return _read_jsonl(path)
    tokenizer, notes = build_tokenizer(recipe.model, recipe.tokenizer)
    notes += report.notes + chat_template_notes(tokenizer, recipe.tokenizer.chat_template, prompts)
    bundle = build_causal_lm(recipe.model, tokenizer, runtime.device, recipe.seed, cache_dir=run.path)
    for message in notes + bundle.notes:
        ui.note(message)
    encoded, kept, too_long = [], [], 0
    for prompt in prompts:
        ids = prompt_ids_for_generation(tokenizer, prompt)
        if len(ids) > recipe.data.max_length:
            too_long += 1
            if recipe.data.truncation == "error":
                raise UserError(f"data.train: a prompt is {len(ids)} tokens, over data.max_length={recipe.data.max_length}")
            if recipe.data.truncation == "drop":
                continue
            ids = ids[-recipe.data.max_length :]  # keep the end of the prompt, next to the response
        encoded.append(ids)
        kept.append(prompt)
    if too_long:
        (report.dropped if recipe.data.truncation == "drop" else report.truncated)["prompts/too_long"] = too_long
    n = recipe.collect.samples_per_prompt
    share = distributed.shard(len(encoded))
    repeated = [ids for ids in encoded[share.start : share.stop] for _ in range(n)]
    with ui.TaskProgress("sampling", len(repeated), runtime.is_main) as progress:
        seed = recipe.seed + 1_000_003 * runtime.rank  # each process's own stream
        generations = distributed.gather(generate(bundle.model, tokenizer, repeated, recipe.generation, seed, runtime.device, progress.advance))
    candidates = [
        {
            "prompt_index": index,
            "prompt": prompt,
            "responses": [g.text for g in generations[index * n : (index + 1) * n]],
            "finished": [g.finished for g in generations[index * n : (index + 1) * n]],
        }
        for index, prompt in enumerate(kept)
    ]
    if runtime.is_main:
        atomic_write_jsonl(path, candidates)
    return candidates


def machine_judge(recipe: CollectPrefsRecipe, runtime: Runtime, judge: Judge | None) -> Judge:
    """The judge built at the start, or the reward model, loaded only now that sampling has freed the policy."""
    if judge is not None:
        return judge
    return reward_model_judge(recipe.label.reward_model, runtime.device, "label.reward_model", recipe.label.batch_size)


def label_by_scores(recipe: CollectPrefsRecipe, judge: Judge, pairs: list[Pair], log: LabelLog | None, runtime: Runtime) -> dict[str, int]:
    """Score each response once, then choose per pair (Bradley-Terry noise seeded per pair). A pair whose
    score failed is reported and skipped, never labelled. With several processes all score a share of what
    the main process has left to label; only it (`log` elsewhere None) writes labels."""
    standing = log.active() if log is not None else set()
    pending = [p for p in pairs if (p.pair_id, judge.name) not in standing]
    keys, prompts, responses = {}, [], []
    for pair in pending:
        for response in (pair.a, pair.b):
            key = (json.dumps(pair.prompt), response)
            if key not in keys:
                keys[key] = len(responses)
                prompts.append(pair.prompt)
                responses.append(response)
    prompts, responses = distributed.broadcast((prompts, responses))
    with ui.TaskProgress("scoring", len(responses), runtime.is_main) as progress:
        scores = score_in_shards(judge, prompts, responses)
        progress.advance(len(responses))
    if log is None:
        return {}
    failed = 0
    for pair in pending:
        index_a, index_b = keys[(json.dumps(pair.prompt), pair.a)], keys[(json.dumps(pair.prompt), pair.b)]
        score_a, score_b = scores.values[index_a], scores.values[index_b]
        if score_a is None or score_b is None:
            failed += 1
            if failed <= 3:
                ui.note(f"pair {pair.pair_id} skipped: {scores.errors.get(index_a) or scores.errors.get(index_b)}")
            continue
        rng = random.Random(f"{recipe.seed}:label:{pair.pair_id}")
        choice = bradley_terry_choice(score_a, score_b, recipe.label.noise, recipe.label.tie_margin, rng)
        log.label(pair.pair_id, judge.name, choice, judge.name, scores=(score_a, score_b), sync=False)
    log.sync()
    if failed > 3:
        ui.note(f"... {failed} pairs in all were skipped because the judge failed on them")
    return {"judge_failed": failed} if failed else {}


def write_outputs(run: RunDir, records: list[dict[str, Any]], stats: dict[str, Any]) -> None:
    atomic_write_jsonl(run.path / "prefs.jsonl", records)
    atomic_write_json(run.path / "stats.json", stats)


def finish(run: RunDir, recipe: CollectPrefsRecipe, status: str, started: float, stats: dict, report: DataReport, runtime: Runtime) -> dict:
    highlights = {
        "pairs": stats["pairs"],
        "labels": stats["labels"],
        "records written": stats["records"],
        "ties": stats["ties"],
        "skips": stats["skips"],
        **{f"left out: {k}": v for k, v in stats["left_out"].items()},
        "chosen mean words": stats["length_bias"]["chosen_mean_words"],
        "rejected mean words": stats["length_bias"]["rejected_mean_words"],
    }
    results = {"pairs": stats["pairs"], "records": stats["records"], "prefs": str(run.path / "prefs.jsonl"), "stats": str(run.path / "stats.json")}
    summary = write_summary(stage="collect-prefs", run=run, runtime=runtime, started=started, status=status, data=report, results=results, highlights=highlights)
    for row in stats["agreement"]:
        kappa = row["cohen_kappa"]
        ui.note(
            f"agreement {row['annotators'][0]} vs {row['annotators'][1]} on {row['overlap']} pairs: "
            f"{row['percent_agreement']:.1f}%, Cohen's kappa {'n/a' if kappa is None else f'{kappa:.3f}'}"
        )
    return summary


def import_prefs(recipe: CollectPrefsRecipe, run: RunDir, runtime: Runtime, started: float) -> dict:
    report = DataReport()
    rows, _ = load_splits(recipe.data, recipe.seed, report)
    fmt = detect_format(rows.column_names) if recipe.collect.import_format == "auto" else recipe.collect.import_format
    source = recipe.data.train if isinstance(recipe.data.train, str) else ",".join(getattr(s, "path", s) for s in recipe.data.train)
    records, problems = convert_rows(rows, fmt, recipe.seed, now(), source)
    check_bad_rows(problems, "data.train", recipe.data)
    if problems:
        report.dropped["import/malformed"] = len(problems)
    if not records:
        raise UserError("data.train: no preference pair could be imported")
    ui.note(f"imported {len(records)} pairs in {fmt} format")
    stats = preference_stats([], [], records, {"malformed": len(problems)} if problems else {})
    stats["pairs"] = len(rows)
    write_outputs(run, records, stats)
    return finish(run, recipe, "completed", started, stats, report, runtime)


def run_collect_prefs(recipe: CollectPrefsRecipe, run: RunDir) -> dict:
    started = time.time()
    runtime = setup_runtime(TrainSection(), recipe.seed)
    if recipe.collect.source == "import":
        return import_prefs(recipe, run, runtime, started) if runtime.is_main else {}

    report = DataReport()
    prompts = load_prompts(recipe.data, recipe.seed, report)
    if recipe.label.by == "human":
        if runtime.world_size > 1:
            raise UserError("label.by: human labelling runs in one process; start it without torchrun / accelerate launch")
        require_terminal()  # refuse before sampling, not after
    judge = build_judge(recipe.label.chosen_judge()) if recipe.label.by == "judge" else None  # user code: said before sampling
    candidates = sample_candidates(recipe, run, runtime, prompts, report)
    if not runtime.is_main:  # the others helped sample, and score with a machine judge; the main process writes
        if recipe.label.by != "human":
            label_by_scores(recipe, machine_judge(recipe, runtime, judge), form_pairs(candidates, recipe.collect.pairs_per_prompt, recipe.seed)[0], None, runtime)
        return {}
    pairs, identical = form_pairs(candidates, recipe.collect.pairs_per_prompt, recipe.seed)
    if not (run.path / "pairs.jsonl").exists():
        atomic_write_jsonl(run.path / "pairs.jsonl", [p.as_dict() for p in pairs])
    left_out = {"identical_responses": identical} if identical else {}

    log = LabelLog(run.path / "labels.jsonl")
    for problem in log.problems():
        ui.note(problem)
    try:
        if recipe.label.by == "human":
            annotator = resolve_annotator(recipe.label.annotator)
            outcome = label_by_hand(pairs, log, annotator, recipe.seed, ui.console)
            done = sum(1 for p in pairs if (p.pair_id, annotator) in log.active())
            status = "completed" if outcome == "done" else "partial"
            ui.note(f"{annotator}: {done} / {len(pairs)} labelled" + ("" if status == "completed" else "; run the same command to continue"))
        else:
            left_out.update(label_by_scores(recipe, machine_judge(recipe, runtime, judge), pairs, log, runtime))
            status = "completed"
        standing = log.active_events()
    finally:
        log.close()
    provenance = {
        "generation": {
            "model": recipe.model.name_or_path,
            **recipe.generation.model_dump(exclude={"batch_size"}),
            "samples_per_prompt": recipe.collect.samples_per_prompt,
            "seed": recipe.seed,
        }
    }
    records, counts = build_records(pairs, standing, recipe.label.aggregate, recipe.label.ties, provenance)
    stats = preference_stats(pairs, standing, records, {**left_out, **counts})
    write_outputs(run, records, stats)
    return finish(run, recipe, status, started, stats, report, runtime)
