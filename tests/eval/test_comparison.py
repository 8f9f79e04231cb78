"""From evaluations to conclusions: a policy's summary over seeds, the paired differences and the
reward-hacking flag, on hand-made evaluations."""

from __future__ import annotations

import math

import pytest

from dpo_cli.eval.comparison import differences, length_controlled, length_slope, policy_summary, reward_hacking, trajectory_hacking, upper_envelope
from dpo_cli.eval.evaluation import PolicyEval


def evaluation(judge: list[float], kl: list[float] | None = None) -> PolicyEval:
    n = len(judge)
    return PolicyEval(texts=["a b"] * n, finished=[True] * n, lengths=[2] * n, judge_scores=judge, proxy_scores=[], kl=kl or [0.0] * n)


def test_a_policy_over_seeds_and_its_win_rate_against_the_baseline():
    baseline = [evaluation([0.5, 0.5])]
    runs = [evaluation([0.4, 0.8], [1.0, 3.0]), evaluation([0.6, 0.6], [2.0, 2.0]), evaluation([0.9, 0.7], [4.0, 2.0])]
    summary = policy_summary(runs, baseline)
    assert summary["seeds"] == 3 and summary["proxy"] is None
    assert summary["judge"]["mean"] == pytest.approx((0.6 + 0.6 + 0.8) / 3) and summary["judge"]["over"] == "seeds"
    assert summary["kl"]["mean"] == pytest.approx((2.0 + 2.0 + 3.0) / 3)
    # win rate per seed against the one baseline run: (0 + 1) / 2, (1 + 1) / 2, (1 + 1) / 2
    assert summary["win_rate"]["mean"] == pytest.approx((0.5 + 1.0 + 1.0) / 3) and summary["win_rate"]["n"] == 3
    sd = math.sqrt(((0.5 - 5 / 6) ** 2 + 2 * (1 - 5 / 6) ** 2) / 2)
    # widened by the prompts: the outcomes per prompt, averaged over seeds, are 2/3 and 1 (sd sqrt(2) / 6)
    half = math.hypot(4.303 * sd / math.sqrt(3), 1.959964 * (math.sqrt(2) / 6) / math.sqrt(2))
    assert summary["win_rate"]["high"] - summary["win_rate"]["mean"] == pytest.approx(half)
    assert [s["judge"]["mean"] for s in summary["per_seed"]] == pytest.approx([0.6, 0.6, 0.8])


def test_differences_pair_every_two_policies_and_say_what_they_allow():
    found = differences({
        "sft": [evaluation([0.1, 0.2, 0.1, 0.2])],
        "ppo": [evaluation([0.8, 0.9, 0.8, 0.9]), evaluation([0.7, 0.8, 0.7, 0.8])],
        "dpo": [evaluation([0.9, 0.6, 0.9, 0.6]), evaluation([0.8, 0.7, 0.8, 0.7])],
    }, baseline="sft")  # fmt: skip
    assert [(d["a"], d["b"]) for d in found] == [("sft", "ppo"), ("sft", "dpo"), ("ppo", "dpo")]
    sft_ppo, _, ppo_dpo = found
    # per seed: 0.15 - 0.85, 0.15 - 0.75 (the one sft run pairs with each of ppo's seeds)
    assert sft_ppo["judge"]["mean"] == pytest.approx(-0.65) and sft_ppo["judge"]["over"] == "seeds"
    assert sft_ppo["conclusion"].startswith("ground truth: ppo is higher than sft (sft - ppo = -0.650 [")
    assert ppo_dpo["judge"]["mean"] == pytest.approx(0.05) and "no significant difference between ppo and dpo" in ppo_dpo["conclusion"]
    assert sft_ppo["kl"]["mean"] == 0.0


def test_reward_hacking_against_the_baseline_needs_both_differences_beyond_their_intervals():
    def run(judge, proxy):
        return [PolicyEval(texts=["x"] * 4, finished=[True] * 4, lengths=[1] * 4, judge_scores=judge, proxy_scores=proxy)]

    sft = run([0.5, 0.6, 0.5, 0.6], [1.0, 1.1, 1.0, 1.1])
    flags = reward_hacking({
        "sft": sft,
        "hacked": run([0.2, 0.3, 0.2, 0.3], [2.0, 2.1, 2.0, 2.1]),  # proxy up, ground truth down: both clear
        "good": run([0.8, 0.9, 0.8, 0.9], [2.0, 2.1, 2.0, 2.1]),
        "noise": run([0.4, 0.7, 0.3, 0.7], [0.9, 1.4, 0.8, 1.3]),  # proxy a hair up, truth a hair down: within the noise
    }, "sft")  # fmt: skip
    assert flags == {"sft": False, "hacked": True, "good": False, "noise": False}


def path(*points: tuple[float, float, float]) -> list[dict]:
    """(ground truth, proxy, KL) per evaluation, with 95% half-widths of 0.03 and 0.1."""
    return [{"step": 10 * i, "judge_score": g, "judge_score_low": g - 0.03, "judge_score_high": g + 0.03,
             "proxy_score": p, "proxy_score_low": p - 0.1, "proxy_score_high": p + 0.1, "kl": kl} for i, (g, p, kl) in enumerate(points)]  # fmt: skip


def test_the_hacking_flag_fires_on_an_over_optimised_path():
    """The issue's run: the proxy climbs from 3.3 to 4.0 while the text collapses after a peak."""
    check = trajectory_hacking(path((0.1, 0.5, 0.0), (0.85, 3.3, 4.0), (0.80, 3.6, 20.0), (0.60, 4.0, 122.0)))
    assert check["flag"]
    assert (check["peak_step"], check["peak_score"], check["peak_kl"], check["final_score"]) == (10, 0.85, 4.0, 0.60)
    assert check["drop"] == pytest.approx(0.25) and check["margin"] == pytest.approx(math.hypot(0.03, 0.03))
    assert check["proxy_rise"] == pytest.approx(0.7) and check["proxy_margin"] == pytest.approx(math.hypot(0.1, 0.1))


def test_the_hacking_flag_stays_silent_on_normal_paths():
    assert not trajectory_hacking(path((0.1, 0.5, 0.0), (0.6, 2.0, 1.0), (0.85, 3.2, 2.0)))["flag"]  # both rise
    assert not trajectory_hacking(path((0.1, 0.5, 0.0), (0.86, 3.0, 1.0), (0.84, 3.2, 2.0)))["flag"]  # a dip within the noise
    assert not trajectory_hacking(path((0.1, 0.5, 0.0), (0.86, 3.0, 1.0), (0.60, 2.5, 2.0)))["flag"]  # both fall: not gaming the proxy
    assert not trajectory_hacking(path((0.1, 0.5, 0.0), (0.86, 3.0, 1.0), (0.60, 3.1, 2.0)))["flag"]  # the proxy's rise is within its noise
    assert trajectory_hacking(path((0.1, 0.5, 0.0))) is None  # one point is no path
    old = [{k: v for k, v in p.items() if not k.endswith(("_low", "_high"))} for p in path((0.85, 3.3, 4.0), (0.60, 4.0, 122.0))]
    assert not trajectory_hacking(old)["flag"]  # an older run's lines carry no intervals: no flag on a margin of 0
    assert trajectory_hacking([{"judge_score": 0.5, "proxy_score": None}, {"judge_score": 0.4, "proxy_score": None}]) is None


def test_length_control_takes_the_judges_slope_within_runs():
    a = PolicyEval(texts=["x"] * 3, finished=[True] * 3, lengths=[1, 2, 3], judge_scores=[0.1, 0.2, 0.3])
    b = PolicyEval(texts=["x"] * 2, finished=[True] * 2, lengths=[10, 20], judge_scores=[1.0, 1.0])  # long and good: not a length effect
    # within a: covariance 0.2, variance 2; within b: 0 and 50 -> 0.2 / 52 (pooled over everything it would be far steeper)
    assert length_slope({"a": [a], "b": [b]}, "judge_scores") == pytest.approx(0.2 / 52)
    controlled = length_controlled([a], "judge_scores", 0.1, 2.0)  # 0.1 + 0.1, 0.2, 0.3 - 0.1: every response as if 2 tokens long
    assert controlled["mean"] == pytest.approx(0.2) and controlled["high"] == pytest.approx(0.2)
    assert length_slope({"a": [PolicyEval(texts=["x"], finished=[True], lengths=[3], judge_scores=[0.5])]}, "judge_scores") is None


def test_a_methods_frontier_is_its_upper_envelope():
    # (KL, score): 0.6 at KL 1 is beaten by 0.7 at KL 0.5; the best at each budget remains
    assert upper_envelope([(2.0, 0.8), (1.0, 0.6), (0.5, 0.7), (3.0, 0.75), (0.0, 0.1)]) == [(0.0, 0.1), (0.5, 0.7), (2.0, 0.8)]
    assert upper_envelope([]) == []


def test_a_policy_trained_once_against_seeds_gets_no_direction():
    """Its interval covers the seeded policy's retraining noise only; against the baseline (the fixed start)
    a direction stands."""
    found = differences({
        "sft": [evaluation([0.1, 0.2, 0.1, 0.2])],
        "once": [evaluation([0.9, 0.9, 0.9, 0.9])],
        "seeded": [evaluation([0.5, 0.6, 0.5, 0.6]), evaluation([0.5, 0.6, 0.5, 0.6])],
    }, baseline="sft")  # fmt: skip
    by_pair = {(d["a"], d["b"]): d["conclusion"] for d in found}
    assert by_pair[("once", "seeded")].startswith("ground truth: once vs seeded not decided: once was trained once")
    assert by_pair[("sft", "seeded")].startswith("ground truth: seeded is higher than sft")
