"""`make bench`: tokens/s and peak memory of pretrain and sft on a fixed synthetic workload.

Each configuration runs as its own `dpo-cli` process (so peak memory is that run's alone), several
times; the table reports the median tokens/s and peak memory, and each one's speed relative to full
fine-tuning. Timings are of the training steps only (summary.json's train_time_s), not of start-up.

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
    from dpo_cli.tokenization import train_bpe_tokenizer

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


def configs(base: Path, steps: int) -> dict[str, tuple[str, dict]]:
    train = {"max_steps": steps, "batch_size": WORKLOAD["batch_size"], "learning_rate": 1e-4, "save_every": None, "log_every": 5}
    data = {"max_length": WORKLOAD["seq_len"]}
    pretrain = {"model": {"name_or_path": str(base)}, "data": {**data, "train": "demo:reviews?n=3000"}, "train": train, "pretrain": {"show_samples": 0}}
    sft = {"model": {"name_or_path": str(base)}, "data": {**data, "train": "demo:sft?n=2000"}, "train": train, "sft": {"show_samples": 0, "packing": True}}
    lora = {"r": 16}
    return {
        "pretrain full": ("pretrain", pretrain),
        "sft full (packed)": ("sft", sft),
        "sft LoRA r=16 (packed)": ("sft", {**sft, "model": {**sft["model"], "lora": lora}}),
        "sft 4-bit + LoRA (packed)": ("sft", {**sft, "model": {**sft["model"], "lora": lora, "quantization": {}}}),
    }


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
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.json"))
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from dpo_cli.ui import human_bytes

    console = Console()
    results = {}
    with tempfile.TemporaryDirectory(prefix="dpo-cli-bench-") as tmp:
        workdir = Path(tmp)
        build_base_model(workdir / "base")
        for index, (label, (stage, recipe)) in enumerate(configs(workdir / "base", args.steps).items()):
            console.print(f"[bold]{label}[/bold]: {args.repeats} runs of {args.steps} steps")
            runs = [run_once(stage, recipe, workdir, f"c{index}-r{r}") for r in range(args.repeats)]
            results[label] = {
                "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in runs),
                "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in runs),
                "peak_memory_kind": runs[0]["peak_memory_kind"],
                "device": runs[0]["device"],
                "runs": [round(r["tokens_per_sec"], 1) for r in runs],
            }

    reference = results["sft full (packed)"]["tokens_per_sec"]
    table = Table(title=f"dpo-cli bench: {WORKLOAD} · {args.steps} steps · median of {args.repeats}", title_justify="left")
    for column in ("configuration", "tokens/s", "vs sft full", "peak memory", "runs (tokens/s)"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for label, row in results.items():
        table.add_row(
            label,
            f"{row['tokens_per_sec']:,.0f}",
            f"{row['tokens_per_sec'] / reference:.2f}x",
            f"{human_bytes(row['peak_memory_bytes'])} ({row['peak_memory_kind']})",
            ", ".join(f"{x:,.0f}" for x in row["runs"]),
        )
    console.print(table)
    console.print(f"device: {next(iter(results.values()))['device']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workload": WORKLOAD, "steps": args.steps, "repeats": args.repeats, "results": results}, indent=2) + "\n")
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
