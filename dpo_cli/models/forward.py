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

from dpo_cli.data.layout import CHOSEN, PADDING, PARTS, REJECTED
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


def custom_mask_problem(model: torch.nn.Module, max_length: int) -> str | None:
    """Why the model cannot take the attention mask of packed rows (None: it can). A custom 4D mask is
    passed to the attention as it is: eager and SDPA take one, flash-attention kernels do not, and a sliding
    window shorter than a sequence would be lost (the mask then says everything)."""
    config = base_model(model).config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager"):
        return f"its attention ({implementation}) takes no custom mask"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    other_layers = sorted(set(getattr(text, "layer_types", None) or []) - {"full_attention", "sliding_attention"})
    if other_layers:  # linear-attention and state-space layers take no mask: completions would see each other
        return f"it has {', '.join(other_layers)} layers, which take no attention mask"
    if getattr(text, "alibi", False) or getattr(text, "model_type", "") in ("bloom", "mpt"):
        return "its ALiBi positions ignore position ids"
    window = getattr(text, "sliding_window", None)
    if window and getattr(text, "use_sliding_window", True) and window < max_length:
        return f"its sliding window ({window} tokens) is shorter than data.max_length ({max_length})"
    return None


GROUPING_HINT = " (train.group_by_length: true batches similar lengths)"


def packed_rows_allowed(
    setting: str, enabled: bool, models: list[torch.nn.Module], max_length: int, scored: bool = False, hint: str = GROUPING_HINT
) -> tuple[bool, list[str]]:
    """Whether a stage packs rows (data.layout): where `setting` is on and every model takes their mask (and,
    for reward models, has a `score` head to read at each completion's end); else a note says why not, and
    `hint` what else helps."""
    if not enabled:
        return False, []
    problems = [problem for model in models if (problem := custom_mask_problem(model, max_length))]
    if scored and not all(hasattr(base_model(model), "score") for model in models):
        problems.append("the reward model has no `score` head")
    return (False, [f"{setting}: off, {problems[0]}; one row per sequence{hint}"]) if problems else (True, [])


def segment_mask(segments: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """(R, T) segments of packed rows (data.layout) -> the (R, 1, T, T) attention mask: causal, within a segment,
    and a completion (3k+1, 3k+2) also sees its prompt (3k). A padding position sees itself, so no softmax row is
    empty (an empty one is NaN in SDPA, and NaN times a zero gradient is still NaN)."""
    length = segments.size(1)
    index = torch.arange(length, device=segments.device)
    causal = index[None, :] <= index[:, None]  # (T, T) key <= query
    real = segments != PADDING  # (R, T)
    query, key = segments[:, :, None], segments[:, None, :]  # (R, T, 1), (R, 1, T)
    visible = (key == query) | (key == query - query % PARTS)  # (R, Tq, Tk) itself, or its item's own tokens
    allowed = causal & visible & real[:, None, :] & real[:, :, None]
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device) & ~real[:, :, None]
    allowed = allowed[:, None]  # (R, 1, T, T)
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)


def segment_positions(segments: torch.Tensor, first: bool = False) -> torch.Tensor:
    """(R, T) segments -> (max segment + 1,) the flat index (row * T + column) of each segment's last token, or
    its first (-1 for an id no token has)."""
    flat = segments.flatten()  # (R*T,)
    real = (flat != PADDING).nonzero(as_tuple=True)[0]
    edges = torch.full((int(flat.max()) + 1,), -1, dtype=torch.long, device=segments.device)
    return edges.scatter_reduce(0, flat[real], real, reduce="amin" if first else "amax", include_self=not first)


def segment_targets(labels: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The targets of packed rows (R, T): sources, targets and sequences, each (N,), and the number of sequences.
    A target's log-prob comes from the hidden state at flat index `sources` (row * T + column): the token
    before it, except for the first token of a rejected completion, whose predecessor is its prompt's last
    token. Sequences are numbered as collate_pairs orders its rows: items 0..B-1 (an sft example, or a chosen
    completion), then the rejected completions B..2B-1."""
    flat_labels, flat_segments = labels.flatten(), segments.flatten()  # (R*T,)
    is_target = flat_labels != IGNORE_INDEX
    is_target[:: labels.size(1)] = False  # a row's first token has no predecessor
    positions = is_target.nonzero(as_tuple=True)[0]  # (N,)
    segment = flat_segments[positions]  # (N,)
    item, part = segment // PARTS, segment % PARTS
    first_rejected = (part == REJECTED) & (flat_segments[positions - 1] != segment)
    sources = torch.where(first_rejected, segment_positions(segments)[segment - part], positions - 1)  # (N,)
    real = flat_segments[flat_segments != PADDING]
    items = int(real.max()) // PARTS + 1
    pairs = bool((real % PARTS == REJECTED).any())
    return sources, flat_labels[positions], item + items * (part == REJECTED).long(), items * (2 if pairs else 1)


def model_segment_mask(base: torch.nn.Module, segments: torch.Tensor) -> torch.Tensor:
    """segment_mask in the form the model's attention takes (boolean for SDPA, additive in its dtype for eager)."""
    dtype = base.get_input_embeddings().weight.dtype
    return segment_mask(segments, base.config._attn_implementation, dtype if dtype.is_floating_point else torch.float32)


class CompletionLogProbs(torch.nn.Module):
    """Wraps a causal LM (peft-wrapped or not). forward(input_ids, attention_mask, labels) returns, per
    sequence, the sum of log-probs of the labelled tokens and how many there are: (S,) and (S,).

    With `segments` (collate_shared_pairs' rows of prompt, chosen, rejected), the B rows give 2B sums:
    chosen completions first, then rejected, each equal to what its own row would give."""

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
        segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """attention_mask None with position_ids: packed rows (transformers builds the block-diagonal mask)."""
        base = base_model(self.model)
        if segments is None:
            target_labels = labels[:, 1:]  # (S, T-1): position t predicts token t+1
            rows, columns = (target_labels != IGNORE_INDEX).nonzero(as_tuple=True)  # (N,), (N,)
            sources = rows * input_ids.size(1) + columns  # flat index of the predicting position
            targets, sequences, count = target_labels[rows, columns], rows, input_ids.size(0)
        else:
            sources, targets, sequences, count = segment_targets(labels, segments)
            attention_mask = model_segment_mask(base, segments)
        if _plain_linear_head(base):
            decoder = base.get_decoder()
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
            selected = hidden.flatten(0, 1)[sources]  # (N, H)
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
            logps = token_logps(logits.flatten(0, 1)[sources], targets)
        sums = torch.zeros(count, dtype=logps.dtype, device=logps.device).index_add(0, sequences, logps)  # (S,)
        return sums, torch.bincount(sequences, minlength=count)


class RewardScores(torch.nn.Module):
    """Wraps a scalar sequence classifier; forward(input_ids, attention_mask) -> (S,) scores, each read at the
    sequence's last real token (found from the attention mask, so left and right padding both work, and a pad
    token equal to EOS cannot move it). With `segments` (shared-prompt rows), B rows give 2B scores: chosen
    first, then rejected, each read at its completion's last token."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.is_loaded_in_4bit = getattr(model, "is_loaded_in_4bit", False)

    def adapters_off(self) -> contextlib.AbstractContextManager:
        """The wrapped model with its LoRA adapters switched off: the initial policy, no second copy."""
        return self.model.disable_adapter()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None, segments: torch.Tensor | None = None
    ) -> torch.Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)  # (T,)
        base = base_model(self.model)
        if segments is not None:
            last_positions = segment_positions(segments)  # by segment id: 3k, 3k+1, 3k+2 for pair k
            pairs = last_positions.size(0) // PARTS
            flat_last = torch.cat([last_positions[CHOSEN::PARTS][:pairs], last_positions[REJECTED::PARTS][:pairs]])  # (2B,)
            if bool((flat_last < 0).any()):
                raise ValueError("a pair without a chosen or rejected completion token reached the reward model")
            rows, last = flat_last // input_ids.size(1), flat_last % input_ids.size(1)
            attention_mask = model_segment_mask(base, segments)
        else:
            rows = torch.arange(input_ids.size(0), device=input_ids.device)
            last = (attention_mask * positions).argmax(dim=1)  # (S,) index of the last real token
            # Left padding shifts the real tokens: positions count from each sequence's first real token.
            position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        if hasattr(base, "score") and hasattr(base, "get_decoder"):
            hidden = base.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state  # (S, T, H)
            return base.score(hidden[rows, last]).squeeze(-1).float()  # (S,)
        if segments is not None:
            raise ValueError("shared-prompt rows need a reward model with a `score` head")
        # Other heads: transformers pools at the last non-pad token itself.
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0].float()


def pair_logps(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A CompletionLogProbs (or its distributed wrapper) on a batch of pairs, either layout: (2B,) sums, (2B,) counts."""
    return model(batch["input_ids"], batch.get("attention_mask"), batch["labels"], batch.get("position_ids"), batch.get("segments"))


def pair_scores(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """A RewardScores (or its distributed wrapper) on a batch of pairs, either layout: (2B,) scores."""
    return model(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"), batch.get("segments"))


def lm_step(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Next-token loss on the batch's labels (pretrain and sft). `model` is a CompletionLogProbs: only
    labelled positions go through the output head."""
    sequence_logps, target_counts = model(batch["input_ids"], batch.get("attention_mask"), batch["labels"], batch.get("position_ids"), batch.get("segments"))
    loss, _ = mean_nll(sequence_logps, target_counts)
    return loss, {}
