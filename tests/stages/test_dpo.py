"""`dpo-cli dpo`: correctness to the definitions, the reference model options, precomputation, resume,
and end to end with full weights, LoRA and 4-bit + LoRA."""

from __future__ import annotations

import copy
import json
import math
from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM

import dpo_cli.stages.dpo
from helpers import model_modes, interrupt_at_call, preference_rows, read_jsonl, sequence_logps_float64, write_jsonl, write_recipe
from dpo_cli.models.forward import CompletionLogProbs
from dpo_cli.models.build import build_causal_lm
from dpo_cli.data.preference_pairs import collate_pairs, pair_encoder
from dpo_cli.core.recipes import DpoSection, ModelSection
from dpo_cli.models.roles import Reference
from dpo_cli.stages.dpo import make_step
from helpers import assert_same_run

MODES = model_modes()
CPU = torch.device("cpu")


@pytest.mark.parametrize("mode", MODES)
def test_end_to_end_starts_at_log_2(mode, tmp_path, cli, dpo_recipe, tiny_model_dir):
    recipe = dpo_recipe(model={"name_or_path": str(tiny_model_dir), **MODES[mode]})
    code, out, err = cli("dpo", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    first = metrics[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the start
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6) and first["rewards/margins"] == pytest.approx(0, abs=1e-6)
    names = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"}
    assert names <= set(first) and names <= set(metrics[-1]) and metrics[-1]["split"] == "eval"
    assert metrics[-2]["loss"] < math.log(2)  # it learns
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pairs"] == 4 * 4 and summary["pairs_per_sec"] > 0
    sample = read_jsonl(tmp_path / "run" / "samples.jsonl")[0]
    assert {"prompt", "before", "after"} <= set(sample) and "dpo samples" in out
    final = tmp_path / "run" / "final"
    if mode == "full":
        model = AutoModelForCausalLM.from_pretrained(final)
    else:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(final)
    ids = torch.tensor([[5, 6, 7]])
    assert model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False).shape[1] == 5


def encoded_batch(tokenizer, rows, max_length=128):
    encode = pair_encoder(tokenizer, max_length, None)
    return collate_pairs([encode(r) for r in rows], pad_id=tokenizer.pad_token_id)


def test_one_batch_against_an_independent_float64_computation(tiny_model_dir, tiny_tokenizer):
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    policy = copy.deepcopy(reference)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    rows = preference_rows(3, seed=4)
    batch = encoded_batch(tiny_tokenizer, rows)
    cfg = DpoSection(beta=0.2)
    loss, metrics = make_step(cfg, Reference(CompletionLogProbs(policy), CompletionLogProbs(reference)))(CompletionLogProbs(policy), batch)

    expected_losses, chosen_rewards, rejected_rewards = [], [], []
    lengths = batch["attention_mask"].sum(1)
    for i in range(3):
        c, r = i, i + 3
        pc = sequence_logps_float64(policy, batch["input_ids"][c, : lengths[c]], batch["labels"][c, : lengths[c]])
        pr = sequence_logps_float64(policy, batch["input_ids"][r, : lengths[r]], batch["labels"][r, : lengths[r]])
        rc = sequence_logps_float64(reference, batch["input_ids"][c, : lengths[c]], batch["labels"][c, : lengths[c]])
        rr = sequence_logps_float64(reference, batch["input_ids"][r, : lengths[r]], batch["labels"][r, : lengths[r]])
        h = float((pc - rc) - (pr - rr))
        expected_losses.append(math.log1p(math.exp(-0.2 * h)))
        chosen_rewards.append(0.2 * float(pc - rc))
        rejected_rewards.append(0.2 * float(pr - rr))
    assert loss.item() == pytest.approx(sum(expected_losses) / 3, abs=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(sum(chosen_rewards) / 3, abs=1e-6)
    assert metrics["rewards/rejected"].item() == pytest.approx(sum(rejected_rewards) / 3, abs=1e-6)
    accuracy = sum(c > r for c, r in zip(chosen_rewards, rejected_rewards)) / 3
    assert metrics["rewards/accuracies"].item() == pytest.approx(accuracy)


def test_gradients_reach_the_policy_only(tiny_model_dir, tiny_tokenizer):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).requires_grad_(False)
    before = {n: p.clone() for n, p in reference.named_parameters()}
    policy_logps = CompletionLogProbs(policy)
    step = make_step(DpoSection(), Reference(policy_logps, CompletionLogProbs(reference)))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    batch = encoded_batch(tiny_tokenizer, preference_rows(4))
    for _ in range(3):
        loss, _ = step(policy_logps, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None for p in reference.parameters())
    assert all(torch.equal(p, before[n]) for n, p in reference.named_parameters())
    assert step(policy_logps, batch)[0].item() < math.log(2)


def test_lora_reference_is_the_base_with_the_adapter_off(tiny_model_dir, tiny_tokenizer):
    bundle = build_causal_lm(ModelSection(name_or_path=str(tiny_model_dir), lora={"r": 4}), tiny_tokenizer, CPU, seed=0)
    policy = CompletionLogProbs(bundle.model).eval()  # no LoRA dropout: both computations see one policy
    with torch.no_grad():  # as after some training: the adapter changes the policy
        for name, param in bundle.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    batch = encoded_batch(tiny_tokenizer, preference_rows(3))
    explicit_base = CompletionLogProbs(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
    shared = make_step(DpoSection(), Reference(policy, None))(policy, batch)
    separate = make_step(DpoSection(), Reference(policy, explicit_base))(policy, batch)
    assert shared[0].item() == pytest.approx(separate[0].item(), abs=1e-6)
    assert shared[0].item() != pytest.approx(math.log(2), abs=1e-3)


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_reference_of_a_lora_sft_run_is_the_sft_model(quantized, tmp_path, tiny_model_dir, tiny_tokenizer):
    """The trap: with an SFT adapter as the start, the reference must be base + SFT adapter, not the bare base."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from dpo_cli.models.build import keep_4bit_layout_trainable, quantization_config
    from dpo_cli.core.recipes import QuantizationSection

    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    sft.save_pretrained(tmp_path / "sft-adapter")
    cfg = ModelSection(name_or_path=str(tmp_path / "sft-adapter"), lora={"r": 4}, quantization={} if quantized else None)
    bundle = build_causal_lm(cfg, tiny_tokenizer, CPU, seed=0, cache_dir=tmp_path / "run")
    policy = CompletionLogProbs(bundle.model)
    batch = encoded_batch(tiny_tokenizer, preference_rows(2))
    reference_logps, _ = Reference(policy, None)(batch)

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "sft-adapter").merge_and_unload()
    if quantized:
        four_bit = quantization_config(QuantizationSection(), CPU)  # the recipe's NF4 settings
        load = partial(AutoModelForCausalLM.from_pretrained, quantization_config=four_bit, device_map={"": "cpu"})
        sft_model, bare = load(tmp_path / "run" / "base"), load(tiny_model_dir)
        for model in (sft_model, bare):  # the same 4-bit kernel as training uses
            keep_4bit_layout_trainable(model)
    else:
        sft_model, bare = merged, AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        sft_logps, _ = CompletionLogProbs(sft_model.eval())(batch["input_ids"], batch["attention_mask"], batch["labels"])
        bare_logps, _ = CompletionLogProbs(bare.eval())(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.allclose(reference_logps, sft_logps, atol=1e-4)
    assert not torch.allclose(reference_logps, bare_logps, atol=1e-1)


def test_precomputed_reference_gives_the_same_losses_and_survives_resume(tmp_path, cli, dpo_recipe, monkeypatch):
    on_the_fly = dpo_recipe("fly.yaml", dpo={"precompute_ref": False})
    precomputed = dpo_recipe("pre.yaml", dpo={"precompute_ref": True})
    assert cli("dpo", on_the_fly, "--run-dir", tmp_path / "fly")[0] == 0
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, dpo_cli.stages.dpo, "dpo_loss", 3)
        code, _, err = cli("dpo", precomputed, "--run-dir", tmp_path / "pre")
    assert code == 143, err
    saved = tmp_path / "pre" / "reference_logps-train.safetensors"
    stamp = saved.stat().st_mtime_ns
    code, _, err = cli("dpo", precomputed, "--run-dir", tmp_path / "pre")
    assert code == 0, err
    assert saved.stat().st_mtime_ns == stamp and (tmp_path / "pre" / "reference_logps-eval.safetensors").exists()
    assert_same_run(tmp_path / "pre", tmp_path / "fly")


@pytest.mark.parametrize("loss", ["ipo", "hinge", "robust"])
def test_other_losses_train(loss, tmp_path, cli, dpo_recipe):
    smoothing = {"label_smoothing": 0.1} if loss == "robust" else {}
    code, _, err = cli("dpo", dpo_recipe(dpo={"loss": loss, "show_samples": 0, **smoothing}, train={"max_steps": 2}), "--run-dir", tmp_path / loss)
    assert code == 0, err
    first = read_jsonl(tmp_path / loss / "metrics.jsonl")[0]["loss"]
    expected = {"ipo": (1 / 0.2) ** 2, "hinge": 1.0, "robust": math.log(2)}[loss]  # at h = 0
    assert first == pytest.approx(expected, abs=1e-5)


def test_collect_prefs_run_dir_ties_and_bad_rows(tmp_path, cli, dpo_recipe):
    run = tmp_path / "prefs-run"
    run.mkdir()
    (run / "recipe.yaml").write_text("stage: collect-prefs\n")
    rows = [{**r, "tie": i == 0} for i, r in enumerate(preference_rows(20))]
    write_jsonl(run / "prefs.jsonl", rows)
    (run / "summary.json").write_text(json.dumps({"status": "partial"}))  # a labeller quit half-way
    recipe = dpo_recipe(data={"train": str(run), "eval": None}, train={"max_steps": 1})
    code, _, err = cli("dpo", recipe, "--run-dir", tmp_path / "a")
    assert code == 1 and "is not complete (status: partial)" in err
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    code, _, err = cli("dpo", recipe, "--run-dir", tmp_path / "a")
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["data"]["dropped"] == {"train/ties": 1}
    bad = preference_rows(6)
    bad[3]["rejected"] = bad[3]["chosen"]
    write_jsonl(tmp_path / "bad.jsonl", bad)
    code, _, err = cli("dpo", dpo_recipe(data={"train": "bad.jsonl", "eval": None}), "--run-dir", tmp_path / "b")
    assert code == 1 and "data.train row 4: 'chosen' and 'rejected' are the same" in err


def test_agrees_with_trl_over_two_steps(tmp_path, cli, dpo_recipe, tiny_model_dir, tiny_tokenizer):
    """Same model, pairs, optimizer and schedule; one batch holding every pair, seen twice: TRL's DPOTrainer
    and dpo-cli log the same log-probs at step 1 and the same loss and rewards after one update."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = preference_rows(8, seed=9)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, max_steps=2, logging_steps=1, learning_rate=1e-4,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.1, max_length=1024,
        use_cpu=True, report_to=[], save_strategy="no", seed=0,
    )  # fmt: skip
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)
    trainer.train()
    theirs = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]

    write_jsonl(tmp_path / "eight.jsonl", rows)
    recipe = dpo_recipe(
        "trl.yaml",
        data={"train": "eight.jsonl", "eval": None, "max_length": 1024},
        train={"max_steps": 2, "batch_size": 8, "learning_rate": 1e-4, "lr_scheduler": "linear", "save_every": None},
        dpo={"beta": 0.1, "show_samples": 0},
    )
    code, _, err = cli("dpo", recipe, "--run-dir", tmp_path / "ours")
    assert code == 0, err
    ours = read_jsonl(tmp_path / "ours" / "metrics.jsonl")
    for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert ours[0][key] == pytest.approx(theirs[0][key], rel=1e-5, abs=1e-6), key
    # After one update the two agree to 1e-3: TRL's first gradient is 7e-4 (relative) off the exact one, ours is not.
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert ours[1][key] == pytest.approx(theirs[1][key], rel=2e-3, abs=2e-3), key
    assert ours[1]["loss"] < math.log(2) - 0.01

    # The exact first gradient: float64, full logits, one straightforward graph.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    batch = encoded_batch(tiny_tokenizer, rows, max_length=1024)
    logps = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    targets = batch["labels"][:, 1:]
    sums = (logps[:, :-1].gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets != -100)).sum(1)
    h = (sums[:8] - sums[:8].detach()) - (sums[8:] - sums[8:].detach())
    (-torch.nn.functional.logsigmoid(0.1 * h).mean()).backward()
    exact_norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())).item()
    assert ours[0]["grad_norm"] == pytest.approx(exact_norm, rel=1e-5)


def test_saved_reference_logps_are_recomputed_when_the_token_sequences_change(tmp_path, cli, dpo_recipe, monkeypatch):
    """The precomputed reference log-probs carry a fingerprint of the pairs' tokens: a file for other tokens
    (changed data or tokenisation, or one an older version wrote) is scored again on resume, never reused."""
    from safetensors.torch import load_file, save_file

    from dpo_cli.train.reference_logps import saved_fingerprint

    recipe = dpo_recipe(dpo={"precompute_ref": True, "show_samples": 0, "ref_cache": False})  # the pass itself, not the cache
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, dpo_cli.stages.dpo, "dpo_loss", 3)
        assert cli("dpo", recipe, "--run-dir", tmp_path / "run")[0] == 143
    path = tmp_path / "run" / "reference_logps-train.safetensors"
    honest, fingerprint = load_file(path)["logps"], saved_fingerprint(path)
    assert fingerprint
    save_file({"logps": honest + 5.0}, path)  # stale numbers, no fingerprint
    code, _, err = cli("dpo", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert saved_fingerprint(path) == fingerprint and torch.equal(load_file(path)["logps"], honest)


def test_shared_prompt_rows_train_like_a_row_per_sequence(tmp_path, cli, dpo_recipe):
    """dpo.share_prompt (the default) computes each prompt once; the run is the one of a row per sequence, up to
    float rounding: the same losses, rewards, eval and final weights."""
    from helpers import assert_equivalent

    for name, share in (("shared", True), ("rows", False)):
        code, _, err = cli("dpo", dpo_recipe(f"{name}.yaml", dpo={"share_prompt": share, "show_samples": 0}), "--run-dir", tmp_path / name)
        assert code == 0, err
    assert_equivalent(tmp_path / "shared", tmp_path / "rows", ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"))


def test_a_second_run_on_the_same_reference_and_pairs_takes_its_reference_logps_from_the_cache(tmp_path, cli, dpo_recipe, tiny_model_dir, monkeypatch):
    """A sweep (here another beta) on the same reference and pairs skips the reference pass; another
    reference, or dpo.ref_cache off, computes it."""
    import os
    from pathlib import Path

    calls = {"n": 0}
    real_call = Reference.__call__

    def counted(self, batch):
        calls["n"] += 1
        return real_call(self, batch)

    monkeypatch.setattr(Reference, "__call__", counted)
    cache = Path(os.environ["DPO_CLI_CACHE"]) / "reference-logps"
    first = dpo_recipe("a.yaml", dpo={"precompute_ref": True, "show_samples": 0, "beta": 0.1})
    code, _, err = cli("dpo", first, "--run-dir", tmp_path / "a")
    assert code == 0, err
    assert calls["n"] > 0 and len(list(cache.glob("*.safetensors"))) == 2  # train and eval
    calls["n"] = 0
    sweep = dpo_recipe("b.yaml", dpo={"precompute_ref": True, "show_samples": 0, "beta": 0.3})
    code, _, err = cli("dpo", sweep, "--run-dir", tmp_path / "b")
    assert code == 0, err
    assert calls["n"] == 0 and "taken from the cache" in err
    for name in ("train", "eval"):
        assert (tmp_path / "b" / f"reference_logps-{name}.safetensors").read_bytes() == (tmp_path / "a" / f"reference_logps-{name}.safetensors").read_bytes()

    changed = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        changed.lm_head.weight[0, 0] += 0.5  # one weight of another model
    changed.save_pretrained(tmp_path / "changed")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "changed" / file).write_bytes((tiny_model_dir / file).read_bytes())
    other = dpo_recipe("c.yaml", model={"name_or_path": str(tmp_path / "changed")}, dpo={"precompute_ref": True, "show_samples": 0})
    code, _, err = cli("dpo", other, "--run-dir", tmp_path / "c")
    assert code == 0, err
    assert calls["n"] > 0 and "taken from the cache" not in err and len(list(cache.glob("*.safetensors"))) == 4
    calls["n"] = 0
    off = dpo_recipe("d.yaml", dpo={"precompute_ref": True, "show_samples": 0, "ref_cache": False})
    code, _, err = cli("dpo", off, "--run-dir", tmp_path / "d")
    assert code == 0, err
    assert calls["n"] > 0 and "taken from the cache" not in err


@pytest.mark.parametrize("loss", ["simpo", "orpo", "sigmoid+rpo", "simpo+rpo"])
def test_reference_free_losses_and_rpo_train_from_the_policys_own_logps(loss, tmp_path, cli, tiny_model_dir):
    """One step over all 8 pairs at once: the logged loss equals the loss of per-sequence log-probs from a
    plain transformers forward of each tokenised pair (no reference model is built for simpo and orpo)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_cli.data.preference_pairs import pair_encoder
    from dpo_cli.losses import IGNORE_INDEX, dpo_loss, orpo_loss, simpo_loss, with_chosen_nll

    rows = preference_rows(8, seed=3)
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    name, _, rpo = loss.partition("+")
    dpo = {"loss": name, "beta": 2.0 if name == "simpo" else 0.1, "show_samples": 0, **({"rpo_alpha": 0.5} if rpo else {})}
    recipe = write_recipe(tmp_path / "dpo.yaml", {
        "stage": "dpo", "model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": "pairs.jsonl", "max_length": 96},
        "train": {"max_steps": 1, "batch_size": 8, "learning_rate": 1e-3, "log_every": 1}, "dpo": dpo,
    })  # fmt: skip
    code, _, err = cli("dpo", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert ("reference: none" in err) == (name != "sigmoid")
    logged = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]

    tokenizer, model = AutoTokenizer.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    encode = pair_encoder(tokenizer, 96, None)
    sums: dict[str, list[float]] = {"chosen": [], "rejected": []}
    counts: dict[str, list[float]] = {"chosen": [], "rejected": []}
    for row in rows:
        encoded = encode(row)
        for side in ("chosen", "rejected"):
            ids, labels = torch.tensor([encoded[f"{side}_input_ids"]]), torch.tensor(encoded[f"{side}_labels"][1:])
            with torch.no_grad():
                logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            kept = labels != IGNORE_INDEX
            sums[side].append(logps[kept].gather(-1, labels[kept].unsqueeze(-1)).sum().item())
            counts[side].append(float(kept.sum()))
    c, r = torch.tensor(sums["chosen"]), torch.tensor(sums["rejected"])
    nc, nr = torch.tensor(counts["chosen"]), torch.tensor(counts["rejected"])
    if name == "simpo":
        expected, metrics = simpo_loss(c, r, nc, nr, 2.0, 0.5)
    elif name == "orpo":
        expected, metrics = orpo_loss(c, r, nc, nr, 0.1)
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(logged)
    else:
        expected, metrics = dpo_loss(c, r, c, r, 0.1)  # the reference is the initial policy
    if rpo:  # with simpo: CPO-SimPO
        expected, _ = with_chosen_nll(expected, metrics, c, nc, 0.5)
        assert "nll_loss" in logged
    assert logged["loss"] == pytest.approx(expected.item(), rel=1e-4)


def test_reference_free_losses_refuse_a_reference(cli, dpo_recipe):
    for dpo, message in [
        ({"loss": "simpo", "precompute_ref": True}, "simpo has no reference model"),
        ({"loss": "orpo", "rpo_alpha": 1.0}, "orpo already adds"),
    ]:
        code, _, err = cli("validate", dpo_recipe(dpo=dpo))
        assert code == 1 and message in err, err


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_learn_the_preference(loss, tmp_path, cli, dpo_recipe):
    """Over a few dozen steps the chosen responses pull ahead of the rejected ones (the margin of the mean
    token log-probs grows) and the loss falls."""
    dpo = {"loss": loss, "beta": 2.0 if loss == "simpo" else 0.5, "show_samples": 0}
    recipe = dpo_recipe(dpo=dpo, data={"train": "prefs.jsonl", "eval": None, "max_length": 96}, train={"max_steps": 30, "learning_rate": 3e-3, "save_every": None})
    code, _, err = cli("dpo", recipe, "--run-dir", tmp_path / loss)
    assert code == 0, err
    lines = read_jsonl(tmp_path / loss / "metrics.jsonl")
    early, late = lines[:5], lines[-5:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(late, "rewards/margins") > mean(early, "rewards/margins") + 0.1, [r["rewards/margins"] for r in lines]
    assert mean(late, "loss") < mean(early, "loss")
