"""`make bench`: throughput and peak memory of pretrain, sft, dpo, rm-train and ppo on a fixed synthetic workload, and of
the same sft and dpo workloads through Hugging Face TRL (when it is installed: `pip install -e .[dev]`).

Each configuration runs as its own process (so peak memory is that run's alone), several times; the table
reports medians. Timings are of training only (dpo-cli: summary.json's train_time_s; TRL: its
train_runtime), not of start-up, model loading or tokenisation. rows/s counts training rows (pairs for dpo
and rm-train, episodes for ppo, whose time includes generation).

    python benchmarks/bench.py [--repeats 3] [--steps 20] [--out benchmarks/results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

WORKLOAD = {"seq_len": 256, "batch_size": 8, "hidden": 256, "layers": 4, "heads": 8, "vocab": 2048}


def build_base_model(folder: Path) -> None:
    """A 4-layer Llama with a BPE tokenizer trained on demo reviews: the fixed model every config starts from."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_cli.demo import demo_rows
    from dpo_cli.data.tokenization import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([r["text"] for r in demo_rows("demo:reviews?n=2000")], WORKLOAD["vocab"], 1024)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=WORKLOAD["hidden"],
        intermediate_size=4 * WORKLOAD["hidden"],
        num_hidden_layers=WORKLOAD["layers"],
        num_attention_heads=WORKLOAD["heads"],
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_data(workdir: Path) -> dict[str, Path]:
    """Fixed synthetic data: reviews (pretrain), openings -> continuations (sft), preference pairs (dpo)."""
    import random

    from dpo_cli.demo import demo_rows
    from dpo_cli.demo.reviews import make_review

    rng = random.Random(0)
    pairs = []
    for _ in range(1000):
        good, bad = make_review(rng, "positive"), make_review(rng, "negative")
        pairs.append({"prompt": good["opening"], "chosen": " " + good["continuation"], "rejected": " " + bad["continuation"]})
    files = {"sft": workdir / "sft.jsonl", "dpo": workdir / "prefs.jsonl"}
    files["rm"] = workdir / "rm"
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForSequenceClassification.from_pretrained(workdir / "base", num_labels=1).save_pretrained(files["rm"])
    AutoTokenizer.from_pretrained(workdir / "base").save_pretrained(files["rm"])
    files["sft"].write_text("".join(json.dumps(r) + "\n" for r in demo_rows("demo:sft?n=2000")))
    files["dpo"].write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return files


def configs(base: Path, files: dict[str, Path], steps: int) -> dict[str, tuple[str, dict]]:
    train = {"max_steps": steps, "batch_size": WORKLOAD["batch_size"], "learning_rate": 1e-4, "save_every": None, "log_every": 5}
    data = {"max_length": WORKLOAD["seq_len"]}
    model = {"name_or_path": str(base)}
    lora, qlora = {**model, "lora": {"r": 16}}, {**model, "lora": {"r": 16}, "quantization": {}}
    pretrain = {"model": model, "data": {**data, "train": "demo:reviews?n=3000"}, "train": train, "pretrain": {"show_samples": 0}}
    sft = {"model": model, "data": {**data, "train": str(files["sft"])}, "train": train, "sft": {"show_samples": 0}}
    packed = {**sft, "sft": {"show_samples": 0, "packing": True}}
    dpo = {"model": model, "data": {**data, "train": str(files["dpo"])}, "train": train, "dpo": {"show_samples": 0}}
    rm = {"model": model, "data": {**data, "train": str(files["dpo"])}, "train": train}
    ppo_run = {"max_steps": steps // 2, "batch_size": WORKLOAD["batch_size"], "learning_rate": 1e-5, "save_every": None, "log_every": 5}
    ppo = {
        "model": lora,
        "data": {"train": "demo:prompts", "max_length": 64},
        "train": ppo_run,
        "generation": {"max_new_tokens": 64, "batch_size": WORKLOAD["batch_size"]},
        "ppo": {"reward_model": str(files["rm"]), "mini_batch_size": 4, "ppo_epochs": 2},
    }
    return {
        "pretrain full": ("pretrain", pretrain),
        "sft full": ("sft", sft),
        "sft full (packed)": ("sft", packed),
        "sft LoRA r=16 (packed)": ("sft", {**packed, "model": lora}),
        "sft 4-bit + LoRA (packed)": ("sft", {**packed, "model": qlora}),
        "dpo full": ("dpo", dpo),
        "dpo LoRA r=16": ("dpo", {**dpo, "model": lora}),
        "dpo 4-bit + LoRA": ("dpo", {**dpo, "model": qlora}),
        "rm-train full": ("rm-train", rm),
        "rm-train LoRA r=16": ("rm-train", {**rm, "model": lora}),
        "rm-train 4-bit + LoRA": ("rm-train", {**rm, "model": qlora}),
        "ppo single-GPU mode (shared base, LoRA)": ("ppo", ppo),
        "ppo single-GPU mode (shared 4-bit base)": ("ppo", {**ppo, "model": qlora}),
        "ppo separate models": ("ppo", {**ppo, "model": model}),
    }


TRL_BASELINES = {"sft full": "sft", "dpo full": "dpo"}  # our configuration -> the same workload in TRL


def run_once(stage: str, recipe: dict, workdir: Path, name: str) -> dict:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = workdir / "runs" / name
    subprocess.run(
        [sys.executable, "-m", "dpo_cli", stage, str(path), "--run-dir", str(run_dir), "--fresh"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["rows_per_sec"] = summary["steps"] * WORKLOAD["batch_size"] / summary["train_time_s"]  # ppo: episodes/s
    return summary


def run_trl(stage: str, base: Path, files: dict[str, Path], workdir: Path, steps: int, name: str) -> dict | None:
    try:
        import trl  # noqa: F401
    except ImportError:
        return None
    config = {"stage": stage, "model": str(base), "data": str(files[stage]), "output_dir": str(workdir / name)}
    config.update(batch_size=WORKLOAD["batch_size"], steps=steps, max_length=WORKLOAD["seq_len"])
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config))
    script = Path(__file__).with_name("trl_baseline.py")
    output = subprocess.run([sys.executable, str(script), str(path)], check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    result["rows_per_sec"] = result["items"] / result["train_seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.json"))
    parser.add_argument("--only", default="", help="Run only the configurations whose name contains this text (e.g. ppo).")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from dpo_cli.core.ui import human_bytes

    console = Console()
    results: dict[str, dict] = {}
    baselines: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="dpo-cli-bench-") as tmp:
        workdir = Path(tmp)
        build_base_model(workdir / "base")
        files = write_data(workdir)
        for index, (label, (stage, recipe)) in enumerate(configs(workdir / "base", files, args.steps).items()):
            if args.only not in label:
                continue
            console.print(f"[bold]{label}[/bold]: {args.repeats} runs of {args.steps} steps")
            runs = [run_once(stage, recipe, workdir, f"c{index}-r{r}") for r in range(args.repeats)]
            results[label] = {
                "rows_per_sec": statistics.median(r["rows_per_sec"] for r in runs),
                "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in runs),
                "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in runs),
                "peak_memory_kind": runs[0]["peak_memory_kind"],
                "device": runs[0]["device"],
                "runs": [round(r["rows_per_sec"], 2) for r in runs],
            }
            if stage == "ppo":  # where the time goes: sampling vs updating
                results[label]["generate_share"] = statistics.median(r["time_generate_s"] / (r["time_generate_s"] + r["time_train_s"]) for r in runs)
            if label in TRL_BASELINES:
                console.print(f"[bold]TRL {label}[/bold]: {args.repeats} runs of {args.steps} steps")
                trl_runs = [run_trl(TRL_BASELINES[label], workdir / "base", files, workdir, args.steps, f"trl{index}-r{r}") for r in range(args.repeats)]
                if all(trl_runs):
                    baselines[label] = {
                        "rows_per_sec": statistics.median(r["rows_per_sec"] for r in trl_runs),
                        "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in trl_runs),
                        "runs": [round(r["rows_per_sec"], 2) for r in trl_runs],
                    }

    table = Table(title=f"dpo-cli bench: {WORKLOAD} · {args.steps} steps · median of {args.repeats}", title_justify="left")
    for column in ("configuration", "rows/s (pairs/s)", "tokens/s", "peak memory", "TRL rows/s", "vs TRL", "runs (rows/s)"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for label, row in results.items():
        baseline = baselines.get(label)
        table.add_row(
            label,
            f"{row['rows_per_sec']:,.1f}",
            f"{row['tokens_per_sec']:,.0f}",
            f"{human_bytes(row['peak_memory_bytes'])}",
            f"{baseline['rows_per_sec']:,.1f}" if baseline else "",
            f"{row['rows_per_sec'] / baseline['rows_per_sec']:.2f}x" if baseline else "",
            ", ".join(f"{x:,.1f}" for x in row["runs"]),
        )
    console.print(table)
    console.print(f"device: {next(iter(results.values()))['device']}; peak memory: {next(iter(results.values()))['peak_memory_kind']}")
    for label, row in results.items():
        if "generate_share" in row:
            console.print(f"{label}: {100 * row['generate_share']:.0f}% of the time generating, {100 * (1 - row['generate_share']):.0f}% training")
    for label, baseline in baselines.items():
        console.print(f"TRL {label}: peak memory {human_bytes(baseline['peak_memory_bytes'])}, runs {baseline['runs']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"workload": WORKLOAD, "steps": args.steps, "repeats": args.repeats, "results": results, "trl": baselines}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
