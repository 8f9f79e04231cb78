"""The dpo-cli command line: parse flags and hand them to the runner (runner.py) or the pipeline; one line per error."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from dpo_cli import __version__
from dpo_cli.cli import tools
from dpo_cli.cli.options import (
    AllowDataOpt, DebugOpt, EvalOnlyOpt, FreshOpt, RecipeArg, ResumeFromOpt, RunDirOpt, SetOpt, SmokeOpt, StageOpt, guarded,
)  # fmt: skip
from dpo_cli.core import ui
from dpo_cli.core.errors import UserError
from dpo_cli.data.files import check_data_paths
from dpo_cli.core.recipe_loader import load_recipe, read_recipe_file, recipe_to_yaml, schema_for, stage_of
from dpo_cli.core.recipes import ALL_STAGES
from dpo_cli.runner import run_stage

app = typer.Typer(
    name="dpo-cli",
    help=(
        "Align language models with human preferences, from pretraining to RLHF and DPO.\n\n"
        "Each stage reads a YAML recipe and writes a run dir: recipe.yaml, metrics.jsonl, checkpoints/, final/, summary.json.\n\n"
        "Example: dpo-cli sft recipes/demo/sft.yaml --set train.max_steps=50"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

STAGE_HELP = {
    "pretrain": "Next-token training on raw text, from scratch (model.init + a trained tokenizer) or continued.",
    "sft": "Supervised fine-tuning on prompt/completion or chat messages; loss on completions only.",
    "collect-prefs": "Sample pairs of responses and have people, a reward model or a judge pick the better one.",
    "rm-train": "Train a reward model on preference pairs (Bradley-Terry).",
    "ppo": "RLHF: PPO against the reward model with a KL penalty to the reference.",
    "dpo": "Direct Preference Optimization on preference pairs.",
    "compare": "Compare aligned policies side by side: quality, KL, reward hacking and cost, with a report and plots.",
}
def _version(value: bool) -> None:
    if value:
        typer.echo(f"dpo-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """dpo-cli."""
    _quiet_libraries()
    ui.only_main_process(os.environ.get("RANK", "0") == "0")  # torchrun / accelerate launch: rank 0 speaks


STAGE_EXAMPLES = {
    "compare": "Example: dpo-cli compare recipes/demo/compare.yaml\n\n"
    "Writes RUN/report.md, RUN/report.json, frontier.png, costs.png and curves.png.",
    "collect-prefs": "Example: dpo-cli collect-prefs recipes/demo/collect-prefs.yaml\n\n"
    "Label by hand: dpo-cli collect-prefs RECIPE --set label.by=human --annotator alice\n\n"
    "Label in browsers, as a team: dpo-cli collect-prefs RECIPE --serve --annotators alice,bob,carol\n\n"
    "Every label is saved the moment it is given; the same command continues where labelling stopped.",
}


def _stage_command(stage: str) -> Callable[..., None]:
    def command(
        recipe: RecipeArg,
        run_dir: RunDirOpt = None,
        overrides: SetOpt = None,
        fresh: FreshOpt = False,
        resume_from: ResumeFromOpt = None,
        eval_only: EvalOnlyOpt = False,
        allow_data_change: AllowDataOpt = False,
        smoke: SmokeOpt = False,
        debug: DebugOpt = False,
    ) -> None:
        guarded(debug, lambda: run_stage(stage, recipe, run_dir, overrides or [], fresh, smoke, allow_data_change, resume_from, eval_only))

    command.__doc__ = f"{STAGE_HELP[stage]}\n\n" + STAGE_EXAMPLES.get(
        stage,
        f"Example: dpo-cli {stage} recipes/demo/{stage}.yaml --set train.max_steps=100\n\n"
        "A stopped run resumes from its newest checkpoint when started again with the same recipe; "
        "--resume-from step-N goes back to an earlier one.",
    )
    return command


def collect_prefs(
    recipe: RecipeArg,
    run_dir: RunDirOpt = None,
    overrides: SetOpt = None,
    annotator: Annotated[
        Optional[str], typer.Option("--annotator", help="Your name, for human labelling (default: $DPO_CLI_ANNOTATOR, $USER).")
    ] = None,
    serve: Annotated[bool, typer.Option("--serve", help="Label in browsers: print one secret link per annotator and an admin link, and serve until Ctrl-C.")] = False,
    host: Annotated[Optional[str], typer.Option("--host", help="With --serve: the address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option("--port", min=0, max=65535, help="With --serve: the port (default 8080; 0: any free one).")] = None,
    annotators: Annotated[Optional[str], typer.Option("--annotators", help="With --serve: the annotators' names, comma-separated (a,b,c).")] = None,
    fresh: FreshOpt = False,
    allow_data_change: AllowDataOpt = False,
    smoke: SmokeOpt = False,
    debug: DebugOpt = False,
) -> None:
    extra = [f"label.annotator={annotator}"] if annotator else []
    if serve:
        extra += ["label.by=human", "label.serve=true"]
    extra += [f"label.host={host}"] if host is not None else []
    extra += [f"label.port={port}"] if port is not None else []
    extra += ["label.annotators=" + json.dumps([name.strip() for name in annotators.split(",") if name.strip()])] if annotators is not None else []

    def run() -> None:
        if (host is not None or port is not None or annotators is not None) and not serve:
            raise UserError("--host, --port and --annotators go with --serve")
        run_stage("collect-prefs", recipe, run_dir, [*(overrides or []), *extra], fresh, smoke, allow_data_change)

    guarded(debug, run)


collect_prefs.__doc__ = f"{STAGE_HELP['collect-prefs']}\n\n{STAGE_EXAMPLES['collect-prefs']}"

for _stage in ALL_STAGES:  # in pipeline order
    app.command(_stage)(collect_prefs if _stage == "collect-prefs" else _stage_command(_stage))


@app.command("eval")
def evaluate(
    recipe: RecipeArg,
    run_dir: RunDirOpt = None,
    overrides: SetOpt = None,
    stage: StageOpt = None,
    fresh: FreshOpt = False,
    smoke: SmokeOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Evaluate a recipe's model on its eval data without training it: loss and perplexity for pretrain and sft,
    reward accuracy and margins for rm-train, DPO's metrics (TRL's names) for dpo. summary.json holds the same
    eval fields a training run writes; no final/ is written. The run dir is the recipe's with -eval.

    Example: dpo-cli eval recipes/demo/dpo.yaml --set model.name_or_path=runs/demo/dpo-beta-0.3-seed1 --set dpo.ref_model=runs/demo/sft

    Example: dpo-cli eval recipes/demo/sft.yaml --set data.eval=held-out.jsonl
    """

    def action() -> None:
        which = stage_of(recipe, read_recipe_file(recipe), stage)
        run_stage(which, recipe, run_dir, overrides or [], fresh, smoke, eval_only=True)

    guarded(debug, action)


@app.command()
def validate(
    recipe: RecipeArg,
    stage: StageOpt = None,
    overrides: SetOpt = None,
    smoke: SmokeOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Print the fully resolved recipe (every default filled in), or every error in it, including local data
    paths (data.train, data.eval) that do not exist.

    Example: dpo-cli validate recipes/demo/sft.yaml --set model.lora.r=8
    """

    def action() -> None:
        which = stage_of(recipe, read_recipe_file(recipe), stage)
        resolved = load_recipe(recipe, which, overrides or [], smoke)
        check_data_paths(recipe, resolved)
        typer.echo(recipe_to_yaml(resolved), nl=False)

    guarded(debug, action)


@app.command()
def pipeline(
    pipeline_file: Annotated[Path, typer.Argument(metavar="PIPELINE", help="The pipeline file: stage recipes and how outputs feed inputs.")],
    only: Annotated[Optional[str], typer.Option("--only", metavar="STAGE", help="Run this stage alone, all its seeds and sweep points, or one run of it (its inputs must be complete).")] = None,
    start: Annotated[Optional[str], typer.Option("--from", metavar="STAGE", help="Run this stage and every later one again, from scratch.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (what would run, what is up to date) and stop.")] = False,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Where the stages' run dirs go (default: the file's run_dir).")] = None,
    overrides: Annotated[
        Optional[list[str]],
        typer.Option("--set", metavar="[STAGE:]KEY=VALUE", help="Override a key in every stage, or with STAGE: in one (repeatable)."),
    ] = None,
    smoke: SmokeOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run the stages of a pipeline file in order; up-to-date stages are skipped, an interrupted one resumes.
    A stage can run once per seed (`seeds:` and `per_seed: true`) and over a sweep (`sweep: {dpo.beta: [0.1, 0.3]}`):
    each run has its own run dir, and compare reports each method over its seeds (docs/recipes.md, Pipelines).

    Example: dpo-cli pipeline recipes/demo/pipeline.yaml --dry-run

    Example: dpo-cli pipeline recipes/demo/pipeline.yaml --only dpo   (all of dpo's seeds and sweep points)

    Example: dpo-cli pipeline recipes/qwen2.5-0.5b/pipeline.yaml --set sft:data.train=my-chats.jsonl --set generation.temperature=0.8
    """
    from dpo_cli.pipeline import run_pipeline

    guarded(debug, lambda: run_pipeline(pipeline_file, only, start, dry_run, smoke, run_dir, overrides or []))


@app.command()
def score(
    model: Annotated[str, typer.Argument(metavar="RUN_OR_MODEL", help="An rm-train run dir, its final/, or any scalar sequence classifier.")],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Rows with prompt + response or prompt + completion, or preference pairs (prompt + chosen + rejected, or any layout dpo reads): "
            "a file (jsonl, json, csv, parquet), a folder or a save_to_disk folder.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The scored rows, as JSONL (an existing file is never overwritten).")] = Path("scores.jsonl"),
    column: Annotated[
        Optional[list[str]],
        typer.Option("--column", metavar="WANTED=THEIRS", help="Read a column under another name (repeatable), like data.columns: --column prompt=question"),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Rows per forward pass.")] = 16,
    max_length: Annotated[int, typer.Option("--max-length", min=8, help="Longest sequence in tokens (longer ones keep their end).")] = 2048,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run model code from the hub.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Score prompt/response (or prompt/completion) rows with a reward model; with preference pairs, both sides and the pairwise accuracy.

    Example: dpo-cli score runs/demo/rm --data runs/demo/collect-prefs/prefs.jsonl --out scored.jsonl

    Other column names: dpo-cli score runs/demo/rm --data qa.jsonl --column prompt=question --column response=answer
    """
    from dpo_cli.stages.score import parse_columns, score_file

    guarded(debug, lambda: score_file(model, data, out, batch_size, max_length, trust_remote_code, parse_columns(column or [])))


for _tool in (tools.export, tools.generate, tools.chat, tools.runs):
    app.command()(_tool)


@app.command()
def schema(
    stage: Annotated[str, typer.Argument(help=f"One of: {', '.join(ALL_STAGES)}.", show_default=False)],
    debug: DebugOpt = False,
) -> None:
    """Print the JSON Schema of a stage's recipe (for editors with a YAML language server).

    Example: dpo-cli schema sft > .sft.schema.json, then put
    `# yaml-language-server: $schema=.sft.schema.json` at the top of your recipe.
    """
    guarded(debug, lambda: typer.echo(json.dumps(schema_for(stage).model_json_schema(), indent=2)))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `dpo-cli schema sft | head` must not trace back
    app(prog_name="dpo-cli")


def _quiet_libraries() -> None:
    import logging
    import warnings

    for name in ("bitsandbytes", "huggingface_hub", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.checkpoint")
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hub_logging.set_verbosity_error()  # connection retries are summed up in our one error line
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

