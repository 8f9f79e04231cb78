"""Planning a pipeline: its runs (seeds, sweep points, rounds), each wired to the run dirs of its inputs, and
what to do with each (run, resume, skip, re-run)."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from dpo_cli.core import ui
from dpo_cli.core.errors import UserError
from dpo_cli.core.recipe_loader import REMOVE, Value, load_recipe, recipe_diff, recipe_to_dict, schema_for, with_current_defaults
from dpo_cli.core.recipes import RecipeBase
from dpo_cli.core.rundir import RunDir
from dpo_cli.pipeline.files import PipelineFile, dependencies, order
from dpo_cli.pipeline.rounds import check_round_recipes, round_names, round_steps
from dpo_cli.pipeline.runs import Planned, Run, identity, keys_of, point_suffix, read_runs


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


def expand(pipeline: PipelineFile, names: list[str], smoke: bool = False) -> dict[str, list[Run]]:
    """Each stage's runs: one per sweep point (all combinations) and, for a per_seed stage or one reading
    a per_seed stage, per seed (compare runs once and gathers them). --smoke keeps two seeds."""
    runs: dict[str, list[Run]] = {}
    all_seeds = (pipeline.seeds or [])[: 2 if smoke else None]
    for name in names:
        stage = pipeline.stages[name]
        reads_seeds = any(runs[s][0].seed is not None for s in dependencies(stage))
        seeds = all_seeds if (stage.stage or name) != "compare" and (stage.per_seed or reads_seeds) else [None]
        points = [dict(zip(stage.sweep, combination)) for combination in product(*stage.sweep.values())]
        last_round = f"-round{stage.rounds.count}" if stage.rounds is not None else ""  # readers get the last round
        runs[name] = [
            Run(name + point_suffix(point) + (f"-seed{seed}" if seed is not None else "") + last_round, name, seed, point, point_suffix(point))
            for point in points for seed in seeds
        ]  # fmt: skip
    taken: dict[str, str] = {}
    for name, stage_runs in runs.items():
        rounds = pipeline.stages[name].rounds
        for run_name in [n for run in stage_runs for n in (round_names(run.name, rounds.count) if rounds else [run.name])]:
            if run_name in taken:
                raise UserError(f"stages.{name}: its run {run_name} has the name of a run of {taken[run_name]}; rename a stage")
            taken[run_name] = name
    return runs


def run_names(pipeline: PipelineFile, runs: dict[str, list[Run]]) -> list[str]:
    """Every run dir the planned runs use, in order (an online stage's every round)."""
    rounds = lambda name: pipeline.stages[name].rounds  # noqa: E731
    return [n for name, stage_runs in runs.items() for run in stage_runs for n in (round_names(run.name, rounds(name).count) if rounds(name) else [run.name])]


def wiring(
    name: str, kind: str, run: Run, inputs: dict[str, str | list[str]], runs: dict[str, list[Run]], root: Path, rounds: dict[str, int] | None = None
) -> tuple[list[Value], list[str]]:
    """The recipe values that wire `run` to its inputs' run dirs, and the names of the runs it reads.
    compare's policies.NAME from a stage with several runs: a list of its seeds' run dirs, one policy per
    sweep point (NAME-KEY-VALUE); its list-valued keys (costs): a list of the runs where there are several,
    an online stage (rounds: stage -> count) giving every round's collect-prefs and dpo runs."""
    values: list[Value] = []
    read: list[str] = []
    rounds = rounds or {}
    for key, source in inputs.items():
        keys = keys_of(key)
        found = {s: read_runs(run, runs[s]) for s in ([source] if isinstance(source, str) else source)}
        read += [r.name for rs in found.values() for r in rs]
        dirs = {s: [str(root / r.name) for r in rs] for s, rs in found.items()}
        if kind == "compare" and keys[0] == "costs" and any(s in rounds for s in found):
            entries: list[list[str]] = []
            for s, rs in found.items():
                every = [round_names(r.name, rounds[s]) for r in rs] if s in rounds else [[r.name] for r in rs]
                entries += [[str(root / names[j]) for names in every] for j in range(len(every[0]))]
                read += [n for names in every for n in names]
            values.append((keys, [d[0] if len(d) == 1 else d for d in entries]))
        elif isinstance(source, list):
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
    every_run = run_names(pipeline, runs)
    for flag, value in (("--only", only), ("--from", start)):
        if value is not None and value not in names and value not in every_run:
            close = difflib.get_close_matches(value, every_run, n=3)
            hint = f"; runs like it: {', '.join(close)}" if close else f"; runs: {', '.join(every_run[:12])}{', ...' if len(every_run) > 12 else ''}"
            raise UserError(f"{flag} {value}: no such stage or run; stages: {', '.join(names)}{hint}")
    extra_by_stage = split_overrides(extra or [], {name: pipeline.stages[name].stage or name for name in names})
    for name, stage_overrides in extra_by_stage.items():
        for override in stage_overrides:  # one value for all of a stage's runs would make them the same run under other names
            key = override.split("=", 1)[0].strip()
            if key in pipeline.stages[name].sweep or (key == "seed" and runs[name][0].seed is not None):
                what = f"sweeps {key}" if key != "seed" else "runs once per seed"
                raise UserError(f"--set {override}: {name} {what}; change the pipeline file's {'sweep' if key != 'seed' else 'seeds'} instead")
    for override in extra or []:
        key = override.split("=", 1)[0]
        rewired = lambda stage: key in stage.inputs or (stage.rounds is not None and key in ("model.name_or_path", "data.train", "dpo.ref_model"))  # noqa: E731
        wired = [name for name in names if rewired(pipeline.stages[name]) and ":" not in key]
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
            values += [(keys_of(k), v) for k, v in {**pipeline.set, **stage.set}.items()]
            values += [(keys_of(k), v) for k, v in run.point.items()]
            if run.seed is not None:
                values.append((("seed",), run.seed))
            wired, read = wiring(name, kind, run, stage.inputs, runs, root, {n: s.rounds.count for n, s in pipeline.stages.items() if s.rounds})
            planned = [Planned(run.name, kind, Path(stage.recipe), values + wired, extra_by_stage[name], read)]
            if stage.rounds is not None:
                takes = lambda key: key.split("=", 1)[0].split(".", 1)[0] in schema_for("collect-prefs").model_fields  # noqa: E731
                collect_set = [(keys_of(k), v) for k, v in pipeline.set.items() if takes(k)]
                collect_overrides = [o for o in extra or [] if ":" not in o.split("=", 1)[0] and takes(o)]  # --set KEY=VALUE for every stage
                planned = round_steps(stage, run, planned[0], runs, root, collect_set, collect_overrides)
            for item in planned:
                step = Step(item.name, item.kind, item.recipe, root / item.name, item.values, item.overrides, {s: identity(root / s) for s in sorted(set(item.read))})
                step.stage = name
                forced = forced or start in (name, item.name)
                if only is not None and only not in (name, item.name):
                    step.action, step.reason = "skip", "--only"
                elif forced:
                    step.action, step.reason = "rerun", "--from"
                else:
                    step.action, step.reason = decide(step, smoke, steps)
                if step.action != "skip" and step.recipe_object is None:
                    step.recipe_object = step.load(smoke)  # a bad key or --set fails now, not hours later
                steps.append(step)
            if stage.rounds is not None:
                first_collect, first_dpo = steps[-len(planned)], steps[-len(planned) + 1]
                check_round_recipes(name, stage, first_collect.recipe_object or first_collect.load(smoke), first_dpo.recipe_object or first_dpo.load(smoke))
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


