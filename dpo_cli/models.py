"""The one place models are built: pretrained or new, full weights / LoRA / 4-bit + LoRA, and saved to final/.

A model given as another run (or its final/) that holds a LoRA adapter is that adapter merged into its
base in full precision, before any quantization - never silently the bare base.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dpo_cli import distributed
from dpo_cli.errors import UserError
from dpo_cli.sources import ModelSource, resolve_source
from dpo_cli.recipes import ModelSection, QuantizationSection, TokenizerSection
from dpo_cli.tokenization import ensure_pad_token, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MergeOnSave:
    """A LoRA trained on a base that exists only inside its run dir (another run's adapter, merged): final/
    holds the merged model, since an adapter's base must be loadable wherever final/ goes."""

    auto_cls: Any
    cfg: ModelSection
    dtype: torch.dtype
    num_labels: int | None


@dataclass
class ModelBundle:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    base_ref: str | None  # loadable location of the frozen base when the model is base + new LoRA
    base_revision: str | None = None  # hub revision of that base
    notes: list[str] = field(default_factory=list)
    merge_on_save: MergeOnSave | None = None


def weight_dtype(cfg: ModelSection, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if device.type == "cuda" and cfg.lora is not None:  # a frozen base: half precision halves memory
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # trained weights stay float32 masters; autocast does the fast math


def quantization_config(cfg: QuantizationSection, device: torch.device) -> BitsAndBytesConfig:
    if cfg.compute_dtype != "auto":
        compute = DTYPES[cfg.compute_dtype]
    elif device.type == "cuda":
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        compute = torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=torch.uint8 if cfg.quant_storage == "uint8" else DTYPES[cfg.quant_storage],
    )


def _from_pretrained(auto_cls, path: str, revision: str | None, trust_remote_code: bool, **kwargs) -> PreTrainedModel:
    try:
        return auto_cls.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model {path!r}: not a local model folder and not reachable on the hub ({first})") from None


def _load_unquantized(
    auto_cls, source: ModelSource, cfg: ModelSection, dtype: torch.dtype, num_labels: int | None = None
) -> PreTrainedModel:
    """Full-precision weights; an adapter source is merged into its (recursively resolved) base."""
    if not source.is_adapter:
        labels = {"num_labels": num_labels} if num_labels is not None else {}
        return _from_pretrained(
            auto_cls, source.path, source.revision, cfg.trust_remote_code, dtype=dtype, attn_implementation=cfg.attn_implementation, **labels
        )
    from peft import PeftConfig, PeftModel

    base = _load_unquantized(auto_cls, resolve_source(source.adapter_base, source.revision), cfg, dtype, num_labels)
    adapter_config = PeftConfig.from_pretrained(source.path)
    if HEAD_OF_TASK.get(adapter_config.task_type) is not auto_cls:
        # A policy's adapter under another head (an SFT run as a reward model's body): inject the LoRA weights
        # by module name, without the task wrapper, whose head-specific methods the other model lacks.
        adapter_config.task_type = None
    merged = PeftModel.from_pretrained(base, source.path, config=adapter_config).merge_and_unload()
    return merged.requires_grad_(True)  # peft loads adapters frozen for inference; the merged weights train


def _materialize_merged(
    auto_cls, source: ModelSource, cfg: ModelSection, dtype: torch.dtype, folder: Path, num_labels: int | None = None
) -> Path:
    """Save base+adapter merged to `folder` once (reused on resume) so it can be quantized or referenced."""
    marker = folder / "dpo_cli_merged_from.json"
    wanted = {"adapter": source.path, "base": source.adapter_base, "dtype": str(dtype), "head": auto_cls.__name__}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return folder
    merged = _load_unquantized(auto_cls, source, cfg, dtype, num_labels)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    (tmp / marker.name).write_text(json.dumps(wanted))
    del merged
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def build_tokenizer(model_cfg: ModelSection, tok_cfg: TokenizerSection) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """The recipe's tokenizer, else the model's (an adapter folder's own copy first, then its base)."""
    if tok_cfg.name_or_path is not None:
        tokenizer = load_tokenizer(tok_cfg.name_or_path, None, model_cfg.trust_remote_code)
    else:
        source = resolve_source(model_cfg.name_or_path, model_cfg.revision)
        where = source.path
        if source.is_adapter and not (Path(source.path) / "tokenizer_config.json").is_file():
            where = resolve_source(source.adapter_base).path
        try:
            tokenizer = load_tokenizer(where, source.revision, model_cfg.trust_remote_code)
        except UserError as exc:
            raise UserError(f"model.name_or_path: {exc}") from None
    if tok_cfg.chat_template is not None:
        tokenizer.chat_template = tok_cfg.chat_template
    note = ensure_pad_token(tokenizer)
    return tokenizer, [note] if note else []


def new_model_config(cfg: ModelSection, tokenizer: PreTrainedTokenizerBase):
    init = cfg.init
    try:
        config = AutoConfig.for_model(init.model_type)
    except ValueError:
        raise UserError(f"model.init.model_type: unknown model type {init.model_type!r} (e.g. llama, qwen2, mistral)") from None
    for key in init.config:
        if not hasattr(config, key):
            raise UserError(f"model.init.config.{key}: {init.model_type} configs have no attribute {key!r}")
    values = {
        "vocab_size": len(tokenizer),
        "hidden_size": init.hidden_size,
        "num_hidden_layers": init.num_hidden_layers,
        "num_attention_heads": init.num_attention_heads,
        "num_key_value_heads": init.num_key_value_heads or init.num_attention_heads,
        "intermediate_size": init.intermediate_size or 4 * init.hidden_size,
        "max_position_embeddings": init.max_position_embeddings,
        "tie_word_embeddings": init.tie_word_embeddings,
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **init.config,
    }
    return AutoConfig.for_model(init.model_type, **values)


def _keep_4bit_layout_trainable(model: torch.nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights for a faster CPU kernel the first time a layer runs in eval mode
    without gradients (an eval, a reference pass, sampling), and keeps using that kernel, which has no
    backward, when training resumes: gradients through the frozen base would silently go wrong. Opt out."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def apply_lora(model: PreTrainedModel, cfg: ModelSection, task_type: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        modules_to_save=lora.modules_to_save,
        task_type=task_type,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"model.lora: {str(exc).splitlines()[0]}") from None


# What each kind of model is built as: transformers auto class, peft task type, number of outputs.
HEADS = {
    "causal-lm": (AutoModelForCausalLM, "CAUSAL_LM", None),
    "reward": (AutoModelForSequenceClassification, "SEQ_CLS", 1),
}
HEAD_OF_TASK = {task: auto_cls for auto_cls, task, _ in HEADS.values()}


def check_model_input(cfg: ModelSection, head: str) -> None:
    """Before a run dir is touched: the model input exists, is complete, and can be this kind of model."""
    if cfg.init is None and cfg.name_or_path is not None:
        check_head(resolve_source(cfg.name_or_path, cfg.revision), head)


def check_head(source: ModelSource, head: str) -> None:
    """A reward model (or a reward model's adapter) is not a policy: refused before anything loads."""
    if head != "causal-lm":
        return
    if source.is_adapter:
        task = json.loads((Path(source.path) / "adapter_config.json").read_text()).get("task_type")
        if task == "SEQ_CLS":
            raise UserError(f"model.name_or_path: {source.path} is a reward model's adapter (SEQ_CLS), not a policy; give an SFT run or a causal LM")
        return
    if not Path(source.path).is_dir():
        return  # a hub id: transformers says what it is
    architectures = json.loads((Path(source.path) / "config.json").read_text()).get("architectures") or []
    if architectures and all(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(f"model.name_or_path: {source.path} is a reward model ({architectures[0]}), not a policy; give an SFT run or a causal LM")


def build_model(
    cfg: ModelSection,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    seed: int,
    cache_dir: Path | None = None,
    head: str = "causal-lm",
) -> ModelBundle:
    """A model for a gradient stage: new or pretrained, then 4-bit and/or LoRA as the recipe says.
    head: causal-lm (policies) or reward (a scalar score head on the same body; trained with LoRA, the
    head is trained in full and saved with the adapter)."""
    auto_cls, task_type, num_labels = HEADS[head]
    notes: list[str] = []
    merge_on_save: MergeOnSave | None = None
    dtype = weight_dtype(cfg, device)
    torch.manual_seed(seed)  # the same seed gives the same fresh weights, heads and LoRA init
    base_ref: str | None = None
    labels = {"num_labels": num_labels} if num_labels is not None else {}
    if cfg.init is not None:
        model = auto_cls.from_config(new_model_config(cfg, tokenizer), dtype=dtype)
    else:
        source = resolve_source(cfg.name_or_path, cfg.revision)
        check_head(source, head)
        base_ref = source.path
        if source.is_adapter:
            notes.append(f"{source.path} is a LoRA adapter: merged into its base {source.adapter_base} before training")
        if source.is_adapter and (cfg.quantization is not None or cfg.lora is not None):
            folder = cache_dir / "base" if cache_dir is not None else Path(tempfile.mkdtemp(prefix="dpo-cli-base-"))
            folder.parent.mkdir(parents=True, exist_ok=True)
            with distributed.main_first():  # written once, by the main process; the others reuse it
                source = ModelSource(str(_materialize_merged(auto_cls, source, cfg, dtype, folder, num_labels)))
            base_ref = source.path
            if cfg.lora is not None:
                merge_on_save = MergeOnSave(auto_cls, cfg, dtype, num_labels)
                notes.append("the base exists only in this run dir, so final/ will hold the trained LoRA merged into it (a movable, plain model)")
        if cfg.quantization is not None:
            model = _from_pretrained(
                auto_cls,
                source.path,
                source.revision,
                cfg.trust_remote_code,
                quantization_config=quantization_config(cfg.quantization, device),
                dtype=dtype,
                device_map={"": device},
                attn_implementation=cfg.attn_implementation,
                **labels,
            )
        else:
            model = _load_unquantized(auto_cls, source, cfg, dtype, num_labels)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
        notes.append(f"resized the embeddings to the tokenizer's {len(tokenizer)} tokens")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.quantization is not None:
        from peft import prepare_model_for_kbit_training

        _keep_4bit_layout_trainable(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    if cfg.lora is not None:
        torch.manual_seed(seed)
        model = apply_lora(model, cfg, task_type)
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:  # float32 masters for all that trains
                param.data = param.data.float()
    if cfg.quantization is None:
        model.to(device)
    lora = cfg.lora is not None
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        base_ref=base_ref if lora else None,
        base_revision=source.revision if lora and cfg.init is None else None,
        notes=notes,
        merge_on_save=merge_on_save,
    )


def build_causal_lm(
    cfg: ModelSection, tokenizer: PreTrainedTokenizerBase, device: torch.device, seed: int, cache_dir: Path | None = None
) -> ModelBundle:
    return build_model(cfg, tokenizer, device, seed, cache_dir, head="causal-lm")


def _logical_numel(param: torch.Tensor) -> int:
    quant_state = getattr(param, "quant_state", None)  # bitsandbytes packs two 4-bit weights per byte
    return int(torch.Size(quant_state.shape).numel()) if quant_state is not None else param.numel()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(_logical_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_logical_numel(p) for p in model.parameters())
    return trainable, total


def save_final(model: torch.nn.Module, bundle: ModelBundle, out_dir: Path, state_dict: dict | None = None) -> None:
    """Plain Hugging Face format: a full model, or a PEFT adapter whose config points at its loadable base.
    `state_dict`: the full weights gathered from a sharded (FSDP / ZeRO-3) run; peft keeps the adapter's.
    generation_config.json lists every token generation stops at (a base model's EOS and the chat
    template's end of turn), so transformers' generate and pipelines stop where dpo-cli does."""
    from dpo_cli.generate import stop_token_ids

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
        merged = _load_unquantized(spec.auto_cls, ModelSource(str(adapter_dir), adapter_base=bundle.base_ref), spec.cfg, spec.dtype, spec.num_labels)
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
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    if quantization is not None:
        body = resolve_source(source.adapter_base) if source.is_adapter else source
        if body.is_adapter:
            raise UserError(f"{what}: a 4-bit reward model's base must be a plain model, not another adapter ({body.path})")
        model = _from_pretrained(
            AutoModelForSequenceClassification,
            body.path,
            body.revision,
            trust_remote_code,
            quantization_config=quantization_config(quantization, device),
            dtype=dtype,
            device_map={"": device},
            num_labels=1,
        )
        _keep_4bit_layout_trainable(model)
        if source.is_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, source.path)  # kept unmerged: 4-bit weights stay exact
    else:
        model = _load_unquantized(AutoModelForSequenceClassification, source, cfg, dtype, num_labels=1)
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
    quantization = trained_quantization(source)
    cfg = ModelSection(name_or_path=name_or_path)
    tokenizer, _ = build_tokenizer(cfg, TokenizerSection())
    if quantization is not None and source.is_adapter:
        from peft import PeftModel

        body = resolve_source(source.adapter_base)
        model = _from_pretrained(
            AutoModelForCausalLM, body.path, body.revision, False,
            quantization_config=quantization_config(quantization, device), device_map={"": device},
        )  # fmt: skip
        _keep_4bit_layout_trainable(model)
        model = PeftModel.from_pretrained(model, source.path)
    else:
        model = build_causal_lm(cfg, tokenizer, device, seed=0, cache_dir=cache_dir).model
    model.requires_grad_(False)
    return model.eval(), tokenizer
