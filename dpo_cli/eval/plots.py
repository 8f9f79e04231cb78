"""PNG plots of a run, for people who would rather look than read metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo_cli.core.rundir import atomic_write_bytes


def plot_training(metrics: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """Train and eval loss by step, learning rate underneath; None when there is nothing to plot."""
    train = [m for m in metrics if m.get("split") is None and "loss" in m]
    evaluation = [m for m in metrics if m.get("split") == "eval" and "loss" in m]
    if not train:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    loss_axis.plot([m["step"] for m in train], [m["loss"] for m in train], label="train", linewidth=1.2)
    if evaluation:
        loss_axis.plot([m["step"] for m in evaluation], [m["loss"] for m in evaluation], "o-", label="eval")
    loss_axis.set_ylabel("loss")
    loss_axis.set_title(title)
    loss_axis.grid(alpha=0.3)
    loss_axis.legend()
    lr_axis.plot([m["step"] for m in train], [m.get("lr", 0.0) for m in train], color="tab:gray")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("optimizer step")
    lr_axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(out, buffer.getvalue())
    return out
