"""`dpo` with `dpo.loss: kto`: the step against KTO's definition on float64 log-probs, learning from unpaired
examples, a precomputed reference, the option checks, and the real path (a Qwen2 chat model, conversational
examples as TRL's hub datasets hold them, a LoRA or 4-bit run as the starting policy)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import lora_run, preference_rows, read_jsonl, sequence_logps_float64, write_jsonl, write_recipe
from dpo_cli.core.recipes import DpoSection
from dpo_cli.data.preference_pairs import collate_pairs
from dpo_cli.models.forward import CompletionLogProbs
from dpo_cli.models.roles import Reference
from dpo_cli.stages.dpo import make_step


def test_kto_one_batch_against_an_independent_float64_computation(tiny_model_dir, tiny_tokenizer):
    """A policy moved off its reference: the step's loss and metrics equal KTO's definition on float64 log-probs
    of one sequence per forward pass, the reference point from the mismatched completions."""
    from datasets import Dataset

    from dpo_cli.data.loading import DataReport
    from dpo_cli.data.unpaired import example_encoder, prepare_examples

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    reference = copy.deepcopy(policy)  # moved off the policy: noise lowers its log-probs, so the KL estimate is > 0
    torch.manual_seed(1)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    pairs = preference_rows(3, seed=6)
    rows = [{"prompt": p["prompt"], "completion": p["chosen" if i != 1 else "rejected"], "label": i != 1} for i, p in enumerate(pairs)]
    prepared = prepare_examples(Dataset.from_list(rows), "data.train", DataReport(), "train", seed=0)
    encode = example_encoder(tiny_tokenizer, 128, None)
    batch = collate_pairs([encode(row) for row in prepared], pad_id=tiny_tokenizer.pad_token_id)
    cfg = DpoSection(loss="kto", beta=0.3, desirable_weight=1.5)
    loss, metrics = make_step(cfg, Reference(CompletionLogProbs(policy), CompletionLogProbs(reference)))(CompletionLogProbs(policy), batch)

    lengths = batch["attention_mask"].sum(1)
    logps = lambda model, i: float(sequence_logps_float64(model, batch["input_ids"][i, : lengths[i]], batch["labels"][i, : lengths[i]]))  # noqa: E731
    z = max(0.0, sum(logps(policy, i) - logps(reference, i) for i in range(3, 6)) / 3)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = []
    for i, row in enumerate(rows):
        r = logps(policy, i) - logps(reference, i)
        expected.append(1.5 * (1 - sig(0.3 * (r - z))) if row["label"] else 1 - sig(0.3 * (z - r)))
    assert z > 0 and metrics["kl"].item() == pytest.approx(z, abs=1e-6)
    assert loss.item() == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert metrics["rewards/rejected"].value().item() == pytest.approx(0.3 * (logps(policy, 1) - logps(reference, 1)), abs=1e-6)


def test_kto_learns_from_unpaired_examples_and_a_precomputed_reference_changes_nothing(tmp_path, cli, dpo_recipe):
    """Pairs read as unpaired examples: the loss starts at 0.5 (policy = reference), the desirable examples'
    implicit reward pulls ahead of the undesirable ones', and precomputing the reference log-probs (own and
    mismatched completions) gives the same losses."""
    train = {"max_steps": 30, "learning_rate": 3e-3, "lr_scheduler": "constant", "save_every": None, "eval_every": None}
    data = {"train": "prefs.jsonl", "eval": None, "max_length": 96}
    code, _, err = cli("dpo", dpo_recipe(dpo={"loss": "kto", "beta": 0.5, "show_samples": 0}, data=data, train=train), "--run-dir", tmp_path / "kto")
    assert code == 0, err
    lines = [r for r in read_jsonl(tmp_path / "kto" / "metrics.jsonl") if "split" not in r]
    assert lines[0]["loss"] == pytest.approx(0.5, abs=1e-6) and lines[0]["kl"] == pytest.approx(0, abs=1e-6)
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(lines[-5:], "rewards/margins") > mean(lines[:5], "rewards/margins") + 0.1, [r["rewards/margins"] for r in lines]
    assert mean(lines[-5:], "loss") < mean(lines[:5], "loss")
    summary = json.loads((tmp_path / "kto" / "summary.json").read_text())
    assert summary["examples"] == 30 * 4 and summary["models"] == ["policy", "reference"]

    dpo = {"loss": "kto", "beta": 0.5, "show_samples": 0, "precompute_ref": True}
    code, _, err = cli("dpo", dpo_recipe("pre.yaml", dpo=dpo, data=data, train={**train, "max_steps": 3}), "--run-dir", tmp_path / "pre")
    assert code == 0, err
    precomputed = [r for r in read_jsonl(tmp_path / "pre" / "metrics.jsonl") if "split" not in r]
    for ours, theirs in zip(precomputed, lines[:3]):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5) and ours["kl"] == pytest.approx(theirs["kl"], abs=1e-6)


def test_kto_options_are_checked(cli, dpo_recipe):
    for dpo, message in [
        ({"loss": "kto", "rpo_alpha": 0.5}, "kto has no chosen responses"),
        ({"desirable_weight": 2.0}, "set dpo.loss: kto"),
    ]:
        code, _, err = cli("validate", dpo_recipe(dpo=dpo))
        assert code == 1 and message in err, err


@pytest.mark.parametrize("quantization", [None, {"quant_type": "nf4", "compute_dtype": "float32"}], ids=["lora-run", "4bit-lora-run"])
def test_kto_on_a_chat_model_from_a_lora_run_with_conversational_examples(quantization, zoo, tmp_path, cli):
    """TRL's conversational unpaired layout on a Qwen2 chat model whose starting policy is a LoRA (or 4-bit +
    LoRA) run: it trains, starts at KTO's 0.5 (the reference is that run), and saves final/."""
    base = zoo("qwen2")
    start = lora_run(base, tmp_path / "sft", quantization)
    texts = [(f"Review film {i}.", "A moving, superb film." if i % 2 == 0 else "Dull and tedious.") for i in range(16)]
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}], "label": i % 2 == 0} for i, (p, c) in enumerate(texts)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    model = {"name_or_path": str(start), "lora": {"r": 4, "dropout": 0.0}, **({"quantization": quantization} if quantization else {})}
    recipe = write_recipe(tmp_path / "kto.yaml", {
        "stage": "dpo", "model": model, "data": {"train": "train.jsonl", "max_length": 96},
        "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-3, "log_every": 1, "save_every": None}, "dpo": {"loss": "kto", "show_samples": 1},
    })  # fmt: skip
    code, _, err = cli("dpo", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    lines = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "split" not in m]
    assert lines[0]["loss"] == pytest.approx(0.5, abs=1e-5) and all(math.isfinite(m["kl"]) for m in lines)
    final = tmp_path / "run" / "final"  # merged: the base it trained on (sft run's adapter merged in) lives nowhere else
    assert (final / "config.json").exists() or (final / "adapter_config.json").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["examples"] == 3 * 8
