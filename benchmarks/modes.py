"""`python benchmarks/bench.py --suite modes`: dpo-cli's own configurations on the short workload — full, LoRA
and 4-bit + LoRA for each stage, packed sft, and PPO's three layouts — medians of throughput and peak memory."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from workloads import WORKLOADS, build_base_model, build_reward_init, write_data


def configs(base: Path, rm: Path, files: dict[str, Path]) -> dict[str, tuple[str, dict]]:
    workload = WORKLOADS["short"]
    train = {"max_steps": workload.steps, "batch_size": workload.batch_size, "learning_rate": 1e-4, "save_every": None, "log_every": 5}
    data = {"max_length": workload.max_length, "eval": None}
    model = {"name_or_path": str(base)}
    lora, qlora = {**model, "lora": {"r": 16}}, {**model, "lora": {"r": 16}, "quantization": {}}
    pretrain = {"model": model, "data": {**data, "train": "demo:reviews?n=3000"}, "train": train, "pretrain": {"show_samples": 0}}
    sft = {"model": model, "data": {**data, "train": str(files["sft"])}, "train": train, "sft": {"show_samples": 0}}
    packed = {**sft, "sft": {"show_samples": 0, "packing": True}}
    dpo = {"model": model, "data": {**data, "train": str(files["pairs"])}, "train": train, "dpo": {"show_samples": 0}}
    reward = {"model": {"name_or_path": str(rm)}, "data": {**data, "train": str(files["pairs"])}, "train": train}
    ppo_train = {**train, "max_steps": workload.steps // 2, "learning_rate": 1e-5}
    ppo = {
        "model": lora, "data": {"train": "demo:prompts", "max_length": 64}, "train": ppo_train,
        "generation": {"max_new_tokens": 64, "batch_size": workload.batch_size},
        "ppo": {"reward_model": str(rm), "mini_batch_size": 4, "ppo_epochs": 2},
    }  # fmt: skip
    return {
        "pretrain full": ("pretrain", pretrain),
        "sft full": ("sft", sft),
        "sft full (packed)": ("sft", packed),
        "sft LoRA r=16 (packed)": ("sft", {**packed, "model": lora}),
        "sft 4-bit + LoRA (packed)": ("sft", {**packed, "model": qlora}),
        "dpo full": ("dpo", dpo),
        "dpo LoRA r=16": ("dpo", {**dpo, "model": lora}),
        "dpo 4-bit + LoRA": ("dpo", {**dpo, "model": qlora}),
        "rm-train full": ("rm-train", reward),
        "rm-train LoRA r=16": ("rm-train", {**reward, "model": {**lora, "name_or_path": str(rm)}}),
        "ppo single-GPU mode (shared base, LoRA)": ("ppo", ppo),
        "ppo single-GPU mode (shared 4-bit base)": ("ppo", {**ppo, "model": qlora}),
        "ppo separate models": ("ppo", {**ppo, "model": model}),
    }


def run_once(stage: str, recipe: dict, workdir: Path, name: str) -> dict:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = workdir / "runs" / name
    subprocess.run([sys.executable, "-m", "dpo_cli", stage, str(path), "--run-dir", str(run_dir), "--fresh"], check=True, capture_output=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["rows_per_sec"] = summary["steps"] * recipe["train"]["batch_size"] / summary["train_time_s"]  # ppo: episodes/s
    return summary


def own_modes(args: argparse.Namespace, workdir: Path) -> dict:
    base, rm = workdir / "base", workdir / "rm-init"
    build_base_model(base)
    build_reward_init(base, rm)
    files = write_data(workdir, base, WORKLOADS["short"])
    results = {}
    for index, (label, (stage, recipe)) in enumerate(configs(base, rm, files).items()):
        if args.only not in label:
            continue
        print(f"{label}: {args.repeats} runs", flush=True)
        runs = [run_once(stage, recipe, workdir, f"c{index}-r{r}") for r in range(args.repeats)]
        results[label] = {
            "rows_per_sec": statistics.median(r["rows_per_sec"] for r in runs),
            "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in runs),
            "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in runs),
            "runs": [round(r["rows_per_sec"], 2) for r in runs],
        }
        if stage == "ppo":  # where the time goes: sampling vs updating
            results[label]["generate_share"] = statistics.median(r["time_generate_s"] / (r["time_generate_s"] + r["time_train_s"]) for r in runs)
    for label, row in results.items():
        extra = f", {100 * row['generate_share']:.0f}% generating" if "generate_share" in row else ""
        print(f"{label}: {row['rows_per_sec']:.1f} rows/s, {row['tokens_per_sec']:,.0f} tokens/s, peak {row['peak_memory_bytes'] / 2**20:,.0f} MiB{extra}")
    return {"results": results}
