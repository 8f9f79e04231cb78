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


# ----------------------------------------------------------------------------- shared-prompt rows


def pair_rows(tokenizer, chat: bool, n: int = 5) -> list[dict]:
    """Encoded pairs of unequal lengths, as dpo and rm-train encode them (chat-templated for chat models)."""
    from dpo_cli.data.preference_pairs import pair_encoder
    from helpers import chat_preference_rows, preference_rows

    rows = chat_preference_rows(n, seed=3) if chat else preference_rows(n, seed=3)
    encode = pair_encoder(tokenizer, max_length=256, max_prompt_length=None, with_margin=False)
    encoded = [encode(row) for row in rows]
    assert not any(row["problem"] or row["emptied"] or row["truncated"] for row in encoded)
    return encoded


def both_layouts(rows, pad_id):
    from dpo_cli.data.preference_pairs import collate_pairs, collate_shared_pairs

    return collate_pairs(rows, pad_id), collate_shared_pairs(rows, pad_id)


SHARED_CASES = [("tiny", "full", "sdpa"), ("tiny", "full", "eager"), ("tiny", "lora", "sdpa"), ("tiny", "qlora", "sdpa"),
                ("qwen2", "full", "sdpa"), ("llama3", "full", "sdpa"), ("mistral", "lora", "sdpa")]  # fmt: skip


@pytest.mark.parametrize("family, mode, attention", SHARED_CASES)
def test_shared_prompt_rows_give_the_log_probs_and_gradients_of_a_row_each(family, mode, attention, tiny_model_dir, zoo):
    from dpo_cli.core.sections import ModelSection, TokenizerSection
    from dpo_cli.models.build import build_causal_lm, build_tokenizer
    from dpo_cli.models.forward import pair_logps
    from helpers import model_modes

    folder = tiny_model_dir if family == "tiny" else zoo(family)
    cfg = ModelSection(name_or_path=str(folder), attn_implementation=attention, **model_modes()[mode])
    tokenizer = build_tokenizer(cfg, TokenizerSection())[0]
    bundle = build_causal_lm(cfg, tokenizer, torch.device("cpu"), seed=0)
    model = CompletionLogProbs(bundle.model).eval()  # no dropout: both layouts see one function
    padded, shared = both_layouts(pair_rows(bundle.tokenizer, chat=family != "tiny"), bundle.tokenizer.pad_token_id)
    assert shared["input_ids"].numel() < padded["input_ids"].numel()
    weights = torch.linspace(-1.0, 1.0, 2 * shared["num_items"])
    results = []
    for batch in (padded, shared):
        bundle.model.zero_grad()
        sums, counts = pair_logps(model, batch)
        (sums * weights).sum().backward()
        trained = [p for p in bundle.model.parameters() if p.requires_grad]
        results.append((sums.detach(), counts, [p.grad.clone() for p in trained]))
    (straight, straight_counts, straight_grads), (ours, our_counts, our_grads) = results
    assert our_counts.tolist() == straight_counts.tolist()
    assert torch.allclose(ours, straight, rtol=1e-5, atol=1e-4), (ours, straight)
    for mine, theirs in zip(our_grads, straight_grads):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-5 * max(1.0, float(theirs.abs().max())))  # float32 rounding scales with the largest


def test_shared_prompt_reward_scores_equal_a_row_each(tiny_reward_model_dir, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dpo_cli.models.forward import RewardScores, pair_scores

    model = RewardScores(AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir).eval())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    padded, shared = both_layouts(pair_rows(tokenizer, chat=False), tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(pair_scores(model, shared), pair_scores(model, padded), atol=1e-5)


def test_models_that_cannot_take_the_mask_fall_back_to_a_row_each(tiny_model_dir, zoo):
    from dpo_cli.models.forward import custom_mask_problem, packed_rows_allowed

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert custom_mask_problem(model, 256) is None and packed_rows_allowed("dpo.share_prompt", True, [model], 256) == (True, [])
    assert packed_rows_allowed("dpo.share_prompt", False, [model], 256) == (False, [])
    model.config._attn_implementation = "flash_attention_2"
    assert "takes no custom mask" in custom_mask_problem(model, 256)
    note = "dpo.share_prompt: off, its attention (flash_attention_2) takes no custom mask; one row per sequence (train.group_by_length: true batches similar lengths)"
    assert packed_rows_allowed("dpo.share_prompt", True, [model], 256) == (False, [note])
    mistral = AutoModelForCausalLM.from_pretrained(zoo("mistral"))  # sliding window of 512 tokens
    assert custom_mask_problem(mistral, 512) is None and "sliding window (512 tokens)" in custom_mask_problem(mistral, 1024)
    assert not packed_rows_allowed("rm.share_prompt", True, [mistral], 512, scored=True)[0]  # a causal LM has no score head


def test_padding_free_rows_give_the_loss_and_gradients_of_a_row_each(tiny_model_dir, tiny_tokenizer):
    from dpo_cli.data.encoding import collate_causal, collate_padding_free, sft_encoder
    from dpo_cli.models.forward import lm_step
    from helpers import chat_sft_rows

    tiny_tokenizer.chat_template = None
    encode = sft_encoder(tiny_tokenizer, "prompt_completion", 256)
    rows = [encode({"prompt": r["messages"][-2]["content"], "completion": " " + r["messages"][-1]["content"] * (3 if i == 0 else 1)}) for i, r in enumerate(chat_sft_rows(6))]
    padded, packed = collate_causal(rows, tiny_tokenizer.pad_token_id), collate_padding_free(rows, tiny_tokenizer.pad_token_id)
    assert packed["input_ids"].size(0) < padded["input_ids"].size(0) and packed["num_items"] == padded["num_items"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        loss, _ = lm_step(CompletionLogProbs(model), batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-5)
    for mine, theirs in zip(results[1][1], results[0][1]):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-5)


def test_rows_of_several_pairs_and_pairs_without_a_shared_prompt(tiny_model_dir):
    from dpo_cli.data.preference_pairs import collate_pairs, collate_shared_pairs
    from dpo_cli.models.forward import pair_logps

    pair = lambda chosen, rejected, prompt: {  # noqa: E731
        "chosen_input_ids": chosen, "rejected_input_ids": rejected,
        "chosen_labels": [-100] * prompt + chosen[prompt:], "rejected_labels": [-100] * prompt + rejected[prompt:],
    }  # fmt: skip
    rows = [pair(list(range(10, 40)), list(range(10, 20)) + [7, 8], 10), pair([5, 6, 7], [8, 9], 0), pair([3, 4, 6], [3, 4, 9, 9], 2)]
    shared = collate_shared_pairs(rows, pad_id=0)
    assert shared["input_ids"].size(0) == 2 and set(shared["segments"][1].tolist()) >= {4, 5, 6, 7, 8}  # two pairs in one row (pair 1 shares no prompt: no 3)
    model = CompletionLogProbs(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval())
    ours, our_counts = pair_logps(model, shared)
    straight, counts = pair_logps(model, collate_pairs(rows, pad_id=0))
    assert our_counts.tolist() == counts.tolist() == [20, 2, 1, 2, 1, 2]
    assert torch.allclose(ours, straight, atol=1e-10)


def test_padding_free_sft_rows_give_a_sum_per_example(tiny_model_dir):
    from dpo_cli.data.encoding import collate_causal, collate_padding_free

    rows = [{"input_ids": list(range(5, 5 + n)), "labels": [-100] * 2 + list(range(7, 5 + n))} for n in (12, 4, 5, 3)]
    model = CompletionLogProbs(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval())
    packed, padded = collate_padding_free(rows, 0), collate_causal(rows, 0)
    assert packed["input_ids"].size(0) == 2 and packed["num_sequences"] == 4
    ours, our_counts = model(packed["input_ids"], None, packed["labels"], packed["position_ids"], packed["segments"])
    theirs, counts = model(padded["input_ids"], padded["attention_mask"], padded["labels"])
    assert ours.shape == (4,) and our_counts.tolist() == counts.tolist() == [10, 2, 3, 1]
    assert torch.allclose(ours, theirs, atol=1e-10)


def test_models_with_a_head_extra_take_packed_rows_through_the_full_logits(tiny_model_dir):
    """A head that does more than a linear map (logit scaling, soft-capping) sends the wrapper down the plain
    forward; packed rows give the same log-probs there too."""
    from dpo_cli.data.preference_pairs import collate_pairs, collate_shared_pairs
    from dpo_cli.models.forward import _plain_linear_head, pair_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    model.config.logit_scale = 0.5  # Llama ignores it; the wrapper takes the full-logits path
    assert not _plain_linear_head(model)
    pair = lambda n: {"chosen_input_ids": [1, 2, 3] + [7] * n, "chosen_labels": [-100] * 3 + [7] * n, "rejected_input_ids": [1, 2, 3, 9], "rejected_labels": [-100] * 3 + [9]}  # noqa: E731
    rows = [pair(6), pair(1), pair(2)]
    ours, _ = pair_logps(CompletionLogProbs(model), collate_shared_pairs(rows, 0))
    theirs, _ = pair_logps(CompletionLogProbs(model), collate_pairs(rows, 0))
    assert torch.allclose(ours, theirs, atol=1e-10)
