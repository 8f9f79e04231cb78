"""The reference log-probs cache's key: the weights a reference computes with."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from dpo_cli.core.sections import ModelSection
from dpo_cli.models.build import build_causal_lm
from dpo_cli.models.forward import CompletionLogProbs
from dpo_cli.models.roles import Reference
from dpo_cli.train.reference_logps import ReferenceCache, cache_key, cache_root, weights_fingerprint

CPU = torch.device("cpu")


def test_a_lora_base_hashes_as_the_plain_model_and_any_weight_change_is_seen(tiny_model_dir, tiny_tokenizer):
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = build_causal_lm(ModelSection(name_or_path=str(tiny_model_dir), lora={"r": 4, "modules_to_save": ["lm_head"]}), tiny_tokenizer, CPU, seed=0).model
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.1)  # trained adapters: the reference (adapters off) does not see them
    assert weights_fingerprint(lora) == weights_fingerprint(plain)
    with torch.no_grad():
        plain.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-3
    assert weights_fingerprint(lora) != weights_fingerprint(plain)
    quantized = build_causal_lm(ModelSection(name_or_path=str(tiny_model_dir), lora={"r": 4}, quantization={}), tiny_tokenizer, CPU, seed=0).model
    assert weights_fingerprint(quantized) not in (weights_fingerprint(lora), weights_fingerprint(plain))


def test_the_key_names_every_input_and_the_cache_lives_where_the_environment_says(monkeypatch, tmp_path):
    how = {"precision": "no", "device": "cpu", "quantization": None}
    key = cache_key("tokens", "weights", how)
    assert key == cache_key("tokens", "weights", dict(how))
    assert len({key, cache_key("other", "weights", how), cache_key("tokens", "other", how), cache_key("tokens", "weights", {**how, "precision": "bf16"})}) == 4
    monkeypatch.setenv("DPO_CLI_CACHE", str(tmp_path / "here"))
    assert cache_root() == tmp_path / "here"
    monkeypatch.delenv("DPO_CLI_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "dpo-cli"


def test_the_same_weights_under_another_config_are_another_entry(tiny_model_dir):
    how = {"precision": "no", "device": "cpu", "quantization": None}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = ReferenceCache(Reference(CompletionLogProbs(model), None), how).path("tokens")
    model.config.rope_theta = 1e6  # other positions, the same tensors
    assert ReferenceCache(Reference(CompletionLogProbs(model), None), how).path("tokens") != before
