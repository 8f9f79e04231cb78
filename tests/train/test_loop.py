"""The shared training loop: accumulation equals one big batch, loss falls, the right parameters change."""

from __future__ import annotations

from functools import partial

import torch
from datasets import Dataset

from dpo_cli.data.encoding import collate_causal, encode_prompt_completion
from dpo_cli.models.forward import CompletionLogProbs
from dpo_cli.train.loop import BatchStream, row_lengths, train
from dpo_cli.models.build import build_causal_lm
from dpo_cli.core.recipes import ModelSection, TrainSection
from dpo_cli.core.rundir import RunDir, read_metrics
from dpo_cli.core.runtime import setup_runtime
from dpo_cli.models.forward import lm_step


def sft_set(tokenizer, rows) -> Dataset:
    encoded = [encode_prompt_completion(tokenizer, r["prompt"], r["completion"]) for r in rows]
    return Dataset.from_dict({"input_ids": [e[0] for e in encoded], "labels": [e[1] for e in encoded]})


def run_loop(tmp_path, name, tiny_model_dir, tokenizer, dataset, lora=None, **train_values):
    cfg = TrainSection(**{"max_steps": 4, "learning_rate": 1e-2, "log_every": 1, "save_every": None, **train_values})
    runtime = setup_runtime(cfg, seed=0)
    bundle = build_causal_lm(ModelSection(name_or_path=str(tiny_model_dir), lora=lora), tokenizer, runtime.device, seed=0)
    stream = BatchStream(dataset, cfg.batch_size, seed=0, collate=partial(collate_causal, pad_id=tokenizer.pad_token_id))
    with RunDir.open(tmp_path / name) as run:
        result = train(stage="test", model=CompletionLogProbs(bundle.model), train_stream=stream, eval_stream=None, step_fn=lm_step, cfg=cfg, run=run, runtime=runtime)
        metrics = read_metrics(run.metrics_path)
    return bundle.model, result, metrics


def test_grad_accum_equals_one_big_batch(tmp_path, tiny_model_dir, tiny_tokenizer, sft_rows):
    """Rows of different lengths: accumulation weights micro-batches by target tokens, not 1/grad_accum."""
    dataset = sft_set(tiny_tokenizer, sft_rows[:16])
    # SGD: the update is linear in the gradient, so equal gradients give equal weights (Adam's first steps
    # are sign-like and would amplify float noise in near-zero gradient entries)
    big, _, big_metrics = run_loop(tmp_path, "big", tiny_model_dir, tiny_tokenizer, dataset, batch_size=4, grad_accum=1, optimizer="sgd")
    small, _, small_metrics = run_loop(tmp_path, "accum", tiny_model_dir, tiny_tokenizer, dataset, batch_size=2, grad_accum=2, optimizer="sgd")
    for a, b in zip(big_metrics, small_metrics):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
    for (name, p), (_, q) in zip(big.named_parameters(), small.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_loss_falls_and_every_weight_changes(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": "Rate it:", "completion": " A superb film. Rating: 9/10."}] * 8
    dataset = sft_set(tiny_tokenizer, rows)
    model, result, metrics = run_loop(tmp_path, "toy", tiny_model_dir, tiny_tokenizer, dataset, max_steps=12, batch_size=4)
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]
    targets_per_row = sum(label != -100 for label in dataset[0]["labels"][1:])
    assert result.state.step == 12 and result.state.items == 12 * 4 * targets_per_row
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = {n for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()) if not torch.equal(p.detach(), q)}
    assert changed == {n for n, _ in base.named_parameters()}


def test_lora_changes_adapters_only(tmp_path, tiny_model_dir, tiny_tokenizer, sft_rows):
    from transformers import AutoModelForCausalLM

    model, _, _ = run_loop(tmp_path, "lora", tiny_model_dir, tiny_tokenizer, sft_set(tiny_tokenizer, sft_rows[:8]), lora={"r": 4}, batch_size=4)
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    for name, param in model.named_parameters():
        if "lora_B" in name:
            assert param.abs().sum() > 0, f"{name} did not train"
        elif "lora_" not in name:
            original = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param.detach(), base[original].detach()), f"frozen {name} changed"


def test_metrics_lines_have_the_documented_fields(tmp_path, tiny_model_dir, tiny_tokenizer, sft_rows):
    _, _, metrics = run_loop(tmp_path, "m", tiny_model_dir, tiny_tokenizer, sft_set(tiny_tokenizer, sft_rows[:8]), batch_size=4)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_sec"} <= set(metrics[0])
    assert metrics[1]["epoch"] == 1.0


def test_under_fp16_loss_scaling_an_inf_gradient_is_the_scalers_to_skip_and_a_nan_loss_is_ours():
    from dpo_cli.train.loop import discard_step, nonfinite_step

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale((weight * torch.tensor([float("inf"), 1.0, 1.0])).sum()).backward()
    scaler.unscale_(optimizer)  # what clipping does first
    norm = torch.nn.utils.clip_grad_norm_([weight], 1.0)
    assert nonfinite_step(1.0, norm) == "the gradient norm became inf"  # without a scaler: never applied
    assert nonfinite_step(1.0, norm, scaler) is None  # with one: its own skip, and its scale halves
    assert nonfinite_step(float("nan"), norm, scaler) == "the loss became nan"
    discard_step(optimizer, scaler)
    assert weight.grad is None and scaler.get_scale() == 2.0**15
    assert torch.equal(weight.detach(), torch.ones(3))


def test_grouped_by_length_every_row_comes_once_an_epoch_in_batches_of_similar_length():
    generator = torch.Generator().manual_seed(0)
    lengths = (torch.randn(1003, generator=generator).exp() * 40).long().clamp(min=1).tolist()  # heavy-tailed, as chat data
    dataset = Dataset.from_dict({"input_ids": [[7] * n for n in lengths]})
    sizes = lambda rows: [len(r["input_ids"]) for r in rows]  # noqa: E731 - a batch, as its rows' lengths
    grouped = BatchStream(dataset, 8, seed=3, collate=sizes, lengths=row_lengths(dataset))
    plain = BatchStream(dataset, 8, seed=3, collate=sizes)
    padding = lambda batches: sum(max(b) * len(b) - sum(b) for b in batches)  # noqa: E731
    for epoch in range(2):
        batches = [grouped[epoch * grouped.per_epoch + k] for k in range(grouped.per_epoch)]
        assert sorted(n for b in batches for n in b) == sorted(lengths)  # each row once
        assert len(batches[-1]) == 1003 % 8  # the short batch stays last
        assert padding(batches) < 0.25 * padding([plain[epoch * plain.per_epoch + k] for k in range(plain.per_epoch)])
    first = [grouped[k] for k in range(10)]
    assert [max(b) for b in first] != sorted((max(b) for b in first), reverse=True)  # no longest-first trend
    assert BatchStream(dataset, 8, seed=3, collate=sizes, lengths=row_lengths(dataset))[37] == grouped[37]  # the same after a resume
    ranks = [BatchStream(dataset, 4, seed=3, collate=sizes, rank=r, world_size=2, lengths=row_lengths(dataset)) for r in (0, 1)]
    assert all(ranks[0][k] + ranks[1][k] == grouped[k] for k in range(ranks[0].per_epoch))  # processes split the same global batches
    longer = sum(sum(ranks[0][k]) > sum(ranks[1][k]) for k in range(ranks[0].per_epoch))
    assert 0.2 < longer / ranks[0].per_epoch < 0.8  # and neither always gets the longer half
    pairs = Dataset.from_dict({"chosen_input_ids": [[1, 2], [1], [7]], "rejected_input_ids": [[3], [4, 5, 6], []]})
    assert row_lengths(pairs) == [3, 4, 1] and row_lengths(pairs.select([2, 0])) == [1, 3]
