"""`dpo-cli pipeline`: the stage recipes of both paths from one file, outputs feeding inputs, run in order.

A stage is skipped when its run dir is complete, its resolved recipe is unchanged and its inputs are the
same runs as last time (identified by their summary.json); re-run from scratch (the old run moved aside)
when its recipe or an input changed; resumed from its checkpoint when it was interrupted.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from dpo_cli.core import ui
from dpo_cli.core.errors import UserError
from dpo_cli.core.recipe_loader import REMOVE, Value, format_validation_error, load_recipe, read_recipe_file, recipe_diff, recipe_to_dict, resolve_path_value, schema_for, with_current_defaults
from dpo_cli.core.recipes import ALL_STAGES, LocalPath, RecipeBase, Section
from dpo_cli.core.rundir import RunDir
from dpo_cli.core.atomic import atomic_write_json
from dpo_cli.runner import run_recipe


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
    stage: str = ""  # the stage in the pipeline file this run belongs to (one of its seeds or sweep points)

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
        check_repeats(path, pipeline, name)
    if pipeline.seeds is not None and not any(stage.per_seed for stage in pipeline.stages.values()):
        raise UserError(f"{path}: seeds: no stage has per_seed: true; mark the training stages to repeat (e.g. stages.dpo.per_seed: true)")
    return pipeline


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


@dataclass
class Run:
    """One run of a stage: the stage itself, or one of its seeds or sweep points."""

    name: str  # its run dir's name
    stage: str  # the stage in the pipeline file
    seed: int | None = None  # per_seed: the training seed
    point: dict[str, Any] = field(default_factory=dict)  # sweep: key -> value
    suffix: str = ""  # the sweep point's part of the name ("-beta-0.1")


def _text(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.+]+", "_", str(value)).strip("_") or "_"


def point_suffix(point: dict[str, Any]) -> str:
    """How a sweep point shows in run and policy names: -LEAF-VALUE per key (the whole key where leaves repeat)."""
    leaves = [key.split(".")[-1] for key in point]
    return "".join(f"-{leaf if leaves.count(leaf) == 1 else key.replace('.', '-')}-{_text(value)}" for leaf, (key, value) in zip(leaves, point.items()))


def _sources(stage: PipelineStage) -> list[str]:
    return [s for v in stage.inputs.values() for s in ([v] if isinstance(v, str) else v)]


def expand(pipeline: PipelineFile, names: list[str], smoke: bool = False) -> dict[str, list[Run]]:
    """Each stage's runs: one per sweep point (all combinations) and, for a per_seed stage or one reading
    a per_seed stage, per seed (compare runs once and gathers them). --smoke keeps two seeds."""
    runs: dict[str, list[Run]] = {}
    all_seeds = (pipeline.seeds or [])[: 2 if smoke else None]
    for name in names:
        stage = pipeline.stages[name]
        reads_seeds = any(runs[s][0].seed is not None for s in _sources(stage))
        seeds = all_seeds if (stage.stage or name) != "compare" and (stage.per_seed or reads_seeds) else [None]
        points = [dict(zip(stage.sweep, combination)) for combination in product(*stage.sweep.values())]
        runs[name] = [
            Run(name + point_suffix(point) + (f"-seed{seed}" if seed is not None else ""), name, seed, point, point_suffix(point))
            for point in points for seed in seeds
        ]  # fmt: skip
    taken: dict[str, str] = {}
    for name, stage_runs in runs.items():
        for run in stage_runs:
            if run.name in taken:
                raise UserError(f"stages.{name}: its run {run.name} has the name of a run of {taken[run.name]}; rename a stage")
            taken[run.name] = name
    return runs


def read_runs(run: Run, source: list[Run]) -> list[Run]:
    """The runs of a source stage that `run` reads: its own seed's, or all of them (compare)."""
    if len(source) == 1 or run.seed is None:
        return source
    return [r for r in source if r.seed == run.seed]


def wiring(name: str, kind: str, run: Run, inputs: dict[str, str | list[str]], runs: dict[str, list[Run]], root: Path) -> tuple[list[Value], list[str]]:
    """The recipe values that wire `run` to its inputs' run dirs, and the names of the runs it reads.
    compare's policies.NAME from a stage with several runs: a list of its seeds' run dirs, one policy per
    sweep point (NAME-KEY-VALUE); its list-valued keys (costs): a list of the runs where there are several."""
    values: list[Value] = []
    read: list[str] = []
    for key, source in inputs.items():
        keys = _keys(key)
        found = {s: read_runs(run, runs[s]) for s in ([source] if isinstance(source, str) else source)}
        read += [r.name for rs in found.values() for r in rs]
        dirs = {s: [str(root / r.name) for r in rs] for s, rs in found.items()}
        if isinstance(source, list):
            values.append((keys, [d[0] if len(d) == 1 else d for d in dirs.values()]))
        elif len(dirs[source]) == 1:
            values.append((keys, dirs[source][0]))
        elif kind == "compare" and keys[0] == "policies" and len(keys) == 2:
            suffixes = list(dict.fromkeys(r.suffix for r in found[source]))
            if suffixes != [""]:  # the recipe's own entry under that name gives way to the sweep's points
                values.append((keys, REMOVE))
            for suffix in suffixes:
                point_dirs = [str(root / r.name) for r in found[source] if r.suffix == suffix]
                values.append(((keys[0], keys[1] + suffix), point_dirs if found[source][0].seed is not None else point_dirs[0]))
            if len(suffixes) > 1:  # the sweep's points are one method: the frontier draws its envelope
                values.append((("methods", keys[1]), [keys[1] + suffix for suffix in suffixes]))
        else:
            raise UserError(f"stages.{name}.inputs.{key}: {source} has {len(dirs[source])} runs (seeds or sweep points) and {key} takes one")
    return values, read


def plan(pipeline: PipelineFile, only: str | None, start: str | None, smoke: bool, extra: list[str] | None = None) -> list[Step]:
    names = order(pipeline)
    runs = expand(pipeline, names, smoke)
    every_run = {r.name: r for rs in runs.values() for r in rs}
    for flag, value in (("--only", only), ("--from", start)):
        if value is not None and value not in names and value not in every_run:
            raise UserError(f"{flag} {value}: no such stage; stages: {', '.join(names)}")
    extra_by_stage = split_overrides(extra or [], {name: pipeline.stages[name].stage or name for name in names})
    for name, stage_overrides in extra_by_stage.items():
        for override in stage_overrides:  # one value for all of a stage's runs would make them the same run under other names
            key = override.split("=", 1)[0].strip()
            if key in pipeline.stages[name].sweep or (key == "seed" and runs[name][0].seed is not None):
                what = f"sweeps {key}" if key != "seed" else "runs once per seed"
                raise UserError(f"--set {override}: {name} {what}; change the pipeline file's {'sweep' if key != 'seed' else 'seeds'} instead")
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
        kind = stage.stage or name
        for run in runs[name]:
            values: list[Value] = [(("seed",), pipeline.seed)] if pipeline.seed is not None else []
            values += [(_keys(k), v) for k, v in {**pipeline.set, **stage.set}.items()]
            values += [(_keys(k), v) for k, v in run.point.items()]
            if run.seed is not None:
                values.append((("seed",), run.seed))
            wired, read = wiring(name, kind, run, stage.inputs, runs, root)
            step = Step(run.name, kind, Path(stage.recipe), root / run.name, values + wired, extra_by_stage[name], {s: identity(root / s) for s in sorted(read)})
            step.stage = name
            forced = forced or start in (name, run.name)
            if only is not None and only not in (name, run.name):
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
            ui.console.print(f"report: {report}  (plots beside it: frontier.png, over-optimisation.png, costs.png, curves.png)")
