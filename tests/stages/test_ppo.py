"""`dpo-cli ppo` on tiny models: single-GPU mode (shared base, LoRA, 4-bit) and separate models, the
correctness points, resume, a learnable toy reward, and bad input."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import dpo_cli.stages.ppo
from helpers import interrupt_at_call, read_jsonl, write_jsonl
from dpo_cli.models.build import build_causal_lm
from dpo_cli.core.recipes import ModelSection
from dpo_cli.models.rollout import Rollout, response_logps
from dpo_cli.models.roles import ActorCritic, ValueHead

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def toy_reward_model_dir(tmp_path_factory, tiny_model_dir):
    """A reward model that is a fixed linear function of the mean embedding of the response's tokens:
    attention made uniform (q and k zeroed), MLPs silenced. Which tokens the policy emits decides the
    reward, so it is learnable in a few iterations."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.k_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.score.weight.mul_(50.0)
    folder = tmp_path_factory.mktemp("toy-rm")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


METRICS = {
    "reward", "reward/std", "kl", "kl_coef", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl",
    "value/explained_variance", "response_length", "time/generate", "time/train",
}  # fmt: skip
MODES = {
    "shared-lora": {"lora": {"r": 4, "dropout": 0.0}},
    "shared-4bit": {"lora": {"r": 4, "dropout": 0.0}, "quantization": {}},
    "separate": {"lora": None},
}


@pytest.mark.parametrize("mode", MODES)
def test_end_to_end(mode, tmp_path, cli, ppo_recipe, tiny_model_dir):
    recipe = ppo_recipe(model={"name_or_path": str(tiny_model_dir), **MODES[mode]})
    code, _, err = cli("ppo", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3] and METRICS <= set(metrics[0])
    assert metrics[0]["kl"] == 0.0  # policy = reference at the start
    assert all(m["ratio/first_minibatch"] == 1.0 for m in metrics)  # pi = pi_old at each iteration's first update
    assert [s["step"] for s in read_jsonl(tmp_path / "run" / "samples.jsonl")] == [2, 3]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["episodes"] == 12 and summary["time_generate_s"] > 0 and summary["time_train_s"] > 0
    final = tmp_path / "run" / "final"
    if mode == "separate":
        assert summary["mode"] == "separate models"
        assert AutoModelForCausalLM.from_pretrained(final).config.vocab_size > 0
    else:
        from peft import AutoPeftModelForCausalLM

        assert not (final / "value").exists()  # final/ is the policy adapter alone
        AutoPeftModelForCausalLM.from_pretrained(final)
        assert summary["mode"].startswith("single-GPU")


def shared_actor_critic(tiny_model_dir, tiny_tokenizer):
    from peft import LoraConfig

    bundle = build_causal_lm(ModelSection(name_or_path=str(tiny_model_dir), lora={"r": 4, "dropout": 0.0}), tiny_tokenizer, CPU, seed=0)
    bundle.model.add_adapter("value", LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    bundle.model.set_adapter("default")
    for name, param in bundle.model.named_parameters():
        if "lora_" in name and ".value." in name:
            param.requires_grad_(True)
    return ActorCritic(bundle.model, None, ValueHead(64), None)


def toy_rollout(tokenizer) -> Rollout:
    torch.manual_seed(0)
    query_response = torch.randint(5, 300, (3, 9))
    attention_mask = torch.ones_like(query_response)
    attention_mask[0, :2] = 0  # a left-padded prompt
    attention_mask[2, 7:] = 0  # a short response
    response_mask = attention_mask[:, 4:].float()
    return Rollout(["p"] * 3, query_response, attention_mask, 4, response_mask, ["r"] * 3, torch.ones(3, dtype=torch.bool))


def test_adapter_off_reference_equals_a_frozen_copy_and_stays_frozen(tiny_model_dir, tiny_tokenizer):
    actor_critic = shared_actor_critic(tiny_model_dir, tiny_tokenizer)
    with torch.no_grad():
        for name, param in actor_critic.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)  # trained adapters
    rollout = toy_rollout(tiny_tokenizer)
    copy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reference = actor_critic.reference_logps(rollout, 0.7)
    expected, _ = response_logps(copy, rollout, 0.7)
    assert torch.allclose(reference, expected, atol=1e-5)
    policy, _ = actor_critic.policy_logps(rollout, 0.7)
    assert not torch.allclose(policy, reference, atol=1e-2)
    # One update step moves the adapters and the value head, never the shared base.
    base_before = {n: p.clone() for n, p in actor_critic.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in actor_critic.parameters() if p.requires_grad], lr=0.1)
    (policy * rollout.response_mask).sum().backward()
    actor_critic.values(rollout).sum().backward()
    value_grads = [n for n, p in actor_critic.named_parameters() if p.grad is not None and (".value." in n or "value_head" in n)]
    policy_grads = [n for n, p in actor_critic.named_parameters() if p.grad is not None and ".default." in n]
    assert value_grads and policy_grads  # both adapters learn, although peft freezes whichever is inactive
    optimizer.step()
    assert all(torch.equal(p, base_before[n]) for n, p in actor_critic.named_parameters() if n in base_before)
    assert torch.allclose(actor_critic.reference_logps(rollout, 0.7), expected, atol=1e-5)


def test_reward_and_reference_weights_never_change(tmp_path, cli, ppo_recipe, tiny_model_dir, tiny_reward_model_dir):
    rm_before = load_file(str(tiny_reward_model_dir / "model.safetensors"))
    recipe = ppo_recipe(model={"name_or_path": str(tiny_model_dir), "lora": None}, train={"max_steps": 2})
    assert cli("ppo", recipe, "--run-dir", tmp_path / "run")[0] == 0
    rm_after = load_file(str(tiny_reward_model_dir / "model.safetensors"))
    assert all(torch.equal(rm_before[k], rm_after[k]) for k in rm_before)
    # The reference of separate mode is rebuilt from the source on resume; it is never in a checkpoint.
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "trainable.safetensors")) if (tmp_path / "run" / "checkpoints" / "step-2").exists() else {}
    assert not any(k.startswith("_reference") for k in saved)


def test_resume_is_exact(tmp_path, cli, ppo_recipe, monkeypatch):
    recipe = ppo_recipe(train={"max_steps": 4, "save_every": 2})
    assert cli("ppo", recipe, "--run-dir", tmp_path / "reference")[0] == 0
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, dpo_cli.stages.ppo, "update_phase", 3)  # during iteration 3
        code, _, err = cli("ppo", recipe, "--run-dir", tmp_path / "run")
    assert code == 143, err
    code, _, err = cli("ppo", recipe, "--run-dir", tmp_path / "run")
    assert code == 0 and "resuming from" in err and "iteration 3 of 4" in err
    got, want = read_jsonl(tmp_path / "run" / "metrics.jsonl"), read_jsonl(tmp_path / "reference" / "metrics.jsonl")
    for key in ("reward", "kl", "policy_loss", "value_loss", "approx_kl"):
        assert [m[key] for m in got] == pytest.approx([m[key] for m in want], abs=1e-6), key
    weights, expected = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "reference" / "final" / "adapter_model.safetensors")
    )
    assert all(torch.allclose(weights[k], expected[k], atol=1e-6) for k in expected)


def test_mean_reward_rises_on_a_learnable_toy(tmp_path, cli, ppo_recipe, tiny_model_dir, toy_reward_model_dir):
    write_jsonl(tmp_path / "short.jsonl", [{"prompt": letter} for letter in "ABCDEFGHIJKLMNOP"])  # the response dominates
    recipe = ppo_recipe(
        model={"name_or_path": str(tiny_model_dir), "lora": None},
        data={"train": "short.jsonl", "max_length": 16},
        train={"max_steps": 20, "batch_size": 16, "learning_rate": 1e-2, "save_every": None},
        generation={"max_new_tokens": 8, "temperature": 1.0},
        ppo={"reward_model": str(toy_reward_model_dir), "mini_batch_size": 8, "ppo_epochs": 4, "kl_coef": 0.0, "sample_every": 100},
    )
    code, _, err = cli("ppo", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    rewards = [m["reward"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 3.0, rewards  # about -2.4 -> 12 on this toy


@pytest.mark.parametrize("lora", [True, False])
def test_a_judge_as_the_reward_ppo_gt(lora, tmp_path, cli, ppo_recipe, tiny_model_dir):
    """The DPO paper's PPO-GT: the ground-truth judge itself is the reward (no reward model); separate
    models start the critic from the policy."""
    model = {"name_or_path": str(tiny_model_dir), **({} if lora else {"lora": None})}
    ppo = {"reward_model": None, "reward_judge": "length", "missing_eos_penalty": None, "sample_every": 1, "show_samples": 4}
    code, _, err = cli("ppo", ppo_recipe(model=model, train={"max_steps": 2, "save_every": None}, ppo=ppo), "--run-dir", tmp_path / "run")
    assert code == 0, err
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert samples and all(s["score"] == float(len(s["response"].split())) for s in samples)  # the judge's words, as scored
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and "extra" not in summary["compute"]  # no reward model's passes to count


def test_the_reward_is_a_reward_model_or_a_judge(tmp_path, cli, ppo_recipe, tiny_reward_model_dir):
    code, _, err = cli("ppo", ppo_recipe(ppo={"reward_model": None}), "--run-dir", tmp_path / "a")
    assert code == 1 and "give the reward as ppo.reward_model" in err
    code, _, err = cli("ppo", ppo_recipe(ppo={"reward_judge": "sentiment"}), "--run-dir", tmp_path / "b")  # and the fixture's reward model
    assert code == 1 and "one of them" in err
    code, _, err = cli("ppo", ppo_recipe(ppo={"reward_fluency_model": str(tiny_reward_model_dir)}), "--run-dir", tmp_path / "c")
    assert code == 1 and "ppo.reward_fluency_model weights a judge" in err


def test_an_iteration_with_non_finite_rewards_is_skipped_and_counted(tmp_path, cli, ppo_recipe, monkeypatch):
    real = dpo_cli.stages.ppo.score_phase
    calls = {"n": 0}

    def first_scores_nan(rollout, reward, recipe):
        calls["n"] += 1
        scores = real(rollout, reward, recipe)
        return scores * float("nan") if calls["n"] == 1 else scores

    monkeypatch.setattr(dpo_cli.stages.ppo, "score_phase", first_scores_nan)
    code, _, err = cli("ppo", ppo_recipe(train={"max_steps": 2, "save_every": None}), "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_iterations"] == 1
    assert [m.get("skipped") for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == ["non-finite reward", None]


def test_kl_past_the_bound_stops_with_a_checkpoint(tmp_path, cli, ppo_recipe):
    recipe = ppo_recipe(train={"max_steps": 5, "learning_rate": 5e-2, "save_every": None}, ppo={"kl_stop": 1e-9})
    code, _, err = cli("ppo", recipe, "--run-dir", tmp_path / "run")
    assert code == 1 and "ppo.kl_stop" in err and "checkpoint" in err
    assert list((tmp_path / "run" / "checkpoints").iterdir())


def test_bad_input(tmp_path, cli, ppo_recipe, tiny_model_dir):
    code, _, err = cli("ppo", ppo_recipe(ppo={"reward_model": str(tiny_model_dir)}), "--run-dir", tmp_path / "a")
    assert code == 1 and "ppo.reward_model" in err and "is not a reward model" in err
    code, _, err = cli("ppo", ppo_recipe(ppo={"mini_batch_size": 3}), "--run-dir", tmp_path / "b")
    assert code == 1 and "ppo.mini_batch_size (3) must divide train.batch_size (4)" in err
    code, _, err = cli("ppo", ppo_recipe(ppo={"value_model": str(tiny_model_dir)}), "--run-dir", tmp_path / "c")
    assert code == 1 and "drop ppo.value_model" in err
    code, _, err = cli("ppo", ppo_recipe(train={"group_by_length": True}), "--run-dir", tmp_path / "d")
    assert code == 1 and "train.group_by_length" in err and "for sft, rm-train and dpo" in err


def test_a_reward_model_with_another_tokenizer_is_re_tokenised(tmp_path, cli, ppo_recipe, tiny_model_dir):
    from dpo_cli.demo import demo_rows
    from dpo_cli.data.tokenization import train_bpe_tokenizer

    other = tmp_path / "other-rm"
    tokenizer = train_bpe_tokenizer([r["text"] for r in demo_rows("demo:reviews?n=200")], 290, 256)
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_labels=1, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(other)
    tokenizer.save_pretrained(other)
    recipe = ppo_recipe(model={"name_or_path": str(tiny_model_dir), "lora": None}, ppo={"reward_model": str(other)}, train={"max_steps": 1})
    code, _, err = cli("ppo", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert "re-tokenised" in err and "the critic starts from the policy" in err


def one_iteration(ppo_recipe, tiny_model_dir, tiny_tokenizer, optimizer_class, lr: float, combined: bool = False, padding_free: bool = False):
    """The experience, advantages and update phases of one iteration on the toy rollout, from the same start:
    -> (the trained weights, the update's metrics, the rollout)."""
    from dpo_cli.core.recipe_loader import load_recipe
    from dpo_cli.core.runtime import setup_runtime
    from dpo_cli.stages.ppo import advantage_phase, experience_phase, update_phase

    recipe = load_recipe(ppo_recipe(), "ppo", [], False)
    runtime = setup_runtime(recipe.train, recipe.seed)
    torch.manual_seed(0)
    actor_critic = shared_actor_critic(tiny_model_dir, tiny_tokenizer)
    rollout = toy_rollout(tiny_tokenizer)
    rollout.padding_free = padding_free
    rollout.scores = torch.tensor([1.0, -0.5, 0.25])
    experience_phase(actor_critic, rollout, recipe, 0)
    advantage_phase(rollout, recipe, 0.05)
    optimizer = optimizer_class(actor_critic._trainable, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    metrics = update_phase(actor_critic, rollout, recipe, optimizer, scheduler, runtime, 0, combined=combined, kl_coef=recipe.ppo.kl_coef)
    return {n: p.detach().clone() for n, p in actor_critic.named_parameters() if p.requires_grad}, metrics, rollout


def test_one_combined_backward_equals_two(ppo_recipe, tiny_model_dir, tiny_tokenizer):
    """DDP runs policy and critic as one forward and one backward; one GPU frees the policy's graph first.
    The updates are the same."""
    two, metrics_two, _ = one_iteration(ppo_recipe, tiny_model_dir, tiny_tokenizer, torch.optim.AdamW, 1e-2, combined=False)
    one, metrics_one, _ = one_iteration(ppo_recipe, tiny_model_dir, tiny_tokenizer, torch.optim.AdamW, 1e-2, combined=True)
    assert metrics_two["updates"] == metrics_one["updates"] == 4
    assert metrics_one["policy_loss"] == pytest.approx(metrics_two["policy_loss"], rel=1e-5)
    for name in two:
        assert torch.allclose(one[name], two[name], atol=1e-6), name


def test_padding_free_iterations_equal_padded_ones(ppo_recipe, tiny_model_dir, tiny_tokenizer, monkeypatch):
    """ppo.padding_free packs each mini-batch's episodes: the same experience, losses and updates (SGD: Adam
    would blow the rounding of near-zero gradients up to whole steps)."""
    import dpo_cli.models.rollout

    monkeypatch.setattr(dpo_cli.models.rollout, "MIN_SAVING", 0.0)  # pack the toy rollout, whatever it saves
    padded, metrics_padded, rollout_padded = one_iteration(ppo_recipe, tiny_model_dir, tiny_tokenizer, torch.optim.SGD, 0.1, padding_free=False)
    packed, metrics_packed, rollout_packed = one_iteration(ppo_recipe, tiny_model_dir, tiny_tokenizer, torch.optim.SGD, 0.1, padding_free=True)
    assert rollout_packed.packed is not None and rollout_padded.packed is None
    mask = rollout_padded.response_mask
    for name in ("logps", "ref_logps", "values", "advantages"):
        assert torch.allclose(getattr(rollout_packed, name) * mask, getattr(rollout_padded, name) * mask, atol=1e-5), name
    assert metrics_packed["ratio/first_minibatch"] == pytest.approx(1.0, abs=1e-6)
    assert metrics_packed["policy_loss"] == pytest.approx(metrics_padded["policy_loss"], rel=1e-4, abs=1e-6)
    for name in padded:
        assert torch.allclose(packed[name], padded[name], atol=1e-5), name


# --------------------------------------------------------------------------- critic-free: RLOO and GRPO


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
@pytest.mark.parametrize("lora", [True, False])
def test_critic_free_runs_build_no_critic_and_resume_exactly(advantage, lora, tmp_path, cli, ppo_recipe, tiny_model_dir, monkeypatch):
    import dpo_cli.stages.ppo

    recipe = ppo_recipe(
        model={"name_or_path": str(tiny_model_dir), "lora": {"r": 4, "dropout": 0.0} if lora else None},
        train={"max_steps": 3, "batch_size": 4, "save_every": 1}, ppo={"advantage": advantage, "samples_per_prompt": 2},
    )  # fmt: skip
    code, _, err = cli("ppo", recipe, "--run-dir", tmp_path / "reference")
    assert code == 0, err
    assert f"{advantage}: no critic" in err
    summary = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert summary["mode"] == f"{advantage}, no critic" and summary["episodes"] == 12
    lines = read_jsonl(tmp_path / "reference" / "metrics.jsonl")
    assert "value_loss" not in lines[0] and "value/explained_variance" not in lines[0]
    assert ("kl_loss" in lines[0]) == (advantage == "grpo")
    weights = load_file(str(tmp_path / "reference" / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert weights and not any("value" in name or name.startswith("critic.") for name in weights)  # no critic adapter, value head or critic model
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, dpo_cli.stages.ppo, "update_phase", call=2, signum=signal.SIGTERM)
        assert cli("ppo", recipe, "--run-dir", tmp_path / "run")[0] == 143
    assert cli("ppo", recipe, "--run-dir", tmp_path / "run")[0] == 0
    assert [r["reward"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [r["reward"] for r in lines]


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_critic_free_reward_rises_on_a_learnable_toy(advantage, tmp_path, cli, ppo_recipe, tiny_model_dir, toy_reward_model_dir):
    write_jsonl(tmp_path / "short.jsonl", [{"prompt": letter} for letter in "ABCDEFGHIJKLMNOP"])
    recipe = ppo_recipe(
        model={"name_or_path": str(tiny_model_dir), "lora": None},
        data={"train": "short.jsonl", "max_length": 16},
        train={"max_steps": 20, "batch_size": 16, "learning_rate": 1e-2, "save_every": None},
        generation={"max_new_tokens": 8, "temperature": 1.0},
        ppo={"reward_model": str(toy_reward_model_dir), "mini_batch_size": 8, "ppo_epochs": 4, "kl_coef": 0.0, "sample_every": 100,
             "advantage": advantage, "samples_per_prompt": 4},
    )  # fmt: skip
    code, _, err = cli("ppo", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    rewards = [m["reward"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 3.0, rewards


def test_the_advantage_phase_gives_each_token_its_samples_group_advantage():
    from dpo_cli.core.recipes import PpoRecipe
    from dpo_cli.losses import grpo_advantages, rloo_advantages
    from dpo_cli.models.rollout import Rollout
    from dpo_cli.stages.ppo import advantage_phase

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logps, ref = -torch.rand(4, 3), -torch.rand(4, 3)
    scores = torch.tensor([1.0, 3.0, -2.0, 0.5])
    for advantage in ("rloo", "grpo"):
        recipe = PpoRecipe.model_validate({
            "model": {"name_or_path": "org/model"}, "data": {"train": "demo:prompts"}, "train": {"batch_size": 4},
            "ppo": {"reward_model": "org/rm", "advantage": advantage, "samples_per_prompt": 2, "mini_batch_size": 2},
        })  # fmt: skip
        rollout = Rollout(["a", "a", "b", "b"], torch.zeros(4, 5, dtype=torch.long), torch.ones(4, 5), 2, mask, ["x"] * 4, torch.ones(4, dtype=torch.bool), scores, logps, ref)
        advantage_phase(rollout, recipe, kl_coef=0.1)
        penalised = scores - 0.1 * ((logps - ref) * mask).sum(dim=1)
        per_sequence = rloo_advantages(penalised, 2) if advantage == "rloo" else grpo_advantages(scores, 2)
        torch.testing.assert_close(rollout.advantages, per_sequence.unsqueeze(1) * mask)


def test_critic_free_settings_are_checked(cli, ppo_recipe):
    for ppo, train, message in [
        ({"advantage": "rloo"}, {}, "set ppo.samples_per_prompt to 2 or more"),
        ({"advantage": "grpo", "samples_per_prompt": 3}, {"batch_size": 4}, "must divide train.batch_size"),
        ({"advantage": "rloo", "samples_per_prompt": 2, "whiten_rewards": True}, {}, "no critic and no GAE"),
    ]:
        code, _, err = cli("validate", ppo_recipe(ppo=ppo, train=train))
        assert code == 1 and message in err, err


def test_a_prompts_samples_are_adjacent_and_each_group_of_rloo_advantages_sums_to_zero(tmp_path, cli, ppo_recipe, monkeypatch):
    """In a real run: the rollout holds each prompt k times in a row, and the leave-one-out advantages of a
    group add up to 0 (the grouping the estimators assume)."""
    import dpo_cli.stages.ppo as ppo

    seen = []
    real = ppo.advantage_phase

    def spy(rollout, recipe, kl_coef):
        kl = real(rollout, recipe, kl_coef)
        seen.append((list(rollout.prompts), rollout.advantages.clone(), rollout.response_mask.clone()))
        return kl

    monkeypatch.setattr(ppo, "advantage_phase", spy)
    recipe = ppo_recipe(train={"max_steps": 2, "batch_size": 6, "save_every": None}, ppo={"advantage": "rloo", "samples_per_prompt": 3, "mini_batch_size": 3})
    code, _, err = cli("ppo", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    for prompts, advantages, mask in seen:
        assert prompts[0] == prompts[1] == prompts[2] and prompts[3] == prompts[4] == prompts[5] and prompts[0] != prompts[3]
        per_sequence = (advantages * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        assert per_sequence.view(2, 3).sum(dim=1).abs().max() < 1e-4
