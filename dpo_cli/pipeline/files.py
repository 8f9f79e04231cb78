"""A pipeline file: its schema (stages, seeds, sweeps, online rounds), loading with one-line errors, and the
order its stages run in."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from dpo_cli.core.errors import UserError
from dpo_cli.core.recipe_loader import format_validation_error, read_recipe_file, resolve_path_value
from dpo_cli.core.recipes import ALL_STAGES, LocalPath, Section


class RoundsSection(Section):
    """Online / iterative DPO: the stage runs as rounds of sample the current policy -> label the new pairs
    with a judge or reward model -> dpo on them, each round starting from the last one's policy."""

    count: int = Field(..., ge=1, description="How many rounds of sample -> label -> dpo.")
    collect: LocalPath = Field(
        ..., description="The collect-prefs recipe of every round (relative to the pipeline file): prompts, sampling, and a judge or reward model "
        "as labeller; its model.name_or_path is the round's policy.",
    )  # fmt: skip
    collect_inputs: dict[str, str] = Field(default_factory=dict, description="collect recipe key -> the stage whose run dir it takes (e.g. label.reward_model: rm).")
    collect_set: dict[str, Any] = Field(default_factory=dict, description="More overrides for the collect recipe (key: value).")
    offline: str | None = Field(None, description="A stage whose preference pairs are mixed into every round's training data (e.g. collect-prefs).")
    offline_weight: float = Field(0.5, gt=0, lt=1, description="With offline: the share of each round's training pairs drawn from them.")
    reference: Literal["round", "initial"] = Field(
        "round", description="round: each round's reference is its own starting policy (the last round's); initial: the stage's starting policy throughout."
    )


class PipelineStage(Section):
    stage: str | None = Field(None, description="The subcommand (default: the stage's name in the file).")
    recipe: LocalPath = Field(..., description="The stage's recipe, relative to the pipeline file.")
    inputs: dict[str, str | list[str]] = Field(
        default_factory=dict, description="recipe key -> the name of the stage (or stages) whose run dir it takes."
    )
    set: dict[str, Any] = Field(default_factory=dict, description="More overrides for this stage (key: value).")
    per_seed: bool = Field(
        False, description="Run once per seed of the pipeline's seeds (run dirs NAME-seedS); stages that read it run per seed too, compare gathers them."
    )
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="recipe key -> values: one run per combination (run dirs NAME-KEY-VALUE); compare's policies get each as a policy.",
    )
    rounds: RoundsSection | None = Field(
        None, description="dpo only: run as rounds of online / iterative DPO (run dirs NAME-roundR-prefs and NAME-roundR); readers get the last round."
    )


class PipelineFile(Section):
    run_dir: LocalPath = Field(..., description="Each stage runs in RUN_DIR/NAME.")
    seed: int | None = Field(None, description="Overrides every stage's seed.")
    seeds: list[int] | None = Field(None, description="The training seeds of the stages marked per_seed: true, e.g. [1, 2, 3].")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides for every stage (a stage's own set wins).")
    stages: dict[str, PipelineStage]

    @field_validator("stages")
    @classmethod
    def _some(cls, value: dict) -> dict:
        if not value:
            raise ValueError("name at least one stage")
        return value


def load_pipeline(path: Path) -> PipelineFile:
    raw = read_recipe_file(path)
    base = path.resolve().parent
    if isinstance(raw.get("run_dir"), str):
        raw["run_dir"] = resolve_path_value(raw["run_dir"], base, always=True)
    for stage in (raw.get("stages") or {}).values():
        if isinstance(stage, dict) and isinstance(stage.get("recipe"), str):
            stage["recipe"] = resolve_path_value(stage["recipe"], base, always=True)
        rounds = stage.get("rounds") if isinstance(stage, dict) else None
        if isinstance(rounds, dict) and isinstance(rounds.get("collect"), str):
            rounds["collect"] = resolve_path_value(rounds["collect"], base, always=True)
    try:
        pipeline = PipelineFile.model_validate(raw)
    except ValidationError as exc:
        lines = format_validation_error(exc, PipelineFile)
        raise UserError(f"{path}: {len(lines)} pipeline error{'s' if len(lines) > 1 else ''}:\n  " + "\n  ".join(lines)) from None
    for name, stage in pipeline.stages.items():
        if "." in name:
            raise UserError(f"{path}: stages.{name}: a stage name cannot hold a dot (it would split recipe keys); use a dash")
        kind = stage.stage or name
        if kind not in ALL_STAGES:
            raise UserError(f"{path}: stages.{name}: unknown stage {kind!r}; stages: {', '.join(ALL_STAGES)} (or set stages.{name}.stage)")
        if not Path(stage.recipe).is_file():
            raise UserError(f"{path}: stages.{name}.recipe: {stage.recipe} does not exist")
        for key, source in stage.inputs.items():
            for source_name in [source] if isinstance(source, str) else source:
                if source_name not in pipeline.stages:
                    raise UserError(f"{path}: stages.{name}.inputs.{key}: no stage named {source_name!r}")
        if stage.rounds is not None:
            check_rounds(path, pipeline, name, kind)
        check_repeats(path, pipeline, name)
    if pipeline.seeds is not None and not any(stage.per_seed for stage in pipeline.stages.values()):
        raise UserError(f"{path}: seeds: no stage has per_seed: true; mark the training stages to repeat (e.g. stages.dpo.per_seed: true)")
    return pipeline


def check_rounds(path: Path, pipeline: PipelineFile, name: str, kind: str) -> None:
    stage, where = pipeline.stages[name], f"{path}: stages.{name}.rounds"
    rounds = stage.rounds
    assert rounds is not None
    if kind != "dpo":
        raise UserError(f"{where}: rounds are online DPO; {name} is a {kind} stage")
    if stage.sweep:
        raise UserError(f"{where}: a stage runs as rounds or as a sweep, not both; make one stage per sweep point")
    if not isinstance(stage.inputs.get("model.name_or_path"), str):
        raise UserError(f"{where}: wire the starting policy with inputs: {{model.name_or_path: STAGE}} (e.g. sft); later rounds start from the last")
    for key, hint in ROUND_KEYS.items():
        if key in stage.inputs or key in stage.set:
            raise UserError(f"stages.{name}: {key} is set by the rounds ({hint}); leave it out of the stage's inputs and set")
    if not Path(rounds.collect).is_file():
        raise UserError(f"{where}.collect: {rounds.collect} does not exist")
    for key, source in [*rounds.collect_inputs.items(), *([("offline", rounds.offline)] if rounds.offline else [])]:
        where_key = f"{where}.{'collect_inputs.' + key if key != 'offline' else key}"
        if source not in pipeline.stages:
            raise UserError(f"{where_key}: no stage named {source!r}")
        if pipeline.stages[source].sweep or pipeline.stages[source].rounds:
            raise UserError(f"{where_key}: {source} is a {'sweep' if pipeline.stages[source].sweep else 'stage with rounds'}; rounds read a stage with one run (per seed)")


ROUND_KEYS = {  # the dpo recipe keys each round sets itself, and where to say what they should be
    "data.train": "each round's own pairs; mix in others with rounds.offline",
    "dpo.ref_model": "see rounds.reference",
}


def dependencies(stage: PipelineStage) -> set[str]:
    """The stages whose runs this one reads: its inputs, and its rounds' labeller inputs and offline pairs."""
    found = set(_sources(stage))
    if stage.rounds is not None:
        found |= set(stage.rounds.collect_inputs.values()) | ({stage.rounds.offline} if stage.rounds.offline else set())
    return found


def check_repeats(path: Path, pipeline: PipelineFile, name: str) -> None:
    """per_seed and sweep where they can mean something."""
    stage = pipeline.stages[name]
    kind = stage.stage or name
    where = f"{path}: stages.{name}"
    if stage.per_seed and not pipeline.seeds:
        raise UserError(f"{where}.per_seed: the pipeline has no seeds; add seeds: [1, 2, 3] at the top of the file")
    if kind == "compare" and (stage.per_seed or stage.sweep):
        raise UserError(f"{where}: compare gathers the seeds and sweep points of what it reads; it runs once (no per_seed or sweep)")
    if len(set(pipeline.seeds or [])) != len(pipeline.seeds or []):
        raise UserError(f"{path}: seeds: {pipeline.seeds} repeats a seed")
    for key, values in stage.sweep.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}.sweep.{key}: give a list of values, e.g. [0.03, 0.1, 0.3]")
        if key in stage.inputs or key == "seed":
            raise UserError(f"{where}.sweep.{key}: {'the seed is swept with seeds: and per_seed' if key == 'seed' else 'this key is wired to another stage (inputs)'}")
    if kind != "compare":
        for key, source in stage.inputs.items():
            for source_name in [source] if isinstance(source, str) else source:
                if pipeline.stages[source_name].sweep:
                    raise UserError(f"{where}.inputs.{key}: {source_name} is a sweep (several runs); only compare can read a sweep")


def order(pipeline: PipelineFile) -> list[str]:
    """Stages so that every input runs before the stage reading it (file order among the rest); cycles refused."""
    needs = {name: dependencies(stage) for name, stage in pipeline.stages.items()}
    done: list[str] = []
    while len(done) < len(needs):
        ready = [name for name in needs if name not in done and needs[name] <= set(done)]
        if not ready:
            stuck = [name for name in needs if name not in done]
            raise UserError(f"the pipeline's inputs form a cycle among: {', '.join(stuck)}")
        done.append(ready[0])
    return done


def _sources(stage: PipelineStage) -> list[str]:
    return [s for v in stage.inputs.values() for s in ([v] if isinstance(v, str) else v)]


