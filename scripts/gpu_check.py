"""One-GPU check: issue 11's matrix (every stage x model mode x input kind, tests/stages/test_inputs.py) on CUDA,
in bf16 and in 4-bit with bitsandbytes' CUDA kernels, then a Qwen2-0.5B-shaped model (random weights)
through sft, dpo and ppo (single-GPU mode) at sequence length 1024. Prints one table: stage, mode, input,
ok, peak torch.cuda.max_memory_allocated, tokens/s. Offline: every model is built from config.

    scripts/gpu_check.sh                       # what a lent GPU runs (under 8 minutes on one H100/H200)
    python scripts/gpu_check.py --allow-cpu --limit 3 --big-layers 1    # a quick rehearsal on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "stages")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from helpers import chat_preference_rows, chat_sft_rows, write_jsonl, write_recipe  # noqa: E402
from model_zoo import save_family  # noqa: E402
from test_inputs import MATRIX, MODES, invoke, make_peft_adapter, make_trl_output, stage_recipe  # noqa: E402


def peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_mib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def run_row(rows: list[dict], stage: str, mode: str, kind: str, recipe: Path, run_dir: Path) -> None:
    peak_reset()
    started = time.time()
    try:
        code, err = invoke(stage, recipe, "--run-dir", run_dir)
        problem = None if code == 0 else (err.strip().splitlines() or ["exit %d" % code])[-1][:160]
    except Exception as exc:  # a crash is a row of the table, not the end of the check
        problem = f"{type(exc).__name__}: {exc}"[:160]
        traceback.print_exc()
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    rows.append({
        "stage": stage, "mode": mode, "input": kind, "ok": problem is None, "peak_mib": peak_mib(),
        "tokens_per_sec": summary.get("tokens_per_sec"), "seconds": time.time() - started, "problem": problem,
    })  # fmt: skip
    print(f"{'ok  ' if problem is None else 'FAIL'} {stage:14} {mode:6} {kind:13} {problem or ''}", flush=True)


def build_inputs(root: Path) -> dict[str, Path]:
    base = save_family("qwen2", root / "zoo-qwen2")
    inputs = {"hub": base, "trl-output": make_trl_output(base, root / "trl-out"), "peft-adapter": make_peft_adapter(base, root / "peft")}
    for kind, mode in (("full-run", "full"), ("lora-run", "lora"), ("qlora-run", "qlora")):
        code, err = invoke("sft", stage_recipe(root / kind, "sft", {"name_or_path": str(base), **MODES[mode]}), "--run-dir", root / kind / "run")
        if code != 0:
            raise SystemExit(f"gpu_check: building the {kind} input failed: {err}")
        inputs[kind] = root / kind / "run"
    return inputs


def matrix(root: Path, rows: list[dict], limit: int | None, deadline: float) -> None:
    inputs = build_inputs(root)
    reward_model = save_family("rm", root / "zoo-rm")
    for index, (stage, kind, mode) in enumerate(MATRIX[:limit]):
        if time.time() > deadline:
            rows.append({"stage": stage, "mode": mode, "input": kind, "ok": None, "problem": "skipped: time budget"})
            continue
        model = {"name_or_path": str(inputs[kind]), **MODES[mode]}
        if stage == "ppo" and mode == "full":
            model["lora"] = None
        folder = root / "matrix" / f"{index:03d}"
        run_row(rows, stage, mode, kind, stage_recipe(folder, stage, model, reward_model=reward_model), folder / "run")


def long_rows(n: int, words: int) -> list[dict]:
    """Conversations whose answers run to about `words` words (about 1024 tokens with the tiny BPE)."""
    rows = chat_sft_rows(n)
    for row in rows:
        answer = row["messages"][-1]
        answer["content"] = " ".join((answer["content"] + " ") * (words // max(len(answer["content"].split()), 1) + 1)).split()[:words]
        answer["content"] = " ".join(answer["content"])
    return rows


def qwen_half_billion(root: Path, layers: int) -> Path:
    """Qwen2.5-0.5B's shape (hidden 896, 14 heads, 2 KV heads, MLP 4864, 151,936-token vocabulary, tied
    embeddings) with random weights and the tiny ChatML tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    small = save_family("qwen2", root / "zoo-qwen2-for-big")
    tokenizer = AutoTokenizer.from_pretrained(small)
    config = Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers, num_attention_heads=14,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    folder = root / "qwen2-0.5b-shaped"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def big_model(root: Path, rows: list[dict], layers: int, steps: int) -> None:
    folder = qwen_half_billion(root, layers)
    reward_model = save_family("rm", root / "zoo-rm-big")
    data = root / "big-data"
    write_jsonl(data / "chat.jsonl", long_rows(16, 700))
    prefs = chat_preference_rows(16)
    long = long_rows(16, 500)
    for pair, row in zip(prefs, long):
        pair["prompt"] = [{"role": "user", "content": row["messages"][-1]["content"]}]
    write_jsonl(data / "prefs.jsonl", prefs)
    prompts = [{"prompt": [{"role": "user", "content": r["messages"][-1]["content"]}]} for r in long_rows(16, 600)]
    write_jsonl(data / "prompts.jsonl", prompts)
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    common = {"seed": 1, "model": {"name_or_path": str(folder), "lora": lora, "gradient_checkpointing": True},
              "train": {"max_steps": steps, "batch_size": 4, "learning_rate": 1e-5, "log_every": 1}, "generation": {"max_new_tokens": 64}}  # fmt: skip
    recipes = {
        "sft": {**common, "stage": "sft", "data": {"train": str(data / "chat.jsonl"), "max_length": 1024}},
        "dpo": {**common, "stage": "dpo", "data": {"train": str(data / "prefs.jsonl"), "max_length": 1024}},
        "ppo": {**common, "stage": "ppo", "data": {"train": str(data / "prompts.jsonl"), "max_length": 1024},
                "generation": {"max_new_tokens": 128, "temperature": 1.0, "batch_size": 4},
                "ppo": {"reward_model": str(reward_model), "mini_batch_size": 2, "ppo_epochs": 1}},
    }  # fmt: skip
    for stage, recipe in recipes.items():
        path = write_recipe(root / f"big-{stage}.yaml", recipe)
        run_row(rows, stage, "lora", "qwen2-0.5b-shaped", path, root / f"big-{stage}")


def table(rows: list[dict]) -> str:
    lines = ["| stage | mode | input | ok | peak GPU memory (MiB) | tokens/s |", "|---|---|---|---|---|---|"]
    for row in rows:
        ok = {True: "yes", False: f"no: {row.get('problem')}", None: row.get("problem")}[row["ok"]]
        peak = f"{row['peak_mib']:.0f}" if row.get("peak_mib") is not None else "-"
        speed = f"{row['tokens_per_sec']:.0f}" if row.get("tokens_per_sec") else "-"
        lines.append(f"| {row['stage']} | {row['mode']} | {row['input']} | {ok} | {peak} | {speed} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="Write gpu_check.md and gpu_check.json here.")
    parser.add_argument("--allow-cpu", action="store_true", help="Rehearse on a machine without CUDA (no 4-bit CUDA kernels).")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N matrix rows.")
    parser.add_argument("--big-layers", type=int, default=24, help="Layers of the 0.5B-shaped model (24 as Qwen2.5-0.5B).")
    parser.add_argument("--big-steps", type=int, default=5, help="Optimizer steps per stage for the 0.5B-shaped model.")
    parser.add_argument("--budget-s", type=float, default=300.0, help="Matrix rows after this many seconds are skipped.")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_check: no CUDA device (use --allow-cpu to rehearse on a CPU)")
        return 2
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    started = time.time()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dpo-cli-gpu-check-") as tmp:
        matrix(Path(tmp), rows, args.limit, started + args.budget_s)
        big_model(Path(tmp), rows, args.big_layers, args.big_steps)
    text = f"gpu_check on {device}, torch {torch.__version__}, {time.time() - started:.0f} s\n\n{table(rows)}\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.md").write_text(text)
        (args.out / "gpu_check.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    return 0 if all(row["ok"] is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
