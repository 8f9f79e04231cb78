"""The shipped real-model recipes, run for real at tiny size, chained as their users run them.

Each recipe under recipes/qwen2.5-0.5b/ and recipes/llama-3.1-8b/ runs unchanged under --smoke, with only
where the weights and the data come from pointed at local stand-ins: a tiny model of the same architecture
(tests/model_zoo.py) and a few rows written as the hub datasets the recipes name lay them out. Then each
family's pipeline file runs both paths and the comparison the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from helpers import REPO, chat_preference_rows, chat_sft_rows

FAMILIES = {
    "qwen2.5-0.5b": {
        "zoo": "qwen2",
        "tokenizer_from_hub": False,
        "recipes": {"sft": "sft.yaml", "rm-train": "rm-train.yaml", "ppo": "ppo.yaml", "dpo": "dpo.yaml", "compare": "compare.yaml",
                    "pretrain": "pretrain.yaml"},  # fmt: skip
        "pipeline_stages": {"sft": "sft", "rm": "rm-train", "ppo": "ppo", "dpo": "dpo", "compare": "compare"},
    },
    "llama-3.1-8b": {
        "zoo": "llama3",
        "tokenizer_from_hub": True,  # the recipes take the Instruct model's tokenizer (its chat template)
        "recipes": {"sft": "sft-qlora.yaml", "rm-train": "rm-train-qlora.yaml", "ppo": "ppo-qlora.yaml", "dpo": "dpo-qlora.yaml",
                    "compare": "compare.yaml"},  # fmt: skip
        "pipeline_stages": {"sft-qlora": "sft", "rm-qlora": "rm-train", "ppo-qlora": "ppo", "dpo-qlora": "dpo", "compare": "compare"},
    },
}


@pytest.fixture(scope="module")
def hub_data(tmp_path_factory) -> dict[str, str]:
    """Parquet files laid out as the datasets the recipes name: trl-lib/Capybara (messages),
    trl-lib/ultrafeedback_binarized (implicit-prompt conversations with scores), trl-lib/ultrafeedback-prompt
    (conversational prompts), Salesforce/wikitext (text lines, blank ones included)."""
    folder = tmp_path_factory.mktemp("hub-data")
    pairs = [{**row, "chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"], "score_chosen": 8.0,
              "score_rejected": 3.5} for row in chat_preference_rows(48)]  # fmt: skip
    for row in pairs:
        del row["prompt"]
    tables = {
        "capybara": [{"source": "Airoboros", **row} for row in chat_sft_rows(48)],
        "ultrafeedback-train": pairs[:40],
        "ultrafeedback-test": pairs[40:],
        "prompts-train": [{"prompt": row["messages"][-2:-1]} for row in chat_sft_rows(40, seed=1)],
        "prompts-test": [{"prompt": row["messages"][-2:-1]} for row in chat_sft_rows(8, seed=2)],
        "wikitext-train": [{"text": t} for row in chat_sft_rows(40) for t in ("", f" {row['messages'][-1]['content']} \n")],
        "wikitext-validation": [{"text": t} for row in chat_sft_rows(8, seed=3) for t in ("", f" {row['messages'][-1]['content']} \n")],
    }
    paths = {}
    for name, rows in tables.items():
        paths[name] = str(folder / f"{name}.parquet")
        datasets.Dataset.from_list(rows).to_parquet(paths[name])
    return paths


def model_overrides(family: dict, model: str, stage: str) -> list[str]:
    overrides = [f"model.name_or_path={model}"]
    if family["tokenizer_from_hub"] and stage in ("sft", "rm-train"):
        overrides.append(f"tokenizer.name_or_path={model}")
    return overrides


def data_overrides(stage: str, data: dict[str, str]) -> list[str]:
    return {
        "sft": [f"data.train={data['capybara']}"],
        "pretrain": [f"data.train={data['wikitext-train']}", f"data.eval={data['wikitext-validation']}"],
        "rm-train": [f"data.train={data['ultrafeedback-train']}", f"data.eval={data['ultrafeedback-test']}"],
        "dpo": [f"data.train={data['ultrafeedback-train']}", f"data.eval={data['ultrafeedback-test']}"],
        "ppo": [f"data.train={data['prompts-train']}"],
        "compare": [f"data.train={data['prompts-test']}"],
    }[stage]


def with_set(overrides: list[str], stage: str | None = None) -> list[str]:
    return [part for override in overrides for part in ("--set", f"{stage}:{override}" if stage else override)]


@pytest.mark.parametrize("name", FAMILIES)
def test_the_shipped_recipes_run_chained_as_their_users_run_them(name, tmp_path, cli, zoo, hub_data):
    family, recipes = FAMILIES[name], REPO / "recipes" / name
    model = str(zoo(family["zoo"]))

    def run(stage: str, *overrides: str) -> Path:
        run_dir = tmp_path / stage
        code, _, err = cli(stage, recipes / family["recipes"][stage], "--smoke", "--run-dir", run_dir, *with_set(list(overrides)))
        assert code == 0, f"{stage}: {err}"
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
        return run_dir

    def trained(stage: str, base: str) -> Path:
        return run(stage, *model_overrides(family, base, stage), *data_overrides(stage, hub_data))

    if "pretrain" in family["recipes"]:
        trained("pretrain", model)
    sft = trained("sft", model)
    rm = trained("rm-train", model)
    ppo = run("ppo", *model_overrides(family, str(sft), "ppo"), f"ppo.reward_model={rm}", *data_overrides("ppo", hub_data))
    dpo = trained("dpo", str(sft))
    compare = run(
        "compare", f"policies.sft={sft}", f"policies.ppo={ppo}", f"policies.dpo={dpo}", f"judges.reward_model={rm}",
        f"costs.rlhf=[{rm}, {ppo}]", f"costs.dpo=[{dpo}]", *data_overrides("compare", hub_data),
    )  # fmt: skip
    report = json.loads((compare / "report.json").read_text())
    assert set(report["policies"]) == {"sft", "ppo", "dpo"}


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_the_family_pipeline_runs_both_paths_and_the_comparison(name, tmp_path, cli, zoo, hub_data):
    family = FAMILIES[name]
    model = str(zoo(family["zoo"]))
    overrides: list[str] = []
    for stage_name, stage in family["pipeline_stages"].items():
        if stage in ("sft", "rm-train"):
            overrides += with_set(model_overrides(family, model, stage), stage_name)
        overrides += with_set(data_overrides(stage, hub_data), stage_name)
    code, out, err = cli("pipeline", REPO / "recipes" / name / "pipeline.yaml", "--smoke", "--run-dir", tmp_path / "runs", *overrides)
    assert code == 0, err
    assert (tmp_path / "runs-smoke" / "compare" / "report.md").is_file()  # --smoke runs in RUN_DIR-smoke
