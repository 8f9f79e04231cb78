"""Loss math against hand-computed values, a straightforward reference, and transformers' own loss."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_cli.losses import IGNORE_INDEX, causal_lm_loss


def reference_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token by token: -log softmax(logits[b, t])[labels[b, t+1]], averaged over targets."""
    total, count = 0.0, 0
    for b in range(logits.size(0)):
        for t in range(logits.size(1) - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            total += -torch.log_softmax(logits[b, t].double(), dim=-1)[target].item()
            count += 1
    return torch.tensor(total / max(count, 1))


def test_hand_computed():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])  # (1, 3, 2)
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    loss, metrics = causal_lm_loss(logits, labels)
    # position 0 predicts 1 with p = 1/2; position 1 predicts 0 with p = 3/4
    assert math.isclose(loss.item(), (math.log(2) + math.log(4 / 3)) / 2, rel_tol=1e-6)
    assert metrics["num_targets"].item() == 2
    loss, _ = causal_lm_loss(logits, torch.tensor([[7, 1, IGNORE_INDEX]]))
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)


def test_matches_reference_on_random_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    loss, _ = causal_lm_loss(logits, labels)
    assert torch.allclose(loss.double(), reference_lm_loss(logits, labels).double(), atol=1e-6)


def test_batch_without_targets_is_zero_not_nan():
    loss, metrics = causal_lm_loss(torch.randn(2, 4, 5), torch.full((2, 4), IGNORE_INDEX))
    assert loss.item() == 0.0 and metrics["num_targets"].item() == 0


def test_mean_nll_from_sequence_sums_equals_the_token_mean(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from dpo_cli.models.forward import CompletionLogProbs
    from dpo_cli.losses import mean_nll

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(2)
    input_ids = torch.randint(0, model.config.vocab_size, (3, 9))
    labels = input_ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[1, 6:] = IGNORE_INDEX
    expected, _ = causal_lm_loss(model(input_ids=input_ids).logits, labels)
    loss, metrics = mean_nll(*CompletionLogProbs(model)(input_ids, None, labels))
    assert torch.allclose(loss, expected, atol=1e-6) and metrics["num_targets"].item() == 6 + 3 + 6


def test_matches_transformers_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX
    out = model(input_ids=input_ids, labels=labels)
    loss, _ = causal_lm_loss(out.logits, labels)
    assert torch.allclose(loss, out.loss, atol=1e-5)


# ----------------------------------------------------------------------------- DPO

from dpo_cli.losses import dpo_loss, token_logps  # noqa: E402

LOGPS = (torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]))  # h = 0.5 - (-0.5) = 1


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_dpo_sigmoid_hand_computed():
    loss, metrics = dpo_loss(*LOGPS, beta=0.5)
    assert loss.item() == pytest.approx(softplus(-0.5), abs=1e-7)  # -log sigmoid(0.5) = 0.474077
    assert metrics["rewards/chosen"].item() == pytest.approx(0.25)
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.25)
    assert metrics["rewards/margins"].item() == pytest.approx(0.5)
    assert metrics["rewards/accuracies"].item() == 1.0
    assert (metrics["logps/chosen"].item(), metrics["logps/rejected"].item()) == (-1.0, -2.0)


def test_dpo_variants_hand_computed():
    clean, flipped = softplus(-0.5), softplus(0.5)  # -log s(0.5), -log s(-0.5)
    assert dpo_loss(*LOGPS, beta=0.5, label_smoothing=0.2)[0].item() == pytest.approx(0.8 * clean + 0.2 * flipped, abs=1e-6)
    robust = (0.8 * clean - 0.2 * flipped) / 0.6
    assert dpo_loss(*LOGPS, beta=0.5, loss_type="robust", label_smoothing=0.2)[0].item() == pytest.approx(robust, abs=1e-6)
    assert dpo_loss(*LOGPS, beta=0.5, loss_type="hinge")[0].item() == pytest.approx(0.5)
    assert dpo_loss(*LOGPS, beta=0.25, loss_type="ipo")[0].item() == pytest.approx((1 - 2) ** 2)
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(*LOGPS, beta=0.5, loss_type="kto")


def test_dpo_policy_equal_to_reference_is_log_2():
    logps = torch.tensor([-3.0, -7.5, -1.25])
    loss, metrics = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["rewards/chosen"].item() == 0.0 and metrics["rewards/margins"].item() == 0.0
    assert metrics["rewards/accuracies"].item() == 0.0  # chosen is not strictly above rejected


def test_dpo_matches_a_straightforward_reference_on_a_batch():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, dtype=torch.float64) * 5 for _ in range(4))
    for loss_type, smoothing in (("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)):
        expected = []
        for i in range(6):
            h = (pc[i] - rc[i]).item() - (pr[i] - rr[i]).item()
            z = 0.3 * h
            if loss_type == "sigmoid":
                expected.append((1 - smoothing) * softplus(-z) + smoothing * softplus(z))
            elif loss_type == "robust":
                expected.append(((1 - smoothing) * softplus(-z) - smoothing * softplus(z)) / (1 - 2 * smoothing))
            elif loss_type == "hinge":
                expected.append(max(0.0, 1 - z))
            else:
                expected.append((h - 1 / 0.6) ** 2)
        loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=smoothing)
        assert loss.item() == pytest.approx(sum(expected) / 6, abs=1e-9), loss_type


def test_token_logps_matches_log_softmax():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 11, dtype=torch.bfloat16), torch.randint(0, 11, (5,))
    expected = torch.log_softmax(logits.double(), -1)[torch.arange(5), targets]
    got = token_logps(logits, targets)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), expected, atol=1e-6)


# ----------------------------------------------------------------------------- reward model

from dpo_cli.losses import reward_loss  # noqa: E402


def test_reward_loss_hand_computed():
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])  # differences 1 and -1
    loss, metrics = reward_loss(chosen, rejected)
    assert loss.item() == pytest.approx((softplus(-1) + softplus(1)) / 2, abs=1e-6)
    assert metrics["accuracy"].item() == 0.5
    assert metrics["rewards/chosen"].item() == pytest.approx(0.25) and metrics["rewards/rejected"].item() == pytest.approx(0.25)
    assert metrics["rewards/margins"].item() == pytest.approx(0.0)
    with_margin, _ = reward_loss(chosen, rejected, margins=torch.tensor([0.5, 0.0]))
    assert with_margin.item() == pytest.approx((softplus(-0.5) + softplus(1)) / 2, abs=1e-6)
    centred, _ = reward_loss(chosen, rejected, center_rewards_coef=0.1)  # (1 + 0)^2 and (-0.5 + 0.5)^2 -> mean 0.5
    assert centred.item() == pytest.approx(loss.item() + 0.05, abs=1e-6)


# ----------------------------------------------------------------------------- estimators

from dpo_cli.losses import mean_token_logps, penalize_unfinished, ppo_objective, response_fluency, sequence_kl, tempered_token_logps  # noqa: E402


def test_tempered_token_logps_hand_computed():
    logits = torch.tensor([[[math.log(1.0), math.log(3.0)]]])  # (1, 1, 2): p = (1/4, 3/4) at temperature 1
    logps, entropy = tempered_token_logps(logits, torch.tensor([[1]]), 1.0, with_entropy=True)
    assert logps.item() == pytest.approx(math.log(0.75))
    assert entropy.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    hot, none = tempered_token_logps(logits, torch.tensor([[1]]), 2.0)  # p ~ (1, sqrt 3): logits halved
    assert hot.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3)))) and none is None


def test_tempered_token_logps_matches_a_straightforward_loop():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    logps, entropy = tempered_token_logps(logits, targets, 0.7, with_entropy=True)
    for b in range(2):
        for t in range(3):
            probs = torch.softmax(logits[b, t] / 0.7, dim=-1)
            assert logps[b, t].item() == pytest.approx(math.log(probs[targets[b, t]].item()), abs=1e-5)
            assert entropy[b, t].item() == pytest.approx(-sum(p * math.log(p) for p in probs.tolist()), abs=1e-5)


def test_sequence_kl_hand_computed():
    policy = torch.tensor([[-1.0, -2.0, -9.0]])  # the last token is padding
    reference = torch.tensor([[-1.5, -1.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert sequence_kl(policy, reference, mask).tolist() == [(-1.0 - 2.0) - (-1.5 - 1.0)]  # -0.5
    assert sequence_kl(policy, torch.tensor([-4.0]), mask).tolist() == [1.0]  # a reference summed already


def test_fluency_is_the_mean_reference_log_likelihood_per_response_token():
    reference = torch.tensor([[-1.5, -1.0, -3.0], [-0.5, -7.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # the second response is empty
    assert response_fluency(reference, mask).tolist() == [-1.25, 0.0]


def test_small_estimators_hand_computed():
    assert mean_token_logps(torch.tensor([-6.0, -3.0]), torch.tensor([3, 2])).tolist() == [-2.0, -1.5]
    assert penalize_unfinished(torch.tensor([1.0, 1.0]), torch.tensor([True, False]), 0.5).tolist() == [1.0, 0.5]
    assert ppo_objective(torch.tensor(2.0), torch.tensor(4.0), 0.1).item() == pytest.approx(2.4)


# --------------------------------------------------------------------------- reference-free preference losses

from dpo_cli.losses import orpo_loss, simpo_loss, with_chosen_nll  # noqa: E402


def test_simpo_hand_computed():
    # chosen: -4 over 2 tokens (mean -2); rejected: -9 over 3 tokens (mean -3); beta 2, gamma 0.5:
    # 2 * (-2 - -3) - 0.5 = 1.5, and -log s(1.5) = log(1 + e^-1.5) = 0.2014133
    loss, metrics = simpo_loss(torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([2.0]), torch.tensor([3.0]), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(0.2014133, abs=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(-4.0) and metrics["rewards/margins"].item() == pytest.approx(2.0)
    assert metrics["logps/chosen"].item() == pytest.approx(-2.0) and metrics["rewards/accuracies"].item() == 1.0
    smoothed, _ = simpo_loss(torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([2.0]), torch.tensor([3.0]), 2.0, 0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * 0.2014133 + 0.1 * math.log1p(math.exp(1.5)), abs=1e-6)


def test_orpo_hand_computed():
    # the same pair, beta 0.1: log odds = (-2 - -3) - (log(1 - e^-2) - log(1 - e^-3)) = 1.0943443;
    # log s(1.0943443) = -0.2887508; the chosen NLL is 4 / 2 = 2; loss = 2 + 0.1 * 0.2887508
    loss, metrics = orpo_loss(torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([2.0]), torch.tensor([3.0]), beta=0.1)
    assert loss.item() == pytest.approx(2.0288751, abs=1e-6)
    assert metrics["log_odds_chosen"].item() == pytest.approx(1.0943443, abs=1e-6)
    assert metrics["log_odds_ratio"].item() == pytest.approx(-0.2887508, abs=1e-6)
    assert metrics["nll_loss"].item() == pytest.approx(2.0) and metrics["rewards/rejected"].item() == pytest.approx(-0.3)


def test_reference_free_losses_and_rpo_match_a_straightforward_computation():
    """Row by row in float64 with the math module, against the batched functions (the NLLs are token means
    over the whole batch, as an SFT loss is)."""
    torch.manual_seed(0)
    counts_c, counts_r = torch.randint(1, 30, (6,)).double(), torch.randint(1, 30, (6,)).double()
    chosen, rejected = -torch.rand(6, dtype=torch.float64) * counts_c, -torch.rand(6, dtype=torch.float64) * counts_r * 2
    beta, gamma = 2.5, 0.8
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    simpo, orpo_terms = [], []
    for c, r, nc, nr in zip(chosen.tolist(), rejected.tolist(), counts_c.tolist(), counts_r.tolist()):
        simpo.append(-math.log(sig(beta * (c / nc - r / nr) - gamma)))
        odds = lambda lp: math.exp(lp) / (1 - math.exp(lp))  # noqa: E731
        orpo_terms.append(math.log(sig(math.log(odds(c / nc)) - math.log(odds(r / nr)))))
    nll = -chosen.sum().item() / counts_c.sum().item()
    assert simpo_loss(chosen, rejected, counts_c, counts_r, beta, gamma)[0].item() == pytest.approx(sum(simpo) / 6, rel=1e-9)
    assert orpo_loss(chosen, rejected, counts_c, counts_r, 0.2)[0].item() == pytest.approx(nll - 0.2 * sum(orpo_terms) / 6, rel=1e-9)
    base, metrics = dpo_loss(chosen, rejected, chosen * 0.9, rejected * 0.9, 0.1)
    total, with_nll = with_chosen_nll(base, metrics, chosen, counts_c, alpha=0.5)
    assert total.item() == pytest.approx(base.item() + 0.5 * nll, rel=1e-9) and with_nll["nll_loss"].item() == pytest.approx(nll)


def test_orpo_is_finite_for_a_response_the_policy_is_sure_of():
    """log(1 - p) for p near 1 (a mean token log-prob near 0) is computed stably."""
    loss, _ = orpo_loss(torch.tensor([-1e-6]), torch.tensor([-5.0]), torch.tensor([1.0]), torch.tensor([1.0]), 0.1)
    assert torch.isfinite(loss)


from dpo_cli.losses import kto_kl, kto_loss  # noqa: E402


def test_kto_hand_computed():
    """beta 0.5; log-ratios +1 (desirable) and -1 (undesirable); z = mean KL on the mismatched pairs = 0.3."""
    kl = kto_kl(torch.tensor([-3.0, -7.0]), torch.tensor([-3.5, -7.1]))
    assert kl.item() == pytest.approx(0.3)
    loss, metrics = kto_loss(torch.tensor([-4.0, -6.0]), torch.tensor([-5.0, -5.0]), kl, torch.tensor([True, False]), beta=0.5)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert loss.item() == pytest.approx(((1 - sig(0.5 * 0.7)) + (1 - sig(0.5 * 1.3))) / 2)
    assert metrics["kl"].item() == pytest.approx(0.3)
    assert metrics["rewards/chosen"].value().item() == pytest.approx(0.5) and metrics["rewards/rejected"].value().item() == pytest.approx(-0.5)
    assert metrics["rewards/margins"].value().item() == pytest.approx(1.0)
    assert metrics["logps/chosen"].value().item() == -4.0 and metrics["logps/rejected"].value().item() == -6.0
    # a negative KL estimate is clamped to 0; the weights scale each kind's losses
    weighted, metrics = kto_loss(torch.tensor([-4.0, -6.0]), torch.tensor([-5.0, -5.0]), torch.tensor(-2.0), torch.tensor([True, False]), 0.5, 2.0, 0.5)
    assert metrics["kl"].item() == 0.0
    assert weighted.item() == pytest.approx((2.0 * (1 - sig(0.5)) + 0.5 * (1 - sig(0.5))) / 2)


def test_kto_against_a_loop_over_examples():
    torch.manual_seed(5)
    policy, ref, policy_kl, ref_kl = (torch.randn(7, dtype=torch.float64) * 3 - 10 for _ in range(4))
    desirable = torch.tensor([True, False, True, True, False, False, True])
    beta, wd, wu = 0.3, 1.2, 0.8
    z = max(0.0, sum(float(p - r) for p, r in zip(policy_kl, ref_kl)) / 7)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    total = 0.0
    for i in range(7):
        r = float(policy[i] - ref[i])
        total += wd * (1 - sig(beta * (r - z))) if desirable[i] else wu * (1 - sig(beta * (z - r)))
    loss, metrics = kto_loss(policy, ref, kto_kl(policy_kl, ref_kl), desirable, beta, wd, wu)
    assert loss.item() == pytest.approx(total / 7, rel=1e-12)
    chosen = [beta * float(policy[i] - ref[i]) for i in range(7) if desirable[i]]
    assert metrics["rewards/chosen"].value().item() == pytest.approx(sum(chosen) / len(chosen), rel=1e-12)
    # a batch without undesirable examples: their means are 0, not NaN
    _, only = kto_loss(policy[:1], ref[:1], torch.tensor(0.0), desirable[:1], beta)
    assert only["rewards/rejected"].value().item() == 0.0 and math.isfinite(only["rewards/margins"].value().item())


def test_kto_gradient_reaches_the_policy_only_through_its_own_completions():
    policy = torch.tensor([-4.0, -6.0], requires_grad=True)
    policy_kl = torch.tensor([-3.0, -7.0], requires_grad=True)
    loss, _ = kto_loss(policy, torch.tensor([-5.0, -5.0]), kto_kl(policy_kl, torch.tensor([-3.5, -7.1])), torch.tensor([True, False]), 0.5)
    loss.backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # desirable pushed up, undesirable down
    assert policy_kl.grad is None  # the reference point is detached (KTO's z_ref)


def test_subset_means_are_the_whole_batchs_whatever_the_micro_batches():
    """KTO's per-kind means over micro-batches of any split (one with no undesirable example, eval batches of
    one) equal the means over the batch they make up, as the loop reduces them."""
    from dpo_cli.train.loop import reduce_metrics

    torch.manual_seed(2)
    policy, ref = torch.randn(6) - 5, torch.randn(6) - 5
    desirable = torch.tensor([True, True, True, False, True, False])
    whole = kto_loss(policy, ref, torch.tensor(0.0), desirable, 0.5)[1]
    for splits in ([3, 3], [1] * 6, [2, 4]):
        per_batch, start = [], 0
        for size in splits:
            per_batch.append((kto_loss(policy[start : start + size], ref[start : start + size], torch.tensor(0.0), desirable[start : start + size], 0.5)[1], size))
            start += size
        items, reduced = reduce_metrics(per_batch, 6)
        assert items == 6
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/rejected"):
            assert reduced[key] == pytest.approx(whole[key].value().item(), rel=1e-6), (splits, key)
    rewards = 0.5 * (policy - ref)
    assert reduced["rewards/margins"] == pytest.approx((rewards[desirable].mean() - rewards[~desirable].mean()).item(), rel=1e-6)
