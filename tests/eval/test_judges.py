"""Score-based labelers: Bradley-Terry choices, built-in judges, user functions, reward models."""

from __future__ import annotations

import math
import random
import sys

import pytest
import torch

from dpo_cli.core.errors import UserError
from dpo_cli.eval.judges import RewardModelJudge, bradley_terry_choice, build_judge, length, sentiment
from dpo_cli.models.io import load_reward_model
from dpo_cli.core.sections import JudgeSpec


def python_judge(spec):
    return build_judge(JudgeSpec(builtin=None, python=spec, key="label.python"))


def test_bradley_terry_without_noise_and_ties():
    rng = random.Random(0)
    assert bradley_terry_choice(0.9, 0.1, None, 0.0, rng) == "A"
    assert bradley_terry_choice(0.1, 0.9, None, 0.0, rng) == "B"
    assert bradley_terry_choice(0.50, 0.52, None, 0.05, rng) == "tie"
    assert bradley_terry_choice(0.50, 0.52, 1.0, 0.05, rng) == "tie"  # the margin applies before the noise


def test_bradley_terry_noise_follows_the_sigmoid():
    difference, temperature, trials = 0.4, 0.5, 20000
    wins = sum(bradley_terry_choice(difference, 0.0, temperature, 0.0, random.Random(i)) == "A" for i in range(trials))
    expected = 1 / (1 + math.exp(-difference / temperature))  # 0.690
    assert abs(wins / trials - expected) < 0.015
    assert bradley_terry_choice(1e6, 0.0, 0.1, 0.0, random.Random(0)) == "A"  # no overflow


def test_builtin_judges():
    assert sentiment("", "A wonderful, brilliant film.") > 0.5 > sentiment("", "A boring, awful film.")
    assert length("", "one two three") == 3.0
    scores = build_judge(JudgeSpec(builtin="sentiment", python=None, key="label.python")).score(["p", "p"], ["I loved it.", "I hated it."])
    assert scores.values[0] > 0 > scores.values[1] and not scores.errors


def test_user_function_judge(tmp_path, monkeypatch):
    (tmp_path / "myjudges.py").write_text(
        "import math\n"
        "def exclaim(prompt, response):\n    return float(response.count('!'))\n"
        "def broken(prompt, response):\n    raise RuntimeError('no model')\n"
        "def wordy(prompt, response):\n    return 'good'\n"
        "def nan(prompt, response):\n    return math.nan\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert python_judge("myjudges:exclaim").score(["p"], ["wow!!"]).values == [2.0]
    assert "raised RuntimeError: no model" in python_judge("myjudges:broken").score(["p"], ["x"]).errors[0]
    assert "returned str 'good', not a number" in python_judge("myjudges:wordy").score(["p"], ["x"]).errors[0]
    nan = python_judge("myjudges:nan").score(["p", "p"], ["x", "y"])
    assert nan.values == [None, None] and "returned nan" in nan.errors[1]
    assert python_judge("myjudges:exclaim").name == "judge:myjudges:exclaim"
    with pytest.raises(UserError, match="label.python: cannot import module 'nosuchmodule'"):
        python_judge("nosuchmodule:f")
    with pytest.raises(UserError, match="has no function 'missing'"):
        python_judge("myjudges:missing")


def test_reward_model_scores_do_not_depend_on_batching(tiny_reward_model_dir):
    model, tokenizer = load_reward_model(str(tiny_reward_model_dir), torch.device("cpu"))
    prompts = ["A film.", "The Last Road is a drama.", "Hi", "I watched it."]
    responses = [" Superb acting and a lovely score.", " Dull.", " It is one of the best films of the year.", " Bad."]
    batched = RewardModelJudge("rm", model, tokenizer, 4, torch.device("cpu"), 512).score(prompts, responses).values
    single = RewardModelJudge("rm", model, tokenizer, 1, torch.device("cpu"), 512).score(prompts, responses).values
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(v, 6) for v in batched)) == 4


def test_a_causal_lm_is_not_a_reward_model(tiny_model_dir):
    with pytest.raises(UserError, match="is not a reward model: expected a sequence classifier with one output"):
        load_reward_model(str(tiny_model_dir), torch.device("cpu"))
