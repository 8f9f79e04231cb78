"""`make bench`: dpo-cli and Hugging Face TRL side by side on the same workloads, and dpo-cli's own modes.

    python benchmarks/bench.py [--repeats 3] [--workloads short,long] [--only dpo,ppo]    (the side-by-side tables)
    python benchmarks/bench.py --suite ablations                                      (each technique on / off)
    python benchmarks/bench.py --suite modes                                          (full, LoRA, 4-bit, PPO)

Side by side: sft, rm and dpo (TRL's default and its fastest setting), and ppo against TRL 1.12's PPOTrainer in its
own environment (ppo_compare.py; `make bench-env` builds it), on each workload (workloads.py): the same
model, rows, batches (TRL reads them in dpo-cli's training order), sequence limit, optimizer (AdamW, lr 1e-4,
linear decay, clip 1.0), fp32, seed. The two tools alternate run by run, each run its own process. Time is the
training loop plus any precomputed reference pass (start-up, model loading and tokenisation left out, for both).
Reported: rows/s and non-padding tokens/s (the workload's tokens, a prompt counted in each sequence), the ratio
dpo-cli / TRL (median of the paired runs' ratios), peak memory (process RSS on CPU, allocated on GPU) and its
ratio, model-FLOPs utilisation against a matmul peak measured in the same run, and whether the first-step losses
agree (within 1e-4 relative). Results go to benchmarks/results/<host>-<date>.json; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from ppo_compare import PPO_WORKLOADS, ppo_recipe, ppo_rows, write_prompts  # noqa: E402
from workloads import WORKLOADS, Workload, build_base_model, build_reward_init, in_training_order, model_flops_per_token, write_data  # noqa: E402

SEED = 7
# What the first step's agreement is checked on: DPO's first loss is log 2 whatever the batch (policy = reference),
# so for dpo the chosen completions' log-probs (TRL logs them under the same name).
FIRST_STEP_KEY = {"sft": "loss", "rm-train": "loss", "dpo": "logps/chosen"}
# (name, dpo-cli stage, TRL trainer, TRL setting, dpo-cli section overrides)
COMPARISONS = [
    ("sft", "sft", "sft", "fastest", {"sft": {"show_samples": 0}}),
    ("rm-train", "rm-train", "rm", "fastest", {}),
    ("dpo vs TRL default", "dpo", "dpo", "default", {"dpo": {"show_samples": 0, "beta": 0.1}}),
    # the pass is timed in every run: no run takes it from dpo-cli's cache of an earlier one (nor TRL's datasets cache)
    ("dpo vs TRL fastest (precomputed reference)", "dpo", "dpo", "fastest", {"dpo": {"show_samples": 0, "beta": 0.1, "precompute_ref": True, "ref_cache": False}}),
]


# How both tools train in each --mode: full weights, LoRA on every linear layer but the head, or that LoRA on a
# 4-bit NF4 base (double quantization, matmuls in the benchmark's precision). Dropout 0: the first steps compare.
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
MODES = {"full": {}, "lora": {"lora": LORA}, "qlora": {"lora": LORA, "quantization": {"quant_type": "nf4", "double_quant": True}}}


def matmul_peak(precision: str, seconds: float = 3.0) -> float:
    """The machine's matmul throughput (FLOP/s) in the benchmark's precision, best of a few shapes."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    best = 0.0
    for m, k, n in ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (4096, 256, 1024), (4096, 1024, 256)):
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        a @ b
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 5:
            a @ b
            count += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - started))
    return best


def ours(stage: str, recipe: dict, workdir: Path, name: str) -> dict:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = workdir / "runs" / name
    done = subprocess.run([sys.executable, "-m", "dpo_cli", stage, str(path), "--run-dir", str(run), "--fresh"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"dpo-cli {stage} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((run / "summary.json").read_text())
    first = next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"split"' not in line)
    seconds = summary["train_time_s"] + summary.get("reference_logps_seconds", 0.0)  # ppo: sampling, scoring and training
    return {"seconds": seconds, "tokens": summary["tokens"], "peak_memory_bytes": summary["peak_memory_bytes"], "first_loss": first.get(FIRST_STEP_KEY.get(stage, "loss"))}


def theirs(trainer: str, setting: str, model: Path, data: Path, workload: Workload, workdir: Path, name: str, precision: str, mode: str) -> dict:
    config = {"stage": trainer, "setting": setting, "model": str(model), "data": str(data), "output_dir": str(workdir / name), "bf16": precision == "bf16"}
    config.update(mode=mode, lora=LORA)
    config.update(batch_size=workload.batch_size, steps=workload.steps, max_length=workload.max_length, seed=SEED)
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config))
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("trl_baseline.py")), str(path)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"TRL {trainer} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "seconds": result["train_seconds"] + result["precompute_seconds"]}


def side_by_side(args: argparse.Namespace, workdir: Path) -> dict:
    base, rm_init = workdir / "base", workdir / "rm-init"
    build_base_model(base, args.shape)
    build_reward_init(base, rm_init)
    flops_per_token = model_flops_per_token(base)
    peaks = [matmul_peak(args.precision)]  # measured again after each row: the best the machine did in this run
    rows, pairs_for_ppo = [], {}
    for workload in (WORKLOADS[name] for name in args.workloads.split(",")):
        files = write_data(workdir, base, workload)
        pairs_for_ppo[workload.name] = files["pairs"]
        ordered = {key: in_training_order(path, workload.batch_size, SEED) for key, path in files.items()}
        for label, stage, trainer, setting, sections in COMPARISONS:
            if not any(part in label for part in args.only.split(",")):
                continue
            if args.mode != "full" and stage == "rm-train":
                continue  # LoRA and 4-bit rows: sft and dpo
            model = rm_init if stage == "rm-train" else base
            data = files["sft" if stage == "sft" else "pairs"]
            recipe = {
                "stage": stage, "seed": SEED, "model": {"name_or_path": str(model), **MODES[args.mode]},
                "data": {"train": str(data), "eval": None, "max_length": workload.max_length},
                "train": {"max_steps": workload.steps, "batch_size": workload.batch_size, "learning_rate": 1e-4, "lr_scheduler": "linear",
                          "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "save_every": None, "log_every": 1,
                          "mixed_precision": "bf16" if args.precision == "bf16" else "no"},
                **sections,
            }  # fmt: skip
            print(f"{workload.name} · {label}: {args.repeats} paired runs", flush=True)
            pairs = []
            for r in range(args.repeats):
                run_ours = lambda: ours(stage, recipe, workdir, f"{workload.name}-{stage}-{setting}-{r}")  # noqa: E731
                run_theirs = lambda: theirs(trainer, setting, model, ordered["sft" if stage == "sft" else "pairs"], workload, workdir, f"trl-{workload.name}-{trainer}-{setting}-{r}", args.precision, args.mode)  # noqa: E731
                a, b = (run_ours(), run_theirs()) if r % 2 == 0 else tuple(reversed((run_theirs(), run_ours())))
                pairs.append((a, b))
            peaks.append(matmul_peak(args.precision))
            rows.append(summarise(workload, label, stage, pairs, flops_per_token, max(peaks), args.mode))
    ppo = []
    if args.mode == "full" and any(part in "ppo vs TRL 1.12" for part in args.only.split(",")):
        ppo = ppo_rows(base, rm_init, {name: path for name, path in pairs_for_ppo.items() if name in PPO_WORKLOADS}, workdir, args.repeats, args.precision, SEED)
    for row in rows:  # every row's MFU against the run's best peak
        row["ours_mfu"], row["trl_mfu"] = (row[key] * row["matmul_peak_flops"] / max(peaks) for key in ("ours_mfu", "trl_mfu"))
        row["matmul_peak_flops"] = max(peaks)
    return {"matmul_peak_flops": max(peaks), "matmul_peaks_flops": peaks, "model_flops_per_token_forward": flops_per_token, "rows": rows, "ppo_rows": ppo}


# (name, stage, the option's section and key, other settings of both runs): each measured on and off, alternating, on every workload
ABLATIONS = [
    ("dpo.share_prompt", "dpo", "dpo", "share_prompt", {}),
    ("rm.share_prompt", "rm-train", "rm", "share_prompt", {}),
    ("sft.padding_free", "sft", "sft", "padding_free", {}),
    ("train.group_by_length (dpo, a row per sequence)", "dpo", "train", "group_by_length", {"dpo": {"share_prompt": False}}),
    ("ppo.padding_free", "ppo", "ppo", "padding_free", {}),
]


def merged(recipe: dict, *overrides: dict) -> dict:
    """The recipe with each override's sections updated key by key."""
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in recipe.items()}
    for override in overrides:
        for section, values in override.items():
            out[section] = {**out.get(section, {}), **values}
    return out


def ablations(args: argparse.Namespace, workdir: Path) -> dict:
    """What each technique buys: dpo-cli with the option on against the same run with it off."""
    base, rm_init = workdir / "base", workdir / "rm-init"
    build_base_model(base, args.shape)
    build_reward_init(base, rm_init)
    rows = []
    for workload in (WORKLOADS[name] for name in args.workloads.split(",")):
        files = write_data(workdir, base, workload)
        for label, stage, section, key, settings in ABLATIONS:
            if not any(part in label for part in args.only.split(",")):
                continue
            recipe = {
                "stage": stage, "seed": SEED, "model": {"name_or_path": str(rm_init if stage == "rm-train" else base)},
                "data": {"train": str(files["sft" if stage == "sft" else "pairs"]), "eval": None, "max_length": workload.max_length},
                "train": {"max_steps": workload.steps, "batch_size": workload.batch_size, "learning_rate": 1e-4, "save_every": None, "log_every": 1,
                          "mixed_precision": "bf16" if args.precision == "bf16" else "no"},
            }  # fmt: skip
            if stage == "ppo":
                prompts, _ = write_prompts(workdir, base, files["pairs"], PPO_WORKLOADS[workload.name])
                recipe = ppo_recipe(base, rm_init, prompts, PPO_WORKLOADS[workload.name], args.precision, SEED)
            if stage in ("sft", "dpo"):
                settings = merged({stage: {"show_samples": 0}}, settings)
            print(f"{workload.name} · {label}: {args.repeats} paired runs", flush=True)
            on = lambda r: ours(stage, merged(recipe, settings, {section: {key: True}}), workdir, f"{workload.name}-{section}-{key}-on-{r}")  # noqa: E731
            off = lambda r: ours(stage, merged(recipe, settings, {section: {key: False}}), workdir, f"{workload.name}-{section}-{key}-off-{r}")  # noqa: E731
            pairs = [(on(r), off(r)) if r % 2 == 0 else tuple(reversed((off(r), on(r)))) for r in range(args.repeats)]
            speedups = [b["seconds"] / a["seconds"] for a, b in pairs]
            rows.append({"workload": workload.name, "option": label, "speedup": statistics.median(speedups), "runs": [round(x, 3) for x in speedups]})
    return {"ablations": rows}


def summarise(workload: Workload, label: str, stage: str, pairs: list[tuple[dict, dict]], flops_per_token: float, peak: float, mode: str) -> dict:
    rows, tokens = workload.rows, pairs[0][0]["tokens"]
    # training: forward and backward (no weight gradients of a frozen base under LoRA); dpo: a reference forward too
    passes = (3 if mode == "full" else 2) + (1 if stage == "dpo" else 0)
    rate = lambda run: rows / run["seconds"]  # noqa: E731
    mfu = lambda run: tokens * passes * flops_per_token / run["seconds"] / peak  # noqa: E731
    a, b = pairs[0]
    agree = a["first_loss"] is not None and b["first_loss"] is not None and abs(a["first_loss"] - b["first_loss"]) <= 1e-4 * abs(b["first_loss"])
    return {
        "workload": workload.name, "comparison": label, "rows": rows, "tokens": tokens,
        "ours_rows_per_s": statistics.median(rate(x) for x, _ in pairs), "trl_rows_per_s": statistics.median(rate(y) for _, y in pairs),
        "ratio": statistics.median(rate(x) / rate(y) for x, y in pairs), "runs_ratio": [round(rate(x) / rate(y), 3) for x, y in pairs],
        "ours_tokens_per_s": statistics.median(tokens / x["seconds"] for x, _ in pairs), "trl_tokens_per_s": statistics.median(tokens / y["seconds"] for _, y in pairs),
        "ours_peak_memory_bytes": statistics.median(x["peak_memory_bytes"] for x, _ in pairs), "trl_peak_memory_bytes": statistics.median(y["peak_memory_bytes"] for _, y in pairs),
        "ours_mfu": statistics.median(mfu(x) for x, _ in pairs), "trl_mfu": statistics.median(mfu(y) for _, y in pairs),
        "first_loss": [a["first_loss"], b["first_loss"]], "first_losses_agree": agree, "matmul_peak_flops": peak,
    }  # fmt: skip


def markdown(report: dict) -> str:
    mib = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
    lines = [
        "| workload | stage | dpo-cli rows/s | TRL rows/s | ratio (median of pairs) | tokens/s dpo-cli / TRL | MFU dpo-cli / TRL | peak MiB dpo-cli / TRL | first step agrees (loss; dpo: logps/chosen) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['workload']} | {row['comparison']} | {row['ours_rows_per_s']:.1f} | {row['trl_rows_per_s']:.1f} | **{row['ratio']:.2f}x** "
            f"| {row['ours_tokens_per_s']:,.0f} / {row['trl_tokens_per_s']:,.0f} | {100 * row['ours_mfu']:.0f}% / {100 * row['trl_mfu']:.0f}% "
            f"| {mib(row['ours_peak_memory_bytes'])} / {mib(row['trl_peak_memory_bytes'])} ({row['ours_peak_memory_bytes'] / row['trl_peak_memory_bytes']:.2f}x) "
            f"| {'yes' if row['first_losses_agree'] else 'no'} ({row['first_loss'][0]:.6f} / {row['first_loss'][1]:.6f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["trl", "ablations", "modes"], default="trl")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default="short,long")
    parser.add_argument("--only", default="", help="Only the comparisons (or modes) whose name contains this text (several: a,b).")
    parser.add_argument("--shape", choices=["tiny", "qwen2.5-0.5b"], default="tiny", help="The model's shape (random weights).")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="fp32, or bf16 autocast (both tools).")
    parser.add_argument("--mode", choices=list(MODES), default="full", help="Full weights, LoRA, or LoRA on a 4-bit base (both tools; sft and dpo).")
    parser.add_argument("--out", type=Path, default=None, help="Default: benchmarks/results/<host>-<date>.json")
    args = parser.parse_args()
    import torch

    from dpo_cli.core.runtime import library_versions

    with tempfile.TemporaryDirectory(prefix="dpo-cli-bench-") as tmp:
        if args.suite == "modes":
            from modes import own_modes

            report = own_modes(args, Path(tmp))
        elif args.suite == "ablations":
            report = ablations(args, Path(tmp))
        else:
            report = side_by_side(args, Path(tmp))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    versions = library_versions()
    try:
        versions["trl"] = metadata.version("trl")
    except metadata.PackageNotFoundError:
        pass
    report.update(suite=args.suite, mode=args.mode, shape=args.shape, precision=args.precision, repeats=args.repeats, host=socket.gethostname(), device=device, date=datetime.date.today().isoformat(), versions=versions)
    out = args.out or Path(__file__).parent / "results" / f"{socket.gethostname()}-{report['date']}-{args.suite}{'' if args.mode == 'full' else '-' + args.mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.suite == "trl":
        print(f"\n{device}; {args.shape} model, {args.mode} weights, {args.precision}; matmul peak {report['matmul_peak_flops'] / 1e9:,.0f} GFLOP/s; TRL {report['versions'].get('trl', '?')}\n")
        print(markdown(report))
        if report["ppo_rows"]:
            from ppo_compare import markdown as ppo_markdown

            print("\n" + ppo_markdown(report["ppo_rows"]))
    if args.suite == "ablations":
        print("\n| workload | option | speed-up, on / off (median of paired runs) | runs |\n|---|---|---|---|")
        for row in report["ablations"]:
            print(f"| {row['workload']} | `{row['option']}` | **{row['speedup']:.2f}x** | {', '.join(f'{x:.2f}' for x in row['runs'])} |")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
