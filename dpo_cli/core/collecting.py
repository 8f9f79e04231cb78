"""The sections of collect-prefs's recipe: how preferences are collected (`collect`) and who labels them
(`label`: a judge, a reward model, or people at the terminal or in browsers)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dpo_cli.core.judging import PYTHON_JUDGE, RUNS_CODE
from dpo_cli.core.sections import JudgeSpec, PathOrHubId, Section, check_builtin_judge, check_python_function, judge_spec


class CollectSection(Section):
    source: Literal["generate", "import"] = Field(
        "generate", description="generate: sample the policy and label pairs; import: convert an existing preference dataset."
    )
    mode: Literal["pairs", "thumbs"] = Field(
        "pairs", description="pairs: which of two responses is better (prefs.jsonl of pairs); thumbs: each response up or down on its own "
        "(prefs.jsonl of KTO's unpaired prompt/completion/label examples, for dpo.loss: kto).",
    )
    samples_per_prompt: int = Field(2, ge=1, description="Responses sampled per prompt (at least 2 to form pairs).")
    pairs_per_prompt: int | None = Field(None, ge=1, description="Pairs formed per prompt (seeded choice); null: every pair of samples.")
    import_format: Literal["auto", "trl", "hh", "ultrafeedback"] = Field(
        "auto", description="Format of an imported dataset; auto detects it from the columns."
    )


class LabelSection(Section):
    by: Literal["human", "reward-model", "judge"] = Field("judge", description="Who picks the better response.")
    judge: str = Field("sentiment", description="Built-in judge: sentiment or length (a function of your own goes in label.python).")
    python: str | None = Field(None, description="The judge is " + PYTHON_JUDGE + RUNS_CODE)
    reward_model: PathOrHubId | None = Field(None, description="An rm-train run dir or any sequence-classification checkpoint with one output.")
    noise: float | None = Field(
        None, gt=0, description="Bradley-Terry temperature T: sample A with probability sigmoid((s_A - s_B) / T) (simulated noisy raters)."
    )
    tie_margin: float = Field(0.0, ge=0.0, description="Scores closer than this are a tie.")
    threshold: float | None = Field(
        None, description="collect.mode thumbs with a judge or reward model: a score at or above it is a thumbs up; default: the median score of the run's responses."
    )
    ties: Literal["drop", "keep"] = Field("drop", description="Ties are left out of prefs.jsonl, or kept with tie: true.")
    aggregate: Literal["majority", "all"] = Field(
        "majority", description="Several annotators on one pair: one record with the majority choice, or one record per label."
    )
    annotator: str | None = Field(None, description="Name of the human annotator (default: --annotator, $DPO_CLI_ANNOTATOR, $USER).")
    serve: bool = Field(False, description="Label in browsers (--serve): a web server with one secret link per annotator and one for the admin.")
    host: str = Field("127.0.0.1", description="With serve: the address to listen on (loopback unless told otherwise).")
    port: int = Field(8080, ge=0, le=65535, description="With serve: the port (0: any free one).")
    annotators: list[str] | None = Field(None, description="With serve: the annotators' names, each getting a link (default: label.annotator).")
    overlap: float = Field(0.1, ge=0.0, le=1.0, description="With serve and several annotators: the share of pairs two annotators label, for agreement.")
    batch_size: int = Field(16, ge=1, description="Responses per reward-model forward pass.")

    _judge = field_validator("judge")(lambda value: check_builtin_judge(value, "label.python"))
    _python = field_validator("python")(check_python_function)

    @model_validator(mode="after")
    def _needs(self) -> LabelSection:
        if self.by == "reward-model" and self.reward_model is None:
            raise ValueError("label.by: reward-model needs label.reward_model (an rm-train run or a sequence classifier)")
        if self.serve and self.by != "human":
            raise ValueError(f"label.serve: the web labeller is for people (label.by: human), not label.by: {self.by}")
        if self.python is not None and self.by != "judge":
            raise ValueError(f"label.python is the judge of label.by: judge, not of label.by: {self.by}")
        self.chosen_judge()
        return self

    @field_validator("annotators")
    @classmethod
    def _names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
                raise ValueError(f"annotator name {name!r}: use letters, digits, '.', '_' or '-'")
        if value is not None and not value:
            raise ValueError("name at least one annotator")
        if value is not None and len(set(value)) != len(value):
            raise ValueError("name each annotator once")
        return value

    def chosen_judge(self) -> JudgeSpec | None:
        return judge_spec(self.judge, "label.judge", "sentiment", self.python, "label.python")
