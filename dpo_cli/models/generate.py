"""Batched sampling with the KV cache, shared by every stage that generates text."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from dpo_cli.data.encoding import pad
from dpo_cli.models.build import ModelBundle
from dpo_cli.core.recipes import GenerationSection
from dpo_cli.core.rundir import RunDir
from dpo_cli.core.atomic import atomic_write_jsonl
from dpo_cli.core.runtime import Runtime


@dataclass
class Generation:
    prompt_ids: list[int]
    response_ids: list[int]  # without padding; ends with EOS when `finished`
    text: str  # decoded response, special tokens removed, spacing kept: prompt + text re-tokenises as sampled
    finished: bool  # emitted EOS before max_new_tokens


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> list[int]:
    """EOS, the model's own end tokens, and the chat template's end-of-turn token (e.g. ChatML's <|im_end|>,
    which is not the EOS of a base model): generation stops at whichever comes first."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    if getattr(tokenizer, "chat_template", None):
        try:
            marker = "\u2063dpo-cli\u2063"
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False
            )
            after = tokenizer(text[text.rindex(marker) + len(marker) :], add_special_tokens=False)["input_ids"]
            special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
            if after and after[0] in special:
                ids.add(after[0])
        except Exception:  # a template that cannot render this probe simply adds nothing
            pass
    return sorted(i for i in ids if i is not None)


def sampling_options(cfg: GenerationSection, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int]) -> dict:
    """model.generate's sampling arguments for a generation section (temperature 0: greedy)."""
    sampling = cfg.temperature > 0
    return {
        "max_new_tokens": cfg.max_new_tokens, "do_sample": sampling, "temperature": cfg.temperature if sampling else None,
        "top_p": cfg.top_p if sampling else None, "top_k": cfg.top_k if sampling else None,
        "pad_token_id": tokenizer.pad_token_id, "eos_token_id": stop_ids, "use_cache": True,
    }  # fmt: skip


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    cfg: GenerationSection,
    seed: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Sample one response per tokenised prompt: left-padded batches, deterministic for a fixed seed; results in
    the prompts' order. Prompts of more than one batch are batched by length (the longest first, so a batch
    that does not fit in memory fails at once), so a short prompt is not padded to a long one's length. `on_batch(n)` is told after each batch how many
    prompts it finished (for a progress bar)."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    stop_ids = stop_token_ids(tokenizer, model)
    order = list(range(len(prompts)))
    if len(prompts) > cfg.batch_size:
        order.sort(key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):  # sampling must not shift the training RNG streams
        torch.manual_seed(seed)
        for start in range(0, len(prompts), cfg.batch_size):
            members = order[start : start + cfg.batch_size]
            chunk = [prompts[i] for i in members]
            input_ids, attention_mask = pad(chunk, pad_id, left=True)  # (B, P): generation continues on the right
            longest = input_ids.size(1)
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **sampling_options(cfg, tokenizer, stop_ids)
            )
            for i, (index, ids) in enumerate(zip(members, chunk)):
                new = output[i, longest:].tolist()
                stop = next((j for j, token in enumerate(new) if token in stop_ids), None)
                finished = stop is not None
                if finished:
                    new = new[: stop + 1]
                else:
                    while new and new[-1] == pad_id:
                        new.pop()
                text = tokenizer.decode(new, skip_special_tokens=True)
                results[index] = Generation(prompt_ids=list(ids), response_ids=new, text=text, finished=finished)
            if on_batch is not None:
                on_batch(len(chunk))
    model.train(was_training)
    return results


def write_samples(
    run: RunDir,
    runtime: Runtime,
    bundle: ModelBundle,
    prompts: list[tuple[str, list[int]]],
    cfg: GenerationSection,
    seed: int,
) -> list[dict[str, str]]:
    """Sample a response per (display text, token ids) prompt; saved to RUN/samples.jsonl."""
    if not prompts:
        return []
    model = runtime.accelerator.unwrap_model(bundle.model)
    generations = generate(model, bundle.tokenizer, [ids for _, ids in prompts], cfg, seed, runtime.device)
    samples = [{"prompt": text, "response": g.text.strip()} for (text, _), g in zip(prompts, generations)]
    if runtime.is_main:
        atomic_write_jsonl(run.path / "samples.jsonl", samples)
    return samples
