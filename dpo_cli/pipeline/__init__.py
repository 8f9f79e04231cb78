"""`dpo-cli pipeline`: the stage recipes of both paths from one file, outputs feeding inputs, run in order.

A stage is skipped when its run dir is complete, its resolved recipe is unchanged and its inputs are the
same runs as last time (identified by their summary.json); re-run from scratch (the old run moved aside)
when its recipe or an input changed; resumed from its checkpoint when it was interrupted.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from dpo_cli.core import ui
from dpo_cli.core.errors import UserError
from dpo_cli.core.atomic import atomic_write_json
from dpo_cli.core.rundir import RunDir
from dpo_cli.pipeline.files import PipelineFile, PipelineStage, RoundsSection, load_pipeline, order
from dpo_cli.pipeline.plan import Step, expand, plan, print_plan, run_names, split_overrides
from dpo_cli.pipeline.runs import identity
from dpo_cli.runner import run_recipe

__all__ = ["PipelineFile", "PipelineStage", "RoundsSection", "Step", "expand", "load_pipeline", "order", "plan", "run_names", "run_pipeline", "split_overrides"]


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
