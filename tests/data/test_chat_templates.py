"""tokenizer.chat_template by preset name or .jinja file: each preset renders a known conversation exactly,
agrees with its family's own template, and a tokenizer without its markers gets them as single tokens."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from helpers import write_jsonl
from dpo_cli.core.errors import UserError
from dpo_cli.data.chat_templates import PRESETS, add_markers, chat_template_text

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]
EXPECTED = {  # with BOS <s> and EOS </s>, and the prompt for the next assistant turn
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Be brief.\n\nHi[/INST] Hello.</s>[INST] Bye[/INST]",
    "gemma": "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n"
    "<start_of_turn>model\n",
    "zephyr": "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello.</s>\n<|user|>\nBye</s>\n<|assistant|>\n",
}


@pytest.fixture()
def mistral_tokenizer(zoo):
    return AutoTokenizer.from_pretrained(zoo("mistral"))  # BOS <s>, EOS </s>


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_renders_a_known_conversation_exactly(preset, mistral_tokenizer):
    mistral_tokenizer.chat_template = chat_template_text(preset)
    assert mistral_tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == EXPECTED[preset]


@pytest.mark.parametrize("preset, family", [("llama3", "llama3"), ("mistral", "mistral"), ("chatml", "qwen2")])
def test_a_preset_renders_as_its_familys_own_template(preset, family, zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo(family))
    own = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    tokenizer.chat_template = chat_template_text(preset)
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == own


def test_a_tokenizer_without_the_markers_gets_them_as_single_tokens(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    before = len(tokenizer)
    assert "<|im_start|>, <|im_end|> as special tokens" in add_markers(tokenizer, "chatml")
    assert len(tokenizer) == before + 2 and len(tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]) == 1
    assert add_markers(tokenizer, "chatml") is None and add_markers(tokenizer, "{{ x }}") is None  # once; text adds nothing


def test_a_template_file_or_text_and_what_is_neither(tmp_path):
    (tmp_path / "mine.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert chat_template_text(str(tmp_path / "mine.jinja")) == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert chat_template_text("{{ messages }}") == "{{ messages }}"
    with pytest.raises(UserError, match="does not exist"):
        chat_template_text(str(tmp_path / "gone.jinja"))
    with pytest.raises(UserError, match="'chatmll' is not a preset \\(chatml, llama3, mistral, gemma, zephyr\\)"):
        chat_template_text("chatmll")


def test_sft_with_a_preset_and_a_template_file_beside_the_recipe(tmp_path, cli, sft_recipe, sft_rows):
    """The issue's failure: a .jinja path was taken as the template's text and every row was dropped."""
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"].strip()}]} for r in sft_rows]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    code, _, err = cli("sft", sft_recipe(data={"train": "chat.jsonl", "eval": 4, "max_length": 96}, tokenizer={"chat_template": "chatml"}), "--run-dir", tmp_path / "a")
    assert code == 0, err
    assert "added its markers <|im_start|>, <|im_end|>" in err
    saved = AutoTokenizer.from_pretrained(tmp_path / "a" / "final")
    assert saved.chat_template == PRESETS["chatml"].template and len(saved("<|im_end|>", add_special_tokens=False)["input_ids"]) == 1
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["data_format"] == "conversational"
    (tmp_path / "turns.jinja").write_text(PRESETS["zephyr"].template)
    code, _, err = cli("sft", sft_recipe(data={"train": "chat.jsonl", "eval": 4, "max_length": 96}, tokenizer={"chat_template": "turns.jinja"}), "--run-dir", tmp_path / "b")
    assert code == 0, err
    assert AutoTokenizer.from_pretrained(tmp_path / "b" / "final").chat_template == PRESETS["zephyr"].template
