"""Tokenisation of each data format into model inputs, packing, and the collator.

Conventions (shared with TRL so results agree across tools):
- plain prompt/completion: the prompt and prompt+completion are tokenised with the tokenizer's
  default special tokens; the completion starts where the two token sequences diverge; EOS is
  appended to the completion;
- conversational data is rendered with the chat template (which carries its own special tokens)
  and only assistant turns are trained on;
- labels are the input ids with IGNORE_INDEX on every position that is not trained on.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from dpo_cli.data.layout import pack, sole_piece
from dpo_cli.losses import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool", "developer")


def divergence(prompt_ids: list[int], full_ids: list[int]) -> int:
    """Index of the first token where prompt+completion stops repeating the prompt's tokens."""
    limit = min(len(prompt_ids), len(full_ids))
    for index in range(limit):
        if prompt_ids[index] != full_ids[index]:
            return index
    return limit


def check_messages(messages: Any, field: str = "messages") -> str | None:
    """Why a conversation is malformed, or None."""
    if not isinstance(messages, list) or not messages:
        return f"'{field}' must be a non-empty list of {{role, content}} messages"
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"{field}[{number}] must have 'role' and 'content'"
        if message["role"] not in ROLES:
            return f"{field}[{number}].role {message['role']!r} is not one of {', '.join(ROLES)}"
        if not isinstance(message["content"], str):
            return f"{field}[{number}].content must be a string"
    return None


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    """The conversation as the chat template writes it; a template that cannot render is one clear error."""
    from dpo_cli.core.errors import UserError

    try:
        from jinja2 import TemplateError
    except ImportError:  # transformers then says it needs jinja2
        TemplateError = ()  # noqa: N806
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        line = f" line {exc.lineno}" if getattr(exc, "lineno", None) else ""
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise UserError(
            f"the chat template of {name} cannot render a conversation ({type(exc).__name__} at template{line}: {exc.message}); "
            "fix it or set tokenizer.chat_template"
        ) from None


TRANSCRIPT_ROLES = {"user": "Human", "assistant": "Assistant", "system": "System", "tool": "Tool", "developer": "Developer"}


def plain_transcript(messages: list[dict]) -> str:
    """A conversation as Anthropic HH-style text ("\n\nHuman: ...\n\nAssistant: ...") for models without a chat
    template (classifier reward models); ends with the cue for the assistant's turn."""
    turns = "".join(f"\n\n{TRANSCRIPT_ROLES[m['role']]}: {m['content']}" for m in messages)
    return f"{turns}\n\nAssistant:"


def _token_labels_for_spans(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[int]]:
    """Tokenise rendered text; label exactly the tokens that start inside one of the character spans."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = []
    for token_id, (start, end) in zip(input_ids, encoded["offset_mapping"]):
        inside = any(s <= start < e for s, e in spans) and end > start
        labels.append(token_id if inside else IGNORE_INDEX)
    return input_ids, labels


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict], completion: list[dict] | None
) -> tuple[list[int], list[int]] | str:
    """Token ids and labels for a conversation; trains on the completion messages (or every assistant turn)."""
    messages = prompt + (completion or [])
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    spans = []
    first = len(prompt) if completion is not None else 0
    for index in range(first, len(messages)):
        if messages[index]["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:index], add_generation_prompt=True) if index else ""
        upto = render_chat(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            return "the chat template does not render this conversation consistently turn by turn; set tokenizer.chat_template"
        spans.append((len(before), len(upto)))
    if not spans:
        return "the conversation has no assistant message to train on"
    return _token_labels_for_spans(tokenizer, full, spans)


def plain_sequence(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> tuple[list[int], int]:
    """Ids of prompt + completion + EOS with the tokenizer's own special tokens (a Llama BOS), and where the
    completion starts (where the two tokenisations diverge)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + completion)["input_ids"]
    if tokenizer.eos_token_id is not None and (not full_ids or full_ids[-1] != tokenizer.eos_token_id):
        full_ids = full_ids + [tokenizer.eos_token_id]
    return full_ids, divergence(prompt_ids, full_ids)


def encode_prompt_completion(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    full_ids, start = plain_sequence(tokenizer, prompt, completion)
    return full_ids, [IGNORE_INDEX] * start + full_ids[start:]


def prompt_ids_for_generation(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict]) -> list[int]:
    """The prompt tokenised exactly as training saw it before the completion started."""
    if isinstance(prompt, list):
        return tokenizer(render_chat(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def sft_format(columns: list[str]) -> str:
    return "messages" if "messages" in columns else "prompt_completion"


def sft_encoder(tokenizer: PreTrainedTokenizerBase, fmt: str, max_length: int) -> Callable[[dict], dict]:
    """A row encoder for data.encode_rows: input_ids/labels plus problem/truncated/emptied flags."""

    def encode(row: dict) -> dict:
        out = {"input_ids": [], "labels": [], "problem": "", "truncated": False, "emptied": False}
        if fmt == "messages":
            problem = check_messages(row.get("messages"))
            result = problem or encode_conversation(tokenizer, row["messages"], None)
        else:
            prompt, completion = row.get("prompt"), row.get("completion")
            if prompt is None or completion is None:
                result = f"'{'prompt' if prompt is None else 'completion'}' is missing"
            elif isinstance(prompt, list) or isinstance(completion, list):
                problem = check_messages(prompt, "prompt") or check_messages(completion, "completion")
                result = problem or encode_conversation(tokenizer, prompt, completion)
            elif not isinstance(prompt, str) or not isinstance(completion, str):
                result = "'prompt' and 'completion' must both be strings (or both lists of messages)"
            elif not completion.strip():
                result = "'completion' is empty"
            else:
                result = encode_prompt_completion(tokenizer, prompt, completion)
        if isinstance(result, str):
            out["problem"] = result
            return out
        input_ids, labels = result
        if len(input_ids) > max_length:
            out["truncated"] = True
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        out["emptied"] = all(label == IGNORE_INDEX for label in labels[1:])
        out["input_ids"], out["labels"] = input_ids, labels
        return out

    return encode


def text_problem(row: dict) -> str:
    """Why a pretraining row is unusable ('' when it is fine)."""
    text = row.get("text")
    if text is None:
        return "'text' is missing"
    if not isinstance(text, str):
        return "'text' must be a string"
    return "" if text.strip() else "'text' is empty"


def text_checker(row: dict) -> dict:
    """A row encoder for data.encode_rows that only validates: keeps good text as it is."""
    problem = text_problem(row)
    return {"text": "" if problem else row["text"], "problem": problem, "truncated": False, "emptied": False}


def text_encoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[dict], dict]:
    """Raw text for pretraining: the document with the tokenizer's own special tokens (a Llama BOS, as sft,
    dpo and generation see it), then EOS."""

    def encode(row: dict) -> dict:
        problem = text_problem(row)
        ids = [] if problem else tokenizer(row["text"])["input_ids"]
        if ids and tokenizer.eos_token_id is not None and ids[-1] != tokenizer.eos_token_id:
            ids = ids + [tokenizer.eos_token_id]
        return {"input_ids": ids, "problem": problem, "truncated": False, "emptied": False}

    return encode


def pack_blocks(ds: Dataset, block_size: int) -> Dataset:
    """Concatenate EOS-separated documents and cut fixed-length blocks (each 10k-document chunk drops its short tail)."""

    def group(batch: dict) -> dict:
        stream = [token for ids in batch["input_ids"] for token in ids]
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    return ds.map(group, batched=True, batch_size=min(len(ds), 10_000), remove_columns=ds.column_names)


def pack_examples(ds: Dataset, max_length: int) -> Dataset:
    """Best-fit-decreasing packing of whole examples into rows of at most max_length tokens.

    Each example keeps its own position ids (restarting at 0); with no attention mask, transformers
    turns them into a block-diagonal mask, so examples never attend to each other. The first label of
    every example is ignored: it would otherwise be predicted from the previous example.
    """
    lengths = [len(ids) for ids in ds["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    bins: list[list[int]] = []
    for index in order:
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):
            bins.append([index])
            space, number = max_length - lengths[index], len(bins) - 1
        else:
            space, number = free.pop(slot)
            bins[number].append(index)
            space -= lengths[index]
        bisect.insort(free, (space, number))
    rows = {"input_ids": [], "labels": [], "position_ids": []}
    all_ids, all_labels = ds["input_ids"], ds["labels"]
    for members in bins:
        ids, labels, positions = [], [], []
        for index in members:
            ids += all_ids[index]
            labels += [IGNORE_INDEX] + list(all_labels[index][1:])
            positions += list(range(lengths[index]))
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(positions)
    return Dataset.from_dict(rows)


def pad(sequences: list[list[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences as one (S, T) tensor padded to the longest (on the right, or the left for generation),
    and the attention mask (1 on real tokens)."""
    longest = max(len(s) for s in sequences)
    padded = torch.full((len(sequences), longest), value, dtype=torch.long)  # (S, T)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)  # (S, T)
    for i, ids in enumerate(sequences):
        span = slice(longest - len(ids), longest) if left else slice(0, len(ids))
        padded[i, span] = torch.tensor(ids, dtype=torch.long)
        mask[i, span] = 1
    return padded, mask


def collate_causal(rows: list[dict], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest row; `num_items` = target tokens (the loss weight), `num_tokens` = real tokens."""
    longest = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (B, T)
    packed = "position_ids" in rows[0]
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"] if "labels" in row else row["input_ids"])
        attention_mask[i, :n] = 1
        if packed:
            position_ids[i, :n] = torch.tensor(row["position_ids"])
            position_ids[i, n:] = torch.arange(longest - n)  # padding forms its own (ignored) sequence
    batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch["position_ids"] = position_ids  # no attention_mask: transformers derives the block mask
    else:
        batch["attention_mask"] = attention_mask
    batch["num_items"] = int((labels[:, 1:] != IGNORE_INDEX).sum())
    batch["num_tokens"] = int(attention_mask.sum())
    return batch


def collate_padding_free(rows: list[dict], pad_id: int) -> dict[str, Any]:
    """As collate_causal, with the rows packed without padding waste (data.layout): several examples share a
    row, each seeing only itself, with the loss of a row each."""
    batch: dict[str, Any] = pack([sole_piece(item, row["input_ids"], row["labels"]) for item, row in enumerate(rows)], pad_id, sequences=len(rows))
    batch["num_items"] = int((batch["labels"] != IGNORE_INDEX).sum())
    batch["num_tokens"] = sum(len(row["input_ids"]) for row in rows)
    return batch
