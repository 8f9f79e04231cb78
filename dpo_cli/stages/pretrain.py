"""`dpo-cli pretrain`: next-token training on raw text packed into fixed-length blocks."""

from __future__ import annotations

import math
import os
import shutil
import time
from functools import partial

from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dpo_cli.core import distributed, ui
from dpo_cli.data.loading import DataReport, encode_rows, load_splits, require_columns
from dpo_cli.data.encoding import collate_causal, pack_blocks, text_checker, text_encoder
from dpo_cli.core.errors import UserError
from dpo_cli.models.forward import CompletionLogProbs, lm_step
from dpo_cli.models.generate import write_samples
from dpo_cli.train.loop import batch_streams, train
from dpo_cli.models.io import save_final_model
from dpo_cli.models.build import build_causal_lm, build_tokenizer
from dpo_cli.core.recipes import PretrainRecipe
from dpo_cli.core.rundir import RunDir
from dpo_cli.core.runtime import setup_runtime
from dpo_cli.train.summary import Trained, write_summary
from dpo_cli.data.tokenization import train_bpe_tokenizer


def pretrain_tokenizer(recipe: PretrainRecipe, run: RunDir, texts: Dataset) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """The model's tokenizer, or a BPE trained on the corpus once and kept in RUN/tokenizer (reused on resume)."""
    if recipe.tokenizer.train_vocab_size is None:
        return build_tokenizer(recipe.model, recipe.tokenizer)
    saved = run.path / "tokenizer"
    with distributed.main_first():  # trained once, by the main process; the others load it
        if not saved.is_dir():
            tokenizer = train_bpe_tokenizer(texts["text"], recipe.tokenizer.train_vocab_size, recipe.data.max_length)
            tmp = run.path / f".tmp-tokenizer-{os.getpid()}"
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(saved, ignore_errors=True)
            os.replace(tmp, saved)
    tokenizer = AutoTokenizer.from_pretrained(saved)
    return tokenizer, [f"trained a {len(tokenizer)}-token byte-level BPE tokenizer on the corpus ({saved})"]


def run_pretrain(recipe: PretrainRecipe, run: RunDir) -> dict:
    started = time.time()
    runtime = setup_runtime(recipe.train, recipe.seed, recipe.distributed)
    block = recipe.data.max_length

    # Data: documents -> EOS-separated token stream -> blocks of max_length tokens.
    report = DataReport()
    train_rows, eval_rows = load_splits(recipe.data, recipe.seed, report)
    require_columns(train_rows, [("text",)], "data.train")
    train_rows = encode_rows(train_rows, text_checker, "data.train", recipe.data, report, "train")
    if eval_rows is not None:
        require_columns(eval_rows, [("text",)], report.eval_source)
        eval_rows = encode_rows(eval_rows, text_checker, report.eval_source, recipe.data, report, "eval")
    tokenizer, notes = pretrain_tokenizer(recipe, run, train_rows)
    encode = text_encoder(tokenizer)
    train_set = pack_blocks(encode_rows(train_rows, encode, "data.train", recipe.data, report, "train"), block)
    if len(train_set) == 0:
        raise UserError(f"data.train: fewer tokens than one block of data.max_length={block}; add text or lower max_length")
    eval_set = None
    if eval_rows is not None:
        eval_set = pack_blocks(encode_rows(eval_rows, encode, report.eval_source, recipe.data, report, "eval"), block)
        if len(eval_set) == 0:
            notes.append(f"the eval text is shorter than one block of {block} tokens; no eval")
            eval_set = None
    report.rows["train_blocks"] = len(train_set)

    # Model: new from model.init, or continued from pretrained weights.
    bundle = build_causal_lm(recipe.model, tokenizer, runtime.device, recipe.seed, cache_dir=run.path)
    ui.notes(report.notes + notes + bundle.notes)

    # Train: the next-token loss on every block; each checkpoint carries the tokenizer.
    collate = partial(collate_causal, pad_id=tokenizer.pad_token_id)
    train_stream, eval_stream = batch_streams(train_set, eval_set, collate, recipe.train, recipe.seed, runtime)
    result = train(
        stage="pretrain", model=CompletionLogProbs(bundle.model), train_stream=train_stream, eval_stream=eval_stream, step_fn=lm_step,
        cfg=recipe.train, run=run, runtime=runtime, on_checkpoint=lambda folder: tokenizer.save_pretrained(folder / "tokenizer"),
    )  # fmt: skip
    if result.trained:  # an evaluation-only run changed nothing to save
        save_final_model(run, runtime, bundle, prepared=result.model)

    # Samples: continue the opening words of a few held-out documents.
    source = eval_rows if eval_rows is not None else train_rows
    openings = [" ".join(text.split()[:4]) for text in source["text"][: recipe.pretrain.show_samples]]
    prompts = [(text, tokenizer(text)["input_ids"]) for text in openings if text]
    samples = write_samples(run, runtime, bundle, prompts, recipe.generation, recipe.seed)
    results = {"eval_perplexity": math.exp(min(result.eval_metrics["loss"], 50.0))} if result.eval_metrics else {}
    summary = write_summary(
        stage="pretrain", run=run, runtime=runtime, started=started, trained=Trained.from_loop(bundle.model, result), data=report, results=results
    )
    ui.samples_table(samples, "pretrain samples")
    return summary
