"""`dpo-cli pipeline`: the stage recipes of both paths from one file, outputs feeding inputs, run in order.

A stage is skipped when its run dir is complete, its resolved recipe is unchanged and its inputs are the
same runs as last time (identified by their summary.json); re-run from scratch (the old run moved aside)
when its recipe or an input changed; resumed from its checkpoint when it was interrupted.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from dpo_cli.core import ui
from dpo_cli.core.errors import UserError
from dpo_cli.core.recipe_loader import Value, format_validation_error, load_recipe, read_recipe_file, recipe_diff, recipe_to_dict, resolve_path_value, schema_for, with_current_defaults
from dpo_cli.core.recipes import ALL_STAGES, LocalPath, RecipeBase, Section
from dpo_cli.core.rundir import RunDir, atomic_write_json
from dpo_cli.runner import run_recipe


class PipelineStage(Section):
    stage: str | None = Field(None, description="The subcommand (default: the stage's name in the file).")
    recipe: LocalPath = Field(..., description="The stage's recipe, relative to the pipeline file.")
    inputs: dict[str, str | list[str]] = Field(
        default_factory=dict, description="recipe key -> the name of the stage (or stages) whose run dir it takes."
    )
    set: dict[str, Any] = Field(default_factory=dict, description="More overrides for this stage (key: value).")


class PipelineFile(Section):
    run_dir: LocalPath = Field(..., description="Each stage runs in RUN_DIR/NAME.")
    seed: int | None = Field(None, description="Overrides every stage's seed.")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides for every stage (a stage's own set wins).")
    stages: dict[str, PipelineStage]

    @field_validator("stages")
    @classmethod
    def _some(cls, value: dict) -> dict:
        if not value:
            raise ValueError("name at least one stage")
        return value


@dataclass
class Step:
    name: str
    kind: str
    recipe: Path
    run_dir: Path
    values: list[Value]  # typed overrides: the file's seed, set and inputs
    overrides: list[str]  # the command line's --set KEY=VALUE for this stage (they win)
    inputs: dict[str, str]  # input stage name -> its identity (when known)
    action: str = ""  # run | resume | skip | rerun
    reason: str = ""
    recipe_object: RecipeBase | None = None  # the validated recipe the runner gets (steps that run)

    def load(self, smoke: bool) -> RecipeBase:
        return load_recipe(self.recipe, self.kind, self.overrides, smoke, self.values)


def load_pipeline(path: Path) -> PipelineFile:
    raw = read_recipe_file(path)
    base = path.resolve().parent
    if isinstance(raw.get("run_dir"), str):
        raw["run_dir"] = resolve_path_value(raw["run_dir"], base, always=True)
    for stage in (raw.get("stages") or {}).values():
        if isinstance(stage, dict) and isinstance(stage.get("recipe"), str):
            stage["recipe"] = resolve_path_value(stage["recipe"], base, always=True)
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
    return pipeline


def order(pipeline: PipelineFile) -> list[str]:
    """Stages so that every input runs before the stage reading it (file order among the rest); cycles refused."""
    needs = {name: {s for v in stage.inputs.values() for s in ([v] if isinstance(v, str) else v)} for name, stage in pipeline.stages.items()}
    done: list[str] = []
    while len(done) < len(needs):
        ready = [name for name in needs if name not in done and needs[name] <= set(done)]
        if not ready:
            stuck = [name for name in needs if name not in done]
            raise UserError(f"the pipeline's inputs form a cycle among: {', '.join(stuck)}")
        done.append(ready[0])
    return done


def identity(run_dir: Path) -> str | None:
    """What identifies a finished run for its readers: the hash of its summary.json."""
    summary = run_dir / "summary.json"
    return hashlib.sha256(summary.read_bytes()).hexdigest()[:16] if summary.is_file() else None


def _keys(dotted: str) -> tuple[str, ...]:
    keys = tuple(part.strip() for part in dotted.split("."))
    if not all(keys):
        raise UserError(f"set: {dotted!r} is not a recipe key (e.g. train.learning_rate)")
    return keys


def split_overrides(overrides: list[str], kinds: dict[str, str]) -> dict[str, list[str]]:
    """`--set STAGE:key=value` for one stage; `--set key=value` for every stage whose recipe has that section
    (train.* skips compare), given after the file's own."""
    by_stage: dict[str, list[str]] = {name: [] for name in kinds}
    for override in overrides:
        target, colon, rest = override.partition(":")
        if colon and "=" not in target:
            if target not in by_stage:
                raise UserError(f"--set {override}: no stage {target!r} in the pipeline; stages: {', '.join(kinds)}")
            by_stage[target].append(rest)
            continue
        section = override.split("=", 1)[0].split(".", 1)[0]
        takers = [name for name, kind in kinds.items() if section in schema_for(kind).model_fields]
        if not takers:
            raise UserError(f"--set {override}: no stage of this pipeline has a {section!r} section")
        for name in takers:
            by_stage[name].append(override)
    return by_stage


def plan(pipeline: PipelineFile, only: str | None, start: str | None, smoke: bool, extra: list[str] | None = None) -> list[Step]:
    names = order(pipeline)
    for flag, value in (("--only", only), ("--from", start)):
        if value is not None and value not in names:
            raise UserError(f"{flag} {value}: no such stage; stages: {', '.join(names)}")
    extra_by_stage = split_overrides(extra or [], {name: pipeline.stages[name].stage or name for name in names})
    for override in extra or []:
        key = override.split("=", 1)[0]
        wired = [name for name in names if key in pipeline.stages[name].inputs and ":" not in key]
        if wired:  # an override for every stage would silently cut the wiring of these
            raise UserError(f"--set {override}: in {', '.join(wired)}, {key} is another stage's output (inputs:); set it for one stage with --set STAGE:{override}")
    root = Path(pipeline.run_dir + ("-smoke" if smoke else ""))
    steps: list[Step] = []
    forced = False
    for name in names:
        stage = pipeline.stages[name]
        run_dir = root / name
        values: list[Value] = [(("seed",), pipeline.seed)] if pipeline.seed is not None else []
        values += [(_keys(k), v) for k, v in {**pipeline.set, **stage.set}.items()]
        for key, source in stage.inputs.items():
            dirs = [str(root / s) for s in ([source] if isinstance(source, str) else source)]
            values.append((_keys(key), dirs[0] if isinstance(source, str) else dirs))
        sources = {s for v in stage.inputs.values() for s in ([v] if isinstance(v, str) else v)}
        step = Step(name, stage.stage or name, Path(stage.recipe), run_dir, values, extra_by_stage[name], {s: identity(root / s) for s in sorted(sources)})
        forced = forced or name == start
        if only is not None and name != only:
            step.action, step.reason = "skip", "--only"
        elif forced:
            step.action, step.reason = "rerun", "--from"
        else:
            step.action, step.reason = decide(step, smoke, steps)
        if step.action != "skip" and step.recipe_object is None:
            step.recipe_object = step.load(smoke)  # a bad key or --set fails now, not hours later
        steps.append(step)
    return steps


def decide(step: Step, smoke: bool, earlier: list[Step]) -> tuple[str, str]:
    run = RunDir(step.run_dir)
    upstream = [s.name for s in earlier if s.name in step.inputs and s.action != "skip"]
    if not run.path.is_dir() or run.saved_recipe() is None:
        return "run", "not run yet"
    recipe = step.recipe_object = step.load(smoke)
    recipe.run_dir = str(run.path)
    changed = recipe_diff(with_current_defaults(run.saved_recipe(), type(recipe)), recipe_to_dict(recipe))
    if changed:
        return "rerun", "recipe changed: " + "; ".join(changed)
    if upstream:
        return "rerun", "inputs re-run first: " + ", ".join(upstream)
    recorded_path = run.path / "inputs.json"
    recorded = json.loads(recorded_path.read_text()) if recorded_path.is_file() else None
    if recorded is not None and recorded != step.inputs:
        return "rerun", "inputs changed: " + ", ".join(k for k in step.inputs if recorded.get(k) != step.inputs[k])
    if run.is_complete():
        return "skip", "up to date"
    return "resume", f"interrupted (status: {(run.summary() or {}).get('status', 'running')})"


def print_plan(steps: list[Step], title: str) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left")
    for column in ("stage", "run dir", "action", "why"):
        table.add_column(column, overflow="fold")
    for step in steps:
        table.add_row(Text(step.name), Text(str(step.run_dir)), Text(step.action), Text(step.reason))
    ui.console.print(table)


def run_pipeline(
    path: Path, only: str | None, start: str | None, dry_run: bool, smoke: bool, run_dir: Path | None = None, overrides: list[str] | None = None
) -> None:
    pipeline = load_pipeline(path)
    if run_dir is not None:
        pipeline.run_dir = str(run_dir.expanduser().resolve())
    steps = plan(pipeline, only, start, smoke, overrides)
    print_plan(steps, f"pipeline {path}" + (" (dry run: nothing is run)" if dry_run else ""))
    if dry_run:
        return
    for index, step in enumerate(steps):
        if step.action == "skip":
            continue
        missing = [s for s in step.inputs if not RunDir(step.run_dir.parent / s).is_complete()]
        if missing:
            raise UserError(f"stage {step.name}: its input {', '.join(missing)} is not complete; run the pipeline without --only first")
        step.inputs = {s: identity(step.run_dir.parent / s) for s in step.inputs}  # the inputs as they are now
        ui.note(f"pipeline: {step.name} ({step.action}: {step.reason})")
        began = time.time()
        recipe = step.recipe_object or step.load(smoke)  # a step --only skipped at planning, re-run for its reader
        run_recipe(step.kind, recipe, step.run_dir.expanduser().resolve(), fresh=step.action == "rerun")
        atomic_write_json(step.run_dir / "inputs.json", step.inputs)
        step.reason = f"done in {time.time() - began:.0f} s"
        gc.collect()
        for later in steps[index + 1 :]:  # readers of a re-run stage must run again
            if step.name in later.inputs and later.action == "skip" and later.reason != "--only":
                later.action, later.reason = "rerun", f"input {step.name} was re-run"
    print_plan(steps, "pipeline done")
    for step in steps:
        report = step.run_dir / "report.md"
        if step.kind == "compare" and report.is_file():
            ui.console.print(f"report: {report}  (plots beside it: frontier.png, costs.png, curves.png)")
