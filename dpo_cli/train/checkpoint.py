"""What a training checkpoint holds, and putting it back: trainable weights (safetensors), optimizer,
scheduler, grad scaler, every RNG, and the loop's position. The folder itself is made atomic by rundir."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dpo_cli.core.errors import UserError
from dpo_cli.core.rundir import CHECKPOINT_MARKER
from dpo_cli.core.atomic import sha256_file, writing

TRAINABLE_FILE = "trainable.safetensors"
MANIFEST = "manifest.json"  # sha256 and size of every other file: resume verifies it


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
    data: dict[str, Any] | None = None,
) -> None:
    """A whole checkpoint from one process; `data` is the fingerprint of the data it was trained on."""
    save_shared_state(folder, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, loop_state=loop_state)
    torch.save(capture_rng(), folder / "rng-rank0.pt")
    mark_complete(folder, loop_state, data)


def mark_complete(folder: Path, loop_state: dict[str, Any], data: dict[str, Any] | None = None) -> None:
    """The loop state (the completeness marker), then the manifest of every file, written last and fsynced."""
    (folder / CHECKPOINT_MARKER).write_text(json.dumps(loop_state, indent=2) + "\n")
    write_manifest(folder, data)


def write_manifest(folder: Path, data: dict[str, Any] | None = None) -> None:
    """sha256 and size of every file of the checkpoint, the library versions that wrote it and the fingerprint
    of the data it was trained on (`data`, the run's data_fingerprint.json)."""
    from dpo_cli.core.runtime import library_versions

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "files": {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
        "versions": library_versions(),
        "data": data,
    }
    with open(folder / MANIFEST, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(manifest, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def verify_manifest(folder: Path) -> str | None:
    """Why the checkpoint does not match its manifest (a flipped bit, a truncated or missing file), or None.
    Checkpoints written before manifests existed are taken as they are."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{path} is damaged"
    if not isinstance(files, dict) or not all(isinstance(e, dict) and {"size", "sha256"} <= set(e) for e in files.values()):
        return f"{path} is damaged"
    for name, expected in files.items():
        where = folder / name
        if not where.is_file():
            return f"{where} is missing"
        if where.stat().st_size != expected["size"]:
            return f"{where} is {where.stat().st_size} bytes, its manifest says {expected['size']}"
        if sha256_file(where) != expected["sha256"]:
            return f"{where} does not match its sha256 in the manifest (the file was damaged)"
    return None


def _unreadable(exc: Exception) -> bool:
    """A file torch or safetensors cannot deserialise (truncated, not a zip, a refused pickle); not an OOM."""
    import pickle
    import zipfile

    if isinstance(exc, torch.OutOfMemoryError):
        return False
    return isinstance(exc, (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError)) or (
        type(exc).__name__ == "SafetensorError"
    )


def resume_newest_valid(run: Any, *, model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any, runtime: Any) -> tuple[Path | None, dict[str, Any] | None]:
    """Put back the newest checkpoint that matches its manifest and loads; a damaged one is named, moved aside
    (checkpoints/damaged-step-N, so pruning never keeps it over good ones) and the one before it tried. Every
    process takes the same one: a checkpoint any of them cannot use is skipped by all. (None, None) when
    there is none; a clear error when none of several is usable."""
    from dpo_cli.core.distributed import barrier, is_main, reduce_max
    from dpo_cli.core.ui import note

    found = run.checkpoints()
    problems, damaged = [], []
    for _step, folder in reversed(found):
        problem = verify_manifest(folder)
        loaded = None
        if not reduce_max(1.0 if problem else 0.0):
            try:
                loaded = load_training_state(folder, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, runtime=runtime)
            except UserError:
                raise  # the checkpoint is fine; it does not fit this model or engine
            except Exception as exc:  # noqa: BLE001 - sorted by _unreadable
                if not _unreadable(exc):
                    raise
                text = str(exc).strip()
                problem = f"{folder}: cannot be read ({type(exc).__name__}: {text.splitlines()[0][:160] if text else ''})"
        if not reduce_max(1.0 if problem else 0.0):
            barrier()
            if is_main():
                for bad in damaged:
                    os.replace(bad, bad.with_name(f"damaged-{bad.name}"))
            barrier()
            return folder, loaded
        problem = problem or "another process could not use it"
        problems.append(problem)
        damaged.append(folder)
        if is_main():
            note(f"checkpoint {folder.name} is not usable: {problem}; trying the one before it")
    if problems:
        raise UserError(f"no usable checkpoint in {run.checkpoints_dir}: {problems[0]}; use --fresh to start over (the old run is kept)")
    return None, None


def save_shared_state(folder: Path, *, model: torch.nn.Module | None, optimizer: Any, scheduler: Any, scaler: Any, loop_state: dict) -> None:
    """What every process holds alike (written once): trainable weights (unless an engine saved its shards),
    optimizer, scheduler and grad scaler."""
    if model is not None:
        save_file(trainable_state(model), str(folder / TRAINABLE_FILE))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), folder / "scaler.pt")


def write_checkpoint(
    run: Any,
    step: int,
    keep: int,
    *,
    runtime: Any,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    loop_state: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """checkpoints/step-N from every process: the main process writes what all hold alike, each process
    its own RNG states; FSDP and DeepSpeed save their shards through accelerate. Published (renamed into
    place) only when every part is written, so a crash never leaves a half checkpoint."""
    from dpo_cli.core.distributed import barrier

    if runtime.world_size == 1:
        with run.new_checkpoint(step, keep=keep) as folder:
            if extra is not None:
                extra(folder)
            save_training_state(
                folder, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, loop_state=loop_state, data=run.data_fingerprint()
            )  # fmt: skip
        return run.checkpoints_dir / f"step-{step}"
    tmp, target = run.checkpoint_staging(step), run.checkpoints_dir / f"step-{step}"
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        with writing(target):
            torch.save(capture_rng(), tmp / f"rng-rank{runtime.rank}.pt")
            if runtime.sharded:
                runtime.accelerator.save_state(str(tmp / "engine"))
            barrier()
            if runtime.is_main:
                if extra is not None:
                    extra(tmp)
                save_shared_state(
                    tmp, model=None if runtime.sharded else model, optimizer=None if runtime.sharded else optimizer,
                    scheduler=scheduler, scaler=scaler, loop_state=loop_state,
                )  # fmt: skip
                mark_complete(tmp, loop_state, run.data_fingerprint())
                run.publish_checkpoint(tmp, step, keep)
    except BaseException:
        if runtime.is_main:  # no half-written staging folder is left (one a killed process leaves, the next start removes)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    return target


def load_training_state(
    folder: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, runtime: Any = None
) -> dict[str, Any]:
    """Put a checkpoint back on this process. On another number of processes the RNG of a process that did
    not exist before is rank 0's (the engines' own shards need the same number of processes)."""
    rank = runtime.rank if runtime is not None else 0
    if (folder / "engine").is_dir():
        saved = json.loads((folder / CHECKPOINT_MARKER).read_text()).get("processes", 1)
        if runtime is None or not runtime.sharded or saved != runtime.world_size:
            raise UserError(
                f"{folder} holds the FSDP/DeepSpeed shards of {saved} processes: resume it with the same "
                "distributed.strategy on as many processes"
            )
        runtime.accelerator.load_state(str(folder / "engine"))
    elif runtime is not None and runtime.sharded:
        raise UserError(f"{folder} was written without FSDP/DeepSpeed: resume it with distributed.strategy ddp (or one process)")
    else:
        load_trainable_state(model, load_file(str(folder / TRAINABLE_FILE)), folder)
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    if scaler is not None and (folder / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    # this process's RNG; else rank 0's (a process that did not exist before); rng.pt: checkpoints written before the multi-process version
    candidates = [folder / f"rng-rank{rank}.pt", folder / "rng-rank0.pt", folder / "rng.pt"]
    restore_rng(torch.load(next((f for f in candidates if f.exists()), candidates[0]), weights_only=True))
    return json.loads((folder / CHECKPOINT_MARKER).read_text())
