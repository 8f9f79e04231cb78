"""`dpo-cli sft` end to end on a tiny model: full, LoRA, 4-bit + LoRA, chat data, packing, chained runs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import model_modes, read_jsonl, write_jsonl

MODES = model_modes()


def load_final(final):
    if (final / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(final)
    return AutoModelForCausalLM.from_pretrained(final)


@pytest.mark.parametrize("mode", MODES)
def test_sft_end_to_end(mode, tmp_path, cli, sft_recipe, tiny_model_dir):
    recipe = sft_recipe(model={"name_or_path": str(tiny_model_dir), **MODES[mode]})
    code, out, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert summary["eval_metrics"]["loss"] > 0 and summary["peak_memory_bytes"] > 0
    assert summary["versions"]["transformers"]
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics if "split" not in m] == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in metrics if m.get("split") == "eval"] == [6]
    assert (run / "recipe.yaml").exists() and read_jsonl(run / "samples.jsonl")
    assert (run / "training.png").read_bytes().startswith(b"\x89PNG") and summary["plot"] == str(run / "training.png")
    assert "sft · completed" in out

    # final/ is plain Hugging Face format: loads without dpo-cli and generates
    final = run / "final"
    model = load_final(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("The Golden Road is", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    if mode == "full":
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    else:
        assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
        assert not (final / "model.safetensors").exists()


def test_sft_on_chat_messages_uses_default_template(tmp_path, cli, sft_recipe, sft_rows):
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"].strip()}]} for r in sft_rows]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    recipe = sft_recipe(data={"train": "chat.jsonl", "eval": 4, "max_length": 96})
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert "no chat template" in err
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    assert tokenizer.chat_template  # saved, so later stages format conversations the same way
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_format"] == "conversational"


def test_sft_packing(tmp_path, cli, sft_recipe):
    recipe = sft_recipe(sft={"packing": True, "show_samples": 0}, data={"train": "data/train.jsonl", "max_length": 128})
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert re.search(r"packed 40 examples into \d+ rows of at most 128 tokens", err)


def test_sft_from_a_lora_run_starts_from_base_plus_adapter(tmp_path, cli, sft_recipe):
    first = sft_recipe("first.yaml", model={"lora": {"r": 4}}, train={"learning_rate": 5e-2})
    assert cli("sft", first, "--run-dir", tmp_path / "first")[0] == 0
    second = sft_recipe("second.yaml", model={"name_or_path": str(tmp_path / "first"), "lora": {"r": 4}}, train={"max_steps": 2})
    code, _, err = cli("sft", second, "--run-dir", tmp_path / "second")
    assert code == 0, err
    assert "merged into its base" in err
    # The second adapter's base (the first run merged) exists only in the run dir: final/ holds the adapter
    # merged into it, a plain model whose weights moved away from that base.
    from peft import AutoPeftModelForCausalLM

    final = tmp_path / "second" / "final"
    assert not (final / "adapter_config.json").exists() and not (tmp_path / "second" / "base").exists()  # the merge cache is gone
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    base = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "first" / "final").merge_and_unload().eval()
    with torch.no_grad():
        assert not torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("mode", ["full", "qlora"])
def test_gradient_checkpointing_gives_the_same_loss(mode, tmp_path, cli, sft_recipe, tiny_model_dir):
    losses = {}
    for checkpointing in (False, True):
        recipe = sft_recipe(
            f"gc-{checkpointing}.yaml",
            model={"name_or_path": str(tiny_model_dir), "gradient_checkpointing": checkpointing, **MODES[mode]},
            train={"max_steps": 2, "save_every": None},
            sft={"show_samples": 0},
        )
        code, _, err = cli("sft", recipe, "--run-dir", tmp_path / f"gc-{checkpointing}")
        assert code == 0, err
        losses[checkpointing] = [m["loss"] for m in read_jsonl(tmp_path / f"gc-{checkpointing}" / "metrics.jsonl") if "split" not in m]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_bf16_autocast_and_tensorboard(tmp_path, cli, sft_recipe):
    recipe = sft_recipe(train={"max_steps": 2, "mixed_precision": "bf16", "tensorboard": True}, sft={"show_samples": 0})
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16"
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_dropped_rows_are_not_sampled(tmp_path, cli, sft_recipe, sft_rows):
    rows = [{"prompt": None, "completion": " x"}, *sft_rows]
    write_jsonl(tmp_path / "dirty.jsonl", rows)
    recipe = sft_recipe(data={"train": "dirty.jsonl", "eval": None, "bad_rows": "drop"}, train={"max_steps": 2})
    code, out, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["dropped"] == {"train/malformed": 1}
    assert read_jsonl(tmp_path / "run" / "samples.jsonl")[0]["prompt"] == sft_rows[0]["prompt"]


def test_padding_free_rows_train_like_a_row_per_example(tmp_path, cli, sft_recipe):
    """sft.padding_free (the default) packs a batch's examples into rows as long as its longest; the run is the
    one of a row per example, up to float rounding."""
    from helpers import assert_equivalent

    for name, padding_free in (("packed", True), ("rows", False)):
        recipe = sft_recipe(f"{name}.yaml", sft={"padding_free": padding_free, "show_samples": 0})
        code, _, err = cli("sft", recipe, "--run-dir", tmp_path / name)
        assert code == 0, err
    assert_equivalent(tmp_path / "packed", tmp_path / "rows", ("loss", "grad_norm"))
