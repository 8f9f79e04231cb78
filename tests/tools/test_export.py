"""dpo-cli export: a LoRA run merged into its base computes what base + adapter computed (a 4-bit run's base
dequantized as it trained), a checkpoint comes back as the model it was, and nothing existing is overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import lora_run

TEXT = "The film was a delight from start to finish."


def adapter_logits(run: Path, base_dir: Path, quantization: dict | None = None) -> torch.Tensor:
    from peft import PeftModel

    from dpo_cli.core.recipes import QuantizationSection
    from dpo_cli.models.build import load_4bit
    from dpo_cli.models.sources import ModelSource

    if quantization is None:
        base = AutoModelForCausalLM.from_pretrained(base_dir)
    else:
        base = load_4bit(AutoModelForCausalLM, ModelSource(str(base_dir)), QuantizationSection(**quantization), torch.device("cpu"), torch.float32)
    return logits_of(PeftModel.from_pretrained(base, run / "final"), base_dir)


def logits_of(model: torch.nn.Module, tokenizer_dir: Path) -> torch.Tensor:
    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_a_merged_lora_run_computes_what_base_plus_adapter_computed(zoo, tmp_path, cli, family):
    base_dir = zoo(family)
    run = lora_run(base_dir, tmp_path / "run")
    code, _, err = cli("export", run)
    assert code == 0, err
    out = run / "export"
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    expected = adapter_logits(run, base_dir)
    assert not torch.allclose(expected, logits_of(AutoModelForCausalLM.from_pretrained(base_dir), base_dir), atol=1e-3)
    torch.testing.assert_close(logits_of(merged, out), expected, atol=2e-5, rtol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(base_dir).chat_template
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    end_of_turn = {"qwen2": "<|im_end|>", "llama3": "<|eot_id|>"}[family]
    assert tokenizer.convert_tokens_to_ids(end_of_turn) in (stops if isinstance(stops, list) else [stops])


def test_a_4bit_run_is_merged_into_its_base_as_it_trained(zoo, tmp_path, cli):
    base_dir = zoo("llama3")
    quantization = {"quant_type": "nf4", "compute_dtype": "float32"}
    run = lora_run(base_dir, tmp_path / "qlora", quantization)
    code, _, err = cli("export", run, "--out", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    torch.testing.assert_close(logits_of(merged, base_dir), adapter_logits(run, base_dir, quantization), atol=1e-4, rtol=1e-4)


def test_adapter_only_dtype_and_nothing_overwritten(zoo, tmp_path, cli):
    base_dir = zoo("qwen2")
    run = lora_run(base_dir, tmp_path / "run")
    code, _, err = cli("export", run / "final", "--adapter-only")
    assert code == 0, err
    assert (run / "export-adapter" / "adapter_config.json").is_file() and (run / "export-adapter" / "tokenizer_config.json").is_file()
    code, _, err = cli("export", run, "--dtype", "bf16", "--out", tmp_path / "bf16")
    assert code == 0, err
    assert {p.dtype for p in AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").parameters()} == {torch.bfloat16}
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    for args, message in [
        (("--out", tmp_path / "taken"), "already exists"),
        (("--dtype", "int3"), "--dtype int3"),
        (("--merge", "--adapter-only"), "exclude each other"),
        (("--checkpoint", "step-9"), "not a complete checkpoint"),
    ]:
        code, _, err = cli("export", run, *args)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    code, _, err = cli("export", base_dir, "--adapter-only", "--out", tmp_path / "x")
    assert code == 1 and "full model, not a LoRA adapter" in err


def test_a_checkpoint_exports_as_the_model_it_was(sft_recipe, tmp_path, cli):
    """Step 2 of a 4-step LoRA sft run at a constant rate, rebuilt from the run's recipe, equals the final/ of
    the same run stopped after 2 steps."""
    train = {"max_steps": 4, "save_every": 2, "keep_checkpoints": 3, "lr_scheduler": "constant", "warmup_steps": 0}
    recipe = sft_recipe(model={"lora": {"r": 4}}, train=train)
    for name, steps in (("long", 4), ("short", 2)):
        code, _, err = cli("sft", recipe, "--run-dir", tmp_path / name, "--set", f"train.max_steps={steps}")
        assert code == 0, err
    code, _, err = cli("export", tmp_path / "long", "--checkpoint", "step-2")
    assert code == 0, err
    code, _, err = cli("export", tmp_path / "short", "--out", tmp_path / "short-final")
    assert code == 0, err
    code, _, err = cli("export", tmp_path / "long", "--out", tmp_path / "long-final")
    assert code == 0, err
    logits = {
        name: logits_of(AutoModelForCausalLM.from_pretrained(folder), folder)
        for name, folder in (("step-2", tmp_path / "long" / "export-step-2"), ("short", tmp_path / "short-final"), ("long", tmp_path / "long-final"))
    }
    torch.testing.assert_close(logits["step-2"], logits["short"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits["step-2"], logits["long"], atol=1e-4)
    code, _, err = cli("export", tmp_path / "long" / "checkpoints" / "step-2", "--out", tmp_path / "again")
    assert code == 0, err
    weights = tmp_path / "long" / "checkpoints" / "step-2" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 0xFF]))
    code, _, err = cli("export", tmp_path / "long", "--checkpoint", "step-2", "--out", tmp_path / "damaged")
    assert code == 1 and "is damaged" in err and not (tmp_path / "damaged").exists()


def test_a_lora_reward_model_exports_as_a_classifier_that_scores_as_the_run_does(rm_recipe, tmp_path, cli):
    from transformers import AutoModelForSequenceClassification

    from dpo_cli.models.io import load_reward_model

    code, _, err = cli("rm-train", rm_recipe(model={"lora": {"r": 4}}), "--run-dir", tmp_path / "rm")
    assert code == 0, err
    code, _, err = cli("export", tmp_path / "rm")
    assert code == 0, err
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "export").eval()
    run_model, tokenizer = load_reward_model(str(tmp_path / "rm"), torch.device("cpu"))
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, run_model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
