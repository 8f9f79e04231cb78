"""Slurm preemption: the scheduler's signal mid-step -> checkpoint at the step boundary -> `scontrol
requeue` once, with the array-aware id -> the requeued job resumes and ends at exactly max_steps with the
weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dpo_cli.stages.sft
from helpers import REPO, interrupt_at_call, read_jsonl, torchrun
from dpo_cli.core import slurm
from helpers import assert_same_run


@pytest.fixture()
def fake_scontrol(tmp_path, monkeypatch):
    """An `scontrol` on PATH that records its arguments, and the environment of a Slurm array task."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    for name, value in {"SLURM_JOB_ID": "107", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "7", "SLURM_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DPO_CLI_REQUEUE_ON", raising=False)
    return log


def calls(log) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_job_id_is_array_aware():
    assert slurm.job_id({"SLURM_JOB_ID": "107", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "7"}) == "100_7"
    assert slurm.job_id({"SLURM_JOB_ID": "107"}) == "107"
    assert slurm.job_id({}) is None


@pytest.mark.parametrize("signum, code", [(signal.SIGUSR1, 138), (signal.SIGTERM, 143)])
def test_preempted_job_checkpoints_requeues_once_and_resumes_exactly(signum, code, tmp_path, cli, sft_recipe, monkeypatch, fake_scontrol):
    recipe = sft_recipe(train={"max_steps": 6, "save_every": None, "log_every": 1, "batch_size": 4}, sft={"show_samples": 0})
    with monkeypatch.context() as outside_slurm:
        for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
            outside_slurm.delenv(name)
        assert cli("sft", recipe, "--run-dir", tmp_path / "reference")[0] == 0
    assert calls(fake_scontrol) == []  # not a Slurm job: nothing to requeue

    with monkeypatch.context() as patch:
        interrupt_at_call(patch, dpo_cli.stages.sft, "lm_step", 4, signum)  # inside step 4's forward
        exit_code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert exit_code == code, err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-4"]  # step 4 finished first
    assert calls(fake_scontrol) == ["requeue 100_7"] and "requeued Slurm job 100_7" in err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted"

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # what Slurm sets in the requeued job
    exit_code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert exit_code == 0, err
    assert "resuming from" in err and calls(fake_scontrol) == ["requeue 100_7"]
    steps = [m["step"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if m.get("split") != "eval"]
    assert steps == [1, 2, 3, 4, 5, 6]  # max_steps optimizer steps in all, none repeated
    assert_same_run(tmp_path / "run", tmp_path / "reference")


def test_requeue_happens_once_per_allocation(tmp_path, fake_scontrol):
    assert slurm.requeue("SIGUSR1", tmp_path) == "requeued Slurm job 100_7; it resumes from %s when it starts again" % tmp_path
    assert slurm.requeue("SIGTERM", tmp_path) is None  # the time limit's SIGTERM after the warning
    assert calls(fake_scontrol) == ["requeue 100_7"]


def test_requeue_signals_are_configurable(tmp_path, fake_scontrol, monkeypatch):
    assert slurm.requeue("SIGINT", tmp_path) is None  # Ctrl-C in an interactive allocation
    monkeypatch.setenv("DPO_CLI_REQUEUE_ON", "SIGUSR1")  # a scancel (SIGTERM) must stay cancelled
    assert slurm.requeue("SIGTERM", tmp_path) is None
    monkeypatch.setenv("DPO_CLI_REQUEUE_ON", "")
    assert slurm.requeue("SIGUSR1", tmp_path) is None
    assert calls(fake_scontrol) == []


def test_a_job_the_scheduler_requeues_already_is_not_called_failed(tmp_path, fake_scontrol):
    script = tmp_path / "bin" / "scontrol"
    script.write_text('#!/bin/sh\necho "Job is pending execution for job 100_7" >&2\nexit 1\n')  # what Slurm 22.05 answers
    assert slurm.requeue("SIGTERM", tmp_path) == f"Slurm job 100_7 is already requeued by the scheduler; it resumes from {tmp_path} when it starts again"


def test_a_failing_scontrol_is_reported(tmp_path, fake_scontrol):
    script = tmp_path / "bin" / "scontrol"
    script.write_text('#!/bin/sh\necho "Invalid job id specified" >&2\nexit 1\n')
    message = slurm.requeue("SIGUSR1", tmp_path)
    assert message.startswith("`scontrol requeue 100_7` failed (Invalid job id specified)") and "resubmit" in message


@pytest.mark.slow  # 30 s: two processes, preempted and requeued (CI runs the slow tests)
def test_the_sbatch_script_is_preempted_requeued_and_resumes_on_two_processes(tmp_path, sft_recipe, fake_scontrol):
    """scripts/slurm/single-node.sbatch for real on 2 CPU processes, `srun` faked: SIGUSR1 to torchrun (what
    --signal=USR1@120 does to the job step) -> checkpoint -> one `scontrol requeue` -> the requeued job
    ends at max_steps with the weights of an uninterrupted 2-process run."""
    srun = tmp_path / "bin" / "srun"
    srun.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in --*) shift;; *) break;; esac; done\nexec "$@"\n')
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    recipe = sft_recipe(train={"max_steps": 100, "save_every": None, "log_every": 1, "batch_size": 4, "learning_rate": 1e-3}, sft={"show_samples": 0})
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}", "GPUS": "2", "OMP_NUM_THREADS": "1"}
    script, run = REPO / "scripts" / "slurm" / "single-node.sbatch", tmp_path / "run"

    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(["bash", str(script), "sft", str(recipe), "--run-dir", str(run)], env=env, stdout=log, stderr=log)
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").exists() or len(read_jsonl(run / "metrics.jsonl")) < 3:  # mid-run
            assert job.poll() is None and time.time() < deadline, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.1)
        launcher = next(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == job.pid)
        os.kill(launcher, signal.SIGUSR1)
        assert job.wait(timeout=120) != 0
    output = (tmp_path / "job.log").read_text()
    assert calls(fake_scontrol) == ["requeue 100_7"], output[-3000:]
    (checkpoint,) = (run / "checkpoints").iterdir()
    stopped_at = int(checkpoint.name.removeprefix("step-"))
    assert 3 <= stopped_at < 100 and f"interrupted by SIGUSR1 at step {stopped_at}" in output

    requeued = subprocess.run(["bash", str(script), "sft", str(recipe), "--run-dir", str(run)], env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resuming from {checkpoint}" in requeued.stderr and calls(fake_scontrol) == ["requeue 100_7"]
    steps = [m["step"] for m in read_jsonl(run / "metrics.jsonl") if m.get("split") != "eval"]
    assert steps == list(range(1, 101))
    reference = torchrun("sft", recipe, "--run-dir", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert_same_run(run, tmp_path / "reference")


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_the_multi_node_script_meets_at_a_c10d_rendezvous(tmp_path, sft_recipe):
    """scripts/slurm/multi-node.sbatch with `srun` faked and one node of 2 CPU processes: its torchrun
    command (c10d rendezvous on the first host of the node list) really runs the stage."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {
        "srun": 'while [ $# -gt 0 ]; do case "$1" in --*) shift;; *) break;; esac; done\nexec "$@"',
        "scontrol": '[ "$1" = show ] && echo localhost',
    }.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    recipe = sft_recipe(train={"max_steps": 2, "save_every": None, "batch_size": 4}, sft={"show_samples": 0})
    env = {
        **os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", "GPUS": "2", "OMP_NUM_THREADS": "1",
        "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_JOB_ID": "9", "MASTER_PORT": str(29_000 + os.getpid() % 1000),
    }  # fmt: skip
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "slurm" / "multi-node.sbatch"), "sft", str(recipe), "--run-dir", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 nodes x 2 processes, rendezvous localhost:" in done.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["device"].startswith("2 processes")
