"""The model builder: full / LoRA / 4-bit + LoRA, new models, adapters merged (never the bare base), final/."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_cli.core.errors import UserError
from dpo_cli.models.build import build_causal_lm, build_tokenizer, count_parameters
from dpo_cli.models.io import save_final
from dpo_cli.models.sources import resolve_source
from dpo_cli.core.recipes import ModelSection, TokenizerSection

CPU = torch.device("cpu")


def model_section(**values) -> ModelSection:
    return ModelSection(**values)


@pytest.fixture(scope="module")
def random_adapter_dir(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter with non-zero B matrices (as after training), saved against the tiny base."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 42, 99, 7, 250]])


def test_full_lora_and_4bit_builds(tiny_model_dir, tiny_tokenizer):
    full = build_causal_lm(model_section(name_or_path=str(tiny_model_dir)), tiny_tokenizer, CPU, seed=0)
    trainable, total = count_parameters(full.model)
    assert trainable == total and full.base_ref is None

    lora = build_causal_lm(model_section(name_or_path=str(tiny_model_dir), lora={"r": 4}), tiny_tokenizer, CPU, seed=0)
    names = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert lora.base_ref == str(tiny_model_dir)
    assert torch.allclose(logits_of(lora.model, IDS), logits_of(full.model, IDS), atol=1e-5)  # B = 0 at init

    import bitsandbytes as bnb

    qlora = build_causal_lm(model_section(name_or_path=str(tiny_model_dir), lora={"r": 4}, quantization={}), tiny_tokenizer, CPU, seed=0)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in qlora.model.modules())
    assert all("lora_" in n for n, p in qlora.model.named_parameters() if p.requires_grad)
    assert count_parameters(qlora.model)[1] == count_parameters(lora.model)[1]  # 4-bit weights count as weights, not bytes
    # 4-bit is an approximation of the same model, not another model
    assert torch.nn.functional.cosine_similarity(logits_of(qlora.model, IDS).flatten(), logits_of(full.model, IDS).flatten(), dim=0) > 0.95


def test_new_model_from_init_takes_tokenizer_sizes(tiny_tokenizer):
    cfg = model_section(init={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "config": {"rms_norm_eps": 1e-5}})
    bundle = build_causal_lm(cfg, tiny_tokenizer, CPU, seed=0)
    config = bundle.model.config
    assert config.vocab_size == len(tiny_tokenizer) and config.intermediate_size == 128
    assert config.eos_token_id == tiny_tokenizer.eos_token_id and config.pad_token_id == tiny_tokenizer.pad_token_id
    again = build_causal_lm(cfg, tiny_tokenizer, CPU, seed=0)
    assert torch.equal(logits_of(bundle.model, IDS), logits_of(again.model, IDS))  # the seed fixes the init
    with pytest.raises(UserError, match="model.init.config.not_a_key"):
        build_causal_lm(model_section(init={"hidden_size": 32, "config": {"not_a_key": 1}}), tiny_tokenizer, CPU, seed=0)


def test_adapter_source_is_merged_not_the_bare_base(tiny_model_dir, random_adapter_dir, tiny_tokenizer):
    from peft import PeftModel

    expected = logits_of(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), random_adapter_dir), IDS)
    bare = logits_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir), IDS)
    bundle = build_causal_lm(model_section(name_or_path=str(random_adapter_dir)), tiny_tokenizer, CPU, seed=0)
    assert torch.allclose(logits_of(bundle.model, IDS), expected, atol=1e-5)
    assert not torch.allclose(expected, bare, atol=1e-2)
    assert any("merged into its base" in n for n in bundle.notes)


def test_adapter_source_under_lora_and_4bit_is_merged_before_quantization(tmp_path, tiny_model_dir, random_adapter_dir, tiny_tokenizer):
    from peft import PeftModel

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), random_adapter_dir).merge_and_unload()
    cfg = model_section(name_or_path=str(random_adapter_dir), lora={"r": 4}, quantization={})
    bundle = build_causal_lm(cfg, tiny_tokenizer, CPU, seed=0, cache_dir=tmp_path)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    for (name, a), (_, b) in zip(saved.state_dict().items(), merged.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert bundle.base_ref == str(tmp_path / "base")
    with bundle.model.disable_adapter():  # the frozen reference is the merged model (up to 4-bit error)
        quantized = logits_of(bundle.model, IDS).flatten()
    cosine = torch.nn.functional.cosine_similarity
    bare = logits_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir), IDS).flatten()
    assert cosine(quantized, logits_of(merged, IDS).flatten(), dim=0) > cosine(quantized, bare, dim=0)


def test_resolve_source_errors(tmp_path):
    assert resolve_source("Qwen/Qwen2.5-0.5B").path == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(UserError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("seed: 1\n")
    with pytest.raises(UserError, match=r"is not complete \(status: not started\)"):
        resolve_source(str(tmp_path / "run"))
    (tmp_path / "junk").mkdir()
    with pytest.raises(UserError, match="neither a model folder"):
        resolve_source(str(tmp_path / "junk"))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="does not record its base"):
        resolve_source(str(tmp_path / "adapter"))


def test_unreachable_hub_model_is_one_clear_error(tiny_tokenizer):
    with pytest.raises(UserError, match="cannot load"):
        build_tokenizer(model_section(name_or_path="no-such-org/no-such-model"), TokenizerSection())


def test_final_adapter_loads_with_plain_peft(tmp_path, tiny_model_dir, tiny_tokenizer):
    from peft import AutoPeftModelForCausalLM

    bundle = build_causal_lm(model_section(name_or_path=str(tiny_model_dir), lora={"r": 4}), tiny_tokenizer, CPU, seed=0)
    save_final(bundle.model, bundle, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    out = loaded.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 3)


def test_everything_that_trains_is_float32_even_on_a_half_precision_base(tiny_model_dir, tiny_tokenizer):
    cfg = model_section(name_or_path=str(tiny_model_dir), dtype="bfloat16", lora={"r": 4, "modules_to_save": ["lm_head"], "bias": "all"})
    bundle = build_causal_lm(cfg, tiny_tokenizer, CPU, seed=0)
    trainable = {n: p.dtype for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in trainable) and set(trainable.values()) == {torch.float32}
    assert any(p.dtype == torch.bfloat16 for p in bundle.model.parameters() if not p.requires_grad)


def test_generation_stops_at_the_chat_templates_end_of_turn(tiny_model_dir):
    from dpo_cli.models.generate import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert stop_token_ids(tokenizer, model) == sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})


def test_4bit_gradients_are_the_same_after_an_eval_pass(tiny_model_dir, tiny_tokenizer):
    """bitsandbytes would repack 4-bit weights for a CPU kernel without a backward after the first
    no-grad eval pass (eval, reference, sampling); gradients through the base must not change."""
    grads = []
    for eval_first in (False, True):
        cfg = model_section(name_or_path=str(tiny_model_dir), lora={"r": 4, "dropout": 0.0}, quantization={})
        model = build_causal_lm(cfg, tiny_tokenizer, CPU, seed=0).model
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=IDS)
            model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
