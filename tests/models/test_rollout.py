"""PPO's episodes on packed rows: the log-probs, entropies, values and gradients of the padded layout."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification

from dpo_cli.core.sections import ModelSection, TokenizerSection
from dpo_cli.models.build import build_causal_lm, build_tokenizer
from dpo_cli.models.roles import ActorCritic, ValueHead
from dpo_cli.models.rollout import Rollout, pack_episodes, response_logps
from helpers import model_modes

CPU = torch.device("cpu")


def episodes(vocab: int, pad_id: int, padding_free: bool) -> Rollout:
    """Four episodes: prompts of 7, 2, 7 and 3 tokens (left-padded to 7), responses of 6, 3, none and 6 tokens
    (right-padded to 6; the third has one masked placeholder, as make_rollout writes it)."""
    generator = torch.Generator().manual_seed(0)
    prompts, responses = [7, 2, 7, 3], [6, 3, 0, 6]
    query_response = torch.randint(5, vocab, (4, 13), generator=generator)
    attention_mask = torch.ones_like(query_response)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        attention_mask[b, : 7 - p] = 0
        attention_mask[b, 7 + r :] = 0
    query_response[attention_mask == 0] = pad_id
    response_mask = attention_mask[:, 7:].float()
    return Rollout(["p"] * 4, query_response, attention_mask, 7, response_mask, ["r"] * 4, torch.ones(4, dtype=torch.bool), padding_free=padding_free)


def test_episodes_pack_with_restarting_positions_and_their_prompt_ends_as_sources():
    rollout = episodes(300, 0, padding_free=True)
    packed = rollout.packed
    assert packed.input_ids.numel() < rollout.query_response.numel()
    assert packed.input_ids.size(1) == 13  # the longest episode: 7 + 6
    assert packed.targets.numel() == int(rollout.response_mask.sum()) == 15
    for b in range(4):
        own = packed.segments == 3 * b
        assert packed.position_ids[own].tolist() == list(range(int(rollout.attention_mask[b].sum())))
        assert packed.input_ids[own].tolist() == rollout.query_response[b][rollout.attention_mask[b].bool()].tolist()
    flat = packed.input_ids.flatten()
    # each response token is predicted by the token before it: the prompt's last one for the first
    assert torch.equal(flat[packed.sources + 1], packed.targets)
    grid = packed.on_grid(torch.ones(15))
    assert torch.equal(grid, rollout.response_mask)
    assert rollout.rows(torch.tensor([2, 0])).packed.targets.numel() == 6  # a mini-batch packs its own episodes
    assert episodes(300, 0, padding_free=False).packed is None
    no_prompt = episodes(300, 0, padding_free=True)
    no_prompt.attention_mask[1, :7] = 0
    assert pack_episodes(no_prompt) is None  # nothing predicts its first response token: the padded layout


CASES = [("tiny", "full", "sdpa"), ("tiny", "full", "eager"), ("tiny", "lora", "sdpa"), ("tiny", "qlora", "sdpa"), ("qwen2", "full", "sdpa"), ("llama3", "full", "sdpa")]


@pytest.mark.parametrize("family, mode, attention", CASES)
def test_packed_episodes_give_the_log_probs_values_and_gradients_of_padded_rows(family, mode, attention, tiny_model_dir, zoo):
    folder = tiny_model_dir if family == "tiny" else zoo(family)
    cfg = ModelSection(name_or_path=str(folder), attn_implementation=attention, **model_modes()[mode])
    tokenizer = build_tokenizer(cfg, TokenizerSection())[0]
    policy = build_causal_lm(cfg, tokenizer, CPU, seed=0).model
    if mode == "full":  # separate models: a critic of its own
        torch.manual_seed(0)
        critic = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, attn_implementation=attention)
        actor_critic = ActorCritic(policy, critic, None, None)
    else:  # single-GPU mode: one base, policy and critic adapters, a value head
        policy.add_adapter("value", LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
        policy.set_adapter("default")
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2)  # trained adapters
        for name, param in policy.named_parameters():
            if "lora_" in name and ".value." in name:
                param.requires_grad_(True)
        head = ValueHead(policy.config.hidden_size)
        torch.nn.init.normal_(head.linear.weight, std=0.5)
        actor_critic = ActorCritic(policy, None, head, None)
    actor_critic.eval()
    vocab = policy.get_input_embeddings().weight.shape[0]
    results = []
    for padding_free in (False, True):
        rollout = episodes(min(vocab, 1000), tokenizer.pad_token_id, padding_free)
        assert (rollout.packed is not None) == padding_free
        mask = rollout.response_mask
        actor_critic.zero_grad()
        logps, entropy = response_logps(policy, rollout, 0.7, with_entropy=True)
        values = actor_critic.values(rollout)
        weights = torch.linspace(-1.0, 1.0, mask.numel()).view_as(mask)
        ((logps + values) * weights * mask).sum().backward()
        grads = [p.grad.clone() for p in actor_critic.trainable_parameters()]
        results.append((logps * mask, entropy * mask, values * mask, grads))
    (logps, entropy, values, grads), (packed_logps, packed_entropy, packed_values, packed_grads) = results
    assert torch.allclose(packed_logps, logps, rtol=1e-5, atol=1e-5)
    assert torch.allclose(packed_entropy, entropy, rtol=1e-5, atol=1e-5)
    assert torch.allclose(packed_values, values, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(packed_grads, grads):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-5 * max(1.0, float(theirs.abs().max())))  # float32 rounding scales with the largest
    assert grads


def test_a_batch_packing_saves_little_on_keeps_the_padded_rows_in_every_pass():
    full = episodes(300, 0, padding_free=True)
    full.attention_mask[:] = 1  # every prompt and response full: packing would save nothing
    full.response_mask[:] = 1.0
    assert full.packed is None and full.rows(torch.tensor([0, 1])).packed is None
    rollout = episodes(300, 0, padding_free=True)  # packing saves 25%: every mini-batch packs, whatever it saves itself
    assert rollout.packed is not None and rollout.rows(torch.tensor([0])).packed is not None  # episode 0 alone fills its row
