"""Promise: whatever is wrong with a recipe, a data file or a flag, every stage stops with one line and a
non-zero exit, never a traceback, and touches no run dir. Hypothesis breaks valid inputs in ways that are
invalid by construction (a mapping where a number goes, an unknown key, a value past its bound or outside its
choices, a missing required key, garbage bytes as the recipe, a malformed row among valid ones, a flag that
names nothing); derandomized, so CI sees the same cases every time."""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import typing
from pathlib import Path
from typing import Any

import annotated_types
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from helpers import preference_rows, write_jsonl
from dpo_cli.core.recipe_errors import _flatten_union, _section_class
from dpo_cli.core.recipe_loader import schema_for
from dpo_cli.core.recipes import ALL_STAGES

def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
FREE_FORM = {"columns", "config", "policies", "costs"}  # mappings whose keys are the user's, not the schema's
COUNTER = itertools.count()
# Constructed, this tag makes a folder: a tag that ran anything leaves it behind (run_broken looks).
CANARY = Path(tempfile.gettempdir()) / f"dpo-cli-yaml-canary-{os.getpid()}"
CANARY_TAG = f"\nsurprise: !!python/object/apply:os.mkdir ['{CANARY}']\n".encode()


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_model_dir, tiny_reward_model_dir) -> dict[str, dict[str, Any]]:
    """One valid recipe per stage, over real files (the fuzz must fail on what it broke, not on a missing path)."""
    from dpo_cli.demo import demo_rows

    data = tmp_path_factory.mktemp("fuzz-data")
    write_jsonl(data / "sft.jsonl", demo_rows("demo:sft?n=8"))
    write_jsonl(data / "text.jsonl", [{"text": row["prompt"] + row["completion"]} for row in demo_rows("demo:sft?n=8")])
    write_jsonl(data / "prefs.jsonl", preference_rows(8))
    write_jsonl(data / "prompts.jsonl", [{"prompt": row["prompt"]} for row in preference_rows(8)])
    model, train = {"name_or_path": str(tiny_model_dir)}, {"max_steps": 1, "batch_size": 2}
    return {
        "pretrain": {"model": model, "data": {"train": str(data / "text.jsonl"), "max_length": 32}, "train": train},
        "sft": {"model": model, "data": {"train": str(data / "sft.jsonl"), "max_length": 32}, "train": train},
        "collect-prefs": {"model": model, "data": {"train": str(data / "prompts.jsonl")}, "label": {"by": "judge", "judge": "length"}},
        "rm-train": {"model": model, "data": {"train": str(data / "prefs.jsonl"), "max_length": 48}, "train": train},
        "dpo": {"model": model, "data": {"train": str(data / "prefs.jsonl"), "max_length": 48}, "train": train, "dpo": {"beta": 0.1}},
        "ppo": {
            "model": {**model, "lora": {"r": 4}}, "data": {"train": str(data / "prompts.jsonl"), "max_length": 32}, "train": train,
            "ppo": {"reward_model": str(tiny_reward_model_dir), "mini_batch_size": 2},
        },
        "compare": {"policies": {"a": str(tiny_model_dir)}, "data": {"train": str(data / "prompts.jsonl")}, "judges": {"function": "length"}},
    }  # fmt: skip


def schema_fields(schema: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every (path, FieldInfo) of a stage's schema, sections included, free-form mappings not entered."""
    found = []
    for name, field in schema.model_fields.items():
        path = prefix + (name,)
        found.append((path, field))
        section = _section_class(field.annotation)
        if section is not None and name not in FREE_FORM:
            found.extend(schema_fields(section, path))
    return found


def scalar_leaves(node: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    leaves = []
    for key, value in node.items():
        if isinstance(value, dict):
            if key not in FREE_FORM:
                leaves.extend(scalar_leaves(value, prefix + (key,)))
        else:
            leaves.append(prefix + (key,))
    return leaves


def put(recipe: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        if not isinstance(recipe.get(key), dict):
            recipe[key] = {}
        recipe = recipe[key]
    recipe[path[-1]] = value


def literal_choices(field: Any) -> list[Any] | None:
    choices = [arg for member in _flatten_union(field.annotation) if typing.get_origin(member) is typing.Literal for arg in typing.get_args(member)]
    others = [m for m in _flatten_union(field.annotation) if typing.get_origin(m) is not typing.Literal and m is not type(None)]
    return choices if choices and not others else None


def past_bound(field: Any) -> Any:
    """A value just past a numeric field's bound, or None when it has none."""
    integer = int in _flatten_union(field.annotation)
    for rule in field.metadata:
        if isinstance(rule, annotated_types.Ge):
            return rule.ge - 1
        if isinstance(rule, annotated_types.Gt):
            return rule.gt if integer else rule.gt - 0.5
        if isinstance(rule, annotated_types.Le):
            return rule.le + 1
        if isinstance(rule, annotated_types.Lt):
            return rule.lt
    return None


names = st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True)
junk = st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=12), st.lists(st.integers(), max_size=3), st.none())


@st.composite
def broken_recipes(draw, stage: str, base: dict) -> dict | bytes:
    """A valid recipe broken in one way that no schema accepts."""
    recipe = json.loads(json.dumps({"stage": stage, **base}))
    fields = schema_fields(schema_for(stage))
    how = draw(st.sampled_from(["mapping", "unknown_key", "literal", "bound", "missing", "bytes", "yaml_shape", "tag"]))
    if how == "mapping":  # a mapping where a scalar goes
        put(recipe, draw(st.sampled_from(scalar_leaves(recipe))), draw(st.dictionaries(names, junk, min_size=1, max_size=2)))
    elif how == "unknown_key":
        sections = [()] + [path for path, field in fields if _section_class(field.annotation) is not None and path[-1] not in FREE_FORM]
        section = draw(st.sampled_from(sections))
        owner = schema_for(stage)
        for key in section:
            owner = _section_class(owner.model_fields[key].annotation)
        put(recipe, section + (draw(names.filter(lambda n: n not in owner.model_fields)),), draw(junk))
    elif how == "literal":
        path, field = draw(st.sampled_from([(p, f) for p, f in fields if literal_choices(f)]))
        choices = literal_choices(field)
        put(recipe, path, draw(st.one_of(st.text(max_size=10), st.integers()).filter(lambda v: v not in choices)))
    elif how == "bound":
        path, field = draw(st.sampled_from([(p, f) for p, f in fields if past_bound(f) is not None]))
        put(recipe, path, past_bound(field))
    elif how == "missing":
        required = [path for path, field in fields if field.is_required() and path[0] in recipe and len(path) <= 2]
        path = draw(st.sampled_from(required))
        parent = recipe
        for key in path[:-1]:
            parent = parent[key]
        parent.pop(path[-1], None)
    elif how == "bytes":
        return draw(st.binary(max_size=64))
    elif how == "yaml_shape":  # a document that is not a mapping
        return yaml.safe_dump(draw(st.one_of(st.lists(junk, max_size=3), st.integers(), st.text(max_size=10).filter(lambda t: ":" not in t)))).encode()
    else:  # a YAML tag the safe loader must refuse without constructing anything
        return yaml.safe_dump(recipe).encode() + CANARY_TAG
    return recipe


def run_broken(cli, tmp: Path, stage: str, recipe: dict | bytes, *flags: str) -> None:
    case = tmp / f"case-{next(COUNTER)}"
    case.mkdir()
    path = case / "recipe.yaml"
    path.write_bytes(recipe if isinstance(recipe, bytes) else yaml.safe_dump(recipe).encode())
    before = path.read_bytes()
    code, _, err = cli(stage, path, "--run-dir", case / "run", *flags)
    lines = err.strip().splitlines()
    assert code != 0, f"{stage} accepted {recipe!r} {flags}"
    # one line; several recipe errors at once are a count, then one indented line per bad key
    one_line = len(lines) == 1 or (lines[0].endswith(" recipe errors:") and all(line.startswith("  ") for line in lines[1:]))
    assert one_line and lines[0].startswith("error: ") and "Traceback" not in err, f"{stage} {recipe!r} {flags}:\n{err}"
    assert not (case / "run").exists() and path.read_bytes() == before and sorted(case.iterdir()) == [path]
    assert not CANARY.exists(), f"{stage}: a YAML tag in the recipe was constructed (it made {CANARY})"


def test_the_yaml_canary_fires_when_constructed():
    """The canary can fail: the unsafe loader does construct the tag (and makes the folder)."""
    try:
        yaml.unsafe_load(b"a: 1" + CANARY_TAG)
        assert CANARY.is_dir()
    finally:
        if CANARY.is_dir():
            CANARY.rmdir()


@pytest.mark.parametrize("stage", ALL_STAGES)
def test_a_broken_recipe_is_one_line_and_touches_nothing(tmp_path, cli, bases, stage):
    @fuzz(60)
    @given(recipe=broken_recipes(stage, bases[stage]))
    def check(recipe):
        run_broken(cli, tmp_path, stage, recipe)

    check()


@st.composite
def bad_flags(draw, stage: str) -> list[str]:
    known = {".".join(path) for path, _ in schema_fields(schema_for(stage))}
    how = draw(st.sampled_from(["no_equals", "unknown_key", "empty_key", "bad_value"]))
    if how == "no_equals":
        return ["--set", draw(st.text(max_size=12).filter(lambda t: "=" not in t))]
    if how == "unknown_key":
        key = ".".join(draw(st.lists(names, min_size=1, max_size=3)))
        return ["--set", f"{key}={draw(st.text(max_size=6))}"] if key not in known and key.split(".")[0] not in FREE_FORM else ["--set", "=1"]
    if how == "empty_key":
        return ["--set", f"={draw(st.text(max_size=6))}"]
    return ["--set", f"train.max_steps={draw(st.sampled_from(['-1', '0', 'many', '[1]', '{a: 1}', '1.5']))}"]


@pytest.mark.parametrize("stage", ["sft", "dpo", "collect-prefs", "compare"])
def test_a_bad_flag_is_one_line_and_touches_nothing(tmp_path, cli, bases, stage):
    @fuzz(15)
    @given(flags=bad_flags(stage))
    def check(flags):
        if stage in ("collect-prefs", "compare") and flags[1].startswith("train.max_steps"):
            flags = ["--set", "train.max_steps=1"]  # these stages have no train section: an unknown key
        run_broken(cli, tmp_path, stage, {"stage": stage, **bases[stage]}, *flags)

    check()


# ----------------------------------------------------------------------------- data files

DATA_STAGES = {  # stage -> (base data file, the columns every row of it needs)
    "pretrain": ("text.jsonl", ["text"]),
    "sft": ("sft.jsonl", ["prompt", "completion"]),
    "rm-train": ("prefs.jsonl", ["prompt", "chosen", "rejected"]),
    "dpo": ("prefs.jsonl", ["prompt", "chosen", "rejected"]),
    "collect-prefs": ("prompts.jsonl", ["prompt"]),
    "ppo": ("prompts.jsonl", ["prompt"]),
    "compare": ("prompts.jsonl", ["prompt"]),
}


@st.composite
def broken_rows(draw, good: dict, columns: list[str]) -> bytes:
    """One line no stage can take: not JSON, JSON but not an object, a needed column missing or of the wrong
    type, or text that is not UTF-8."""
    how = draw(st.sampled_from(["not_json", "not_object", "missing", "wrong_type", "not_utf8"]))
    if how == "not_json":
        text = draw(st.text(max_size=20).filter(lambda t: not _parses(t) and "\n" not in t and "\r" not in t and t.strip()))
        return text.encode()
    if how == "not_object":
        return json.dumps(draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=3), st.text(max_size=8), st.none()))).encode()
    row = dict(good)
    column = draw(st.sampled_from(columns))
    if how == "missing":
        row.pop(column)
    elif how == "wrong_type":
        row[column] = draw(st.one_of(st.integers(), st.floats(allow_nan=False), st.lists(st.integers(), min_size=1, max_size=3), st.booleans()))
    else:
        return json.dumps(row).encode().replace(b'"' + column.encode() + b'": "', b'"' + column.encode() + b'": "\xff\xfe', 1)
    return json.dumps(row).encode()


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def data_case(draw, bases, stage):
    file, columns = DATA_STAGES[stage]
    recipe = json.loads(json.dumps({"stage": stage, **bases[stage]}))
    lines = Path(recipe["data"]["train"]).read_bytes().splitlines()
    good = json.loads(lines[0])
    at = draw(st.integers(0, len(lines)))
    return recipe, lines[:at] + [draw(broken_rows(good, columns))] + lines[at:]


def check_broken_data(cli, tmp: Path, stage: str, recipe: dict, lines: list[bytes]) -> None:
    case = tmp / f"data-{next(COUNTER)}"
    case.mkdir()
    (case / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    recipe["data"]["train"] = str(case / "train.jsonl")
    path = case / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = cli(stage, path, "--run-dir", case / "run")
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert code != 0, f"{stage} accepted a broken row: {lines!r}"
    assert last.startswith("error: ") and "Traceback" not in err and err.count("error: ") == 1, f"{stage}:\n{err}"
    assert "train.jsonl" in last or "data.train" in last, f"{stage}: the error does not say where: {last}"
    assert not (case / "run").exists(), f"{stage} left a run dir behind: {sorted(p.name for p in (case / 'run').iterdir())}"


@pytest.mark.parametrize("stage", DATA_STAGES)
def test_a_broken_row_in_the_data_is_one_line_and_touches_nothing(tmp_path, cli, bases, stage):
    @fuzz(25)
    @given(data=st.data())
    def check(data):
        recipe, lines = data_case(data.draw, bases, stage)
        check_broken_data(cli, tmp_path, stage, recipe, lines)

    check()
