"""Reading recipes: YAML (safe_load only), --set overrides, path resolution, --smoke caps,
validation with errors that name the key path, and the diff between two resolved recipes."""

from __future__ import annotations

import glob
import os
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dpo_cli.core.errors import UserError
from dpo_cli.core.recipe_errors import _section_class, _show, format_validation_error
from dpo_cli.core.recipes import ALL_STAGES, PLANNED_STAGES, STAGE_SCHEMAS, PathMarker, RecipeBase

# Keys that only change what is logged or kept, never the numbers: a resumed run may change them.
RESUME_SAFE_KEYS = (
    "run_dir",
    "train.log_every",
    "train.keep_checkpoints",
    "train.tensorboard",
    "train.report_to",
    "train.tracker_project",
    "train.nonfinite",  # switch a stopped run to skipping, and resume it
    "train.max_skipped_steps",
    "sft.padding_free",  # the row layout: the same losses, within float rounding
    "dpo.share_prompt",
    "rm.share_prompt",
    "ppo.padding_free",
    "dpo.ref_cache",  # cached reference log-probs are those the pass would give
    "generation.batch_size",
    "label.annotator",  # several people label into one run
    "label.serve",  # at the terminal or in browsers, into the same log
    "label.host",
    "label.port",
    "label.annotators",
    "label.batch_size",
)

_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".yaml", ".yml", ".arrow")


# ----------------------------------------------------------------------------- reading


def read_recipe_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"recipe not found: {path} (give the path to a YAML recipe, e.g. recipes/demo/sft.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}: malformed YAML: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (a recipe is UTF-8 YAML)") from None
    if raw is None:
        raise UserError(f"{path}: the recipe is empty")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (model:, data:, train:, ...), got {type(raw).__name__}")
    return raw


def stage_of(path: Path, raw: dict[str, Any], stage: str | None) -> str:
    """The stage a recipe is for: the subcommand, else its `stage:` key, else its file name."""
    declared = raw.get("stage")
    if stage is not None:
        if declared is not None and declared != stage:
            raise UserError(f"{path}: this recipe says `stage: {declared}`, but it was given to `{stage}`")
        return stage
    if isinstance(declared, str) and declared in ALL_STAGES:
        return declared
    if path.stem in ALL_STAGES:
        return path.stem
    raise UserError(f"{path}: cannot tell which stage this recipe is for: add `stage: sft` (or another stage) or pass --stage")


def schema_for(stage: str) -> type[RecipeBase]:
    if stage in PLANNED_STAGES:
        raise UserError(f"stage `{stage}` is not implemented yet")
    if stage not in STAGE_SCHEMAS:
        raise UserError(f"unknown stage `{stage}`; stages: {', '.join(ALL_STAGES)}")
    return STAGE_SCHEMAS[stage]


# ----------------------------------------------------------------------------- schema walking


def _path_marker(field: Any) -> PathMarker | None:
    for meta in field.metadata:
        if isinstance(meta, PathMarker):
            return meta
    return _marker_in(field.annotation)


def _marker_in(annotation: Any) -> PathMarker | None:
    """A PathMarker anywhere inside an annotation: str paths, lists and mappings of them, optional or not."""
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, PathMarker):
            return meta
    for arg in typing.get_args(annotation):
        found = _marker_in(arg)
        if found is not None:
            return found
    return None


def path_fields(schema: type[BaseModel], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], PathMarker]:
    """Dotted key paths of every path-valued field in a schema."""
    found: dict[tuple[str, ...], PathMarker] = {}
    for name, field in schema.model_fields.items():
        marker = _path_marker(field)
        if marker is not None:
            found[(*prefix, name)] = marker
        section = _section_class(field.annotation)
        if section is not None:
            found.update(path_fields(section, (*prefix, name)))
    return found


def resolve_path_value(value: str, base: Path, always: bool) -> str:
    """A relative local path becomes absolute against `base`; a hub id or demo:NAME is left alone."""
    if value.startswith("demo:") or "://" in value:
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return os.path.normpath(expanded)
    candidate = os.path.normpath(base / expanded)
    looks_local = (
        always
        or value.startswith(("./", "../"))
        or os.path.exists(candidate)
        or any(ch in value for ch in "*?[")
        or value.lower().endswith(_DATA_SUFFIXES)
        or bool(glob.glob(candidate))
    )
    return candidate if looks_local else value


def _resolve_paths(raw: dict[str, Any], fields: dict[tuple[str, ...], PathMarker], base: Path, only: set | None = None) -> None:
    for keys, marker in fields.items():
        if only is not None and keys not in only:
            continue
        parent: Any = raw
        for key in keys[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or keys[-1] not in parent:
            continue
        parent[keys[-1]] = _resolve_nested(parent[keys[-1]], base, marker.always)


def _resolve_nested(value: Any, base: Path, always: bool) -> Any:
    """A path, or the paths inside a list or mapping (e.g. compare's policies and costs)."""
    if isinstance(value, str):
        return resolve_path_value(value, base, always)
    if isinstance(value, list):
        return [_resolve_nested(v, base, always) for v in value]
    if isinstance(value, dict) and isinstance(value.get("path"), str):  # a data source: only its path
        return {**value, "path": resolve_path_value(value["path"], base, always)}
    if isinstance(value, dict):
        return {k: _resolve_nested(v, base, always) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- overrides and smoke


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    key, sep, value = text.partition("=")
    keys = tuple(part.strip() for part in key.strip().split("."))
    if not sep or not all(keys):
        raise UserError(f"--set {text!r}: expected key.sub=value, e.g. --set train.learning_rate=1e-4")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # not YAML: take it as the plain string it is
    return keys, parsed


class _Remove:
    def __repr__(self) -> str:
        return "<removed>"


REMOVE = _Remove()  # an override's value that takes the key out (a pipeline's sweep replacing compare's policies.NAME)


def apply_override(raw: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None or child is True or child is False:
            child = node[key] = {}  # e.g. --set model.lora.r=8 on a recipe without lora
        if not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise UserError(f"--set {'.'.join(keys)}: `{where}` is a value ({child!r}), not a section")
        node = child
    if value is REMOVE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value


def _cap(raw: dict[str, Any], section_name: str, key: str, limit: int, schema: type[BaseModel]) -> None:
    """Lower raw[section][key] (or its schema default) to `limit`; an unset key with a smaller default stays unset."""
    section = raw.setdefault(section_name, {})
    if not isinstance(section, dict):
        return  # a type error the validation reports
    section_class = _section_class(schema.model_fields[section_name].annotation)
    default = section_class.model_fields[key].default if section_class is not None else None
    current = section.get(key, default)
    if not isinstance(current, int) or isinstance(current, bool) or current > limit:
        section[key] = limit


def apply_smoke(raw: dict[str, Any], schema: type[BaseModel]) -> None:
    """Caps that let any recipe run end to end in seconds (what a CI smoke test wants)."""
    if "train" in schema.model_fields:
        train = raw.setdefault("train", {})
        if isinstance(train, dict):
            train.pop("epochs", None)
            train["log_every"] = 1
            train["eval_every"] = None
            train["save_every"] = None
    caps = {
        "train": {"max_steps": 3, "batch_size": 4, "grad_accum": 2},
        "data": {"max_rows": 32, "max_eval_rows": 8, "max_length": 128},
        "generation": {"max_new_tokens": 16},
        # the evaluation every N steps: as compare's under --smoke (its data and generation caps), so it stays the same one
        "policy_eval": {"max_prompts": 32, "max_new_tokens": 16},
    }
    for name, field in schema.model_fields.items():
        section = _section_class(field.annotation)
        if section is not None and "show_samples" in section.model_fields:
            caps[name] = {"show_samples": 2}
        if section is not None and "mini_batch_size" in section.model_fields:
            caps[name] = {"mini_batch_size": 2, "ppo_epochs": 1}  # divides the capped batch of 4
        if section is not None and "max_prompt_length" in section.model_fields and isinstance(raw.get(name), dict):
            if raw[name].get("max_prompt_length") is not None:
                caps.setdefault(name, {})["max_prompt_length"] = 64  # below the capped max_length
    ppo = raw.get("ppo")
    if isinstance(ppo, dict) and isinstance(ppo.get("samples_per_prompt"), int) and ppo["samples_per_prompt"] > 1 and 4 % ppo["samples_per_prompt"]:
        ppo["samples_per_prompt"] = 2  # divides the capped batch of 4 (rloo and grpo need 2 at least)
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("train"), list) and any(isinstance(e, dict) for e in data["train"]):
        caps["data"]["mixture_rows"] = 32  # a weighted mixture: no more rows drawn (or streamed) than a smoke run reads
    for section_name, limits in caps.items():
        if section_name in schema.model_fields:
            for key, limit in limits.items():
                _cap(raw, section_name, key, limit, schema)


# ----------------------------------------------------------------------------- the whole load


Value = tuple[tuple[str, ...], Any]  # a typed override: (("dpo", "beta"), 0.1)


def _resolve_template_file(raw: dict[str, Any], base: Path) -> None:
    """tokenizer.chat_template naming a .jinja file: relative to the recipe, as every path is (its text or a
    preset's name stays as it is)."""
    section = raw.get("tokenizer")
    value = section.get("chat_template") if isinstance(section, dict) else None
    if isinstance(value, str) and value.endswith((".jinja", ".jinja2", ".j2")) and "\n" not in value:
        section["chat_template"] = resolve_path_value(value, base, always=True)


def load_recipe(
    path: Path,
    stage: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    smoke: bool = False,
    values: list[Value] | tuple[Value, ...] = (),
) -> RecipeBase:
    """Read, override, resolve and validate a recipe; every problem is one UserError listing each bad key.
    `values` are typed overrides (a pipeline's seed, set and inputs), applied before the `--set KEY=VALUE`
    strings of the command line, which win."""
    path = Path(path)
    raw = read_recipe_file(path)
    stage = stage_of(path, raw, stage)
    schema = schema_for(stage)
    fields = path_fields(schema)
    _resolve_paths(raw, fields, path.resolve().parent)
    _resolve_template_file(raw, path.resolve().parent)
    for keys, value in values:  # a pipeline's (its smoke run caps them like the file's own keys)
        apply_override(raw, keys, value)
        _resolve_paths(raw, fields, Path.cwd(), only={keys})
    if smoke:
        apply_smoke(raw, schema)  # before --set, so an explicit override still wins
    for keys, value in (parse_override(text) for text in overrides):
        apply_override(raw, keys, value)
        _resolve_paths(raw, fields, Path.cwd(), only={keys})  # a path given on the command line is relative to cwd
    raw["stage"] = stage
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        lines = format_validation_error(exc, schema)
        if len(lines) == 1:
            raise UserError(f"{path}: {lines[0]}") from None
        raise UserError(f"{path}: {len(lines)} recipe errors:\n  " + "\n  ".join(lines)) from None


def recipe_to_dict(recipe: RecipeBase) -> dict[str, Any]:
    return recipe.model_dump(mode="json")


def recipe_to_yaml(recipe: RecipeBase) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


# Judge keys that once took a `module:function` too, and the key that says "runs code" which takes it now.
MOVED_TO_PYTHON_KEYS = {
    ("label", "judge"): "python",
    ("policy_eval", "judge"): "python",
    ("rm", "correlate_with"): "correlate_with_python",
    ("judges", "function"): "python",
}


def _moved_user_code(saved: dict[str, Any]) -> dict[str, Any]:
    """A recipe saved before user code had its own keys: `label.judge: mod:fn` read as `label.python: mod:fn`
    (the judge key back to its default), the way the current version says to write it."""
    moved = dict(saved)
    for (section, key), python_key in MOVED_TO_PYTHON_KEYS.items():
        values = moved.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str) and ":" in values[key] and values.get(python_key) is None:
            values = {k: v for k, v in values.items() if k != key}
            moved[section] = {**values, python_key: saved[section][key]}
    return moved


def with_current_defaults(saved: dict[str, Any], schema: type[BaseModel]) -> dict[str, Any]:
    """A run dir's saved recipe as this version resolves it: keys added since it was written take their
    defaults and moved keys their new place, so an older run resumes (its settings are the same); a recipe
    this schema refuses stays as saved."""
    try:
        return recipe_to_dict(schema.model_validate(_moved_user_code(saved)))
    except Exception:  # noqa: BLE001 - then the plain comparison names every difference
        return saved


def recipe_diff(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = RESUME_SAFE_KEYS) -> list[str]:
    """Human-readable `key: old -> new` lines for every setting that changed (ignoring log-only keys)."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(flat_old) | set(flat_new)):
        if key in ignore or any(key.startswith(f"{i}.") for i in ignore):
            continue
        a, b = flat_old.get(key, "<unset>"), flat_new.get(key, "<unset>")
        if a != b:
            lines.append(f"{key}: {_show(a)} -> {_show(b)}")
    return lines
