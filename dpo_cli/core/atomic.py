"""Writing files so that a crash or a full disk never leaves half of one: a temporary name, fsync, rename;
and the sha256 that manifests and fingerprints are made of."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full(exc: BaseException | None) -> BaseException | None:
    """The ENOSPC / EDQUOT in an exception or what caused it, also from a library that carries no errno
    (torch's serializer, safetensors' "os error 28"); None when the disk was not full."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        if any(text in str(exc) for text in ("No space left on device", "os error 28", "Disk quota exceeded")):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


@contextlib.contextmanager
def writing(target: Path) -> Iterator[None]:
    """A full disk while writing `target` (a file, or a folder staged under another name) says so by name."""
    try:
        yield
    except Exception as exc:
        full = disk_full(exc)
        if full is None or (isinstance(full, OSError) and full.filename == str(target)):
            raise
        raise OSError(errno.ENOSPC, "No space left on device", str(target)) from exc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Written to a temporary name, fsynced, renamed: `path` is the old file or the whole new one, never a
    part; a failed write (e.g. a full disk) leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """JSON Lines as datasets and TRL read them: one object per line, UTF-8 (not escaped), written atomically."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def fsync_tree(path: Path) -> None:
    """fsync every file and folder below `path` (before the rename that publishes it)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


@contextlib.contextmanager
def staging(tmp: Path, target: Path) -> Iterator[Path]:
    """A fresh temporary folder to fill (to become `target`); removed if filling fails, fsynced (ready to
    rename) if it succeeds."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with writing(target):
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_tree(tmp)
