"""RLHF's experience: the prompts each iteration samples (PromptBatches), a batch of rollouts (prompt, sampled
response and what PPO computes on it), its mini-batches, and the per-token log-probs of a response under a
model. The models themselves are built in roles.py.

Shapes: B rollouts; a rollout is P prompt tokens (left-padded) followed by T response tokens.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from dpo_cli.data.layout import OWN, PARTS, Piece, pack, segment_id
from dpo_cli.models.forward import _plain_linear_head, model_segment_mask, segment_positions
from dpo_cli.losses import tempered_token_logps
from dpo_cli.models.build import base_model
from dpo_cli.core.errors import UserError
from dpo_cli.core.runtime import Runtime


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
    padding_free: bool = False  # model passes on packed rows (PackedEpisodes), each episode without padding
    layout_decided: bool = False  # a mini-batch: packs where its batch did, whatever it saves itself

    @functools.cached_property
    def packed(self) -> PackedEpisodes | None:
        """This batch's episodes in packed rows, for the model passes (None: the padded layout above)."""
        if not self.padding_free:
            return None
        return pack_episodes(self, 0.0 if self.layout_decided else MIN_SAVING)

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
        # one layout for every pass of an iteration: pi_old, the reference and each update read the same rows
        picked.update(padding_free=self.packed is not None, layout_decided=True)
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


@dataclass
class PackedEpisodes:
    """Episodes without padding: each one's prompt and response tokens as one piece of a packed row
    (data.layout), seeing only itself, positions counted from its first token - the hidden states its
    padded row gives. N response tokens are read off and written back to their (B, T) places."""

    input_ids: torch.Tensor  # (R, L)
    position_ids: torch.Tensor  # (R, L)
    segments: torch.Tensor  # (R, L) 3b for episode b, -1 for padding
    sources: torch.Tensor  # (N,) flat index (row * L + column) of the position that predicts each response token
    targets: torch.Tensor  # (N,) the response tokens
    episodes: torch.Tensor  # (N,) each one's episode b
    steps: torch.Tensor  # (N,) and its response position t
    shape: tuple[int, int]  # (B, T)
    masks: dict = field(default_factory=dict)  # the attention mask by (implementation, dtype): one for the policy, reference and critic

    def attention_mask(self, base: torch.nn.Module) -> torch.Tensor:
        key = (base.config._attn_implementation, base.get_input_embeddings().weight.dtype)
        if key not in self.masks:
            self.masks[key] = model_segment_mask(base, self.segments)
        return self.masks[key]

    def on_grid(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) per response token -> (B, T), zero where the padded layout has padding."""
        grid = values.new_zeros(self.shape)
        grid[self.episodes, self.steps] = values
        return grid


MIN_SAVING = 0.1  # packed rows must save this share of the padded tokens to be worth their mask


def pack_episodes(rollout: Rollout, min_saving: float = 0.0) -> PackedEpisodes | None:
    """The rollout's episodes packed (first fit, rows as long as its longest episode); None (the padded layout)
    when that saves under `min_saving` of the tokens, or an episode has no prompt token, whose first response
    token no position predicts."""
    context, device = rollout.context_length, rollout.query_response.device
    real = rollout.attention_mask.bool().cpu()  # (B, P + T)
    tokens = rollout.query_response.cpu()
    prompt_lengths = real[:, :context].sum(dim=1).tolist()
    if min(prompt_lengths) == 0:
        return None
    pieces = []
    for b, row in enumerate(tokens):
        ids = row[real[b]].tolist()
        pieces.append(Piece(ids, ids, list(range(len(ids))), [segment_id(b, OWN)] * len(ids)))
    rows = pack(pieces, pad_id=int(tokens[0, 0]), sequences=len(pieces))
    if rows["input_ids"].numel() > (1 - min_saving) * tokens.numel():
        return None
    starts = segment_positions(rows["segments"], first=True)[::PARTS]  # (B,) each episode's first flat index
    sources, episodes, steps = [], [], []
    for b, piece in enumerate(pieces):
        response = len(piece.ids) - prompt_lengths[b]
        steps.append(torch.arange(response))
        sources.append(starts[b] + prompt_lengths[b] - 1 + steps[-1])
        episodes.append(torch.full((response,), b, dtype=torch.long))
    steps_, episodes_ = torch.cat(steps), torch.cat(episodes)
    targets = tokens[episodes_, context + steps_]
    return PackedEpisodes(
        input_ids=rows["input_ids"].to(device), position_ids=rows["position_ids"].to(device), segments=rows["segments"].to(device),
        sources=torch.cat(sources).to(device), targets=targets.to(device), episodes=episodes_.to(device), steps=steps_.to(device),
        shape=tuple(rollout.response_mask.shape),
    )  # fmt: skip


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each sequence's first real token (left padding), as generation counted them."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def disable_dropout(module: torch.nn.Module) -> None:
    """PPO compares log-probs of the same tokens across passes: dropout would make the ratio noise."""
    for child in module.modules():
        if isinstance(child, torch.nn.Dropout):
            child.p = 0.0


def _model_inputs(base: torch.nn.Module, rollout: Rollout) -> dict[str, torch.Tensor]:
    packed = rollout.packed
    if packed is None:
        return dict(input_ids=rollout.query_response, attention_mask=rollout.attention_mask, position_ids=position_ids(rollout.attention_mask))
    return dict(input_ids=packed.input_ids, attention_mask=packed.attention_mask(base), position_ids=packed.position_ids)


def _at_response(rollout: Rollout, states: torch.Tensor) -> torch.Tensor:
    """Per-position states (B, P + T, ...) or packed (R, L, ...) -> those of the positions that predict each
    response token: (B, T, ...) padded, (N, ...) packed."""
    if rollout.packed is None:
        return states[:, rollout.context_length - 1 : -1]
    return states.flatten(0, 1)[rollout.packed.sources]


def on_response_grid(rollout: Rollout, values: torch.Tensor) -> torch.Tensor:
    """_at_response's per-token results back as (B, T)."""
    return values if rollout.packed is None else rollout.packed.on_grid(values)


def response_hidden(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """The decoder's last hidden states at the positions that predict each response token (_at_response's shape)."""
    base = base_model(model)
    return _at_response(rollout, base.get_decoder()(**_model_inputs(base, rollout), use_cache=False).last_hidden_state)


def response_logps(
    model: torch.nn.Module, rollout: Rollout, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of the response under `model` (logits divided by the sampling temperature, as
    they were sampled), and optionally the entropy of each next-token distribution. -> (B, T), (B, T)."""
    base = base_model(model)
    if _plain_linear_head(base):
        logits = base.get_output_embeddings()(response_hidden(model, rollout))  # the response positions only
    else:
        logits = _at_response(rollout, model(**_model_inputs(base, rollout), use_cache=False).logits)
    targets = rollout.query_response[:, rollout.context_length :] if rollout.packed is None else rollout.packed.targets
    logps, entropy = tempered_token_logps(logits, targets, temperature, with_entropy)
    return on_response_grid(rollout, logps), None if entropy is None else on_response_grid(rollout, entropy)


def minibatches(size: int, mini_batch_size: int, seed: int, iteration: int, epoch: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + iteration * 1009 + epoch)
    order = torch.randperm(size, generator=generator)
    return [order[start : start + mini_batch_size] for start in range(0, size, mini_batch_size)]


class PromptBatches:
    """Each process samples batch_size prompts of a global batch of batch_size x processes, in a seeded order per
    epoch (an incomplete global batch at an epoch's end is left out with several processes, so all sample alike)."""

    def __init__(self, prompts: list[Any], batch_size: int, seed: int, runtime: Runtime):
        self.prompts, self.batch_size, self.seed, self.rank = prompts, batch_size, seed, runtime.rank
        self.global_batch = batch_size * runtime.world_size
        world = runtime.world_size
        self.per_epoch = math.ceil(len(prompts) / self.global_batch) if world == 1 else len(prompts) // self.global_batch
        if self.per_epoch == 0:
            raise UserError(
                f"data.train: {len(prompts)} prompts cannot fill one batch of {batch_size} prompts (train.batch_size / ppo.samples_per_prompt) on "
                f"each of {world} processes; lower train.batch_size or use fewer processes"
            )
        self._order = torch.Generator()

    def __getitem__(self, iteration: int) -> list[Any]:
        epoch, within = divmod(iteration, self.per_epoch)
        permutation = torch.randperm(len(self.prompts), generator=self._order.manual_seed(self.seed * 7919 + epoch)).tolist()
        start = within * self.global_batch + self.rank * self.batch_size
        return [self.prompts[i] for i in permutation[start : start + self.batch_size]]
