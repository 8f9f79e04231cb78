"""dpo-cli runs: every run dir under a folder with its stage, status, steps, key metrics and size."""

from __future__ import annotations

import fcntl
import json
import os


def test_runs_lists_completed_stopped_and_running_runs(sft_recipe, tmp_path, cli):
    recipe = sft_recipe(train={"max_steps": 4, "save_every": 2})
    assert cli("sft", recipe, "--run-dir", tmp_path / "runs" / "exp" / "sft")[0] == 0
    stopped = tmp_path / "runs" / "stopped"
    (stopped / "checkpoints" / "step-2").mkdir(parents=True)
    (stopped / "checkpoints" / "step-2" / "trainer_state.json").write_text("{}")
    (stopped / "recipe.yaml").write_text("stage: dpo\n")
    running = tmp_path / "runs" / "running"
    running.mkdir()
    (running / "recipe.yaml").write_text("stage: ppo\n")
    held = open(running / ".lock", "w")
    fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a stage holds it
    stale = tmp_path / "runs" / "stale"
    stale.mkdir()
    (stale / "recipe.yaml").write_text("stage: sft\n")
    (stale / ".lock").write_text(f"pid {os.getpid()} on {os.uname().nodename}\n")  # a live pid, but no lock held
    (stale / "summary.json").write_text("[1, 2]")  # not a summary: listed, never fatal
    (tmp_path / "runs" / "sft.prev-20260101-000000").mkdir()
    (tmp_path / "runs" / "sft.prev-20260101-000000" / "recipe.yaml").write_text("stage: sft\n")

    code, out, err = cli("runs", tmp_path / "runs", "--json")
    assert code == 0, err
    rows = {os.path.relpath(r["run"], tmp_path / "runs"): r for r in json.loads(out)}
    held.close()
    assert set(rows) == {"exp/sft", "stopped", "running", "stale"}
    assert rows["stale"]["status"] == "not started"
    assert rows["exp/sft"]["stage"] == "sft" and rows["exp/sft"]["status"] == "completed" and rows["exp/sft"]["steps"] == 4
    assert set(rows["exp/sft"]["metrics"]) == {"loss", "eval loss", "eval ppl"} and rows["exp/sft"]["size_bytes"] > 10_000
    assert rows["stopped"]["status"] == "stopped (resumable)" and rows["stopped"]["steps"] == 2
    assert rows["running"]["status"] == "running"
    code, out, _ = cli("runs", tmp_path / "runs", "--json", "--all")
    assert len(json.loads(out)) == 5
    code, out, _ = cli("runs", tmp_path / "runs")
    assert code == 0 and "exp/sft" in out and "completed" in out
    code, _, err = cli("runs", tmp_path / "nowhere")
    assert code == 1 and "is not a folder" in err
