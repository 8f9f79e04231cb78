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


@pytest.fixture(scope="module")
def review_lm(tiny_model_dir, tmp_path_factory):
    """The tiny Llama after 150 steps on demo reviews: a stand-in for the demo's pretrained model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_cli.demo.reviews import reviews

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [r["text"] for r in reviews(600, 5)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for step in range(150):
        batch = tokenizer(random.Random(step).sample(texts, 16), return_tensors="pt", padding=True, truncation=True, max_length=96)
        model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("review-lm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_word_salad_scores_low_on_the_fluency_weighted_ground_truth(review_lm):
    """The issue's collapsed PPO text ("Gold10Qz| Every scene beautiful years.") fooled the sentiment judge;
    weighted by fluency under a language model of reviews, positive words strung together score near 0,
    below a fluent negative review, far below a fluent positive one."""
    from dpo_cli.demo.reviews import make_review
    from dpo_cli.eval.judges import build_ground_truth

    spec = JudgeSpec(builtin="sentiment", python=None, key="judges.python")
    truth = build_ground_truth(spec, str(review_lm), torch.device("cpu"), "judges.fluency_model")
    rng = random.Random(3)
    good, bad = [make_review(rng, "positive") for _ in range(20)], [make_review(rng, "negative") for _ in range(20)]
    words = "great beautiful wonderful superb brilliant love best amazing perfect stunning Qz| 10 Gold years. scene ## xx".split()
    salad = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(20)]
    openings = [r["opening"] for r in good]

    def mean(values):
        return sum(values) / len(values)

    assert mean(build_judge(spec).score(openings, salad).values) > 0.9  # the word list alone is fooled
    gibberish = mean(truth.score(openings, salad).values)
    fluent_good = mean(truth.score(openings, [r["continuation"] for r in good]).values)
    fluent_bad = mean(truth.score([r["opening"] for r in bad], [r["continuation"] for r in bad]).values)
    assert gibberish < 0.1 and gibberish < fluent_bad < fluent_good and fluent_good > 5 * gibberish
    assert truth.name == f"judge:sentiment x fluency under {review_lm}"


def test_fluency_weighting_refuses_a_negative_score(review_lm):
    """Weighting -1 by a small fluency would lift garbled text toward 0: such a judge must be rescaled."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_cli.eval.judges import FluencyWeightedJudge, FunctionJudge

    model, tokenizer = AutoModelForCausalLM.from_pretrained(review_lm), AutoTokenizer.from_pretrained(review_lm)
    judge = FluencyWeightedJudge(FunctionJudge("judge:mine", lambda prompt, response: -1.0), model, tokenizer, torch.device("cpu"), "judge:mine x fluency")
    with pytest.raises(UserError, match="fluency weighting needs scores >= 0"):
        judge.score(["A film"], ["a good film"])


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_the_fluency_weighted_ground_truth_reads_conversations_through_the_chat_template(family, zoo):
    """Chat prompts (a list of messages) under a chat model's own template: one weight in [0, 1] per answer."""
    from dpo_cli.eval.judges import build_ground_truth

    truth = build_ground_truth(JudgeSpec(builtin="sentiment", python=None, key="judges.python"), str(zoo(family)), torch.device("cpu"), "judges.fluency_model")
    prompts = [[{"role": "user", "content": "Review The Last Road."}], [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "And this one?"}]]
    fluency = truth.fluency(prompts, ["A great film.", "Qz| ## xx"])
    assert len(fluency) == 2 and all(0.0 <= f <= 1.0 for f in fluency)
    assert all(s is not None for s in truth.score(prompts, ["A great film.", "Qz| ## xx"]).values)
