"""The command line: help and version, validate and schema, and run-dir rules (resume, refusal, --fresh, lock)."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from helpers import REPO
from dpo_cli.core.rundir import RunDir


def test_help_lists_every_stage_with_examples(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for stage in ("pretrain", "sft", "collect-prefs", "rm-train", "ppo", "dpo", "validate", "schema"):
        assert stage in out
    code, out, _ = cli("sft", "--help")
    assert code == 0 and "Example: dpo-cli sft recipes/demo/sft.yaml" in out
    for flag in ("--run-dir", "--set", "--fresh", "--smoke", "--debug"):
        assert flag in out


def test_version(cli):
    from dpo_cli import __version__

    assert cli("--version")[1].strip() == f"dpo-cli {__version__}"


def test_every_stage_has_a_schema(cli):
    from dpo_cli.core.recipes import ALL_STAGES

    for stage in ALL_STAGES:
        code, out, _ = cli("schema", stage)
        assert code == 0 and json.loads(out)["type"] == "object"


def test_validate_prints_resolved_recipe(cli):
    code, out, _ = cli("validate", REPO / "recipes/demo/sft.yaml", "--set", "model.lora.r=8")
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["model"]["lora"] == {"r": 8, "alpha": 32.0, "dropout": 0.05, "target_modules": "all-linear", "bias": "none", "modules_to_save": None}
    assert resolved["train"]["optimizer"] == "adamw"


def test_validate_prints_every_error(cli, tmp_path):
    bad = tmp_path / "sft.yaml"
    bad.write_text("model: {name_or_path: x/y}\ndata: {train: t.jsonl}\ntrain: {learning_rate: fast, lerning_rate: 1}\n")
    code, _, err = cli("validate", bad)
    assert code == 1
    assert "train.learning_rate: expected a number, got 'fast'" in err
    assert "train.lerning_rate: unknown key; did you mean 'learning_rate'?" in err
    assert "Traceback" not in err
    code, _, err = cli("validate", tmp_path / "recipe.yaml")
    assert code == 1 and "recipe not found" in err


def test_schema_is_json_schema(cli):
    code, out, _ = cli("schema", "sft")
    assert code == 0 and json.loads(out)["title"] == "SftRecipe"
    code, _, err = cli("schema", "bogus")
    assert code == 1 and "unknown stage `bogus`" in err


def test_bad_input_is_one_line_without_traceback_in_a_real_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dpo_cli", "sft", str(tmp_path / "missing.yaml")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: recipe not found")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_malformed_json_line_is_one_line_in_a_real_process(tmp_path, sft_recipe):
    """datasets logs its parser's failure itself; only dpo-cli's line, which names the line, reaches stderr."""
    recipe = sft_recipe()
    (tmp_path / "data" / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{bad\n')
    result = subprocess.run([sys.executable, "-m", "dpo_cli", "sft", str(recipe), "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "line 2: invalid JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_missing_data_leaves_no_run_dir_behind(cli, sft_recipe, tmp_path):
    recipe = sft_recipe(data={"train": "nope.jsonl"})
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 1 and "data.train: no file matches" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_rerun_of_complete_run_does_nothing(cli, sft_recipe, tmp_path):
    recipe = sft_recipe(train={"max_steps": 2})
    assert cli("sft", recipe, "--run-dir", tmp_path / "run")[0] == 0
    final_mtime = (tmp_path / "run" / "final").stat().st_mtime_ns
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0 and "already complete" in err
    assert (tmp_path / "run" / "final").stat().st_mtime_ns == final_mtime


def test_changed_recipe_is_refused_then_fresh_keeps_the_old_run(cli, sft_recipe, tmp_path):
    recipe = sft_recipe(train={"max_steps": 2})
    run = tmp_path / "run"
    assert cli("sft", recipe, "--run-dir", run)[0] == 0
    before = (run / "final").read_bytes() if (run / "final").is_file() else sorted(p.name for p in (run / "final").iterdir())
    code, _, err = cli("sft", recipe, "--run-dir", run, "--set", "train.learning_rate=1e-4")
    assert code == 1 and "train.learning_rate: 0.003 -> 0.0001" in err and "--fresh" in err
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"  # untouched
    code, _, err = cli("sft", recipe, "--run-dir", run, "--set", "train.learning_rate=1e-4", "--fresh")
    assert code == 0, err
    archived = [p for p in tmp_path.iterdir() if p.name.startswith("run.prev-")]
    assert len(archived) == 1 and sorted(p.name for p in (archived[0] / "final").iterdir()) == before
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["learning_rate"] == 1e-4


def test_locked_run_dir_is_refused(cli, sft_recipe, tmp_path):
    recipe = sft_recipe()
    with RunDir.open(tmp_path / "run") as held:
        held.write_recipe("seed: 1\n")
        code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 1 and "is in use by pid" in err


def test_non_empty_folder_that_is_not_a_run_is_refused(cli, sft_recipe, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    code, _, err = cli("sft", sft_recipe(), "--run-dir", tmp_path / "mine")
    assert code == 1 and "holds no dpo-cli run" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_smoke_uses_its_own_run_dir(cli, sft_recipe, tmp_path):
    recipe = sft_recipe(run_dir=str(tmp_path / "runs" / "sft"))
    code, _, err = cli("sft", recipe, "--smoke")
    assert code == 0, err
    assert (tmp_path / "runs" / "sft-smoke" / "final").is_dir() and not (tmp_path / "runs" / "sft").exists()


def test_debug_shows_the_real_exception(cli, tmp_path):
    import pytest

    from dpo_cli.core.errors import UserError

    with pytest.raises(UserError, match="recipe not found"):
        cli("sft", tmp_path / "missing.yaml", "--debug")


def test_values_that_look_like_markup_are_shown_verbatim(cli):
    code, _, err = cli("validate", REPO / "recipes/demo/sft.yaml", "--set", "model.lora.bias=[all]", "--set", "train.learning_rate=[/x]")
    assert code == 1 and "Traceback" not in err
    assert "model.lora.bias" in err and "[all]" in err and "[/x]" in err


def test_samples_table_shows_brackets(capsys):
    from dpo_cli.core.ui import samples_table

    samples_table([{"prompt": "[INST] hi [/INST]", "response": "ok [/INST]"}], "samples")
    assert "[INST] hi [/INST]" in capsys.readouterr().out


def test_failed_fresh_run_leaves_nothing_that_blocks_a_corrected_rerun(cli, sft_recipe, tmp_path):
    recipe = sft_recipe(train={"max_steps": 2})
    run = tmp_path / "run"
    assert cli("sft", recipe, "--run-dir", run)[0] == 0
    code, _, err = cli("sft", recipe, "--run-dir", run, "--fresh", "--set", "data.train=nothere.jsonl")
    assert code == 1 and "no file matches" in err
    assert [p.name for p in run.iterdir()] == [".lock"]  # the old run was moved aside, nothing new was left
    code, _, err = cli("sft", recipe, "--run-dir", run, "--set", "train.learning_rate=1e-3")
    assert code == 0, err
