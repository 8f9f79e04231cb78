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
