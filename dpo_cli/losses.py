"""Loss math as pure functions of tensors: each returns (loss, metrics). No model, no recipe."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


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


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


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
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
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
