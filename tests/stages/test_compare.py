"""`dpo-cli compare` and its math: confidence intervals, win rates, distinct-n, FLOPs, the reward-hacking
flag, a KL of 0 for a policy against itself, and a well-formed report with plots."""

from __future__ import annotations

import json

import pytest

from helpers import torchrun, write_jsonl, write_recipe
from dpo_cli.eval.costs import estimate_flops, model_shape, path_cost
from dpo_cli.eval.evaluation import distinct_n
from dpo_cli.eval.report import ab_outcome


def test_distinct_n():
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)  # (a b) x3, (b a) x1
    assert distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert distinct_n(["a"], 2) is None


def test_flops_hand_computed():
    compute = {"params": 1e6, "layers": 2, "hidden": 64, "context": 100, "train_tokens": 1000, "forward_tokens": 500}
    per_token = 2e6 + 2 * 2 * 100 * 64
    assert estimate_flops(compute) == pytest.approx(3 * per_token * 1000 + per_token * 500)
    extra = {**compute, "extra": [{"params": 1e5, "layers": 1, "hidden": 32, "context": 10, "tokens": 100}]}
    assert estimate_flops(extra) == pytest.approx(estimate_flops(compute) + (2e5 + 2 * 1 * 10 * 32) * 100)
    frozen = {**compute, "trained": 1e4}  # LoRA: no weight gradients for the frozen base
    assert estimate_flops(frozen) == pytest.approx((4e6 + 2e4 + 6 * 2 * 100 * 64) * 1000 + per_token * 500)
    cost = path_cost([{"wall_time_s": 1.0, "train_time_s": 0.5, "peak_memory_bytes": 10, "tokens": 3, "compute": compute, "device": "cpu", "models": ["reward model"]},
                      {"wall_time_s": 2.0, "train_time_s": 1.5, "peak_memory_bytes": 20, "tokens": 4, "device": "cpu", "episodes": 48,
                       "models": ["policy", "reference", "critic", "reward model"]}])  # fmt: skip
    assert cost == {
        "wall_time_s": 3.0, "train_time_s": 2.0, "peak_memory_bytes": 20, "tokens": 7, "flops": estimate_flops(compute), "devices": ["cpu"],
        "models": ["policy", "reference", "critic", "reward model"], "samples": 48,
    }  # fmt: skip


def test_a_lora_runs_frozen_base_is_not_counted_as_trained(tiny_model_dir, tiny_tokenizer):
    import torch

    from dpo_cli.core.sections import ModelSection
    from dpo_cli.models.build import build_causal_lm

    full = build_causal_lm(ModelSection(name_or_path=str(tiny_model_dir)), tiny_tokenizer, torch.device("cpu"), seed=0).model
    lora = build_causal_lm(ModelSection(name_or_path=str(tiny_model_dir), lora={"r": 4}), tiny_tokenizer, torch.device("cpu"), seed=0).model
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert model_shape(full)["trained"] == model_shape(full)["params"]  # every weight trains: Kaplan's 6N
    assert model_shape(lora)["trained"] == adapters and model_shape(lora)["params"] == model_shape(full)["params"] + adapters


def test_human_ab_outcome():
    labels = [{"choice": c} for c in ("A", "A", "B", "tie", "skip")]
    assert ab_outcome(labels) == {"win_rate": (1 + 1 + 0 + 0.5) / 4, "decided": 4, "labels": ["A", "A", "B", "tie"]}


@pytest.fixture()
def compare_recipe(tmp_path, tiny_model_dir, tiny_reward_model_dir):
    def make(**sections):
        recipe = {
            "stage": "compare",
            "seed": 1,
            "policies": {"base": str(tiny_model_dir), "same": str(tiny_model_dir)},
            "data": {"train": "demo:prompts?n=6", "max_length": 32},
            "generation": {"max_new_tokens": 6, "temperature": 0.7},
            "judges": {"function": "sentiment", "reward_model": str(tiny_reward_model_dir)},
            "show_samples": 2,
        }
        recipe.update(sections)
        return write_recipe(tmp_path / "compare.yaml", recipe)

    return make


def test_compare_report(tmp_path, cli, compare_recipe, sft_recipe):
    assert cli("sft", sft_recipe(train={"max_steps": 2}), "--run-dir", tmp_path / "sft")[0] == 0
    recipe = compare_recipe(
        policies={"base": str(tmp_path / "sft"), "same": str(tmp_path / "sft")},
        costs={"sft": [str(tmp_path / "sft")]},
    )
    code, out, err = cli("compare", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    for name in ("base", "same"):
        policy = report["policies"][name]
        for key in ("judge", "proxy", "kl", "win_rate", "response_length", "finished_rate", "distinct_1", "distinct_2", "reward_hacking", "samples"):
            assert key in policy, key
        assert policy["kl"]["mean"] == 0.0  # the same model as the reference
        assert policy["judge"]["n"] == 6 and len(policy["samples"]) == 2
    assert report["policies"]["same"]["win_rate"]["mean"] == 0.5  # the same responses: all ties
    assert report["policies"]["same"]["seeds"] == 1 and report["policies"]["same"]["judge"]["over"] == "prompts"
    (same,) = report["differences"]
    assert (same["a"], same["b"], same["judge"]["mean"]) == ("base", "same", 0.0)
    assert same["conclusion"].startswith("ground truth: no significant difference between base and same")
    assert "temperature 1" in report["kl_estimator"]
    assert report["costs"]["sft"]["flops"] > 0 and report["costs"]["sft"]["train_time_s"] > 0
    for plot in ("frontier.png", "costs.png", "curves.png"):
        assert (tmp_path / "run" / plot).read_bytes().startswith(b"\x89PNG"), plot
    assert "| policy |" in (tmp_path / "run" / "report.md").read_text()
    assert "seeds" in out and "same" in out  # the terminal table


def test_a_policy_trained_with_seeds_is_summarised_over_them(tmp_path, cli, compare_recipe, sft_recipe):
    """policies.NAME: [run per seed]: one evaluation per run on the same prompts, the mean over seeds with its
    interval over seeds, differences paired by seed, and costs counted once (the mean of the seeds' runs)."""
    for seed in (1, 2):
        assert cli("sft", sft_recipe(train={"max_steps": 2}, seed=seed), "--run-dir", tmp_path / f"sft-seed{seed}")[0] == 0
    seeds = [str(tmp_path / "sft-seed1"), str(tmp_path / "sft-seed2")]
    recipe = compare_recipe(policies={"base": seeds[0], "sft": seeds}, costs={"sft": [seeds]})
    code, out, err = cli("compare", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    sft = report["policies"]["sft"]
    assert sft["seeds"] == 2 and sft["judge"]["over"] == "seeds" and sft["judge"]["n"] == 2 and len(sft["per_seed"]) == 2
    per_seed = [run["judge"]["mean"] for run in sft["per_seed"]]
    assert sft["judge"]["mean"] == pytest.approx(sum(per_seed) / 2)
    assert sft["per_seed"][0]["judge"] == report["policies"]["base"]["judge"]  # the same run, the same prompts and sampling seed
    (pair,) = report["differences"]
    assert pair["judge"]["over"] == "seeds" and pair["judge"]["mean"] == pytest.approx(report["policies"]["base"]["judge"]["mean"] - sft["judge"]["mean"])
    one = [json.loads((tmp_path / f"sft-seed{s}" / "summary.json").read_text())["train_time_s"] for s in (1, 2)]
    assert report["costs"]["sft"]["train_time_s"] == pytest.approx(sum(one) / 2) and report["costs"]["sft"]["runs"] == ["mean of 2 runs (sft-seed1, ...)"]
    assert "| sft | 2 |" in (tmp_path / "run" / "report.md").read_text()
    code, _, err = cli("compare", compare_recipe(policies={"sft": seeds, "base": seeds[0]}), "--run-dir", tmp_path / "bad")
    assert code == 1 and "reference: 'sft' has several runs" in err


def test_compare_refuses_missing_or_incomplete_runs(tmp_path, cli, compare_recipe):
    code, _, err = cli("compare", compare_recipe(policies={"gone": str(tmp_path / "nope")}), "--run-dir", tmp_path / "a")
    assert code == 1 and "does not exist" in err
    half = tmp_path / "half"
    half.mkdir()
    (half / "recipe.yaml").write_text("stage: dpo\n")
    (half / "summary.json").write_text('{"status": "interrupted"}')
    code, _, err = cli("compare", compare_recipe(policies={"half": str(half)}), "--run-dir", tmp_path / "b")
    assert code == 1 and "not complete (status: interrupted)" in err
    code, _, err = cli("compare", compare_recipe(baseline="nobody"), "--run-dir", tmp_path / "c")
    assert code == 1 and "baseline: 'nobody' is not one of the policies" in err
    code, _, err = cli("compare", compare_recipe(methods={"dpo": ["base", "dpo-beta-9"]}), "--run-dir", tmp_path / "d")
    assert code == 1 and "methods.dpo: 'dpo-beta-9' not among the policies (base, same)" in err
    code, _, err = cli("compare", compare_recipe(policies={"base": []}), "--run-dir", tmp_path / "e")
    assert code == 1 and "policies.base: an empty list" in err
    write_jsonl(tmp_path / "answers.jsonl", [{"prompt": "a"}])
    judges = {"function": "sentiment", "ceiling": str(tmp_path / "answers.jsonl")}
    code, _, err = cli("compare", compare_recipe(judges=judges), "--run-dir", tmp_path / "f")
    assert code == 1 and err.strip().endswith("needs a prompt column and a completion (or response) column; it has prompt")
    code, _, err = cli("compare", compare_recipe(judges={**judges, "ceiling": str(tmp_path / "gone.jsonl")}), "--run-dir", tmp_path / "g")
    assert code == 1 and "judges.ceiling: no file matches" in err
    code, _, err = cli("compare", compare_recipe(judges={"function": None, "fluency_model": str(tmp_path)}), "--run-dir", tmp_path / "h")
    assert code == 1 and "judges.fluency_model needs a ground-truth judge" in err


def test_human_ab_needs_a_terminal(tmp_path, cli, compare_recipe, tiny_model_dir, tiny_reward_model_dir):
    judges = {"function": "sentiment", "reward_model": str(tiny_reward_model_dir), "human": {"a": "base", "b": "same", "pairs": 2}}
    code, _, err = cli("compare", compare_recipe(judges=judges), "--run-dir", tmp_path / "run")
    assert code == 1 and "needs an interactive terminal" in err


def test_the_text_reference_equals_the_token_reference_for_the_same_tokenizer(tiny_model_dir, tiny_tokenizer):
    """Re-tokenising for a reference with another tokenizer: on the same tokenizer, and responses whose tokens
    are their text's own tokenisation, it gives the same KL as reading the tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpo_cli.eval.evaluation import model_reference, sequence_kl, text_reference
    from dpo_cli.models.generate import Generation
    from dpo_cli.models.rollout import make_rollout

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    prompts, texts = ["The Last Road is", "A film about"], [" a great film.", " a lost child"]
    prompt_ids = [tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    eos = tiny_tokenizer.eos_token_id
    generations = [
        Generation(prompt_ids[0], tiny_tokenizer(texts[0], add_special_tokens=False)["input_ids"] + [eos], texts[0], True),
        Generation(prompt_ids[1], tiny_tokenizer(texts[1], add_special_tokens=False)["input_ids"], texts[1], False),  # cut off
    ]
    rollout = make_rollout(prompts, prompt_ids, generations, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    by_tokens = sequence_kl(policy, model_reference(reference), rollout)
    by_text = sequence_kl(policy, text_reference(reference, tiny_tokenizer), rollout)
    assert all(abs(k) > 1e-3 for k in by_tokens)
    assert by_text == pytest.approx(by_tokens, abs=1e-4)


def test_two_processes_evaluate_their_shares_of_the_prompts(tmp_path, cli, compare_recipe):
    recipe = compare_recipe()
    done = torchrun("compare", recipe, "--run-dir", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    for name in ("base", "same"):
        policy = report["policies"][name]
        assert policy["judge"]["n"] == policy["proxy"]["n"] == 6 and policy["kl"]["n"] == 6  # every prompt, once
        assert policy["kl"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert report["policies"]["same"]["win_rate"]["mean"] == 0.5
    assert done.stdout.count("compare · completed") == 1


def test_conversational_prompts_for_a_policy_without_a_chat_template(tmp_path, cli, tiny_model_dir, tiny_reward_model_dir):
    """The demo-style tokenizer has no template: compare installs the default one and says so, not a traceback."""
    from helpers import write_jsonl

    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": f"A film, take {i}:"}]} for i in range(4)])
    recipe = write_recipe(tmp_path / "compare.yaml", {
        "stage": "compare", "policies": {"base": str(tiny_model_dir)}, "data": {"train": str(tmp_path / "prompts.jsonl"), "max_length": 64},
        "generation": {"max_new_tokens": 4}, "judges": {"function": "length", "reward_model": str(tiny_reward_model_dir)},
    })  # fmt: skip
    code, _, err = cli("compare", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert "no chat template" in err


def test_a_runs_policy_eval_with_compares_settings_is_compares_evaluation(tmp_path, cli, compare_recipe, dpo_recipe, tiny_model_dir, tiny_reward_model_dir):
    """policy_eval given compare's prompts, length, batching and seed: its last point is, to the digit, what
    compare measures on the final policy (so the curves and the final points lie on one scale)."""
    policy_eval = {
        "every": 2, "prompts": "demo:prompts?n=6", "max_prompt_length": 32, "max_new_tokens": 6, "batch_size": 3, "seed": 1,
        "judge": "sentiment", "reward_model": str(tiny_reward_model_dir),
    }  # fmt: skip
    assert cli("dpo", dpo_recipe(policy_eval=policy_eval), "--run-dir", tmp_path / "dpo")[0] == 0
    recipe = compare_recipe(policies={"base": str(tiny_model_dir), "dpo": str(tmp_path / "dpo")}, generation={"max_new_tokens": 6, "temperature": 1.0, "batch_size": 3})
    code, _, err = cli("compare", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    (path,) = report["trajectories"]["dpo"]
    assert path["same_evaluation"] and path["points"] == 3  # steps 0, 2, 4 and path["hacking"] is not None
    last = report["checkpoints"]["dpo"][0][-1]
    final = report["policies"]["dpo"]
    assert last["judge_score"] == pytest.approx(final["judge"]["mean"], abs=1e-9) and last["proxy_score"] == pytest.approx(final["proxy"]["mean"], abs=1e-6)
    assert last["kl"] == pytest.approx(final["kl"]["mean"], abs=1e-5)
    other = compare_recipe(policies={"base": str(tiny_model_dir), "dpo": str(tmp_path / "dpo")}, generation={"max_new_tokens": 8, "temperature": 1.0, "batch_size": 3})
    assert cli("compare", other, "--run-dir", tmp_path / "other")[0] == 0
    assert not json.loads((tmp_path / "other" / "report.json").read_text())["trajectories"]["dpo"][0]["same_evaluation"]
    assert "on another evaluation than this comparison's" in (tmp_path / "other" / "report.md").read_text()
