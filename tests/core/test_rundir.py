"""Run directories: lock, atomic files, checkpoints that are complete or absent, pruning, metrics on resume."""

from __future__ import annotations

import json

import pytest

from dpo_cli.core.errors import UserError
from dpo_cli.core.rundir import CHECKPOINT_MARKER, RunDir, read_metrics
from dpo_cli.core.atomic import atomic_write_text


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary left behind


def test_lock_refuses_a_second_run(tmp_path):
    with RunDir.open(tmp_path / "run") as run:
        run.write_recipe("seed: 1\n")
        with pytest.raises(UserError, match=r"is in use by pid \d+"):
            with RunDir.open(tmp_path / "run"):
                pass
    with RunDir.open(tmp_path / "run"):  # released when the first run ends
        pass


def test_run_that_wrote_nothing_leaves_no_directory(tmp_path):
    with pytest.raises(RuntimeError):
        with RunDir.open(tmp_path / "new-run"):
            raise RuntimeError("failed before writing")
    assert not (tmp_path / "new-run").exists()


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        with RunDir.open(tmp_path / "file"):
            pass


def _complete_checkpoint(run: RunDir, step: int, keep: int = 3) -> None:
    with run.new_checkpoint(step, keep=keep) as folder:
        (folder / "weights").write_text(str(step))
        (folder / CHECKPOINT_MARKER).write_text(json.dumps({"step": step}))


def test_checkpoints_are_published_complete_and_pruned(tmp_path):
    with RunDir.open(tmp_path / "run") as run:
        for step in (2, 4, 6, 8):
            _complete_checkpoint(run, step, keep=2)
        assert [s for s, _ in run.checkpoints()] == [6, 8]
        assert run.latest_checkpoint().name == "step-8"


def test_crash_while_writing_leaves_previous_checkpoint(tmp_path):
    with RunDir.open(tmp_path / "run") as run:
        _complete_checkpoint(run, 2)
        with pytest.raises(OSError):
            with run.new_checkpoint(4, keep=3) as folder:
                (folder / "weights").write_text("half")
                raise OSError("disk full")
        assert run.latest_checkpoint().name == "step-2"
        assert [p.name for p in run.checkpoints_dir.iterdir()] == ["step-2"]


def test_leftovers_of_a_killed_writer_are_ignored_then_cleaned(tmp_path):
    with RunDir.open(tmp_path / "run") as run:
        _complete_checkpoint(run, 2)
        (run.checkpoints_dir / ".tmp-step-4-999").mkdir()  # kill -9 during the write
        (run.checkpoints_dir / "step-6").mkdir()  # a folder without the completion marker
        assert run.latest_checkpoint().name == "step-2"
        run.clean_partial()
        assert not (run.checkpoints_dir / ".tmp-step-4-999").exists()


def test_metrics_after_the_resumed_checkpoint_are_dropped(tmp_path):
    with RunDir.open(tmp_path / "run") as run:
        log = run.metrics_log(resume_step=0)
        for step in range(1, 6):
            log.log({"step": step, "loss": float(step)})
        log.log({"step": 5, "split": "eval", "loss": 0.5})
        log.close()
        run.metrics_log(resume_step=3).close()
        assert [m["step"] for m in read_metrics(run.metrics_path)] == [1, 2, 3]


def test_archive_moves_everything_but_the_lock(tmp_path):
    with RunDir.open(tmp_path / "run") as run:
        run.write_recipe("seed: 1\n")
        _complete_checkpoint(run, 2)
        moved = run.archive()
        assert (moved / "recipe.yaml").exists() and (moved / "checkpoints" / "step-2").exists()
        assert [p.name for p in run.path.iterdir()] == [".lock"]


def test_final_is_replaced_whole(tmp_path):
    with RunDir.open(tmp_path / "run") as run:
        with run.new_final() as folder:
            (folder / "model").write_text("1")
        with pytest.raises(ValueError):
            with run.new_final() as folder:
                (folder / "model").write_text("half")
                raise ValueError
        assert (run.final_dir / "model").read_text() == "1"


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    with RunDir.open(tmp_path / "run") as run:
        log = run.metrics_log(resume_step=0)
        log.log({"step": 1, "loss": 1.0})
        log.close()
        with open(run.metrics_path, "a") as handle:
            handle.write('{"step": 2, "lo')  # a crash mid-write
        assert [m["step"] for m in read_metrics(run.metrics_path)] == [1]
        run.metrics_log(resume_step=1).close()
        assert run.metrics_path.read_text() == '{"step": 1, "loss": 1.0}\n'
