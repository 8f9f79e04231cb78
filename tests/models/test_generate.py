"""Batched sampling: prompts batched by length, results in the prompts' order."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from dpo_cli.core.sections import GenerationSection
from dpo_cli.models.generate import generate

CPU = torch.device("cpu")


def test_prompts_of_several_batches_are_batched_by_length_and_come_back_in_order(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    text = "the film was a quiet delight from start to finish and the cast"
    ids = tiny_tokenizer(text)["input_ids"]
    prompts = [ids[:12], ids[:2], ids[:11], ids[:3]]
    cfg = GenerationSection(max_new_tokens=4, temperature=0.0, batch_size=2)
    widths, original = [], model.generate
    model.generate = lambda **kwargs: widths.append(kwargs["input_ids"].shape[1]) or original(**kwargs)
    batched = generate(model, tiny_tokenizer, prompts, cfg, seed=0, device=CPU)
    assert widths == [12, 3]  # the two long prompts together, then the two short ones: 18 padding tokens fewer
    assert [g.prompt_ids for g in batched] == prompts
    alone = [generate(model, tiny_tokenizer, [p], cfg, seed=0, device=CPU)[0] for p in prompts]
    assert [g.response_ids for g in batched] == [g.response_ids for g in alone]
    widths.clear()
    generate(model, tiny_tokenizer, prompts, GenerationSection(max_new_tokens=2, temperature=1.0, batch_size=4), seed=0, device=CPU)
    assert widths == [12]  # one batch: kept in the given order, so a sample stays what it was
