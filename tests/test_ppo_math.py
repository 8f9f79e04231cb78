"""PPO's pure functions on hand-computed cases and against straightforward loops."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_cli.losses import (
    adaptive_kl_coef,
    explained_variance,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)


def test_gae_hand_computed():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.4, 0.2]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.9)
    # t=2: 1 - 0.2 = 0.8; t=1: (0 + 0.2 - 0.4) + 0.9 * 0.8 = 0.52; t=0: (0 + 0.4 - 0.5) + 0.9 * 0.52 = 0.368
    assert advantages.tolist()[0] == pytest.approx([0.368, 0.52, 0.8])
    assert returns.tolist()[0] == pytest.approx([0.868, 0.92, 1.0])


def test_gae_stops_at_the_end_of_each_response():
    rewards, values = torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.4, 0.9]])
    advantages, _ = gae(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.9)
    assert advantages.tolist()[0] == pytest.approx([-0.1 + 0.9 * 0.6, 0.6, 0.0])


def reference_gae(rewards, values, lengths, gamma, lam):
    """A plain backward loop per response, over its real tokens only."""
    out = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1].item() if t + 1 < n else 0.0
            running = rewards[b, t].item() + gamma * next_value - values[b, t].item() + gamma * lam * running
            out[b, t] = running
    return out


def test_gae_matches_a_plain_loop():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 7), torch.randn(4, 7)
    lengths = [7, 3, 1, 5]
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths])
    advantages, returns = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    expected = reference_gae(rewards, values, lengths, 0.99, 0.95)
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, (expected + values) * mask, atol=1e-6)


def test_masked_statistics_and_whitening():
    values, mask = torch.tensor([1.0, 2.0, 3.0, 40.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_var(values, mask).item() == pytest.approx(1.0)  # unbiased: (1 + 0 + 1) / 2
    assert masked_whiten(values, mask).tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert masked_whiten(values, mask, shift_mean=False).tolist() == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)


@pytest.mark.parametrize(
    "advantage,ratio,loss,clipfrac",
    [
        (1.0, 1.1, -1.1, 0.0),  # inside the range: the plain surrogate
        (1.0, 1.5, -1.2, 1.0),  # a good action pushed too far: clipped at 1 + e
        (-1.0, 0.5, 0.8, 1.0),  # a bad action pushed too far down: clipped at 1 - e
        (-1.0, 1.5, 1.5, 0.0),  # a bad action made likelier: never clipped (the pessimistic bound)
    ],
)
def test_clipped_policy_loss(advantage, ratio, loss, clipfrac):
    old = torch.zeros(1, 1)
    value, metrics = ppo_policy_loss(torch.full((1, 1), math.log(ratio)), old, torch.full((1, 1), advantage), torch.ones(1, 1), 0.2)
    assert value.item() == pytest.approx(loss, abs=1e-6)
    assert metrics["clipfrac"].item() == clipfrac
    assert metrics["approx_kl"].item() == pytest.approx(0.5 * math.log(ratio) ** 2, abs=1e-7)


def test_ratio_is_one_when_nothing_changed():
    logps = torch.randn(3, 4)
    value, metrics = ppo_policy_loss(logps, logps, torch.randn(3, 4), torch.ones(3, 4), 0.2)
    assert metrics["ratio"].item() == 1.0 and metrics["clipfrac"].item() == 0.0 and metrics["approx_kl"].item() == 0.0


def test_clipped_value_loss():
    old, returns = torch.zeros(1, 1), torch.ones(1, 1)
    loss, metrics = ppo_value_loss(torch.full((1, 1), 0.5), old, returns, torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.2 - 1) ** 2)  # the clipped prediction (0.2) is worse: it counts
    assert metrics["value/clipfrac"].item() == 1.0
    loss, metrics = ppo_value_loss(torch.full((1, 1), 0.1), old, returns, torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.5 * 0.9**2) and metrics["value/clipfrac"].item() == 0.0


def test_kl_penalised_rewards():
    rewards, kl = kl_penalized_rewards(
        torch.tensor([2.0]), torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -2.0, -2.0]]), torch.tensor([[1.0, 1.0, 0.0]]), 0.1
    )
    assert kl.tolist()[0] == pytest.approx([0.5, 0.0, 0.0])
    assert rewards.tolist()[0] == pytest.approx([-0.05, 2.0, 0.0])  # the score lands on the last real token


def test_adaptive_kl_controller():
    assert adaptive_kl_coef(0.1, 12.0, 6.0, 10000, 100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))  # error capped at +0.2
    assert adaptive_kl_coef(0.1, 3.0, 6.0, 10000, 100) == pytest.approx(0.1 * (1 - 0.2 * 100 / 10000))
    assert adaptive_kl_coef(0.1, 6.6, 6.0, 1000, 100) == pytest.approx(0.1 * (1 + 0.1 * 100 / 1000))


def test_explained_variance():
    returns, mask = torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 3), returns, mask).item() == pytest.approx(0.0)


# --------------------------------------------------------------------------- critic-free advantages

from dpo_cli.losses import grpo_advantages, k3_kl, rloo_advantages  # noqa: E402


def test_rloo_and_grpo_advantages_hand_computed():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, three samples each
    # prompt 1: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5; prompt 2: -1.5, -1.5, 3
    assert rloo_advantages(rewards, 3).tolist() == [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]
    # prompt 1: mean 3, sample std sqrt(((-2)^2 + 1 + 9) / 2) = sqrt(7)
    expected = [(x - 3) / (7**0.5 + 1e-4) for x in (1.0, 2.0, 6.0)] + [(x - 1) / (3**0.5 + 1e-4) for x in (0.0, 0.0, 3.0)]
    assert grpo_advantages(rewards, 3).tolist() == pytest.approx(expected, rel=1e-6)
    assert k3_kl(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -1.0]]))[0].tolist() == pytest.approx([0.0, math.e - 2], rel=1e-6)  # d = 0 and d = 1


def test_critic_free_advantages_match_explicit_loops():
    torch.manual_seed(0)
    rewards, k = torch.randn(20, dtype=torch.float64), 4
    loo, normalised = [], []
    for start in range(0, 20, k):
        group = rewards[start : start + k].tolist()
        mean = sum(group) / k
        std = (sum((g - mean) ** 2 for g in group) / (k - 1)) ** 0.5
        for i, r in enumerate(group):
            loo.append(r - sum(g for j, g in enumerate(group) if j != i) / (k - 1))
            normalised.append((r - mean) / (std + 1e-4))
    assert rloo_advantages(rewards, k).tolist() == pytest.approx(loo, rel=1e-12)
    assert grpo_advantages(rewards, k).tolist() == pytest.approx(normalised, rel=1e-12)
    assert rloo_advantages(rewards, k).view(-1, k).sum(dim=1).abs().max() < 1e-12  # leave-one-out advantages sum to 0 per prompt
