"""`dpo-cli pipeline`: order, skip when up to date, re-run when a recipe or an input changed, resume after an
interruption, --only / --from / --dry-run, and bad pipeline files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

import dpo_cli.stages.dpo
from helpers import REPO, assert_same_run, interrupt_at_call, preference_rows, torchrun, write_jsonl, write_recipe


@pytest.fixture()
def pipeline_file(tmp_path, tiny_model_dir, sft_rows):
    write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    write_jsonl(tmp_path / "prefs.jsonl", preference_rows(16))
    write_recipe(tmp_path / "sft.yaml", {
        "stage": "sft", "model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": "sft.jsonl", "max_length": 96},
        "train": {"max_steps": 2, "batch_size": 4, "save_every": None}, "sft": {"show_samples": 0},
    })  # fmt: skip
    write_recipe(tmp_path / "dpo.yaml", {
        "stage": "dpo", "model": {"name_or_path": "placeholder"}, "data": {"train": "prefs.jsonl", "max_length": 128},
        "train": {"max_steps": 4, "batch_size": 4, "save_every": 2, "log_every": 1}, "dpo": {"show_samples": 0},
    })  # fmt: skip

    def make(dpo_set=None, stages=None):
        pipeline = {
            "run_dir": "runs",
            "seed": 5,
            "stages": stages or {
                "sft": {"recipe": "sft.yaml"},
                "dpo": {"recipe": "dpo.yaml", "inputs": {"model.name_or_path": "sft"}, "set": dpo_set or {}},
            },
        }  # fmt: skip
        return write_recipe(tmp_path / "pipeline.yaml", pipeline)

    return make


def actions(out: str) -> dict[str, str]:
    """run -> action, from the last plan table printed."""
    table = out.split("pipeline done")[-1] if "pipeline done" in out else out
    found = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 4 and cells[0] and cells[0] != "stage" and cells[2]:
            found[cells[0]] = cells[2]
    return found


def test_runs_in_order_then_skips_then_reruns_what_changed(tmp_path, cli, pipeline_file):
    path = pipeline_file()
    code, out, err = cli("pipeline", path)
    assert code == 0, err
    assert (tmp_path / "runs" / "sft" / "final").is_dir() and (tmp_path / "runs" / "dpo" / "final").is_dir()
    assert yaml.safe_load((tmp_path / "runs" / "dpo" / "recipe.yaml").read_text())["model"]["name_or_path"] == str(tmp_path / "runs" / "sft")
    assert json.loads((tmp_path / "runs" / "dpo" / "inputs.json").read_text()).keys() == {"sft"}

    code, out, _ = cli("pipeline", path, "--dry-run")
    assert code == 0 and actions(out) == {"sft": "skip", "dpo": "skip"}

    path = pipeline_file(dpo_set={"dpo.beta": 0.2})  # the dpo recipe changed: dpo alone runs again
    code, out, _ = cli("pipeline", path, "--dry-run")
    assert actions(out) == {"sft": "skip", "dpo": "rerun"} and "dpo.beta: 0.1 -> 0.2" in out
    assert cli("pipeline", path)[0] == 0
    assert list(tmp_path.joinpath("runs").glob("dpo.prev-*"))  # the old run was kept

    code, out, _ = cli("pipeline", path, "--from", "sft", "--dry-run")  # sft re-run: its reader re-runs too
    assert actions(out) == {"sft": "rerun", "dpo": "rerun"}
    sft_identity = json.loads((tmp_path / "runs" / "dpo" / "inputs.json").read_text())["sft"]
    assert cli("pipeline", path, "--only", "sft", "--from", "sft")[0] == 0
    code, out, _ = cli("pipeline", path, "--dry-run")
    assert actions(out) == {"sft": "skip", "dpo": "rerun"} and "inputs changed: sft" in out
    assert cli("pipeline", path)[0] == 0
    assert json.loads((tmp_path / "runs" / "dpo" / "inputs.json").read_text())["sft"] != sft_identity


def test_an_interrupted_pipeline_continues(tmp_path, cli, pipeline_file, monkeypatch):
    path = pipeline_file()
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, dpo_cli.stages.dpo, "dpo_loss", 3)
        code, _, _ = cli("pipeline", path)
    assert code == 143
    code, out, _ = cli("pipeline", path, "--dry-run")
    assert actions(out) == {"sft": "skip", "dpo": "resume"}
    code, out, err = cli("pipeline", path)
    assert code == 0 and "resuming from" in err
    assert json.loads((tmp_path / "runs" / "dpo" / "summary.json").read_text())["status"] == "completed"


def test_seeds_and_sweeps_expand_to_one_run_each_wired_to_its_inputs(tmp_path, tiny_model_dir, pipeline_file):
    from dpo_cli.pipeline import load_pipeline, plan

    write_recipe(tmp_path / "compare.yaml", {
        "stage": "compare", "policies": {"ref": "placeholder", "base": str(tiny_model_dir)}, "data": {"train": "demo:prompts?n=4"},
        "judges": {"function": "sentiment"}, "reference": "base",
    })  # fmt: skip
    path = pipeline_file(stages={
        "sft": {"recipe": "sft.yaml"},
        "dpo": {"recipe": "dpo.yaml", "inputs": {"model.name_or_path": "sft"}, "per_seed": True, "sweep": {"dpo.beta": [0.1, 0.3]}, "set": {"dpo.beta": 0.5}},
        "score": {"recipe": "dpo.yaml", "stage": "dpo", "inputs": {"model.name_or_path": "ref"}},
        "ref": {"recipe": "sft.yaml", "stage": "sft", "per_seed": True},
        "compare": {"recipe": "compare.yaml", "inputs": {"policies.sft": "sft", "policies.dpo": "dpo", "policies.ref": "ref", "costs.dpo": ["sft", "dpo"]}},
    })  # fmt: skip
    write_recipe(path, {**yaml.safe_load(path.read_text()), "seeds": [1, 2]})
    pipeline = load_pipeline(path)
    steps = {step.name: step for step in plan(pipeline, None, None, smoke=False)}
    runs = tmp_path / "runs"
    assert list(steps) == ["sft", "dpo-beta-0.1-seed1", "dpo-beta-0.1-seed2", "dpo-beta-0.3-seed1", "dpo-beta-0.3-seed2",
                           "ref-seed1", "ref-seed2", "score-seed1", "score-seed2", "compare"]  # fmt: skip
    dpo = steps["dpo-beta-0.3-seed2"].recipe_object
    assert (dpo.seed, dpo.dpo.beta, dpo.model.name_or_path) == (2, 0.3, str(runs / "sft"))  # the sweep wins over set
    assert steps["dpo-beta-0.3-seed2"].stage == "dpo" and steps["sft"].recipe_object.seed == 5
    assert steps["score-seed2"].recipe_object.model.name_or_path == str(runs / "ref-seed2")  # a reader of a seeded stage: seed by seed
    compare = steps["compare"].recipe_object
    assert compare.policies == {
        "base": str(tiny_model_dir), "sft": str(runs / "sft"), "ref": [str(runs / "ref-seed1"), str(runs / "ref-seed2")],
        "dpo-beta-0.1": [str(runs / "dpo-beta-0.1-seed1"), str(runs / "dpo-beta-0.1-seed2")],
        "dpo-beta-0.3": [str(runs / "dpo-beta-0.3-seed1"), str(runs / "dpo-beta-0.3-seed2")],
    }  # fmt: skip
    assert list(compare.policies)[:2] == ["ref", "base"]  # a seeded policy keeps its place (the first is the default baseline)
    assert compare.methods == {"dpo": ["dpo-beta-0.1", "dpo-beta-0.3"]}  # a sweep is one method: the frontier draws its envelope
    assert compare.costs == {"dpo": [str(runs / "sft"), [str(runs / n) for n in ("dpo-beta-0.1-seed1", "dpo-beta-0.1-seed2", "dpo-beta-0.3-seed1", "dpo-beta-0.3-seed2")]]}
    assert set(steps["compare"].inputs) == {"sft", "ref-seed1", "ref-seed2", *(n for n in steps if n.startswith("dpo"))}


def test_a_seeded_pipeline_runs_each_seed_once_and_adds_only_new_seeds(tmp_path, cli, pipeline_file):
    path = pipeline_file()
    pipeline = yaml.safe_load(path.read_text())
    pipeline["seeds"] = [1, 2]
    pipeline["stages"]["dpo"]["per_seed"] = True
    write_recipe(path, pipeline)
    code, out, err = cli("pipeline", path)
    assert code == 0, err
    assert [yaml.safe_load((tmp_path / "runs" / f"dpo-seed{s}" / "recipe.yaml").read_text())["seed"] for s in (1, 2)] == [1, 2]
    first = (tmp_path / "runs" / "dpo-seed1" / "summary.json").read_text()
    pipeline["seeds"] = [1, 2, 3]
    write_recipe(path, pipeline)
    code, out, _ = cli("pipeline", path, "--dry-run")
    assert actions(out) == {"sft": "skip", "dpo-seed1": "skip", "dpo-seed2": "skip", "dpo-seed3": "run"}
    code, out, _ = cli("pipeline", path, "--only", "dpo", "--dry-run")  # a stage's name takes all its runs
    assert actions(out) == {"sft": "skip", "dpo-seed1": "skip", "dpo-seed2": "skip", "dpo-seed3": "run"}
    assert cli("pipeline", path)[0] == 0
    assert (tmp_path / "runs" / "dpo-seed3" / "final").is_dir() and (tmp_path / "runs" / "dpo-seed1" / "summary.json").read_text() == first


def test_bad_seeds_and_sweeps(tmp_path, cli, pipeline_file):
    def refused(stages, seeds=None):
        path = pipeline_file(stages=stages)
        if seeds is not None:
            write_recipe(path, {**yaml.safe_load(path.read_text()), "seeds": seeds})
        code, _, err = cli("pipeline", path, "--dry-run")
        assert code == 1
        return err

    sft = {"recipe": "sft.yaml"}
    assert "the pipeline has no seeds" in refused({"sft": {**sft, "per_seed": True}})
    assert "no stage has per_seed: true" in refused({"sft": sft}, seeds=[1, 2])
    assert "repeats a seed" in refused({"sft": {**sft, "per_seed": True}}, seeds=[1, 1])
    assert "give a list of values" in refused({"sft": {**sft, "sweep": {"train.learning_rate": []}}})
    swept = {"sft": {**sft, "sweep": {"train.learning_rate": [1e-3, 1e-4]}}, "dpo": {"recipe": "dpo.yaml", "inputs": {"model.name_or_path": "sft"}}}
    assert "sft is a sweep (several runs); only compare can read a sweep" in refused(swept)
    seeded = {"sft": sft, "dpo": {"recipe": "dpo.yaml", "inputs": {"model.name_or_path": "sft"}, "per_seed": True, "sweep": {"dpo.beta": [0.1, 0.2]}}}
    path = pipeline_file(stages=seeded)
    write_recipe(path, {**yaml.safe_load(path.read_text()), "seeds": [1, 2]})
    for override, why in (("dpo:dpo.beta=0.5", "dpo sweeps dpo.beta"), ("seed=3", "dpo runs once per seed")):
        code, _, err = cli("pipeline", path, "--dry-run", "--set", override)
        assert code == 1 and why in err, err
    assert "is wired to another stage" in refused({"sft": sft, "dpo": {"recipe": "dpo.yaml", "inputs": {"model.name_or_path": "sft"}, "sweep": {"model.name_or_path": ["a"]}}})


def test_only_needs_complete_inputs(tmp_path, cli, pipeline_file):
    code, _, err = cli("pipeline", pipeline_file(), "--only", "dpo")
    assert code == 1 and "its input sft is not complete" in err


def test_bad_pipelines(tmp_path, cli, pipeline_file):
    cycle = {"sft": {"recipe": "sft.yaml", "inputs": {"model.name_or_path": "dpo"}}, "dpo": {"recipe": "dpo.yaml", "inputs": {"model.name_or_path": "sft"}}}
    code, _, err = cli("pipeline", pipeline_file(stages=cycle))
    assert code == 1 and "cycle among: sft, dpo" in err
    code, _, err = cli("pipeline", pipeline_file(stages={"sft": {"recipe": "missing.yaml"}}))
    assert code == 1 and "stages.sft.recipe" in err and "does not exist" in err
    code, _, err = cli("pipeline", pipeline_file(stages={"sfft": {"recipe": "sft.yaml"}}))
    assert code == 1 and "unknown stage 'sfft'" in err
    code, _, err = cli("pipeline", pipeline_file(stages={"dpo.v2": {"stage": "dpo", "recipe": "dpo.yaml"}}))
    assert code == 1 and "cannot hold a dot" in err
    code, _, err = cli("pipeline", pipeline_file(stages={"dpo": {"recipe": "dpo.yaml", "inputs": {"model.name_or_path": "nobody"}}}))
    assert code == 1 and "no stage named 'nobody'" in err
    assert not (tmp_path / "runs").exists()  # nothing ran


DEMO_POLICIES = {"sft", "ppo", "ppo-overoptimised", "ppo-gt", "dpo-beta-0.03", "dpo-beta-0.1", "dpo-beta-0.3", "rloo", "simpo", "online-dpo"}


def test_the_demo_pipeline_runs_end_to_end_under_smoke(tmp_path, cli):
    """make demo's whole story, capped: every stage of both paths, then the comparison."""
    code, out, err = cli("pipeline", REPO / "recipes/demo/pipeline.yaml", "--smoke", "--run-dir", tmp_path / "demo")
    assert code == 0, err
    report = json.loads((tmp_path / "demo-smoke" / "compare" / "report.json").read_text())
    assert set(report["policies"]) == DEMO_POLICIES
    assert report["policies"]["ppo"]["seeds"] == report["policies"]["dpo-beta-0.1"]["seeds"] == 2  # --smoke keeps two of the seeds
    assert report["policies"]["ppo"]["judge"]["over"] == "seeds" and report["ceiling"]["n"] == 100
    assert report["methods"] == {"dpo": ["dpo-beta-0.03", "dpo-beta-0.1", "dpo-beta-0.3"]}
    assert all(path["same_evaluation"] for name, paths in report["trajectories"].items() if name != "sft" for path in paths)  # capped alike
    readme = tmp_path / "README.md"  # what make demo writes into the README, from this run
    readme.write_text("# x\n<!-- demo results: written by make demo (scripts/demo_readme.py) -->\nold\n<!-- end of demo results -->\nrest\n")
    done = subprocess.run([sys.executable, REPO / "scripts" / "demo_readme.py", tmp_path / "demo-smoke", readme, tmp_path], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    written = readme.read_text()
    assert "old" not in written and "| ppo | 2 |" in written and written.endswith("<!-- end of demo results -->\nrest\n")
    assert (tmp_path / "demo-frontier.png").read_bytes().startswith(b"\x89PNG")
    assert set(report["costs"]) == {"rlhf", "dpo", "rloo", "simpo", "online-dpo"} and all(c["flops"] > 0 for c in report["costs"].values())
    assert report["costs"]["rloo"]["models"] == ["policy", "reference", "reward model"] and report["costs"]["simpo"]["models"] == ["policy"]
    online, offline = report["costs"]["online-dpo"], report["costs"]["dpo"]
    assert online["samples"] > 0 == offline["samples"] and online["flops"] > offline["flops"]  # it samples its own pairs, every round
    assert report["policies"]["online-dpo"]["seeds"] == 2
    assert "report:" in out


@pytest.mark.slow
def test_the_demo_pipeline_is_deterministic(tmp_path, cli):
    """Two runs of the (smoke) demo give the same comparison to the last digit: every policy's scores, KL,
    win rate and samples (what a refactoring must keep bit-for-bit)."""
    reports = []
    for name in ("first", "second"):
        assert cli("pipeline", REPO / "recipes/demo/pipeline.yaml", "--smoke", "--run-dir", tmp_path / name)[0] == 0
        reports.append(json.loads((tmp_path / f"{name}-smoke" / "compare" / "report.json").read_text())["policies"])
    assert reports[0] == reports[1]


@pytest.mark.slow  # the whole demo twice over (two processes): CI runs it with the slow tests
def test_the_demo_pipeline_runs_on_two_processes(tmp_path):
    """Every stage, unchanged, under torchrun: each stage waits until the main process has written its
    outputs before the next reads them, and only the main process prints."""
    done = torchrun("pipeline", REPO / "recipes/demo/pipeline.yaml", "--smoke", "--run-dir", tmp_path / "demo")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "demo-smoke" / "compare" / "report.json").read_text())
    assert set(report["policies"]) == DEMO_POLICIES
    assert done.stdout.count("compare · completed") == 1 and done.stderr.count("note: pipeline: compare") == 1  # the main process speaks
    for stage in ("pretrain", "sft", "rm", "ppo-seed1", "dpo-beta-0.1-seed2"):
        assert json.loads((tmp_path / "demo-smoke" / stage / "summary.json").read_text())["device"].startswith("2 processes"), stage


def test_command_line_overrides_reach_every_stage_or_the_named_one():
    from dpo_cli.core.errors import UserError
    from dpo_cli.pipeline import split_overrides

    kinds = {"sft": "sft", "dpo": "dpo", "compare": "compare"}
    split = split_overrides(["train.log_every=5", "sft:data.train=a.jsonl", "dpo:dpo.beta=0.2", "data.eval=x:y"], kinds)
    assert split == {
        "sft": ["train.log_every=5", "data.train=a.jsonl", "data.eval=x:y"],
        "dpo": ["train.log_every=5", "dpo.beta=0.2", "data.eval=x:y"],
        "compare": ["data.eval=x:y"],  # compare has no train section
    }
    with pytest.raises(UserError, match="--set ppo:ppo.kl_coef=1: no stage 'ppo' in the pipeline; stages: sft, dpo, compare"):
        split_overrides(["ppo:ppo.kl_coef=1"], kinds)
    with pytest.raises(UserError, match="no stage of this pipeline has a 'ppo' section"):
        split_overrides(["ppo.kl_coef=1"], kinds)


def test_a_command_line_override_of_a_wired_input_must_name_its_stage(tmp_path, cli):
    code, _, err = cli("pipeline", REPO / "recipes" / "demo" / "pipeline.yaml", "--dry-run", "--run-dir", tmp_path, "--set", "model.name_or_path=x")
    assert code == 1 and "model.name_or_path is another stage's output" in err and "--set STAGE:model.name_or_path=x" in err
    code, _, err = cli("pipeline", REPO / "recipes" / "demo" / "pipeline.yaml", "--dry-run", "--run-dir", tmp_path, "--set", "train.lerning_rate=1")
    assert code == 1 and "lerning_rate" in err and not (tmp_path / "sft").exists()  # a bad key fails before anything runs


def online_stages(tmp_path, rounds: dict) -> dict:
    """sft, offline pairs (imported), and an online dpo stage whose rounds sample with the length judge."""
    write_recipe(tmp_path / "collect.yaml", {
        "stage": "collect-prefs", "model": {"name_or_path": "placeholder"}, "data": {"train": "demo:prompts?n=6", "max_length": 64},
        "generation": {"max_new_tokens": 8, "batch_size": 12}, "collect": {"samples_per_prompt": 2}, "label": {"by": "judge", "judge": "length"},
    })  # fmt: skip
    write_recipe(tmp_path / "import.yaml", {"stage": "collect-prefs", "data": {"train": "prefs.jsonl"}, "collect": {"source": "import"}})
    return {
        "sft": {"recipe": "sft.yaml"},
        "prefs": {"recipe": "import.yaml", "stage": "collect-prefs"},
        "online": {"recipe": "dpo.yaml", "stage": "dpo", "inputs": {"model.name_or_path": "sft"}, "rounds": {"collect": "collect.yaml", **rounds}},
    }


def test_online_rounds_expand_to_collect_and_dpo_runs_each_starting_from_the_last(tmp_path, pipeline_file):
    from dpo_cli.pipeline import load_pipeline, plan

    write_recipe(tmp_path / "compare.yaml", {
        "stage": "compare", "policies": {"sft": "placeholder"}, "data": {"train": "demo:prompts?n=4"}, "judges": {"function": "sentiment"},
    })  # fmt: skip
    stages = online_stages(tmp_path, {"count": 2, "offline": "prefs", "offline_weight": 0.25, "reference": "initial"})
    stages["online"]["per_seed"] = True
    stages["compare"] = {"recipe": "compare.yaml", "inputs": {"policies.online": "online", "costs.online": ["online"]}}
    path = pipeline_file(stages=stages)
    write_recipe(path, {**yaml.safe_load(path.read_text()), "seeds": [1, 2]})
    steps = {step.name: step for step in plan(load_pipeline(path), None, None, smoke=False)}
    runs = tmp_path / "runs"
    seed1 = ["online-seed1-round1-prefs", "online-seed1-round1", "online-seed1-round2-prefs", "online-seed1-round2"]
    assert list(steps) == ["sft", "prefs", *seed1, *(n.replace("seed1", "seed2") for n in seed1), "compare"]
    first, second = steps["online-seed1-round1-prefs"].recipe_object, steps["online-seed1-round2-prefs"].recipe_object
    assert first.model.name_or_path == str(runs / "sft") and second.model.name_or_path == str(runs / "online-seed1-round1")
    assert first.stage == "collect-prefs" and first.seed == 1
    trained = steps["online-seed1-round2"].recipe_object
    assert trained.model.name_or_path == str(runs / "online-seed1-round1") and trained.seed == 1
    assert trained.dpo.ref_model == str(runs / "sft")  # reference: initial
    assert steps["online-seed1-round1"].recipe_object.dpo.ref_model is None  # round 1 starts from it: no second copy
    mixture = [(source.path, source.weight) for source in trained.data.train]
    assert mixture == [(str(runs / "online-seed1-round2-prefs"), 0.75), (str(runs / "prefs"), 0.25)]
    assert set(steps["online-seed1-round2"].inputs) == {"sft", "prefs", "online-seed1-round1", "online-seed1-round2-prefs"}
    compare = steps["compare"].recipe_object
    assert compare.policies == {"sft": "placeholder", "online": [str(runs / "online-seed1-round2"), str(runs / "online-seed2-round2")]}
    assert compare.costs == {"online": [[str(runs / n), str(runs / n.replace("seed1", "seed2"))] for n in seed1]}  # every round counted
    # a --set for every stage reaches the rounds' collect recipe too; the keys the rounds wire are refused
    steps = {step.name: step for step in plan(load_pipeline(path), None, None, smoke=False, extra=["generation.max_new_tokens=5"])}
    assert steps["online-seed2-round2-prefs"].recipe_object.generation.max_new_tokens == 5
    with pytest.raises(Exception, match="data.train is another stage's output"):
        plan(load_pipeline(path), None, None, smoke=False, extra=["data.train=x.jsonl"])
    with pytest.raises(Exception, match="no such stage or run.*runs like it: .*online-seed1-round2"):
        plan(load_pipeline(path), None, "online-round2", smoke=False)


def test_online_dpo_runs_its_rounds_and_resumes_mid_round(tmp_path, cli, pipeline_file, monkeypatch):
    path = pipeline_file(stages=online_stages(tmp_path, {"count": 2}))
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, dpo_cli.stages.dpo, "dpo_loss", 4 + 2)  # round 2, its second step
        code, _, err = cli("pipeline", path)
    assert code == 143, err
    runs = tmp_path / "runs"
    code, out, _ = cli("pipeline", path, "--dry-run")
    assert actions(out) == {"sft": "skip", "prefs": "skip", "online-round1-prefs": "skip", "online-round1": "skip", "online-round2-prefs": "skip", "online-round2": "resume"}
    code, out, err = cli("pipeline", path)
    assert code == 0 and "resuming from" in err, err
    for r in (1, 2):
        assert json.loads((runs / f"online-round{r}" / "summary.json").read_text())["status"] == "completed"
        steps = [m for m in map(json.loads, (runs / f"online-round{r}" / "metrics.jsonl").read_text().splitlines()) if "split" not in m]
        assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"] == 0  # each round learns its own fresh pairs
        assert json.loads((runs / f"online-round{r}-prefs" / "summary.json").read_text())["pairs"] > 0
    assert yaml.safe_load((runs / "online-round2" / "recipe.yaml").read_text())["model"]["name_or_path"] == str(runs / "online-round1")
    assert yaml.safe_load((runs / "online-round2-prefs" / "recipe.yaml").read_text())["model"]["name_or_path"] == str(runs / "online-round1")
    assert len([line for line in (runs / "online-round2" / "metrics.jsonl").read_text().splitlines() if '"split"' not in line]) == 4
    code, _, err = cli("pipeline", path, "--run-dir", tmp_path / "straight")  # the same pipeline, never interrupted
    assert code == 0, err
    for name in ("online-round1", "online-round2"):
        assert_same_run(runs / name, tmp_path / "straight" / name)  # the resume was exact
    pairs = lambda root: [(r["prompt"], r["chosen"], r["rejected"]) for r in map(json.loads, (root / "online-round2-prefs" / "prefs.jsonl").read_text().splitlines())]  # noqa: E731
    assert pairs(runs) == pairs(tmp_path / "straight")


def test_bad_rounds(tmp_path, cli, pipeline_file):
    stages = online_stages(tmp_path, {"count": 2})
    collect = yaml.safe_load((tmp_path / "collect.yaml").read_text())
    write_recipe(tmp_path / "thumbs.yaml", {**collect, "collect": {"mode": "thumbs", "samples_per_prompt": 2}})
    for change, message in [
        (lambda s: s["online"]["rounds"].update(offline="nowhere"), "stages.online.rounds.offline: no stage named 'nowhere'"),
        (lambda s: s["online"].update(stage="sft", recipe="sft.yaml"), "rounds are online DPO; online is a sft stage"),
        (lambda s: s["online"].update(inputs={}), "wire the starting policy with inputs"),
        (lambda s: s["online"]["rounds"].update(collect="missing.yaml"), "rounds.collect: "),
        (lambda s: s["online"]["rounds"].update(count=0), "stages.online.rounds.count: must be >= 1"),
        (lambda s: s["online"]["inputs"].update({"data.train": "prefs"}), "data.train is set by the rounds"),
        (lambda s: s["prefs"].update(sweep={"collect.import_format": ["trl", "auto"]}) or s["online"]["rounds"].update(offline="prefs"), "rounds read a stage with one run"),
        (lambda s: s["online"]["rounds"].update(collect="thumbs.yaml"), "only dpo.loss: kto trains on"),
        (lambda s: s["online"]["rounds"].update(collect="import.yaml"), "each round samples its policy and labels the samples itself"),
    ]:
        broken = json.loads(json.dumps(stages))
        change(broken)
        code, _, err = cli("pipeline", pipeline_file(stages=broken), "--dry-run")
        assert code == 1 and message in err, err
