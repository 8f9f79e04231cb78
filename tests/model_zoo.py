"""Tiny random models of the architectures real recipes name, saved as the hub has them: config, weights,
generation_config.json, and a tokenizer with that family's special tokens and chat template.

    qwen2     ChatML, tied embeddings, qkv bias; EOS <|endoftext|> is not the end of turn <|im_end|> (a base model)
    llama3    <|begin_of_text|> added by the tokenizer and the template, header tokens, <|eot_id|> as EOS and no
              pad token (an instruct model; generation_config lists several end tokens)
    mistral   <s>[INST] ... [/INST] answer</s>, no pad token, sliding-window attention
    rm        a GPT-NeoX sequence classifier with one output, its own vocabulary and no chat template (the
              usual classifier reward model)

Built in-process from config; nothing is downloaded. Vocabularies are byte-level BPEs trained on demo text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] + '\\n\\n' %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + (system if loop.first else '') + message['content'] + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    special: tuple[str, ...]  # added as special tokens, in this order (ids 0, 1, ...)
    eos: str
    bos: str | None
    pad: str | None
    end_of_turn: str  # what ends an assistant turn under the chat template
    template: str | None
    add_bos: bool  # the tokenizer itself prepends the BOS to plain text
    generation_eos: tuple[str, ...]  # generation_config.json's eos_token_id


FAMILIES = {
    "qwen2": Family(
        "qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|endoftext|>", None, "<|endoftext|>", "<|im_end|>",
        QWEN2_TEMPLATE, False, ("<|endoftext|>",),
    ),
    "llama3": Family(
        "llama3", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>", "<|begin_of_text|>", None, "<|eot_id|>", LLAMA3_TEMPLATE, True, ("<|end_of_text|>", "<|eot_id|>"),
    ),
    "mistral": Family(
        "mistral", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "</s>", "<s>", None, "</s>", MISTRAL_TEMPLATE, True, ("</s>",),
    ),
    "rm": Family("rm", ("<|endoftext|>", "<|padding|>"), "<|endoftext|>", "<|endoftext|>", "<|padding|>", "<|endoftext|>", None, False, ()),
}


def corpus() -> list[str]:
    from dpo_cli.demo import demo_rows

    return [r["text"] for r in demo_rows("demo:reviews?n=300")] + ["system user assistant You are a helpful assistant."]


def build_tokenizer(family: Family, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(family.special), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    if family.add_bos:
        bos_id = tokenizer.token_to_id(family.bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[(family.bos, bos_id)]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=family.eos, bos_token=family.bos, pad_token=family.pad, model_max_length=4096
    )
    if family.template is not None:
        wrapped.chat_template = family.template
    return wrapped


def build_config(family: Family, tokenizer, hidden: int = 64, layers: int = 2):
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.convert_tokens_to_ids(list(family.generation_eos)) if family.generation_eos else tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    shape = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 4, "intermediate_size": 2 * hidden}
    if family.name == "qwen2":
        return Qwen2Config(**ids, **shape, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=2048)
    if family.name == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256}  # fmt: skip
        return LlamaConfig(**ids, **shape, num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=2048, rope_parameters=rope)
    if family.name == "mistral":
        return MistralConfig(**ids, **shape, num_key_value_heads=2, sliding_window=512, max_position_embeddings=2048)
    return GPTNeoXConfig(**ids, **shape, max_position_embeddings=2048, num_labels=1, architectures=["GPTNeoXForSequenceClassification"])


def save_family(name: str, folder: Path, seed: int = 0, hidden: int = 64) -> Path:
    """One tiny model of the family, saved with its tokenizer and generation config as a hub folder is."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

    family = FAMILIES[name]
    tokenizer = build_tokenizer(family, vocab_size=400 if name == "rm" else 512)
    config = build_config(family, tokenizer, hidden=hidden)
    torch.manual_seed(seed)
    if name == "rm":
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
