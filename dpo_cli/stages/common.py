"""Pieces every gradient stage shares: the language-model step, samples, final/ and summary.json."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from functools import partial
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from dpo_cli.costs import estimate_flops, model_shape
from dpo_cli.data import DataReport, encode_rows, load_splits
from dpo_cli.errors import UserError
from dpo_cli.generate import generate
from dpo_cli.forward import CompletionLogProbs
from dpo_cli.losses import mean_nll
from dpo_cli.encoding import collate_causal
from dpo_cli.loop import BatchStream, LoopResult, train
from dpo_cli.models import ModelBundle, build_tokenizer, count_parameters
from dpo_cli.model_io import save_final
from dpo_cli.preference_data import PROBLEM, pair_encoder, prepare_pairs
from dpo_cli.recipes import GenerationSection, TrainingRecipe
from dpo_cli.plots import plot_training
from dpo_cli.rundir import RunDir, atomic_write_jsonl, read_metrics
from dpo_cli.runtime import Runtime, library_versions, peak_memory
from dpo_cli.tokenization import chat_template_notes
from dpo_cli import distributed, ui

@dataclass
class PreferenceSets:
    """Preference pairs of a training stage: the raw rows (for samples and judges) and the encoded sets."""

    train_rows: Dataset
    eval_rows: Dataset | None
    train_set: Dataset
    eval_set: Dataset | None
    tokenizer: Any
    notes: list[str] = field(default_factory=list)


def load_preference_sets(recipe: TrainingRecipe, report: DataReport, max_prompt_length: int | None, with_margin: bool = False) -> PreferenceSets:
    """dpo and rm-train data: rows checked (implicit prompts split, ties dropped), tokenised, truncated."""
    train_rows, eval_rows = load_splits(recipe.data, recipe.seed, report)
    train_rows = prepare_pairs(train_rows, "data.train", report, "train")
    eval_rows = prepare_pairs(eval_rows, report.eval_source, report, "eval") if eval_rows is not None else None
    if with_margin and "margin" not in train_rows.column_names:
        raise UserError("rm.margin: data.train has no `margin` column (map yours with data.columns.margin=NAME)")
    tokenizer, notes = build_tokenizer(recipe.model, recipe.tokenizer)
    prompts = list(train_rows["prompt"]) + (list(eval_rows["prompt"]) if eval_rows is not None else [])
    notes += chat_template_notes(tokenizer, recipe.tokenizer.chat_template, prompts)
    encoder = pair_encoder(tokenizer, recipe.data.max_length, max_prompt_length, with_margin=with_margin)
    train_set = encode_rows(train_rows, encoder, "data.train", recipe.data, report, "train")
    eval_set = encode_rows(eval_rows, encoder, report.eval_source, recipe.data, report, "eval") if eval_rows is not None else None
    readable = lambda rows: rows.filter(lambda row: not row[PROBLEM]) if rows is not None and PROBLEM in rows.column_names else rows  # noqa: E731
    return PreferenceSets(readable(train_rows), readable(eval_rows), train_set, eval_set, tokenizer, notes)  # samples and judges read these


def lm_step(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Next-token loss on the batch's labels (pretrain and sft). `model` is a CompletionLogProbs: only
    labelled positions go through the output head."""
    sequence_logps, target_counts = model(batch["input_ids"], batch.get("attention_mask"), batch["labels"], batch.get("position_ids"))
    loss, _ = mean_nll(sequence_logps, target_counts)
    return loss, {}


def train_language_model(
    stage: str,
    recipe: TrainingRecipe,
    bundle: ModelBundle,
    train_set: Dataset,
    eval_set: Dataset | None,
    run: RunDir,
    runtime: Runtime,
    on_checkpoint: Callable[[Any], None] | None = None,
) -> LoopResult:
    """The shared loop with the next-token step, over tokenised rows (pretrain and sft)."""
    collate = partial(collate_causal, pad_id=bundle.tokenizer.pad_token_id)
    eval_batch_size = recipe.train.eval_batch_size or recipe.train.batch_size
    return train(
        stage=stage,
        model=CompletionLogProbs(bundle.model),
        train_stream=BatchStream(train_set, recipe.train.batch_size, recipe.seed, collate, rank=runtime.rank, world_size=runtime.world_size),
        eval_stream=BatchStream(eval_set, eval_batch_size, recipe.seed, collate, shuffle=False) if eval_set is not None else None,
        step_fn=lm_step,
        cfg=recipe.train,
        run=run,
        runtime=runtime,
        on_checkpoint=on_checkpoint,
    )


def write_samples(
    run: RunDir,
    runtime: Runtime,
    bundle: ModelBundle,
    prompts: list[tuple[str, list[int]]],
    cfg: GenerationSection,
    seed: int,
) -> list[dict[str, str]]:
    """Sample a response per (display text, token ids) prompt; saved to RUN/samples.jsonl."""
    if not prompts:
        return []
    model = runtime.accelerator.unwrap_model(bundle.model)
    generations = generate(model, bundle.tokenizer, [ids for _, ids in prompts], cfg, seed, runtime.device)
    samples = [{"prompt": text, "response": g.text.strip()} for (text, _), g in zip(prompts, generations)]
    if runtime.is_main:
        atomic_write_jsonl(run.path / "samples.jsonl", samples)
    return samples


def save_final_model(run: RunDir, runtime: Runtime, bundle: ModelBundle, prepared: torch.nn.Module | None = None) -> None:
    """final/ from the main process. With FSDP / DeepSpeed ZeRO-3 every process holds a shard: all of them
    gather the full state dict (`prepared` is the model as the loop trained it), the main one writes it."""
    state_dict = None
    if runtime.sharded and prepared is not None:
        gathered = runtime.accelerator.get_state_dict(prepared)
        # the loop trains a wrapper (CompletionLogProbs, RewardScores): keep the keys under bundle.model
        inner = runtime.accelerator.unwrap_model(bundle.model)
        name = next((n for n, m in runtime.accelerator.unwrap_model(prepared).named_modules() if m is inner), "")
        prefix = f"{name}." if name else ""
        state_dict = {key[len(prefix):]: value for key, value in gathered.items() if key.startswith(prefix)}
    if runtime.is_main:
        with run.new_final() as folder:
            save_final(runtime.accelerator.unwrap_model(bundle.model), bundle, folder, state_dict)
        if bundle.merge_on_save is not None and bundle.base_ref is not None and Path(bundle.base_ref).is_relative_to(run.path):
            shutil.rmtree(bundle.base_ref, ignore_errors=True)  # merged into final/: a cache for resume no more (a full model's size)
    distributed.barrier()


def summarize(
    *,
    stage: str,
    run: RunDir,
    runtime: Runtime,
    bundle: ModelBundle,
    result: LoopResult,
    report: DataReport,
    started: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write summary.json (status completed) and print the summary table."""
    trainable, total = count_parameters(bundle.model)
    peak, peak_kind = peak_memory(runtime.device)
    state = result.state
    extra = dict(extra or {})
    compute = {**model_shape(bundle.model), "context": state.tokens / max(state.sequences, 1), "train_tokens": state.tokens}
    compute.update(extra.pop("compute", {}))  # forward-only passes and other models, from the stage
    summary = {
        "stage": stage,
        "status": "completed",
        "run_dir": str(run.path),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(time.time() - started, 3),
        "train_time_s": round(state.train_seconds, 3),
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "tokens": state.tokens,
        "items": state.items,
        "tokens_per_sec": state.tokens / max(state.train_seconds, 1e-9),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "device": runtime.device_name(),
        "mixed_precision": runtime.mixed_precision,
        "parameters": {"trainable": trainable, "total": total},
        "final_metrics": result.last_train_metrics,
        "eval_metrics": result.eval_metrics,
        "data": report.as_dict(),
        "final_dir": str(run.final_dir),
        "compute": compute,
        "estimated_flops": estimate_flops(compute),
        "versions": library_versions(),
        **extra,
    }
    if runtime.is_main:
        plot = plot_training(read_metrics(run.metrics_path), run.path / "training.png", f"{stage} · {run.path.name}")
        summary["plot"] = str(plot) if plot else None
        run.write_summary(summary)
    ui.summary_table(summary)
    return summary


def announce(notes: list[str]) -> None:
    for message in notes:
        ui.note(message)
