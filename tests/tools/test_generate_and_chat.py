"""dpo-cli generate and chat: prompts become user turns under the chat template, sampling settings come from
the flags, else the run's recipe, and the same seed gives the same responses, on plain, LoRA and 4-bit runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pexpect
import torch

from helpers import lora_run, read_jsonl, write_jsonl


def direct(model_dir: Path, messages: list[dict], max_new_tokens: int) -> str:
    """Greedy decoding by transformers alone, under the model's chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True).strip()


def test_prompts_are_user_turns_and_greedy_output_equals_transformers(zoo, tmp_path, cli):
    model_dir = zoo("qwen2")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A film?"}]}])
    code, _, err = cli("generate", model_dir, "--prompt", "Tell me about the film.", "--prompts", tmp_path / "prompts.jsonl",
                       "--temperature", "0", "--max-new-tokens", "6", "--out", tmp_path / "out.jsonl")  # fmt: skip
    assert code == 0, err
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["prompt"] for r in rows][0] == "Tell me about the film."
    assert rows[0]["response"] == direct(model_dir, [{"role": "user", "content": "Tell me about the film."}], 6)
    assert rows[1]["response"] == direct(model_dir, rows[1]["prompt"], 6)
    code, _, err = cli("generate", model_dir, "--prompt", "x", "--out", tmp_path / "out.jsonl")
    assert code == 1 and "exists" in err


def test_the_runs_sampling_settings_apply_unless_flags_say_otherwise_and_seeds_repeat(zoo, tmp_path, cli):
    run = lora_run(zoo("qwen2"), tmp_path / "run", generation={"max_new_tokens": 3, "temperature": 1.0})
    outputs = {}
    for name, args in [("a", ()), ("b", ()), ("seed", ("--seed", "5")), ("long", ("--max-new-tokens", "12"))]:
        code, _, err = cli("generate", run, "--prompt", "The film", "--prompt", "A review:", *args, "--out", tmp_path / f"{name}.jsonl")
        assert code == 0, err
        outputs[name] = read_jsonl(tmp_path / f"{name}.jsonl")
    assert outputs["a"] == outputs["b"] and outputs["a"] != outputs["seed"]
    assert all(r["tokens"] <= 3 for r in outputs["a"]) and any(r["tokens"] > 3 for r in outputs["long"])


def test_a_4bit_run_generates_and_plain_text_prompts_print(zoo, tmp_path, cli):
    run = lora_run(zoo("llama3"), tmp_path / "qlora", quantization={"quant_type": "nf4", "compute_dtype": "float32"})
    code, out, err = cli("generate", run, "--prompt", "The film was", "--raw", "--max-new-tokens", "4")
    assert code == 0, err
    assert ">>> The film was" in out
    code, _, err = cli("generate", run)
    assert code == 1 and "--prompt" in err
    code, _, err = cli("generate", "org/not-here", "--prompt", "x")
    assert code == 1 and err.startswith("error: RUN_OR_MODEL:") and len(err.strip().splitlines()) == 1, err


def test_chat_streams_replies_under_the_template_and_resets(zoo):
    env = {**os.environ, "TERM": "xterm", "PYTHONUNBUFFERED": "1"}
    args = ["-m", "dpo_cli", "chat", str(zoo("qwen2")), "--temperature", "0", "--max-new-tokens", "5", "--system", "Be brief."]
    child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=120, dimensions=(40, 160))
    child.expect("you> ")
    child.sendline("Tell me about the film.")
    child.expect("model> ")
    child.expect("you> ")
    first = child.before.strip()
    expected = direct(zoo("qwen2"), [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the film."}], 5)
    assert first.replace("\r", "") == expected
    child.sendline("/reset")
    child.expect("conversation reset")
    child.expect("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
