"""PNG plots, for people who would rather look than read numbers: a run's training curves, and the
comparison's frontier, over-optimisation, costs and curves."""

from __future__ import annotations

import io
import statistics
from pathlib import Path
from typing import Any

from dpo_cli.core.rundir import read_metrics
from dpo_cli.core.atomic import atomic_write_bytes
from dpo_cli.eval.comparison import upper_envelope
from dpo_cli.eval.stats import seed_interval


def plot_training(metrics: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """Train and eval loss by step, learning rate underneath; None when there is nothing to plot."""
    train = [m for m in metrics if m.get("split") is None and "loss" in m]
    evaluation = [m for m in metrics if m.get("split") == "eval" and "loss" in m]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    loss_axis.plot([m["step"] for m in train], [m["loss"] for m in train], label="train", linewidth=1.2)
    if evaluation:
        loss_axis.plot([m["step"] for m in evaluation], [m["loss"] for m in evaluation], "o-", label="eval")
    loss_axis.set_ylabel("loss")
    loss_axis.set_title(title)
    loss_axis.grid(alpha=0.3)
    loss_axis.legend()
    lr_axis.plot([m["step"] for m in train], [m.get("lr", 0.0) for m in train], color="tab:gray")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("optimizer step")
    lr_axis.grid(alpha=0.3)
    atomic_write_bytes(out, _png(figure))
    plt.close(figure)
    return out


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


def _frontier_points(result: dict[str, Any], members: list[str], key: str) -> list[tuple[float, float, float | None, float | None]]:
    """(KL, score, score low, score high) of the policies' final points and of their paths' points that
    were this comparison's own evaluation; a policy with seeds contributes means over its seeds (step by
    step), so more seeds do not mean more chances at a lucky maximum."""
    points = []
    score = f"{key}_score"
    for name in members:
        summary = result["policies"][name]
        if (summary.get("kl") or {}).get("mean") is not None and (summary.get(key) or {}).get("mean") is not None:
            points.append((summary["kl"]["mean"], summary[key]["mean"], summary[key].get("low"), summary[key].get("high")))
        paths = [c for p, c in zip(result.get("trajectories", {}).get(name, []), result["checkpoints"].get(name, [])) if p["same_evaluation"]]
        if len(paths) != summary["seeds"]:
            continue  # a seed evaluated otherwise (or not at all): no mean path
        by_step = [{c["step"]: c for c in path if c.get("kl") is not None and c.get(score) is not None} for path in paths]
        for step in sorted(set.intersection(*(set(steps) for steps in by_step))) if by_step else []:
            at_step = [steps[step] for steps in by_step]
            if len(at_step) == 1:
                points.append((at_step[0]["kl"], at_step[0][score], at_step[0].get(f"{score}_low"), at_step[0].get(f"{score}_high")))
            else:
                interval = seed_interval([c[score] for c in at_step])
                points.append((statistics.fmean(c["kl"] for c in at_step), interval["mean"], interval["low"], interval["high"]))
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
            for kl, score, low, high in envelope:  # each frontier point with its 95% interval
                if low is not None and high is not None:
                    axis.errorbar(kl, score, yerr=[[score - low], [high - score]], fmt="none", ecolor=colors[members[0]], alpha=0.6, capsize=2)
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
