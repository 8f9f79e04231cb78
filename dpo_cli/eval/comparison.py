"""From evaluations to what the comparison may conclude: each policy (one run, or one run per training seed)
summarised with intervals over seeds where it has them, the paired differences between policies, the
sentences those allow, and the reward-hacking flag. Pure: lists of `PolicyEval` in, dicts out."""

from __future__ import annotations

import math
import statistics
from itertools import combinations
from typing import Any

from dpo_cli.eval.evaluation import PolicyEval
from dpo_cli.eval.stats import across_runs, conclusion, excludes_zero, paired_difference, win_rate_interval

# the scores a policy's summary and the differences are about: report key -> PolicyEval field
SCORES = {"judge": "judge_scores", "proxy": "proxy_scores", "kl": "kl", "fluency": "fluency"}


def _per_run(runs: list[PolicyEval], field: str) -> list[list[float | None]]:
    return [getattr(run, field) for run in runs]


def _mean_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def quality_key(runs: list[PolicyEval]) -> str:
    """What "better" means in this comparison: the ground-truth judge, else the proxy reward model."""
    return "judge" if runs[0].judge_scores else "proxy"


def policy_summary(runs: list[PolicyEval], baseline: list[PolicyEval]) -> dict[str, Any]:
    """One policy: its scores and KL (one run: intervals over prompts; several seeds: over seeds), its win
    rate against the baseline, and each run's own summary."""
    per_seed = [run.summary() for run in runs]
    quality = SCORES[quality_key(baseline)]
    summary: dict[str, Any] = {
        "seeds": len(runs),
        **{key: across_runs(_per_run(runs, field)) if getattr(runs[0], field) else None for key, field in SCORES.items()},
        "win_rate": win_rate_interval(_per_run(runs, quality), _per_run(baseline, quality)),
    }
    for key in ("response_length", "finished_rate", "distinct_1", "distinct_2"):
        summary[key] = _mean_of([s[key] for s in per_seed])
    summary["per_seed"] = [{k: v for k, v in s.items() if k in (*SCORES, "response_length")} for s in per_seed]
    return summary


def length_slope(evaluations: dict[str, list[PolicyEval]], field: str) -> float | None:
    """How much the score rises per response token within a run (fixed effects: each run's responses
    centred on its own means, pooled): the judge's length bias, not a policy's quality."""
    covariance = variance = 0.0
    for run in (r for runs in evaluations.values() for r in runs):
        pairs = [(float(n), s) for n, s in zip(run.lengths, getattr(run, field)) if s is not None]
        if len(pairs) < 2:
            continue
        mean_n, mean_s = statistics.fmean(n for n, _ in pairs), statistics.fmean(s for _, s in pairs)
        covariance += sum((n - mean_n) * (s - mean_s) for n, s in pairs)
        variance += sum((n - mean_n) ** 2 for n, _ in pairs)
    return covariance / variance if variance > 0 else None


def length_controlled(runs: list[PolicyEval], field: str, slope: float, length: float) -> dict[str, Any]:
    """The scores as if every response had `length` tokens (the baseline's mean), by the within-run slope."""
    adjusted = [[s - slope * (n - length) if s is not None else None for n, s in zip(run.lengths, getattr(run, field))] for run in runs]
    return across_runs(adjusted)


def differences(evaluations: dict[str, list[PolicyEval]], baseline: str | None = None) -> list[dict[str, Any]]:
    """Every pair of policies (in the order given): a - b on each score, runs paired by seed, and the
    sentence the quality difference allows. A policy trained once pairs with every seed of another; that
    covers the other's retraining noise only, so no direction is claimed for it (the baseline, the fixed
    starting point every method trains from, excepted)."""
    names = list(evaluations)
    quality = quality_key(evaluations[names[0]])
    found = []
    for a, b in combinations(names, 2):
        pair: dict[str, Any] = {"a": a, "b": b}
        for key, field in SCORES.items():
            if getattr(evaluations[a][0], field) and getattr(evaluations[b][0], field):
                pair[key] = paired_difference(_per_run(evaluations[a], field), _per_run(evaluations[b], field))
        once = next((x for x, y in ((a, b), (b, a)) if x != baseline and len(evaluations[x]) == 1 and len(evaluations[y]) > 1), None)
        if quality in pair:
            pair["conclusion"] = conclusion(a, b, pair[quality], "ground truth" if quality == "judge" else "proxy reward", once=once)
        found.append(pair)
    return found


def upper_envelope(points: list[tuple]) -> list[tuple]:
    """A method's frontier from its (KL, score, ...) points: by KL, each point that scores above every
    point at a lower or equal KL (what the method offers at each KL budget); extra fields ride along."""
    envelope: list[tuple] = []
    for point in sorted(points, key=lambda p: (p[0], -p[1])):
        if not envelope or point[1] > envelope[-1][1]:
            envelope.append(point)
    return envelope


def reward_hacking(evaluations: dict[str, list[PolicyEval]], baseline: str) -> dict[str, bool]:
    """A policy whose proxy score rose over the baseline's while its ground-truth score fell, each by a
    paired difference whose 95% interval excludes zero (a flag on noise would cry wolf)."""
    flags = {}
    for name, runs in evaluations.items():
        base = evaluations[baseline]
        if name == baseline or not runs[0].judge_scores or not runs[0].proxy_scores:
            flags[name] = False
            continue
        proxy = paired_difference(_per_run(runs, "proxy_scores"), _per_run(base, "proxy_scores"))
        truth = paired_difference(_per_run(runs, "judge_scores"), _per_run(base, "judge_scores"))
        flags[name] = excludes_zero(proxy) and proxy["mean"] > 0 and excludes_zero(truth) and truth["mean"] < 0
    return flags


def _half_width(point: dict[str, Any], key: str) -> float | None:
    low, high = point.get(f"{key}_low"), point.get(f"{key}_high")
    return (high - low) / 2 if low is not None and high is not None else None


def trajectory_hacking(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Over-optimisation on a run's own path (Gao et al. 2022): after the ground truth's peak the proxy kept
    rising while the ground truth fell from the peak, each change beyond its 95% interval (the two
    evaluations' half-widths in quadrature). `points`: the run's policy_eval lines in step order, each with
    judge_score and proxy_score and their _low / _high. None where a score is missing; never flagged where
    the intervals are (lines of an older dpo-cli)."""
    usable = [p for p in points if p.get("judge_score") is not None and p.get("proxy_score") is not None]
    if len(usable) < 2:
        return None
    peak = max(usable, key=lambda p: p["judge_score"])
    final = usable[-1]
    drop = peak["judge_score"] - final["judge_score"]
    rise = final["proxy_score"] - peak["proxy_score"]
    halves = [_half_width(p, key) for p in (peak, final) for key in ("judge_score", "proxy_score")]
    known = all(h is not None for h in halves)
    margin = math.hypot(halves[0], halves[2]) if known else None
    proxy_margin = math.hypot(halves[1], halves[3]) if known else None
    return {
        "flag": known and final is not peak and drop > margin and rise > proxy_margin,
        "peak_step": peak.get("step"), "peak_kl": peak.get("kl"), "peak_score": peak["judge_score"], "proxy_at_peak": peak["proxy_score"],
        "final_step": final.get("step"), "final_kl": final.get("kl"), "final_score": final["judge_score"], "proxy_final": final["proxy_score"],
        "drop": drop, "margin": margin, "proxy_rise": rise, "proxy_margin": proxy_margin,
    }  # fmt: skip
