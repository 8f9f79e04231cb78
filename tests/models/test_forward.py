"""The lean completion log-probs (decoder + chunked head) equal the plain full-logits computation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_cli.models.forward import CompletionLogProbs
from dpo_cli.losses import IGNORE_INDEX


def batch():
    torch.manual_seed(0)
    input_ids = torch.randint(1, 300, (3, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 7:] = 0
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[2, 7:] = IGNORE_INDEX
    return input_ids, attention_mask, labels


def straightforward(model, input_ids, attention_mask, labels):
    """One sequence at a time, float64 log-softmax over the full logits."""
    sums = []
    for i in range(input_ids.size(0)):
        n = int(attention_mask[i].sum())
        logits = model(input_ids=input_ids[i : i + 1, :n]).logits[0].double()
        logps = torch.log_softmax(logits, -1)
        sums.append(sum(logps[t, labels[i, t + 1]] for t in range(n - 1) if labels[i, t + 1] != IGNORE_INDEX))
    return torch.stack(sums)


@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
def test_equals_separate_float64_forwards(tiny_model_dir, chunk_size):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    input_ids, attention_mask, labels = batch()
    sums, counts = CompletionLogProbs(model, chunk_size=chunk_size, logits_budget_bytes=0)(input_ids, attention_mask, labels)
    assert counts.tolist() == [6, 6, 3]
    assert torch.allclose(sums.double(), straightforward(model, input_ids, attention_mask, labels), atol=1e-6)


def test_gradients_equal_the_full_logits_path(tiny_model_dir):
    from dpo_cli.models.forward import _plain_linear_head

    input_ids, attention_mask, labels = batch()
    grads = []
    for plain in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if plain:  # a head extra sends the wrapper down the full-logits forward (Llama itself ignores it)
            model.config.logit_scale = 0.5
        assert _plain_linear_head(model) is not plain
        sums, _ = CompletionLogProbs(model, chunk_size=2, logits_budget_bytes=0)(input_ids, attention_mask, labels)
        sums.sum().backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_small_problems_take_one_pass_with_the_same_result(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    input_ids, attention_mask, labels = batch()
    chunked, _ = CompletionLogProbs(model, chunk_size=2, logits_budget_bytes=0)(input_ids, attention_mask, labels)
    single, _ = CompletionLogProbs(model)(input_ids, attention_mask, labels)
    assert torch.allclose(chunked, single, atol=1e-10)
