"""The one training loop of the gradient stages (pretrain, sft, and later rm-train and dpo).

A stage hands over a model, its data and a step function `step_fn(model, batch) -> (loss, metrics)`
where `loss` is the mean over the batch's `num_items` (target tokens, pairs, ...). The loop weights
micro-batches by `num_items`, so with gradient accumulation a step's loss and gradient equal those of
one big batch. It owns the optimizer, schedule, clipping, autocast, eval, logging, checkpoints,
resume and stop signals.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from dpo_cli.checkpoint import load_training_state, save_training_state
from dpo_cli.errors import RunInterrupted, UserError
from dpo_cli.optim import build_optimizer, build_scheduler
from dpo_cli.recipes import TrainSection
from dpo_cli.rundir import RunDir
from dpo_cli.runtime import Runtime, StopSignals
from dpo_cli.ui import TrainProgress, note

StepFn = Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]]
Collate = Callable[[list[dict]], dict[str, Any]]


class BatchStream:
    """Micro-batches over repeated epochs in a seeded order; micro-batch k is the same in every process
    and after every resume, so the loop's position is one integer."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, collate: Collate, shuffle: bool = True):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.collate = collate
        self.shuffle = shuffle
        self.per_epoch = math.ceil(len(dataset) / batch_size)
        self._order: tuple[int, list[int]] | None = None

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(len(self.dataset), generator=generator).tolist()
            else:
                order = list(range(len(self.dataset)))
            self._order = (epoch, order)
        return self._order[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, within = divmod(index, self.per_epoch)
        rows = self._epoch_order(epoch)[within * self.batch_size : (within + 1) * self.batch_size]
        columns = self.dataset[rows]
        return self.collate([{k: columns[k][i] for k in columns} for i in range(len(rows))])


@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken
    micro_batches: int = 0  # position in the BatchStream
    tokens: int = 0  # real (non-padding) input tokens seen
    items: int = 0  # target tokens / pairs seen
    sequences: int = 0  # sequences through the model (for the mean sequence length)
    train_seconds: float = 0.0  # summed over every process that worked on this run


@dataclass
class LoopResult:
    state: LoopState
    total_steps: int
    last_train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] | None = None


def total_steps_for(cfg: TrainSection, micro_batches_per_epoch: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    epochs = cfg.epochs if cfg.epochs is not None else 1.0
    return max(1, math.ceil(epochs * micro_batches_per_epoch / cfg.grad_accum))


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _scalar(value: Any) -> float:
    return float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)


@torch.no_grad()
def evaluate(model: torch.nn.Module, stream: BatchStream, step_fn: StepFn, runtime: Runtime) -> dict[str, float]:
    """Item-weighted means of the loss and metrics over the whole eval set."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    weight = 0
    for index in range(stream.per_epoch):
        batch = stream[index]
        with runtime.accelerator.autocast():
            loss, metrics = step_fn(model, _to_device(batch, runtime.device))
        n = batch["num_items"]
        weight += n
        for key, value in {"loss": loss, **metrics}.items():
            sums[key] = sums.get(key, 0.0) + _scalar(value) * n
    model.train(was_training)
    return {key: value / max(weight, 1) for key, value in sums.items()}


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
    optimizer = build_optimizer(model, cfg, runtime.device)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = getattr(accelerator, "scaler", None)

    state = LoopState()
    checkpoint = run.latest_checkpoint()
    if checkpoint is not None:
        state = LoopState(**load_training_state(checkpoint, model=unwrapped, optimizer=optimizer, scheduler=scheduler, scaler=scaler))
        note(f"resuming from {checkpoint} (step {state.step} of {total_steps})")
    metrics_log = run.metrics_log(resume_step=state.step, enabled=runtime.is_main)
    writer = _tensorboard(run, cfg) if runtime.is_main else None

    def save_checkpoint() -> str:
        where = str(run.checkpoints_dir / f"step-{state.step}")
        if run.latest_checkpoint() == Path(where):  # e.g. a signal right after a periodic save
            return where
        with run.new_checkpoint(state.step, keep=cfg.keep_checkpoints) as folder:
            if on_checkpoint is not None:
                on_checkpoint(folder)
            save_training_state(folder, model=unwrapped, optimizer=optimizer, scheduler=scheduler, scaler=scaler, loop_state=asdict(state))
        metrics_log.sync()
        return where

    result = LoopResult(state=state, total_steps=total_steps)
    interval_start, interval_tokens = time.perf_counter(), 0
    model.train()
    try:
        if after_step is not None and state.step == 0:
            _log_extra(after_step(0), 0, metrics_log)
        with StopSignals() as stop, TrainProgress(stage, total_steps, state.step, runtime.is_main) as progress:
            while state.step < total_steps:
                step_started = time.perf_counter()
                window = [train_stream[state.micro_batches + j] for j in range(cfg.grad_accum)]
                step_loss, step_metrics = accumulate_gradients(model, window, step_fn, runtime)
                grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if not math.isfinite(step_loss):
                    raise UserError(
                        f"the loss became {step_loss} at step {state.step + 1}: check the data, or lower train.learning_rate "
                        "and start over with --fresh"
                    )
                step_tokens = sum(batch["num_tokens"] for batch in window)
                state.step += 1
                state.micro_batches += cfg.grad_accum
                state.tokens += step_tokens
                state.items += sum(batch["num_items"] for batch in window)
                state.sequences += sum(int(batch["input_ids"].size(0)) for batch in window)
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
                    metrics_log.log(record)
                    _write_scalars(writer, record, "train")
                    result.last_train_metrics = {k: v for k, v in record.items() if k not in ("step", "tokens", "tokens_per_sec")}
                    interval_start, interval_tokens = time.perf_counter(), 0
                progress.update(state.step, step_loss, lr, speed, logged=logged)

                unfinished = state.step < total_steps
                if after_step is not None:
                    _log_extra(after_step(state.step), state.step, metrics_log)
                if eval_stream is not None and cfg.eval_every and state.step % cfg.eval_every == 0 and unfinished:
                    _log_eval(evaluate(model, eval_stream, step_fn, runtime), state.step, metrics_log, writer)
                if cfg.save_every and state.step % cfg.save_every == 0 and unfinished:
                    save_checkpoint()
                if stop.received is not None and unfinished:
                    raise RunInterrupted(state.step, save_checkpoint(), stop.received)

        if eval_stream is not None:
            result.eval_metrics = evaluate(model, eval_stream, step_fn, runtime)
            _log_eval(result.eval_metrics, state.step, metrics_log, writer)
    finally:
        metrics_log.close()
        if writer is not None:
            writer.close()
    return result


def accumulate_gradients(
    model: torch.nn.Module, window: list[dict[str, Any]], step_fn: StepFn, runtime: Runtime
) -> tuple[float, dict[str, float]]:
    """Forward and backward over one step's micro-batches, each weighted by its share of the step's items,
    so the gradient and the returned loss are those of one batch holding them all."""
    window_items = sum(batch["num_items"] for batch in window)
    step_loss = torch.zeros((), device=runtime.device)  # summed on the device: one sync per step, not per micro-batch
    sums: dict[str, Any] = {}
    for batch in window:
        share = batch["num_items"] / max(window_items, 1)
        with runtime.accelerator.autocast():
            loss, metrics = step_fn(model, _to_device(batch, runtime.device))
        runtime.accelerator.backward(loss * share)
        step_loss += loss.detach().float() * share
        for key, value in metrics.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else value
            sums[key] = sums.get(key, 0.0) + value * share
    return _scalar(step_loss), {key: _scalar(value) for key, value in sums.items()}


def _log_extra(record: dict[str, Any] | None, step: int, metrics_log: Any) -> None:
    if record:
        metrics_log.log({"step": step, **record})


def _log_eval(metrics: dict[str, float], step: int, metrics_log: Any, writer: Any) -> None:
    metrics_log.log({"step": step, "split": "eval", **metrics})
    _write_scalars(writer, {"step": step, **metrics}, "eval")


def _tensorboard(run: RunDir, cfg: TrainSection) -> Any:
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard needs the tensorboard package: pip install 'dpo-cli[tensorboard]'") from None
    return SummaryWriter(log_dir=str(run.path / "tensorboard"))


def _write_scalars(writer: Any, record: dict[str, Any], split: str) -> None:
    if writer is None:
        return
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
            writer.add_scalar(f"{split}/{key}", value, record["step"])
