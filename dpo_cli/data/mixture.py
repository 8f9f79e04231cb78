"""Weighted mixtures of data sources (`data.train` as a list of `{path, weight}`): each source contributes its
share of the rows, drawn with the seed; hub datasets too large to download whole are streamed, only the rows
the mixture takes being read. What was taken from each source goes into the summary."""

from __future__ import annotations

import math
from typing import Any

import datasets
import torch
from datasets import Dataset

from dpo_cli.core.errors import UserError
from dpo_cli.core.sections import DataSection, DataSource


SOURCE = "__source__"  # which source a mixed row came from (with its row number: the row's identity)


def is_mixture(train: Any) -> bool:
    """A list with a mapping in it is a mixture; a list of plain paths is one dataset, its files concatenated."""
    return isinstance(train, list) and any(isinstance(entry, DataSource) for entry in train)


def sources_of(train: Any) -> list[DataSource]:
    return [entry if isinstance(entry, DataSource) else DataSource(path=entry) for entry in train]


def mixture_counts(available: list[int | None], weights: list[float], total: int | None) -> list[int]:
    """Rows to take from each source for shares proportional to `weights`: `total` rows (largest remainders
    rounding so they add up), or, without a total, as many as the sources give without repeating a row (the
    source that runs out first at its share sets the size). `available` None: unknown (a stream), only with a total."""
    shares = [w / sum(weights) for w in weights]
    if total is None:
        if any(n is None for n in available):
            raise ValueError("a streamed source needs a total")
        total = min(math.floor(n / share + 1e-9) for n, share in zip(available, shares))  # type: ignore[operator]
    exact = [share * total for share in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(available: int, count: int, generator: torch.Generator) -> list[int]:
    """`count` row indices out of `available`: a seeded sample without repetition, and where more are wanted
    than there are, whole shuffled passes over the source, then a sample of the rest."""
    indices: list[int] = []
    while len(indices) + available <= count:
        indices += torch.randperm(available, generator=generator).tolist()
    return indices + torch.randperm(available, generator=generator)[: count - len(indices)].tolist()


def load_mixture(cfg: DataSection, seed: int, load_one, prepare) -> tuple[Dataset, list[dict[str, Any]]]:
    """The mixed training rows, shuffled, and what each source gave (for the summary). `load_one(source,
    what, split)` loads a whole source as a Dataset ready to mix; `prepare(rows, source, what)` makes the rows
    of a streamed one so (the column mappings, the standard layout, row numbers)."""
    sources = sources_of(cfg.train)
    loaded: list[Dataset | None] = []
    for index, source in enumerate(sources):
        what = f"data.train[{index}]"
        if source.streaming:
            if cfg.mixture_rows is None and source.max_rows is None:
                raise UserError(f"{what}: a streamed source needs a size: set its max_rows, or data.mixture_rows")
            loaded.append(None)
        else:
            rows = load_one(source, what, source.split or cfg.split)
            if source.max_rows is not None and len(rows) > source.max_rows:
                rows = rows.select(range(source.max_rows))
            if len(rows) == 0:
                raise UserError(f"{what}: {source.path} has no rows")
            loaded.append(rows)
    available = [len(rows) if rows is not None else source.max_rows for rows, source in zip(loaded, sources)]
    counts = mixture_counts(available, [s.weight for s in sources], cfg.mixture_rows)
    generator = torch.Generator().manual_seed(seed)
    parts, record = [], []
    for index, (source, rows, count) in enumerate(zip(sources, loaded, counts)):
        if rows is None:
            what = f"data.train[{index}]"
            rows = prepare(_stream(source, cfg, seed, count if source.max_rows is None else min(count, source.max_rows), what), source, what)
        if count:
            drawn = rows.select(draw(len(rows), count, generator))
            parts.append(drawn.add_column(SOURCE, [index] * len(drawn)))
        record.append({
            "source": source.path, "weight": source.weight, "share": round(count / max(sum(counts), 1), 4), "rows": count,
            "available": len(rows), "repeated": count > len(rows), "streamed": source.streaming,
        })  # fmt: skip
    mixed = _concatenate(parts)
    return mixed.shuffle(seed=seed).flatten_indices(), record


def _stream(source: DataSource, cfg: DataSection, seed: int, count: int, what: str) -> Dataset:
    """The first `count` rows of a shuffled stream (a buffer of 10,000 rows): nothing else is downloaded."""
    from dpo_cli.data.files import BUILDERS, is_local, local_files

    try:
        if is_local(source.path):
            files = local_files(source.path, what, source.split or cfg.split)
            stream = datasets.load_dataset(BUILDERS[files[0][files[0].rindex("."):].lower()], data_files=files, split="train", streaming=True)
        else:
            stream = datasets.load_dataset(source.path, source.subset or cfg.subset, split=source.split or cfg.split, streaming=True)
        rows = list(stream.shuffle(seed=seed, buffer_size=10_000).take(count))
    except UserError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what}: cannot stream {source.path!r} ({first})") from None
    if not rows:
        raise UserError(f"{what}: streaming {source.path!r} gave no rows")
    return Dataset.from_list(rows)


def _concatenate(parts: list[Dataset]) -> Dataset:
    """Sources must agree on their columns (after each one's column mapping): the columns all of them have are kept."""
    common = [c for c in parts[0].column_names if all(c in p.column_names for p in parts)]
    if not [c for c in common if not c.startswith("__")]:
        have = "; ".join(f"data.train[{p[0][SOURCE]}]: {', '.join(c for c in p.column_names if not c.startswith('__'))}" for p in parts)
        raise UserError(f"data.train: the mixture's sources share no column ({have}); map them to the same names with each source's `columns:`")
    parts = [p.select_columns(common) for p in parts]
    try:
        return datasets.concatenate_datasets([p.cast(parts[0].features) if p.features != parts[0].features else p for p in parts])
    except Exception as exc:  # noqa: BLE001 - features that cannot be aligned
        raise UserError(
            f"data.train: the mixture's sources do not share a row layout ({str(exc).strip().splitlines()[0][:200]}); "
            "give each source the same columns (a source's `columns:` maps its names)"
        ) from None
