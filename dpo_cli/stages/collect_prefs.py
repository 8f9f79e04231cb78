"""`dpo-cli collect-prefs`: sample the policy, form pairs, have a person, a reward model or a judge pick the
better response, and write prefs.jsonl + stats.json. Or import an existing preference dataset.

Phases: prompts -> candidates (sampled once, saved) -> pairs -> labels (an fsynced, append-only log) -> records.
"""

from __future__ import annotations

import hashlib
import json
import random
import shlex
import time
from typing import Any

from dpo_cli.core import distributed, ui
from dpo_cli.data.loading import DataReport, check_bad_rows, load_prompts, load_splits
from dpo_cli.data.encoding import prompt_ids_for_generation
from dpo_cli.core.errors import UserError
from dpo_cli.models.generate import generate
from dpo_cli.data.human import label_by_hand, label_thumbs_by_hand, require_terminal, resolve_annotator
from dpo_cli.eval.costs import estimate_flops, model_shape
from dpo_cli.eval.judges import Judge, bradley_terry_choice, build_judge, reward_model_judge, score_in_shards
from dpo_cli.data.labels import LabelLog, now
from dpo_cli.data.tokenization import chat_template_notes
from dpo_cli.models.build import build_causal_lm, build_tokenizer
from dpo_cli.data.prefs import Pair, build_records, form_pairs, preference_stats
from dpo_cli.data.thumbs import Item, build_thumb_records, form_items, median_threshold, thumb_choice, thumb_stats
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
        tokens = sum(len(g.prompt_ids) + len(g.response_ids) for g in generations)  # forward passes, KV-cached
        compute = {**model_shape(bundle.model), "context": tokens / max(len(generations), 1), "train_tokens": 0, "forward_tokens": tokens}
        atomic_write_json(run.path / "sampling.json", {"samples": len(generations), "compute": compute})  # what compare counts as its cost
        atomic_write_jsonl(path, candidates)
    return candidates


def sampling_cost(run: RunDir) -> dict[str, Any]:
    """The sampling's share of the summary: responses sampled, the policy held, and the FLOPs of sampling and
    of a reward model's labelling passes (a judge's cost is not counted)."""
    path = run.path / "sampling.json"
    if not path.is_file():
        return {}
    sampling = json.loads(path.read_text())
    compute = dict(sampling["compute"])
    labelling = run.path / "labelling.json"
    if labelling.is_file():  # the reward model read every sample once: about the tokens sampling processed
        compute["extra"] = [{**json.loads(labelling.read_text())["reward_model"], "context": compute["context"], "tokens": compute["forward_tokens"]}]
    return {"samples": sampling["samples"], "models": ["policy"], "compute": compute, "estimated_flops": estimate_flops(compute)}


def machine_judge(recipe: CollectPrefsRecipe, runtime: Runtime, judge: Judge | None) -> Judge:
    """The judge built at the start, or the reward model, loaded only now that sampling has freed the policy."""
    if judge is not None:
        return judge
    return reward_model_judge(recipe.label.reward_model, runtime.device, "label.reward_model", recipe.label.batch_size)


def score_once(judge: Judge, wanted: list[tuple[Any, str]], runtime: Runtime) -> tuple[dict[tuple[str, str], int], Any]:
    """Each distinct (prompt, response) scored once, the processes sharing the work (the main process's list
    is everyone's): where each one's score is, and the scores."""
    keys: dict[tuple[str, str], int] = {}
    prompts, responses = [], []
    for prompt, response in wanted:
        key = (json.dumps(prompt), response)
        if key not in keys:
            keys[key] = len(responses)
            prompts.append(prompt)
            responses.append(response)
    prompts, responses = distributed.broadcast((prompts, responses))
    with ui.TaskProgress("scoring", len(responses), runtime.is_main) as progress:
        scores = score_in_shards(judge, prompts, responses)
        progress.advance(len(responses))
    return keys, scores


def label_by_scores(recipe: CollectPrefsRecipe, judge: Judge, pairs: list[Pair], log: LabelLog | None, runtime: Runtime) -> dict[str, int]:
    """Score each response once, then choose per pair (Bradley-Terry noise seeded per pair). A pair whose
    score failed is reported and skipped, never labelled. With several processes all score a share of what
    the main process has left to label; only it (`log` elsewhere None) writes labels."""
    standing = log.active() if log is not None else set()
    pending = [p for p in pairs if (p.pair_id, judge.name) not in standing]
    keys, scores = score_once(judge, [(pair.prompt, response) for pair in pending for response in (pair.a, pair.b)], runtime)
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


def pair_highlights(stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "pairs": stats["pairs"],
        "labels": stats["labels"],
        "records written": stats["records"],
        "ties": stats["ties"],
        "skips": stats["skips"],
        **{f"left out: {k}": v for k, v in stats["left_out"].items()},
        "chosen mean words": stats["length_bias"]["chosen_mean_words"],
        "rejected mean words": stats["length_bias"]["rejected_mean_words"],
    }


def thumb_highlights(stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "responses": stats["items"],
        "labels": stats["labels"],
        "records written": stats["records"],
        "thumbs up": stats["desirable"],
        "thumbs down": stats["undesirable"],
        "skips": stats["skips"],
        **{f"left out: {k}": v for k, v in stats["left_out"].items()},
        "up mean words": stats["length_bias"]["desirable_mean_words"],
        "down mean words": stats["length_bias"]["undesirable_mean_words"],
    }


def finish(run: RunDir, status: str, started: float, stats: dict, report: DataReport, runtime: Runtime) -> dict:
    thumbs = "items" in stats
    highlights = thumb_highlights(stats) if thumbs else pair_highlights(stats)
    counted = {"examples": stats["records"], "desirable": stats["desirable"]} if thumbs else {"pairs": stats["pairs"]}
    results = {**counted, "records": stats["records"], "prefs": str(run.path / "prefs.jsonl"), "stats": str(run.path / "stats.json"), **sampling_cost(run)}
    summary = write_summary(stage="collect-prefs", run=run, runtime=runtime, started=started, status=status, data=report, results=results, highlights=highlights)
    for row in stats["agreement"]:
        kappa = row["cohen_kappa"]
        ui.note(
            f"agreement {row['annotators'][0]} vs {row['annotators'][1]} on {row['overlap']} {'responses' if thumbs else 'pairs'}: "
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
    return finish(run, "completed", started, stats, report, runtime)


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
        if recipe.label.serve:
            from dpo_cli.data.web import check_address, require_web

            require_web()
            check_address(recipe.label.host, recipe.label.port)  # a port in use is said now, not after sampling
        else:
            require_terminal()  # refuse before sampling, not after
    judge = build_judge(recipe.label.chosen_judge()) if recipe.label.by == "judge" else None  # user code: said before sampling
    candidates = sample_candidates(recipe, run, runtime, prompts, report)
    thumbs = recipe.collect.mode == "thumbs"
    if thumbs:
        units, left_out = form_items(candidates)
        units_file = "items.jsonl"
    else:
        units, left_out = form_pairs(candidates, recipe.collect.pairs_per_prompt, recipe.seed)
        units_file = "pairs.jsonl"
    label_by_machine = label_thumbs_by_scores if thumbs else label_by_scores
    if not runtime.is_main:  # the others helped sample, and score with a machine judge; the main process writes
        if recipe.label.by != "human":
            label_by_machine(recipe, machine_judge(recipe, runtime, judge), units, None, runtime)
        return {}
    if not (run.path / units_file).exists():
        atomic_write_jsonl(run.path / units_file, [u.as_dict() for u in units])

    provenance = {
        "generation": {
            "model": recipe.model.name_or_path,
            **recipe.generation.model_dump(exclude={"batch_size"}),
            "samples_per_prompt": recipe.collect.samples_per_prompt,
            "seed": recipe.seed,
        }
    }
    log = LabelLog(run.path / "labels.jsonl")
    for problem in log.problems():
        ui.note(problem)
    try:
        if recipe.label.serve:
            status = serve_units(recipe, run, units, log, provenance)
        elif recipe.label.by == "human":
            annotator = resolve_annotator(recipe.label.annotator)
            if thumbs:
                outcome = label_thumbs_by_hand(units, log, annotator, ui.console)
            else:
                outcome = label_by_hand(units, log, annotator, recipe.seed, ui.console)
            labelled = log.active()
            done = sum(1 for unit in units if (unit_key(unit), annotator) in labelled)
            status = "completed" if outcome == "done" else "partial"
            ui.note(f"{annotator}: {done} / {len(units)} labelled" + ("" if status == "completed" else "; run the same command to continue"))
        else:
            machine = machine_judge(recipe, runtime, judge)
            left_out.update(label_by_machine(recipe, machine, units, log, runtime))
            scorer = getattr(machine, "scorer", None)  # a reward model: its passes are part of the labelling's cost
            if scorer is not None:
                atomic_write_json(run.path / "labelling.json", {"reward_model": model_shape(scorer.model)})
            status = "completed"
        standing = log.active_events()
    finally:
        log.close()
    if thumbs:
        records, counts = build_thumb_records(units, standing, recipe.label.aggregate, provenance)
        stats = thumb_stats(units, standing, records, {**left_out, **counts})
    else:
        records, counts = build_records(units, standing, recipe.label.aggregate, recipe.label.ties, provenance)
        stats = preference_stats(units, standing, records, {**left_out, **counts})
    write_outputs(run, records, stats)
    return finish(run, status, started, stats, report, runtime)


def unit_key(unit: Pair | Item) -> str:
    return unit.item_id if isinstance(unit, Item) else unit.pair_id


def label_thumbs_by_scores(recipe: CollectPrefsRecipe, judge: Judge, items: list[Item], log: LabelLog | None, runtime: Runtime) -> dict[str, int]:
    """Score each response once; a thumbs up at or above label.threshold (default: the median score of all
    the run's responses), with label.noise seeded per item. As label_by_scores otherwise."""
    standing = log.active() if log is not None else set()
    keys, all_scores = score_once(judge, [(item.prompt, item.response) for item in items], runtime)  # the median needs them all
    threshold = recipe.label.threshold if recipe.label.threshold is not None else median_threshold(all_scores.values)
    if log is None:
        return {}
    failed = 0
    for item in items:
        if (item.item_id, judge.name) in standing:
            continue
        index = keys[(json.dumps(item.prompt), item.response)]
        score = all_scores.values[index]
        if score is None:
            failed += 1
            if failed <= 3:
                ui.note(f"response {item.item_id} skipped: {all_scores.errors.get(index)}")
            continue
        choice = thumb_choice(score, threshold, recipe.label.noise, random.Random(f"{recipe.seed}:thumb:{item.item_id}"))
        log.label(item.item_id, judge.name, choice, judge.name, scores=(score, threshold), sync=False)  # the bar it was held to, logged
    log.sync()
    ui.note(f"thumbs up at a score of {threshold:.4g} or more" + (" (the median score)" if recipe.label.threshold is None else " (label.threshold)"))
    return {"judge_failed": failed} if failed else {}


def serve_units(recipe: CollectPrefsRecipe, run: RunDir, units: list[Pair] | list[Item], log: LabelLog, provenance: dict[str, Any]) -> str:
    """Label in browsers until the server is stopped (Ctrl-C, SIGTERM): 'completed' when every annotator
    labelled everything given them, else 'partial' (the same command serves each one from where they stopped).
    `units`: pairs, or single responses for a thumbs up or down."""
    from dpo_cli.data.assignment import assign
    from dpo_cli.data.web import ADMIN, Desk, load_tokens, records_of, serve

    annotators = recipe.label.annotators or [resolve_annotator(recipe.label.annotator)]
    labelled: dict[str, set[str]] = {}
    for unit_id, name in log.active():  # labels given before (a restart, the terminal) stay with their labellers
        labelled.setdefault(unit_id, set()).add(name)
    queues = assign([unit_key(u) for u in units], annotators, recipe.label.overlap, recipe.seed, labelled)
    tokens = load_tokens(run.path / "serve-tokens.json", annotators)
    admin_token = next(token for token, name in tokens.items() if name == ADMIN)
    data = f"--set data.train={shlex.quote(str(run.path))}"
    if recipe.collect.mode == "thumbs":  # unpaired examples: KTO trains on them
        hint = [f"dpo-cli dpo RECIPE {data} --set dpo.loss=kto"]
    else:
        hint = [f"dpo-cli rm-train RECIPE {data}", f"dpo-cli dpo RECIPE {data}"]
    desk = Desk(
        units={unit_key(u): u for u in units}, queues=queues, log=log, seed=recipe.seed, tokens=tokens,
        csrf_key=hashlib.sha256(f"csrf:{admin_token}".encode()).digest(), records=records_of(units, log, recipe.label.aggregate, recipe.label.ties, provenance),
        train_hint=hint,
    )  # fmt: skip
    serve(desk, recipe.label.host, recipe.label.port, lambda line: ui.console.print(line, markup=False, highlight=False, soft_wrap=True))
    standing = log.active()
    done = all((unit_id, name) in standing for name, queue in queues.items() for unit_id in queue)
    ui.note(f"labelling server stopped: {sum(1 for key in standing if key[1] in queues)} labels stand" + ("" if done else "; the same command serves the rest"))
    return "completed" if done else "partial"
