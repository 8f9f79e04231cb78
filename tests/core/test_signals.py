"""Stop signals before the training loop listens: Slurm's SIGUSR1 warning can come while a stage still imports
or loads its model (it may be sent up to a minute early); it is kept for the loop, never kills the process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from dpo_cli.core.signals import hold_warning_signal, take_held_signal
from helpers import REPO, assert_same_run


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for the signal (the SigCgt mask of /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask & (1 << (signum - 1)))


@pytest.fixture()
def held_warning():
    previous = signal.getsignal(signal.SIGUSR1)
    hold_warning_signal()
    yield
    signal.signal(signal.SIGUSR1, previous)
    take_held_signal()


def test_a_warning_outside_a_session_is_held_for_the_next_one(held_warning):
    os.kill(os.getpid(), signal.SIGUSR1)
    assert take_held_signal() == "SIGUSR1"
    assert take_held_signal() is None  # taken once


def test_a_warning_before_training_stops_after_the_first_step_and_the_resume_is_exact(held_warning, tmp_path, cli, sft_recipe):
    recipe = sft_recipe(train={"max_steps": 4, "batch_size": 4, "log_every": 1, "save_every": None}, sft={"show_samples": 0})
    assert cli("sft", recipe, "--run-dir", tmp_path / "reference")[0] == 0

    os.kill(os.getpid(), signal.SIGUSR1)  # as if it came while the model loaded
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 128 + signal.SIGUSR1, err
    assert "interrupted by SIGUSR1 at step 1" in err
    assert (tmp_path / "run" / "checkpoints" / "step-1").is_dir()

    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0 and "resuming from" in err, err
    assert_same_run(tmp_path / "run", tmp_path / "reference")


def test_the_entry_point_holds_the_warning_before_its_heavy_imports(tmp_path, sft_recipe):
    recipe = sft_recipe(train={"max_steps": 3, "batch_size": 4, "log_every": 1, "save_every": None}, sft={"show_samples": 0})
    process = subprocess.Popen(
        [sys.executable, "-m", "dpo_cli", "sft", str(recipe), "--run-dir", str(tmp_path / "run")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 30
    while not catches(process.pid, signal.SIGUSR1):  # the entry point's first line has run; torch is importing
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 128 + signal.SIGUSR1, err[-3000:]
    assert "interrupted by SIGUSR1 at step 1" in err


def test_the_dpo_cli_script_is_the_same_entry_point():
    (script,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "dpo-cli"]
    assert script.value == "dpo_cli.__main__:main"
