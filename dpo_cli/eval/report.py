"""The comparison report: report.json, report.md (written atomically), PNG plots and the terminal table;
and the blind human A/B between two policies, on the collect-prefs labelling screen."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from dpo_cli.core import ui
from dpo_cli.data.labels import LabelLog
from dpo_cli.eval.comparison import upper_envelope
from dpo_cli.eval.stats import excludes_zero
from dpo_cli.core.rundir import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_text, read_metrics


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


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _error_bar(ci: dict) -> list[list[float]] | None:
    if ci.get("low") is None:
        return None
    return [[ci["mean"] - ci["low"]], [ci["high"] - ci["mean"]]]


def _method_colors(result: dict[str, Any]) -> dict[str, str]:
    """One color per method (a sweep's points share it), else per policy."""
    groups = list((result.get("methods") or {}).values())
    by_group: dict[str, str] = {}
    for name in result["policies"]:
        leader = next((g[0] for g in groups if name in g), name)
        by_group.setdefault(leader, f"C{len(by_group) % 10}")
    return {name: by_group[next((g[0] for g in groups if name in g), name)] for name in result["policies"]}


def _frontier_groups(result: dict[str, Any]) -> dict[str, list[str]]:
    """What gets a frontier line: each method (a sweep), and each other policy trained with several seeds."""
    groups = dict(result.get("methods") or {})
    grouped = {name for members in groups.values() for name in members}
    groups.update({name: [name] for name, summary in result["policies"].items() if summary["seeds"] > 1 and name not in grouped})
    return groups


def _frontier_points(result: dict[str, Any], members: list[str], key: str) -> list[tuple[float, float]]:
    """(KL, score) of the policies' final points (means over seeds) and of every point of their paths that
    was this comparison's own evaluation."""
    points = []
    for name in members:
        summary = result["policies"][name]
        if (summary.get("kl") or {}).get("mean") is not None and (summary.get(key) or {}).get("mean") is not None:
            points.append((summary["kl"]["mean"], summary[key]["mean"]))
        for path, checkpoints in zip(result.get("trajectories", {}).get(name, []), result["checkpoints"].get(name, [])):
            if path["same_evaluation"]:
                points += [(c["kl"], c[f"{key}_score"]) for c in checkpoints if c.get("kl") is not None and c.get(f"{key}_score") is not None]
    return points


def plot_frontier(result: dict[str, Any], out: Path) -> Path:
    """Ground-truth score against KL to the reference, every policy (with 95% intervals) and the
    evaluations logged during training: the reward-KL frontier of the DPO paper."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "judge" if result["judges"]["ground_truth"] else "proxy"
    figure, axis = plt.subplots(figsize=(10.5, 5.5))
    colors = _method_colors(result)
    for name, summary in result["policies"].items():
        color = colors[name]
        paths = result.get("trajectories", {}).get(name) or []
        for seed, checkpoints in enumerate(result["checkpoints"].get(name, [])):
            points = [c for c in checkpoints if c.get("kl") is not None and c.get(f"{key}_score") is not None]
            if points:
                same = seed < len(paths) and paths[seed]["same_evaluation"]
                label = (f"{name} during training" + ("" if same else " (another evaluation)")) if seed == 0 else None
                axis.plot([p["kl"] for p in points], [p[f"{key}_score"] for p in points], "-" if same else ":", color=color, alpha=0.4, marker=".", label=label)
        if summary["seeds"] > 1:  # each seed's run, faint, around the mean over seeds
            runs = [r for r in summary["per_seed"] if r["kl"] and r[key] and r["kl"]["mean"] is not None and r[key]["mean"] is not None]
            axis.plot([r["kl"]["mean"] for r in runs], [r[key]["mean"] for r in runs], "x", color=color, alpha=0.5)
        score, kl = summary[key], summary["kl"]
        if score and score["mean"] is not None and kl and kl["mean"] is not None:
            axis.errorbar(
                kl["mean"], score["mean"], xerr=_error_bar(kl), yerr=_error_bar(score), fmt="o", color=color, capsize=3,
                label=name + (f" ({summary['seeds']} seeds)" if summary["seeds"] > 1 else ""),
            )  # fmt: skip
    for method, members in _frontier_groups(result).items():
        envelope = upper_envelope(_frontier_points(result, members, key))
        if len(envelope) > 1:
            axis.plot([p[0] for p in envelope], [p[1] for p in envelope], "-", color=colors[members[0]], linewidth=2.5, alpha=0.8, label=f"{method}: frontier")
    axis.set_xscale("symlog", linthresh=1.0)  # an over-optimised run's KL is two orders above the rest
    axis.set_xlim(left=-0.2)  # KL is not negative; a wide interval over few seeds would stretch the axis
    axis.set_xlabel("KL to the reference (nats per response; log scale past 1)")
    axis.set_ylabel("ground-truth score" if key == "judge" else "proxy reward-model score")
    axis.set_title("reward vs KL frontier (95% intervals; x: each seed's run; thick: a method's upper envelope)", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    atomic_write_bytes(out, _png(figure))
    plt.close(figure)
    return out


def plot_over_optimisation(result: dict[str, Any], out: Path) -> Path | None:
    """Ground truth and proxy along each run's path against sqrt(KL) (Gao et al.'s d): where the proxy
    climbs on while the ground truth turns down, the policy is gaming the proxy."""
    lines = []
    for index, (name, runs) in enumerate(result["checkpoints"].items()):
        for seed, points in enumerate(runs):
            points = [p for p in points if p.get("kl") is not None and p.get("judge_score") is not None and p.get("proxy_score") is not None]
            if len(points) > 1:
                lines.append((f"C{index}", name if seed == 0 else None, points))
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (gold_axis, proxy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for color, label, points in lines:
        distance = [max(p["kl"], 0.0) ** 0.5 for p in points]
        gold_axis.plot(distance, [p["judge_score"] for p in points], "-", marker=".", color=color, label=label, alpha=0.7)
        proxy_axis.plot(distance, [p["proxy_score"] for p in points], "-", marker=".", color=color, label=label, alpha=0.7)
    for axis, title in ((gold_axis, "ground truth"), (proxy_axis, "proxy reward model")):
        axis.set_xlabel("sqrt(KL to the reference)")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    gold_axis.legend(fontsize=8)
    figure.suptitle("over-optimisation: the scores along each run's path (Gao et al. 2022)")
    atomic_write_bytes(out, _png(figure))
    plt.close(figure)
    return out


def plot_costs(result: dict[str, Any], out: Path) -> Path | None:
    if not result["costs"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["costs"])
    most = max((result["costs"][n]["flops"] for n in names), default=0.0)
    unit, scale = next(((u, f) for u, f in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)) if most >= f), ("FLOP", 1.0))
    panels = [
        ("train_time_s", "training time (s)", 1.0),
        ("flops", f"estimated training compute ({unit})", scale),
        ("peak_memory_bytes", "peak memory (GiB)", 2**30),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(11, 3.8))
    for axis, (key, label, scale) in zip(axes, panels):
        values = [result["costs"][n][key] / scale for n in names]
        bars = axis.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        axis.bar_label(bars, fmt="%.3g", fontsize=8)
        axis.set_title(label, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle("what each training path cost")
    atomic_write_bytes(out, _png(figure))
    plt.close(figure)
    return out


def plot_curves(runs: dict[str, list[str]], out: Path) -> Path | None:
    """The main training curve of every run: loss, or mean reward for ppo; a policy's seeds share a panel."""
    curves = {}
    for name, paths in runs.items():
        for path in paths:
            metrics = [m for m in read_metrics(Path(path) / "metrics.jsonl") if m.get("split") is None]
            key = "reward" if metrics and "reward" in metrics[0] else "loss"
            points = [(m["step"], m[key]) for m in metrics if key in m]
            if points:
                curves.setdefault(name, (key, []))[1].append(points)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(curves))
    rows = (len(curves) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, (name, (key, seeds)) in zip(axes.flat, curves.items()):
        for points in seeds:
            axis.plot([p[0] for p in points], [p[1] for p in points], alpha=1.0 if len(seeds) == 1 else 0.6)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("step (ppo: iteration)")
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(curves) :]:
        axis.axis("off")
    atomic_write_bytes(out, _png(figure))
    plt.close(figure)
    return out


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
        "(its policy evaluations while training), the proxy kept rising after the ground truth's peak while the ground truth fell from it by "
        "more than the 95% interval of the drop.",
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
             f"{cost['flops']:.3g}", ui.human_bytes(cost["peak_memory_bytes"]), ui.human_count(cost["tokens"]), "; ".join(cost["devices"])]
            for name, cost in result["costs"].items()
        ]  # fmt: skip
        lines += ["", "## Cost", "", _markdown_table(["path", "runs", "wall time (s)", "train time (s)", "est. FLOPs", "peak memory", "tokens", "device"], cost_rows)]
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
