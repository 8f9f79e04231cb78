"""What a training checkpoint holds, and putting it back: trainable weights (safetensors), optimizer,
scheduler, grad scaler, every RNG, and the loop's position. The folder itself is made atomic by rundir."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dpo_cli.errors import UserError
from dpo_cli.rundir import CHECKPOINT_MARKER

TRAINABLE_FILE = "trainable.safetensors"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters the optimizer updates (tied weights appear once)."""
    return {name: p.detach().to("cpu").contiguous().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = set(params) - set(tensors), set(tensors) - set(params)
    if missing or unexpected:
        example = sorted(missing or unexpected)[0]
        raise UserError(f"checkpoint {where} does not fit this model ({len(missing)} missing, {len(unexpected)} unexpected, e.g. {example}); use --fresh")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))


def capture_rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    folder: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    loop_state: dict[str, Any],
) -> None:
    save_file(trainable_state(model), str(folder / TRAINABLE_FILE))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), folder / "scaler.pt")
    torch.save(capture_rng(), folder / "rng.pt")
    (folder / CHECKPOINT_MARKER).write_text(json.dumps(loop_state, indent=2) + "\n")  # last: marks completeness


def load_training_state(folder: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any) -> dict[str, Any]:
    load_trainable_state(model, load_file(str(folder / TRAINABLE_FILE)), folder)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    if scaler is not None and (folder / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    restore_rng(torch.load(folder / "rng.pt", weights_only=True))
    return json.loads((folder / CHECKPOINT_MARKER).read_text())
