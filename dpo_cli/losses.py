"""Loss and estimator math as pure functions of tensors: each loss returns (loss, metrics); estimators
(log-probs, entropy, KL, normalisations) return tensors. No model, no recipe."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SubsetMean:
    """A metric averaged over some of a batch's items only (KTO's desirable examples): the training loop adds
    `total` and `count` over micro-batches and processes before dividing, so the mean is the whole batch's
    whatever its split (0 where it has none). `minus`: another such mean, subtracted after both are divided."""

    total: torch.Tensor
    count: torch.Tensor
    minus: SubsetMean | None = None

    def value(self) -> torch.Tensor:
        own = self.total / self.count.clamp(min=1)
        return own - self.minus.value() if self.minus is not None else own


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token negative log-likelihood over the positions whose label is not IGNORE_INDEX.

    logits: (B, T, V) for inputs x_0..x_{T-1}; labels: (B, T), aligned with the inputs (label t is x_t),
    so position t predicts label t+1. A batch without any target token gives loss 0, not NaN.
    """
    shift_logits = logits[:, :-1, :]  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    num_targets = (shift_labels != IGNORE_INDEX).sum()
    nll_sum = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)).float(),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    loss = nll_sum / num_targets.clamp(min=1)
    return loss, {"num_targets": num_targets}


def mean_nll(sequence_logps: torch.Tensor, target_counts: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The language-model loss from per-sequence sums of target log-probs: the mean negative log-likelihood
    over every target token of the batch (the same number as causal_lm_loss on the full logits).
    sequence_logps: (S,); target_counts: (S,)."""
    num_targets = target_counts.sum()
    return -sequence_logps.sum() / num_targets.clamp(min=1), {"num_targets": num_targets}


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, at least in float32, without an upcast copy of the whole
    vocabulary outliving the call. logits: (N, V); targets: (N,) -> (N,)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def tempered_token_logps(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of `targets` under softmax(logits / temperature) - the distribution a sampler at
    that temperature drew from - and optionally the entropy of each of those distributions (no gradient).
    logits: (B, T, V); targets: (B, T) -> logps (B, T), entropy (B, T) or None."""
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    logps = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logps, entropy


def sequence_kl(policy_logps: torch.Tensor, reference_logps: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """The k1 estimate of KL(pi || pi_ref) of each sampled response: log pi(y|x) - log pi_ref(y|x), each
    summed over the response's tokens. policy_logps: (B, T); reference_logps: (B, T), or (B,) already summed
    (a reference with another tokenizer); response_mask: (B, T) -> (B,). (PPO's per-token KL, summed over
    the response, is the same estimate: kl_penalized_rewards.)"""
    policy = (policy_logps * response_mask).sum(dim=1)
    reference = (reference_logps * response_mask).sum(dim=1) if reference_logps.dim() == 2 else reference_logps
    return policy - reference


def response_fluency(reference_logps: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """How natural each response reads to the reference: its mean log-likelihood per token under it (closer to
    0 is more fluent; gibberish is far below). (B, T), (B, T) -> (B,); an empty response gives 0."""
    return (reference_logps * response_mask).sum(dim=1) / response_mask.sum(dim=1).clamp(min=1)


def mean_token_logps(sequence_logps: torch.Tensor, target_counts: torch.Tensor) -> torch.Tensor:
    """A sequence's log-prob per token (IPO compares these, as TRL does, not the sums). (N,), (N,) -> (N,)."""
    return sequence_logps / target_counts


def penalize_unfinished(scores: torch.Tensor, finished: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores minus `penalty` for each response that hit the length limit without an EOS. (B,), (B,) -> (B,)."""
    return scores - penalty * (~finished).float()


def ppo_objective(policy_loss: torch.Tensor, value_loss: torch.Tensor, vf_coef: float) -> torch.Tensor:
    """The one loss of a model whose policy and value head share a body: L_policy + vf_coef * L_value."""
    return policy_loss + vf_coef * value_loss


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")  # preference losses without a reference model
UNPAIRED_LOSSES = ("kto",)  # losses on single completions labelled desirable or not


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO family of preference losses on sequence log-probs, each (B,). Returns the mean loss and the
    usual metrics (TRL's names). With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):

        sigmoid  -(1 - e) log s(beta h) - e log s(-beta h)            (DPO; e > 0: conservative DPO)
        robust   (-(1 - e) log s(beta h) + e log s(-beta h)) / (1 - 2e)   (robust DPO, Chowdhury et al. 2024)
        hinge    max(0, 1 - beta h)                                   (SLiC / RSO)
        ipo      (h - 1 / (2 beta))^2                                 (IPO, Azar et al. 2023)
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {', '.join(DPO_LOSSES)}")
    chosen_rewards = beta * chosen_logratios.detach()  # (B,)
    rejected_rewards = beta * rejected_logratios.detach()  # (B,)
    return losses.mean(), _preference_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)


def _preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's metric names for a preference loss's implicit rewards and the policy's log-probs, each (B,)."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_counts: torch.Tensor,
    rejected_counts: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (Meng et al. 2024): no reference; the reward is the length-normalised log-prob, with a target
    margin gamma. With r = beta * mean token log-prob of a response:

        -(1 - e) log s(r_w - r_l - gamma) - e log s(-(r_w - r_l - gamma))

    Sequence log-prob sums and token counts, each (B,). Metrics as TRL's CPOTrainer (loss_type simpo):
    rewards are beta * the mean token log-probs, logps/* the mean token log-probs."""
    chosen_avg = mean_token_logps(policy_chosen_logps, chosen_counts)  # (B,)
    rejected_avg = mean_token_logps(policy_rejected_logps, rejected_counts)  # (B,)
    logits = beta * (chosen_avg - rejected_avg) - gamma  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    metrics = _preference_metrics(beta * chosen_avg.detach(), beta * rejected_avg.detach(), chosen_avg, rejected_avg)
    return losses.mean(), metrics


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_counts: torch.Tensor,
    rejected_counts: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong et al. 2024): the chosen responses' NLL plus beta times an odds-ratio term, no reference.
    With p = exp(mean token log-prob) of a response and odds(p) = p / (1 - p):

        NLL(chosen tokens) - beta * mean log s(log odds(p_w) - log odds(p_l))

    The NLL is the mean over every chosen token of the batch (the SFT loss). Sequence log-prob sums and token
    counts, each (B,). Metrics as TRL's ORPOTrainer (nll_loss, log_odds_ratio, log_odds_chosen)."""
    chosen_avg = mean_token_logps(policy_chosen_logps, chosen_counts)  # (B,)
    rejected_avg = mean_token_logps(policy_rejected_logps, rejected_counts)  # (B,)
    # log(1 - p) from log p, stable near p = 1: log(-expm1(log p))
    log_odds = (chosen_avg - rejected_avg) - (torch.log(-torch.expm1(chosen_avg)) - torch.log(-torch.expm1(rejected_avg)))  # (B,)
    ratio = F.logsigmoid(log_odds)  # (B,)
    nll, _ = mean_nll(policy_chosen_logps, chosen_counts)
    metrics = _preference_metrics(beta * chosen_avg.detach(), beta * rejected_avg.detach(), chosen_avg, rejected_avg)
    metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean()})
    return nll - beta * ratio.mean(), metrics


def with_chosen_nll(
    loss: torch.Tensor, metrics: dict[str, torch.Tensor], policy_chosen_logps: torch.Tensor, chosen_counts: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RPO (Pang et al. 2024; TRL's rpo_alpha): a preference loss plus alpha times the NLL of the chosen
    responses (the mean over their tokens)."""
    nll, _ = mean_nll(policy_chosen_logps, chosen_counts)
    return loss + alpha * nll, {**metrics, "nll_loss": nll.detach()}


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z_ref: the batch mean of log pi(y'|x) - log pi_ref(y'|x) over mismatched pairs
    (each prompt with another example's completion), detached. (B,), (B,) -> (). Clamp it at 0 after
    averaging over processes (kto_loss's `kl`), as TRL does."""
    return (policy_kl_logps - ref_kl_logps).detach().mean()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    kl: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | SubsetMean]]:
    """KTO (Ethayarajh et al. 2024, eq. 7) on unpaired examples: with r = log pi(y|x) - log pi_ref(y|x) and
    the reference point z = max(0, kl),

        desirable    w_d * (1 - s(beta (r - z)))
        undesirable  w_u * (1 - s(beta (z - r)))

    averaged over the batch. policy_logps, ref_logps: (B,) sequence log-probs; desirable: (B,) bool; kl: ()
    from kto_kl. Metrics are TRL's KTOTrainer names; the per-kind means are SubsetMeans (a kind absent from
    the whole batch gives 0)."""
    z = kl.clamp(min=0)
    logratios = policy_logps - ref_logps  # (B,)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z)))  # (B,)
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z - logratios)))  # (B,)
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    rewards = beta * logratios.detach()  # (B,)
    chosen, rejected = desirable.float(), (~desirable).float()
    mean_of = lambda values, which: SubsetMean((values.detach() * which).sum(), which.sum())  # noqa: E731
    metrics: dict[str, torch.Tensor | SubsetMean] = {
        "kl": z,
        "rewards/chosen": mean_of(rewards, chosen),
        "rewards/rejected": mean_of(rewards, rejected),
        "logps/chosen": mean_of(policy_logps, chosen),
        "logps/rejected": mean_of(policy_logps, rejected),
    }
    metrics["rewards/margins"] = SubsetMean(metrics["rewards/chosen"].total, metrics["rewards/chosen"].count, metrics["rewards/rejected"])  # type: ignore[union-attr]
    return losses.mean(), metrics


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margins: torch.Tensor | None = None,
    center_rewards_coef: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry reward-model loss: -log s(r_chosen - r_rejected - margin), optionally plus
    coef * mean((r_chosen + r_rejected)^2), which pulls the mean reward toward 0 (Eisenstein et al. 2023).
    chosen_rewards, rejected_rewards, margins: (B,)."""
    difference = chosen_rewards - rejected_rewards  # (B,)
    losses = -F.logsigmoid(difference - margins if margins is not None else difference)  # (B,)
    loss = losses.mean()
    if center_rewards_coef:
        loss = loss + center_rewards_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    metrics = {
        "accuracy": (difference > 0).float().mean(),
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
        "rewards/margins": difference.detach().mean(),
    }
    return loss, metrics


# ----------------------------------------------------------------------------- PPO (RLHF)
# Shapes: B rollouts, T response tokens; `mask` (B, T) is 1 on real response tokens (up to and including EOS).


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    squares = (((values - mean) ** 2) * mask).sum()
    return squares / (count - 1).clamp(min=1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """(x - mean) / std over the masked entries (mean kept when shift_mean is False); masked entries become 0.
    sum_over_processes (a tensor summed over every process) makes the mean and std global: each process
    whitens its share exactly as one process would whiten all of it."""
    if sum_over_processes is None:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    else:
        count, total = sum_over_processes(torch.stack([mask.sum(), (values * mask).sum()]).to(values.dtype))
        mean = total / count.clamp(min=1)
        var = sum_over_processes((((values - mean) ** 2) * mask).sum()) / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_penalized_rewards(
    scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -kl_coef * (log pi - log pi_ref), plus the sequence score on each last real token.
    scores: (B,); logps, ref_logps, mask: (B, T) -> rewards (B, T), per-token KL (B, T)."""
    kl = (logps - ref_logps) * mask  # (B, T)
    rewards = -kl_coef * kl
    last = (mask * torch.arange(mask.size(1), device=mask.device)).argmax(dim=1)  # (B,)
    rewards[torch.arange(mask.size(0), device=mask.device), last] += scores
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over each response, backwards in time.
    Past the last real token rewards and values count as 0, so the episode ends there.
    rewards, values, mask: (B, T) -> advantages (B, T), returns (B, T) = advantages + values."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1 - e, 1 + e)), r = pi / pi_old."""
    log_ratio = logps - old_logps  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask),
        "approx_kl": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
        "ratio": masked_mean(ratio.detach(), mask),
    }
    return loss, metrics


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): each sample's reward minus the mean reward of the other samples of its
    prompt. rewards: (B,), a prompt's group_size samples next to each other -> (B,)."""
    grouped = rewards.view(-1, group_size)  # (P, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each sample's reward normalised within its prompt's group, (r - mean) / (std
    + eps), the sample standard deviation (as TRL). rewards: (B,), groups next to each other -> (B,)."""
    grouped = rewards.view(-1, group_size)  # (P, k)
    return ((grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + eps)).reshape(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The per-token k3 estimate of KL(pi || pi_ref) that GRPO's loss adds: exp(d) - d - 1 with d = log pi_ref
    - log pi (unbiased, never negative). (B, T), (B, T) -> (B, T)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped value loss: 0.5 mean max((v - R)^2, (v_old + clip(v - v_old, -e, e) - R)^2)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, {"value/clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask)}


def adaptive_kl_coef(kl_coef: float, observed_kl: float, target_kl: float, horizon: int, n_steps: int) -> float:
    """The proportional controller of Ziegler et al. (2019): move kl_coef so the KL tracks target_kl."""
    error = max(min(observed_kl / target_kl - 1.0, 0.2), -0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R]: how much of the return the critic explains (1 is perfect)."""
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)
