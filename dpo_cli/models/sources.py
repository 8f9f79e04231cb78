"""Where weights come from: a hub id, a model folder, a PEFT adapter over a recorded base, or a dpo-cli run
(its final/)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dpo_cli.core.errors import UserError


@dataclass
class ModelSource:
    """Where weights come from: a hub id or folder, possibly an adapter over a base."""

    path: str  # hub id or absolute folder of the full model, or of the adapter
    adapter_base: str | None = None  # set when `path` is a PEFT adapter: the base it was trained on
    revision: str | None = None

    @property
    def is_adapter(self) -> bool:
        return self.adapter_base is not None


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin", "model.pt", "model.pth")


def refuse_pickle_weights(source: ModelSource, what: str, allowed: bool = False) -> None:
    """Weights come from safetensors: a local model or adapter (or an adapter's base) that holds only pickle
    files, which run code as they load, is refused unless the recipe allows it for files it trusts."""
    while True:
        folder = Path(source.path)
        if folder.is_dir() and not any(folder.glob("*.safetensors")):
            pickled = next((name for name in PICKLE_WEIGHTS if (folder / name).is_file()), None)
            if pickled is not None and not allowed:
                raise UserError(
                    f"{what}: {folder / pickled} is a pickle file, which can run code when loaded; convert it to safetensors "
                    "on a machine you trust (model.save_pretrained(DIR, safe_serialization=True)), or set "
                    "model.allow_pickle_weights: true for a local file you trust"
                )
        if not source.is_adapter:
            return
        source = resolve_source(source.adapter_base)


def require_complete(run: Path, what: str) -> None:
    """An input run dir must have finished: a half-trained model or half-labelled data is refused."""
    summary_path = run / "summary.json"
    status = json.loads(summary_path.read_text()).get("status") if summary_path.is_file() else "not started"
    if status != "completed":
        raise UserError(f"{what}: run {run} is not complete (status: {status}); finish it first, then run this stage again")


def resolve_source(name_or_path: str, revision: str | None = None) -> ModelSource:
    """A hub id, a model folder, an adapter folder, or a dpo-cli run dir (its final/)."""
    path = Path(name_or_path)
    if not path.is_absolute() and not name_or_path.startswith((".", "~")) and not path.exists():
        return ModelSource(name_or_path, revision=revision)  # a hub id
    path = path.expanduser().resolve()
    if not path.exists():
        raise UserError(f"model.name_or_path: {path} does not exist")
    if (path / "recipe.yaml").is_file() and not (path / "config.json").exists():
        require_complete(path, "model.name_or_path")
        path = path / "final"
    if (path / "adapter_config.json").is_file():
        config = json.loads((path / "adapter_config.json").read_text())
        base = config.get("base_model_name_or_path")
        if not base:
            raise UserError(f"model.name_or_path: adapter {path} does not record its base model (base_model_name_or_path)")
        return ModelSource(str(path), adapter_base=base, revision=config.get("revision"))
    if (path / "config.json").is_file():
        return ModelSource(str(path))
    raise UserError(f"model.name_or_path: {path} is neither a model folder (config.json), a LoRA adapter nor a dpo-cli run")
