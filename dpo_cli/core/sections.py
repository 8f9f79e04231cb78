"""The recipe sections every stage shares: model, tokenizer, data, train, generation.

Every section forbids unknown keys, so a typo is an error with a did-you-mean rather than a
silently ignored setting. Fields that hold filesystem paths carry a marker in their annotation;
the loader (recipe_loader.py) resolves them against the recipe's own folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class PathMarker:
    """Annotation metadata: this string names a local path (`always`) or a path-or-hub-id."""

    def __init__(self, always: bool):
        self.always = always


LocalPath = Annotated[str, PathMarker(always=True)]
PathOrHubId = Annotated[str, PathMarker(always=False)]

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


BUILT_IN_JUDGES = ("sentiment", "length")


@dataclass(frozen=True)
class JudgeSpec:
    """The judge a recipe chose: a built-in one, or a user function named in a key that says it runs code."""

    builtin: str | None  # sentiment, length
    python: str | None  # module:function
    key: str  # the recipe key that named the function, for messages (e.g. label.python)

    @property
    def name(self) -> str:
        return str(self.python or self.builtin)


def check_builtin_judge(value: str | None, python_key: str) -> str | None:
    """A judge key takes built-in judges only: user code must be named where the key says it runs code."""
    if value is None or value in BUILT_IN_JUDGES:
        return value
    if ":" in value:
        raise ValueError(f"{value!r} is user code: name it in {python_key} (the key that says it runs code), e.g. {python_key}: {value}")
    raise ValueError(f"{value!r} is not a built-in judge (sentiment, length); a function of your own goes in {python_key}")


def check_python_function(value: str | None) -> str | None:
    if value is None:
        return value
    module_name, colon, function_name = value.partition(":")
    if not colon or not all(part.isidentifier() for part in module_name.split(".") + function_name.split(".")):
        raise ValueError(f"{value!r} is not 'module:function' (e.g. mypkg.judges:score)")
    return value


def judge_spec(builtin: str | None, builtin_key: str, builtin_default: str | None, python: str | None, python_key: str) -> JudgeSpec | None:
    """The one judge two keys choose; a function beside a built-in judge other than the default is an error."""
    if python is not None and builtin not in (None, builtin_default):
        raise ValueError(f"{builtin_key} ({builtin!r}) and {python_key} ({python!r}) both name a judge: keep one")
    if python is None and builtin is None:
        return None
    return JudgeSpec(builtin=None if python else builtin, python=python, key=python_key)


def _switch(value: Any) -> Any:
    """`lora: true` / `--set model.lora=true` switches a section on with defaults; false/null off."""
    if value is True:
        return {}
    if value is False:
        return None
    return value


class LoraSection(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear layer but the output head)."
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = Field(None, description="Extra modules trained in full and saved with the adapter.")


class QuantizationSection(Section):
    load_in_4bit: bool = Field(True, description="Load the base weights in 4 bit (bitsandbytes).")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Dtype = Field("auto", description="dtype of the 4-bit matmuls; auto = bfloat16 on a GPU that has it, else float32.")
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="dtype the packed 4-bit weights are stored in; FSDP + QLoRA needs the model's dtype (bfloat16)."
    )


class InitSection(Section):
    """Architecture for a model trained from scratch (no pretrained weights)."""

    model_type: str = Field("llama", description="A transformers model type (llama, qwen2, mistral, gpt2, ...).")
    hidden_size: int = Field(256, ge=8)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1, description="Default: num_attention_heads (no GQA).")
    intermediate_size: int | None = Field(None, ge=1, description="Default: 4 x hidden_size.")
    max_position_embeddings: int = Field(1024, ge=8)
    tie_word_embeddings: bool = True
    config: dict[str, Any] = Field(default_factory=dict, description="Any other attribute of that model type's config.")

    @model_validator(mode="after")
    def _heads_divide(self) -> InitSection:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        return self


class ModelSection(Section):
    name_or_path: PathOrHubId | None = Field(
        None, description="Hub id, local directory, or another run (its final/ is used; a LoRA adapter is merged onto its base)."
    )
    init: InitSection | None = Field(None, description="Build a new model from this architecture instead (pretraining from scratch).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Dtype = Field("auto", description="Weight dtype; auto = float32 when training full weights or on CPU, bfloat16 for frozen bases on a GPU.")
    lora: LoraSection | None = Field(None, description="Train LoRA adapters instead of all weights.")
    quantization: QuantizationSection | None = Field(None, description="Load the frozen base in 4 bit (QLoRA); needs lora.")
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you trust the repository.")
    allow_pickle_weights: bool = Field(
        False, description="Load weights saved as pickle (pytorch_model.bin, adapter_model.bin), local or from the hub, which can run code as they load; safetensors only when off."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass to save memory.")
    attn_implementation: str | None = Field(None, description="eager, sdpa or flash_attention_2; default: transformers' choice.")

    _switch_lora = field_validator("lora", mode="before")(_switch)

    @field_validator("quantization", mode="before")
    @classmethod
    def _switch_quantization(cls, value: Any) -> Any:
        value = _switch(value)
        if isinstance(value, dict) and value.get("load_in_4bit") is False:
            return None  # `load_in_4bit: false` means no quantization at all
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.name_or_path is None) == (self.init is None):
            raise ValueError("give exactly one of model.name_or_path (pretrained weights) or model.init (a new model)")
        if self.lora is not None and self.init is not None:
            raise ValueError("a new model (model.init) trains all its weights: LoRA needs pretrained weights (model.name_or_path)")
        if self.quantization is not None and self.init is not None:
            raise ValueError("model.quantization needs pretrained weights; a model built from model.init cannot be 4-bit")
        if self.quantization is not None and self.lora is None:
            raise ValueError("a 4-bit model cannot be trained in full: add model.lora (e.g. --set model.lora.r=16)")
        return self


class TokenizerSection(Section):
    name_or_path: PathOrHubId | None = Field(None, description="Default: the model's own tokenizer.")
    train_vocab_size: int | None = Field(
        None, ge=64, description="Train a new byte-level BPE tokenizer of this size on the training text (pretraining from scratch)."
    )
    chat_template: str | None = Field(
        None, description="Replaces the tokenizer's: a preset (chatml, llama3, mistral, gemma, zephyr), a path to a .jinja file, or the Jinja text."
    )


class DataSource(Section):
    """One source of a weighted mixture: an entry of data.train written as a mapping."""

    path: PathOrHubId = Field(..., description="Local files, a folder, a hub dataset id or demo:NAME, as data.train takes them.")
    weight: float = Field(1.0, gt=0, description="Its share of the mixture, relative to the other sources' weights.")
    split: str | None = Field(None, description="Split of a hub dataset (default: data.split).")
    subset: str | None = Field(None, description="Configuration name of a hub dataset (default: data.subset).")
    columns: dict[str, str] = Field(default_factory=dict, description="Rename this source's columns (after data.columns): {expected name: its name}.")
    max_rows: int | None = Field(None, ge=1, description="Take at most this many of its rows before mixing.")
    streaming: bool = Field(False, description="Stream it instead of downloading it whole: only the rows the mixture takes are read (needs max_rows or data.mixture_rows).")


class DataSection(Section):
    train: PathOrHubId | list[PathOrHubId | DataSource] = Field(
        ...,
        description="Local files (jsonl/json/parquet/csv/txt, globs), a directory, a hub dataset id, or a built-in demo:NAME set; "
        "a list of paths is one dataset; a list with {path, weight} entries is a weighted mixture.",
    )
    mixture_rows: int | None = Field(
        None, ge=1, description="Rows of a weighted mixture (default: as many as the sources give at their shares without repeating a row)."
    )
    eval: PathOrHubId | float | None = Field(
        None, description="Eval data: files/hub id like train, or a fraction (0-1) or a row count carved off train."
    )
    split: str = Field("train", description="Split of a hub dataset to train on.")
    eval_split: str | None = Field(None, description="Split of a hub dataset to evaluate on (when data.eval is a hub id).")
    subset: str | None = Field(None, description="Configuration name of a hub dataset.")
    columns: dict[str, str] = Field(default_factory=dict, description="Rename columns: {expected name: name in your data}.")
    max_length: int = Field(512, ge=8, description="Longest sequence in tokens (the block size when packing).")
    truncation: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="Sequences longer than max_length: truncate (counted), drop (counted), or stop with an error."
    )
    bad_rows: Literal["error", "drop"] = Field("error", description="Malformed rows: stop with an error naming the row, or drop and count them.")
    max_rows: int | None = Field(None, ge=1, description="Use at most this many training rows.")
    max_eval_rows: int | None = Field(None, ge=1, description="Use at most this many eval rows.")

    @model_validator(mode="after")
    def _mixture(self) -> DataSection:
        mixture = isinstance(self.train, list) and any(isinstance(entry, DataSource) for entry in self.train)
        if self.mixture_rows is not None and not mixture:
            raise ValueError("data.mixture_rows sizes a weighted mixture: give data.train as a list of {path, weight} entries")
        return self

    @field_validator("eval")
    @classmethod
    def _eval_amount(cls, value: Any) -> Any:
        if isinstance(value, float) and not (0.0 < value < 1.0 or (value >= 1 and value.is_integer())):
            raise ValueError(f"a fraction must be between 0 and 1 (or a whole row count), got {value}")
        return value


class TrainSection(Section):
    max_steps: int | None = Field(None, ge=0, description="Optimizer steps to train (exclusive with epochs); 0 evaluates on data.eval without an update (what `dpo-cli eval` runs).")
    epochs: float | None = Field(None, gt=0, description="Passes over the training data (default 1 when max_steps is not set).")
    batch_size: int = Field(8, ge=1, description="Rows per micro-batch.")
    eval_batch_size: int | None = Field(None, ge=1, description="Default: batch_size.")
    group_by_length: bool = Field(
        False,
        description="Batch rows of similar length: each epoch's shuffled order is cut into groups of 50 global batches, each sorted by length "
        "and its batches shuffled again (less padding, and shorter rows where they are packed; the data order changes).",
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(5e-5, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "warmup_stable_decay"] = Field(
        "cosine", description="Shape after warmup; warmup_stable_decay (WSD) holds the rate and decays over the last lr_decay_fraction of the steps."
    )
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Floor of the decaying schedules, as a fraction of learning_rate.")
    lr_cycles: int = Field(1, ge=1, description="cosine_with_restarts: cosine decays, each restarting at the full rate.")
    lr_power: float = Field(1.0, gt=0, description="polynomial: the decay's power (1: linear).")
    lr_decay_fraction: float = Field(0.2, gt=0, le=1, description="warmup_stable_decay: the share of all steps the final (linear) decay takes.")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay (not applied to biases and norms).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables clipping.")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A non-finite loss or gradient norm: stop with a checkpoint of the last good state, or skip the step "
        "(counted in summary.json, at most max_skipped_steps). Non-finite weights or eval loss always stop, before final/.",
    )
    max_skipped_steps: int = Field(10, ge=0, description="With nonfinite: skip, stop once more steps than this were skipped.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"] = "adamw"
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-8, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="Autocast; auto = bf16 on a GPU that has it, fp16 on older GPUs, none on CPU."
    )
    log_every: int = Field(10, ge=1, description="Write a metrics line every N steps.")
    eval_every: int | None = Field(None, ge=1, description="Evaluate every N steps (and always at the end when eval data exists).")
    save_every: int | None = Field(500, ge=1, description="Checkpoint every N steps (and on SIGINT/SIGTERM); null: only on signals.")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest K checkpoints.")
    tensorboard: bool = Field(False, description="Also write TensorBoard events to RUN/tensorboard/ (the same as report_to: [tensorboard]).")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list, description="Experiment trackers that get every metrics line, the resolved recipe and the run dir (each an optional extra)."
    )
    tracker_project: str | None = Field(None, description="The W&B / Trackio project and MLflow experiment (default: dpo-cli); runs are named after their run dir.")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainSection:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("give train.max_steps or train.epochs, not both")
        return self


class GenerationSection(Section):
    """Sampling settings, shared by every stage that generates text."""

    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0.0, description="0 samples greedily.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k.")
    batch_size: int = Field(16, ge=1, description="Prompts per generate call.")


class DistributedSection(Section):
    """How several processes share the work when launched with torchrun or accelerate launch (one process:
    ignored). ddp replicates the model; fsdp and deepspeed shard it."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field("ddp", description="The engine for several processes.")
    fsdp_sharding: Literal["full_shard", "shard_grad_op", "hybrid_shard"] = Field("full_shard", description="FSDP: what is sharded.")
    fsdp_cpu_offload: bool = Field(False, description="FSDP: keep parameters on the CPU between uses.")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage: 2 shards optimizer state and gradients, 3 the weights too.")
    zero_offload: bool = Field(False, description="DeepSpeed: offload optimizer state (and with stage 3 the weights) to the CPU.")
    find_unused_parameters: bool = Field(False, description="DDP: allow parameters that get no gradient in a step.")
