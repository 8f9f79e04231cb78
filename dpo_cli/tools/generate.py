"""`dpo-cli generate` and `dpo-cli chat`: sample from any model a recipe accepts (a run, its final/, a hub or
local folder, a LoRA adapter; a 4-bit run in 4-bit with its adapter, as it trained). Sampling settings come
from the flags, else the run's recipe (`generation`), else the defaults. A prompt is a user turn under the
chat template when the model has one and was not trained on plain prompt / completion text (--raw forces
plain text, --chat a turn)."""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedTokenizerBase

from dpo_cli.core import ui
from dpo_cli.core.errors import UserError
from dpo_cli.core.recipes import GenerationSection
from dpo_cli.core.atomic import atomic_write_jsonl
from dpo_cli.data.encoding import prompt_ids_for_generation
from dpo_cli.models.generate import generate, sampling_options, stop_token_ids
from dpo_cli.models.io import load_policy


@dataclass
class Sampler:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    settings: GenerationSection
    conversational: bool  # prompts are user turns under the chat template
    device: torch.device


@dataclass
class SamplingFlags:
    """The command line's sampling settings; None keeps the run's (or the default)."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    chat: bool | None = None  # True: prompts are user turns; False: plain text; None: decided by the model


def load_sampler(target: str, flags: SamplingFlags, scratch: Path) -> Sampler:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tokenizer = load_policy(target, device, scratch, what="RUN_OR_MODEL")
    except UserError as exc:  # the loaders name the recipe key; here the model is the command's argument
        raise UserError(str(exc).replace("model.name_or_path", "RUN_OR_MODEL")) from None
    run = _run_dir(target)
    settings = dict(_recipe_generation(run))
    settings.update({k: v for k, v in vars(flags).items() if k != "chat" and v is not None})
    try:
        generation = GenerationSection(**settings)
    except ValueError as exc:
        raise UserError(f"sampling settings {settings}: {str(exc).splitlines()[0]}") from None
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if flags.chat and not has_template:
        raise UserError(f"--chat: {target} has no chat template (set one with tokenizer.chat_template when training, or use --raw)")
    trained_plain = run is not None and _summary(run).get("data_format") == "prompt_completion"
    conversational = flags.chat if flags.chat is not None else has_template and not trained_plain
    return Sampler(model, tokenizer, generation, conversational, device)


def _run_dir(target: str) -> Path | None:
    path = Path(target).expanduser()
    if not path.exists():
        return None  # a hub id
    path = path.resolve()
    run = path.parent if path.name == "final" else path
    return run if (run / "recipe.yaml").is_file() else None


def _summary(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _recipe_generation(run: Path | None) -> dict[str, Any]:
    if run is None:
        return {}
    try:
        section = (yaml.safe_load((run / "recipe.yaml").read_text()) or {}).get("generation") or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {k: v for k, v in section.items() if k in GenerationSection.model_fields}


def read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str | list[dict]]:
    """--prompt texts, then the file's: JSON Lines / JSON / CSV / Parquet with a `prompt` column (text or a
    conversation) or `messages`, or a text file with one prompt per line."""
    found: list[str | list[dict]] = list(prompts)
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise UserError(f"--prompts {prompts_file}: no such file")
        if prompts_file.suffix in (".txt", ".text"):
            found += [line for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            from dpo_cli.core.recipes import DataSection
            from dpo_cli.data.loading import load_source, standard_layout

            rows = standard_layout(load_source(str(prompts_file.resolve()), DataSection(train=str(prompts_file)), "--prompts", "train"))
            if "prompt" not in rows.column_names and "messages" not in rows.column_names:
                raise UserError(f"--prompts {prompts_file}: needs a 'prompt' (or 'messages') column; it has {', '.join(rows.column_names)}")
            column = "prompt" if "prompt" in rows.column_names else "messages"
            found += [_up_to_last_user(value) if column == "messages" else value for value in rows[column]]
    if not found:
        raise UserError("nothing to generate from: give --prompt TEXT (repeatable) or --prompts FILE")
    return found


def _up_to_last_user(messages: list[dict]) -> list[dict]:
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    return messages[: last + 1]


def _as_input(sampler: Sampler, prompt: str | list[dict]) -> str | list[dict]:
    if isinstance(prompt, str) and sampler.conversational:
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and not getattr(sampler.tokenizer, "chat_template", None):
        raise UserError("a prompt is a conversation, but the model has no chat template (give text prompts)")
    return prompt


def run_generate(target: str, prompts: list[str | list[dict]], flags: SamplingFlags, seed: int, out: Path | None) -> list[dict]:
    if out is not None and out.exists():
        raise UserError(f"--out {out} exists; choose another file (nothing is overwritten)")
    if out is not None and not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist")
    with tempfile.TemporaryDirectory(prefix="dpo-cli-generate-") as scratch:
        sampler = load_sampler(target, flags, Path(scratch))
        ids = [prompt_ids_for_generation(sampler.tokenizer, _as_input(sampler, p)) for p in prompts]
        with ui.TaskProgress("generating", len(ids)) as progress:
            generations = generate(sampler.model, sampler.tokenizer, ids, sampler.settings, seed, sampler.device, on_batch=progress.advance)
    rows = [{"prompt": p, "response": g.text.strip(), "tokens": len(g.response_ids), "finished": g.finished} for p, g in zip(prompts, generations)]
    if out is not None:
        atomic_write_jsonl(out, rows)
        ui.note(f"{len(rows)} responses written to {out}")
    else:
        for row in rows:
            prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
            ui.console.print(f"[bold]>>> {prompt}[/bold]" if sys.stdout.isatty() else f">>> {prompt}", markup=sys.stdout.isatty(), highlight=False)
            ui.console.print(row["response"], markup=False, highlight=False)
    return rows


def run_chat(target: str, flags: SamplingFlags, seed: int, system: str | None) -> None:
    """A terminal conversation: each reply streams as it is sampled; /reset forgets, /exit or Ctrl-D ends."""
    from transformers import TextStreamer

    with tempfile.TemporaryDirectory(prefix="dpo-cli-chat-") as scratch:
        sampler = load_sampler(target, SamplingFlags(**{**vars(flags), "chat": True}), Path(scratch))
        stops = stop_token_ids(sampler.tokenizer, sampler.model)
        history: list[dict] = [{"role": "system", "content": system}] if system else []
        print(f"chatting with {target} (temperature {sampler.settings.temperature:g}, up to {sampler.settings.max_new_tokens} tokens a reply); "
              "/reset forgets the conversation, /exit or Ctrl-D ends", flush=True)  # fmt: skip
        torch.manual_seed(seed)
        while True:
            try:
                said = input("you> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if said.strip() in ("/exit", "/quit"):
                return
            if said.strip() == "/reset":
                history = history[:1] if system else []
                print("(conversation reset)", flush=True)
                continue
            if not said.strip():
                continue
            history.append({"role": "user", "content": said})
            ids = torch.tensor([prompt_ids_for_generation(sampler.tokenizer, history)], device=sampler.device)
            print("model> ", end="", flush=True)
            streamer = TextStreamer(sampler.tokenizer, skip_prompt=True, skip_special_tokens=True)
            with torch.no_grad():
                output = sampler.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **sampling_options(sampler.settings, sampler.tokenizer, stops)
                )
            reply = output[0, ids.size(1) :].tolist()
            history.append({"role": "assistant", "content": sampler.tokenizer.decode(reply, skip_special_tokens=True).strip()})
