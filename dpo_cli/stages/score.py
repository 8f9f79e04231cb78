"""`dpo-cli score`: score prompt/response rows with a reward model (an rm-train run or any scalar sequence
classifier), so any tool can use the reward model through a file."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

from dpo_cli import ui
from dpo_cli.data import load_source, require_columns
from dpo_cli.errors import UserError
from dpo_cli.judges import RewardModelJudge
from dpo_cli.models import load_reward_model
from dpo_cli.recipes import DataSection
from dpo_cli.rundir import atomic_write_text


def _text(value: Any) -> str:
    return value[-1]["content"] if isinstance(value, list) else value


def score_file(model: str, data: Path, out: Path, batch_size: int, max_length: int, trust_remote_code: bool = False) -> dict:
    if out.exists():
        raise UserError(f"--out {out} exists; choose another file (nothing is overwritten)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = load_source(str(data.resolve()), DataSection(train=str(data)), "--data", "train")
    if len(rows) == 0:
        raise UserError(f"--data {data}: no rows")
    columns = require_columns(rows, [("prompt", "response"), ("prompt", "chosen", "rejected")], "--data")
    reward_model, tokenizer = load_reward_model(model, device, what="RUN_OR_MODEL", trust_remote_code=trust_remote_code)
    judge = RewardModelJudge(model, reward_model, tokenizer, batch_size, device, max_length)
    responses = [c for c in columns if c != "prompt"]
    prompts = [row["prompt"] for row in rows for _ in responses]
    texts = [_text(row[c]) for row in rows for c in responses]
    with ui.TaskProgress("scoring", 1) as progress:
        values = judge.score(prompts, texts).values
        progress.advance(1)
    scored = []
    for index, row in enumerate(rows):
        own = values[index * len(responses) : (index + 1) * len(responses)]
        record = {k: v for k, v in row.items() if not k.startswith("__")}
        if len(responses) == 1:
            record["score"] = own[0]
        else:
            record["chosen_score"], record["rejected_score"] = own
        scored.append(record)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in scored))
    summary: dict[str, Any] = {"rows": len(scored), "mean score": statistics.fmean(values), "score std": statistics.pstdev(values), "written to": str(out)}
    if len(responses) == 2:
        summary["accuracy (chosen > rejected)"] = statistics.fmean(float(r["chosen_score"] > r["rejected_score"]) for r in scored)
    ui.summary_table({"stage": "score", "status": "completed", "highlights": {"reward model": model, **summary}})
    return summary
