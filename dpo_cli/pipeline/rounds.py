"""Online / iterative DPO in a pipeline: a dpo stage with `rounds` runs as collect-prefs -> dpo per round,
each round starting from the last one's policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo_cli.pipeline.files import PipelineStage
from dpo_cli.core.errors import UserError
from dpo_cli.core.recipe_loader import Value
from dpo_cli.pipeline.runs import Planned, Run, keys_of, read_runs


def round_names(run_name: str, count: int) -> list[str]:
    """The run dirs of an online stage's run, in order: NAME-roundR-prefs, NAME-roundR (run_name: the last round's)."""
    base = run_name.removesuffix(f"-round{count}")
    return [name for r in range(1, count + 1) for name in (f"{base}-round{r}-prefs", f"{base}-round{r}")]


def round_steps(stage: PipelineStage, run: Run, dpo: Planned, runs: dict[str, list[Run]], root: Path, collect_values: list[Value], collect_overrides: list[str]) -> list[Planned]:
    """An online stage's run as its rounds: collect-prefs samples the round's policy (the wired starting policy,
    then the last round's) and labels the pairs; dpo trains that policy on them (mixed with the offline pairs
    when given). `dpo` is the run as one dpo step, whose wiring the rounds rewrite; `collect_values` and
    `collect_overrides`: the pipeline's `set` and the command line's --set that reach a collect-prefs recipe."""
    rounds = stage.rounds
    assert rounds is not None
    one = lambda source: read_runs(run, runs[source])[0].name  # noqa: E731  # the source's run of this seed
    start_name = one(stage.inputs["model.name_or_path"])  # type: ignore[arg-type]
    start_dir = str(root / start_name)
    seeds = [value for value in dpo.values if value[0] == ("seed",)]
    labeller = [(keys_of(key), str(root / one(source))) for key, source in rounds.collect_inputs.items()]
    rewired = (("model", "name_or_path"), ("data", "train"), ("dpo", "ref_model"))
    kept = [value for value in dpo.values if value[0] not in rewired]
    planned: list[Planned] = []
    policy_name = start_name
    names = round_names(run.name, rounds.count)
    for prefs, trained in zip(names[::2], names[1::2]):
        policy = (("model", "name_or_path"), str(root / policy_name))
        values = collect_values + seeds + [(keys_of(k), v) for k, v in rounds.collect_set.items()] + labeller + [policy]
        planned.append(Planned(prefs, "collect-prefs", Path(rounds.collect), values, collect_overrides, [policy_name] + [one(s) for s in rounds.collect_inputs.values()]))
        train: Any = str(root / prefs)
        read = [*dpo.read, prefs, policy_name]
        if rounds.offline is not None:
            train = [{"path": str(root / prefs), "weight": 1 - rounds.offline_weight}, {"path": str(root / one(rounds.offline)), "weight": rounds.offline_weight}]
            read.append(one(rounds.offline))
        # round: the round's own starting policy (no separate model: under LoRA the adapter switched off);
        # initial: the stage's starting policy, which round 1 starts from anyway
        reference = [(("dpo", "ref_model"), start_dir if rounds.reference == "initial" and policy_name != start_name else None)]
        planned.append(Planned(trained, dpo.kind, dpo.recipe, kept + [policy, (("data", "train"), train)] + reference, dpo.overrides, read))
        policy_name = trained
    return planned




def check_round_recipes(name: str, stage: PipelineStage, collect: Any, dpo: Any) -> None:
    """What only the two loaded recipes of a round can tell (a CollectPrefsRecipe and a DpoRecipe), checked
    at planning rather than after a round has sampled."""
    where = f"stages.{name}.rounds.collect"
    if collect.collect.source != "generate" or collect.label.by == "human":
        raise UserError(f"{where}: each round samples its policy and labels the samples itself: collect.source: generate, label.by: judge or reward-model")
    if collect.collect.mode == "thumbs" and dpo.dpo.loss != "kto":
        raise UserError(f"{where}: collect.mode: thumbs writes unpaired examples, which only dpo.loss: kto trains on (the stage's loss is {dpo.dpo.loss})")
    if collect.collect.mode == "thumbs" and stage.rounds is not None and stage.rounds.offline is not None:
        raise UserError(f"stages.{name}.rounds.offline: the rounds write unpaired examples (collect.mode: thumbs); a mixture needs one layout: drop offline")
