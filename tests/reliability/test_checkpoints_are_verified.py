"""Promise: a resume never starts from a damaged checkpoint. Every checkpoint carries a manifest (sha256 and
size of each file); resume verifies the newest, names what is wrong, and falls back to the newest valid one."""

from __future__ import annotations

import json
import signal

import pytest

import dpo_cli.stages.sft
from helpers import interrupt_at_call
from helpers import assert_same_run


@pytest.fixture()
def interrupted(tmp_path, cli, sft_recipe, monkeypatch):
    """A reference run of 8 steps, and the same run stopped by SIGTERM after step 7 (checkpoints 3, 6, 7)."""
    recipe = sft_recipe(train={"max_steps": 8, "save_every": 3, "keep_checkpoints": 3, "batch_size": 4, "grad_accum": 2},
                        data={"train": "data/train.jsonl", "eval": None, "max_length": 96}, sft={"show_samples": 0})  # fmt: skip
    assert cli("sft", recipe, "--run-dir", tmp_path / "reference")[0] == 0
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, dpo_cli.stages.sft, "lm_step", 13, signal.SIGTERM)  # step 7's first micro-batch
        assert cli("sft", recipe, "--run-dir", tmp_path / "run")[0] == 143
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-3", "step-6", "step-7"]
    return recipe, checkpoints


def flip_a_bit(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_weights_falls_back_to_the_checkpoint_before(tmp_path, cli, interrupted):
    recipe, checkpoints = interrupted
    manifest = json.loads((checkpoints / "step-7" / "manifest.json").read_text())
    assert {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng-rank0.pt", "trainer_state.json"} <= set(manifest["files"])
    flip_a_bit(checkpoints / "step-7" / "trainable.safetensors")
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert "checkpoint step-7 is not usable" in err and "does not match its sha256" in err and "resuming from" in err and "step-6" in err
    assert_same_run(tmp_path / "run", tmp_path / "reference")  # exactly as if it never stopped
    assert (checkpoints / "damaged-step-7").is_dir()  # moved aside: pruning can never keep it over good ones


def test_a_truncated_optimizer_state_is_named_and_skipped(tmp_path, cli, interrupted):
    recipe, checkpoints = interrupted
    optimizer = checkpoints / "step-7" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert f"{optimizer} is 100 bytes, its manifest says" in err
    assert_same_run(tmp_path / "run", tmp_path / "reference")


def test_an_unreadable_checkpoint_without_a_manifest_falls_back_too(tmp_path, cli, interrupted):
    """A checkpoint from before manifests: verified by loading it."""
    recipe, checkpoints = interrupted
    (checkpoints / "step-7" / "manifest.json").unlink()
    (checkpoints / "step-7" / "optimizer.pt").write_bytes(b"PK\x03\x04 not a zip archive")
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert "checkpoint step-7 is not usable" in err and "cannot be read" in err
    assert_same_run(tmp_path / "run", tmp_path / "reference")


def test_when_no_checkpoint_is_usable_the_run_stops_with_one_line(tmp_path, cli, interrupted):
    recipe, checkpoints = interrupted
    for step in ("step-3", "step-6", "step-7"):
        flip_a_bit(checkpoints / step / "trainable.safetensors")
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: no usable checkpoint in {checkpoints}")
    assert "use --fresh to start over" in err


def test_data_changed_under_an_interrupted_run_is_refused_unless_allowed(tmp_path, cli, interrupted):
    recipe, _ = interrupted
    data = tmp_path / "data" / "train.jsonl"
    data.write_text(data.read_text().replace("a", "A", 1))  # one letter of one row
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"was started on other data (data.train {data} changed)" in err and "--allow-data-change" in err
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run", "--allow-data-change")
    assert code == 0 and "--allow-data-change: going on with changed data" in err


def test_a_run_started_before_newer_recipe_keys_existed_still_resumes(tmp_path, cli, interrupted):
    """Keys added since (with their defaults) are not a changed recipe: the older run's settings are the same."""
    import yaml

    recipe, _ = interrupted
    saved_path = tmp_path / "run" / "recipe.yaml"
    saved = yaml.safe_load(saved_path.read_text())
    for section, key in (("model", "allow_pickle_weights"), ("train", "nonfinite"), ("train", "max_skipped_steps")):
        del saved[section][key]
    saved_path.write_text(yaml.safe_dump(saved, sort_keys=False))
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert_same_run(tmp_path / "run", tmp_path / "reference")


def test_the_data_fingerprint_is_in_every_manifest_and_a_touched_file_is_not_a_change(tmp_path, cli, interrupted, monkeypatch):
    import os

    import dpo_cli.data.files

    recipe, checkpoints = interrupted
    recorded = json.loads((tmp_path / "run" / "data_fingerprint.json").read_text())
    manifest = json.loads((checkpoints / "step-7" / "manifest.json").read_text())
    assert manifest["data"] == recorded and any(entry.endswith("train.jsonl") for entry in recorded)

    hashed = []
    real = dpo_cli.data.files.sha256_file
    monkeypatch.setattr(dpo_cli.data.files, "sha256_file", lambda name: hashed.append(name) or real(name))
    data = tmp_path / "data" / "train.jsonl"
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))  # touched, same bytes
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0 and "other data" not in err, err
    assert hashed == [str(data)]  # re-hashed once: its mtime changed; the content did not, so no change
