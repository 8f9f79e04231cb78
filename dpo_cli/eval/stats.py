"""The statistics of the comparison, as pure functions of lists of numbers: intervals over prompts (one
training run), intervals over training seeds (the noise that matters when a method is retrained), paired
differences between methods, win rates, and the sentence each difference allows.

An interval is a dict {mean, low, high, n, over}: `over` says what varies ("prompts" or "seeds"); low and
high are None where one value gives no interval.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

Interval = dict[str, Any]

# Student's t, two-sided 95% (the 0.975 quantile), for 1-30 degrees of freedom.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # fmt: skip
Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (the table, then the Cornish-Fisher
    expansion around the normal quantile, good to 1e-3 past 30)."""
    if df < 1:
        raise ValueError("t975 needs at least one degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _finite(values: list[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def mean_ci(values: list[float | None], over: str = "prompts") -> Interval:
    """Mean and its 95% interval from many values (responses to prompts): normal approximation,
    mean +- 1.96 s / sqrt(n)."""
    values = _finite(values)
    if not values:
        return {"mean": None, "low": None, "high": None, "n": 0, "over": over}
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1, "over": over}
    half = Z975 * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values), "over": over}


def seed_interval(values: list[float | None], over: str = "seeds") -> Interval:
    """Mean and its 95% interval from a few values (one per training seed): Student's t with n - 1 degrees
    of freedom, mean +- t s / sqrt(n). Few seeds give wide intervals, as they should."""
    values = _finite(values)
    if len(values) < 2:
        return {**mean_ci(values, over), "n": len(values)}
    mean = statistics.fmean(values)
    half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values), "over": over}


def _outcome(score: float | None, baseline: float | None) -> float | None:
    if score is None or baseline is None:
        return None
    return 1.0 if score > baseline else 0.5 if score == baseline else 0.0


def win_outcomes(scores: list[float | None], baseline: list[float | None]) -> list[float]:
    """Per prompt: 1 where the policy's response scores above the baseline's, 0.5 on a tie, 0 below."""
    return [o for o in (_outcome(a, b) for a, b in zip(scores, baseline)) if o is not None]


def win_rate(scores: list[float | None], baseline: list[float | None]) -> float | None:
    """Fraction of prompts where the policy's response scores above the baseline's; ties count half."""
    outcomes = win_outcomes(scores, baseline)
    return statistics.fmean(outcomes) if outcomes else None


def _per_prompt_means(per_run: list[list[float | None]]) -> list[float | None]:
    """Each prompt's value averaged over the runs (all evaluated on the same prompts, in the same order)."""
    columns = zip(*per_run)
    return [statistics.fmean(v) if (v := _finite(list(column))) else None for column in columns]


def widened(over_seeds: Interval, per_prompt: list[float | None]) -> Interval:
    """An interval over seeds, widened by the prompts' own sampling error: the seeds share the prompts, so
    the spread between seeds leaves out how much another draw of prompts would move every run together.
    The two half-widths add in quadrature (the prompts' from the per-prompt means over seeds)."""
    prompts = mean_ci(per_prompt)
    if over_seeds.get("low") is None or prompts.get("low") is None:
        return over_seeds
    half = math.hypot(over_seeds["high"] - over_seeds["mean"], prompts["high"] - prompts["mean"])
    return {**over_seeds, "low": over_seeds["mean"] - half, "high": over_seeds["mean"] + half}


def across_runs(per_run: list[list[float | None]]) -> Interval:
    """One policy trained with several seeds, each run's values on the same prompts: the mean over runs with
    an interval over seeds (widened by the prompts'); one run: the interval over its prompts."""
    if len(per_run) == 1:
        return mean_ci(per_run[0])
    return widened(seed_interval([statistics.fmean(v) if v else None for v in (_finite(run) for run in per_run)]), _per_prompt_means(per_run))


def run_pairs(a_runs: int, b_runs: int) -> list[tuple[int, int]]:
    """How two policies' runs pair up: by seed (the i-th of each) when both were trained with seeds; a
    single run (e.g. the SFT model) pairs with each of the other's."""
    if a_runs == 1 or b_runs == 1:
        return [(min(i, a_runs - 1), min(i, b_runs - 1)) for i in range(max(a_runs, b_runs))]
    return [(i, i) for i in range(min(a_runs, b_runs))]


def paired_difference(a_runs: list[list[float | None]], b_runs: list[list[float | None]]) -> Interval:
    """Policy a minus policy b, each run evaluated on the same prompts with the same sampling seed.

    Runs paired as `run_pairs` says: one difference of means per pair, the interval over seeds (t),
    widened by the prompts' (of the per-prompt differences). Both single runs: the per-prompt differences,
    the interval over prompts.
    """
    pairs = run_pairs(len(a_runs), len(b_runs))
    per_pair = [[x - y if x is not None and y is not None else None for x, y in zip(a_runs[i], b_runs[j])] for i, j in pairs]
    if len(pairs) == 1:
        return mean_ci(per_pair[0])
    return widened(seed_interval([statistics.fmean(v) if v else None for v in (_finite(d) for d in per_pair)]), _per_prompt_means(per_pair))


def win_rate_interval(a_runs: list[list[float | None]], b_runs: list[list[float | None]]) -> Interval:
    """How often a's response beats b's on the same prompt (ties half): one pair of runs, with the interval
    over prompts; several, the mean of each pair's win rate with the interval over seeds."""
    pairs = run_pairs(len(a_runs), len(b_runs))
    per_pair = [[_outcome(x, y) for x, y in zip(a_runs[i], b_runs[j])] for i, j in pairs]
    if len(pairs) == 1:
        return mean_ci(per_pair[0])
    return widened(seed_interval([statistics.fmean(v) if v else None for v in (_finite(o) for o in per_pair)]), _per_prompt_means(per_pair))


def excludes_zero(interval: Interval) -> bool:
    return interval.get("low") is not None and (interval["low"] > 0 or interval["high"] < 0)


def conclusion(a: str, b: str, difference: Interval, what: str, higher: str = "higher", once: str | None = None) -> str:
    """The one sentence a difference allows: a direction only where its 95% interval excludes zero.
    `once`: a policy of the two that was trained once (not the fixed baseline) while the other has seeds:
    the interval leaves out that policy's retraining noise, so no direction is claimed."""
    if difference.get("mean") is None:
        return f"{what}: {a} vs {b}: no common scores"
    where = f"{difference['mean']:+.3f}" + (
        f" [{difference['low']:+.3f}, {difference['high']:+.3f}]" if difference.get("low") is not None else " (no interval)"
    )
    over = f"{difference['n']} {difference['over']}"
    if once is not None:
        return f"{what}: {a} vs {b} not decided: {once} was trained once, and the interval over the other's seeds leaves out its retraining noise ({a} - {b} = {where})"
    if not excludes_zero(difference):
        return f"{what}: no significant difference between {a} and {b} ({a} - {b} = {where}, 95% interval over {over})"
    leader, other = (a, b) if difference["mean"] > 0 else (b, a)
    return f"{what}: {leader} is {higher} than {other} ({a} - {b} = {where}, 95% interval over {over})"
