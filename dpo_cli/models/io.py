"""Models as runs leave them and as later stages read them back: final/ in plain Hugging Face format (with
the stop tokens in generation_config.json, merged where the base lives only in the run dir), and frozen
reward models and policies loaded from runs or hub folders (a 4-bit run in 4-bit, as it was trained)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from dpo_cli.core import distributed
from dpo_cli.core.errors import UserError
from dpo_cli.models.build import ModelBundle, build_causal_lm, build_tokenizer, frozen_dtype, load_4bit, load_unquantized
from dpo_cli.core.recipes import ModelSection, QuantizationSection, TokenizerSection
from dpo_cli.core.rundir import RunDir
from dpo_cli.core.runtime import Runtime
from dpo_cli.models.sources import ModelSource, refuse_pickle_weights, resolve_source
from dpo_cli.data.tokenization import ensure_pad_token, load_tokenizer


def save_final(model: torch.nn.Module, bundle: ModelBundle, out_dir: Path, state_dict: dict | None = None) -> None:
    """Plain Hugging Face format: a full model, or a PEFT adapter whose config points at its loadable base.
    `state_dict`: the full weights gathered from a sharded (FSDP / ZeRO-3) run; peft keeps the adapter's.
    generation_config.json lists every token generation stops at (a base model's EOS and the chat
    template's end of turn), so transformers' generate and pipelines stop where dpo-cli does."""
    from dpo_cli.models.generate import stop_token_ids

    stops = stop_token_ids(bundle.tokenizer, model)
    if bundle.merge_on_save is not None:
        model = _merged_for_saving(model, bundle, out_dir, state_dict)
        state_dict = None
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
        if generation_config.pad_token_id is None:
            generation_config.pad_token_id = bundle.tokenizer.pad_token_id
    if state_dict is None:
        model.save_pretrained(out_dir)
    else:
        model.save_pretrained(out_dir, state_dict=state_dict)
    bundle.tokenizer.save_pretrained(out_dir)
    if generation_config is not None and not (out_dir / "generation_config.json").exists():
        generation_config.save_pretrained(out_dir)  # an adapter's too: peft saves none of its own
    adapter_config = out_dir / "adapter_config.json"
    if adapter_config.is_file() and bundle.base_ref is not None:
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = bundle.base_ref
        config["revision"] = bundle.base_revision
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _merged_for_saving(model: torch.nn.Module, bundle: ModelBundle, out_dir: Path, state_dict: dict | None) -> PreTrainedModel:
    """The trained adapter merged into the run's own base, unquantized (a 4-bit run's too), in the base's dtype."""
    spec = bundle.merge_on_save
    adapter_dir = out_dir.parent / f".tmp-adapter-{os.getpid()}"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    try:
        model.save_pretrained(adapter_dir, **({"state_dict": state_dict} if state_dict is not None else {}))
        merged = load_unquantized(spec.auto_cls, ModelSource(str(adapter_dir), adapter_base=bundle.base_ref), spec.cfg, spec.dtype, spec.num_labels)
    finally:
        shutil.rmtree(adapter_dir, ignore_errors=True)
    if getattr(model, "generation_config", None) is not None:
        merged.generation_config = model.generation_config
    merged.config.pad_token_id = bundle.tokenizer.pad_token_id  # a reward model scores padded batches
    return merged


def trained_quantization(source: ModelSource) -> QuantizationSection | None:
    """The 4-bit settings a dpo-cli run trained with (from the recipe.yaml beside its final/), if any."""
    recipe_path = Path(source.path).parent / "recipe.yaml"
    if Path(source.path).name != "final" or not recipe_path.is_file() or not source.is_adapter:
        return None  # a merged final/ is a plain model at full precision
    import yaml

    quantization = (yaml.safe_load(recipe_path.read_text()) or {}).get("model", {}).get("quantization")
    return QuantizationSection(**quantization) if quantization else None


def load_reward_model(
    name_or_path: str,
    device: torch.device,
    what: str = "label.reward_model",
    trust_remote_code: bool = False,
    quantization: QuantizationSection | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A frozen scalar reward model: an rm-train run (or its final/, adapter included) or any sequence
    classifier with exactly one output. The one loader collect-prefs, ppo and compare share.
    A run trained in 4-bit is loaded in 4-bit with its adapter (so it scores as it was trained), unless
    `quantization` says otherwise."""
    source = resolve_source(name_or_path)
    refuse_pickle_weights(source, what)
    config_source = resolve_source(source.adapter_base).path if source.is_adapter else source.path
    if source.is_adapter:
        task = json.loads((Path(source.path) / "adapter_config.json").read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise UserError(f"{what}: {name_or_path} is a {task or 'untyped'} adapter, not a reward model (SEQ_CLS)")
    else:
        try:
            config = AutoConfig.from_pretrained(config_source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UserError(f"{what}: cannot load {name_or_path!r} ({str(exc).strip().splitlines()[0]})") from None
        architectures = getattr(config, "architectures", None) or []
        classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
        if not classifier or config.num_labels != 1:
            found = f"a classifier with {config.num_labels} outputs" if classifier else (", ".join(architectures) or config.model_type)
            raise UserError(f"{what}: {name_or_path} is not a reward model: expected a sequence classifier with one output, found {found}")
    quantization = quantization or trained_quantization(source)
    cfg = ModelSection(name_or_path=name_or_path, trust_remote_code=trust_remote_code)
    dtype = frozen_dtype(device)
    if quantization is not None:
        body = resolve_source(source.adapter_base) if source.is_adapter else source
        if body.is_adapter:
            raise UserError(f"{what}: a 4-bit reward model's base must be a plain model, not another adapter ({body.path})")
        model = load_4bit(AutoModelForSequenceClassification, body, quantization, device, dtype, trust_remote_code, num_labels=1)
        if source.is_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, source.path)  # kept unmerged: 4-bit weights stay exact
    else:
        model = load_unquantized(AutoModelForSequenceClassification, source, cfg, dtype, num_labels=1)
    tokenizer_dir = source.path if (Path(source.path) / "tokenizer_config.json").is_file() else config_source
    tokenizer = load_tokenizer(tokenizer_dir, source.revision, trust_remote_code)
    ensure_pad_token(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    if quantization is None:
        model.to(device)
    return model.eval(), tokenizer


def load_policy(name_or_path: str, device: torch.device, cache_dir: Path, what: str = "policies") -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A policy to evaluate (frozen): a run trained in 4-bit comes back in 4-bit with its adapter (as it was
    trained); anything else at full precision, adapters merged."""
    source = resolve_source(name_or_path)
    refuse_pickle_weights(source, what)
    quantization = trained_quantization(source)
    cfg = ModelSection(name_or_path=name_or_path)
    tokenizer, _ = build_tokenizer(cfg, TokenizerSection())
    if quantization is not None and source.is_adapter:
        from peft import PeftModel

        model = load_4bit(AutoModelForCausalLM, resolve_source(source.adapter_base), quantization, device)
        model = PeftModel.from_pretrained(model, source.path)
    else:
        model = build_causal_lm(cfg, tokenizer, device, seed=0, cache_dir=cache_dir).model
    model.requires_grad_(False)
    return model.eval(), tokenizer


def load_frozen_lm(name_or_path: str, device: torch.device, what: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A language model to score text with (a judge's), loaded as a policy to evaluate is; what a merge of
    its adapter writes lives only while it loads."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dpo-cli-lm-") as cache:
        return load_policy(name_or_path, device, Path(cache), what)


def save_final_model(run: RunDir, runtime: Runtime, bundle: ModelBundle, prepared: torch.nn.Module | None = None) -> None:
    """final/ from the main process. With FSDP / DeepSpeed ZeRO-3 every process holds a shard: all of them
    gather the full state dict (`prepared` is the model as the loop trained it), the main one writes it."""
    state_dict = None
    if runtime.sharded and prepared is not None:
        gathered = runtime.accelerator.get_state_dict(prepared)
        # the loop trains a wrapper (CompletionLogProbs, RewardScores): keep the keys under bundle.model
        inner = runtime.accelerator.unwrap_model(bundle.model)
        name = next((n for n, m in runtime.accelerator.unwrap_model(prepared).named_modules() if m is inner), "")
        prefix = f"{name}." if name else ""
        state_dict = {key[len(prefix):]: value for key, value in gathered.items() if key.startswith(prefix)}
    if runtime.is_main:
        with run.new_final() as folder:
            save_final(runtime.accelerator.unwrap_model(bundle.model), bundle, folder, state_dict)
        if bundle.merge_on_save is not None and bundle.base_ref is not None and Path(bundle.base_ref).is_relative_to(run.path):
            shutil.rmtree(bundle.base_ref, ignore_errors=True)  # merged into final/: a cache for resume no more (a full model's size)
    distributed.barrier()
