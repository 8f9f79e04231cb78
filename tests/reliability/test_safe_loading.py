"""Promise: nothing a file holds runs as code. Weights come from safetensors only unless a recipe allows pickle
files it trusts; the run dir's own recipe.yaml is read with the safe loader; each refusal is one line."""

from __future__ import annotations

import shutil

import torch


def pickled_copy(folder, target, weights="model.safetensors", pickle_name="pytorch_model.bin"):
    """The folder as older tools saved it: the same weights as a pickle file instead of safetensors."""
    from safetensors.torch import load_file

    shutil.copytree(folder, target)
    torch.save(load_file(str(target / weights)), target / pickle_name)
    (target / weights).unlink()
    return target


def test_pickle_weights_are_refused_unless_the_recipe_trusts_them(tmp_path, cli, sft_recipe, tiny_model_dir):
    model = pickled_copy(tiny_model_dir, tmp_path / "old-model")
    code, _, err = cli("sft", sft_recipe(model={"name_or_path": str(model)}), "--run-dir", tmp_path / "run")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{model / 'pytorch_model.bin'} is a pickle file, which can run code when loaded; convert it to safetensors" in err
    assert not (tmp_path / "run").exists()
    trusted = sft_recipe("trusted.yaml", model={"name_or_path": str(model), "allow_pickle_weights": True}, train={"max_steps": 1})
    code, _, err = cli("sft", trusted, "--run-dir", tmp_path / "trusted")
    assert code == 0, err


def test_a_pickled_adapter_is_refused_too(tmp_path, cli, sft_recipe, dpo_recipe):
    assert cli("sft", sft_recipe(model={"lora": {"r": 4}}, train={"max_steps": 1}), "--run-dir", tmp_path / "lora")[0] == 0
    adapter = pickled_copy(tmp_path / "lora" / "final", tmp_path / "old-adapter", "adapter_model.safetensors", "adapter_model.bin")
    code, _, err = cli("dpo", dpo_recipe(model={"name_or_path": str(adapter)}), "--run-dir", tmp_path / "run")
    assert code == 1 and "adapter_model.bin is a pickle file" in err and "Traceback" not in err


def test_a_tag_in_the_run_dirs_own_recipe_is_one_line_and_never_constructed(tmp_path, cli, sft_recipe):
    recipe = sft_recipe(train={"max_steps": 1})
    assert cli("sft", recipe, "--run-dir", tmp_path / "run")[0] == 0
    saved = tmp_path / "run" / "recipe.yaml"
    saved.write_text(saved.read_text() + "canary: !!python/object/apply:os.system ['touch " + str(tmp_path / "pwned") + "']\n")
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 1 and f"{saved}: this run dir's recipe cannot be read" in err and "Traceback" not in err
    assert not (tmp_path / "pwned").exists()


def as_hub_repository(folder, cache, repo_id, monkeypatch):
    """`folder` as the hub cache holds a downloaded repository (models--ORG--NAME/snapshots/SHA, refs/main),
    read offline through huggingface_hub as a hub id would be."""
    import huggingface_hub.constants

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return repo_id


def test_a_hub_repository_with_only_pickle_weights_is_refused_too(tmp_path, cli, sft_recipe, tiny_model_dir, monkeypatch):
    """No local check can look inside a hub repository before the download: from_pretrained is told to take
    safetensors only, and a repository without them is one line."""
    repo_id = as_hub_repository(pickled_copy(tiny_model_dir, tmp_path / "old-model"), tmp_path / "hub", "acme/old-model", monkeypatch)
    code, _, err = cli("sft", sft_recipe(model={"name_or_path": repo_id}), "--run-dir", tmp_path / "run")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "model 'acme/old-model' has no safetensors weights, only pickle files, which can run code when loaded" in err
    trusted = sft_recipe("trusted.yaml", model={"name_or_path": repo_id, "allow_pickle_weights": True}, train={"max_steps": 1})
    code, _, err = cli("sft", trusted, "--run-dir", tmp_path / "trusted")
    assert code == 0, err
    safe = as_hub_repository(tiny_model_dir, tmp_path / "hub", "acme/safe-model", monkeypatch)
    assert cli("sft", sft_recipe("safe.yaml", model={"name_or_path": safe}, train={"max_steps": 1}), "--run-dir", tmp_path / "safe")[0] == 0


def planted(folder, target, canary, model_type=None):
    """A model folder whose config and tokenizer config point (auto_map) at a module that, if ever imported,
    leaves a canary file: what a repository carrying remote code looks like."""
    import json

    shutil.copytree(folder, target)
    code = f"open({str(canary)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilForCausalLM\n"
    (target / "evil.py").write_text(code)
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    if model_type:
        config["model_type"] = model_type
    (target / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((target / "tokenizer_config.json").read_text())
    tokenizer["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return target


def test_remote_code_in_a_model_folder_never_runs(tmp_path, cli, sft_recipe, tiny_model_dir):
    canary = tmp_path / "pwned"
    known = planted(tiny_model_dir, tmp_path / "known-type", canary)  # a type transformers knows: its own code is used
    code, _, err = cli("sft", sft_recipe(model={"name_or_path": str(known)}, train={"max_steps": 1}), "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert not canary.exists()
    unknown = planted(tiny_model_dir, tmp_path / "unknown-type", canary, model_type="evil-net")  # only the planted code could load it
    code, _, err = cli("sft", sft_recipe("unknown.yaml", model={"name_or_path": str(unknown)}), "--run-dir", tmp_path / "refused")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "can only be loaded by running code it ships (auto_map)" in err and "model.trust_remote_code: true" in err
    assert not canary.exists() and not (tmp_path / "refused").exists()
