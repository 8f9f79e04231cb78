"""summary.json, written by one builder for every stage: what ran, where, how long, on which device and library
versions; a stage that updated weights adds what it trained (`Trained`) and what that cost (`Compute`); every
stage adds its own results as named fields and the few numbers its summary table shows first (highlights)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from dpo_cli.core import ui
from dpo_cli.eval.costs import estimate_flops, model_shape
from dpo_cli.data.loading import DataReport
from dpo_cli.train.loop import LoopResult
from dpo_cli.models.build import count_parameters
from dpo_cli.eval.plots import plot_training
from dpo_cli.core.rundir import RunDir, read_metrics
from dpo_cli.core.runtime import Runtime, library_versions, peak_memory


@dataclass
class Compute:
    """What the FLOPs estimate counts besides the trained model's training passes over its input tokens."""

    forward_tokens: int = 0  # through forward-only passes of a model shaped like the trained one (a reference, sampling)
    train_tokens: int | None = None  # through training passes, when not the input tokens (PPO: policy and critic, every epoch)
    other_models: list[dict[str, float]] = field(default_factory=list)  # {params, layers, hidden, context, tokens}: a reward model


@dataclass
class Trained:
    """What a stage that updates weights trained: the model and the totals of its steps."""

    model: torch.nn.Module
    steps: int
    tokens: int  # real input tokens through training passes
    items: int  # target tokens / pairs / episodes
    sequences: int
    train_seconds: float
    final_metrics: dict[str, Any]
    eval_metrics: dict[str, float] | None = None
    skipped_steps: int = 0
    compute: Compute = field(default_factory=Compute)
    earlier_wall_seconds: float = 0.0  # a resumed run: the wall time of the attempts before this one

    @classmethod
    def from_loop(cls, model: torch.nn.Module, result: LoopResult, compute: Compute | None = None) -> Trained:
        state = result.state
        return cls(
            model=model, steps=state.step, tokens=state.tokens, items=state.items, sequences=state.sequences,
            train_seconds=state.train_seconds, final_metrics=result.last_train_metrics, eval_metrics=result.eval_metrics,
            skipped_steps=state.skipped_steps, compute=compute or Compute(), earlier_wall_seconds=state.wall_seconds,
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        trainable, total = count_parameters(self.model)
        compute = {**model_shape(self.model), "context": self.tokens / max(self.sequences, 1), "train_tokens": self.tokens}
        if self.compute.train_tokens is not None:
            compute["train_tokens"] = self.compute.train_tokens
        if self.compute.forward_tokens:
            compute["forward_tokens"] = self.compute.forward_tokens
        if self.compute.other_models:
            compute["extra"] = self.compute.other_models
        return {
            "train_time_s": round(self.train_seconds, 3),
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "tokens": self.tokens,
            "items": self.items,
            "tokens_per_sec": self.tokens / max(self.train_seconds, 1e-9),
            "parameters": {"trainable": trainable, "total": total},
            "final_metrics": self.final_metrics,
            "eval_metrics": self.eval_metrics,
            "compute": compute,
            "estimated_flops": estimate_flops(compute),
        }


def write_summary(
    *,
    stage: str,
    run: RunDir,
    runtime: Runtime,
    started: float,
    status: str = "completed",
    trained: Trained | None = None,
    data: DataReport | None = None,
    results: dict[str, Any] | None = None,
    highlights: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write summary.json (from the main process), plot a training run's metrics, print the summary table.
    `results`: the stage's own output fields (pairs/s, the report's path, ...)."""
    summary: dict[str, Any] = {
        "stage": stage,
        "status": status,
        "run_dir": str(run.path),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(time.time() - started, 3),
        "device": runtime.device_name(),
    }
    if trained is not None:
        peak, peak_kind = peak_memory(runtime.device)
        summary["wall_time_s"] = round(summary["wall_time_s"] + trained.earlier_wall_seconds, 3)
        summary.update(trained.as_dict(), peak_memory_bytes=peak, peak_memory_kind=peak_kind, mixed_precision=runtime.mixed_precision)
        if run.final_dir.exists():
            summary["final_dir"] = str(run.final_dir)
        if trained.steps == 0:
            summary["evaluation_only"] = True
    if data is not None:
        summary["data"] = data.as_dict()
    summary.update(results or {})
    if highlights:
        summary["highlights"] = highlights
    summary["versions"] = library_versions()
    if runtime.is_main:
        if trained is not None:
            plot = plot_training(read_metrics(run.metrics_path), run.path / "training.png", f"{stage} · {run.path.name}")
            summary["plot"] = str(plot) if plot else None
        run.write_summary(summary)
    ui.summary_table(summary)
    return summary
