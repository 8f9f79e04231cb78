"""The models each algorithm runs, assembled from models.py's builders: DPO's reference (the policy with its
adapter off, or a frozen model) and PPO's actor-critic (single-GPU mode: ONE base carrying a policy adapter
"default" and a critic adapter "value" with its value head, the reference being that base with both off;
otherwise a policy, a frozen reference copy and a critic model). The reward model is a frozen scorer built by
model_io.load_reward_model (judges.RewardModelJudge). Stages call these builders; they construct no model themselves.

Shapes: B rollouts; a rollout is P prompt tokens (left-padded) followed by T response tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from dpo_cli.models.forward import CompletionLogProbs, pair_logps
from dpo_cli.models.build import ModelBundle, base_model, build_causal_lm, build_model
from dpo_cli.core.recipes import DpoRecipe, ModelSection, PpoRecipe
from dpo_cli.models.rollout import Rollout, disable_dropout, on_response_grid, response_hidden, response_logps
from dpo_cli.core.rundir import RunDir
from dpo_cli.core.runtime import Runtime


# ----------------------------------------------------------------------------- DPO


class Reference:
    """Reference log-probs under no_grad: the policy with its LoRA adapter disabled, or a separate frozen model."""

    def __init__(self, policy: CompletionLogProbs, separate: CompletionLogProbs | None):
        self.policy = policy
        self.separate = separate

    @torch.no_grad()
    def token_logps(self, rollout: Any) -> torch.Tensor:
        """Per-token reference log-probs of sampled responses (at temperature 1), for the KL estimate."""
        if self.separate is not None:
            return response_logps(self.separate.model, rollout, 1.0)[0]
        with self.policy.adapters_off():
            return response_logps(self.policy.model, rollout, 1.0)[0]

    def release(self) -> None:
        self.separate = None  # precomputed: the separate model's memory goes back

    def weights_model(self) -> torch.nn.Module:
        """The model whose weights (adapters off) give the reference log-probs."""
        return self.separate.model if self.separate is not None else self.policy.model

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        module = self.separate if self.separate is not None else self.policy
        adapter_off = self.policy.adapters_off() if self.separate is None else contextlib.nullcontext()
        training = module.training
        module.eval()
        try:
            with adapter_off:
                return pair_logps(module, batch)
        finally:
            module.train(training)


def build_reference(recipe: DpoRecipe, bundle: ModelBundle, policy: CompletionLogProbs, runtime: Runtime, run: RunDir) -> tuple[Reference, str]:
    """DPO's reference: the policy with its LoRA adapter off, else a frozen copy of the initial policy or dpo.ref_model."""
    if recipe.dpo.ref_model is None and recipe.model.lora is not None:
        return Reference(policy, None), "reference: the policy with its LoRA adapter disabled (no second copy)"
    source = recipe.dpo.ref_model or recipe.model.name_or_path
    cfg = ModelSection(
        name_or_path=source,
        revision=None if recipe.dpo.ref_model else recipe.model.revision,
        dtype=recipe.model.dtype,
        trust_remote_code=recipe.model.trust_remote_code,
        attn_implementation=recipe.model.attn_implementation,
    )
    frozen = build_causal_lm(cfg, bundle.tokenizer, runtime.device, recipe.seed, cache_dir=run.path / "reference").model
    frozen.requires_grad_(False)
    what = "a separate model" if recipe.dpo.ref_model else "a frozen copy of the initial policy"
    return Reference(policy, CompletionLogProbs(frozen)), f"reference: {what} ({source})"


# ----------------------------------------------------------------------------- PPO


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
        self.shared = value_head is not None  # one base, a policy and a critic adapter
        self.has_critic = critic is not None or value_head is not None  # rloo / grpo: none
        self.is_loaded_in_4bit = getattr(policy, "is_loaded_in_4bit", False)
        for model in (policy, critic, reference):
            if model is not None:
                disable_dropout(model)
        self._trainable = [p for p in self.parameters() if p.requires_grad]

    def models(self) -> list[torch.nn.Module]:
        """Every model that reads the rollouts: policy, and (separate models) critic and reference."""
        return [model for model in (self.policy, self.critic, *self._reference) if model is not None]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The policy's and the critic's trainable weights (fixed at construction: switching adapters must not change them)."""
        return self._trainable

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
        return logps, self.values(part) if self.has_critic else None

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
        if self.shared:
            with self.adapter("value"):
                return on_response_grid(rollout, self.value_head(response_hidden(self.policy, rollout)))
        critic = base_model(self.critic)
        return on_response_grid(rollout, critic.score(response_hidden(critic, rollout)).squeeze(-1).float())


def build_actor_critic(recipe: PpoRecipe, bundle: ModelBundle, runtime: Runtime, run: RunDir, reward_vocab: dict) -> tuple[ActorCritic, list[str]]:
    """PPO's policy, critic and reference: with model.lora one base carrying a policy and a critic adapter (the
    reference is the base with both off); else the policy, a frozen reference copy and a critic model. RLOO and
    GRPO (ppo.advantage) build no critic."""
    notes = []
    critic_free = recipe.ppo.advantage != "gae"
    if recipe.model.lora is not None and critic_free:
        notes.append(f"{recipe.ppo.advantage}: no critic; the policy is a LoRA adapter and the reference its base with the adapter off")
        return ActorCritic(bundle.model, None, None, None), notes
    if recipe.model.lora is not None:  # single-GPU mode: one base, two adapters
        from peft import LoraConfig

        lora = recipe.model.lora
        torch.manual_seed(recipe.seed + 1)
        bundle.model.add_adapter(
            "value",
            LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=lora.target_modules, bias=lora.bias, task_type="CAUSAL_LM"),
        )
        bundle.model.set_adapter("default")
        for name, param in bundle.model.named_parameters():
            if "lora_" in name and ".value." in name:
                param.requires_grad_(True)  # peft leaves a non-active adapter frozen
        value_head = ValueHead(base_model(bundle.model).config.hidden_size).to(runtime.device)
        notes.append("single-GPU mode: policy and critic are two LoRA adapters on one base; the reference is the base with both off")
        return ActorCritic(bundle.model, None, value_head, None), notes
    reference = build_causal_lm(recipe.model, bundle.tokenizer, runtime.device, recipe.seed, cache_dir=run.path / "reference").model
    reference.requires_grad_(False)
    if critic_free:
        notes.append(f"{recipe.ppo.advantage}: no critic; the policy and a frozen reference copy")
        return ActorCritic(bundle.model, None, None, reference), notes
    critic_source = recipe.ppo.value_model or recipe.ppo.reward_model or recipe.model.name_or_path  # a judge as the reward: from the policy
    if recipe.ppo.value_model is None and reward_vocab != bundle.tokenizer.get_vocab():
        critic_source = recipe.model.name_or_path  # the critic reads the policy's tokens: it needs its vocabulary
        notes.append("the reward model's tokenizer differs from the policy's: the critic starts from the policy instead")
    critic_cfg = ModelSection(name_or_path=critic_source, dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code)
    critic = build_model(critic_cfg, bundle.tokenizer, runtime.device, recipe.seed, cache_dir=run.path / "critic", head="reward").model
    notes.append(f"separate models: policy, frozen reference copy, critic from {critic_source}")
    return ActorCritic(bundle.model, critic, None, reference), notes
