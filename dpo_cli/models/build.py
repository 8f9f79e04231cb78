"""The one place models are built: pretrained or new, full weights / LoRA / 4-bit + LoRA (final/ and frozen loads: model_io.py).

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

from dpo_cli.core import distributed
from dpo_cli.core.errors import UserError
from dpo_cli.models.sources import ModelSource, refuse_pickle_weights, resolve_source
from dpo_cli.core.recipes import ModelSection, QuantizationSection, TokenizerSection
from dpo_cli.data.chat_templates import add_markers, chat_template_text
from dpo_cli.data.tokenization import ensure_pad_token, load_tokenizer

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


def frozen_dtype(device: torch.device) -> torch.dtype:
    """The one precision choice for weights that do not train (a frozen base, a reward model, 4-bit matmuls):
    half precision on a GPU (bfloat16 where it has it), float32 on a CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def weight_dtype(cfg: ModelSection, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if cfg.lora is not None:  # a frozen base: half precision halves memory
        return frozen_dtype(device)
    return torch.float32  # trained weights stay float32 masters; autocast does the fast math


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def quantization_config(cfg: QuantizationSection, device: torch.device) -> BitsAndBytesConfig:
    compute = DTYPES[cfg.compute_dtype] if cfg.compute_dtype != "auto" else frozen_dtype(device)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=torch.uint8 if cfg.quant_storage == "uint8" else DTYPES[cfg.quant_storage],
    )


def load_pretrained(
    auto_cls, path: str, revision: str | None, trust_remote_code: bool, allow_pickle: bool = False, **kwargs
) -> PreTrainedModel:
    """The one from_pretrained: safetensors only (a hub repository too, where no local check can look)
    unless the recipe allows pickle weights; a failure is one line."""
    try:
        return auto_cls.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True, **kwargs
        )
    except (OSError, ValueError) as exc:
        if "contains custom code" in str(exc):
            raise UserError(
                f"model {path!r} can only be loaded by running code it ships (auto_map), which dpo-cli does not do unless "
                "the recipe sets model.trust_remote_code: true; set it only for a repository you trust"
            ) from None
        if not allow_pickle and "loaded with `safetensors`" in str(exc):
            raise UserError(
                f"model {path!r} has no safetensors weights, only pickle files, which can run code when loaded; pick a revision "
                "with safetensors, convert it on a machine you trust, or set model.allow_pickle_weights: true if you trust it"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model {path!r}: not a local model folder and not reachable on the hub ({first})") from None


def load_4bit(
    auto_cls, source: ModelSource, quantization: QuantizationSection, device: torch.device, dtype: torch.dtype | None = None,
    trust_remote_code: bool = False, allow_pickle: bool = False, attn_implementation: str | None = None, num_labels: int | None = None,
) -> PreTrainedModel:
    """The one 4-bit load (bitsandbytes NF4/FP4 on `device`), its layout kept trainable."""
    options = {"num_labels": num_labels} if num_labels is not None else {}
    if dtype is not None:
        options["dtype"] = dtype
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    model = load_pretrained(
        auto_cls, source.path, source.revision, trust_remote_code, allow_pickle,
        quantization_config=quantization_config(quantization, device), device_map={"": device}, **options,
    )  # fmt: skip
    keep_4bit_layout_trainable(model)
    return model


def load_unquantized(
    auto_cls, source: ModelSource, cfg: ModelSection, dtype: torch.dtype, num_labels: int | None = None
) -> PreTrainedModel:
    """Full-precision weights; an adapter source is merged into its (recursively resolved) base."""
    if not source.is_adapter:
        labels = {"num_labels": num_labels} if num_labels is not None else {}
        return load_pretrained(
            auto_cls, source.path, source.revision, cfg.trust_remote_code, cfg.allow_pickle_weights,
            dtype=dtype, attn_implementation=cfg.attn_implementation, **labels,
        )  # fmt: skip
    base = load_unquantized(auto_cls, resolve_source(source.adapter_base, source.revision), cfg, dtype, num_labels)
    return merge_adapter(base, source, auto_cls).requires_grad_(True)  # peft loads adapters frozen for inference; the merged weights train


def merge_adapter(base: PreTrainedModel, source: ModelSource, auto_cls) -> PreTrainedModel:
    """The adapter at `source` merged into `base` (its embeddings resized where the adapter's run resized them);
    an adapter that does not fit is an error, never a silent bare base."""
    from peft import PeftConfig, PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    adapter_config = PeftConfig.from_pretrained(source.path)
    if HEAD_OF_TASK.get(adapter_config.task_type) is not auto_cls:
        # A policy's adapter under another head (an SFT run as a reward model's body): inject the LoRA weights
        # by module name, without the task wrapper, whose head-specific methods the other model lacks.
        adapter_config.task_type = None
    weights = load_peft_weights(source.path, device="cpu")
    vocabulary = max((w.shape[0] for k, w in weights.items() if k.endswith(EMBEDDING_KEYS) and w.dim() == 2), default=0)
    if vocabulary > base.get_input_embeddings().num_embeddings:  # the adapter's run resized the embeddings
        base.resize_token_embeddings(vocabulary)
    model = PeftModel.from_pretrained(base, source.path, config=adapter_config)
    unmatched = sorted(set(weights) - set(get_peft_model_state_dict(model)))
    if unmatched:  # peft only warns: the merge would silently be (partly) the bare base
        raise UserError(
            f"model.name_or_path: adapter {source.path} does not fit its base {source.adapter_base}: {len(unmatched)} of its "
            f"{len(weights)} weights match no module (e.g. {unmatched[0]}); give the base it was trained on"
        )
    return model.merge_and_unload()


def _materialize_merged(
    auto_cls, source: ModelSource, cfg: ModelSection, dtype: torch.dtype, folder: Path, num_labels: int | None = None
) -> Path:
    """Save base+adapter merged to `folder` once (reused on resume) so it can be quantized or referenced."""
    marker = folder / "dpo_cli_merged_from.json"
    wanted = {"adapter": source.path, "base": source.adapter_base, "dtype": str(dtype), "head": auto_cls.__name__}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return folder
    merged = load_unquantized(auto_cls, source, cfg, dtype, num_labels)
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
    notes = []
    if tok_cfg.chat_template is not None:
        tokenizer.chat_template = chat_template_text(tok_cfg.chat_template)
        notes.append(add_markers(tokenizer, tok_cfg.chat_template))
    notes.append(ensure_pad_token(tokenizer))
    return tokenizer, [note for note in notes if note]


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


def keep_4bit_layout_trainable(model: torch.nn.Module) -> None:
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
EMBEDDING_KEYS = ("embed_tokens.weight", "lm_head.weight", "embed_in.weight", "embed_out.weight", "wte.weight")


def check_model_input(cfg: ModelSection, head: str) -> None:
    """Before a run dir is touched: the model input exists, is complete, and can be this kind of model."""
    if cfg.init is None and cfg.name_or_path is not None:
        source = resolve_source(cfg.name_or_path, cfg.revision)
        refuse_pickle_weights(source, "model.name_or_path", cfg.allow_pickle_weights)
        check_head(source, head)


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
            model = load_4bit(
                auto_cls, source, cfg.quantization, device, dtype, cfg.trust_remote_code, cfg.allow_pickle_weights,
                cfg.attn_implementation, num_labels,
            )  # fmt: skip
        else:
            model = load_unquantized(auto_cls, source, cfg, dtype, num_labels)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
        notes.append(f"resized the embeddings to the tokenizer's {len(tokenizer)} tokens")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.quantization is not None:
        from peft import prepare_model_for_kbit_training

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
