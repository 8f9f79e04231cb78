"""Local data files: which files a local source names (a file, a glob, a folder laid out like a hub dataset with
its splits, a `save_to_disk` folder of a Dataset or DatasetDict, a collect-prefs run dir) and reading them,
with clear errors for empty files, bad JSON lines and mixed splits."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset

from dpo_cli.core.errors import UserError
from dpo_cli.core.atomic import sha256_file
from dpo_cli.models.sources import require_complete

RUN_MARKS = ("summary.json", "labels.jsonl", "candidates.jsonl", "pairs.jsonl", "checkpoints", ".lock")  # beside recipe.yaml: a run dir
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".arrow": "arrow"}


def is_local(value: str) -> bool:
    """A source to read from this machine: one that exists, or one that can only be a path (`looks_local`)."""
    return looks_local(value) or os.path.exists(value)


SAVED_METADATA = ("dataset_dict.json", "state.json", "dataset_info.json")  # what save_to_disk writes beside the .arrow shards
SPLIT_KEYS = {"data.train": "data.split", "data.eval": "data.eval_split"}  # the recipe key that picks a split of `what`


def _saved_layout(path: Path) -> str | None:
    """'dict' for a folder written by DatasetDict.save_to_disk, 'dataset' for Dataset.save_to_disk, else None."""
    if (path / "dataset_dict.json").is_file():
        return "dict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    return None


def _saved_shards(folder: Path, what: str) -> list[str]:
    """The .arrow shards a Dataset.save_to_disk folder holds (its state.json lists them)."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        return [str(folder / item["filename"]) for item in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{what}: {folder / 'state.json'} is not the one Dataset.save_to_disk writes; save the dataset again") from None


def _is_saved_extra(path: Path, what: str) -> bool:
    """save_to_disk's metadata, or a cache file a later map left, in a save_to_disk folder: not data."""
    if path.name in SAVED_METADATA and _saved_layout(path.parent) is not None:
        return True
    return _saved_layout(path.parent) == "dataset" and str(path) not in _saved_shards(path.parent, what)


def _saved_split(path: Path, base: Path) -> tuple[str, Path] | None:
    """(split name, DatasetDict folder) when `path` lies in a split folder of a saved DatasetDict at or below `base`."""
    for folder in path.parents:
        if _saved_layout(folder) == "dataset" and (folder.parent / "dataset_dict.json").is_file():
            return folder.name, folder.parent
        if folder == base or folder == folder.parent:
            return None
    return None


def _split_groups(files: list[str], base: Path) -> tuple[dict[str, list[str]], Path]:
    """The files grouped by the split their place names, and the folder that holds the splits; no groups when
    they name at most one split. A split is a split folder of a saved DatasetDict, or a split by the hub's file
    naming, which `datasets` infers (data/train-00000-of-00001.parquet, train.jsonl + test.jsonl, train/ + test/)."""
    base = base.resolve()
    saved = {f: _saved_split(Path(f).resolve(), base) for f in files}
    if any(saved.values()):
        groups: dict[str, list[str]] = {}
        for name, place in saved.items():
            groups.setdefault(place[0] if place else "(outside the saved splits)", []).append(name)
        folder = next(place[1] for place in saved.values() if place)
        return (groups if len(groups) > 1 else {}), folder
    if any(ch in str(base) for ch in "*?["):
        return {}, base  # the hub's patterns cannot be anchored under such a folder name
    from datasets.data_files import get_data_patterns, resolve_pattern

    try:
        patterns = get_data_patterns(str(base))
    except Exception:  # no data files datasets recognises: no split naming either
        return {}, base
    ours = {os.path.abspath(f): f for f in files}
    groups = {}
    for split, split_patterns in patterns.items():
        found: set[str] = set()
        for pattern in split_patterns:
            try:
                found.update(ours[m] for m in map(os.path.abspath, resolve_pattern(pattern, base_path=str(base))) if m in ours)
            except FileNotFoundError:
                continue
        if found:
            groups[str(split)] = sorted(found)
    # Files whose names name no split (prefs.jsonl beside eval.jsonl) are what one trains on, never mixed
    # with a named split: the train split where none is named so, else a group of their own.
    unnamed = sorted(set(files) - {f for found in groups.values() for f in found})
    if unnamed and groups:
        groups["train" if "train" not in groups else "(no split in the name)"] = unnamed
    return (groups if len(groups) > 1 else {}), base


def _how_to_pick(what: str, folder: Path, names: list[str]) -> str:
    key = SPLIT_KEYS.get(what)
    if key:
        return f"set {what} to the folder {folder} and {key} to one of {', '.join(names)}"
    return f"point {what} at the files of one split"


def _missing_split(what: str, path: Path, kind: str, names: list[str], split: str) -> UserError:
    key = SPLIT_KEYS.get(what)
    fix = f"set {key} to one of them" if key else f"point {what} at the files of one split"
    return UserError(f"{what}: {path} is {kind} with the splits {', '.join(names)}, but no split {split!r}; {fix}")


def _saved_files(path: Path, what: str, split: str) -> list[str]:
    """The shards of a folder written by Dataset.save_to_disk, or of the `split` of one written by
    DatasetDict.save_to_disk. They are read like any other files, so nothing is ever written into the folder."""
    if _saved_layout(path) == "dataset":
        return _saved_shards(path, what)
    try:
        names = [str(name) for name in json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{what}: {path}/dataset_dict.json is not the one DatasetDict.save_to_disk writes; save the dataset again") from None
    if split not in names:
        raise _missing_split(what, path, "a DatasetDict saved with save_to_disk", names, split)
    if _saved_layout(path / split) != "dataset":
        raise UserError(f"{what}: {path} lists the split {split!r}, but {path / split} holds no saved dataset; save the dataset again")
    return _saved_shards(path / split, what)


def local_files(value: str, what: str, split: str) -> list[str]:
    """The data files one local source names: a file, a folder (a save_to_disk folder: its shards), a glob."""
    path = Path(value)
    if path.is_dir() and (path / "recipe.yaml").is_file() and any((path / name).exists() for name in RUN_MARKS):
        require_complete(path, what)  # a dpo-cli run dir: finished, or refused as the incomplete run it is
        if not (path / "prefs.jsonl").is_file():
            raise UserError(f"{what}: {path} is a dpo-cli run without preferences (no prefs.jsonl); give a collect-prefs run or data files")
        return [str(path / "prefs.jsonl")]  # a collect-prefs run dir
    if path.is_dir():
        if _saved_layout(path):
            return _saved_files(path, what, split)
        files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in BUILDERS and p.is_file() and not _is_saved_extra(p, what))
        if not files:
            raise UserError(f"{what}: folder {path} holds no data files ({', '.join(BUILDERS)})")
        groups, _ = _split_groups(files, path)
        if not groups:
            return files  # one split (or none named): every data file
        if split not in groups:
            raise _missing_split(what, path, "a folder laid out like a hub dataset", list(groups), split)
        return groups[split]
    if any(ch in value for ch in "*?["):
        files = sorted(f for f in glob.glob(value, recursive=True) if os.path.isfile(f) and not _is_saved_extra(Path(f), what))
    else:
        files = [value] if path.exists() else []
    if not files:
        raise UserError(f"{what}: no file matches {value}")
    if len(files) > 1:
        groups, folder = _split_groups(files, Path(os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])))
        if groups:
            counts = ", ".join(f"{name} ({len(found)} file{'s' if len(found) > 1 else ''})" for name, found in groups.items())
            raise UserError(
                f"{what}: {value} matches files of several splits: {counts}; to use one split, {_how_to_pick(what, folder, list(groups))}"
                " (to use them all on purpose, list the files)"
            )
    return files


def _last_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1][:300] if text else type(exc).__name__


def _is_blank(name: str) -> bool:
    """True for an empty file, or a text file with nothing but blank lines (read up to the first content)."""
    if os.path.getsize(name) == 0:
        return True
    if Path(name).suffix.lower() not in (".jsonl", ".json", ".csv", ".txt"):
        return False
    with open(name, encoding="utf-8", errors="replace") as handle:
        return all(not line.strip() for line in handle)


def _first_bad_json_line(files: list[str]) -> str | None:
    for name in files:
        if not name.endswith(".jsonl"):
            continue
        with open(name, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"{name} line {number}: invalid JSON ({exc.msg})"
                if not isinstance(row, dict):
                    return f"{name} line {number}: each line must be a JSON object, got {type(row).__name__}"
    return None


def _first_bad_line(files: list[str]) -> str | None:
    """Where a text data file stops being UTF-8, or a JSON Lines file holds a line that is not an object, as
    `FILE line N: ...`, before any parser sees it (pyarrow's JSON reader crashes the process on a file whose
    first line is `null`)."""
    for name in files:
        suffix = Path(name).suffix.lower()
        if suffix not in (".jsonl", ".json", ".csv", ".txt"):
            continue
        with open(name, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return (
                        f"{name} line {number}: not valid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); "
                        "save the file as UTF-8"
                    )
                start = line.lstrip()[:1]
                if number == 1:
                    start = line.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]  # a UTF-8 BOM, which datasets strips
                if start and start != b"{" and (suffix == ".jsonl" or (suffix == ".json" and number == 1 and start != b"[")):
                    try:
                        kind = type(json.loads(line)).__name__.replace("NoneType", "null")
                    except ValueError:
                        return f"{name} line {number}: invalid JSON"
                    return f"{name} line {number}: each line must be a JSON object, got {kind}"
    return None


def load_local(files: list[str], what: str) -> Dataset:
    suffixes = {Path(f).suffix.lower() for f in files}
    unknown = suffixes - set(BUILDERS)
    if unknown:
        raise UserError(f"{what}: unsupported file type {', '.join(sorted(unknown))}; use {', '.join(BUILDERS)}")
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise UserError(f"{what}: mixed file types ({', '.join(sorted(suffixes))}); give files of one type")
    for name in files:
        if _is_blank(name):
            raise UserError(f"{what}: {name} is empty")
    bad_line = _first_bad_line(files)
    if bad_line:
        raise UserError(f"{what}: {bad_line}")
    try:
        return datasets.load_dataset(builders.pop(), data_files=files, split="train")
    except Exception as exc:  # datasets wraps parser errors in several exception types
        bad = _first_bad_json_line(files)
        detail = bad or str(exc).strip().splitlines()[-1][:300]
        raise UserError(f"{what}: cannot read {files[0] if len(files) == 1 else f'{len(files)} files'}: {detail}") from None


def looks_local(value: str) -> bool:
    """A data source that can only be a local path: absolute, ./ ../ ~, a glob, a data-file suffix, or more
    path separators than a hub id (owner/name) has."""
    return (
        os.path.isabs(os.path.expanduser(value))
        or value.startswith((".", "~"))
        or any(ch in value for ch in "*?[")
        or value.lower().endswith(tuple(BUILDERS))
        or value.count("/") > 1
        or "\\" in value
    )


def missing_data_paths(recipe: Any) -> list[str]:
    """`KEY: problem` for every local data source of the recipe (data.train, data.eval, list entries) that does not
    exist. Paths are checked as the recipe resolved them (relative ones against the recipe's folder); hub ids and
    demo: sets are not checked (that needs the network)."""
    data = getattr(recipe, "data", None)
    if data is None:
        return []
    sources: list[tuple[str, str]] = []
    for key in ("train", "eval"):
        value = getattr(data, key)
        if isinstance(value, list):
            sources += [(f"data.{key}[{index}]", getattr(v, "path", v)) for index, v in enumerate(value)]
        elif isinstance(value, str):
            sources.append((f"data.{key}", value))
    problems = []
    for key, value in sources:
        if value.startswith("demo:") or "://" in value or not looks_local(value):
            continue
        expanded = os.path.expanduser(value)
        if any(ch in value for ch in "*?["):
            if not glob.glob(expanded, recursive=True):
                problems.append(f"{key}: no file matches {value}")
        elif not os.path.exists(expanded):
            problems.append(
                f"{key}: {value} does not exist (relative paths resolve against the recipe's folder; a stage's run dir exists once it has run)"
            )
    return problems


def check_data_paths(path: Path, recipe: Any) -> None:
    """One UserError listing every missing local data source (what `dpo-cli validate` checks beyond the schema)."""
    problems = missing_data_paths(recipe)
    if len(problems) == 1:
        raise UserError(f"{path}: {problems[0]}")
    if problems:
        raise UserError(f"{path}: {len(problems)} data path errors:\n  " + "\n  ".join(problems))


def _file_fingerprint(name: str, known: dict[str, Any]) -> dict[str, Any]:
    """Size and sha256; the hash of an earlier fingerprint is reused while the file's size, mtime and inode
    are unchanged, so a resume does not re-read gigabytes of unchanged data."""
    stat = os.stat(name)
    seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    if all(known.get(key) == value for key, value in seen.items()) and isinstance(known.get("sha256"), str):
        return {**seen, "sha256": known["sha256"]}
    return {**seen, "sha256": sha256_file(name)}


def _hub_revision(repo_id: str) -> str | None:
    """The commit of a hub dataset as the local cache holds it (what an offline load reads), or None."""
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def data_fingerprint(data: Any, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a stage's data is: each local file's size and sha256; a hub dataset's id, subset, split and cached
    commit; a demo set's spec. A source that cannot be resolved is left out (the stage itself reports it).
    `known`: the run's earlier fingerprint, whose hashes are reused for files that did not change."""
    known = known or {}
    found: dict[str, Any] = {}
    for key in ("train", "eval"):
        value = getattr(data, key, None)
        split = data.split if key == "train" else (data.eval_split or data.split)
        for entry in value if isinstance(value, list) else [value] if isinstance(value, str) else []:
            source = getattr(entry, "path", entry)  # a mixture's {path, weight, ...} entry: its other keys are in the recipe
            if source.startswith("demo:"):
                found[f"data.{key} {source}"] = source
            elif is_local(source) or any(ch in source for ch in "*?["):
                for name in local_files(source, f"data.{key}", split):  # what the stage would refuse, refused now
                    entry = f"data.{key} {os.path.abspath(name)}"
                    found[entry] = _file_fingerprint(name, known.get(entry) if isinstance(known.get(entry), dict) else {})
            else:
                subset, hub_split = getattr(entry, "subset", None) or data.subset, getattr(entry, "split", None) or split
                name = f"data.{key} {source}" + (f" ({subset or ''}:{hub_split})" if entry is not source else "")  # a mixture may take two splits of one id
                found[name] = {"hub": source, "subset": subset, "split": hub_split, "revision": _hub_revision(source)}
    return found


def with_hub_revisions(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint taken before a hub dataset's first download (its commit unknown then) with the commit the
    cache holds now, after the stage loaded it: from then on a newer download is a change."""
    return {
        name: {**entry, "revision": _hub_revision(entry["hub"])} if isinstance(entry, dict) and "hub" in entry and entry.get("revision") is None else entry
        for name, entry in fingerprint.items()
    }


def _same_data(old: Any, new: Any) -> bool:
    """Whether two entries describe the same data; a hub commit unknown on either side (not cached yet, or
    a run dir from before commits were recorded) is not a change."""
    old, new = _content(old), _content(new)
    if isinstance(old, dict) and isinstance(new, dict) and (old.get("revision") is None or new.get("revision") is None):
        old, new = {k: v for k, v in old.items() if k != "revision"}, {k: v for k, v in new.items() if k != "revision"}
    return old == new


def _content(entry: Any) -> Any:
    """What a fingerprint entry says about the data itself (not where the file lies on disk or when it was touched)."""
    return {k: v for k, v in entry.items() if k not in ("mtime_ns", "inode")} if isinstance(entry, dict) else entry


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two data fingerprints, one phrase each."""
    changes = [f"{name} changed" for name in sorted(set(old) & set(new)) if _same_data(old[name], new[name]) is False]
    changes += [f"{name} is new" for name in sorted(set(new) - set(old))]
    changes += [f"{name} is gone" for name in sorted(set(old) - set(new))]
    return changes
