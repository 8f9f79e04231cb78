"""Online / iterative DPO in a pipeline: a dpo stage with `rounds` runs as collect-prefs -> dpo per round,
each round starting from the last one's policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo_cli.pipeline.files import PipelineStage
from dpo_cli.pipeline.runs import Planned, Run, keys_of, read_runs


def round_names(run_name: str, count: int) -> list[str]:
    """The run dirs of an online stage's run, in order: NAME-roundR-prefs, NAME-roundR (run_name: the last round's)."""
    base = run_name.removesuffix(f"-round{count}")
    return [name for r in range(1, count + 1) for name in (f"{base}-round{r}-prefs", f"{base}-round{r}")]


def round_steps(stage: PipelineStage, run: Run, dpo: Planned, runs: dict[str, list[Run]], root: Path) -> list[Planned]:
    """An online stage's run as its rounds: collect-prefs samples the round's policy (the wired starting policy,
    then the last round's) and labels the pairs; dpo trains that policy on them (mixed with the offline pairs
    when given). `dpo` is the run as one dpo step, whose wiring the rounds rewrite."""
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
        collect_values = seeds + [(keys_of(k), v) for k, v in rounds.collect_set.items()] + labeller + [policy]
        planned.append(Planned(prefs, "collect-prefs", Path(rounds.collect), collect_values, [], [policy_name] + [one(s) for s in rounds.collect_inputs.values()]))
        train: Any = str(root / prefs)
        read = [*dpo.read, prefs, policy_name]
        if rounds.offline is not None:
            train = [{"path": str(root / prefs), "weight": 1 - rounds.offline_weight}, {"path": str(root / one(rounds.offline)), "weight": rounds.offline_weight}]
            read.append(one(rounds.offline))
        reference = [(("dpo", "ref_model"), start_dir)] if rounds.reference == "initial" else []
        planned.append(Planned(trained, dpo.kind, dpo.recipe, kept + [policy, (("data", "train"), train)] + reference, dpo.overrides, read))
        policy_name = trained
    return planned


