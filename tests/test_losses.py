"""Loss math against hand-computed values, a straightforward reference, and transformers' own loss."""

from __future__ import annotations

import math

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
