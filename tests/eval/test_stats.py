"""The comparison's statistics against hand-computed values: intervals over prompts and over seeds,
paired differences, win rates and the sentences they allow."""

from __future__ import annotations

import math

import pytest

from dpo_cli.eval.stats import across_runs, conclusion, excludes_zero, mean_ci, paired_difference, run_pairs, seed_interval, t975, win_rate, win_rate_interval


def test_interval_over_prompts_hand_computed():
    ci = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 1.959964 * math.sqrt(5 / 3) / 2  # sample sd of 1..4 is sqrt(5/3)
    assert ci["mean"] == 2.5 and ci["n"] == 4 and ci["over"] == "prompts"
    assert ci["low"] == pytest.approx(2.5 - half) and ci["high"] == pytest.approx(2.5 + half)
    assert mean_ci([7.0]) == {"mean": 7.0, "low": None, "high": None, "n": 1, "over": "prompts"}  # one value: no interval
    assert mean_ci([float("nan"), None])["mean"] is None


def test_t_quantiles():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(30) == 2.042
    assert t975(40) == pytest.approx(2.021, abs=1e-3) and t975(120) == pytest.approx(1.980, abs=1e-3)
    with pytest.raises(ValueError):
        t975(0)


def test_interval_over_seeds_uses_t_with_n_minus_1_degrees_of_freedom():
    ci = seed_interval([0.861, 0.892, 0.862])  # the PPO ground truth at seeds 42, 43, 44
    mean = (0.861 + 0.892 + 0.862) / 3
    sd = math.sqrt(((0.861 - mean) ** 2 + (0.892 - mean) ** 2 + (0.862 - mean) ** 2) / 2)
    assert ci["mean"] == pytest.approx(mean) and ci["n"] == 3 and ci["over"] == "seeds"
    assert ci["high"] - ci["mean"] == pytest.approx(4.303 * sd / math.sqrt(3))
    assert seed_interval([0.5])["low"] is None  # one seed says nothing about retraining


def test_paired_difference_over_seeds_hand_computed():
    """The issue's numbers: PPO vs DPO beta=0.1 at seeds 42-44. Per seed: -0.015, +0.075, +0.060; mean 0.04,
    sd 0.048218, half-width 4.303 x 0.048218 / sqrt(3) = 0.1198: no significant difference."""
    ppo = [[0.861], [0.892], [0.862]]
    dpo = [[0.876], [0.817], [0.802]]
    d = paired_difference(ppo, dpo)
    assert d["mean"] == pytest.approx(0.04) and d["n"] == 3 and d["over"] == "seeds"
    assert d["high"] - d["mean"] == pytest.approx(4.303 * 0.0482183 / math.sqrt(3), abs=1e-6)
    assert not excludes_zero(d)
    assert conclusion("ppo", "dpo", d, "ground truth").startswith("ground truth: no significant difference between ppo and dpo (ppo - dpo = +0.040 [")


def test_paired_difference_pairs_runs_by_seed_and_a_single_run_with_every_seed():
    assert run_pairs(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert run_pairs(3, 1) == [(0, 0), (1, 0), (2, 0)] and run_pairs(1, 2) == [(0, 0), (0, 1)]
    assert run_pairs(2, 3) == [(0, 0), (1, 1)]
    # each run's mean: a = 1.5, 3.5; b (one run) = 0.5: differences 1.0, 3.0
    d = paired_difference([[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0]])
    assert d["mean"] == pytest.approx(2.0) and d["high"] - d["mean"] == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))
    # both single runs: per-prompt differences 1, 0, 2 -> mean 1, sd 1, interval over prompts
    d = paired_difference([[1.0, 2.0, 3.0]], [[0.0, 2.0, 1.0]])
    assert d["mean"] == pytest.approx(1.0) and d["over"] == "prompts" and d["high"] - 1.0 == pytest.approx(1.959964 / math.sqrt(3))


def test_a_clear_difference_names_the_leader():
    d = paired_difference([[1.0, 1.1, 0.9, 1.0]], [[0.0, 0.1, -0.1, 0.0]])
    assert excludes_zero(d)
    assert conclusion("a", "b", d, "ground truth") == "ground truth: a is higher than b (a - b = +1.000 [+1.000, +1.000], 95% interval over 4 prompts)"
    flipped = paired_difference([[0.0, 0.1, -0.1, 0.0]], [[1.0, 1.1, 0.9, 1.0]])
    assert conclusion("a", "b", flipped, "ground truth").startswith("ground truth: b is higher than a (a - b = -1.000")


def test_win_rates_count_ties_half_with_intervals():
    assert win_rate([1.0, 2.0, 3.0, None], [1.0, 1.0, 4.0, 2.0]) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert win_rate([None], [1.0]) is None
    one = win_rate_interval([[1.0, 2.0, 3.0, 4.0]], [[0.0, 2.0, 5.0, 1.0]])  # outcomes 1, 0.5, 0, 1
    assert one["mean"] == pytest.approx(0.625) and one["over"] == "prompts"
    assert one["high"] - one["mean"] == pytest.approx(1.959964 * math.sqrt(((0.375**2) * 2 + 0.125**2 + 0.625**2) / 3) / 2)
    seeds = win_rate_interval([[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0]])  # per seed 0.5 and 0.75 against the one baseline run
    assert seeds["mean"] == pytest.approx(0.625) and seeds["over"] == "seeds" and seeds["n"] == 2


def test_across_runs_is_the_mean_of_run_means_with_an_interval_over_seeds_and_the_shared_prompts():
    one = across_runs([[1.0, 2.0, 3.0]])
    assert one["over"] == "prompts" and one["n"] == 3
    several = across_runs([[1.0, 3.0], [2.0, 2.0], [4.0, 6.0]])  # run means 2, 2, 5; per-prompt means 7/3, 11/3
    assert several["mean"] == pytest.approx(3.0) and several["n"] == 3 and several["over"] == "seeds"
    seeds_half = 4.303 * math.sqrt(3.0) / math.sqrt(3)  # sd of 2, 2, 5 is sqrt(3)
    prompts_half = 1.959964 * (math.sqrt(2) * 2 / 3) / math.sqrt(2)  # sd of 7/3, 11/3 is sqrt(2) * 2/3
    assert several["high"] - 3.0 == pytest.approx(math.hypot(seeds_half, prompts_half))
