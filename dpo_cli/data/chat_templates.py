"""Chat templates by name: `tokenizer.chat_template` takes a preset (chatml, llama3, mistral, gemma, zephyr),
a path to a `.jinja` file, or the template's text. A preset also names its turn markers, which a tokenizer
without them gets as special tokens (so that a marker is one token, and generation can stop at the end of a
turn)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpo_cli.core.errors import UserError


@dataclass(frozen=True)
class Preset:
    template: str
    markers: tuple[str, ...]  # the special tokens its turns are made of


# The formats as their model families publish them; a system message goes where the family puts it (mistral
# and gemma have no system turn: it opens the first user turn).
PRESETS = {
    "chatml": Preset(
        "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
        ("<|im_start|>", "<|im_end|>"),
    ),
    "llama3": Preset(
        "{{- bos_token }}{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "mistral": Preset(
        "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] + '\\n\\n' %}"
        "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
        "{{- bos_token }}{%- for message in messages %}"
        "{%- if message['role'] == 'user' %}{{- '[INST] ' + (system if loop.first else '') + message['content'] + '[/INST]' }}"
        "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}",
        ("[INST]", "[/INST]"),
    ),
    "gemma": Preset(
        "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] + '\\n\\n' %}"
        "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
        "{{- bos_token }}{%- for message in messages %}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{- '<start_of_turn>' + role + '\\n' + (system if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}",
        ("<start_of_turn>", "<end_of_turn>"),
    ),
    "zephyr": Preset(
        "{%- for message in messages %}{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}",
        ("<|system|>", "<|user|>", "<|assistant|>"),
    ),
}
TEMPLATE_FILES = (".jinja", ".jinja2", ".j2")


def chat_template_text(value: str) -> str:
    """The template a recipe's `tokenizer.chat_template` means: a preset's, a `.jinja` file's, or the text."""
    if value in PRESETS:
        return PRESETS[value].template
    if value.endswith(TEMPLATE_FILES):
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserError(f"tokenizer.chat_template: {value} does not exist (a .jinja file, a preset: {', '.join(PRESETS)}, or the template's text)")
        return path.read_text(encoding="utf-8")
    if "{{" not in value and "{%" not in value:
        raise UserError(f"tokenizer.chat_template: {value!r} is not a preset ({', '.join(PRESETS)}), a .jinja file or a Jinja template")
    return value


def add_markers(tokenizer: object, value: str) -> str | None:
    """A preset's turn markers the tokenizer lacks, added as special tokens; returns a note (the model's
    embeddings grow to match, and the new rows start untrained)."""
    if value not in PRESETS:
        return None
    vocabulary = tokenizer.get_vocab()
    missing = [marker for marker in PRESETS[value].markers if marker not in vocabulary]
    if not missing:
        return None
    tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return (
        f"tokenizer.chat_template {value}: added its markers {', '.join(missing)} as special tokens (new embedding rows: "
        "train them, i.e. full weights, or LoRA with the embeddings in model.lora.modules_to_save)"
    )
