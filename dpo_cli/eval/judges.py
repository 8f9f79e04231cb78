"""Score-based labelers: built-in judges, user functions named in a recipe, and reward models;
and the Bradley-Terry choice between two scores (optionally noisy, to simulate human raters)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from dpo_cli.core.sections import JudgeSpec
from dpo_cli.core.user_code import load_user_function

Prompt = Any  # a string, or a list of {role, content} messages


@dataclass
class Scores:
    values: list[float | None]  # None where scoring failed
    errors: dict[int, str] = field(default_factory=dict)  # index -> why


class Judge(Protocol):
    name: str

    def score(self, prompts: list[Prompt], responses: list[str]) -> Scores: ...


def score_in_shards(judge: Judge, prompts: list[Prompt], responses: list[str]) -> Scores:
    """judge.score with several processes each scoring its contiguous share; every process gets all."""
    from dpo_cli.core import distributed

    if distributed.world_size() == 1:
        return judge.score(prompts, responses)
    part = distributed.shard(len(responses))
    local = judge.score(prompts[part.start : part.stop], responses[part.start : part.stop])
    errors = distributed.gather([(part.start + index, why) for index, why in local.errors.items()])
    return Scores(values=distributed.gather(local.values), errors=dict(errors))


def bradley_terry_choice(score_a: float, score_b: float, noise: float | None, tie_margin: float, rng: random.Random) -> str:
    """'A', 'B' or 'tie'. Scores within tie_margin tie; otherwise A wins outright on the higher score, or,
    with noise T, with probability sigmoid((score_a - score_b) / T) - the Bradley-Terry model of a rater."""
    difference = score_a - score_b
    if abs(difference) <= tie_margin:
        return "tie"
    if noise is None:
        return "A" if difference > 0 else "B"
    probability_a = 1.0 / (1.0 + math.exp(-max(min(difference / noise, 60.0), -60.0)))
    return "A" if rng.random() < probability_a else "B"


def _checked(value: Any) -> tuple[float | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"the judge returned {type(value).__name__} {value!r}, not a number"
    if not math.isfinite(value):
        return None, f"the judge returned {value}"
    return float(value), None


class FunctionJudge:
    """A function (prompt, response) -> float, called once per response; failures are reported, never labels."""

    def __init__(self, name: str, function: Callable[[Prompt, str], float]):
        self.name = name
        self.function = function

    def score(self, prompts: list[Prompt], responses: list[str]) -> Scores:
        scores = Scores(values=[])
        for index, (prompt, response) in enumerate(zip(prompts, responses)):
            try:
                value, problem = _checked(self.function(prompt, response))
            except Exception as exc:  # user code: any failure skips this response's pairs
                value, problem = None, f"the judge raised {type(exc).__name__}: {exc}"
            scores.values.append(value)
            if problem:
                scores.errors[index] = problem
        return scores


def sentiment(_prompt: Prompt, response: str) -> float:
    """VADER compound sentiment of the response, in [-1, 1]: the demo's stand-in for human raters."""
    return _vader().polarity_scores(response)["compound"]


def length(_prompt: Prompt, response: str) -> float:
    """Words in the response: longer is better (a judge that rewards verbosity, to study length bias)."""
    return float(len(response.split()))


_ANALYZER: Any = None


def _vader() -> Any:
    global _ANALYZER
    if _ANALYZER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _ANALYZER = SentimentIntensityAnalyzer()
    return _ANALYZER


BUILT_IN = {"sentiment": sentiment, "length": length}


def build_judge(spec: JudgeSpec | None) -> FunctionJudge | None:
    """The judge a recipe chose, or None; a user function is loaded (and announced) here."""
    if spec is None:
        return None
    if spec.python is None:
        return FunctionJudge(f"judge:{spec.name}", BUILT_IN[spec.name])
    from dpo_cli.core import ui

    function = load_user_function(spec.python, spec.key, announce=ui.note)
    return FunctionJudge(f"judge:{spec.name}", function)


SCORE_BATCH_SIZE = 16  # responses per reward-model forward pass where a recipe has no key for it


def ground_truth_name(spec: JudgeSpec | None, fluency_model: str | None) -> str | None:
    """The ground truth's name (the report's, and what makes two evaluations use the same one)."""
    if spec is None:
        return None
    return f"judge:{spec.name}" + (f" x fluency under {fluency_model}" if fluency_model else "")


def build_ground_truth(spec: JudgeSpec | None, fluency_model: str | None, device: torch.device, what: str) -> Judge | None:
    """The judge a recipe chose, weighted by fluency under `fluency_model` where one is named (`what`: its key)."""
    judge = build_judge(spec)
    if judge is None or fluency_model is None:
        return judge
    from dpo_cli.models.io import load_frozen_lm

    model, tokenizer = load_frozen_lm(fluency_model, device, what)
    return FluencyWeightedJudge(judge, model, tokenizer, device, ground_truth_name(spec, fluency_model) or judge.name)


class FluencyWeightedJudge:
    """A ground truth that word salad cannot game: the judge's score times how fluent the response reads to a
    frozen language model (e.g. the pretrained model, which never saw a preference):

        score = judge01 x min(1, exp(l(response) - l(prompt)))

    with l the mean log-likelihood per token under that model (the response's given the prompt). A response
    as natural as the prompt keeps its whole score; a garbled one, many nats per token less likely, keeps next
    to nothing, however many positive words it strings together. judge01 is the sentiment rescaled from
    [-1, 1] to [0, 1] (so garbling never lifts a negative review), any other judge's score as it is."""

    def __init__(self, judge: FunctionJudge, model: torch.nn.Module, tokenizer: Any, device: torch.device, name: str, batch_size: int = SCORE_BATCH_SIZE):
        from dpo_cli.models.forward import CompletionLogProbs

        self.name = name
        self.judge = judge
        self.scorer = CompletionLogProbs(model)
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.max_length = int(getattr(text_config, "max_position_embeddings", None) or SCORE_MAX_LENGTH)

    @torch.no_grad()
    def fluency(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        """min(1, exp(l(response) - l(prompt))) per response."""
        from dpo_cli.data.encoding import pad
        from dpo_cli.data.preference_pairs import sequence_ids
        from dpo_cli.losses import IGNORE_INDEX

        found: list[float] = []
        for start in range(0, len(responses), self.batch_size):
            sequences, response_labels, prompt_labels = [], [], []
            for prompt, response in zip(prompts[start : start + self.batch_size], responses[start : start + self.batch_size]):
                completion = [{"role": "assistant", "content": response.strip()}] if isinstance(prompt, list) else " " + response.strip()
                ids, split = sequence_ids(self.tokenizer, prompt, completion)
                if len(ids) > split + 1 and ids[-1] == self.tokenizer.eos_token_id:
                    ids = ids[:-1]  # the EOS appended for training is no part of the text (and a cut-off response has none)
                if len(ids) > self.max_length:  # keep the end: the response and as much of the prompt as fits
                    cut = len(ids) - self.max_length
                    ids, split = ids[cut:], max(split - cut, 1)
                sequences.append(ids)
                response_labels.append([IGNORE_INDEX] * split + ids[split:])
                prompt_labels.append([IGNORE_INDEX] + ids[1:split] + [IGNORE_INDEX] * (len(ids) - split))  # the first token has no context
            input_ids, mask = (t.to(self.device) for t in pad(sequences, self.tokenizer.pad_token_id))
            response_sums, response_counts = self.scorer(input_ids, mask, pad(response_labels, IGNORE_INDEX)[0].to(self.device))
            prompt_sums, prompt_counts = self.scorer(input_ids, mask, pad(prompt_labels, IGNORE_INDEX)[0].to(self.device))
            response_mean = response_sums / response_counts.clamp(min=1)
            prompt_mean = torch.where(prompt_counts > 0, prompt_sums / prompt_counts.clamp(min=1), response_mean)
            found += torch.exp(torch.clamp(response_mean - prompt_mean, max=0.0)).tolist()
        return found

    def score(self, prompts: list[Prompt], responses: list[str]) -> Scores:
        base = self.judge.score(prompts, responses)
        if self.judge.function is sentiment:
            base.values = [None if v is None else (v + 1.0) / 2.0 for v in base.values]
        negative = next((v for v in base.values if v is not None and v < 0), None)
        if negative is not None:  # weighting a negative score by a small fluency would raise it toward 0
            from dpo_cli.core.errors import UserError

            raise UserError(f"{self.name}: the judge gave {negative:g}; fluency weighting needs scores >= 0 (rescale the judge to [0, 1])")
        fluency = self.fluency(prompts, responses)
        return Scores(values=[None if v is None else v * f for v, f in zip(base.values, fluency)], errors=base.errors)


SCORE_MAX_LENGTH = 4096  # tokens a scored sequence keeps (its end, where the score is read)


def reward_model_judge(
    name_or_path: str, device: torch.device, what: str, batch_size: int = SCORE_BATCH_SIZE, quantization: Any = None, name: str | None = None
) -> RewardModelJudge:
    """A reward model named in a recipe (`what` is its key), loaded frozen and ready to score."""
    from dpo_cli.models.io import load_reward_model

    model, tokenizer = load_reward_model(name_or_path, device, what, quantization=quantization)
    return RewardModelJudge(name or f"reward-model:{name_or_path}", model, tokenizer, batch_size, device, SCORE_MAX_LENGTH)


class RewardModelJudge:
    """Scores (prompt, response) with a scalar sequence classifier, in batches, on exactly the token sequence
    reward-model training saw (prompt + response + EOS, or the chat template); an over-long sequence keeps its
    end, where the score is read."""

    def __init__(self, name: str, model: torch.nn.Module, tokenizer: Any, batch_size: int, device: torch.device, max_length: int):
        from dpo_cli.models.forward import RewardScores

        self.name = name
        self.scorer = RewardScores(model)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = device
        self.max_length = max_length
        self.told_transcript = False

    def ids(self, prompt: Prompt, response: str) -> list[int]:
        """A conversation goes through the reward model's chat template; one without (a classifier reward
        model with its own vocabulary) reads it as a plain HH-style transcript, as such models were trained."""
        from dpo_cli.data.encoding import plain_transcript
        from dpo_cli.data.preference_pairs import sequence_ids

        if isinstance(prompt, list) and not getattr(self.tokenizer, "chat_template", None):
            if not self.told_transcript:
                from dpo_cli.core import ui

                ui.note(f"{self.name} has no chat template: conversations are scored as plain 'Human: ... Assistant: ...' transcripts")
                self.told_transcript = True
            prompt, response = plain_transcript(prompt), " " + response.strip()
        completion = [{"role": "assistant", "content": response.strip()}] if isinstance(prompt, list) else response
        return sequence_ids(self.tokenizer, prompt, completion)[0][-self.max_length :]

    @torch.no_grad()
    def score(self, prompts: list[Prompt], responses: list[str]) -> Scores:
        from dpo_cli.data.encoding import pad

        sequences = [self.ids(p, r) for p, r in zip(prompts, responses)]
        pad_id = self.tokenizer.pad_token_id
        values: list[float | None] = []
        was_training = self.scorer.training
        self.scorer.eval()
        for start in range(0, len(sequences), self.batch_size):
            input_ids, attention_mask = pad(sequences[start : start + self.batch_size], pad_id)  # (B, T)
            scores = self.scorer(input_ids.to(self.device), attention_mask.to(self.device))  # (B,)
            values.extend(float(v) for v in scores.cpu())
        self.scorer.train(was_training)
        return Scores(values=values)
