"""The models of RLHF's PPO phase and what they compute on a rollout.

Single-GPU mode (the recipe has model.lora): ONE base model carries two LoRA adapters, "default" (the
policy) and "value" (the critic, with its own value head); the reference is that base with the adapters
disabled. Without LoRA the policy, reference and critic are separate full models. Either way the reward
model is a separate frozen scorer (judges.RewardModelJudge).

Shapes: B rollouts; a rollout is P prompt tokens (left-padded) followed by T response tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dpo_cli.forward import _plain_linear_head
from dpo_cli.losses import tempered_token_logps


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
    from dpo_cli.encoding import pad

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


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_logps(
    model: torch.nn.Module, rollout: Rollout, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of the response under `model` (logits divided by the sampling temperature, as
    they were sampled), and optionally the entropy of each next-token distribution. -> (B, T), (B, T)."""
    base, context = _base(model), rollout.context_length
    inputs = dict(input_ids=rollout.query_response, attention_mask=rollout.attention_mask, position_ids=position_ids(rollout.attention_mask))
    if _plain_linear_head(base):
        hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state[:, context - 1 : -1]  # (B, T, H)
        logits = base.get_output_embeddings()(hidden)  # (B, T, V), the response positions only
    else:
        logits = model(**inputs, use_cache=False).logits[:, context - 1 : -1]
    return tempered_token_logps(logits, rollout.query_response[:, context:], temperature, with_entropy)


class ValueHead(torch.nn.Module):
    """hidden state -> value, for the critic adapter of single-GPU mode (zero at the start)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


class ActorCritic(torch.nn.Module):
    """Everything PPO trains: the policy and the critic (shared base + two adapters + value head, or two
    full models). The reference lives outside: the same base with adapters off, or a frozen copy."""

    def __init__(
        self,
        policy: torch.nn.Module,
        critic: torch.nn.Module | None,
        value_head: ValueHead | None,
        reference: torch.nn.Module | None,
    ):
        super().__init__()
        self.policy = policy
        self.critic = critic  # separate mode: a sequence classifier whose score head gives per-token values
        self.value_head = value_head  # shared mode
        self._reference = [reference] if reference is not None else []  # not a submodule: never trained or saved
        self.shared = critic is None
        self.is_loaded_in_4bit = getattr(policy, "is_loaded_in_4bit", False)
        for model in (policy, critic, reference):
            if model is not None:
                disable_dropout(model)
        self._trainable = [p for p in self.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def adapter(self, name: str) -> Iterator[None]:
        """Make one of the shared base's adapters active; every trainable parameter stays trainable
        (peft would freeze the other adapter, and then its gradients would silently stop)."""
        if not self.shared:
            yield
            return
        self.policy.set_adapter(name)
        for param in self._trainable:
            param.requires_grad_(True)
        try:
            yield
        finally:
            self.policy.set_adapter("default")
            for param in self._trainable:
                param.requires_grad_(True)

    def forward(
        self, query_response: torch.Tensor, attention_mask: torch.Tensor, context_length: int, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's log-probs and the critic's values of a mini-batch in one call, so that a DDP wrapper
        sees every trainable parameter used in one forward and one backward. -> (B, T), (B, T)."""
        part = Rollout([], query_response, attention_mask, context_length, response_mask=attention_mask[:, context_length:], texts=[], finished=None)
        logps, _ = self.policy_logps(part, temperature)
        return logps, self.values(part)

    def policy_logps(self, rollout: Rollout, temperature: float, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self.adapter("default"):
            return response_logps(self.policy, rollout, temperature, with_entropy)

    @torch.no_grad()
    def reference_logps(self, rollout: Rollout, temperature: float) -> torch.Tensor:
        if self._reference:
            return response_logps(self._reference[0], rollout, temperature)[0]
        with self.policy.disable_adapter():
            return response_logps(self.policy, rollout, temperature)[0]

    def values(self, rollout: Rollout) -> torch.Tensor:
        """Critic values at the positions that predict each response token. -> (B, T)."""
        context = rollout.context_length
        inputs = dict(input_ids=rollout.query_response, attention_mask=rollout.attention_mask, position_ids=position_ids(rollout.attention_mask))
        if self.shared:
            with self.adapter("value"):
                hidden = _base(self.policy).get_decoder()(**inputs, use_cache=False).last_hidden_state
            return self.value_head(hidden[:, context - 1 : -1])
        critic = _base(self.critic)
        hidden = critic.get_decoder()(**inputs, use_cache=False).last_hidden_state
        return critic.score(hidden[:, context - 1 : -1]).squeeze(-1).float()
