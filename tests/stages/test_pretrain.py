"""`dpo-cli pretrain` end to end: from scratch with a trained tokenizer, continued with LoRA / 4-bit,
and the shipped demo recipes (what `make demo` runs) under --smoke."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import REPO, read_jsonl, torchrun, write_jsonl, write_recipe

SHRINK = [
    "--set", "model.init.hidden_size=32",
    "--set", "model.init.num_hidden_layers=1",
    "--set", "model.init.num_attention_heads=2",
    "--set", "tokenizer.train_vocab_size=300",
    "--set", "data.train=demo:reviews?n=200",
]  # fmt: skip


def test_pretrain_from_scratch_with_trained_tokenizer(tmp_path, cli):
    run = tmp_path / "pretrain"
    code, out, err = cli("pretrain", REPO / "recipes/demo/pretrain.yaml", "--smoke", "--run-dir", run, *SHRINK, "--set", "train.save_every=2")
    assert code == 0, err
    assert "byte-level BPE tokenizer" in err
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert len(tokenizer) == 300 and tokenizer.eos_token == "<|endoftext|>"
    assert (run / "checkpoints" / "step-2" / "tokenizer" / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.config.vocab_size == 300 and model.config.hidden_size == 32
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data"]["rows"]["train_blocks"] > 0
    assert "eval_perplexity" in summary
    assert len(read_jsonl(run / "samples.jsonl")) == 2


@pytest.mark.parametrize("extra", [{"lora": {"r": 4}}, {"lora": {"r": 4}, "quantization": {}}], ids=["lora", "qlora"])
def test_continued_pretraining(extra, tmp_path, cli, tiny_model_dir):
    from dpo_cli.demo import demo_rows

    write_jsonl(tmp_path / "corpus.jsonl", demo_rows("demo:reviews?n=60"))
    recipe = write_recipe(
        tmp_path / "pretrain.yaml",
        {
            "model": {"name_or_path": str(tiny_model_dir), **extra},
            "data": {"train": "corpus.jsonl", "eval": 0.1, "max_length": 64},
            "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-3, "save_every": None},
            "pretrain": {"show_samples": 1},
        },
    )
    code, _, err = cli("pretrain", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()


def test_demo_recipes_chain_under_smoke(tmp_path, cli):
    """The demo's pretrain -> sft chain, as `make demo` runs it, in seconds."""
    code, _, err = cli("pretrain", REPO / "recipes/demo/pretrain.yaml", "--smoke", "--run-dir", tmp_path / "pretrain", *SHRINK)
    assert code == 0, err
    code, out, err = cli(
        "sft", REPO / "recipes/demo/sft.yaml", "--smoke", "--run-dir", tmp_path / "sft", "--set", f"model.name_or_path={tmp_path / 'pretrain'}"
    )
    assert code == 0, err
    assert "sft samples" in out


def test_malformed_text_is_named_before_the_tokenizer_is_trained(tmp_path, cli):
    from dpo_cli.demo import demo_rows

    rows = demo_rows("demo:reviews?n=20")
    rows[5] = {"text": None}
    write_jsonl(tmp_path / "corpus.jsonl", rows)
    args = ["pretrain", REPO / "recipes/demo/pretrain.yaml", "--smoke", "--run-dir", tmp_path / "run", *SHRINK]
    code, _, err = cli(*args, "--set", f"data.train={tmp_path / 'corpus.jsonl'}")
    assert code == 1 and "data.train row 6: 'text' is missing" in err and "Traceback" not in err


def test_pretrain_on_two_processes_trains_the_tokenizer_once(tmp_path):
    run = tmp_path / "pretrain"
    done = torchrun("pretrain", REPO / "recipes/demo/pretrain.yaml", "--smoke", "--run-dir", run, *SHRINK)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("byte-level BPE tokenizer") == 1  # the main process trains it, the other loads it
    assert len(AutoTokenizer.from_pretrained(run / "final")) == 300
    assert AutoModelForCausalLM.from_pretrained(run / "final").config.hidden_size == 32
    assert json.loads((run / "summary.json").read_text())["device"].startswith("2 processes")
