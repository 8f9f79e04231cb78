"""Sequence log-probabilities of completions, computed lean.

Only the decoder's hidden states at completion positions go through the output head: the full
(sequences x length x vocabulary) logits never exist, in float32 or otherwise. When even the completion
logits would pass a memory budget, they are made in chunks, each recomputed in the backward pass, so one
chunk lives at a time. For a 150k-token vocabulary that is most of the memory of a preference step.
Models whose head does more than a linear map (logit soft-capping, scaling) take the plain forward.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from dpo_cli.losses import IGNORE_INDEX, mean_nll, token_logps
from dpo_cli.models.build import base_model

# Config attributes that change logits after the output head; such models use the plain forward.
HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _plain_linear_head(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_decoder"):
        return False
    for name in HEAD_EXTRAS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return False
    return True


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return token_logps(head(hidden), targets)


class CompletionLogProbs(torch.nn.Module):
    """Wraps a causal LM (peft-wrapped or not). forward(input_ids, attention_mask, labels) returns, per
    sequence, the sum of log-probs of the labelled tokens and how many there are: (S,) and (S,)."""

    def __init__(self, model: torch.nn.Module, chunk_size: int = 2048, logits_budget_bytes: int = 256 * 2**20):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.logits_budget_bytes = logits_budget_bytes  # below this, all completion logits at once, no recompute
        # accelerate places a 4-bit model itself; it must see through this wrapper
        self.is_loaded_in_4bit = getattr(model, "is_loaded_in_4bit", False)

    def adapters_off(self) -> contextlib.AbstractContextManager:
        """The wrapped model with its LoRA adapters switched off: the initial policy, no second copy."""
        return self.model.disable_adapter()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """attention_mask None with position_ids: packed rows (transformers builds the block-diagonal mask)."""
        target_labels = labels[:, 1:]  # (S, T-1): position t predicts token t+1
        mask = target_labels != IGNORE_INDEX  # (S, T-1)
        rows, cols = mask.nonzero(as_tuple=True)  # (N,), (N,)
        targets = target_labels[rows, cols]  # (N,)
        base = base_model(self.model)
        if _plain_linear_head(base):
            decoder = base.get_decoder()
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
            selected = hidden[:, :-1][rows, cols]  # (N, H)
            head = base.get_output_embeddings()
            vocabulary = head.weight.shape[0]
            if selected.size(0) * vocabulary * 4 <= self.logits_budget_bytes:
                chunk_size, recompute = max(selected.size(0), 1), False  # small: one pass, nothing recomputed
            else:
                chunk_size, recompute = self.chunk_size, torch.is_grad_enabled()
            pieces = []
            for start in range(0, selected.size(0), chunk_size):
                chunk, chunk_targets = selected[start : start + chunk_size], targets[start : start + chunk_size]
                if recompute:  # keep one chunk of logits at a time, also for the backward
                    pieces.append(checkpoint(_chunk_logps, head, chunk, chunk_targets, use_reentrant=False))
                else:
                    pieces.append(_chunk_logps(head, chunk, chunk_targets))
            logps = torch.cat(pieces) if pieces else selected.new_zeros(0, dtype=torch.float32)
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits  # (S, T, V)
            logps = token_logps(logits[:, :-1][rows, cols], targets)
        sums = torch.zeros(input_ids.size(0), dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)  # (S,)
        return sums, mask.sum(dim=1)


class RewardScores(torch.nn.Module):
    """Wraps a scalar sequence classifier; forward(input_ids, attention_mask) -> (S,) scores, each read at the
    sequence's last real token (found from the attention mask, so left and right padding both work, and a pad
    token equal to EOS cannot move it)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.is_loaded_in_4bit = getattr(model, "is_loaded_in_4bit", False)

    def adapters_off(self) -> contextlib.AbstractContextManager:
        """The wrapped model with its LoRA adapters switched off: the initial policy, no second copy."""
        return self.model.disable_adapter()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)  # (T,)
        last = (attention_mask * positions).argmax(dim=1)  # (S,) index of the last real token
        rows = torch.arange(input_ids.size(0), device=input_ids.device)
        base = base_model(self.model)
        if hasattr(base, "score") and hasattr(base, "get_decoder"):
            # Left padding shifts the real tokens: positions count from each sequence's first real token.
            position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
            hidden = base.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state  # (S, T, H)
            return base.score(hidden[rows, last]).squeeze(-1).float()  # (S,)
        # Other heads: transformers pools at the last non-pad token itself.
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0].float()


def lm_step(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Next-token loss on the batch's labels (pretrain and sft). `model` is a CompletionLogProbs: only
    labelled positions go through the output head."""
    sequence_logps, target_counts = model(batch["input_ids"], batch.get("attention_mask"), batch["labels"], batch.get("position_ids"))
    loss, _ = mean_nll(sequence_logps, target_counts)
    return loss, {}
