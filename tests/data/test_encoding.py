"""Tokenisation of each format: labels are -100 exactly on prompt positions; packing keeps examples apart."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from dpo_cli.data.encoding import (
    check_messages,
    collate_causal,
    divergence,
    encode_conversation,
    encode_prompt_completion,
    pack_blocks,
    pack_examples,
    prompt_ids_for_generation,
    sft_encoder,
    text_encoder,
)
from dpo_cli.losses import IGNORE_INDEX
from dpo_cli.data.tokenization import DEFAULT_CHAT_TEMPLATE


@pytest.fixture()
def chat_tokenizer(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def labelled_text(tokenizer, input_ids, labels):
    return tokenizer.decode([t for t, l in zip(input_ids, labels) if l != IGNORE_INDEX])


def test_divergence():
    assert divergence([1, 2, 3], [1, 2, 3, 4]) == 3
    assert divergence([1, 2, 3], [1, 2, 9, 4]) == 2
    assert divergence([], [5]) == 0


def test_prompt_completion_labels_are_ignore_exactly_on_prompt(tiny_tokenizer):
    prompt, completion = "The Silent Harbor is a drama.", " The acting is superb."
    input_ids, labels = encode_prompt_completion(tiny_tokenizer, prompt, completion)
    prompt_ids = tiny_tokenizer(prompt)["input_ids"]
    assert input_ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids) :] == input_ids[len(prompt_ids) :]
    assert input_ids[-1] == tiny_tokenizer.eos_token_id  # EOS appended and trained on
    assert labelled_text(tiny_tokenizer, input_ids, labels) == completion + tiny_tokenizer.eos_token


def test_completion_starts_where_tokens_diverge(tiny_tokenizer):
    # "drama" may tokenise differently when split as "dra" + "ma": the completion starts at the first difference
    input_ids, labels = encode_prompt_completion(tiny_tokenizer, "It is a dra", "ma.")
    prompt_ids = tiny_tokenizer("It is a dra")["input_ids"]
    start = divergence(prompt_ids, input_ids)
    assert labels[:start] == [IGNORE_INDEX] * start and labels[start:] == input_ids[start:]


def test_messages_train_on_every_assistant_turn_only(chat_tokenizer):
    messages = [
        {"role": "system", "content": "You review films."},
        {"role": "user", "content": "Review The Last Road."},
        {"role": "assistant", "content": "A superb film."},
        {"role": "user", "content": "Shorter?"},
        {"role": "assistant", "content": "Superb."},
    ]
    input_ids, labels = encode_conversation(chat_tokenizer, messages, None)
    eos = chat_tokenizer.eos_token
    assert chat_tokenizer.decode(input_ids) == chat_tokenizer.apply_chat_template(messages, tokenize=False)
    assert labelled_text(chat_tokenizer, input_ids, labels) == f"A superb film.{eos}\nSuperb.{eos}\n"


def test_conversational_prompt_completion_trains_on_completion(chat_tokenizer):
    prompt = [{"role": "user", "content": "Review it."}]
    completion = [{"role": "assistant", "content": "Lovely."}]
    input_ids, labels = encode_conversation(chat_tokenizer, prompt, completion)
    assert labelled_text(chat_tokenizer, input_ids, labels) == f"Lovely.{chat_tokenizer.eos_token}\n"
    generation_prompt = prompt_ids_for_generation(chat_tokenizer, prompt)
    assert input_ids[: len(generation_prompt)] == generation_prompt
    assert all(label == IGNORE_INDEX for label in labels[: len(generation_prompt)])


def test_malformed_conversations_are_named():
    assert "non-empty list" in check_messages([])
    assert "messages[0] must have 'role' and 'content'" == check_messages([{"text": "hi"}])
    assert "'narrator' is not one of" in check_messages([{"role": "narrator", "content": "x"}])
    assert check_messages([{"role": "user", "content": "x"}]) is None


def test_sft_encoder_flags(tiny_tokenizer):
    encode = sft_encoder(tiny_tokenizer, "prompt_completion", max_length=12)
    assert encode({"prompt": "Hi"})["problem"] == "'completion' is missing"
    assert encode({"prompt": "Hi", "completion": "  "})["problem"] == "'completion' is empty"
    assert "must both be strings" in encode({"prompt": "Hi", "completion": 3})["problem"]
    long = encode({"prompt": "A film.", "completion": " The acting is superb and the story is great and the score is lovely."})
    assert long["truncated"] and len(long["input_ids"]) == 12 and not long["emptied"]
    emptied = encode({"prompt": "The Silent Harbor is a drama by Anna Berg, about a lost child.", "completion": " Great."})
    assert emptied["truncated"] and emptied["emptied"]


def test_collate_pads_and_counts_targets():
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8, 9], "labels": [IGNORE_INDEX, 9]}]
    batch = collate_causal(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["num_items"] == 3 and batch["num_tokens"] == 5


def test_pack_blocks_separates_documents_with_eos(tiny_tokenizer):
    rows = Dataset.from_list([{"text": "A great film."}, {"text": "A dull film."}, {"text": "Superb acting."}])
    encoded = rows.map(text_encoder(tiny_tokenizer), remove_columns=["text"])
    stream = [t for ids in encoded["input_ids"] for t in ids]
    blocks = pack_blocks(encoded.remove_columns(["problem", "truncated", "emptied"]), 4)
    assert all(len(b) == 4 for b in blocks["input_ids"])
    assert [t for b in blocks["input_ids"] for t in b] == stream[: len(stream) // 4 * 4]
    assert stream.count(tiny_tokenizer.eos_token_id) == 3


def test_packing_fits_every_example_once():
    lengths = [7, 3, 5, 2, 8, 1, 4]
    ds = Dataset.from_dict({"input_ids": [list(range(100 * i, 100 * i + n)) for i, n in enumerate(lengths)], "labels": [[1] * n for n in lengths]})
    packed = pack_examples(ds, max_length=10)
    assert all(len(r) <= 10 for r in packed["input_ids"])
    assert sorted(t for r in packed["input_ids"] for t in r) == sorted(t for r in ds["input_ids"] for t in r)
    assert len(packed) == 3  # 30 tokens in bins of 10: best-fit-decreasing fills them exactly
    for ids, positions, labels in zip(packed["input_ids"], packed["position_ids"], packed["labels"]):
        starts = [i for i, p in enumerate(positions) if p == 0]
        assert all(labels[s] == IGNORE_INDEX for s in starts)  # never predicted from the previous example


def test_packed_forward_equals_separate_forwards(tiny_model_dir):
    """Packed examples get block-diagonal attention: each token's log-prob equals the unpacked one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    examples = [torch.randint(0, 300, (n,)).tolist() for n in (6, 4, 5)]
    ds = Dataset.from_dict({"input_ids": examples, "labels": examples})
    rows = pack_examples(ds, 16)
    packed = collate_causal([rows[i] for i in range(len(rows))], pad_id=0)
    assert "attention_mask" not in packed  # transformers derives the block-diagonal mask from position ids
    with torch.no_grad():
        # use_cache=False as in training: with a cache, transformers does not look for packed sequences
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        offset = 0
        for ids in sorted(examples, key=len, reverse=True):  # best-fit-decreasing order
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            assert torch.allclose(packed_logits[offset : offset + len(ids)], alone, atol=1e-4)
            offset += len(ids)
