"""PPO side by side: dpo-cli's ppo (separate models, as TRL runs them) against TRL 1.12's PPOTrainer, which runs in
its own environment (`make bench-env` builds .venv-trl112; later TRL releases have no PPOTrainer).

The same policy (the benchmark's base), reference (a frozen copy), critic and reward model (the seeded reward
init), the same tokenised prompts, rollouts per iteration, mini-batch, PPO epochs, new tokens, temperature 1,
optimizer settings and precision. Prompt order differs (TRL shuffles with its own DataLoader), which evens out
over the iterations. Reported: episodes/s and the ratio (median of alternating pairs), peak memory, and dpo-cli's
own split of its time between generation (sampling and scoring) and training (experience passes and updates).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

TRL_PYTHON = Path(__file__).resolve().parents[1] / ".venv-trl112" / "bin" / "python"


@dataclass(frozen=True)
class PpoWorkload:
    name: str
    iterations: int
    batch_size: int
    mini_batch_size: int
    ppo_epochs: int
    max_new_tokens: int


PPO_WORKLOADS = {"short": PpoWorkload("short", 6, 8, 8, 4, 32), "long": PpoWorkload("long", 4, 8, 8, 4, 64), "gpu": PpoWorkload("gpu", 4, 16, 8, 4, 128)}


def write_prompts(folder: Path, base: Path, pairs: Path, workload: PpoWorkload) -> tuple[Path, Path]:
    """The prompts of the workload's preference pairs: as dpo-cli reads them, and tokenised by dpo-cli for TRL."""
    from transformers import AutoTokenizer

    from dpo_cli.data.encoding import prompt_ids_for_generation

    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()][: workload.iterations * workload.batch_size]
    text, ids = folder / f"ppo-{workload.name}-prompts.jsonl", folder / f"ppo-{workload.name}-prompt-ids.jsonl"
    text.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    ids.write_text("".join(json.dumps({"input_ids": prompt_ids_for_generation(tokenizer, r["prompt"])}) + "\n" for r in rows))
    return text, ids


def ppo_recipe(base: Path, rm_init: Path, prompts: Path, workload: PpoWorkload, precision: str, seed: int) -> dict:
    """dpo-cli's ppo recipe of the workload, with the settings TRL's run gets (separate models, as TRL runs them)."""
    return {
        "stage": "ppo", "seed": seed, "model": {"name_or_path": str(base)}, "data": {"train": str(prompts), "max_length": 1024},
        "train": {"max_steps": workload.iterations, "batch_size": workload.batch_size, "learning_rate": 1e-5, "lr_scheduler": "linear",
                  "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "save_every": None, "log_every": 1,
                  "mixed_precision": "bf16" if precision == "bf16" else "no"},
        "generation": {"max_new_tokens": workload.max_new_tokens, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "batch_size": workload.batch_size},
        "ppo": {"reward_model": str(rm_init), "mini_batch_size": workload.mini_batch_size, "ppo_epochs": workload.ppo_epochs, "kl_coef": 0.05,
                "vf_coef": 0.1, "cliprange": 0.2, "cliprange_value": 0.2, "gamma": 1.0, "lam": 0.95, "show_samples": 0,
                "reward_batch_size": workload.batch_size},
    }  # fmt: skip


def ours(recipe: dict, workdir: Path, name: str) -> dict:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = workdir / "runs" / name
    done = subprocess.run([sys.executable, "-m", "dpo_cli", "ppo", str(path), "--run-dir", str(run), "--fresh"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"dpo-cli ppo failed:\n{done.stderr[-3000:]}")
    summary = json.loads((run / "summary.json").read_text())
    return {
        "seconds": summary["time_generate_s"] + summary["time_train_s"], "episodes": summary["episodes"], "peak_memory_bytes": summary["peak_memory_bytes"],
        "generate_seconds": summary["time_generate_s"], "train_seconds": summary["time_train_s"],
    }  # fmt: skip


def theirs(config: dict, workdir: Path, name: str) -> dict:
    path = workdir / f"{name}.json"
    path.write_text(json.dumps({**config, "output_dir": str(workdir / name)}))
    done = subprocess.run([str(TRL_PYTHON), str(Path(__file__).with_name("trl_ppo_baseline.py")), str(path)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"TRL 1.12 PPOTrainer failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ppo_rows(base: Path, rm_init: Path, pairs_by_workload: dict[str, Path], workdir: Path, repeats: int, precision: str, seed: int) -> list[dict]:
    if not TRL_PYTHON.exists():
        print(f"ppo: {TRL_PYTHON} is missing (make bench-env builds it); PPO is left out", flush=True)
        return []
    rows = []
    for name, pairs in pairs_by_workload.items():
        workload = PPO_WORKLOADS[name]
        text, ids = write_prompts(workdir, base, pairs, workload)
        recipe = ppo_recipe(base, rm_init, text, workload, precision, seed)
        config = {
            "policy": str(base), "reward_model": str(rm_init), "prompts": str(ids), "iterations": workload.iterations, "batch_size": workload.batch_size,
            "mini_batch_size": workload.mini_batch_size, "ppo_epochs": workload.ppo_epochs, "max_new_tokens": workload.max_new_tokens,
            "bf16": precision == "bf16", "seed": seed,
        }  # fmt: skip
        print(f"{name} · ppo vs TRL 1.12 PPOTrainer: {repeats} paired runs", flush=True)
        pairs_run = []
        for r in range(repeats):
            run_ours = lambda: ours(recipe, workdir, f"ppo-{name}-{r}")  # noqa: E731
            run_theirs = lambda: theirs(config, workdir, f"trl-ppo-{name}-{r}")  # noqa: E731
            a, b = (run_ours(), run_theirs()) if r % 2 == 0 else tuple(reversed((run_theirs(), run_ours())))
            pairs_run.append((a, b))
        rate = lambda run: run["episodes"] / run["seconds"]  # noqa: E731
        rows.append({
            "workload": name, "comparison": "ppo vs TRL 1.12 PPOTrainer", "episodes": workload.iterations * workload.batch_size,
            "ours_episodes_per_s": statistics.median(rate(x) for x, _ in pairs_run), "trl_episodes_per_s": statistics.median(rate(y) for _, y in pairs_run),
            "ratio": statistics.median(rate(x) / rate(y) for x, y in pairs_run), "runs_ratio": [round(rate(x) / rate(y), 3) for x, y in pairs_run],
            "ours_peak_memory_bytes": statistics.median(x["peak_memory_bytes"] for x, _ in pairs_run),
            "trl_peak_memory_bytes": statistics.median(y["peak_memory_bytes"] for _, y in pairs_run),
            "ours_generate_share": statistics.median(x["generate_seconds"] / x["seconds"] for x, _ in pairs_run),
        })  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| workload | stage | dpo-cli episodes/s | TRL episodes/s | ratio (median of pairs) | peak MiB dpo-cli / TRL | dpo-cli time generating |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours_mib, trl_mib = row["ours_peak_memory_bytes"] / 2**20, row["trl_peak_memory_bytes"] / 2**20
        lines.append(
            f"| {row['workload']} | {row['comparison']} | {row['ours_episodes_per_s']:.2f} | {row['trl_episodes_per_s']:.2f} | **{row['ratio']:.2f}x** "
            f"| {ours_mib:,.0f} / {trl_mib:,.0f} ({ours_mib / trl_mib:.2f}x) | {100 * row['ours_generate_share']:.0f}% |"
        )
    return "\n".join(lines)
