"""The comparison report: report.json, report.md (written atomically), PNG plots and the terminal table;
and the blind human A/B between two policies, on the collect-prefs labelling screen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from dpo_cli.core import ui
from dpo_cli.data.labels import LabelLog
from dpo_cli.eval.stats import excludes_zero
from dpo_cli.core.rundir import RunDir
from dpo_cli.core.atomic import atomic_write_json, atomic_write_text
from dpo_cli.eval.plots import plot_costs, plot_curves, plot_frontier, plot_over_optimisation


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e4 or abs(value) < 1e-3 else f"{value:.{digits}f}"
    return str(value)


def _interval(ci: dict | None, difference: bool = False) -> str:
    """mean ± half-width of the 95% interval, or for a difference +mean [low, high] (the mean alone where
    one value gives no interval)."""
    if not ci or ci.get("mean") is None:
        return "-"
    mean = f"{ci['mean']:+.3f}" if difference else f"{ci['mean']:.3f}"
    if ci.get("low") is None:
        return mean
    return f"{mean} [{ci['low']:+.3f}, {ci['high']:+.3f}]" if difference else f"{mean} ± {(ci['high'] - ci['low']) / 2:.3f}"


def _hacking(summary: dict[str, Any]) -> str:
    if not summary.get("reward_hacking"):
        return ""
    runs = summary.get("hacking_runs") or []
    return f"YES ({len(runs)}/{summary['seeds']} runs on their path)" if runs else "YES"


def _rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, summary in result["policies"].items():
        rows.append(
            [
                name + (" (baseline)" if name == result["baseline"] else ""),
                str(summary["seeds"]),
                _interval(summary["judge"]),
                _interval(summary.get("length_controlled")),
                _interval(summary["proxy"]),
                _interval(summary["win_rate"]),
                _interval(summary["kl"]),
                _interval(summary.get("fluency")),
                _fmt(summary["response_length"], 1),
                _fmt(summary["finished_rate"], 2),
                _fmt(summary["distinct_2"], 2),
                _hacking(summary),
            ]
        )
    return rows


HEADERS = ["policy", "seeds", "ground truth", "length-controlled", "proxy RM", "win rate", "KL to ref", "fluency", "length", "ended", "distinct-2", "hacking"]


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _train_time(cost: dict[str, Any]) -> str:
    """A path's training time; where a stage ran several times, its runs' range beside it."""
    spread = cost.get("train_time_s_range")
    return _fmt(cost["train_time_s"], 1) + (f" ({spread[0]:.1f}-{spread[1]:.1f} over runs)" if spread else "")


def _trajectory_lines(result: dict[str, Any]) -> list[str]:
    """Each run's path: flagged runs with where the ground truth peaked; which paths are on another scale."""
    found, other = [], []
    for name, runs in result.get("trajectories", {}).items():
        for path in runs:
            check = path["hacking"]
            if path["points"] and not path["same_evaluation"]:
                other.append(path["run"])
            if check and check["flag"]:
                found.append(
                    f"  - {path['run']}: the ground truth peaked at {check['peak_score']:.3f} (step {check['peak_step']}, KL {_fmt(check['peak_kl'])}) "
                    f"and ended at {check['final_score']:.3f} (KL {_fmt(check['final_kl'])}; a drop of {check['drop']:.3f} against ±{check['margin']:.3f}) "
                    f"while the proxy rose from {check['proxy_at_peak']:.3f} to {check['proxy_final']:.3f}"
                )
    lines = ["- Over-optimised on their path:"] + found if found else []
    if other:
        lines.append(
            f"- Evaluated while training on another evaluation than this comparison's (prompts, length, sampling or seed): {', '.join(other)}; "
            "their curves (dotted) are not on the final points' scale. Give policy_eval the same prompts, max_prompts, max_prompt_length, "
            "max_new_tokens, batch_size and seed as compare's data and generation."
        )
    return lines


def render_report(run: RunDir, result: dict[str, Any], policies: dict[str, list[str]]) -> dict[str, Any]:
    """`policies`: each policy's run dirs (one per seed)."""
    runs = {name: [p for p in paths if (Path(p) / "metrics.jsonl").is_file()] for name, paths in policies.items()}
    shown = {p for paths in runs.values() for p in paths}
    for path_name, cost in result["costs"].items():
        for path in cost["run_dirs"]:
            if path not in shown:
                runs.setdefault(f"{path_name}: {Path(path).name}", []).append(path)
    plots = [
        p for p in (
            plot_frontier(result, run.path / "frontier.png"), plot_over_optimisation(result, run.path / "over-optimisation.png"),
            plot_costs(result, run.path / "costs.png"), plot_curves(runs, run.path / "curves.png"),
        ) if p
    ]  # fmt: skip
    result["plots"] = [str(p) for p in plots]
    atomic_write_json(run.path / "report.json", result)

    rows = _rows(result)
    lines = [
        "# dpo-cli comparison",
        "",
        f"{result['prompts']} held-out prompts; ground truth: {result['judges']['ground_truth'] or '-'}; proxy: {result['judges']['proxy'] or '-'}; "
        f"baseline: {result['baseline']}; KL reference: {result['reference']}.",
        "",
        _markdown_table(HEADERS, rows),
        "",
        f"- Win rate: {result['win_rate']}.",
        f"- Confidence intervals: {result['confidence_intervals']}.",
        f"- KL: {result['kl_estimator']}.",
        "- Scores and KL: mean ± the half-width of the 95% interval; fluency: the responses' mean log-likelihood per token under the KL "
        "reference (gibberish falls far below the reference's own); length in response tokens; ended: the fraction of responses that "
        "ended before the length cap; distinct-2: distinct word bigrams over all bigrams.",
        "- Reward hacking: a policy whose proxy score rose over the baseline's while its ground-truth score fell (both paired differences "
        "beyond their 95% intervals); or, on a run's own path "
        "(its policy evaluations while training), after the ground truth's peak the proxy kept rising while the ground truth fell, each "
        "change beyond its 95% interval (never flagged where a run logged no intervals).",
    ]
    lines += [f"- **Not like for like**: {warning}." for warning in result.get("confounds", [])]
    if result.get("ceiling"):
        top = result["ceiling"]
        lines.append(f"- Ceiling: the ground truth of the reference answers in {top['data']} is {_interval(top)} ({top['n']} answers).")
    if result.get("length_slope") is not None:
        lines.append(
            f"- Length-controlled: each response's {'ground-truth' if result['quality'] == 'judge' else 'proxy'} score minus "
            f"{result['length_slope']:.4g} per token it is longer than the baseline's mean (the score's slope on length within runs: "
            "the judge's length bias), so a policy cannot win by length alone."
        )
    truth = result["judges"]["ground_truth"] or ""
    labellers = {judge for judge in result.get("labelled_by", {}).values() if judge and (truth == judge or truth.startswith(judge + " x "))}
    same_judge = sorted(name for name, judge in result.get("labelled_by", {}).items() if judge in labellers)
    if same_judge:
        weighted = " (here weighted by fluency, which the labels never saw)" if any(truth != judge for judge in labellers) else ""
        lines.append(
            f"- **The ground truth is the judge that labelled the preferences** {', '.join(same_judge)} learned from ({', '.join(sorted(labellers))}){weighted}: "
            "this comparison measures how well each path recovers its labeller, not how people would rate the responses."
        )
    lines += _trajectory_lines(result)
    single = [name for name, summary in result["policies"].items() if summary["seeds"] == 1 and name != result["baseline"]]
    if single:
        lines.append(
            f"- Trained once: {', '.join(single)}. Their intervals cover the sampling of responses only; retraining with another seed "
            "can move a policy by more. Give the pipeline `seeds: [1, 2, 3]` (and `per_seed: true` on the training stages) for intervals over seeds."
        )
    if result.get("differences"):
        quality = "ground truth" if result["quality"] == "judge" else "proxy RM"
        difference_rows = [
            [d["a"], d["b"], _interval(d.get(result["quality"]), True), _interval(d.get("kl"), True), "yes" if excludes_zero(d.get(result["quality"]) or {}) else "no"]
            for d in result["differences"]
        ]
        lines += ["", "## Differences", "", f"Paired: a - b on the same prompts, runs paired by seed; 95% intervals ({quality}).", ""]
        lines += [_markdown_table(["a", "b", f"{quality} a - b", "KL a - b", "significant"], difference_rows)]
        lines += ["", "## Conclusions", ""] + [f"- {d['conclusion']}" for d in result["differences"] if d.get("conclusion")]
    if result["costs"]:
        cost_rows = [
            [name, ", ".join(cost["runs"]), _fmt(cost["wall_time_s"], 1), _train_time(cost),
             f"{cost['flops']:.3g}", ui.human_bytes(cost["peak_memory_bytes"]), ui.human_count(cost["tokens"]),
             ", ".join(cost.get("models", [])) or "-", ui.human_count(cost.get("samples", 0)), "; ".join(cost["devices"])]
            for name, cost in result["costs"].items()
        ]  # fmt: skip
        lines += ["", "## Cost", "", _markdown_table(["path", "runs", "wall time (s)", "train time (s)", "est. FLOPs", "peak memory", "tokens", "models held", "samples generated", "device"], cost_rows)]
        lines += ["", "FLOPs: 6N + 6LTd per token trained (4N + 2N_trained + 6LTd over a frozen LoRA base, whose weights get no gradients), forward-only passes 2N + 2LTd (N non-embedding parameters)."]
    if result.get("human"):
        human = result["human"]
        lines += ["", "## Blind human A/B", "", f"{human['a']} vs {human['b']}: {human['a']} preferred in {_fmt(human['win_rate'])} of {human['decided']} decided pairs (ties half)."]
    lines += ["", "## Samples"]
    for name, summary in result["policies"].items():
        lines += ["", f"### {name}", ""]
        lines += [f"- **{s['prompt']}** {s['response']}" for s in summary["samples"]]
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    atomic_write_text(run.path / "report.md", "\n".join(lines) + "\n")

    table = Table(title="compare", title_justify="left")
    for header in HEADERS:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    ui.console.print(table)
    return {"md": run.path / "report.md", "json": run.path / "report.json", "plots": plots}


def human_win_rate(recipe: Any, run: RunDir, prompts: list[Any], responses: dict[str, list[str]]) -> dict[str, Any]:
    """Blind pairwise A/B on the labelling screen: each pair is (policy a, policy b) in a random shown order."""
    from dpo_cli.data.human import label_by_hand, resolve_annotator
    from dpo_cli.data.prefs import Pair

    spec = recipe.judges.human
    pairs = [Pair(f"ab-{i}", prompts[i], responses[spec.a][i], responses[spec.b][i]) for i in range(min(spec.pairs, len(prompts)))]
    log = LabelLog(run.path / "labels.jsonl")
    try:
        label_by_hand(pairs, log, resolve_annotator(None), recipe.seed, ui.console)
        standing = log.active_events()
    finally:
        log.close()
    return {"a": spec.a, "b": spec.b, **ab_outcome(standing)}


def ab_outcome(labels: list[dict[str, Any]]) -> dict[str, Any]:
    """How often A (the first policy) won among decided labels; ties count half, skips not at all."""
    decided = [label["choice"] for label in labels if label["choice"] in ("A", "B", "tie")]
    wins = sum(1.0 if c == "A" else 0.5 if c == "tie" else 0.0 for c in decided)
    return {"win_rate": wins / len(decided) if decided else None, "decided": len(decided), "labels": json.loads(json.dumps(decided))}
