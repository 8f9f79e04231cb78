"""What every command of the command line shares: its common flags and the rule that bad input is one line
and a non-zero exit (tracebacks only with --debug)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from dpo_cli.core import ui
from dpo_cli.core.errors import RunInterrupted, UserError

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "SIGUSR1": 138}

RecipeArg = Annotated[Path, typer.Argument(metavar="RECIPE", help="The stage's YAML recipe.", show_default=False)]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", help="Run directory (default: the recipe's run_dir, else runs/RECIPE-NAME).")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe key, value parsed as YAML (repeatable): --set train.learning_rate=1e-4"),
]
FreshOpt = Annotated[bool, typer.Option("--fresh", help="Start over in an existing run dir (the old run is moved to RUN.prev-TIME).")]
AllowDataOpt = Annotated[
    bool, typer.Option("--allow-data-change", help="Resume although data.train/data.eval changed since the run started (said in the run's notes).")
]
ResumeFromOpt = Annotated[
    Optional[str],
    typer.Option("--resume-from", metavar="step-N", help="Resume from this checkpoint (or its path); later checkpoints and final/ are moved aside, never deleted."),
]
EvalOnlyOpt = Annotated[
    bool, typer.Option("--eval-only", help="Evaluate the recipe's model on its eval data without an update (run dir RUN-eval; pretrain, sft, rm-train, dpo).")
]
SmokeOpt = Annotated[bool, typer.Option("--smoke", help="Cap steps, rows and lengths so the recipe runs end to end in seconds (run dir RUN-smoke).")]
StageOpt = Annotated[Optional[str], typer.Option("--stage", help="The recipe's stage (default: its `stage:` key or its file name).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show Python tracebacks.", envvar="DPO_CLI_DEBUG")]


def guarded(debug: bool, action: Callable[[], None]) -> None:
    """Bad input is one readable line and a non-zero exit; tracebacks only with --debug."""
    try:
        action()
    except UserError as exc:
        if debug:
            raise
        ui.error(str(exc))
        raise typer.Exit(2 if "not implemented yet" in str(exc) else 1) from None
    except RunInterrupted as exc:
        ui.note(f"{exc}. Run the same command again to resume.")
        raise typer.Exit(EXIT_CODES.get(exc.signal_name, 1)) from None
    except KeyboardInterrupt:
        ui.error("interrupted")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:  # an internal error: still one line unless --debug
        if debug:
            raise
        ui.error(f"{type(exc).__name__}: {exc} (run again with --debug for the traceback)")
        raise typer.Exit(1) from None
