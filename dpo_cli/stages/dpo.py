"""`dpo-cli dpo`: Direct Preference Optimization. The policy is its own reward model; the reference is the
initial policy (under LoRA: the same weights with the adapter switched off, no second copy)."""

from __future__ import annotations

import json
import time
from functools import partial
from typing import Any

import torch

from dpo_cli.core import distributed, ui
from dpo_cli.data.loading import DataReport
from dpo_cli.data.encoding import prompt_ids_for_generation
from dpo_cli.eval.evaluation import periodic_evaluator
from dpo_cli.models.forward import CompletionLogProbs, packed_rows_allowed, pair_logps
from dpo_cli.models.generate import generate
from dpo_cli.train.loop import StepFn, batch_streams, train
from dpo_cli.train.reference_logps import ReferenceCache, attach_reference_logps
from dpo_cli.losses import REFERENCE_FREE_LOSSES, dpo_loss, kto_kl, kto_loss, mean_token_logps, orpo_loss, simpo_loss, with_chosen_nll
from dpo_cli.models.io import save_final_model
from dpo_cli.models.build import ModelBundle, build_causal_lm
from dpo_cli.data.preference_pairs import collate_pairs, collate_shared_pairs, load_preference_sets
from dpo_cli.data.unpaired import load_example_sets
from dpo_cli.core.recipes import DpoRecipe, DpoSection
from dpo_cli.models.roles import Reference, build_reference
from dpo_cli.core.rundir import RunDir
from dpo_cli.core.atomic import atomic_write_jsonl
from dpo_cli.core.runtime import Runtime, setup_runtime
from dpo_cli.train.summary import Compute, Trained, write_summary


def make_step(cfg: DpoSection, reference: Reference) -> StepFn:
    def step(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        policy_logps, counts = pair_logps(model, batch)  # (2B,), (2B,): chosen first, then rejected
        pairs = policy_logps.size(0) // 2
        chosen, rejected, chosen_counts, rejected_counts = policy_logps[:pairs], policy_logps[pairs:], counts[:pairs], counts[pairs:]
        if cfg.loss == "kto":  # the rows' own completions as `chosen`, the mismatched ones as `rejected` (data.unpaired)
            ref_logps = batch["ref_logps"].to(policy_logps.dtype) if "ref_logps" in batch else reference(batch)[0]
            kl = kto_kl(rejected, ref_logps[pairs:])
            if model.training and distributed.world_size() > 1:  # one reference point for the whole batch, as TRL
                kl = distributed.sum_tensor(kl) / distributed.world_size()
            return kto_loss(chosen, ref_logps[:pairs], kl, batch["desirable"], cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
        if cfg.loss == "orpo":
            return orpo_loss(chosen, rejected, chosen_counts, rejected_counts, cfg.beta)
        if cfg.loss == "simpo":
            loss, metrics = simpo_loss(chosen, rejected, chosen_counts, rejected_counts, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)
        else:
            ref_logps = batch["ref_logps"].to(policy_logps.dtype) if "ref_logps" in batch else reference(batch)[0]
            if cfg.loss == "ipo":  # IPO compares mean per-token log-probs (as TRL does)
                compared, ref_logps = mean_token_logps(policy_logps, counts), mean_token_logps(ref_logps, counts)
            else:
                compared = policy_logps
            loss, metrics = dpo_loss(compared[:pairs], compared[pairs:], ref_logps[:pairs], ref_logps[pairs:], cfg.beta, cfg.loss, cfg.label_smoothing)
        if cfg.rpo_alpha is not None:  # with simpo: CPO-SimPO (TRL's cpo_alpha)
            return with_chosen_nll(loss, metrics, chosen, chosen_counts, cfg.rpo_alpha)
        return loss, metrics

    return step


def sample(bundle: ModelBundle, prompts: list[Any], recipe: DpoRecipe, runtime: Runtime) -> list[str]:
    if not prompts:
        return []
    ids = [prompt_ids_for_generation(bundle.tokenizer, p) for p in prompts]
    return [g.text.strip() for g in generate(bundle.model, bundle.tokenizer, ids, recipe.generation, recipe.seed, runtime.device)]


def reference_cache(recipe: DpoRecipe, reference: Reference, runtime: Runtime) -> ReferenceCache | None:
    """The cache of the reference's log-probs, with what besides the pairs' tokens and the reference's weights
    they depend on; None where dpo.ref_cache is off or the weights are sharded (FSDP, DeepSpeed)."""
    if not recipe.dpo.ref_cache:
        return None
    if runtime.sharded:
        ui.note(f"dpo.ref_cache: off under {recipe.distributed.strategy} (each process holds a shard of the reference's weights)")
        return None
    quantization = recipe.model.quantization if reference.separate is None else None  # a separate reference loads unquantized
    how = {
        "precision": runtime.mixed_precision, "device": runtime.device.type,
        "quantization": quantization.model_dump(mode="json") if quantization is not None else None,
    }  # fmt: skip
    return ReferenceCache(reference, how)


def run_dpo(recipe: DpoRecipe, run: RunDir) -> dict:
    started = time.time()
    runtime = setup_runtime(recipe.train, recipe.seed, recipe.distributed)

    # Data: preference records -> chosen/rejected token ids with labels on the completions only.
    report = DataReport()
    if recipe.dpo.loss == "kto":  # unpaired examples, each with another's completion for the KL estimate
        data = load_example_sets(recipe, report, recipe.dpo.max_prompt_length, (recipe.dpo.desirable_weight, recipe.dpo.undesirable_weight))
    else:
        data = load_preference_sets(recipe, report, recipe.dpo.max_prompt_length)
    train_rows, eval_rows, train_set, eval_set, tokenizer = data.train_rows, data.eval_rows, data.train_set, data.eval_set, data.tokenizer

    # Models: the policy, and the reference it is held close to.
    bundle = build_causal_lm(recipe.model, tokenizer, runtime.device, recipe.seed, cache_dir=run.path)
    policy = CompletionLogProbs(bundle.model)
    if recipe.dpo.loss in REFERENCE_FREE_LOSSES and recipe.policy_eval.every is None:
        reference, reference_note = Reference(policy, None), f"reference: none ({recipe.dpo.loss} is reference-free)"
    else:  # a reference-free loss still measures its KL to the initial policy in policy_eval
        reference, reference_note = build_reference(recipe, bundle, policy, runtime, run)
    models = [bundle.model] + ([reference.separate.model] if reference.separate is not None else [])
    shared, layout_notes = packed_rows_allowed("dpo.share_prompt", recipe.dpo.share_prompt, models, recipe.data.max_length)
    collate = partial(collate_shared_pairs if shared else collate_pairs, pad_id=tokenizer.pad_token_id)
    ui.notes(data.notes + bundle.notes + [reference_note] + layout_notes)

    source = eval_rows if eval_rows is not None else train_rows
    first = source.select(range(min(4 * recipe.dpo.show_samples, len(source))))["prompt"]
    distinct = list({json.dumps(p, sort_keys=True): p for p in first}.values())  # kto: a pair's two rows share a prompt
    prompts = distinct[: recipe.dpo.show_samples]
    before_path = run.path / "samples_before.jsonl"
    if distributed.main_has(before_path):
        before = [json.loads(line)["response"] for line in before_path.read_text().splitlines()]
    else:  # the initial policy, before any update (resumed runs reuse what it said)
        before = sample(bundle, prompts, recipe, runtime)
        if runtime.is_main:
            atomic_write_jsonl(before_path, ({"prompt": str(p), "response": r} for p, r in zip(prompts, before)))

    eval_batch = recipe.train.eval_batch_size or recipe.train.batch_size  # forward-only passes: as large as an eval's
    evaluator = periodic_evaluator(recipe.policy_eval, recipe.seed, runtime.device)
    reference_started = time.perf_counter()
    if recipe.dpo.precompute_ref:
        cache = reference_cache(recipe, reference, runtime)
        if recipe.train.max_steps != 0:  # an evaluation-only run reads the eval set alone
            train_set = attach_reference_logps(train_set, "train", reference, collate, eval_batch, run, runtime, cache)
        if eval_set is not None:
            eval_set = attach_reference_logps(eval_set, "eval", reference, collate, eval_batch, run, runtime, cache)
        if evaluator is None:  # the policy evaluation's KL still needs the reference
            reference.release()
    reference_seconds = time.perf_counter() - reference_started  # the precomputed pass (0 when loaded or off)

    def after_step(step: int) -> dict[str, Any] | None:
        if evaluator is None or step % recipe.policy_eval.every:
            return None
        return evaluator(bundle.model, tokenizer, reference.token_logps, shard=not runtime.sharded)

    train_stream, eval_stream = batch_streams(train_set, eval_set, collate, recipe.train, recipe.seed, runtime)
    result = train(
        stage="dpo", model=policy, train_stream=train_stream, eval_stream=eval_stream, step_fn=make_step(recipe.dpo, reference),
        cfg=recipe.train, run=run, runtime=runtime, after_step=after_step,
    )  # fmt: skip
    if result.trained:  # an evaluation-only run changed nothing to save
        save_final_model(run, runtime, bundle, prepared=result.model)

    after = sample(bundle, prompts, recipe, runtime)
    samples = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "before": b, "after": a} for p, b, a in zip(prompts, before, after)]
    if runtime.is_main:
        atomic_write_jsonl(run.path / "samples.jsonl", samples)
    pairs_per_sec = result.state.items / max(result.state.train_seconds, 1e-9)
    reference_tokens = sum(len(ids) for column in ("chosen_input_ids", "rejected_input_ids") for ids in train_set[column])
    forward_tokens = reference_tokens if recipe.dpo.precompute_ref else result.state.tokens  # the reference's passes
    if recipe.dpo.loss in REFERENCE_FREE_LOSSES:
        forward_tokens = 0
    summary = write_summary(
        stage="dpo", run=run, runtime=runtime, started=started, trained=Trained.from_loop(bundle.model, result, Compute(forward_tokens=forward_tokens)),
        data=report, results={("examples" if recipe.dpo.loss == "kto" else "pairs"): result.state.items, "pairs_per_sec": pairs_per_sec, "reference_logps_seconds": reference_seconds,
                 "models": ["policy"] if recipe.dpo.loss in REFERENCE_FREE_LOSSES and reference.separate is None else ["policy", "reference"]}, highlights={"pairs/s": pairs_per_sec},
    )  # fmt: skip
    ui.samples_table(samples, "dpo samples: the initial policy (before) and the trained one (after)", ("prompt", "before", "after"))
    return summary
