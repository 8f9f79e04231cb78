"""Exact resume: a run stopped after step k (SIGTERM, SIGINT, kill -9, or a crash while writing a checkpoint)
and started again ends with the same per-step losses and final weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import dpo_cli.train.checkpoint
import dpo_cli.train.loop
import dpo_cli.stages.sft
from helpers import model_modes, assert_same_run, interrupt_at_call

MODES = model_modes(dropout=0.1)  # dropout: a resume must restore the RNG too


def signal_at_call(monkeypatch, call: int, signum: int) -> None:
    interrupt_at_call(monkeypatch, dpo_cli.stages.sft, "lm_step", call, signum)


@pytest.fixture()
def resume_recipe(sft_recipe):
    def make(mode: str):
        return sft_recipe(
            f"{mode}.yaml",
            model={**MODES[mode]},
            train={"max_steps": 8, "save_every": 3, "log_every": 1, "batch_size": 4, "grad_accum": 2},
            data={"train": "data/train.jsonl", "eval": 8, "max_length": 96},
            sft={"show_samples": 0},
        )

    return make


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_then_resume_is_exact(mode, tmp_path, cli, resume_recipe, monkeypatch):
    recipe = resume_recipe(mode)
    assert cli("sft", recipe, "--run-dir", tmp_path / "reference")[0] == 0

    with monkeypatch.context() as patch:
        signal_at_call(patch, call=9, signum=signal.SIGTERM)  # micro-batch 9 = step 5 with grad_accum 2
        code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 143, err
    assert "interrupted by SIGTERM at step 5" in err
    assert (tmp_path / "run" / "checkpoints" / "step-5").is_dir()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted"
    assert not (tmp_path / "run" / "final").exists()

    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert "resuming from" in err and "step 5 of 8" in err
    assert_same_run(tmp_path / "run", tmp_path / "reference")


def test_a_checkpoint_of_the_single_process_layout_still_resumes(tmp_path, cli, resume_recipe, monkeypatch):
    """Checkpoints written before the multi-process version hold rng.pt (not rng-rank0.pt)."""
    recipe = resume_recipe("full")
    assert cli("sft", recipe, "--run-dir", tmp_path / "reference")[0] == 0
    with monkeypatch.context() as patch:
        signal_at_call(patch, call=9, signum=signal.SIGTERM)
        assert cli("sft", recipe, "--run-dir", tmp_path / "run")[0] == 143
    checkpoint = tmp_path / "run" / "checkpoints" / "step-5"
    (checkpoint / "rng-rank0.pt").rename(checkpoint / "rng.pt")
    (checkpoint / "manifest.json").unlink()  # that layout had no manifest either
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert_same_run(tmp_path / "run", tmp_path / "reference")


def test_sigint_checkpoints_and_exits_130(tmp_path, cli, resume_recipe, monkeypatch):
    recipe = resume_recipe("full")
    signal_at_call(monkeypatch, call=3, signum=signal.SIGINT)
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 130 and "interrupted by SIGINT at step 2" in err
    assert (tmp_path / "run" / "checkpoints" / "step-2").is_dir()


def test_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, cli, resume_recipe, monkeypatch):
    recipe = resume_recipe("lora")
    assert cli("sft", recipe, "--run-dir", tmp_path / "reference")[0] == 0

    real_save = dpo_cli.train.checkpoint.save_training_state
    saves = {"n": 0}

    def crashing_save(folder, **parts):
        saves["n"] += 1
        if saves["n"] == 2:  # the step-6 checkpoint: half written, then the disk fails
            (folder / "trainable.safetensors").write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        real_save(folder, **parts)

    with monkeypatch.context() as patch:
        patch.setattr(dpo_cli.train.checkpoint, "save_training_state", crashing_save)
        code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 1 and "no space left on the device mounted at" in err and "free space and run the same command again" in err
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-3"]  # the half-written one is gone, the previous one intact

    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0 and "step 3 of 8" in err
    assert_same_run(tmp_path / "run", tmp_path / "reference")


def test_kill_9_mid_run_then_resume_is_exact(tmp_path, cli, sft_recipe):
    recipe = sft_recipe(
        "kill.yaml",
        train={"max_steps": 40, "save_every": 2, "log_every": 1, "batch_size": 16},
        data={"train": "data/train.jsonl", "eval": 8, "max_length": 96},
        sft={"show_samples": 0},
    )
    assert cli("sft", recipe, "--run-dir", tmp_path / "reference")[0] == 0

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "dpo_cli", "sft", str(recipe), "--run-dir", str(run)], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-4").is_dir():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.kill()  # SIGKILL: no handler runs, the lock dies with the process
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (run / "final").exists()

    code, _, err = cli("sft", recipe, "--run-dir", run)
    assert code == 0, err
    assert "resuming from" in err
    assert_same_run(run, tmp_path / "reference")


def test_a_resumed_runs_wall_time_counts_the_attempts_before_it(tmp_path, cli, resume_recipe, monkeypatch):
    """Train time adds up over attempts (it comes back with the checkpoint); wall time must too, else a
    resumed run reports more time training than it took (issue 15: 764 s of training in 163 s)."""
    recipe = resume_recipe("full")
    with monkeypatch.context() as patch:
        real = dpo_cli.stages.sft.lm_step

        def slow(*args, **kwargs):
            time.sleep(0.5)  # the first attempt's steps take long: 4 s of training before the signal
            return real(*args, **kwargs)

        patch.setattr(dpo_cli.stages.sft, "lm_step", slow)
        signal_at_call(patch, call=9, signum=signal.SIGTERM)
        assert cli("sft", recipe, "--run-dir", tmp_path / "run")[0] == 143
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_time_s"] >= 4.0  # 8 slow micro-batches before the checkpoint of step 4
    assert summary["wall_time_s"] >= summary["train_time_s"]


def test_resume_from_an_earlier_checkpoint_sets_later_work_aside_and_retrains_exactly(tmp_path, cli, resume_recipe):
    """A finished run taken back to step 3 sets step 6, final/ and the summary aside (never deleted), trains
    steps 4-8 again to the same weights, and logs every step once."""
    from helpers import read_jsonl

    recipe = resume_recipe("lora")
    run = tmp_path / "run"
    assert cli("sft", recipe, "--run-dir", run)[0] == 0
    assert cli("sft", recipe, "--run-dir", tmp_path / "reference")[0] == 0
    code, _, err = cli("sft", recipe, "--run-dir", run, "--resume-from", "step-3")
    assert code == 0, err
    assert "--resume-from: going on from step 3" in err and "resuming from" in err and "step 3 of 8" in err
    aside = next(run.glob("superseded-after-step-3-*"))
    assert (aside / "checkpoints" / "step-6").is_dir() and (aside / "final").is_dir() and (aside / "summary.json").is_file()
    assert [r["step"] for r in read_jsonl(aside / "metrics.jsonl") if r.get("split") != "eval"] == list(range(1, 9))
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r.get("split") != "eval"] == list(range(1, 9))
    assert_same_run(run, tmp_path / "reference")
    code, _, err = cli("sft", recipe, "--run-dir", run, "--resume-from", str(run / "checkpoints" / "step-6"))
    assert code == 0, err
    for args, message in [
        (("--resume-from", "step-4"), "has no such complete checkpoint (it has: step-3, step-6)"),
        (("--resume-from", str(tmp_path / "elsewhere" / "step-3")), "not a checkpoint of"),
        (("--resume-from", "step-3", "--fresh"), "exclude each other"),
    ]:
        code, _, err = cli("sft", recipe, "--run-dir", run, *args)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "new", "--resume-from", "step-3")
    assert code == 1 and "holds no run to resume" in err
    weights = run / "checkpoints" / "step-3" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, _, err = cli("sft", recipe, "--run-dir", run, "--resume-from", "step-3")
    assert code == 1 and "that checkpoint is damaged" in err and "nothing was moved" in err, err
    assert (run / "checkpoints" / "step-6").is_dir() and (run / "final").is_dir()
