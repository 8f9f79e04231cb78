"""Typed recipe schemas: one per stage, built from the shared sections of sections.py."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from dpo_cli.core.collecting import CollectSection, LabelSection
from dpo_cli.core.judging import PYTHON_JUDGE, RUNS_CODE, HumanAbSection, JudgesSection, PolicyEvalSection
from dpo_cli.core.sections import (
    DataSection,
    DistributedSection,
    Dtype,
    GenerationSection,
    InitSection,
    JudgeSpec,
    LocalPath,
    LoraSection,
    ModelSection,
    PathMarker,
    PathOrHubId,
    QuantizationSection,
    Section,
    TokenizerSection,
    TrainSection,
    _switch,
    check_builtin_judge,
    check_python_function,
    judge_spec,
)



# The shared sections are re-exported: a stage imports its schema and its sections from here.
__all__ = [
    "DataSection", "DistributedSection", "Dtype", "GenerationSection", "InitSection", "LocalPath", "LoraSection", "ModelSection", "PathMarker",
    "PathOrHubId", "QuantizationSection", "Section", "TokenizerSection", "TrainSection", "HumanAbSection", "JudgesSection", "PolicyEvalSection",
    "PretrainRecipe", "SftRecipe", "CollectPrefsRecipe", "DpoRecipe", "RmRecipe", "PpoRecipe", "CompareRecipe",
    "RecipeBase", "TrainingRecipe", "STAGE_SCHEMAS", "PLANNED_STAGES", "ALL_STAGES",
]  # fmt: skip


class PretrainSection(Section):
    show_samples: int = Field(3, ge=0, description="Continuations of eval-text openings printed at the end.")


class SftSection(Section):
    packing: bool = Field(False, description="Pack several examples into each max_length row (attention kept within each example).")
    padding_free: bool = Field(
        True,
        description="Without packing: the batch's examples share rows as long as its longest one, each seeing only itself (the loss of a "
        "row each, within float rounding); off by itself where the attention takes no custom mask or a sliding window is shorter than data.max_length.",
    )
    show_samples: int = Field(3, ge=0, description="Responses to eval prompts printed at the end.")


class RecipeBase(Section):
    stage: str | None = Field(None, description="The stage this recipe is for; checked against the subcommand.")
    run_dir: LocalPath | None = Field(None, description="Where checkpoints, metrics and final/ go (--run-dir wins).")
    seed: int = 42

    def reopens_complete_run(self) -> bool:
        """Whether running again into a complete run dir has work to do (e.g. a second annotator)."""
        return False


class TrainingRecipe(RecipeBase):
    model: ModelSection
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)

    @model_validator(mode="after")
    def _evaluates_a_trained_model(self) -> TrainingRecipe:
        if self.train.max_steps == 0 and self.model.init is not None:
            raise ValueError("train.max_steps: 0 evaluates a trained model: set model.name_or_path (e.g. a pretrain run) instead of model.init")
        return self


class PretrainRecipe(TrainingRecipe):
    stage: Literal["pretrain"] | None = "pretrain"
    pretrain: PretrainSection = Field(default_factory=PretrainSection)

    @model_validator(mode="after")
    def _tokenizer_source(self) -> PretrainRecipe:
        if self.model.init is not None and self.tokenizer.name_or_path is None and self.tokenizer.train_vocab_size is None:
            raise ValueError("a new model (model.init) needs a tokenizer: set tokenizer.train_vocab_size or tokenizer.name_or_path")
        if self.tokenizer.train_vocab_size is not None and self.model.init is None:
            raise ValueError("tokenizer.train_vocab_size trains a new tokenizer, which only a new model (model.init) can use")
        return self


class SftRecipe(TrainingRecipe):
    stage: Literal["sft"] | None = "sft"
    sft: SftSection = Field(default_factory=SftSection)

    @model_validator(mode="after")
    def _pretrained(self) -> SftRecipe:
        if self.model.init is not None:
            raise ValueError("sft starts from pretrained weights: set model.name_or_path (e.g. a pretrain run) instead of model.init")
        return self


class DpoSection(Section):
    beta: float = Field(0.1, gt=0, description="Strength of the KL pull toward the reference (the DPO paper's beta).")
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto"] = Field(
        "sigmoid",
        description="The preference loss; simpo and orpo need no reference model (none is built); kto learns from unpaired examples "
        "(prompt/completion/label rows, or pairs split into a desirable and an undesirable example).",
    )
    desirable_weight: float = Field(1.0, gt=0, description="kto: the weight of the desirable examples' loss (TRL's desirable_weight).")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: the weight of the undesirable examples' loss.")
    simpo_gamma: float = Field(0.5, ge=0.0, description="simpo: the target reward margin gamma (the paper pairs beta 2-2.5 with gamma 0.5-1.5).")
    rpo_alpha: float | None = Field(None, ge=0.0, description="Add this times the NLL of the chosen responses to the loss (RPO; not with orpo, which has its own).")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Assumed fraction of flipped labels: conservative DPO (sigmoid) or robust DPO (robust)."
    )
    ref_model: PathOrHubId | None = Field(
        None, description="A separate reference model; default: the initial policy (under LoRA: the same model, adapter disabled)."
    )
    precompute_ref: bool = Field(False, description="Compute every reference log-prob once before training; saved in the run dir.")
    ref_cache: bool = Field(
        True,
        description="With precompute_ref: take the reference log-probs from the cache ($DPO_CLI_CACHE, default ~/.cache/dpo-cli) when an earlier "
        "run computed them on the same reference weights, pairs, quantization, precision and device type, and leave computed ones there.",
    )
    share_prompt: bool = Field(
        True,
        description="Chosen and rejected in one row, the prompt computed once, and pairs sharing rows as long as the longest pair (the same "
        "log-probs as a row each, within float rounding); off by itself where the attention takes no custom mask (flash-attention) or a sliding window is shorter than data.max_length.",
    )
    max_prompt_length: int | None = Field(None, ge=1, description="Cut prompts to this many tokens, from the left.")
    show_samples: int = Field(3, ge=0, description="Eval prompts answered before and after training, printed at the end.")

    @model_validator(mode="after")
    def _smoothing(self) -> DpoSection:
        if self.label_smoothing > 0 and self.loss not in ("sigmoid", "robust", "simpo"):
            raise ValueError(f"dpo.label_smoothing applies to the sigmoid, robust and simpo losses, not {self.loss}")
        if self.loss in ("simpo", "orpo") and (self.ref_model is not None or self.precompute_ref):
            raise ValueError(f"dpo.loss: {self.loss} has no reference model: drop dpo.ref_model and dpo.precompute_ref")
        if self.loss != "kto" and (self.desirable_weight != 1.0 or self.undesirable_weight != 1.0):
            raise ValueError("dpo.desirable_weight and dpo.undesirable_weight weigh the kto loss's two kinds of example; set dpo.loss: kto")
        if self.rpo_alpha is not None and self.loss == "kto":
            raise ValueError("dpo.rpo_alpha adds the chosen responses' NLL; kto has no chosen responses (its desirable ones are unpaired)")
        if self.rpo_alpha is not None and self.loss == "orpo":
            raise ValueError("dpo.rpo_alpha: orpo already adds the chosen responses' NLL (its weight is 1; beta weighs the odds-ratio term)")
        return self


class DpoRecipe(TrainingRecipe):
    stage: Literal["dpo"] | None = "dpo"
    dpo: DpoSection = Field(default_factory=DpoSection)
    policy_eval: PolicyEvalSection = Field(default_factory=PolicyEvalSection)

    @model_validator(mode="after")
    def _pretrained(self) -> DpoRecipe:
        if self.model.init is not None:
            raise ValueError("dpo starts from a trained policy: set model.name_or_path (e.g. an sft run)")
        if self.dpo.max_prompt_length is not None and self.dpo.max_prompt_length >= self.data.max_length:
            raise ValueError("dpo.max_prompt_length must be below data.max_length, or no completion token would fit")
        if self.train.max_steps == 0 and self.dpo.ref_model is None and self.dpo.loss not in ("simpo", "orpo"):
            raise ValueError(
                "evaluation only (train.max_steps: 0): set dpo.ref_model to the model the policy started from (e.g. the sft run); "
                "without it the policy is its own reference and every margin is 0"
            )
        return self


class RmSection(Section):
    share_prompt: bool = Field(
        True,
        description="Chosen and rejected in one row, the prompt computed once, and pairs sharing rows as long as the longest pair (the same "
        "scores as a row each, within float rounding); off by itself where the attention takes no custom mask (flash-attention) or a sliding window is shorter than data.max_length.",
    )
    margin: bool = Field(False, description="Subtract each pair's `margin` column inside the loss: -log s(r_c - r_r - margin).")
    center_rewards_coef: float | None = Field(
        None, ge=0.0, description="Add coef x mean((r_c + r_r)^2), pulling the mean reward toward 0."
    )
    correlate_with: str | None = Field(
        None, description="A built-in judge (sentiment, length) whose ranking of held-out responses the learned scores are compared with."
    )
    correlate_with_python: str | None = Field(None, description="Compare with " + PYTHON_JUDGE + RUNS_CODE)

    _judge = field_validator("correlate_with")(lambda value: check_builtin_judge(value, "rm.correlate_with_python"))
    _python = field_validator("correlate_with_python")(check_python_function)

    @model_validator(mode="after")
    def _one_judge(self) -> RmSection:
        self.chosen_judge()
        return self

    def chosen_judge(self) -> JudgeSpec | None:
        return judge_spec(self.correlate_with, "rm.correlate_with", None, self.correlate_with_python, "rm.correlate_with_python")


class RmRecipe(TrainingRecipe):
    stage: Literal["rm-train"] | None = "rm-train"
    rm: RmSection = Field(default_factory=RmSection)

    @model_validator(mode="after")
    def _pretrained(self) -> RmRecipe:
        if self.model.init is not None:
            raise ValueError("rm-train starts from pretrained weights (a base or SFT model): set model.name_or_path")
        return self


class PpoSection(Section):
    reward_model: PathOrHubId | None = Field(None, description="An rm-train run or any scalar sequence classifier; frozen (or a judge: reward_judge).")
    reward_judge: str | None = Field(
        None, description="Instead of a reward model, a judge as the reward: sentiment or length (the DPO paper's PPO-GT, optimising the ground truth itself)."
    )
    reward_python: str | None = Field(None, description="Instead of a reward model, the reward is " + PYTHON_JUDGE + RUNS_CODE)
    reward_fluency_model: PathOrHubId | None = Field(
        None, description="With a judge as the reward: weighted by fluency under this frozen LM, as compare's judges.fluency_model."
    )
    reward_quantization: QuantizationSection | None = Field(
        None, description="Load the reward model in 4 bit (a run trained in 4 bit is loaded so anyway)."
    )
    value_model: PathOrHubId | None = Field(
        None, description="Separate models only: the critic's starting point (default: the reward model). With LoRA the critic is an adapter on the policy's base."
    )
    advantage: Literal["gae", "rloo", "grpo"] = Field(
        "gae",
        description="gae: PPO with a critic; rloo: each response's reward minus the mean of its prompt's other samples (RLOO); grpo: rewards "
        "normalised within each prompt's samples, the KL in the loss (GRPO). rloo and grpo build no critic.",
    )
    samples_per_prompt: int = Field(1, ge=1, description="Responses sampled per prompt, k (rloo and grpo: at least 2); must divide train.batch_size.")
    mini_batch_size: int = Field(8, ge=1, description="Rollouts per optimizer step; must divide train.batch_size (rollouts per iteration).")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout batch.")
    kl_coef: float = Field(0.05, ge=0.0, description="beta_KL: per-token penalty on log pi - log pi_ref (the starting value when adaptive).")
    target_kl: float | None = Field(None, gt=0, description="Adapt kl_coef toward this sequence KL (Ziegler et al.); null keeps it fixed.")
    kl_horizon: int = Field(10000, ge=1, description="Horizon of the adaptive KL controller, in episodes.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount of GAE.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="lambda of GAE.")
    cliprange: float = Field(0.2, gt=0, description="Clip range of the probability ratio.")
    cliprange_value: float = Field(0.2, gt=0, description="Clip range of the value update.")
    vf_coef: float = Field(0.1, ge=0.0, description="Weight of the value loss.")
    whiten_rewards: bool = Field(False, description="Whiten the per-token rewards of each batch before GAE.")
    missing_eos_penalty: float | None = Field(None, ge=0.0, description="Subtract this from the score of a response that never emits EOS.")
    early_stop_kl: float | None = Field(None, gt=0, description="End an iteration's update epochs once approx_kl passes this.")
    kl_stop: float | None = Field(None, gt=0, description="Stop the run (after a checkpoint) when the mean sequence KL to the reference passes this.")
    reward_batch_size: int = Field(16, ge=1, description="Responses per reward-model forward pass.")
    padding_free: bool = Field(
        True,
        description="The policy, reference and critic passes read packed rows: each episode's prompt and response without padding (the "
        "same log-probs and values within float rounding), where that saves at least 10% of an iteration's tokens; off by itself with several processes, where the attention takes no custom "
        "mask, or where a sliding window is shorter than data.max_length + generation.max_new_tokens.",
    )
    sample_every: int = Field(10, ge=1, description="Write a few sample responses to RUN/samples.jsonl every N iterations.")
    show_samples: int = Field(3, ge=0, description="Samples written each time.")

    _switch_quantization = field_validator("reward_quantization", mode="before")(_switch)

    _reward_judge = field_validator("reward_judge")(lambda value: check_builtin_judge(value, "ppo.reward_python"))
    _reward_python = field_validator("reward_python")(check_python_function)

    @model_validator(mode="after")
    def _one_reward(self) -> PpoSection:
        judge = self.chosen_judge()
        if (self.reward_model is None) == (judge is None):
            raise ValueError("ppo: give the reward as ppo.reward_model (a reward model) or ppo.reward_judge / ppo.reward_python (a judge), one of them")
        if self.reward_fluency_model is not None and judge is None:
            raise ValueError("ppo.reward_fluency_model weights a judge: set ppo.reward_judge or ppo.reward_python (or drop it)")
        return self

    def chosen_judge(self) -> JudgeSpec | None:
        return judge_spec(self.reward_judge, "ppo.reward_judge", None, self.reward_python, "ppo.reward_python")


class PpoRecipe(TrainingRecipe):
    stage: Literal["ppo"] | None = "ppo"
    ppo: PpoSection
    policy_eval: PolicyEvalSection = Field(default_factory=PolicyEvalSection)

    @model_validator(mode="after")
    def _shapes(self) -> PpoRecipe:
        if self.model.init is not None:
            raise ValueError("ppo starts from a trained policy: set model.name_or_path (e.g. an sft run)")
        if self.train.batch_size % self.ppo.mini_batch_size:
            raise ValueError(
                f"ppo.mini_batch_size ({self.ppo.mini_batch_size}) must divide train.batch_size ({self.train.batch_size}), the rollouts per iteration"
            )
        if self.train.grad_accum != 1:
            raise ValueError("ppo updates per mini-batch: leave train.grad_accum at 1 and size ppo.mini_batch_size instead")
        if self.train.batch_size % self.ppo.samples_per_prompt:
            raise ValueError(f"ppo.samples_per_prompt ({self.ppo.samples_per_prompt}) must divide train.batch_size ({self.train.batch_size}), the rollouts per iteration")
        if self.ppo.advantage != "gae":
            if self.ppo.samples_per_prompt < 2:
                raise ValueError(f"ppo.advantage: {self.ppo.advantage} compares each prompt's samples: set ppo.samples_per_prompt to 2 or more (e.g. 4)")
            if self.ppo.value_model is not None or self.ppo.whiten_rewards:
                raise ValueError(f"ppo.advantage: {self.ppo.advantage} has no critic and no GAE: drop ppo.value_model and ppo.whiten_rewards")
        if self.model.lora is not None and self.ppo.value_model is not None:
            raise ValueError("with model.lora the critic is a second adapter on the policy's base: drop ppo.value_model")
        if self.data.eval is not None:
            raise ValueError("data.eval: ppo samples prompts from data.train only")
        if self.train.max_steps == 0:
            raise ValueError("train.max_steps: 0 (evaluation only) is for pretrain, sft, rm-train and dpo; evaluate a ppo policy with policy_eval or compare")
        if self.train.group_by_length:
            raise ValueError("train.group_by_length: ppo samples its prompts afresh each iteration; the option is for sft, rm-train and dpo")
        return self


class CompareRecipe(RecipeBase):
    stage: Literal["compare"] | None = "compare"
    policies: dict[str, PathOrHubId | list[PathOrHubId]] = Field(
        ..., description="name -> run dir or model, e.g. sft, ppo, dpo; or a list: the same method trained with several seeds (runs pair up by position)."
    )
    baseline: str | None = Field(None, description="The policy win rates are measured against (default: the first).")
    reference: str | None = Field(None, description="The policy the KL is measured to (default: the baseline).")
    methods: dict[str, list[str]] = Field(
        default_factory=dict, description="method -> its policies (a sweep's points, e.g. dpo: [dpo-beta-0.1, dpo-beta-0.3]): the frontier draws each method's upper envelope."
    )
    data: DataSection
    generation: GenerationSection = Field(default_factory=GenerationSection)
    judges: JudgesSection = Field(default_factory=JudgesSection)
    costs: dict[str, list[PathOrHubId | list[PathOrHubId]]] = Field(
        default_factory=dict,
        description="Training path -> its run dirs, whose costs add up (e.g. rlhf: [rm, ppo]); a list inside: one stage run with several seeds, counted once (their mean).",
    )
    show_samples: int = Field(3, ge=0, description="Responses per policy shown in the report.")

    @model_validator(mode="after")
    def _names(self) -> CompareRecipe:
        if not self.policies:
            raise ValueError("policies: name at least one policy")
        names = list(self.policies)
        for key in ("baseline", "reference"):
            value = getattr(self, key)
            if value is not None and value not in names:
                raise ValueError(f"{key}: {value!r} is not one of the policies ({', '.join(names)})")
        for name, value in self.policies.items():
            if isinstance(value, list) and not value:
                raise ValueError(f"policies.{name}: an empty list; give the run dir (or one per seed)")
        for method, members in self.methods.items():
            unknown = [m for m in members if m not in names]
            if unknown:
                raise ValueError(f"methods.{method}: {', '.join(map(repr, unknown))} not among the policies ({', '.join(names)})")
        reference = self.reference or self.baseline or names[0]
        if isinstance(self.policies[reference], list) and len(self.policies[reference]) > 1:
            raise ValueError(f"reference: {reference!r} has several runs (seeds) and the KL is measured to one model; set reference: to a policy with one run (e.g. sft)")
        human = self.judges.human
        if human is not None and (human.a not in names or human.b not in names):
            raise ValueError(f"judges.human: a and b must be policies ({', '.join(names)})")
        if self.judges.chosen_judge() is None and self.judges.reward_model is None and human is None:
            raise ValueError("judges: give a judge function, a reward model, or both")
        return self


class CollectPrefsRecipe(RecipeBase):
    stage: Literal["collect-prefs"] | None = "collect-prefs"
    model: ModelSection | None = Field(None, description="The policy to sample (not needed to import).")
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    data: DataSection
    generation: GenerationSection = Field(default_factory=GenerationSection)
    collect: CollectSection = Field(default_factory=CollectSection)
    label: LabelSection = Field(default_factory=LabelSection)

    @model_validator(mode="after")
    def _policy(self) -> CollectPrefsRecipe:
        if self.collect.source == "generate" and self.model is None:
            raise ValueError("collect.source: generate samples a policy: set model.name_or_path (e.g. an sft run)")
        if self.data.eval is not None:
            raise ValueError("data.eval: collect-prefs labels every prompt of data.train; it has no eval split")
        if self.collect.mode == "pairs" and self.collect.samples_per_prompt < 2:
            raise ValueError("collect.samples_per_prompt: pairs need at least 2 responses per prompt (or set collect.mode: thumbs)")
        if self.collect.mode == "thumbs" and self.collect.source == "import":
            raise ValueError("collect.mode: thumbs labels sampled responses; an imported dataset is converted as it is (collect.source: generate)")
        if self.collect.mode == "pairs" and self.label.threshold is not None:
            raise ValueError("label.threshold is the bar of a thumbs up (collect.mode: thumbs); pairs compare two scores")
        if self.collect.mode == "thumbs":
            unused = [key for key, value, default in (("label.tie_margin", self.label.tie_margin, 0.0), ("label.ties", self.label.ties, "drop"),
                      ("collect.pairs_per_prompt", self.collect.pairs_per_prompt, None)) if value != default]  # fmt: skip
            if unused:
                raise ValueError(f"{', '.join(unused)}: pairs only; collect.mode: thumbs judges each response alone")
        return self

    def reopens_complete_run(self) -> bool:
        return self.collect.source == "generate" and self.label.by == "human"


STAGE_SCHEMAS: dict[str, type[RecipeBase]] = {
    "pretrain": PretrainRecipe,
    "sft": SftRecipe,
    "collect-prefs": CollectPrefsRecipe,
    "dpo": DpoRecipe,
    "rm-train": RmRecipe,
    "ppo": PpoRecipe,
    "compare": CompareRecipe,
}
PLANNED_STAGES: tuple[str, ...] = ()
ALL_STAGES = ("pretrain", "sft", "collect-prefs", "rm-train", "ppo", "dpo", "compare")
