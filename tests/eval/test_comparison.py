"""From evaluations to conclusions: a policy's summary over seeds, the paired differences and the
reward-hacking flag, on hand-made evaluations."""

from __future__ import annotations

import math

import pytest

from dpo_cli.eval.comparison import differences, policy_summary, reward_hacking
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
    assert summary["win_rate"]["high"] - summary["win_rate"]["mean"] == pytest.approx(4.303 * sd / math.sqrt(3))
    assert [s["judge"]["mean"] for s in summary["per_seed"]] == pytest.approx([0.6, 0.6, 0.8])


def test_differences_pair_every_two_policies_and_say_what_they_allow():
    found = differences({
        "sft": [evaluation([0.1, 0.2, 0.1, 0.2])],
        "ppo": [evaluation([0.8, 0.9, 0.8, 0.9]), evaluation([0.7, 0.8, 0.7, 0.8])],
        "dpo": [evaluation([0.9, 0.6, 0.9, 0.6]), evaluation([0.8, 0.7, 0.8, 0.7])],
    })  # fmt: skip
    assert [(d["a"], d["b"]) for d in found] == [("sft", "ppo"), ("sft", "dpo"), ("ppo", "dpo")]
    sft_ppo, _, ppo_dpo = found
    # per seed: 0.15 - 0.85, 0.15 - 0.75 (the one sft run pairs with each of ppo's seeds)
    assert sft_ppo["judge"]["mean"] == pytest.approx(-0.65) and sft_ppo["judge"]["over"] == "seeds"
    assert sft_ppo["conclusion"].startswith("ground truth: ppo is higher than sft (sft - ppo = -0.650 [")
    assert ppo_dpo["judge"]["mean"] == pytest.approx(0.05) and "no significant difference between ppo and dpo" in ppo_dpo["conclusion"]
    assert sft_ppo["kl"]["mean"] == 0.0


def test_reward_hacking_flag():
    def s(judge, proxy):
        return {"judge": {"mean": judge}, "proxy": {"mean": proxy}}

    flags = reward_hacking({"sft": s(0.5, 1.0), "hacked": s(0.3, 2.0), "good": s(0.8, 2.0), "worse": s(0.3, 0.5)}, "sft")
    assert flags == {"sft": False, "hacked": True, "good": False, "worse": False}
