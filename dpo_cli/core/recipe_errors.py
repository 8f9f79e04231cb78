"""A recipe's validation errors as people read them: one line per bad key, with the key's dotted path,
what was expected and what was given, and a did-you-mean for an unknown key; and the two schema walks this
needs (shared with the loader)."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as `ModelSection | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_class(arg)
        if found is not None:
            return found
    return None


def _flatten_union(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _flatten_union(arg)]
    return [annotation]


_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a section (a mapping of keys)",
    "model_attributes_type": "a section (a mapping of keys)",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _clean_loc(schema: type[BaseModel], loc: tuple) -> tuple[list[str | int], type[BaseModel] | None]:
    """Drop pydantic's union-member tags from an error location; return the section owning the last key."""
    path: list[str | int] = []
    section: type[BaseModel] | None = schema  # the section we are inside, None once at a leaf value
    owner: type[BaseModel] | None = schema
    leaf_is_mapping = False
    for part in loc:
        if isinstance(part, int):
            path.append(part)
        elif section is not None and part not in section.model_fields and _is_union_tag(part, section):
            continue  # e.g. 'str' or 'list[union[str,DataSource]]' of a field such as data.train
        elif section is not None and leaf_is_mapping and part not in section.model_fields:
            path.append(part)  # a key of a mapping of sections, such as a pipeline's stages.NAME: go on inside it
            leaf_is_mapping = False
        elif section is not None:
            path.append(part)
            owner = section
            field = section.model_fields.get(part)
            if field is None:  # an unknown key: nothing below it matters
                break
            section = _section_class(field.annotation)
            leaf_is_mapping = any(typing.get_origin(a) is dict for a in _flatten_union(field.annotation))
        elif leaf_is_mapping:
            path.append(part)  # a key of a free-form mapping such as data.columns
            leaf_is_mapping = False
        # else: a union-member tag such as 'str' or 'list[str]'
    return path, owner


def _is_union_tag(part: str, section: type[BaseModel]) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool", section.__name__)


def _deepest(by_key: dict[str, list[str]]) -> dict[str, list[str]]:
    """Where a value failed one branch of a union by its type ("expected a string, got a mapping") and another
    branch deeper down (data.train.0.weight), the deeper errors say what to fix: the type complaint goes."""
    return {
        key: messages
        for key, messages in by_key.items()
        if not (key and all(m.startswith("expected ") for m in messages) and any(other.startswith(f"{key}.") for other in by_key))
    }


def format_validation_error(exc: ValidationError, schema: type[BaseModel]) -> list[str]:
    by_key: dict[str, list[str]] = {}
    for err in exc.errors(include_url=False):
        path, owner = _clean_loc(schema, err["loc"])
        key = ".".join(str(p) for p in path)  # empty for rules across sections: their message names the keys
        kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
        if kind == "missing":
            message = "required key is missing"
        elif kind == "extra_forbidden":
            name = str(path[-1]) if path else ""
            known = list(owner.model_fields) if owner is not None else []
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
            message = f"unknown key; {hint}"
        elif kind in _EXPECTED:
            message = f"expected {_EXPECTED[kind]}, got {_show(value)}"
        elif kind == "literal_error":
            message = f"expected one of {ctx.get('expected', '')}, got {_show(value)}"
        elif kind in _BOUNDS:
            bound = next(iter(ctx.values()), "")
            message = f"must be {_BOUNDS[kind]} {bound}, got {_show(value)}"
        elif kind == "value_error":
            message = str(ctx.get("error", err["msg"]))
        else:
            message = f"{err['msg']}, got {_show(value)}" if value is not None else err["msg"]
        by_key.setdefault(key, [])
        if message not in by_key[key]:
            by_key[key].append(message)
    lines = []
    for key, messages in _deepest(by_key).items():
        expected = [m.removeprefix("expected ").split(", got ")[0] for m in messages if m.startswith("expected ")]
        if len(expected) > 1 and len(expected) == len(messages):
            got = messages[0].split(", got ", 1)[-1]
            lines.append(f"{key}: expected {' or '.join(expected)}, got {got}")
        else:
            lines.extend(f"{key}: {m}" if key else m for m in messages)
    return lines
