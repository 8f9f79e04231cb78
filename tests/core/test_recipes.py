"""Recipe schemas and loading: every shipped recipe validates; bad ones fail naming the key path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from helpers import REPO, write_recipe
from dpo_cli.core.errors import UserError
from dpo_cli.core.recipe_loader import apply_smoke, load_recipe, path_fields, recipe_diff, recipe_to_dict
from dpo_cli.core.recipes import STAGE_SCHEMAS, SftRecipe

SHIPPED = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)  # accelerate/: launch configs (test_distributed)


def minimal(**extra):
    recipe = {"model": {"name_or_path": "Qwen/Qwen2.5-0.5B"}, "data": {"train": "data.jsonl"}}
    recipe.update(extra)
    return recipe


def errors_of(tmp_path: Path, recipe: dict, stage: str = "sft", overrides=()) -> str:
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(UserError) as info:
        load_recipe(path, stage, overrides)
    return str(info.value)


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_every_shipped_recipe_validates(path):
    raw = yaml.safe_load(path.read_text())
    if "stages" in raw:  # a pipeline file: every stage's recipe resolves with the pipeline's overrides
        from dpo_cli.pipeline import load_pipeline, plan

        steps = plan(load_pipeline(path), None, None, smoke=True)
        for step in steps:
            load_recipe(step.recipe, step.kind, step.overrides, smoke=True)
        return
    stage = raw.get("stage") or path.stem
    if stage not in STAGE_SCHEMAS:
        pytest.skip(f"{stage} is not implemented yet")
    recipe = load_recipe(path, stage)
    assert recipe.stage == stage
    smoke = load_recipe(path, stage, smoke=True)
    assert smoke.data.max_rows <= 32 and smoke.generation.max_new_tokens <= 16
    if hasattr(smoke, "train"):
        assert smoke.train.max_steps <= 3


def test_shipped_recipes_exist():
    names = {str(p.relative_to(REPO / "recipes")) for p in SHIPPED}
    assert {"demo/pretrain.yaml", "demo/sft.yaml"} <= names
    assert any("qlora" in n for n in names), "a 4-bit real-model recipe is shipped"


def test_defaults_are_filled_in(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", minimal()), "sft")
    assert recipe.train.learning_rate == 5e-5
    assert recipe.model.trust_remote_code is False
    assert recipe.model.lora is None and recipe.model.quantization is None
    assert recipe.seed == 42


def test_wrong_type_names_key_path_and_value(tmp_path):
    message = errors_of(tmp_path, minimal(train={"learning_rate": "fast"}))
    assert "train.learning_rate: expected a number, got 'fast'" in message


def test_unknown_key_suggests_the_right_one(tmp_path):
    message = errors_of(tmp_path, minimal(train={"lerning_rate": 1e-4}))
    assert "train.lerning_rate: unknown key; did you mean 'learning_rate'?" in message
    message = errors_of(tmp_path, minimal(modle={}))
    assert "modle: unknown key; did you mean 'model'?" in message


def test_every_error_is_reported_at_once(tmp_path):
    message = errors_of(tmp_path, minimal(train={"batch_size": 0, "lr_scheduler": "cosin", "max_grad_norm": "x"}))
    assert "3 recipe errors" in message
    assert "train.batch_size: must be >= 1, got 0" in message
    assert "train.lr_scheduler: expected one of 'constant', 'linear', 'cosine', 'cosine_with_restarts', 'polynomial' or 'warmup_stable_decay', got 'cosin'" in message
    assert "train.max_grad_norm: expected a number, got 'x'" in message


def test_missing_required_section(tmp_path):
    message = errors_of(tmp_path, {"model": {"name_or_path": "x/y"}})
    assert "data: required key is missing" in message


def test_cross_field_rules(tmp_path):
    assert "not both" in errors_of(tmp_path, minimal(train={"max_steps": 3, "epochs": 1}))
    assert "exactly one of model.name_or_path" in errors_of(tmp_path, {"model": {}, "data": {"train": "x.jsonl"}})
    quant_without_lora = minimal(model={"name_or_path": "x/y", "quantization": {"load_in_4bit": True}})
    assert "add model.lora" in errors_of(tmp_path, quant_without_lora)
    new_model_no_tokenizer = {"model": {"init": {"hidden_size": 64}}, "data": {"train": "t.txt"}}
    assert "needs a tokenizer" in errors_of(tmp_path, new_model_no_tokenizer, stage="pretrain")
    new_model_with_lora = {"model": {"init": {"hidden_size": 64}, "lora": {"r": 4}}, "tokenizer": {"train_vocab_size": 300}, "data": {"train": "t.txt"}}
    assert "LoRA needs pretrained weights" in errors_of(tmp_path, new_model_with_lora, stage="pretrain")


def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name_or_path: x\n data: [\n")
    with pytest.raises(UserError, match=r"bad\.yaml:3:\d+: malformed YAML"):
        load_recipe(path, "sft")


def test_missing_recipe_and_empty_recipe(tmp_path):
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml", "sft")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(UserError, match="the recipe is empty"):
        load_recipe(tmp_path / "empty.yaml", "sft")


def test_stage_mismatch_is_refused(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", minimal(stage="pretrain"))
    with pytest.raises(UserError, match="says `stage: pretrain`"):
        load_recipe(path, "sft")


def test_relative_paths_resolve_against_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes" / "mine"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text("{}\n")
    (tmp_path / "local-model").mkdir()
    recipe = minimal(run_dir="../../runs/x", model={"name_or_path": "../../local-model"}, data={"train": "data/train.jsonl"})
    monkeypatch.chdir(tmp_path.parent)
    loaded = load_recipe(write_recipe(folder / "sft.yaml", recipe), "sft")
    assert loaded.data.train == str(folder / "data" / "train.jsonl")
    assert loaded.model.name_or_path == str(tmp_path / "local-model")
    assert loaded.run_dir == str(tmp_path / "runs" / "x")


def test_hub_ids_and_demo_sources_are_left_alone(tmp_path):
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", minimal(data={"train": "demo:sft"})), "sft")
    assert loaded.model.name_or_path == "Qwen/Qwen2.5-0.5B"
    assert loaded.data.train == "demo:sft"
    assert ("data", "train") in path_fields(SftRecipe) and ("run_dir",) in path_fields(SftRecipe)


def test_overrides_parse_yaml_scalars_and_switch_sections_on(tmp_path, monkeypatch):
    path = write_recipe(tmp_path / "r.yaml", minimal())
    monkeypatch.chdir(tmp_path)
    loaded = load_recipe(
        path,
        "sft",
        ["train.learning_rate=1e-4", "model.lora.r=8", "model.quantization.load_in_4bit=true", "train.max_grad_norm=null", "data.train=other.jsonl"],
    )
    assert loaded.train.learning_rate == 1e-4
    assert loaded.model.lora.r == 8 and loaded.model.lora.alpha == 32.0  # other LoRA keys take defaults
    assert loaded.model.quantization.quant_type == "nf4"
    assert loaded.train.max_grad_norm is None
    assert loaded.data.train == str(tmp_path / "other.jsonl")  # command-line paths are relative to cwd
    assert load_recipe(path, "sft", ["model.lora=true"]).model.lora.r == 16


def test_bad_overrides(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", minimal(seed=3))
    with pytest.raises(UserError, match="expected key.sub=value"):
        load_recipe(path, "sft", ["train.learning_rate"])
    with pytest.raises(UserError, match="`seed` is a value"):
        load_recipe(path, "sft", ["seed.x=1"])
    assert "train.lerning_rate: unknown key" in errors_of(tmp_path, minimal(), overrides=["train.lerning_rate=1"])


def test_smoke_caps_steps_rows_and_lengths():
    raw = {"train": {"epochs": 3, "batch_size": 64}, "data": {"max_length": 4096}, "sft": {"show_samples": 5}}
    apply_smoke(raw, SftRecipe)
    assert raw["train"]["max_steps"] == 3 and "epochs" not in raw["train"]
    assert raw["train"]["batch_size"] == 4 and "grad_accum" not in raw["train"]  # a default of 1 is already small
    assert raw["data"] == {"max_length": 128, "max_rows": 32, "max_eval_rows": 8}
    assert raw["sft"]["show_samples"] == 2
    assert raw["generation"]["max_new_tokens"] == 16


def test_recipe_diff_names_changed_keys_and_ignores_logging(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", minimal())
    old = recipe_to_dict(load_recipe(path, "sft"))
    new = recipe_to_dict(load_recipe(path, "sft", ["train.learning_rate=1e-3", "train.log_every=1"]))
    assert recipe_diff(old, new) == ["train.learning_rate: 5.0e-05 -> 0.001"]


def test_json_schema_has_every_section():
    schema = SftRecipe.model_json_schema()
    assert {"model", "data", "train", "tokenizer", "generation", "sft"} <= set(schema["properties"])
    assert schema["$defs"]["TrainSection"]["additionalProperties"] is False


def _field_paths(model, prefix=""):
    from dpo_cli.core.recipe_loader import _section_class

    for name, field in model.model_fields.items():
        section = _section_class(field.annotation)
        if section is None:
            yield f"{prefix}{name}"
        else:
            yield from _field_paths(section, f"{prefix}{name}.")


def test_docs_cover_every_recipe_key():
    docs = (REPO / "docs" / "recipes.md").read_text()
    documented = set(re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+|[a-z_]+)`", docs))
    for schema in STAGE_SCHEMAS.values():
        for key in _field_paths(schema):
            assert key in documented, f"docs/recipes.md does not document `{key}`"


def test_dpo_recipe_errors(tmp_path):
    assert "dpo.beta: must be > 0.0, got 0" in errors_of(tmp_path, minimal(dpo={"beta": 0}), stage="dpo")
    assert "dpo.loss: expected one of 'sigmoid', 'ipo', 'hinge', 'robust', 'simpo', 'orpo' or 'kto', got 'dro'" in errors_of(tmp_path, minimal(dpo={"loss": "dro"}), stage="dpo")
    assert "applies to the sigmoid, robust and simpo losses" in errors_of(tmp_path, minimal(dpo={"loss": "hinge", "label_smoothing": 0.1}), stage="dpo")
    long_prompt = minimal(dpo={"max_prompt_length": 600}, data={"train": "d.jsonl", "max_length": 512})
    assert "dpo.max_prompt_length must be below data.max_length" in errors_of(tmp_path, long_prompt, stage="dpo")


@pytest.mark.parametrize(
    "stage, section, old_key, new_key",
    [("collect-prefs", "label", "judge", "python"), ("rm-train", "rm", "correlate_with", "correlate_with_python")],
)
def test_a_run_saved_with_user_code_in_a_judge_key_resumes_with_the_code_in_its_python_key(tmp_path, stage, section, old_key, new_key):
    """Older versions took `label.judge: mod:fn`; a run dir holding such a recipe is the same recipe as one that
    names the function in the key that says it runs code (now the only way to write it)."""
    from dpo_cli.core.recipe_loader import with_current_defaults

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", minimal(**{section: {new_key: "myjudges:score"}})), stage)
    saved = recipe_to_dict(recipe)
    saved[section] = {**{k: v for k, v in saved[section].items() if k not in (old_key, new_key)}, old_key: "myjudges:score"}
    assert recipe_diff(saved, recipe_to_dict(recipe)) != []  # read as it was saved, it differs
    assert recipe_diff(with_current_defaults(saved, type(recipe)), recipe_to_dict(recipe)) == []
