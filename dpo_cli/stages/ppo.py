"""`dpo-cli ppo`: RLHF's phase 4. Each iteration runs named phases:
rollout (sample responses) -> score (reward model) -> experience (log-probs, reference, values) ->
advantages (KL-penalised rewards, GAE) -> update (clipped PPO epochs) -> KL control.
With ppo.advantage rloo or grpo there is no critic: k samples per prompt, and each one's advantage comes from
its prompt's other samples (RLOO's leave-one-out baseline; GRPO's group normalisation, its KL in the loss).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from dpo_cli.core import distributed, ui
from dpo_cli.eval.costs import model_shape
from dpo_cli.data.loading import DataReport, load_prompts
from dpo_cli.data.encoding import prompt_ids_for_generation
from dpo_cli.core.errors import UserError
from dpo_cli.eval.evaluation import periodic_evaluator
from dpo_cli.models.forward import packed_rows_allowed
from dpo_cli.models.generate import generate
from dpo_cli.eval.judges import Judge, build_ground_truth, reward_model_judge
from dpo_cli.train.loop import discard_step, nonfinite_step, total_steps_for
from dpo_cli.losses import (
    adaptive_kl_coef,
    explained_variance,
    gae,
    grpo_advantages,
    k3_kl,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    penalize_unfinished,
    ppo_objective,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
)
from dpo_cli.models.build import build_causal_lm, build_tokenizer
from dpo_cli.train.optim import build_optimizer, build_scheduler
from dpo_cli.models.io import save_final_model
from dpo_cli.core.recipes import PpoRecipe
from dpo_cli.models.rollout import PromptBatches, Rollout, make_rollout, minibatches
from dpo_cli.models.roles import ActorCritic, build_actor_critic
from dpo_cli.core.rundir import RunDir
from dpo_cli.core.runtime import Runtime, setup_runtime
from dpo_cli.train.session import TrainingSession
from dpo_cli.train.summary import Compute, Trained, write_summary
from dpo_cli.data.tokenization import chat_template_notes


@dataclass
class PpoState:
    iteration: int = 0  # iterations done
    kl_coef: float = 0.0  # the KL controller's state
    episodes: int = 0
    tokens: int = 0
    skipped: int = 0  # iterations with non-finite rewards: counted, never applied
    skipped_updates: int = 0  # minibatch updates with a non-finite loss or gradient norm (train.nonfinite: skip)
    time_generate: float = 0.0
    time_train: float = 0.0
    trained_tokens: int = 0  # tokens through training passes (policy and critic, every epoch)
    wall_seconds: float = 0.0  # wall time of the earlier attempts, each up to its last checkpoint (set by the session)

    @property
    def step(self) -> int:  # the training session counts iterations as its steps
        return self.iteration


# ----------------------------------------------------------------------------- phases


def rollout_phase(
    actor_critic: ActorCritic, tokenizer: Any, prompts: list[Any], recipe: PpoRecipe, runtime: Runtime, iteration: int, padding_free: bool
) -> Rollout:
    """Sample one response per prompt from the policy (KV cache), as left-padded prompt + right-padded response
    (the model passes read it packed where `padding_free`)."""
    prompt_ids = [prompt_ids_for_generation(tokenizer, p)[-recipe.data.max_length :] for p in prompts]
    seed = recipe.seed * 1_000_003 + iteration  # a fresh sample each iteration, the same after a resume
    with actor_critic.adapter("default"):
        generations = generate(actor_critic.policy, tokenizer, prompt_ids, recipe.generation, seed, runtime.device)
    rollout = make_rollout(prompts, prompt_ids, generations, tokenizer.pad_token_id, runtime.device)
    rollout.padding_free = padding_free
    return rollout


def build_reward(recipe: PpoRecipe, runtime: Runtime, tokenizer: Any) -> tuple[Judge, dict]:
    """The reward: a reward model (and its vocabulary), or a judge (PPO-GT: the ground truth itself, which
    reads text; the policy's vocabulary stands in)."""
    if recipe.ppo.reward_model is not None:
        reward = reward_model_judge(
            recipe.ppo.reward_model, runtime.device, "ppo.reward_model", recipe.ppo.reward_batch_size, recipe.ppo.reward_quantization, name=recipe.ppo.reward_model
        )
        return reward, reward.tokenizer.get_vocab()
    judge = build_ground_truth(recipe.ppo.chosen_judge(), recipe.ppo.reward_fluency_model, runtime.device, "ppo.reward_fluency_model")
    assert judge is not None  # the recipe names a reward model or a judge
    return judge, tokenizer.get_vocab()


def score_phase(rollout: Rollout, reward: Judge, recipe: PpoRecipe) -> torch.Tensor:
    """The reward of each full (prompt, response): a reward model's score (re-tokenised for it) or a judge's."""
    values = reward.score(rollout.prompts, rollout.texts).values  # None where a judge failed: non-finite, so the iteration is skipped
    scores = torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float32, device=rollout.response_mask.device)
    if recipe.ppo.missing_eos_penalty:
        scores = penalize_unfinished(scores, rollout.finished, recipe.ppo.missing_eos_penalty)
    return scores


@torch.no_grad()
def experience_phase(actor_critic: ActorCritic, rollout: Rollout, recipe: PpoRecipe, iteration: int) -> None:
    """pi_old log-probs, entropy and values, computed in the first epoch's mini-batches (so that the first
    update's probability ratio is exactly 1), and the reference log-probs."""
    temperature = recipe.generation.temperature
    size = rollout.query_response.size(0)
    logps = torch.zeros_like(rollout.response_mask)
    entropy, values = torch.zeros_like(logps), torch.zeros_like(logps)
    for index in minibatches(size, recipe.ppo.mini_batch_size, recipe.seed, iteration, 0):
        part = rollout.rows(index)
        index = index.to(logps.device)
        logps[index], entropy[index] = actor_critic.policy_logps(part, temperature, with_entropy=True)
        if actor_critic.has_critic:
            values[index] = actor_critic.values(part)
    rollout.logps, rollout.entropy, rollout.values = logps, entropy, values if actor_critic.has_critic else None
    rollout.ref_logps = actor_critic.reference_logps(rollout, temperature)


def advantage_phase(rollout: Rollout, recipe: PpoRecipe, kl_coef: float) -> torch.Tensor:
    """KL-penalised rewards, GAE; whitened with the mean and std of every process's rollouts. RLOO: the
    sequence reward (score minus the KL penalty) against the mean of its prompt's other samples; GRPO: the
    score normalised within its prompt's samples (the KL goes into the loss). Either is every token's advantage."""
    mask = rollout.response_mask
    rewards, kl = kl_penalized_rewards(rollout.scores, rollout.logps, rollout.ref_logps, mask, kl_coef)
    if recipe.ppo.advantage != "gae":
        k = recipe.ppo.samples_per_prompt
        if recipe.ppo.advantage == "rloo":
            per_sequence = rloo_advantages(rollout.scores - kl_coef * kl.sum(dim=1), k)  # (B,): the score minus the KL penalty
        else:
            per_sequence = grpo_advantages(rollout.scores, k)
        rollout.rewards, rollout.advantages = rewards, per_sequence.unsqueeze(1) * mask  # (B, T)
        return kl
    total = distributed.sum_tensor if distributed.world_size() > 1 else None
    if recipe.ppo.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, sum_over_processes=total)
    advantages, returns = gae(rewards, rollout.values, mask, recipe.ppo.gamma, recipe.ppo.lam)
    rollout.rewards, rollout.advantages, rollout.returns = rewards, masked_whiten(advantages, mask, sum_over_processes=total), returns
    return kl


def update_phase(
    model: torch.nn.Module,
    rollout: Rollout,
    recipe: PpoRecipe,
    optimizer: Any,
    scheduler: Any,
    runtime: Runtime,
    iteration: int,
    combined: bool,
    kl_coef: float,
) -> dict[str, float]:
    """ppo_epochs passes of clipped policy and value updates over shuffled mini-batches. `model` is the
    ActorCritic, or its DDP wrapper; `combined` (needed by DDP) runs policy and critic as one forward and
    one backward. The default, two backwards, frees the policy's graph before the critic's is built: less
    memory on one GPU, the same gradients (tested)."""
    actor_critic = runtime.accelerator.unwrap_model(model)
    cfg, sums, count, trained, skipped = recipe.ppo, {}, 0, 0, 0
    temperature = recipe.generation.temperature
    first_ratio = None
    for epoch in range(cfg.ppo_epochs):
        stop = False
        for index in minibatches(rollout.query_response.size(0), cfg.mini_batch_size, recipe.seed, iteration, epoch):
            part = rollout.rows(index)
            if not actor_critic.has_critic:  # rloo / grpo: the policy alone (one DDP forward either way)
                with runtime.accelerator.autocast():
                    logps = model(part.query_response, part.attention_mask, part.context_length, temperature)[0] if combined else actor_critic.policy_logps(part, temperature)[0]
                    policy_loss, policy_metrics = ppo_policy_loss(logps, part.logps, part.advantages, part.response_mask, cfg.cliprange)
                    if cfg.advantage == "grpo":  # GRPO's KL to the reference, in the loss (k3, per token)
                        kl_term = masked_mean(k3_kl(logps, part.ref_logps), part.response_mask)
                        policy_loss, policy_metrics = policy_loss + kl_coef * kl_term, {**policy_metrics, "kl_loss": kl_term.detach()}
                value_loss, value_metrics = torch.zeros((), device=logps.device), {}
                runtime.accelerator.backward(policy_loss)
            elif combined:
                with runtime.accelerator.autocast():
                    logps, values = model(part.query_response, part.attention_mask, part.context_length, temperature)
                    policy_loss, policy_metrics = ppo_policy_loss(logps, part.logps, part.advantages, part.response_mask, cfg.cliprange)
                    value_loss, value_metrics = ppo_value_loss(values, part.values, part.returns, part.response_mask, cfg.cliprange_value)
                runtime.accelerator.backward(ppo_objective(policy_loss, value_loss, cfg.vf_coef))
            else:
                with runtime.accelerator.autocast():
                    logps, _ = actor_critic.policy_logps(part, temperature)
                    policy_loss, policy_metrics = ppo_policy_loss(logps, part.logps, part.advantages, part.response_mask, cfg.cliprange)
                runtime.accelerator.backward(policy_loss)  # the policy adapter's graph, then the critic's
                with runtime.accelerator.autocast():
                    values = actor_critic.values(part)
                    value_loss, value_metrics = ppo_value_loss(values, part.values, part.returns, part.response_mask, cfg.cliprange_value)
                runtime.accelerator.backward(cfg.vf_coef * value_loss)  # the critic's share of ppo_objective
            grad_norm = runtime.accelerator.clip_grad_norm_(actor_critic.trainable_parameters(), recipe.train.max_grad_norm or float("inf"))
            scaler = getattr(runtime.accelerator, "scaler", None)
            broken = nonfinite_step(distributed.mean(float(ppo_objective(policy_loss, value_loss, cfg.vf_coef).detach())), grad_norm, scaler)
            if broken is not None:  # never applied: every process sees the same reduced loss and norm
                discard_step(optimizer, scaler)
                if recipe.train.nonfinite == "stop":
                    raise UserError(
                        f"{broken} in an update of iteration {iteration + 1}; it was not applied and nothing is written as final/; "
                        "lower train.learning_rate, or set train.nonfinite: skip to skip such updates"
                    )
                skipped += 1
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step = {"policy_loss": policy_loss, "grad_norm": grad_norm, **policy_metrics, **value_metrics}
            if actor_critic.has_critic:
                step["value_loss"] = value_loss
            trained += (2 if actor_critic.has_critic else 1) * int(part.attention_mask.sum())  # the policy's pass (and the critic's)
            for key, value in step.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach() if isinstance(value, torch.Tensor) else value)
            count += 1
            if first_ratio is None:
                first_ratio = float(policy_metrics["ratio"])
            if cfg.early_stop_kl is not None and distributed.mean(float(policy_metrics["approx_kl"])) > cfg.early_stop_kl:
                stop = True  # decided on the mean over processes: every process stops at the same update
                break
        if stop:
            break
    names = sorted(sums)
    means = distributed.reduce_sum([sums[key] / max(count, 1) for key in names] + [first_ratio or 0.0])
    metrics = {key: value / runtime.world_size for key, value in zip(names, means)}
    metrics["ratio/first_minibatch"] = means[-1] / runtime.world_size
    metrics["updates"] = count
    metrics["skipped_updates"] = skipped
    metrics["trained_tokens"] = int(distributed.reduce_sum([trained])[0])
    return metrics


# ----------------------------------------------------------------------------- the stage


def iteration_record(state: PpoState, rollout: Rollout, kl: torch.Tensor, update: dict[str, float], lr: float, seconds: tuple[float, float]) -> dict[str, Any]:
    """The metrics line of an iteration, over every process's episodes (each holds batch_size of them, so
    means of means are exact)."""
    mask = rollout.response_mask
    scores = torch.tensor(distributed.gather(rollout.scores.tolist()))
    return {
        "step": state.iteration,
        "reward": float(scores.mean()),
        "reward/std": float(scores.std()) if len(scores) > 1 else 0.0,
        "kl": distributed.mean(float(kl.sum(dim=1).mean())),
        "kl_coef": state.kl_coef,
        "entropy": distributed.mean(float(masked_mean(rollout.entropy, mask))),
        **update,
        **({"value/explained_variance": distributed.mean(float(explained_variance(rollout.values, rollout.returns, mask)))} if rollout.values is not None else {}),
        "response_length": distributed.mean(float(mask.sum(dim=1).mean())),
        "finished_rate": distributed.mean(float(rollout.finished.float().mean())),
        "lr": lr,
        "time/generate": seconds[0],
        "time/train": seconds[1],
        "episodes": state.episodes,
    }


def run_ppo(recipe: PpoRecipe, run: RunDir) -> dict:
    started = time.time()
    runtime = setup_runtime(recipe.train, recipe.seed, recipe.distributed)
    if recipe.generation.temperature <= 0:
        raise UserError("generation.temperature: PPO samples its rollouts; use a temperature > 0 (e.g. 1.0)")
    if runtime.sharded:
        raise UserError(
            f"distributed.strategy: ppo runs with ddp on several processes, not {recipe.distributed.strategy} "
            "(every process samples with the whole policy); use ddp, with model.lora + model.quantization to fit the models"
        )

    # Prompts, and the four roles: policy, reference, critic, reward model.
    report = DataReport()
    raw = load_prompts(recipe.data, recipe.seed, report)
    tokenizer, notes = build_tokenizer(recipe.model, recipe.tokenizer)
    notes += report.notes + chat_template_notes(tokenizer, recipe.tokenizer.chat_template, raw)
    bundle = build_causal_lm(recipe.model, tokenizer, runtime.device, recipe.seed, cache_dir=run.path)
    reward, reward_vocab = build_reward(recipe, runtime, tokenizer)
    if reward_vocab != tokenizer.get_vocab():
        notes.append("the reward model has its own tokenizer: each response is re-tokenised from text for it")
    actor_critic, role_notes = build_actor_critic(recipe, bundle, runtime, run, reward_vocab)
    padding_free, layout_notes = packed_rows_allowed(
        "ppo.padding_free", recipe.ppo.padding_free and runtime.world_size == 1, actor_critic.models(), recipe.data.max_length + recipe.generation.max_new_tokens, hint=""
    )  # several processes run policy and critic as one DDP forward, on the padded layout
    ui.notes(notes + bundle.notes + role_notes + layout_notes)

    # The optimizer and the session around the iterations. Several processes: DDP averages the gradients
    # (policy and critic in one forward, see update_phase); one: the optimizer alone goes through
    # accelerate, whose wrapper unscales fp16-scaled gradients before a step.
    samples = recipe.ppo.samples_per_prompt  # each prompt's samples next to each other in a rollout batch
    batches = PromptBatches(raw, recipe.train.batch_size // samples, recipe.seed, runtime)
    iterations = total_steps_for(recipe.train, batches.per_epoch)
    updates_per_iteration = recipe.ppo.ppo_epochs * (recipe.train.batch_size // recipe.ppo.mini_batch_size)
    optimizer = build_optimizer(actor_critic, recipe.train, runtime.device)
    scheduler = build_scheduler(optimizer, recipe.train, iterations * updates_per_iteration)
    if runtime.world_size > 1:
        trained, optimizer = runtime.accelerator.prepare(actor_critic, optimizer)
    else:
        trained, optimizer = actor_critic, runtime.accelerator.prepare_optimizer(optimizer)
    session = TrainingSession(
        stage="ppo", run=run, runtime=runtime, cfg=recipe.train, total_steps=iterations, state=PpoState(kl_coef=recipe.ppo.kl_coef),
        model=actor_critic, optimizer=optimizer, scheduler=scheduler, unit="iteration", progress_value="reward", progress_speed="episodes/s",
    )  # fmt: skip
    session.resume()
    state: PpoState = session.state
    evaluator = periodic_evaluator(recipe.policy_eval, recipe.seed, runtime.device, proxy=reward)

    def evaluate_policy() -> None:
        with actor_critic.adapter("default"):
            record = evaluator(actor_critic.policy, tokenizer, lambda rollout: actor_critic.reference_logps(rollout, 1.0))
        session.log({"step": state.iteration, **record}, split="policy")

    last: dict[str, Any] = {}
    with session:
        samples_log = session.jsonl_log(run.path / "samples.jsonl")
        if evaluator is not None and state.iteration == 0:
            evaluate_policy()
        while session.unfinished:
            iteration = state.iteration
            began = time.perf_counter()
            prompts = [prompt for prompt in batches[iteration] for _ in range(samples)]
            rollout = rollout_phase(actor_critic, tokenizer, prompts, recipe, runtime, iteration, padding_free)
            rollout.scores = score_phase(rollout, reward, recipe)
            generated = time.perf_counter()
            state.iteration += 1
            state.time_generate += generated - began
            if distributed.reduce_max(0.0 if torch.isfinite(rollout.scores).all() else 1.0):  # never applied: counted and logged
                state.skipped += 1
                session.log({"step": state.iteration, "skipped": "non-finite reward", "skipped_total": state.skipped})
                continue
            with runtime.accelerator.autocast():  # the same precision as the update: the first ratio is exactly 1
                experience_phase(actor_critic, rollout, recipe, iteration)
            kl = advantage_phase(rollout, recipe, state.kl_coef)
            lr = scheduler.get_last_lr()[0]
            update = update_phase(trained, rollout, recipe, optimizer, scheduler, runtime, iteration, combined=runtime.world_size > 1, kl_coef=state.kl_coef)
            state.skipped_updates += update["skipped_updates"]
            if state.skipped_updates > recipe.train.max_skipped_steps:
                raise UserError(
                    f"more than train.max_skipped_steps={recipe.train.max_skipped_steps} updates had a non-finite loss or gradient "
                    "norm; nothing is written as final/; lower train.learning_rate and start over with --fresh"
                )
            session.check_weights(actor_critic.trainable_parameters(), state.iteration, lr, what="the policy or critic weights")
            state.time_train += time.perf_counter() - generated
            state.episodes += len(rollout.prompts) * runtime.world_size
            state.tokens += int(distributed.reduce_sum([int(rollout.attention_mask.sum())])[0])
            state.trained_tokens += update.pop("trained_tokens")

            record = iteration_record(state, rollout, kl, update, scheduler.get_last_lr()[0], (generated - began, time.perf_counter() - generated))
            if recipe.ppo.target_kl is not None:  # Ziegler et al.'s controller, after the update
                state.kl_coef = adaptive_kl_coef(state.kl_coef, record["kl"], recipe.ppo.target_kl, recipe.ppo.kl_horizon, len(rollout.prompts) * runtime.world_size)
            logged = state.iteration % recipe.train.log_every == 0 or state.iteration == iterations
            if logged:
                session.log(record)
            last = record
            session.show(record["reward"], record["lr"], record["episodes"] / max(state.time_generate + state.time_train, 1e-9), logged)
            if state.iteration % recipe.ppo.sample_every == 0 or state.iteration == iterations:
                for prompt, text, score in list(zip(rollout.prompts, rollout.texts, rollout.scores.tolist()))[: recipe.ppo.show_samples]:
                    samples_log.log({"step": state.iteration, "prompt": prompt, "response": text.strip(), "score": score})
            if evaluator is not None and state.iteration % recipe.policy_eval.every == 0:
                evaluate_policy()
            if recipe.ppo.kl_stop is not None and record["kl"] > recipe.ppo.kl_stop:
                raise UserError(
                    f"the KL to the reference reached {record['kl']:.3g} > ppo.kl_stop={recipe.ppo.kl_stop} at iteration "
                    f"{state.iteration}; checkpoint {session.save_checkpoint()} saved. Lower train.learning_rate or raise ppo.kl_coef, then --fresh"
                )
            session.end_step()

    if state.skipped >= state.iteration:
        raise UserError(
            f"all {state.iteration} iterations were skipped: ppo.reward_model gave non-finite scores every time; nothing is "
            "written as final/ (check the reward model, e.g. with dpo-cli score)"
        )
    if actor_critic.shared:
        bundle.model.delete_adapter("value")  # final/ is the policy: its adapter alone
    save_final_model(run, runtime, bundle)
    seconds = state.time_generate + state.time_train
    # sampling, then the policy's, reference's and critic's passes over every rollout; the reward model's
    compute = Compute(
        train_tokens=state.trained_tokens, forward_tokens=(4 if actor_critic.has_critic else 3) * state.tokens,
        other_models=[{**model_shape(scorer.model), "context": state.tokens / max(state.episodes, 1), "tokens": state.tokens} for scorer in [getattr(reward, "scorer", None)] if scorer is not None],
    )  # fmt: skip
    trained_totals = Trained(
        model=bundle.model, steps=state.iteration, tokens=state.tokens, items=state.episodes, sequences=state.episodes, train_seconds=seconds,
        earlier_wall_seconds=state.wall_seconds, final_metrics={k: v for k, v in last.items() if k not in ("step", "episodes")}, compute=compute,
    )  # fmt: skip
    results = {
        "episodes": state.episodes,
        "episodes_per_sec": state.episodes / max(seconds, 1e-9),
        "time_generate_s": round(state.time_generate, 3),
        "time_train_s": round(state.time_train, 3),
        "skipped_iterations": state.skipped,
        "skipped_updates": state.skipped_updates,
        "mode": "single-GPU (shared base, LoRA adapters)" if actor_critic.shared else "separate models" if actor_critic.has_critic else f"{recipe.ppo.advantage}, no critic",
        "advantage": recipe.ppo.advantage,
        "models": ["policy", "reference", *(["critic"] if actor_critic.has_critic else []), "reward model" if recipe.ppo.reward_model else "reward judge"],
    }
    highlights = {"episodes/s": results["episodes_per_sec"], "skipped iterations": state.skipped}
    return write_summary(stage="ppo", run=run, runtime=runtime, started=started, trained=trained_totals, data=report, results=results, highlights=highlights)
