"""Rows without padding waste: several sequences in one row, each seeing only itself.

A batch's sequences are packed, first fit by decreasing length, into rows as long as its longest sequence
(so no row is longer, and attention costs no more, than with a row each). Every token carries a `segment`:
3k for item k's own tokens (an sft example, or a pair's prompt), 3k+1 and 3k+2 for a pair's chosen and
rejected completions, which see their prompt and themselves (models.forward.segment_mask), -1 for padding.
Position ids restart with each item (and, for the rejected completion, continue from the end of the prompt),
so every token gets the hidden state it would get in a row of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpo_cli.losses import IGNORE_INDEX

PADDING = -1
OWN, CHOSEN, REJECTED = 0, 1, 2  # the parts of an item
PARTS = 3


def segment_id(item: int, part: int) -> int:
    return PARTS * item + part


@dataclass
class Piece:
    """One item's tokens in a packed row: ids, labels (each token's own), positions and segments."""

    ids: list[int]
    labels: list[int]
    positions: list[int]
    segments: list[int]


def first_fit(lengths: list[int]) -> list[list[int]]:
    """Item indices grouped into rows of at most max(lengths) tokens: first fit, longest first."""
    capacity, rows, room = max(lengths), [], []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if slot is None:
            rows.append([])
            room.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(index)
        room[slot] -= lengths[index]
    return rows


def sole_piece(item: int, ids: list[int], labels: list[int]) -> Piece:
    """A sequence on its own (an sft example); its first token has no predecessor, so it is no target."""
    return Piece(ids, [IGNORE_INDEX] + labels[1:], list(range(len(ids))), [segment_id(item, OWN)] * len(ids))


def pack(pieces: list[Piece], pad_id: int, sequences: int) -> dict[str, torch.Tensor]:
    """Pieces -> (R, T) input_ids, labels, position_ids and segments, padded on the right, and `num_sequences`:
    how many sums the model returns (an sft example each; a pair's chosen and rejected completions)."""
    rows = first_fit([len(piece.ids) for piece in pieces])
    length = max(len(piece.ids) for piece in pieces)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (R, T)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)  # (R, T)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)  # (R, T)
    segments = torch.full((len(rows), length), PADDING, dtype=torch.long)  # (R, T)
    for r, members in enumerate(rows):
        start = 0
        for index in members:
            piece = pieces[index]
            span = slice(start, start + len(piece.ids))
            input_ids[r, span] = torch.tensor(piece.ids)
            labels[r, span] = torch.tensor(piece.labels)
            position_ids[r, span] = torch.tensor(piece.positions)
            segments[r, span] = torch.tensor(piece.segments)
            start += len(piece.ids)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segments": segments, "num_sequences": sequences}
