"""Evaluating a policy the same way everywhere (compare, and dpo/ppo every N steps): sample responses to
held-out prompts, score them with a judge and a reward model, and estimate the KL to a reference.

The KL estimate: responses y ~ pi(.|x) sampled at temperature 1 with no top-k/top-p truncation (the
policy's full distribution: truncation would bias it), and KL(pi || pi_ref) ~ mean over responses of
sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)] (the unbiased "k1" estimator).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dpo_cli.core import distributed
from dpo_cli.data.encoding import prompt_ids_for_generation
from dpo_cli.models.generate import Generation, generate
from dpo_cli.eval.judges import Judge
from dpo_cli.eval.stats import mean_ci
from dpo_cli.losses import response_fluency, sequence_kl as kl_estimate
from dpo_cli.core.recipes import GenerationSection
from dpo_cli.models.rollout import Rollout, make_rollout, response_logps

KL_ESTIMATOR = (
    "KL(pi || pi_ref) estimated as the mean over responses y ~ pi(.|x), sampled at temperature 1 without top-k or "
    "top-p truncation, of sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]"
)

ReferenceLogps = Callable[[Rollout], torch.Tensor]  # rollout -> (B, T) reference log-probs of its response tokens


# ----------------------------------------------------------------------------- text statistics


def distinct_n(texts: list[str], n: int) -> float | None:
    """Distinct word n-grams over all n-grams of all responses (1 = no repetition at all)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


# ----------------------------------------------------------------------------- sampling and KL


def sample(model: torch.nn.Module, tokenizer: Any, prompts: list[Any], cfg: GenerationSection, seed: int, device: torch.device, max_prompt: int) -> tuple[list[list[int]], list[Generation]]:
    prompt_ids = [prompt_ids_for_generation(tokenizer, p)[-max_prompt:] for p in prompts]
    return prompt_ids, generate(model, tokenizer, prompt_ids, cfg, seed, device)


def full_distribution(cfg: GenerationSection) -> GenerationSection:
    """Sampling for the KL estimate: temperature 1, no truncation."""
    return cfg.model_copy(update={"temperature": 1.0, "top_p": 1.0, "top_k": 0})


@torch.no_grad()
def sequence_kl(model: torch.nn.Module, reference: ReferenceLogps, rollout: Rollout, reference_logps: torch.Tensor | None = None) -> list[float]:
    # the reference: (B, T) per token, or (B,) per response (another tokenizer); given, or computed here
    reference_logps = reference(rollout) if reference_logps is None else reference_logps
    return kl_estimate(response_logps(model, rollout, 1.0)[0], reference_logps, rollout.response_mask).tolist()


def text_reference(reference_model: torch.nn.Module, reference_tokenizer: Any) -> ReferenceLogps:
    """A reference with another tokenizer: each prompt + response is re-tokenised for it, and the response's
    log-probability summed over its own tokens (the log-ratio of the two sequence probabilities)."""
    from dpo_cli.data.encoding import pad
    from dpo_cli.models.forward import CompletionLogProbs
    from dpo_cli.losses import IGNORE_INDEX
    from dpo_cli.data.preference_pairs import sequence_ids

    scorer = CompletionLogProbs(reference_model)

    def logps(rollout: Rollout) -> torch.Tensor:
        sequences, labels = [], []
        for prompt, text, finished in zip(rollout.prompts, rollout.texts, rollout.finished.tolist()):
            completion = [{"role": "assistant", "content": text.strip()}] if isinstance(prompt, list) else text
            ids, start = sequence_ids(reference_tokenizer, prompt, completion)
            if not finished and not isinstance(prompt, list) and ids[-1] == reference_tokenizer.eos_token_id:
                ids = ids[:-1]  # the response never ended: no EOS to score
            sequences.append(ids)
            labels.append([IGNORE_INDEX] * start + ids[start:])
        input_ids, mask = pad(sequences, reference_tokenizer.pad_token_id)
        target, _ = pad(labels, IGNORE_INDEX)
        device = rollout.response_mask.device
        return scorer(input_ids.to(device), mask.to(device), target.to(device))[0]

    return logps


def model_reference(reference_model: torch.nn.Module) -> ReferenceLogps:
    """A separate reference model reading the same tokens."""
    return lambda rollout: response_logps(reference_model, rollout, 1.0)[0]


@dataclass
class PolicyEval:
    """One policy on one prompt set."""

    texts: list[str]
    finished: list[bool]
    lengths: list[int]  # response tokens
    judge_scores: list[float | None] = field(default_factory=list)
    proxy_scores: list[float | None] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    fluency: list[float] = field(default_factory=list)  # mean log-likelihood per response token under the reference

    def summary(self) -> dict[str, Any]:
        return {
            "judge": mean_ci(self.judge_scores) if self.judge_scores else None,
            "proxy": mean_ci(self.proxy_scores) if self.proxy_scores else None,
            "kl": mean_ci(self.kl) if self.kl else None,
            "fluency": mean_ci(self.fluency) if self.fluency else None,
            "response_length": statistics.fmean(self.lengths) if self.lengths else None,
            "finished_rate": statistics.fmean(float(f) for f in self.finished) if self.finished else None,
            "distinct_1": distinct_n(self.texts, 1),
            "distinct_2": distinct_n(self.texts, 2),
        }


def evaluate_policy(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[Any],
    cfg: GenerationSection,
    seed: int,
    device: torch.device,
    max_prompt: int,
    judge: Judge | None,
    proxy: Judge | None,
    reference: ReferenceLogps | None,
    shard: bool = True,
) -> PolicyEval:
    """Responses with the given sampling settings, scored; and, against `reference`, the KL estimate on a
    second set of responses from the full distribution (the same set when the settings already are that).
    With several processes each evaluates its share of the prompts (`shard`; not with FSDP / ZeRO-3, whose
    processes must run the same forward passes) and every process gets the whole result."""
    if shard and distributed.world_size() > 1:
        part = distributed.shard(len(prompts))
        local = evaluate_policy(model, tokenizer, prompts[part.start : part.stop], cfg, seed, device, max_prompt, judge, proxy, reference, shard=False)
        return PolicyEval(**{name: distributed.gather(getattr(local, name)) for name in PolicyEval.__dataclass_fields__})
    prompt_ids, generations = sample(model, tokenizer, prompts, cfg, seed, device, max_prompt)
    texts = [g.text.strip() for g in generations]
    result = PolicyEval(texts=texts, finished=[g.finished for g in generations], lengths=[len(g.response_ids) for g in generations])
    if judge is not None:
        result.judge_scores = judge.score(prompts, texts).values
    if proxy is not None:
        result.proxy_scores = proxy.score(prompts, texts).values
    if reference is not None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            rollout = make_rollout(prompts, prompt_ids, generations, tokenizer.pad_token_id, device)
            reference_logps = reference(rollout)  # (B, T), or (B,) for a reference with another tokenizer
            if reference_logps.dim() == 2:
                result.fluency = response_fluency(reference_logps, rollout.response_mask).tolist()
            full = full_distribution(cfg)
            if full != cfg:  # the KL needs responses from the full distribution: a second set
                rollout = make_rollout(prompts, prompt_ids, sample(model, tokenizer, prompts, full, seed + 1, device, max_prompt)[1], tokenizer.pad_token_id, device)
                reference_logps = reference(rollout)
            result.kl = sequence_kl(model, reference, rollout, reference_logps)
        model.train(was_training)
    return result


def evaluation_settings(prompts: Any, rows: int, max_length: int, generation: GenerationSection, seed: int, judge: str | None) -> dict[str, Any]:
    """What makes two evaluations the same one (compare's and a run's policy_eval): the prompts (source,
    how many, their cut), the sampling (and its batching, which the random stream follows), the seed and
    the ground truth."""
    return {
        "prompts": prompts, "rows": rows, "max_length": max_length, "max_new_tokens": generation.max_new_tokens,
        "temperature": generation.temperature, "top_p": generation.top_p, "top_k": generation.top_k,
        "batch_size": generation.batch_size, "seed": seed, "judge": judge,
    }  # fmt: skip


def periodic_settings(cfg: Any, run_seed: int, available: int | None) -> dict[str, Any]:
    """A policy_eval section's evaluation, in `evaluation_settings` form; `available`: how many prompts its
    source holds, where known. Without policy_eval.seed the prompts and samples follow the run's seed (each
    training seed sees other prompts)."""
    seed = cfg.seed if cfg.seed is not None else run_seed + 23
    rows = min(cfg.max_prompts, available) if available is not None else cfg.max_prompts
    sampling = GenerationSection(max_new_tokens=cfg.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, batch_size=cfg.batch_size or rows)
    from dpo_cli.eval.judges import ground_truth_name

    return evaluation_settings(cfg.prompts, rows, cfg.max_prompt_length, sampling, seed, ground_truth_name(cfg.chosen_judge(), cfg.fluency_model))


def periodic_evaluator(cfg: Any, seed: int, device: torch.device, proxy: Judge | None = None) -> Callable[..., dict[str, Any]] | None:
    """A `policy_eval` section made runnable: (model, tokenizer, reference) -> the metrics line to log.
    With policy_eval.seed it is compare's evaluation with that seed, point for point."""
    if cfg.every is None:
        return None
    from dpo_cli.data.loading import DataReport, load_prompts
    from dpo_cli.eval.judges import build_ground_truth, reward_model_judge
    from dpo_cli.core.recipes import DataSection

    prompt_seed = cfg.seed if cfg.seed is not None else seed + 17
    prompts = load_prompts(DataSection(train=cfg.prompts, max_rows=cfg.max_prompts, max_length=cfg.max_prompt_length), prompt_seed, DataReport())
    settings = periodic_settings(cfg, seed, len(prompts))  # (all of the source or max_prompts of it)
    judge = build_ground_truth(cfg.chosen_judge(), cfg.fluency_model, device, "policy_eval.fluency_model")
    if cfg.reward_model is not None:
        proxy = reward_model_judge(cfg.reward_model, device, "policy_eval.reward_model")
    sampling = GenerationSection(max_new_tokens=cfg.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, batch_size=settings["batch_size"])

    def evaluate(model: torch.nn.Module, tokenizer: Any, reference: ReferenceLogps, shard: bool = True) -> dict[str, Any]:
        result = evaluate_policy(model, tokenizer, prompts, sampling, settings["seed"], device, cfg.max_prompt_length, judge, proxy, reference, shard)
        summary = result.summary()
        record: dict[str, Any] = {"split": "policy_eval"}
        for key, name in (("judge", "judge_score"), ("proxy", "proxy_score"), ("kl", "kl"), ("fluency", "fluency")):
            ci = summary[key] or {}
            record.update({name: ci.get("mean"), f"{name}_low": ci.get("low"), f"{name}_high": ci.get("high")})
        record.update(response_length=summary["response_length"], distinct_2=summary["distinct_2"])
        return record

    return evaluate
