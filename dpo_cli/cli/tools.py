"""The commands that read runs rather than train one: export, generate, chat, runs (dpo_cli/tools/)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dpo_cli.cli.options import DebugOpt, guarded
from dpo_cli.core import ui

def export(
    run: Annotated[str, typer.Argument(metavar="RUN", help="A run dir, its final/, a checkpoint folder, or any model or LoRA folder.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="The folder to write (default: RUN/export); never overwritten.")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="Merge a LoRA run into its base (the default for LoRA runs).")] = False,
    adapter_only: Annotated[bool, typer.Option("--adapter-only", help="Export a LoRA run as its adapter (with tokenizer and generation config).")] = False,
    dtype: Annotated[Optional[str], typer.Option("--dtype", metavar="bf16|fp16|fp32", help="Precision of the written weights (default: the base model's).")] = None,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", metavar="step-N", help="Export this checkpoint of the run instead of final/.")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="A checkpoint's model needs code from the hub: run it (the run's recipe alone never decides).")] = False,
    debug: DebugOpt = False,
) -> None:
    """Write a run's model as a plain Hugging Face folder any tool loads: a LoRA run merged into its base in
    float32 (a 4-bit run's base dequantized as it trained), then cast to --dtype; tokenizer, chat template and a
    generation config that stops at the end of a turn included.

    Example: dpo-cli export runs/demo/dpo --dtype bf16 --out exported/dpo

    Example: dpo-cli export runs/demo/sft --checkpoint step-200      (an earlier state, to RUN/export-step-200)

    Example: dpo-cli export runs/qlora-dpo --adapter-only             (the adapter, over its recorded base)
    """
    from dpo_cli.tools.export import export_model

    def action() -> None:
        written = export_model(run, out, merge, adapter_only, dtype, checkpoint, trust_remote_code)
        ui.note(f"exported to {written}")

    guarded(debug, action)


ModelArg = Annotated[str, typer.Argument(metavar="RUN_OR_MODEL", help="A run dir, its final/, a LoRA adapter, or a model folder or hub id.")]
MaxNewOpt = Annotated[Optional[int], typer.Option("--max-new-tokens", min=1, help="Longest response (default: the run's generation section, else 64).")]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", min=0.0, help="0 samples greedily (default: the run's, else 1).")]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling (default: the run's, else 1).")]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", min=0, help="0 disables top-k (default: the run's, else 0).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Sampling seed: the same seed gives the same responses.")]


def generate(
    model: ModelArg,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", help="A prompt (repeatable).")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="A file of prompts: JSONL/JSON/CSV/Parquet with a prompt (or messages) column, or .txt, one per line.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write prompt/response rows as JSONL here (never overwritten) instead of printing them.")] = None,
    max_new_tokens: MaxNewOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    seed: SeedOpt = 0,
    chat: Annotated[Optional[bool], typer.Option("--chat/--raw", help="Prompts as user turns under the chat template, or as plain text (default: a turn where the model has a template and was not trained on plain text).", show_default=False)] = None,
    debug: DebugOpt = False,
) -> None:
    """Sample responses from a run or any model: batched, seeded, with the run's sampling settings unless flags say otherwise.

    Example: dpo-cli generate runs/demo/dpo --prompt "The movie was" --temperature 0.7

    Example: dpo-cli generate runs/qwen-dpo --prompts questions.jsonl --out answers.jsonl
    """
    from dpo_cli.tools.generate import SamplingFlags, read_prompts, run_generate

    flags = SamplingFlags(max_new_tokens, temperature, top_p, top_k, chat)
    guarded(debug, lambda: run_generate(model, read_prompts(prompt or [], prompts), flags, seed, out))


def chat(
    model: ModelArg,
    system: Annotated[Optional[str], typer.Option("--system", help="A system message to start the conversation with.")] = None,
    max_new_tokens: MaxNewOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    seed: SeedOpt = 0,
    debug: DebugOpt = False,
) -> None:
    """Talk to a run in the terminal, under its chat template; replies stream as they are sampled.
    /reset forgets the conversation; /exit or Ctrl-D ends it.

    Example: dpo-cli chat runs/qwen-dpo --temperature 0.7 --system "You answer briefly."
    """
    from dpo_cli.tools.generate import SamplingFlags, run_chat

    guarded(debug, lambda: run_chat(model, SamplingFlags(max_new_tokens, temperature, top_p, top_k), seed, system))


def runs(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="The folder run dirs are in (searched a few levels down).")] = Path("runs"),
    archived: Annotated[bool, typer.Option("--all", help="Also list runs set aside by --fresh (NAME.prev-TIME).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list for scripts instead of the table.")] = False,
    debug: DebugOpt = False,
) -> None:
    """List run dirs: stage, status (completed, running, failed, interrupted, stopped), steps, the metrics that
    matter for the stage, size and when last written.

    Example: dpo-cli runs runs/demo

    Example: dpo-cli runs --json | jq '.[] | select(.status != "completed") | .run'
    """
    from dpo_cli.tools.runs import list_runs

    guarded(debug, lambda: list_runs(folder, archived, as_json))
