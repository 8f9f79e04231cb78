"""The run lifecycle, below both the command line and the pipeline: the default run dir, the lock, the checks
that a run dir holds this recipe and this data, --fresh, running the stage on every process, and what a
failure leaves behind (a run holding work is kept and marked failed; one holding nothing is cleared).

    cli/, pipeline/  ->  runner.py  ->  stages/  ->  loop, models, data, losses, ...
"""

from __future__ import annotations

from pathlib import Path

from dpo_cli.core import ui
from dpo_cli.data.files import data_fingerprint, fingerprint_changes, with_hub_revisions
from dpo_cli.core.errors import RunInterrupted, UserError
from dpo_cli.core.recipe_loader import load_recipe, recipe_diff, recipe_to_dict, recipe_to_yaml, with_current_defaults
from dpo_cli.core.recipes import PLANNED_STAGES, RecipeBase
from dpo_cli.core.rundir import RunDir
from dpo_cli.core.atomic import disk_full


EVALUATING_STAGES = ("pretrain", "sft", "rm-train", "dpo")  # what `dpo-cli eval` / --eval-only runs


def default_run_dir(recipe: RecipeBase, recipe_path: Path, run_dir: Path | None, smoke: bool, eval_only: bool = False) -> Path:
    if run_dir is not None:
        return run_dir.expanduser().resolve()
    base = Path(recipe.run_dir) if recipe.run_dir else Path.cwd() / "runs" / recipe_path.stem
    base = base.with_name(base.name + "-eval") if eval_only else base
    return base.with_name(base.name + "-smoke") if smoke else base


def _mark_failed(run: RunDir, stage: str, status: str, message: str) -> None:
    summary = run.summary() or {}
    if summary.get("status") != "completed":
        run.write_summary({"stage": stage, "status": status, "error": message})


def run_stage(
    stage: str, recipe_path: Path, run_dir: Path | None, overrides: list[str], fresh: bool, smoke: bool, allow_data_change: bool = False,
    resume_from: str | None = None,
    eval_only: bool = False,
) -> None:
    """The command line's way in: load the recipe file with its --set overrides, then run it. `eval_only`
    evaluates the recipe's model on its eval data without an update (train.max_steps: 0), in RUN-eval."""
    if stage in PLANNED_STAGES:
        raise UserError(f"stage `{stage}` is not implemented yet")
    if resume_from is not None and fresh:
        raise UserError("--resume-from and --fresh exclude each other: one resumes a checkpoint, the other starts over")
    if eval_only and stage not in EVALUATING_STAGES:
        raise UserError(f"{stage} has no evaluation-only mode (it is for {', '.join(EVALUATING_STAGES)}); evaluate policies with compare")
    if eval_only and resume_from is not None:
        raise UserError("--resume-from: an evaluation-only run has no checkpoints to resume")
    recipe = load_recipe(recipe_path, stage, [*overrides, *(["train.epochs=null", "train.max_steps=0"] if eval_only else [])], smoke)
    run_recipe(stage, recipe, default_run_dir(recipe, recipe_path, run_dir, smoke, eval_only), fresh, allow_data_change, resume_from)


def run_recipe(
    stage: str, recipe: RecipeBase, path: Path, fresh: bool, allow_data_change: bool = False, resume_from: str | None = None
) -> None:
    """Prepare the run dir on the main process (lock, recipe check, --fresh), tell the others what it
    decided, and run the stage on every process."""
    from dpo_cli.core import distributed

    if getattr(recipe, "model", None) is not None:
        from dpo_cli.models.build import check_model_input

        check_model_input(recipe.model, "reward" if stage == "rm-train" else "causal-lm")
    recipe.run_dir = str(path)
    ui.only_main_process(distributed.is_main())
    if not distributed.is_main():
        verdict = distributed.broadcast(None)
        if verdict == "error":
            raise SystemExit(1)  # the main process reports why
        if verdict == "run":
            _execute(stage, recipe, RunDir(path), None)
        distributed.barrier()
        return
    told = False
    try:
        with RunDir.open(path) as run:
            saved = _prepare(run, recipe, fresh, allow_data_change, resume_from)
            told = distributed.broadcast("run" if saved is not False else "done") is not None
            if saved is not False:
                _execute(stage, recipe, run, saved)
    except BaseException:
        if not told:  # the others wait for a verdict: never leave them hanging
            distributed.broadcast("error")
        raise
    distributed.barrier()  # all leave the stage once the main process has written its outputs (pipelines read them next)


def _prepare(run: RunDir, recipe: RecipeBase, fresh: bool, allow_data_change: bool = False, resume_from: str | None = None) -> dict | None | bool:
    """Refuse a run dir of another recipe or (resuming) of other data, set later checkpoints aside for
    --resume-from, report a complete one (False), move an old run aside with --fresh, write the resolved
    recipe and the data's fingerprint. Returns the recipe the run dir held before (or None)."""
    resolved = recipe_to_dict(recipe)
    saved = run.saved_recipe()
    if saved is not None and not fresh:
        changed = recipe_diff(with_current_defaults(saved, type(recipe)), resolved)
        if changed:
            raise UserError(
                f"run dir {run.path} holds a run of a different recipe ({'; '.join(changed)}): "
                "use --fresh to start over (the old run is kept as RUN.prev-TIME) or choose another --run-dir"
            )
        resume_step = _sound_checkpoint(run, resume_from) if resume_from is not None else None
        if resume_step is None and run.is_complete() and not recipe.reopens_complete_run():
            ui.note(f"{run.path} is already complete (use --fresh to train again)")
            ui.summary_table(run.summary())
            return False
    if resume_from is not None and saved is None:
        raise UserError(f"--resume-from {resume_from}: {run.path} holds no run to resume")
    if run.has_content() and (fresh or saved is None):
        if saved is None and not fresh:
            raise UserError(f"run dir {run.path} is not empty and holds no dpo-cli run; choose another --run-dir")
        ui.note(f"--fresh: moved the previous run to {run.archive()}")
    data = getattr(recipe, "data", None)
    if data is not None:
        recorded = run.data_fingerprint()
        current = data_fingerprint(data, recorded)
        changes = fingerprint_changes(recorded, current) if recorded is not None and run.holds_work() else []
        if changes and not allow_data_change:
            raise UserError(
                f"run dir {run.path} was started on other data ({'; '.join(changes[:3])}): resuming would train on a mix; "
                "use --fresh to start over (the old run is kept), or --allow-data-change to go on with the new data (in a pipeline: --from STAGE)"
            )
        if changes:
            ui.note(f"--allow-data-change: going on with changed data ({'; '.join(changes[:3])})")
        run.write_data_fingerprint(current)
    if resume_from is not None:  # every check passed: only now is anything moved
        aside = run.set_aside_after(resume_step)
        ui.note(f"--resume-from: going on from step {resume_step}" + (f"; later checkpoints, final/ and the summary moved to {aside}" if aside else ""))
    run.write_recipe(recipe_to_yaml(recipe))
    run.clean_partial()
    return saved


def _sound_checkpoint(run: RunDir, wanted: str) -> int:
    """The step of --resume-from's checkpoint, checked against its manifest before anything is moved: a
    resume never silently falls back to an earlier step than the one asked for."""
    from dpo_cli.train.checkpoint import verify_manifest

    step = run.checkpoint_step(wanted)
    problem = verify_manifest(run.checkpoints_dir / f"step-{step}")
    if problem:
        raise UserError(f"--resume-from {wanted}: that checkpoint is damaged ({problem}); nothing was moved")
    return step


def _pin_hub_revisions(run: RunDir) -> None:
    """Hub datasets first downloaded by this stage: their commit goes into the run's fingerprint."""
    recorded = run.data_fingerprint()
    if recorded is None:
        return
    pinned = with_hub_revisions(recorded)
    if pinned != recorded:
        try:
            run.write_data_fingerprint(pinned)
        except OSError:
            pass  # a full disk: the commit stays unknown, which is never taken as a change


def _execute(stage: str, recipe: RecipeBase, run: RunDir, saved: dict | None) -> None:
    from dpo_cli.core import distributed, slurm
    from dpo_cli.stages import stage_runner

    try:
        try:
            stage_runner(stage)(recipe, run)
        finally:
            if distributed.is_main():
                _pin_hub_revisions(run)
    except RunInterrupted as exc:
        if distributed.is_main():
            _mark_failed(run, stage, "interrupted", str(exc))
            requeued = slurm.requeue(exc.signal_name, run.path)  # last: Slurm may end this job right away
            if requeued:
                ui.note(requeued)
        raise
    except BaseException as exc:
        full = disk_full(exc)
        if full is not None:
            exc = UserError(run.no_space_message(getattr(full, "filename", None)))
        if distributed.is_main():
            try:
                if run.holds_work():  # checkpoints, final/, labels, candidates: kept, marked failed, resumed by a rerun
                    _mark_failed(run, stage, "failed", str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
                else:
                    run.discard()  # nothing resumable was made: a corrected rerun starts clean
            except OSError:
                pass  # a full disk can refuse even the failure record: the run dir keeps what it had
        if isinstance(exc, UserError):
            raise exc from None
        raise
