"""`dpo-cli sft`: supervised fine-tuning on prompt/completion or messages; loss on completions only."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial

from datasets import Dataset

from dpo_cli.core import ui
from dpo_cli.data.loading import DataReport, encode_rows, load_splits, require_columns
from dpo_cli.data.encoding import collate_causal, collate_padding_free, pack_examples, prompt_ids_for_generation, sft_encoder, sft_format
from dpo_cli.models.forward import CompletionLogProbs, lm_step, packed_rows_allowed
from dpo_cli.models.generate import write_samples
from dpo_cli.train.loop import batch_streams, train
from dpo_cli.models.io import save_final_model
from dpo_cli.models.build import build_causal_lm, build_tokenizer
from dpo_cli.core.recipes import SftRecipe
from dpo_cli.core.rundir import RunDir
from dpo_cli.core.runtime import setup_runtime
from dpo_cli.train.summary import Trained, write_summary
from dpo_cli.data.tokenization import ensure_chat_template


def sample_prompts(rows: Dataset, fmt: str, count: int, encoder: Callable[[dict], dict]) -> list[str | list[dict]]:
    """The prompt part of the first `count` usable rows: the prompt, or a conversation up to its last assistant turn."""
    prompts: list[str | list[dict]] = []
    for row in rows:
        if len(prompts) >= count:
            break
        if encoder(row)["problem"]:  # rows dropped from training are not sampled either
            continue
        if fmt == "messages":
            last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
            if last > 0:
                prompts.append(row["messages"][:last])
        elif row["prompt"]:
            prompts.append(row["prompt"])
    return prompts


def _is_conversational(rows: Dataset, fmt: str) -> bool:
    return fmt == "messages" or isinstance(rows[0]["prompt"], list)


def run_sft(recipe: SftRecipe, run: RunDir) -> dict:
    started = time.time()
    runtime = setup_runtime(recipe.train, recipe.seed, recipe.distributed)

    # Data: rows -> input_ids with labels = -100 on every prompt position.
    report = DataReport()
    train_rows, eval_rows = load_splits(recipe.data, recipe.seed, report)
    require_columns(train_rows, [("messages",), ("prompt", "completion")], "data.train")
    fmt = sft_format(train_rows.column_names)
    tokenizer, notes = build_tokenizer(recipe.model, recipe.tokenizer)
    if _is_conversational(train_rows, fmt):
        template_note = ensure_chat_template(tokenizer, recipe.tokenizer.chat_template)
        notes += [template_note] if template_note else []
    encoder = sft_encoder(tokenizer, fmt, recipe.data.max_length)
    train_set = encode_rows(train_rows, encoder, "data.train", recipe.data, report, "train")
    eval_set = encode_rows(eval_rows, encoder, report.eval_source, recipe.data, report, "eval") if eval_rows is not None else None
    if recipe.sft.packing:
        examples = len(train_set)
        train_set = pack_examples(train_set, recipe.data.max_length)
        notes.append(f"packed {examples} examples into {len(train_set)} rows of at most {recipe.data.max_length} tokens")

    # Model: pretrained weights (or a previous run), full / LoRA / 4-bit + LoRA.
    bundle = build_causal_lm(recipe.model, tokenizer, runtime.device, recipe.seed, cache_dir=run.path)
    padding_free, layout_notes = packed_rows_allowed("sft.padding_free", recipe.sft.padding_free and not recipe.sft.packing, [bundle.model], recipe.data.max_length)
    ui.notes(report.notes + notes + bundle.notes + layout_notes)

    # Train: the next-token loss on the completions.
    collate = partial(collate_padding_free if padding_free else collate_causal, pad_id=tokenizer.pad_token_id)
    train_stream, eval_stream = batch_streams(train_set, eval_set, collate, recipe.train, recipe.seed, runtime)
    result = train(
        stage="sft", model=CompletionLogProbs(bundle.model), train_stream=train_stream, eval_stream=eval_stream, step_fn=lm_step,
        cfg=recipe.train, run=run, runtime=runtime,
    )  # fmt: skip
    if result.trained:  # an evaluation-only run changed nothing to save
        save_final_model(run, runtime, bundle, prepared=result.model)

    # Samples: answer a few held-out prompts.
    source = eval_rows if eval_rows is not None else train_rows
    prompts = [
        (p if isinstance(p, str) else p[-1]["content"], prompt_ids_for_generation(tokenizer, p))
        for p in sample_prompts(source, fmt, recipe.sft.show_samples, encoder)
    ]
    samples = write_samples(run, runtime, bundle, prompts, recipe.generation, recipe.seed)
    results = {"data_format": "conversational" if _is_conversational(train_rows, fmt) else "prompt_completion"}
    if result.eval_metrics:
        results["eval_perplexity"] = math.exp(min(result.eval_metrics["loss"], 50.0))
    summary = write_summary(
        stage="sft", run=run, runtime=runtime, started=started, trained=Trained.from_loop(bundle.model, result), data=report, results=results
    )
    ui.samples_table(samples, "sft samples")
    return summary
