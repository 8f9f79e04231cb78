"""RLHF's experience: a batch of rollouts (prompt, sampled response and what PPO computes on it) and the
per-token log-probs of a response under a model. The models themselves are built in roles.py.

Shapes: B rollouts; a rollout is P prompt tokens (left-padded) followed by T response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpo_cli.models.forward import _plain_linear_head
from dpo_cli.losses import tempered_token_logps
from dpo_cli.models.build import base_model


@dataclass
class Rollout:
    """One batch of episodes."""

    prompts: list  # the raw prompts (text, or messages), for the reward model and samples
    query_response: torch.Tensor  # (B, P + T) token ids: prompt left-padded, response right-padded
    attention_mask: torch.Tensor  # (B, P + T) 1 on real tokens
    context_length: int  # P
    response_mask: torch.Tensor  # (B, T) 1.0 on response tokens up to and including EOS
    texts: list[str]  # (B,) decoded responses
    finished: torch.Tensor  # (B,) bool: emitted EOS
    scores: torch.Tensor | None = None  # (B,) reward-model scores (after any missing-EOS penalty)
    logps: torch.Tensor | None = None  # (B, T) policy log-probs when sampled (pi_old)
    ref_logps: torch.Tensor | None = None  # (B, T)
    values: torch.Tensor | None = None  # (B, T) critic values when sampled
    entropy: torch.Tensor | None = None  # (B, T)
    rewards: torch.Tensor | None = None  # (B, T) KL-penalised per-token rewards
    advantages: torch.Tensor | None = None  # (B, T) whitened GAE advantages
    returns: torch.Tensor | None = None  # (B, T)

    def rows(self, index: torch.Tensor) -> Rollout:
        """The rollouts at `index` (a mini-batch); tensors sliced, lists picked."""
        picked = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                picked[name] = value[index.to(value.device)]
            elif isinstance(value, list):
                picked[name] = [value[i] for i in index.tolist()]
            else:
                picked[name] = value
        return Rollout(**picked)


def make_rollout(prompts: list, prompt_ids: list[list[int]], generations: list, pad_id: int, device: torch.device) -> Rollout:
    """Sampled responses as one batch: left-padded prompts followed by right-padded responses."""
    from dpo_cli.data.encoding import pad

    query, query_mask = pad(prompt_ids, pad_id, left=True)  # (B, P)
    response, response_mask = pad([g.response_ids or [pad_id] for g in generations], pad_id)  # (B, T)
    for i, generation in enumerate(generations):
        if not generation.response_ids:  # nothing new was sampled: one masked placeholder token
            response_mask[i] = 0
    return Rollout(
        prompts=list(prompts),
        query_response=torch.cat([query, response], dim=1).to(device),
        attention_mask=torch.cat([query_mask, response_mask], dim=1).to(device),
        context_length=query.size(1),
        response_mask=response_mask.float().to(device),
        texts=[g.text for g in generations],
        finished=torch.tensor([g.finished for g in generations], device=device),
    )


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each sequence's first real token (left padding), as generation counted them."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def disable_dropout(module: torch.nn.Module) -> None:
    """PPO compares log-probs of the same tokens across passes: dropout would make the ratio noise."""
    for child in module.modules():
        if isinstance(child, torch.nn.Dropout):
            child.p = 0.0


def response_logps(
    model: torch.nn.Module, rollout: Rollout, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of the response under `model` (logits divided by the sampling temperature, as
    they were sampled), and optionally the entropy of each next-token distribution. -> (B, T), (B, T)."""
    base, context = base_model(model), rollout.context_length
    inputs = dict(input_ids=rollout.query_response, attention_mask=rollout.attention_mask, position_ids=position_ids(rollout.attention_mask))
    if _plain_linear_head(base):
        hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state[:, context - 1 : -1]  # (B, T, H)
        logits = base.get_output_embeddings()(hidden)  # (B, T, V), the response positions only
    else:
        logits = model(**inputs, use_cache=False).logits[:, context - 1 : -1]
    return tempered_token_logps(logits, rollout.query_response[:, context:], temperature, with_entropy)
