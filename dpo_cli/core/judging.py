"""The sections that choose how policies are judged: the ground truth and proxy of compare, the evaluation
dpo and ppo run every N steps, and the words every judge key's description shares."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from dpo_cli.core.sections import JudgeSpec, PathOrHubId, Section, check_builtin_judge, check_python_function, judge_spec

RUNS_CODE = " This runs your code: only keys named *python do."
PYTHON_JUDGE = "your function 'module:function' (prompt, response) -> float, imported from the current directory or the Python path."


class PolicyEvalSection(Section):
    """The same small evaluation every N steps (dpo, ppo), logged to metrics.jsonl with "split": "policy_eval",
    so the comparison's reward-KL frontier can use the path a policy took."""

    every: int | None = Field(None, ge=1, description="Evaluate every N steps (and before the first); null: never.")
    prompts: PathOrHubId | None = Field(None, description="Held-out prompts (files, hub id or demo:NAME), like data.train.")
    max_prompts: int = Field(32, ge=1, description="Use at most this many prompts.")
    judge: str | None = Field(None, description="Ground-truth judge: sentiment or length (a function of your own goes in policy_eval.python).")
    python: str | None = Field(None, description="The ground truth is " + PYTHON_JUDGE + RUNS_CODE)
    reward_model: PathOrHubId | None = Field(None, description="Proxy reward model (ppo: its own reward model by default).")
    fluency_model: PathOrHubId | None = Field(None, description="The ground truth weighted by fluency under this frozen LM (as compare's judges.fluency_model).")
    max_new_tokens: int = Field(48, ge=1, description="Longest response.")
    seed: int | None = Field(
        None, description="The evaluation's own seed: prompts drawn and responses sampled as compare does with this seed (null: from the run's seed)."
    )
    max_prompt_length: int = Field(512, ge=1, description="Prompt tokens kept (compare: data.max_length).")
    batch_size: int | None = Field(None, ge=1, description="Responses sampled at once (compare: generation.batch_size); null: every prompt at once.")

    _judge = field_validator("judge")(lambda value: check_builtin_judge(value, "policy_eval.python"))
    _python = field_validator("python")(check_python_function)

    @model_validator(mode="after")
    def _prompts(self) -> PolicyEvalSection:
        if self.every is not None and self.prompts is None:
            raise ValueError("policy_eval.every needs policy_eval.prompts")
        if self.chosen_judge() is None and self.fluency_model is not None:
            raise ValueError("policy_eval.fluency_model weights a judge: set policy_eval.judge or policy_eval.python (or drop it)")
        return self

    def chosen_judge(self) -> JudgeSpec | None:
        return judge_spec(self.judge, "policy_eval.judge", None, self.python, "policy_eval.python")


class HumanAbSection(Section):
    a: str = Field(..., description="The first policy of the blind A/B (a name from policies).")
    b: str = Field(..., description="The second policy.")
    pairs: int = Field(20, ge=1, description="Prompts to judge.")


class JudgesSection(Section):
    function: str | None = Field(
        "sentiment", description="The ground-truth judge: sentiment or length (a function of your own goes in judges.python); null for none."
    )
    python: str | None = Field(None, description="The ground truth is " + PYTHON_JUDGE + RUNS_CODE)
    reward_model: PathOrHubId | None = Field(None, description="The proxy: an rm-train run or any scalar sequence classifier.")
    fluency_model: PathOrHubId | None = Field(
        None, description="A frozen causal LM (e.g. the pretrained model): the ground truth is weighted by each response's fluency under it, so word salad cannot game it."
    )
    ceiling: PathOrHubId | None = Field(
        None, description="Reference answers (prompt + completion or response columns): their ground truth is reported as the ceiling."
    )
    human: HumanAbSection | None = Field(None, description="A blind pairwise A/B of two policies on the labelling screen.")

    _judge = field_validator("function")(lambda value: check_builtin_judge(value, "judges.python"))
    _python = field_validator("python")(check_python_function)

    @model_validator(mode="after")
    def _one_judge(self) -> JudgesSection:
        if self.chosen_judge() is None:
            for key in ("fluency_model", "ceiling"):
                if getattr(self, key) is not None:
                    raise ValueError(f"judges.{key} needs a ground-truth judge: set judges.function or judges.python (or drop it)")
        return self

    def chosen_judge(self) -> JudgeSpec | None:
        return judge_spec(self.function, "judges.function", "sentiment", self.python, "judges.python")
