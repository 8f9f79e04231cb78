"""Shared fixtures: tiny real models and tokenizers built in-process, data files, recipes, the CLI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import preference_rows, with_sections, write_jsonl, write_recipe

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Each test its own $DPO_CLI_CACHE: nothing is written to ~/.cache, and no test sees another's entries."""
    monkeypatch.setenv("DPO_CLI_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A 320-token byte-level BPE trained on demo reviews (what `pretrain` would train)."""
    from dpo_cli.demo import demo_rows
    from dpo_cli.data.tokenization import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    texts = [r["text"] for r in demo_rows("demo:reviews?n=300")]
    train_bpe_tokenizer(texts, 320, model_max_length=256).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer Llama saved with its tokenizer, as a hub model would be (hidden 64 suits 4-bit blocks)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture()
def sft_rows() -> list[dict[str, str]]:
    from dpo_cli.demo import demo_rows

    return demo_rows("demo:sft?n=48")


@pytest.fixture()
def sft_recipe(tmp_path, tiny_model_dir, sft_rows):
    """Build an sft recipe file over a tiny model and local jsonl data; keyword sections override."""

    def make(name: str = "sft.yaml", **sections: Any) -> Path:
        write_jsonl(tmp_path / "data" / "train.jsonl", sft_rows)
        recipe: dict[str, Any] = {
            "stage": "sft",
            "seed": 7,
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": "data/train.jsonl", "eval": 8, "max_length": 96},
            "train": {"max_steps": 6, "batch_size": 4, "learning_rate": 3e-3, "log_every": 1, "save_every": 2, "warmup_steps": 1},
            "generation": {"max_new_tokens": 8},
            "sft": {"show_samples": 1},
        }
        return write_recipe(tmp_path / name, with_sections(recipe, sections))

    return make


@pytest.fixture()
def cli(monkeypatch):
    """Run the dpo-cli app in-process; returns (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from dpo_cli.cli import app

    runner = CliRunner()

    def invoke(*args: str) -> tuple[int, str, str]:
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return invoke


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A scalar sequence classifier on the tiny Llama, as rm-train (or any hub reward model) saves one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    folder = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.fixture()
def dpo_recipe(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "prefs.jsonl", preference_rows(40))

    def make(name: str = "dpo.yaml", **sections):
        recipe = {
            "stage": "dpo",
            "seed": 11,
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": "prefs.jsonl", "eval": 8, "max_length": 96},
            "train": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-3, "log_every": 1, "save_every": 2},
            "generation": {"max_new_tokens": 6},
            "dpo": {"beta": 0.1, "show_samples": 1},
        }
        return write_recipe(tmp_path / name, with_sections(recipe, sections))

    return make


@pytest.fixture()
def rm_recipe(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", preference_rows(48, seed=1))
    write_jsonl(tmp_path / "eval.jsonl", preference_rows(16, seed=2))

    def make(name: str = "rm.yaml", **sections):
        recipe = {
            "stage": "rm-train",
            "seed": 5,
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 256},
            "train": {"max_steps": 4, "batch_size": 8, "learning_rate": 1e-3, "log_every": 1, "save_every": 2},
        }
        return write_recipe(tmp_path / name, with_sections(recipe, sections))

    return make


@pytest.fixture()
def ppo_recipe(tmp_path, tiny_model_dir, tiny_reward_model_dir):
    def make(name: str = "ppo.yaml", **sections):
        recipe = {
            "stage": "ppo",
            "seed": 3,
            "model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 4, "dropout": 0.0}},
            "data": {"train": "demo:prompts?n=16", "max_length": 48},
            "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-3, "lr_scheduler": "constant", "log_every": 1, "save_every": 2},
            "generation": {"max_new_tokens": 6, "temperature": 1.0},
            "ppo": {"reward_model": str(tiny_reward_model_dir), "mini_batch_size": 2, "ppo_epochs": 2, "sample_every": 2, "show_samples": 1},
        }
        return write_recipe(tmp_path / name, with_sections(recipe, sections))

    return make


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """zoo(name) -> the folder of a tiny hub-style model of that family (qwen2, llama3, mistral, rm), built once
    per session (tests/model_zoo.py says what each one is like)."""
    from model_zoo import save_family

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = save_family(name, tmp_path_factory.mktemp(f"zoo-{name}"))
        return built[name]

    return get


