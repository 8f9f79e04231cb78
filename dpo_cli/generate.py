"""Batched sampling with the KV cache, shared by every stage that generates text."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from dpo_cli.recipes import GenerationSection


@dataclass
class Generation:
    prompt_ids: list[int]
    response_ids: list[int]  # without padding; ends with EOS when `finished`
    text: str  # decoded response, special tokens removed
    finished: bool  # emitted EOS before max_new_tokens


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    cfg: GenerationSection,
    seed: int,
    device: torch.device,
) -> list[Generation]:
    """Sample one response per tokenised prompt: left-padded batches, deterministic for a fixed seed."""
    was_training = model.training
    model.eval()
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    results: list[Generation] = []
    try:
        for start in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[start : start + cfg.batch_size]
            longest = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)  # (B, P), left-padded
            attention_mask = torch.zeros_like(input_ids)
            for i, ids in enumerate(chunk):
                input_ids[i, longest - len(ids) :] = torch.tensor(ids)
                attention_mask[i, longest - len(ids) :] = 1
            sampling = cfg.temperature > 0
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=cfg.max_new_tokens,
                do_sample=sampling,
                temperature=cfg.temperature if sampling else None,
                top_p=cfg.top_p if sampling else None,
                top_k=cfg.top_k if sampling else None,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
                use_cache=True,
            )
            for i, ids in enumerate(chunk):
                new = output[i, longest:].tolist()
                finished = eos_id in new
                if finished:
                    new = new[: new.index(eos_id) + 1]
                else:
                    while new and new[-1] == pad_id and pad_id != eos_id:
                        new.pop()
                text = tokenizer.decode(new, skip_special_tokens=True)
                results.append(Generation(prompt_ids=list(ids), response_ids=new, text=text.strip(), finished=finished))
    finally:
        torch.set_rng_state(generator_state)  # sampling must not shift the training RNG stream
        model.train(was_training)
    return results
