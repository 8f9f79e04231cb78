"""Promise: pruning never leaves an old checkpoint that looks complete without its weights."""

from __future__ import annotations

import shutil

import dpo_cli.core.rundir


def test_a_crash_while_pruning_leaves_no_half_checkpoint(tmp_path, cli, sft_recipe, monkeypatch):
    recipe = sft_recipe(train={"save_every": 2, "keep_checkpoints": 1})
    real = shutil.rmtree

    def crash_midway(path, ignore_errors=False):
        if path.parent.name == "checkpoints" and path.name.startswith(("step-", ".tmp-pruned-")):
            # the process dies after the first file of the old checkpoint went (its marker is deleted last)
            next(iter(sorted(p for p in path.iterdir() if p.name != dpo_cli.core.rundir.CHECKPOINT_MARKER))).unlink()
            raise SystemExit("killed while pruning")
        return real(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(dpo_cli.core.rundir.shutil, "rmtree", crash_midway)
    try:
        cli("sft", recipe, "--run-dir", tmp_path / "run")
    except SystemExit:
        pass
    monkeypatch.setattr(dpo_cli.core.rundir.shutil, "rmtree", real)
    run = dpo_cli.core.rundir.RunDir(tmp_path / "run")
    assert [step for step, _ in run.checkpoints()] == [4]  # step-2 is gone whole, not a marker without weights
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")  # resumes from step 4; the leftover is cleaned
    assert code == 0, err
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
