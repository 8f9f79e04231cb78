"""Learning-rate schedules on hand-computed points; decay groups; the optimizer choices build."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_cli.train.optim import build_optimizer, build_scheduler, lr_multiplier, parameter_groups
from dpo_cli.core.recipes import TrainSection


def factor(step, schedule="linear", warmup=2, total=10, min_ratio=0.0):
    return lr_multiplier(step, warmup_steps=warmup, total_steps=total, schedule=schedule, min_ratio=min_ratio)


def test_warmup_reaches_full_rate_on_its_last_step():
    assert factor(0) == 0.5 and factor(1) == 1.0


def test_linear_and_cosine_decay():
    assert factor(2) == 1.0  # decay starts after warmup
    assert math.isclose(factor(6), 0.5)  # halfway through 8 decay steps
    assert math.isclose(factor(6, "cosine"), 0.5)
    assert math.isclose(factor(4, "cosine"), 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert math.isclose(factor(10, min_ratio=0.1), 0.1)
    assert math.isclose(factor(10, "cosine", min_ratio=0.2), 0.2)
    assert factor(7, "constant") == 1.0


def test_restarts_polynomial_and_warmup_stable_decay_hand_computed():
    def f(step, schedule, **shape):
        return lr_multiplier(step, warmup_steps=2, total_steps=10, schedule=schedule, min_ratio=0.1, **shape)

    # 8 decay steps, 2 cycles of 4: a restart at the full rate on step 6
    assert f(2, "cosine_with_restarts", cycles=2) == 1.0 and f(6, "cosine_with_restarts", cycles=2) == 1.0
    assert math.isclose(f(4, "cosine_with_restarts", cycles=2), 0.1 + 0.9 * 0.5)  # halfway through the first cycle
    assert math.isclose(f(10, "cosine_with_restarts", cycles=2), 0.1)
    assert math.isclose(f(6, "polynomial", power=2.0), 0.1 + 0.9 * 0.5**2)
    assert math.isclose(f(6, "polynomial", power=1.0), f(6, "linear"))  # power 1 is the linear decay
    # WSD: warmup over steps 0-1, the full rate through step 7, then 2 decay steps (20% of 10): 1.0, 0.55, floor
    assert [f(s, "warmup_stable_decay", decay_fraction=0.2) for s in (1, 2, 7, 8)] == [1.0, 1.0, 1.0, 1.0]
    assert math.isclose(f(9, "warmup_stable_decay", decay_fraction=0.2), 0.1 + 0.9 * 0.5)
    assert math.isclose(f(10, "warmup_stable_decay", decay_fraction=0.2), 0.1)


@pytest.mark.parametrize("schedule", ["cosine_with_restarts", "polynomial", "warmup_stable_decay"])
def test_the_recipe_keys_reach_the_schedule(schedule):
    cfg = TrainSection(learning_rate=0.1, warmup_steps=2, lr_scheduler=schedule, min_lr_ratio=0.1, lr_cycles=2, lr_power=2.0, lr_decay_fraction=0.3)
    seen = rates_seen(cfg, 10)
    expected = [0.1 * lr_multiplier(s, warmup_steps=2, total_steps=10, schedule=schedule, min_ratio=0.1, cycles=2, power=2.0, decay_fraction=0.3) for s in range(10)]
    assert seen == pytest.approx(expected)


def rates_seen(cfg: TrainSection, total_steps: int) -> list[float]:
    """The learning rate of each step as an optimizer under build_scheduler sees it."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=cfg.learning_rate)
    scheduler = build_scheduler(optimizer, cfg, total_steps=total_steps)
    seen = []
    for _ in range(total_steps):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return seen


def test_scheduler_applies_factor_per_step():
    seen = rates_seen(TrainSection(learning_rate=0.1, warmup_steps=2, lr_scheduler="linear"), 10)
    assert [round(x, 6) for x in seen] == [round(0.1 * factor(s), 6) for s in range(10)]


def test_no_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = parameter_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"])
def test_every_optimizer_takes_a_step(name):
    model = torch.nn.Linear(64, 64)
    before = model.weight.detach().clone()
    optimizer = build_optimizer(model, TrainSection(optimizer=name, learning_rate=1e-2), torch.device("cpu"))
    model(torch.randn(8, 64)).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(before, model.weight)


def test_the_fused_adamw_takes_the_steps_of_the_straightforward_one():
    """AdamW runs fused on CPU and GPU; its weights after some steps are those of torch's per-tensor loop."""
    weights = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
        cfg = TrainSection(learning_rate=1e-2, weight_decay=0.1)
        if fused:
            optimizer = build_optimizer(model, cfg, torch.device("cpu"))
        else:
            betas = (cfg.adam_beta1, cfg.adam_beta2)
            optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-2, betas=betas, eps=cfg.adam_epsilon, foreach=False)
        assert all(group["fused"] is (True if fused else None) for group in optimizer.param_groups)
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            optimizer.zero_grad()
            model(torch.randn(16, 32, generator=generator)).pow(2).mean().backward()
            optimizer.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    for fused, plain in zip(*weights):
        assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-6)
