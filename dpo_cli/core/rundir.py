"""Run directories: the lock, the resolved recipe, metrics.jsonl, checkpoints, final/ and summary.json.

Layout of RUN/:
    .lock                  held (flock) while a stage runs; released by the kernel even on kill -9
    recipe.yaml            the resolved recipe, every default filled in
    metrics.jsonl          one JSON object per logged step (eval lines carry "split": "eval")
    checkpoints/step-N/    everything needed to resume; written as .tmp-step-N-PID, renamed when complete
    final/                 plain Hugging Face format (model or PEFT adapter, tokenizer)
    summary.json           stage, status, wall time, throughput, memory, final metrics, versions

Nothing that exists is overwritten in place: files are written to a temporary name, fsynced and renamed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from dpo_cli.core.atomic import atomic_write_json, atomic_write_jsonl, atomic_write_text, fsync_dir, fsync_tree, staging, writing
from dpo_cli.core.errors import UserError

CHECKPOINT_MARKER = "trainer_state.json"  # written last: a checkpoint without it is not complete
OUTPUT_KEYS = ("final_dir", "prefs")  # summary.json keys naming what a finished stage produced


class MetricsLog:
    """Append-only metrics.jsonl; each line is flushed as it is written."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self._handle = open(path, "a", encoding="utf-8") if enabled else None

    def log(self, record: dict[str, Any]) -> None:
        if self._handle is not None:
            with writing(self.path):  # a line torn by a full disk is dropped on resume (read_metrics)
                self._handle.write(json.dumps(record) + "\n")
                self._handle.flush()

    def sync(self) -> None:
        if self._handle is not None:
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete line; a line torn by a crash mid-write is skipped (and dropped on resume)."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


PRECIOUS_FILES = ("labels.jsonl", "labels.quarantine", "candidates.jsonl", "pairs.jsonl", "prefs.jsonl")  # never discarded

class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        self.checkpoints_dir = self.path / "checkpoints"
        self.final_dir = self.path / "final"
        self.recipe_path = self.path / "recipe.yaml"
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self._lock_handle: Any = None
        self._created = False

    # ------------------------------------------------------------------ locking

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: Path) -> Iterator[RunDir]:
        """Lock the run dir for the duration of a stage; a second run into it is refused."""
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise UserError(f"run dir {run.path} exists and is not a directory; choose another --run-dir")
        run._created = not run.path.exists()
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create run dir {run.path}: {exc.strerror}") from None
        handle = open(run.path / ".lock", "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"run dir {run.path} is in use by {holder}; wait for it to finish or choose another --run-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        run._lock_handle = handle
        try:
            yield run
        finally:
            run._release()

    def is_locked(self) -> bool:
        """Whether a stage holds this run dir's lock now (a shared probe, never kept)."""
        try:
            with open(self.path / ".lock", encoding="utf-8") as handle:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        except OSError:
            return False
        return False

    def _release(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None
        if self._created and {p.name for p in self.path.iterdir()} <= {".lock"}:
            shutil.rmtree(self.path, ignore_errors=True)  # a run that failed before writing anything leaves no trace

    # ------------------------------------------------------------------ recipe and status

    def saved_recipe(self) -> dict[str, Any] | None:
        if not self.recipe_path.exists():
            return None
        try:  # the same safe loader as any recipe: a tag or a damaged file is one line, never a constructor
            saved = yaml.safe_load(self.recipe_path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{self.recipe_path}: this run dir's recipe cannot be read ({first}); use --fresh to start over (the old run is kept)") from None
        if not isinstance(saved, dict):
            raise UserError(f"{self.recipe_path}: this run dir's recipe is not a mapping; use --fresh to start over (the old run is kept)")
        return saved

    def has_content(self) -> bool:
        return any(p.name != ".lock" for p in self.path.iterdir())

    def summary(self) -> dict[str, Any] | None:
        if not self.summary_path.exists():
            return None
        return json.loads(self.summary_path.read_text(encoding="utf-8"))

    def is_complete(self) -> bool:
        """Finished, and its outputs (final/, prefs.jsonl, ... as summary.json names them) are still there."""
        summary = self.summary()
        if not summary or summary.get("status") != "completed":
            return False
        return all(Path(summary[key]).exists() for key in OUTPUT_KEYS if summary.get(key))

    def archive(self) -> Path:
        """Move everything but the lock to a sibling RUN.prev-TIMESTAMP folder (what --fresh does)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}.prev-{stamp}")
        suffix = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.prev-{stamp}-{suffix}")
            suffix += 1
        target.mkdir()
        for entry in self.path.iterdir():
            if entry.name != ".lock":
                os.replace(entry, target / entry.name)
        fsync_dir(self.path)
        fsync_dir(target)
        return target

    def data_fingerprint(self) -> dict[str, Any] | None:
        path = self.path / "data_fingerprint.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def write_data_fingerprint(self, fingerprint: dict[str, Any]) -> None:
        atomic_write_json(self.path / "data_fingerprint.json", fingerprint)

    def holds_work(self) -> bool:
        """Anything a rerun resumes from, or that people made: checkpoints, final/, labels, sampled candidates,
        pairs. A failed run that holds work is marked failed and kept, never discarded."""
        return bool(self.checkpoints()) or self.final_dir.exists() or any((self.path / name).exists() for name in PRECIOUS_FILES)

    def no_space_message(self, filename: str | None) -> str:
        """The one line for a full disk: which file system, which file, what is safe, what to do."""
        where = Path(filename or self.path).absolute()
        mount = where
        while not os.path.ismount(mount) and mount != mount.parent:
            mount = mount.parent
        labels = self.path / "labels.jsonl"
        count = sum(1 for line in labels.read_text(encoding="utf-8", errors="replace").splitlines() if '"event": "label"' in line) if labels.is_file() else 0
        safe = f"{count} label events are safe in {labels}; " if count else "earlier checkpoints and files are intact; "
        return f"no space left on the device mounted at {mount} writing {filename or f'into {self.path}'}; {safe}free space and run the same command again to resume"

    def discard(self) -> None:
        """Remove everything but the lock (a run that failed on bad input before training)."""
        for entry in self.path.iterdir():
            if entry.name != ".lock":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def write_recipe(self, recipe_yaml: str) -> None:
        atomic_write_text(self.recipe_path, recipe_yaml)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary)

    def clean_partial(self) -> None:
        """Remove half-written checkpoints and finals left by a crash (never complete ones)."""
        for parent in (self.path, self.checkpoints_dir):
            if parent.is_dir():
                for entry in parent.glob(".tmp-*"):
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)

    # ------------------------------------------------------------------ checkpoints

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        found = []
        if self.checkpoints_dir.is_dir():
            for entry in self.checkpoints_dir.iterdir():
                if entry.name.startswith("step-") and (entry / CHECKPOINT_MARKER).is_file():
                    try:
                        found.append((int(entry.name.removeprefix("step-")), entry))
                    except ValueError:
                        continue
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def checkpoint_step(self, wanted: str) -> int:
        """The step of a checkpoint of this run named `step-N`, `N` or by its path; a clear error otherwise."""
        found = dict(self.checkpoints())
        path, name = Path(wanted).expanduser(), wanted
        if "/" in wanted:  # a path
            if path.resolve().parent != self.checkpoints_dir.resolve():
                raise UserError(f"--resume-from {wanted}: not a checkpoint of {self.path} (its checkpoints are in {self.checkpoints_dir})")
            name = path.resolve().name
        step = name.removeprefix("step-")
        if not step.isdigit() or int(step) not in found:
            have = ", ".join(f"step-{n}" for n in found) or "none"
            raise UserError(f"--resume-from {wanted}: {self.path} has no such complete checkpoint (it has: {have})")
        return int(step)

    def set_aside_after(self, step: int) -> Path | None:
        """Make checkpoint `step` the newest: later checkpoints, final/ and summary.json move (never deleted) to
        RUN/superseded-after-step-N-TIME/, with a copy of the JSONL logs whose later lines the resume drops."""
        later = [folder for n, folder in self.checkpoints() if n > step]
        # trackers.json too: the trackers' runs already hold the later steps, so the resumed steps start new ones
        moved = later + [p for p in (self.final_dir, self.summary_path, self.path / "trackers.json") if p.exists()]
        if not moved:
            return None
        base = f"superseded-after-step-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        aside, suffix = self.path / base, 1
        while aside.exists():  # two resumes within a second
            aside, suffix = self.path / f"{base}.{suffix}", suffix + 1
        (aside / "checkpoints").mkdir(parents=True)
        for log in self.path.glob("*.jsonl"):
            shutil.copy2(log, aside / log.name)
        for entry in moved:
            os.replace(entry, aside / ("checkpoints" if entry in later else "") / entry.name)
        fsync_dir(self.checkpoints_dir)
        fsync_dir(self.path)
        return aside

    @contextlib.contextmanager
    def new_checkpoint(self, step: int, keep: int) -> Iterator[Path]:
        """Yield a temporary folder to fill; on success it becomes checkpoints/step-N, and old ones are pruned."""
        self.checkpoints_dir.mkdir(exist_ok=True)
        with staging(self.checkpoints_dir / f".tmp-step-{step}-{os.getpid()}", self.checkpoints_dir / f"step-{step}") as tmp:
            yield tmp
        self.publish_checkpoint(tmp, step, keep)

    def checkpoint_staging(self, step: int) -> Path:
        """The folder every process of a multi-process run writes its part of checkpoint N into (the main
        process makes it empty first)."""
        return self.checkpoints_dir / f".tmp-step-{step}"

    def publish_checkpoint(self, tmp: Path, step: int, keep: int) -> Path:
        """A filled staging folder becomes checkpoints/step-N (complete or absent), then old ones are pruned."""
        if not (tmp / CHECKPOINT_MARKER).is_file():
            raise RuntimeError(f"checkpoint {tmp} was written without {CHECKPOINT_MARKER}")
        fsync_tree(tmp)
        final = self.checkpoints_dir / f"step-{step}"
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.checkpoints_dir)
        for _step, old in self.checkpoints()[:-keep]:
            # One rename takes the checkpoint away whole (a crash mid-delete cannot leave a step-N that looks
            # complete without its weights); the rest is a .tmp-* folder that clean_partial removes.
            trash = self.checkpoints_dir / f".tmp-pruned-{old.name}-{os.getpid()}"
            os.replace(old, trash)
            fsync_dir(self.checkpoints_dir)
            shutil.rmtree(trash, ignore_errors=True)
        return final

    # ------------------------------------------------------------------ final

    @contextlib.contextmanager
    def new_final(self) -> Iterator[Path]:
        """Yield a temporary folder; on success it becomes final/ (an older final/ is moved aside first)."""
        with staging(self.path / f".tmp-final-{os.getpid()}", self.final_dir) as tmp:
            yield tmp
        if self.final_dir.exists():
            os.replace(self.final_dir, self.path / f"final.prev-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(tmp, self.final_dir)
        fsync_dir(self.path)

    # ------------------------------------------------------------------ metrics

    def metrics_log(self, resume_step: int, enabled: bool = True) -> MetricsLog:
        """Open metrics.jsonl for appending, first dropping lines logged after the checkpoint we resume from."""
        return self.jsonl_log(self.metrics_path, resume_step, enabled)

    def jsonl_log(self, path: Path, resume_step: int, enabled: bool = True) -> MetricsLog:
        """Any per-step JSONL log (records carry "step"): lines past the resumed checkpoint are dropped first."""
        if enabled and path.exists():
            kept = [line for line in read_metrics(path) if line.get("step", 0) <= resume_step]
            atomic_write_jsonl(path, kept)
        return MetricsLog(path, enabled=enabled)
