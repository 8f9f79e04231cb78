"""`dpo-cli export`: a run's final/ (or one of its checkpoints) as a self-contained Hugging Face folder. A LoRA
run is merged into its base in float32 (a 4-bit run into its base as it trained, the NF4 weights dequantized),
then cast; with --adapter-only it stays an adapter. Tokenizer, chat template and a generation config that
stops at the end of a turn go with it. Written to a temporary folder and renamed: nothing existing is touched."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from dpo_cli.core.errors import UserError
from dpo_cli.core.rundir import CHECKPOINT_MARKER
from dpo_cli.core.recipes import ModelSection, QuantizationSection
from dpo_cli.models.build import load_4bit, load_unquantized, merge_adapter
from dpo_cli.models.io import trained_quantization
from dpo_cli.models.sources import ModelSource, refuse_pickle_weights, resolve_source
from dpo_cli.data.tokenization import load_tokenizer

EXPORT_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}  # fmt: skip


@dataclass
class Exportable:
    """What export reads: a model or adapter folder, the quantization its adapter trained over, its head."""

    source: ModelSource
    quantization: QuantizationSection | None
    reward: bool  # a sequence classifier (rm-train) rather than a causal LM


def export_model(
    target: str, out: Path | None, merge: bool, adapter_only: bool, dtype: str | None, checkpoint: str | None, trust_remote_code: bool = False
) -> Path:
    """Export `target` (a run dir, its final/, a checkpoint folder, or any model / adapter folder) to `out`."""
    if merge and adapter_only:
        raise UserError("--merge and --adapter-only exclude each other: a LoRA run is exported merged (the default) or as its adapter")
    wanted_dtype = _export_dtype(dtype)
    where = Path(target).expanduser().resolve()
    if not where.exists():
        raise UserError(f"export: {where} does not exist (give a run dir, its final/, a checkpoint folder or a model folder)")
    folder = _checkpoint_folder(where, checkpoint)
    out = (out or _default_out(where, folder, adapter_only)).expanduser().resolve()
    if out.exists():
        raise UserError(f"export: {out} already exists; nothing was overwritten (choose another --out or remove it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".exporting-{out.name}-{os.getpid()}")  # not .tmp-*: a stage starting in RUN clears those
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory(prefix="dpo-cli-export-") as scratch:
            exportable = _from_checkpoint(folder, Path(scratch), trust_remote_code) if folder is not None else _from_folder(where)
            _write(exportable, tmp, adapter_only, wanted_dtype)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _export_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of bf16, fp16, fp32")
    return EXPORT_DTYPES[dtype]


def _default_out(where: Path, checkpoint: Path | None, adapter_only: bool) -> Path:
    run = checkpoint.parent.parent if checkpoint is not None else (where.parent if where.name == "final" else where)
    name = f"export-{checkpoint.name}" if checkpoint is not None else "export"
    return run / (f"{name}-adapter" if adapter_only else name)


def _checkpoint_folder(where: Path, checkpoint: str | None) -> Path | None:
    """checkpoints/step-N of a run, given as --checkpoint step-N (or a path) or as the target itself."""
    if checkpoint is None:
        if where.parent.name != "checkpoints":
            return None
        checkpoint, where = str(where), where.parent.parent
    folder = Path(checkpoint).expanduser()
    if not folder.is_absolute() and not folder.exists():
        folder = where / "checkpoints" / checkpoint
    folder = folder.resolve()
    if (folder / "engine").is_dir():
        raise UserError(f"export: {folder} holds the FSDP/DeepSpeed shards of several processes; export the run's final/ (gathered whole)")
    if not (folder / "trainable.safetensors").is_file() or not (folder / CHECKPOINT_MARKER).is_file():
        steps = sorted(p.name for p in (where / "checkpoints").glob("step-*")) if (where / "checkpoints").is_dir() else []
        raise UserError(f"--checkpoint {checkpoint}: {folder} is not a complete checkpoint of {where} (it has: {', '.join(steps) or 'none'})")
    from dpo_cli.train.checkpoint import verify_manifest

    problem = verify_manifest(folder)
    if problem:
        raise UserError(f"export: checkpoint {folder} is damaged ({problem})")
    return folder


def _from_folder(where: Path) -> Exportable:
    source = resolve_source(str(where))
    refuse_pickle_weights(source, "export")
    if source.is_adapter:
        task = json.loads((Path(source.path) / "adapter_config.json").read_text()).get("task_type")
        return Exportable(source, trained_quantization(source), reward=task == "SEQ_CLS")
    architectures = AutoConfig.from_pretrained(source.path).architectures or []
    return Exportable(source, None, reward=any(a.endswith("ForSequenceClassification") for a in architectures))


def _from_checkpoint(folder: Path, scratch: Path, trust_remote_code: bool) -> Exportable:
    """A checkpoint holds only the trainable weights: the model is rebuilt from the run's recipe as the stage
    built it, they are put back, and the result is saved as the stage would have saved final/."""
    from safetensors.torch import load_file

    from dpo_cli.core.recipe_loader import load_recipe
    from dpo_cli.models.build import build_model, build_tokenizer
    from dpo_cli.models.io import save_final

    run = folder.parent.parent
    recipe_path = run / "recipe.yaml"
    if not recipe_path.is_file():
        raise UserError(f"export: {run} holds no recipe.yaml, so its checkpoint cannot be rebuilt into a model")
    stage = (run.joinpath("summary.json").is_file() and json.loads((run / "summary.json").read_text()).get("stage")) or None
    recipe = load_recipe(recipe_path, stage)
    recipe.model.trust_remote_code = trust_remote_code  # a run dir from elsewhere does not get to run code by itself
    if recipe.stage not in ("pretrain", "sft", "dpo", "rm-train") or getattr(recipe.model, "init", None) is not None:
        raise UserError(
            f"export: checkpoints of a {recipe.stage} run{' from scratch' if recipe.stage == 'pretrain' else ''} cannot be exported "
            "on their own (its model is more than the recipe's model section); export its final/"
        )
    tokenizer, _ = build_tokenizer(recipe.model, recipe.tokenizer)
    head = "reward" if recipe.stage == "rm-train" else "causal-lm"
    bundle = build_model(recipe.model, tokenizer, torch.device("cpu"), recipe.seed, cache_dir=scratch / "cache", head=head)
    _put_back(bundle.model, load_file(folder / "trainable.safetensors"), folder)
    saved = scratch / "final"
    saved.mkdir()
    save_final(bundle.model, bundle, saved)
    source = resolve_source(str(saved))
    return Exportable(source, recipe.model.quantization if source.is_adapter else None, reward=head == "reward")


def _put_back(model: torch.nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """The checkpoint names the weights under the stage's wrapper (e.g. `model.` of the loss module): the one
    prefix that maps them onto this model's trainable weights exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    some = next(iter(params))
    for name in tensors:
        if name.endswith(some):
            prefix = name[: len(name) - len(some)]
            renamed = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            if set(renamed) == set(params):
                with torch.no_grad():
                    for key, param in params.items():
                        param.copy_(renamed[key].to(param.dtype))
                return
    raise UserError(f"export: checkpoint {folder} does not fit the model its run's recipe builds (was the recipe edited?)")


def _write(exportable: Exportable, out: Path, adapter_only: bool, dtype: torch.dtype | None) -> None:
    source = exportable.source
    if adapter_only:
        if not source.is_adapter:
            raise UserError(f"--adapter-only: {source.path} is a full model, not a LoRA adapter; export it without the flag")
        if dtype is not None:
            raise UserError("--dtype applies to a merged or full model; an adapter keeps the precision it trained in")
        shutil.copytree(source.path, out)
        return
    model = merged_model(exportable) if source.is_adapter else _full_model(exportable)
    cast = dtype or _saved_dtype(source)
    model = model.to(cast)
    tokenizer = load_tokenizer(_tokenizer_dir(source), None, False)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if not exportable.reward:
        _stop_at_end_of_turn(model, tokenizer, source)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def merged_model(exportable: Exportable) -> PreTrainedModel:
    """The adapter merged into its base, in float32. A 4-bit run's base is quantized as it trained and
    dequantized, so that the merged model computes what the run's model computed."""
    source = exportable.source
    auto_cls, num_labels = (AutoModelForSequenceClassification, 1) if exportable.reward else (AutoModelForCausalLM, None)
    if exportable.quantization is None:
        return load_unquantized(auto_cls, source, ModelSection(name_or_path=source.path), torch.float32, num_labels)
    base_source = resolve_source(source.adapter_base, source.revision)
    if base_source.is_adapter:
        raise UserError(f"export: a 4-bit run's base must be a plain model, not another adapter ({base_source.path})")
    base = load_4bit(auto_cls, base_source, exportable.quantization, torch.device("cpu"), torch.float32, num_labels=num_labels)
    return merge_adapter(base.dequantize(), source, auto_cls)


def _full_model(exportable: Exportable) -> PreTrainedModel:
    auto_cls = AutoModelForSequenceClassification if exportable.reward else AutoModelForCausalLM
    return load_unquantized(auto_cls, exportable.source, ModelSection(name_or_path=exportable.source.path), _saved_dtype(exportable.source))


def _saved_dtype(source: ModelSource) -> torch.dtype:
    """The precision the (base) model was published in; float32 where its config does not say."""
    config_dir = resolve_source(source.adapter_base).path if source.is_adapter else source.path
    saved = getattr(AutoConfig.from_pretrained(config_dir), "dtype", None)
    if isinstance(saved, str):
        saved = EXPORT_DTYPES.get(saved)
    return saved if isinstance(saved, torch.dtype) else torch.float32


def _tokenizer_dir(source: ModelSource) -> str:
    if (Path(source.path) / "tokenizer_config.json").is_file() or not source.is_adapter:
        return source.path
    return resolve_source(source.adapter_base).path


def _stop_at_end_of_turn(model: PreTrainedModel, tokenizer, source: ModelSource) -> None:
    """generation_config.json of the run (it already lists the end-of-turn token), else one that does."""
    from transformers import GenerationConfig

    from dpo_cli.models.generate import stop_token_ids

    if (Path(source.path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source.path)
    stops = stop_token_ids(tokenizer, model)
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
