"""The training session: what every stage that updates weights shares around its own steps. It puts back the
newest valid checkpoint, writes checkpoints (every train.save_every steps, at a stop signal, on demand),
keeps metrics.jsonl (and the trackers of train.report_to), shows the progress bar, turns a stop signal into a checkpoint and
RunInterrupted at a step boundary, and refuses to go on with non-finite weights. `loop.train` (pretrain, sft,
rm-train, dpo) and PPO's outer loop both run on it; each owns only what one of its steps does.

    session = TrainingSession(stage, run, runtime, cfg, total_steps, state, model, optimizer, scheduler)
    session.resume()                  # state <- the newest valid checkpoint, if any
    with session:                     # logs open, stop signals caught, progress shown
        while session.unfinished:
            ...one step...; state.step += 1
            session.log(record); session.show(value, lr, speed, logged)
            session.end_step()        # save cadence, stop signals
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch

from dpo_cli.train.checkpoint import resume_newest_valid, write_checkpoint
from dpo_cli.core.distributed import reduce_max
from dpo_cli.core.errors import RunInterrupted, UserError
from dpo_cli.core.recipes import TrainSection
from dpo_cli.core.rundir import MetricsLog, RunDir
from dpo_cli.core.runtime import Runtime
from dpo_cli.core.signals import StopSignals
from dpo_cli.core.ui import TrainProgress, note
from dpo_cli.train.trackers import Trackers, recipe_config, tracker_names


class SessionState(Protocol):
    """A stage's resumable counters (a dataclass, saved in each checkpoint); `step` counts the steps done."""

    @property
    def step(self) -> int: ...

    wall_seconds: float  # the wall time of earlier attempts (a resumed run's summary counts it)


class TrainingSession:
    def __init__(
        self,
        *,
        stage: str,
        run: RunDir,
        runtime: Runtime,
        cfg: TrainSection,
        total_steps: int,
        state: Any,
        model: torch.nn.Module,
        optimizer: Any,
        scheduler: Any,
        on_checkpoint: Callable[[Path], None] | None = None,
        unit: str = "step",
        progress_value: str = "loss",
        progress_speed: str = "tok/s",
    ):
        """`model` is what checkpoints hold (unwrapped); `optimizer` as it steps (prepared by accelerate)."""
        self.stage, self.run, self.runtime, self.cfg = stage, run, runtime, cfg
        self.total_steps = total_steps
        self.state = state
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.scaler = getattr(runtime.accelerator, "scaler", None)  # fp16 loss scaling on a GPU without bf16
        self.on_checkpoint = on_checkpoint
        self.unit = unit
        self._progress_labels = (progress_value, progress_speed)
        self.metrics: MetricsLog | None = None
        self._logs: list[MetricsLog] = []
        self._trackers: Trackers | None = None
        self._stop: StopSignals | None = None
        self._progress: TrainProgress | None = None
        self._began = time.time()

    # ------------------------------------------------------------------ before the first step

    def resume(self) -> Path | None:
        """Put the newest valid checkpoint back (weights, optimizer, schedule, scaler, RNG, state)."""
        checkpoint, loaded = resume_newest_valid(
            self.run, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, runtime=self.runtime
        )
        if checkpoint is not None:
            self.state = type(self.state)(**loaded)
            if self.runtime.is_main:
                note(f"resuming from {checkpoint} ({self.unit} {self.state.step} of {self.total_steps})")
        return checkpoint

    def __enter__(self) -> TrainingSession:
        is_main = self.runtime.is_main
        self.metrics = self.jsonl_log(self.run.metrics_path)
        names = tracker_names(self.cfg.report_to, self.cfg.tensorboard)
        self._trackers = Trackers.open(self.run, names, self.cfg.tracker_project, recipe_config(self.run)) if is_main and names else None
        self._stop = StopSignals().__enter__()
        value, speed = self._progress_labels
        self._progress = TrainProgress(self.stage, self.total_steps, self.state.step, is_main, value=value, speed=speed).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
        self.release_signals()
        for log in self._logs:
            log.close()
        if self._trackers is not None:
            failure = exc[0] if exc else None
            self._trackers.close("completed" if failure is None else "interrupted" if issubclass(failure, RunInterrupted) else "failed")

    def release_signals(self) -> None:
        """After the last step, signals act as they would without the session again: work past it (a final
        eval) has no step boundary to stop at."""
        if self._stop is not None:
            self._stop.__exit__(None, None, None)
            self._stop = None

    def jsonl_log(self, path: Path) -> MetricsLog:
        """A per-step JSONL log of this run (lines past the resumed checkpoint dropped), closed with the session."""
        log = self.run.jsonl_log(path, resume_step=self.state.step, enabled=self.runtime.is_main)
        self._logs.append(log)
        return log

    # ------------------------------------------------------------------ each step

    @property
    def unfinished(self) -> bool:
        return self.state.step < self.total_steps

    def log(self, record: dict[str, Any], split: str = "train") -> None:
        """A metrics line (with its "step"); to the trackers of train.report_to too, as `split/key`."""
        assert self.metrics is not None, "log inside `with session:`"
        self.metrics.log(record)
        if self._trackers is not None:
            self._trackers.log(record, split)

    def show(self, value: float, lr: float, speed: float, logged: bool) -> None:
        assert self._progress is not None, "show inside `with session:`"
        self._progress.update(self.state.step, value, lr, speed, logged=logged)

    def end_step(self) -> None:
        """After each step: a checkpoint every train.save_every steps, and at a stop signal (asked of every
        process at every step) a checkpoint and RunInterrupted; neither after the last step."""
        assert self._stop is not None, "end_step inside `with session:`"
        unfinished = self.unfinished
        if self.cfg.save_every and self.state.step % self.cfg.save_every == 0 and unfinished:
            self.save_checkpoint()
        stop_signal = self._stop.agreed()
        if stop_signal and unfinished:
            raise RunInterrupted(self.state.step, self.save_checkpoint(), stop_signal)

    def save_checkpoint(self) -> str:
        """checkpoints/step-N of the current state (once per step: a signal right after a periodic save reuses it)."""
        where = self.run.checkpoints_dir / f"step-{self.state.step}"
        if self.run.latest_checkpoint() == where:
            return str(where)
        for log in self._logs:  # every line up to this step is on disk before the checkpoint that resumes after it
            log.sync()
        write_checkpoint(
            self.run, self.state.step, self.cfg.keep_checkpoints, runtime=self.runtime, model=self.model, optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.scaler, loop_state=self._saved_state(), extra=self.on_checkpoint,
        )  # fmt: skip
        return str(where)

    def _saved_state(self) -> dict[str, Any]:
        """The state as a checkpoint keeps it: wall time up to now, so that a resumed run's wall time counts
        the attempts before it (its train time does, and must not exceed it)."""
        return {**asdict(self.state), "wall_seconds": self.state.wall_seconds + time.time() - self._began}

    def check_weights(self, params: list[torch.Tensor], step: int, lr: float, what: str = "the weights") -> None:
        """Stop before anything is written as final/ when the update of `step` (at learning rate `lr`) left a
        non-finite weight."""
        if weights_finite(params):
            return
        last = self.run.latest_checkpoint()
        raise UserError(
            f"{what} became non-finite in the update of {self.unit} {step} (an overflow: train.learning_rate "
            f"{lr:g} is too large for these gradients); nothing is written as final/"
            + (f"; {last} is the last good state" if last else "")
            + "; lower train.learning_rate and start over with --fresh"
        )


def weights_finite(params: list[torch.Tensor]) -> bool:
    """One fused pass over the trainable weights (a norm is inf or NaN when any element is); over every
    process, whose shards differ under FSDP / ZeRO-3."""
    norms = torch._foreach_norm([p.detach() for p in params]) if params else []
    local = bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()) if norms else True
    return reduce_max(0.0 if local else 1.0) == 0.0

