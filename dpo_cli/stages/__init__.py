"""One module per subcommand; each reads top to bottom: model, data, step, the shared loop, final/."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def stage_runner(stage: str) -> Callable[[Any, Any], dict]:
    if stage == "pretrain":
        from dpo_cli.stages.pretrain import run_pretrain

        return run_pretrain
    if stage == "sft":
        from dpo_cli.stages.sft import run_sft

        return run_sft
    if stage == "collect-prefs":
        from dpo_cli.stages.collect_prefs import run_collect_prefs

        return run_collect_prefs
    if stage == "dpo":
        from dpo_cli.stages.dpo import run_dpo

        return run_dpo
    if stage == "rm-train":
        from dpo_cli.stages.rm_train import run_rm_train

        return run_rm_train
    if stage == "ppo":
        from dpo_cli.stages.ppo import run_ppo

        return run_ppo
    if stage == "compare":
        from dpo_cli.stages.compare import run_compare

        return run_compare
    raise KeyError(stage)
