"""The one training loop of the gradient stages (pretrain, sft, and later rm-train and dpo).

A stage hands over a model, its data and a step function `step_fn(model, batch) -> (loss, metrics)`
where `loss` is the mean over the batch's `num_items` (target tokens, pairs, ...). The loop weights
micro-batches by `num_items`, so with gradient accumulation a step's loss and gradient equal those of
one big batch. It owns the optimizer, schedule, clipping, autocast, eval, logging, checkpoints,
resume and stop signals.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset

from dpo_cli.core.distributed import fsdp_uniform_dtype, reduce_sum
from dpo_cli.core.errors import UserError
from dpo_cli.train.optim import build_optimizer, build_scheduler
from dpo_cli.core.recipes import TrainSection
from dpo_cli.core.rundir import RunDir
from dpo_cli.core.runtime import Runtime
from dpo_cli.train.session import TrainingSession
from dpo_cli.core.ui import note
from dpo_cli.losses import SubsetMean

StepFn = Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]]
Collate = Callable[[list[dict]], dict[str, Any]]


class BatchStream:
    """Micro-batches over repeated epochs in a seeded order; micro-batch k is the same after every resume,
    so the loop's position is one integer. With several processes a micro-batch is batch_size rows on each:
    process r takes rows r*b ... (r+1)*b - 1 of the global batch of world_size * b rows (the same rows one
    process with a batch of world_size * b would see), and an incomplete global batch at the end of an
    epoch is left out so that every process has rows."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        collate: Collate,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        lengths: list[int] | None = None,
    ):
        self.dataset = dataset
        self.lengths = lengths  # given: each epoch's order is grouped by length (group_by_length)
        self.batch_size = batch_size
        self.seed = seed
        self.collate = collate
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        rows = batch_size * world_size
        self.per_epoch = math.ceil(len(dataset) / rows) if world_size == 1 else len(dataset) // rows
        if self.per_epoch == 0:
            raise UserError(
                f"data.train: {len(dataset)} rows cannot fill one batch of {batch_size} rows on each of {world_size} "
                "processes; lower train.batch_size or use fewer processes"
            )
        self._order: tuple[int, list[int]] | None = None

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(len(self.dataset), generator=generator).tolist()
                if self.lengths is not None:
                    order = group_by_length(order, self.lengths, self.batch_size * self.world_size, generator)
            else:
                order = list(range(len(self.dataset)))
            self._order = (epoch, order)
        return self._order[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, within = divmod(index, self.per_epoch)
        start = within * self.batch_size * self.world_size + self.rank * self.batch_size
        rows = self._epoch_order(epoch)[start : start + self.batch_size]
        columns = self.dataset[rows]
        return self.collate([{k: columns[k][i] for k in columns} for i in range(len(rows))])


def eval_batches(dataset: Dataset, batch_size: int, collate: Collate) -> list[dict[str, Any]] | None:
    """This process's share of the eval rows, in order, as batches (None when the share is empty)."""
    from dpo_cli.core.distributed import shard

    rows = list(shard(len(dataset)))
    if not rows:
        return None
    part = dataset.select(rows)
    return [BatchStream(part, batch_size, 0, collate, shuffle=False)[i] for i in range(math.ceil(len(rows) / batch_size))]


@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken
    micro_batches: int = 0  # position in the BatchStream
    tokens: int = 0  # real (non-padding) input tokens seen
    items: int = 0  # target tokens / pairs seen
    sequences: int = 0  # sequences through the model (for the mean sequence length)
    train_seconds: float = 0.0  # time in steps, over every attempt (a resumed run adds to its checkpoint's)
    wall_seconds: float = 0.0  # wall time of the earlier attempts, each up to its last checkpoint (set by the session)
    processes: int = 1  # how many processes took micro_batches steps through the data
    skipped_steps: int = 0  # steps whose loss or gradient norm was not finite (train.nonfinite: skip): never applied


def continue_on(state: LoopState, world_size: int) -> str | None:
    """A run resumed on another number of processes (DDP) goes on from the same place in the data: the
    rows seen so far are kept, counted in the new global batches. Returns a note for the user."""
    if state.processes == world_size:
        return None
    old = state.processes
    state.micro_batches = state.micro_batches * old // world_size
    state.processes = world_size
    return f"the run continues on {world_size} process(es) instead of {old}: each step now takes {world_size} x train.batch_size rows"


@dataclass
class LoopResult:
    state: LoopState
    total_steps: int
    last_train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] | None = None
    model: Any = None  # the model as the engine prepared it (FSDP/DeepSpeed: needed to gather final weights)

    @property
    def trained(self) -> bool:
        """False for an evaluation-only run (train.max_steps: 0), which writes no final/."""
        return self.total_steps > 0


def total_steps_for(cfg: TrainSection, micro_batches_per_epoch: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    epochs = cfg.epochs if cfg.epochs is not None else 1.0
    return max(1, math.ceil(epochs * micro_batches_per_epoch / cfg.grad_accum))


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _scalar(value: Any) -> float:
    if value is None:  # DeepSpeed reports the gradient norm only after its own step
        return float("nan")
    return float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)


def _metric_parts(value: Any, items: int) -> list[Any]:
    """What a micro-batch adds to a metric's totals: value x items (an item-weighted mean), or a SubsetMean's
    own total and count (and those of the mean it subtracts). Tensors stay on the device (no sync per
    micro-batch); reduce_metrics reads them once."""
    if isinstance(value, SubsetMean):
        return [value.total.detach().float(), value.count.float()] + (_metric_parts(value.minus, items) if value.minus is not None else [])
    return [(value.detach().float() if isinstance(value, torch.Tensor) else value) * items]


def _metric_value(template: Any, parts: list[float], items: float) -> float:
    """A metric from its totals over every micro-batch and process (`template`: one micro-batch's value)."""
    if isinstance(template, SubsetMean):
        own = parts[0] / parts[1] if parts[1] else 0.0
        return own - _metric_value(template.minus, parts[2:], items) if template.minus is not None else own
    return parts[0] / max(items, 1)


def reduce_metrics(per_batch: list[tuple[dict[str, Any], int]], local_items: int) -> tuple[float, dict[str, float]]:
    """Metrics of micro-batches (each with its item count) as one batch holding all of them on every
    process: the global item count and each metric (keys as the first micro-batch gives them)."""
    templates: dict[str, Any] = {}
    sums: dict[str, list[Any]] = {}
    for metrics, items in per_batch:
        for key, value in metrics.items():
            parts = _metric_parts(value, items)
            templates.setdefault(key, value)
            sums[key] = [a + b for a, b in zip(sums[key], parts)] if key in sums else parts
    keys = sorted(sums)
    flat = reduce_sum([float(local_items)] + [_scalar(part) for key in keys for part in sums[key]])
    items, position, result = flat[0], 1, {}
    for key in keys:
        width = len(sums[key])
        result[key] = _metric_value(templates[key], flat[position : position + width], items)
        position += width
    return items, result


@torch.no_grad()
def evaluate(model: torch.nn.Module, stream: BatchStream, step_fn: StepFn, runtime: Runtime) -> dict[str, float]:
    """Item-weighted means of the loss and metrics over the whole eval set (every process scores its share
    with the unwrapped model, then the sums are added up)."""

    was_training = model.training
    model.eval()
    per_batch: list[tuple[dict[str, Any], int]] = []
    for batch in eval_batches(stream.dataset, stream.batch_size, stream.collate) or []:
        with runtime.accelerator.autocast():
            loss, metrics = step_fn(model, _to_device(batch, runtime.device))
        per_batch.append(({"loss": loss, **metrics}, batch["num_items"]))
    model.train(was_training)
    items, result = reduce_metrics(per_batch or [({"loss": 0.0}, 0)], sum(n for _, n in per_batch))
    if items and not math.isfinite(result["loss"]):
        raise UserError(f"the eval loss became {result['loss']}: the model is broken; nothing is written as final/ (the newest checkpoint is the last one saved)")
    return result


MEGABATCH = 50  # global batches sorted together by group_by_length


def group_by_length(order: list[int], lengths: list[int], global_batch: int, generator: torch.Generator) -> list[int]:
    """A shuffled order regrouped so that each global batch holds rows of similar length: groups of MEGABATCH
    global batches, each sorted longest first, then its batches in a random order (no trend within a group)
    and each batch's rows shuffled (no process always gets the longest rows); a group's last, incomplete
    batch stays last, as an epoch's last batch is the one left short."""
    grouped = []
    for start in range(0, len(order), global_batch * MEGABATCH):
        members = sorted(order[start : start + global_batch * MEGABATCH], key=lambda i: -lengths[i])
        batches = [members[b : b + global_batch] for b in range(0, len(members), global_batch)]
        full = len(batches) if len(batches[-1]) == global_batch else len(batches) - 1
        for b in torch.randperm(full, generator=generator).tolist() + list(range(full, len(batches))):
            grouped.extend(batches[b][i] for i in torch.randperm(len(batches[b]), generator=generator).tolist())
    return grouped


def row_lengths(dataset: Dataset) -> list[int]:
    """Tokens of each row: an example's, or a pair's chosen and rejected sequences together (read as Arrow
    list lengths, a batch at a time: the token ids never become Python lists)."""
    import pyarrow.compute as pc

    columns = [c for c in ("input_ids", "chosen_input_ids", "rejected_input_ids") if c in dataset.column_names]
    totals: list[int] = []
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=4096):
        lengths = [pc.list_value_length(batch.column(c)).to_pylist() for c in columns]
        totals.extend(sum(row) for row in zip(*lengths))
    return totals


def batch_streams(
    train_set: Dataset, eval_set: Dataset | None, collate: Collate, cfg: TrainSection, seed: int, runtime: Runtime
) -> tuple[BatchStream, BatchStream | None]:
    """The training stream (this process's share of each global batch) and the eval stream of a stage."""
    lengths = row_lengths(train_set) if cfg.group_by_length else None
    train_stream = BatchStream(train_set, cfg.batch_size, seed, collate, rank=runtime.rank, world_size=runtime.world_size, lengths=lengths)
    eval_stream = BatchStream(eval_set, cfg.eval_batch_size or cfg.batch_size, seed, collate, shuffle=False) if eval_set is not None else None
    return train_stream, eval_stream


def train(
    *,
    stage: str,
    model: torch.nn.Module,
    train_stream: BatchStream,
    eval_stream: BatchStream | None,
    step_fn: StepFn,
    cfg: TrainSection,
    run: RunDir,
    runtime: Runtime,
    on_checkpoint: Callable[[Any], None] | None = None,
    after_step: Callable[[int], dict[str, Any] | None] | None = None,
) -> LoopResult:
    """after_step(step) may return a metrics line (e.g. a policy evaluation) to log for that step; it is also
    called with step 0 before a fresh run starts."""
    accelerator = runtime.accelerator
    total_steps = total_steps_for(cfg, train_stream.per_epoch)
    if total_steps == 0 and eval_stream is None:
        raise UserError("train.max_steps: 0 evaluates the model on data.eval, and this recipe has none: set data.eval (a file, or a number of rows to hold out)")
    if runtime.sharded and runtime.distributed.strategy == "fsdp":
        cast = fsdp_uniform_dtype(model)
        if cast and runtime.is_main:
            note(cast)
    optimizer = build_optimizer(model, cfg, runtime.device)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    params = [p for p in model.parameters() if p.requires_grad]

    session = TrainingSession(
        stage=stage, run=run, runtime=runtime, cfg=cfg, total_steps=total_steps, state=LoopState(),
        model=unwrapped, optimizer=optimizer, scheduler=scheduler, on_checkpoint=on_checkpoint,
    )  # fmt: skip
    if session.resume() is not None:
        moved = continue_on(session.state, runtime.world_size)
        if moved and runtime.is_main:
            note(moved)
    state = session.state
    state.processes = runtime.world_size

    result = LoopResult(state=state, total_steps=total_steps, model=model)
    interval_start, interval_tokens = time.perf_counter(), 0
    model.train()
    with session:
        if after_step is not None and state.step == 0:
            _log_extra(after_step(0), 0, session)
        while session.unfinished:
            step_started = time.perf_counter()
            window = [train_stream[state.micro_batches + j] for j in range(cfg.grad_accum)]
            step_loss, step_metrics = accumulate_gradients(model, window, step_fn, runtime)
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            lr = scheduler.get_last_lr()[0]
            broken = nonfinite_step(step_loss, grad_norm, session.scaler)
            if broken:  # nothing is applied: the weights are still those of the last good step
                discard_step(optimizer, session.scaler)
                if cfg.nonfinite == "skip" and state.skipped_steps < cfg.max_skipped_steps:
                    state.skipped_steps += 1
                    state.micro_batches += cfg.grad_accum
                    session.log({"step": state.step + 1, "skipped": broken, "skipped_total": state.skipped_steps})
                    continue
                where = session.save_checkpoint() if state.step > 0 else None
                kept = f"stopped with a checkpoint of step {state.step}, the last good state ({where}); " if where else "stopped; "
                how = "set train.nonfinite: skip and run the same command to skip such steps, or lower train.learning_rate and start over with --fresh"
                if cfg.nonfinite == "skip":
                    how = f"more than train.max_skipped_steps={cfg.max_skipped_steps} steps were skipped; lower train.learning_rate and start over with --fresh"
                raise UserError(f"{broken} at step {state.step + 1}: {kept}{how}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            session.check_weights(params, state.step + 1, lr)
            step_tokens, step_items, step_sequences = (
                int(v) for v in reduce_sum([
                    sum(b["num_tokens"] for b in window), sum(b["num_items"] for b in window), sum(int(b.get("num_sequences", b["input_ids"].size(0))) for b in window)
                ])
            )  # fmt: skip
            state.step += 1
            state.micro_batches += cfg.grad_accum
            state.tokens += step_tokens
            state.items += step_items
            state.sequences += step_sequences
            state.train_seconds += time.perf_counter() - step_started
            interval_tokens += step_tokens

            logged = state.step % cfg.log_every == 0 or state.step == total_steps
            speed = 0.0
            if logged:
                speed = interval_tokens / max(time.perf_counter() - interval_start, 1e-9)
                record = {
                    "step": state.step,
                    "epoch": round(state.micro_batches / train_stream.per_epoch, 4),
                    "loss": step_loss,
                    "lr": lr,
                    "grad_norm": _scalar(grad_norm),
                    **step_metrics,
                    "tokens": state.tokens,
                    "tokens_per_sec": speed,
                }
                session.log(record)
                result.last_train_metrics = {k: v for k, v in record.items() if k not in ("step", "tokens", "tokens_per_sec")}
                interval_start, interval_tokens = time.perf_counter(), 0
            session.show(step_loss, lr, speed, logged)

            if after_step is not None:
                _log_extra(after_step(state.step), state.step, session)
            if eval_stream is not None and cfg.eval_every and state.step % cfg.eval_every == 0 and session.unfinished:
                session.log({"step": state.step, "split": "eval", **evaluate(unwrapped, eval_stream, step_fn, runtime)}, split="eval")
            session.end_step()

        session.release_signals()
        if eval_stream is not None:
            result.eval_metrics = evaluate(unwrapped, eval_stream, step_fn, runtime)
            session.log({"step": state.step, "split": "eval", **result.eval_metrics}, split="eval")
    return result


def nonfinite_step(step_loss: float, grad_norm: Any, scaler: Any = None) -> str | None:
    """Why a step must not be applied, or None (every process sees the same reduced loss and norm). Under
    fp16 loss scaling (`scaler`) an inf gradient norm is by design: the scaler skips that step and lowers
    its scale itself, so only the loss decides."""
    if not math.isfinite(step_loss):
        return f"the loss became {step_loss}"
    norm = _scalar(grad_norm)
    if scaler is None and grad_norm is not None and not math.isfinite(norm):
        return f"the gradient norm became {norm}"
    return None


def discard_step(optimizer: Any, scaler: Any = None) -> None:
    """Drop a step's gradients without applying them; a scaler that unscaled them for clipping closes its step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()


def accumulate_gradients(
    model: torch.nn.Module, window: list[dict[str, Any]], step_fn: StepFn, runtime: Runtime
) -> tuple[float, dict[str, float]]:
    """Forward and backward over one step's micro-batches, each weighted by its share of the step's items
    over every process, so the gradient and the returned loss are those of one batch holding them all.
    (DDP averages gradients over processes: the shares are scaled by the number of processes to undo it.)"""
    accelerator, world = runtime.accelerator, runtime.world_size
    local_items = sum(batch["num_items"] for batch in window)
    global_items = reduce_sum([local_items])[0]
    per_batch: list[tuple[dict[str, Any], int]] = []
    for index, batch in enumerate(window):
        share = batch["num_items"] / max(global_items, 1) * world
        last = index == len(window) - 1
        with accelerator.no_sync(model) if world > 1 and not last else contextlib.nullcontext():
            with accelerator.autocast():
                loss, metrics = step_fn(model, _to_device(batch, runtime.device))
            accelerator.backward(loss * share)
        per_batch.append(({"loss": loss.detach(), **metrics}, batch["num_items"]))
    _, result = reduce_metrics(per_batch, local_items)
    return result.pop("loss"), result


def _log_extra(record: dict[str, Any] | None, step: int, session: TrainingSession) -> None:
    if record:
        session.log({"step": step, **record}, split="policy")
