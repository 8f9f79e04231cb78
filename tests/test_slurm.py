"""Slurm preemption: the scheduler's signal mid-step -> checkpoint at the step boundary -> `scontrol
requeue` once, with the array-aware id -> the requeued job resumes and ends at exactly max_steps with the
weights of an uninterrupted run."""

from __future__ import annotations

import json
import signal
import stat

import pytest

import dpo_cli.stages.common
from conftest import interrupt_at_call, read_jsonl
from dpo_cli import slurm
from test_resume import assert_same_run


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
        interrupt_at_call(patch, dpo_cli.stages.common, "lm_step", 4, signum)  # inside step 4's forward
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


def test_a_failing_scontrol_is_reported(tmp_path, fake_scontrol):
    script = tmp_path / "bin" / "scontrol"
    script.write_text('#!/bin/sh\necho "Invalid job id specified" >&2\nexit 1\n')
    message = slurm.requeue("SIGUSR1", tmp_path)
    assert message.startswith("`scontrol requeue 100_7` failed (Invalid job id specified)") and "resubmit" in message
