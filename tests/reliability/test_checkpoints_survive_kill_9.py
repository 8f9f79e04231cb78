"""Promise: kill -9 at any moment of a checkpoint write (no handler runs) never leaves a checkpoint that looks
complete and is not: the next start removes the half-written one and resumes exactly from the one before."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from helpers import assert_same_run

# A real process, killed by SIGKILL from inside the write at one of its moments (then nothing else runs).
KILLER = """
import os, signal, sys
import dpo_cli.train.checkpoint as checkpoint
moment, calls = sys.argv[1], {"n": 0}
def killing(name):
    real = getattr(checkpoint, name)
    def wrapped(folder, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 and moment == name:  # the second checkpoint, step 4
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(folder, *args, **kwargs)
        if calls["n"] == 2 and moment == name + ":after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(checkpoint, name, wrapped)
killing("save_shared_state" if moment.startswith("save_shared_state") else "write_manifest")
from dpo_cli.cli import main
sys.argv = ["dpo-cli", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("moment", ["save_shared_state", "save_shared_state:after", "write_manifest", "write_manifest:after"])
def test_kill_9_mid_checkpoint_write_resumes_from_the_one_before(tmp_path, cli, sft_recipe, moment):
    recipe = sft_recipe(train={"max_steps": 6, "save_every": 2, "log_every": 1}, sft={"show_samples": 0})
    assert cli("sft", recipe, "--run-dir", tmp_path / "reference")[0] == 0
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLER, moment, "sft", str(recipe), "--run-dir", str(run)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == ["step-2"]
    code, _, err = cli("sft", recipe, "--run-dir", run)
    assert code == 0 and "resuming from" in err and "step-2" in err, err
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert_same_run(run, tmp_path / "reference")
