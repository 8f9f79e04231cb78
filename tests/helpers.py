"""Helpers the tests share (fixtures live in conftest.py): data and recipe files, run comparisons, the CLI on
several processes, signals at a chosen call, the training modes every stage is tested in, and system-test skips."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def with_sections(recipe: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    """A test recipe with keyword sections merged in: a dict updates the section, anything else replaces it."""
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and isinstance(recipe.get(key), dict) else value
    return recipe


def skip_without_system(reason: str) -> None:
    """Skip a test that needs something of the machine (root, a tmpfs mount, a Slurm daemon) which is not
    there; with DPO_CLI_REQUIRE_SYSTEM_TESTS=1 (as CI sets it) that is a failure, so a promise is never
    silently left untested where it can be tested."""
    if os.environ.get("DPO_CLI_REQUIRE_SYSTEM_TESTS") == "1":
        pytest.fail(f"DPO_CLI_REQUIRE_SYSTEM_TESTS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


TOLERANCE = 1e-6  # an exact resume: equal weights and losses up to float noise


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(final / name))


def train_losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_jsonl(run / "metrics.jsonl")]


def train_records(run: Path) -> list[dict]:
    return [m for m in read_jsonl(run / "metrics.jsonl") if m.get("split") != "eval"]


def assert_equivalent(two: Path, one: Path, names: tuple[str, ...], eval_loss: bool = True) -> None:
    """Two runs that must train alike up to float reordering (two processes with batch b, one with 2b): the
    same rows in the same steps, close metrics `names`, eval loss (unless it depends on how the eval rows are
    batched, as KTO's reference point does) and final weights."""
    got, want = train_records(two), train_records(one)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        assert a["tokens"] == b["tokens"]  # the same rows, in the same steps
        for name in names:
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-5), (a["step"], name)
    evals = [m for m in read_jsonl(two / "metrics.jsonl") if m.get("split") == "eval"]
    expected = [m for m in read_jsonl(one / "metrics.jsonl") if m.get("split") == "eval"]
    assert not eval_loss or evals[-1]["loss"] == pytest.approx(expected[-1]["loss"], rel=1e-4)  # eval rows sharded, then reduced
    final, reference = final_weights(two), final_weights(one)
    assert final.keys() == reference.keys()
    for name in reference:
        assert torch.allclose(final[name], reference[name], atol=1e-4, rtol=1e-3), name


def assert_same_run(run: Path, reference: Path) -> None:
    got, want = train_losses(run), train_losses(reference)
    assert [s for s, _ in got] == [s for s, _ in want]
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) <= TOLERANCE
    weights, expected = final_weights(run), final_weights(reference)
    assert weights.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(weights[name], expected[name], atol=TOLERANCE, rtol=0), name


def torchrun(*args: Any, processes: int = 2, env: dict[str, str] | None = None):
    """`dpo-cli ARGS` on several CPU processes (torchrun, gloo); returns the CompletedProcess."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "dpo_cli", *map(str, args)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


def interrupt_at_call(monkeypatch, module, name: str, call: int, signum: int = signal.SIGTERM) -> None:
    """Wrap module.name so that its call-th call first delivers a real signal to this process (during a
    training step, when the stage's handlers are installed)."""
    calls = {"n": 0}
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            signal.raise_signal(signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Review pairs: a positive continuation chosen over a negative one."""
    import random

    from dpo_cli.demo.reviews import make_review

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        good, bad = make_review(rng, "positive"), make_review(rng, "negative")
        rows.append({"prompt": good["opening"], "chosen": " " + good["continuation"], "rejected": " " + bad["continuation"]})
    return rows


def chat_sft_rows(n: int, seed: int = 0) -> list[dict]:
    """Conversations as chat datasets hold them (OpenAI-style messages, a system turn in some)."""
    import random

    from dpo_cli.demo.reviews import make_review

    rng = random.Random(seed)
    rows = []
    for index in range(n):
        review = make_review(rng, "positive")
        messages = [{"role": "user", "content": f"Continue this review: {review['opening']}"}, {"role": "assistant", "content": review["continuation"]}]
        if index % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You write film reviews."})
        rows.append({"messages": messages})
    return rows


def chat_preference_rows(n: int, seed: int = 0) -> list[dict]:
    """TRL's conversational preference format with an explicit prompt."""
    return [
        {
            "prompt": [{"role": "user", "content": f"Continue this review: {row['prompt']}"}],
            "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
        }
        for row in preference_rows(n, seed)
    ]


def model_modes(**lora: Any) -> dict[str, dict[str, Any]]:
    """The three ways a stage trains, as model-section overrides: full weights, LoRA, and 4-bit + LoRA (QLoRA)."""
    return {"full": {}, "lora": {"lora": {"r": 4, **lora}}, "qlora": {"lora": {"r": 4, **lora}, "quantization": {}}}


def lora_run(base_dir: Path, run: Path, quantization: dict | None = None, generation: dict | None = None) -> Path:
    """A run dir as a LoRA (or 4-bit + LoRA) run leaves it: recipe.yaml and final/ holding an adapter whose
    B matrices are not zero (a fresh LoRA would merge to the bare base and prove nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_cli.core.recipes import QuantizationSection
    from dpo_cli.models.build import load_4bit
    from dpo_cli.models.sources import ModelSource

    torch.manual_seed(3)
    if quantization is None:
        base = AutoModelForCausalLM.from_pretrained(base_dir)
    else:
        base = load_4bit(AutoModelForCausalLM, ModelSource(str(base_dir)), QuantizationSection(**quantization), torch.device("cpu"), torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    run.mkdir(parents=True)
    model.save_pretrained(run / "final")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(run / "final")
    recipe = {"stage": "dpo", "model": {"name_or_path": str(base_dir), "lora": {"r": 4}, **({"quantization": quantization} if quantization else {})}}
    if generation:
        recipe["generation"] = generation
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run / "summary.json").write_text(json.dumps({"stage": "dpo", "status": "completed"}))
    return run


def sequence_logps_float64(model, ids, labels):
    """Independent: one sequence per forward pass, float64 log-softmax over the whole vocabulary."""
    keep = labels != -100
    n = int((ids != -1).sum())
    logps = torch.log_softmax(model(input_ids=ids[None, :n]).logits[0].double(), -1)
    return sum(logps[t, labels[t + 1]] for t in range(n - 1) if keep[t + 1])
