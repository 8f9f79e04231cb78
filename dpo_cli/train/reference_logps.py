"""DPO's reference log-probs, computed once before training (dpo.precompute_ref) and saved in the run dir;
and a cache across runs, so a second run on the same reference and the same pairs (another beta, loss or
learning rate; a sweep; a seed study) skips the pass.

The run dir's file carries a fingerprint of the token sequences it was computed on. The cache
($DPO_CLI_CACHE, default ~/.cache/dpo-cli, reference-logps/KEY.safetensors) is keyed by everything its
numbers depend on beyond float rounding: those token sequences, the reference's weights (hashed tensor by
tensor, adapters left out) and config, the transformers version, the quantization, precision and device
type. (The attention kernel and the row layout change only the rounding, and are left out.) A file there
can be deleted at any time.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import load_file, save

from dpo_cli.core import distributed, ui
from dpo_cli.core.rundir import RunDir
from dpo_cli.core.atomic import atomic_write_bytes
from dpo_cli.core.runtime import Runtime
from dpo_cli.models.roles import Reference
from dpo_cli.train.loop import BatchStream

CACHE_FORMAT = 1  # bump when what a cached file holds, or how it is computed, changes


def cache_root() -> Path:
    """$DPO_CLI_CACHE, else $XDG_CACHE_HOME/dpo-cli, else ~/.cache/dpo-cli."""
    configured = os.environ.get("DPO_CLI_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dpo-cli"


def token_fingerprint(ds: Dataset) -> str:
    """What the reference log-probs were computed on: every pair's token ids, hashed (a batch of rows at a
    time: a dataset of long pairs never sits in memory as Python lists)."""
    columns = ["chosen_input_ids", "rejected_input_ids", "chosen_labels", "rejected_labels"]
    digest = hashlib.sha256()
    for batch in ds.select_columns(columns).iter(batch_size=1024):
        for column in columns:
            digest.update(json.dumps(batch[column]).encode())
    return digest.hexdigest()[:32]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the weights a model computes with when its adapters are off: every tensor of its state dict
    (name, dtype, shape, bytes; 4-bit weights with their quantization state), LoRA adapters and peft's
    modules_to_save copies left out, and peft's name prefixes dropped, so a LoRA run's base and the same
    model loaded plainly agree."""
    digest = hashlib.sha256()
    tensors = {}
    for name, value in model.state_dict().items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        tensors[name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    for name in sorted(tensors):
        value = tensors[name]
        if not isinstance(value, torch.Tensor):
            digest.update(f"{name}={value!r}".encode())
            continue
        flat = value.detach().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(value.shape)}".encode())
        digest.update(flat.view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def config_fingerprint(model: torch.nn.Module) -> str:
    """The config the weights run under (rope scaling, norms' epsilon, soft-capping...), and the transformers
    version whose code runs them; where the checkpoint was loaded from left out."""
    import transformers

    from dpo_cli.models.build import base_model

    config = {k: v for k, v in base_model(model).config.to_dict().items() if k not in ("_name_or_path", "_attn_implementation_autoset")}
    text = json.dumps({"config": config, "transformers": transformers.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(tokens: str, weights: str, how: dict[str, Any]) -> str:
    """The cache file's name: every input of the numbers it holds."""
    identity = {"format": CACHE_FORMAT, "tokens": tokens, "weights": weights, **how}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:40]


@dataclass
class ReferenceCache:
    """Where a reference's log-probs are cached: `how` holds the settings besides tokens and weights that the
    numbers depend on; the weights are hashed once, when first needed (on the main process only)."""

    reference: Reference
    how: dict[str, Any]
    _weights: str | None = field(default=None, repr=False)

    def path(self, tokens: str) -> Path:
        if self._weights is None:
            model = self.reference.weights_model()
            self._weights = f"{weights_fingerprint(model)}:{config_fingerprint(model)}"
        return cache_root() / "reference-logps" / f"{cache_key(tokens, self._weights, self.how)}.safetensors"


def saved_fingerprint(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get("tokens")


def _holds(path: Path, fingerprint: str) -> bool:
    try:
        return path.exists() and saved_fingerprint(path) == fingerprint
    except Exception:  # a damaged cache file is a miss, never an error
        return False


def attach_reference_logps(
    ds: Dataset,
    name: str,
    reference: Reference,
    collate: Any,
    batch_size: int,
    run: RunDir,
    runtime: Runtime,
    cache: ReferenceCache | None,
) -> Dataset:
    """Reference log-probs of every pair, computed once and saved (RUN/reference_logps-NAME.safetensors). With
    a `cache`, a file an earlier run left there is taken instead of the pass, and a computed one is left there
    for later runs."""
    path = run.path / f"reference_logps-{name}.safetensors"
    fingerprint = token_fingerprint(ds)
    cached = None
    if cache is not None and runtime.is_main and not _holds(path, fingerprint):
        cached = cache.path(fingerprint)
        try:
            if _holds(cached, fingerprint):
                atomic_write_bytes(path, cached.read_bytes())
                ui.note(f"reference log-probs ({name}) taken from the cache: {cached} (same reference weights and config, pairs, precision and device type)")
        except OSError:  # deleted or unreadable meanwhile: a miss (the pass below writes the run's own file)
            pass
    distributed.barrier()
    if distributed.main_has(path) and distributed.broadcast(saved_fingerprint(path)) == fingerprint:
        saved = load_file(str(path))["logps"]
    else:  # none saved, or saved for other token sequences (the data or its tokenisation changed)
        # each process scores its contiguous share; gathered in rank order that is the dataset's order
        share = ds.select(distributed.shard(len(ds)))
        stream = BatchStream(share, batch_size, 0, collate, shuffle=False) if len(share) else None
        pieces = []
        with ui.TaskProgress(f"reference log-probs ({name})", stream.per_epoch if stream else 0, runtime.is_main) as progress:
            for index in range(stream.per_epoch if stream else 0):
                batch = {k: v.to(runtime.device) if isinstance(v, torch.Tensor) else v for k, v in stream[index].items()}
                with runtime.accelerator.autocast():
                    sums, _ = reference(batch)
                pairs = sums.size(0) // 2
                pieces.append(torch.stack([sums[:pairs], sums[pairs:]], dim=1).float().cpu())  # (B, 2)
                progress.advance(1)
        saved = torch.tensor(distributed.gather(torch.cat(pieces).tolist() if pieces else []), dtype=torch.float32).reshape(-1, 2)
        if runtime.is_main:
            data = save({"logps": saved}, metadata={"tokens": fingerprint})
            atomic_write_bytes(path, data)
            if cached is not None:
                try:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(cached, data)
                except OSError as exc:  # the cache is a convenience: the run goes on without it
                    ui.note(f"the reference log-probs could not be cached in {cached.parent}: {exc}")
        distributed.barrier()
    if saved.shape != (len(ds), 2):
        raise RuntimeError(f"{path} holds {saved.shape[0]} pairs, the data {len(ds)}; remove it to recompute")
    ds = ds.add_column("ref_chosen_logps", saved[:, 0].tolist())
    return ds.add_column("ref_rejected_logps", saved[:, 1].tolist())
