"""What else differs between compared policies besides the method: a difference in score is the method's
only when the runs share their parametrisation, the length they were trained to answer in, and a comparable
budget. Pure: each run's saved recipe and summary in, one warning per confound out."""

from __future__ import annotations

from typing import Any

from dpo_cli.eval.costs import estimate_flops

BUDGET_RATIO = 4.0  # training compute further apart than this is called out


def parametrisation(recipe: dict[str, Any]) -> str:
    """How a run trained its weights: all of them, or a LoRA adapter (over a 4-bit base)."""
    model = recipe.get("model") or {}
    lora = model.get("lora")
    if not lora:
        return "full weights"
    return f"{'4-bit ' if model.get('quantization') is not None else ''}LoRA r={lora.get('r')}"


def training_length(recipe: dict[str, Any]) -> int | None:
    """The longest response a run was trained on its own samples with (ppo); None for offline methods."""
    if recipe.get("stage") != "ppo":
        return None
    return (recipe.get("generation") or {}).get("max_new_tokens")


def confounds(runs: dict[str, tuple[dict[str, Any], dict[str, Any]]], max_new_tokens: int, budgets: dict[str, float] | None = None) -> list[str]:
    """`runs`: policy -> (its first run's saved recipe, its summary), for the trained policies (dpo, ppo, ...)
    only; `max_new_tokens`: the evaluation's length cap; `budgets`: policy -> training FLOPs where the run's own
    summary tells only part (online DPO's last round: the rounds before it trained the model it started from)."""
    warnings = []
    kinds = {name: parametrisation(recipe) for name, (recipe, _) in runs.items()}
    if len(set(kinds.values())) > 1:
        warnings.append("they train different weights (" + "; ".join(f"{n}: {k}" for n, k in kinds.items()) + "): a difference may be the parametrisation's")
    lengths = {name: training_length(recipe) for name, (recipe, _) in runs.items()}
    other = {name: n for name, n in lengths.items() if n is not None and n != max_new_tokens}
    if other:
        warnings.append(
            "trained on responses of another length than evaluated (" + "; ".join(f"{n}: {k} tokens" for n, k in other.items())
            + f"; evaluated at {max_new_tokens}): a difference may be the length's"
        )
    flops = {name: estimate_flops(summary["compute"]) for name, (_, summary) in runs.items() if summary.get("compute")}
    flops.update({name: value for name, value in (budgets or {}).items() if name in flops})
    if len(flops) > 1 and min(flops.values()) > 0 and max(flops.values()) / min(flops.values()) > BUDGET_RATIO:
        low, high = min(flops, key=flops.get), max(flops, key=flops.get)
        warnings.append(
            f"their training budgets differ by {flops[high] / flops[low]:.1f}x in estimated compute ({high}: {flops[high]:.3g} FLOPs, "
            f"{low}: {flops[low]:.3g}): a difference may be the budget's"
        )
    return warnings
