"""Promise: a full disk while writing a checkpoint, final/, metrics.jsonl, candidates, pairs or prefs leaves every
earlier file intact, stops with one line naming the device and the file, and once space is freed the same
command continues exactly. The disk is really full: the run dir lives on a small tmpfs that the test fills at
the moment the file is written, and the writers (torch, safetensors, Python) fail on their own."""

from __future__ import annotations

import errno
import io
import os
import subprocess

import pytest
import torch
from pathlib import Path

import dpo_cli.train.checkpoint
import dpo_cli.core.rundir
import dpo_cli.stages.collect_prefs
import dpo_cli.models.io
import dpo_cli.stages.sft
from helpers import assert_same_run, read_jsonl, skip_without_system, write_recipe
from dpo_cli.train.checkpoint import verify_manifest
from dpo_cli.core.rundir import read_metrics


@pytest.fixture()
def disk(tmp_path):
    """A 64 MiB tmpfs, mounted for this test (needs root, as in CI's container; skipped where it cannot be)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        skip_without_system(f"cannot mount a small tmpfs to fill ({done.stderr.strip() or 'mount failed'}); needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount) -> None:
    """Take every free byte of the file system (the filler is deleted to free the space again)."""
    fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def free(mount) -> None:
    (mount / "filler").unlink(missing_ok=True)


def fill_before(patch, module, name: str, mount, call: int = 1) -> None:
    """Fill the disk just before the `call`-th call of module.name, which then runs (and fails) for real."""
    real, calls = getattr(module, name), {"n": 0}

    def full_first(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            fill(mount)
        return real(*args, **kwargs)

    patch.setattr(module, name, full_first)


class FullAfter(io.TextIOWrapper):
    """metrics.jsonl as the loop appends to it, on a disk that fills up after `lines` lines: the next line is
    torn halfway and the write fails with ENOSPC. (tmpfs hands out whole pages, so a line appended to a file
    whose last page has room succeeds on a full disk: this one failure is injected.)"""

    def __init__(self, path, lines: int):
        super().__init__(open(path, "ab"), encoding="utf-8")
        self.left = lines

    def write(self, text: str) -> int:
        if self.left == 0:
            super().write(text[: len(text) // 2])
            super().flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= 1
        return super().write(text)


def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("timestamp", "time")} for row in rows]


def one_line_naming(err: str, mount, file: str) -> None:
    """The training lines printed before, then one error line (no traceback) saying what, where and what to do."""
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert f"no space left on the device mounted at {mount} writing {mount / 'run' / file};" in errors[0], err
    assert "free space and run the same command again" in errors[0]


def no_temporary_files(run) -> None:
    assert not [p for p in run.rglob("*") if ".tmp" in p.name], "a failed write left a temporary file taking space"


@pytest.mark.parametrize("file", ["checkpoints/step-4", "final", "metrics.jsonl"])
def test_a_full_disk_in_a_training_run_loses_nothing_and_the_rerun_is_exact(tmp_path, cli, sft_recipe, disk, file):
    recipe = sft_recipe(train={"max_steps": 6, "save_every": 2, "log_every": 1})
    assert cli("sft", recipe, "--run-dir", tmp_path / "reference")[0] == 0
    run = disk / "run"
    with pytest.MonkeyPatch.context() as patch:
        if file == "metrics.jsonl":
            real_open = open
            opened = lambda path, *a, **k: FullAfter(path, 3) if Path(path).name == file and a[:1] == ("a",) else real_open(path, *a, **k)  # noqa: E731
            patch.setattr(dpo_cli.core.rundir, "open", opened, raising=False)
        elif file == "final":
            fill_before(patch, dpo_cli.models.io, "save_final", disk)
        else:
            fill_before(patch, dpo_cli.train.checkpoint, "save_training_state", disk, call=2)
        code, _, err = cli("sft", recipe, "--run-dir", run)
    assert code == 1
    one_line_naming(err, disk, file)
    no_temporary_files(run)
    assert not (run / "final").exists()
    for checkpoint in (run / "checkpoints").iterdir():
        assert verify_manifest(checkpoint) is None  # every checkpoint on disk is whole
    reference_lines = read_jsonl(tmp_path / "reference" / "metrics.jsonl")
    for got, want in zip(read_metrics(run / "metrics.jsonl"), reference_lines):  # (a torn last line skipped)
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)  # the lines written before are intact

    free(disk)
    code, _, err = cli("sft", recipe, "--run-dir", run)
    assert code == 0, err
    assert_same_run(run, tmp_path / "reference")


@pytest.fixture()
def prefs_recipe(tmp_path, tiny_model_dir):
    return write_recipe(tmp_path / "collect-prefs.yaml", {
        "stage": "collect-prefs", "seed": 3, "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": "demo:prompts?n=6", "max_length": 64}, "generation": {"max_new_tokens": 6, "batch_size": 8},
        "collect": {"samples_per_prompt": 2}, "label": {"by": "judge", "judge": "length"},
    })  # fmt: skip


@pytest.mark.parametrize("file", ["candidates.jsonl", "pairs.jsonl", "prefs.jsonl"])
def test_a_full_disk_in_collect_prefs_keeps_every_earlier_file_and_the_rerun_finishes(tmp_path, cli, prefs_recipe, disk, file):
    assert cli("collect-prefs", prefs_recipe, "--run-dir", tmp_path / "reference")[0] == 0
    run, real = disk / "run", dpo_cli.stages.collect_prefs.atomic_write_jsonl

    def full_at_file(path, rows):
        if path.name == file:
            fill(disk)
        return real(path, rows)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dpo_cli.stages.collect_prefs, "atomic_write_jsonl", full_at_file)
        code, _, err = cli("collect-prefs", prefs_recipe, "--run-dir", run)
    assert code == 1
    one_line_naming(err, disk, file)
    no_temporary_files(run)
    assert not (run / file).exists()  # not a part of one
    earlier = {"candidates.jsonl": [], "pairs.jsonl": ["candidates.jsonl"], "prefs.jsonl": ["candidates.jsonl", "pairs.jsonl", "labels.jsonl"]}
    for name in earlier[file]:
        assert strip(read_jsonl(run / name)) == strip(read_jsonl(tmp_path / "reference" / name)), name
    if file == "prefs.jsonl":
        assert "label events are safe in" in err

    free(disk)
    code, _, err = cli("collect-prefs", prefs_recipe, "--run-dir", run)
    assert code == 0, err
    assert strip(read_jsonl(run / "prefs.jsonl")) == strip(read_jsonl(tmp_path / "reference" / "prefs.jsonl"))


def test_a_failed_checkpoint_of_several_processes_leaves_no_staging_folder(tmp_path, tiny_model_dir, monkeypatch):
    """The main process of a multi-process run removes the shared .tmp-step-N when writing it fails (a full disk
    here); the run dir keeps only whole checkpoints."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from dpo_cli.train.checkpoint import write_checkpoint
    from dpo_cli.core.rundir import RunDir

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    runtime = SimpleNamespace(world_size=2, rank=0, is_main=True, sharded=False)  # the main process of two

    def full(folder, **_):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "optimizer.pt"))

    monkeypatch.setattr(dpo_cli.train.checkpoint, "save_shared_state", full)
    run = RunDir(tmp_path / "run")
    (tmp_path / "run").mkdir()
    with pytest.raises(OSError):
        write_checkpoint(run, 2, 2, runtime=runtime, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, loop_state={"step": 2})
    assert list(run.checkpoints_dir.iterdir()) == []
