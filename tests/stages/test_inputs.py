"""Every stage from every kind of model input, in every model mode, on real-architecture chat models.

Input kinds: a hub-style model folder, a dpo-cli full run, a LoRA run, a 4-bit LoRA run, a TRL trainer's
output folder and a plain PEFT adapter folder (no tokenizer of its own). Modes: full weights, LoRA, 4-bit
+ LoRA. A covering subset runs in `make test`; the whole product in `make test-all` (tiny models, inputs built once).
Outputs must load with plain transformers/peft and name the chat's end of turn as a stop token.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

from helpers import model_modes, chat_preference_rows, chat_sft_rows, read_jsonl, write_jsonl, write_recipe
from model_zoo import FAMILIES

MODES = model_modes(dropout=0.0)
KINDS = ("hub", "full-run", "lora-run", "qlora-run", "trl-output", "peft-adapter")
STAGES = ("sft", "pretrain", "dpo", "rm-train", "ppo", "collect-prefs")


def invoke(*args) -> tuple[int, str]:
    """The CLI in-process (for module-scoped fixtures, where the function-scoped `cli` fixture cannot go)."""
    from typer.testing import CliRunner

    from dpo_cli.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stderr


def stage_recipe(folder: Path, stage: str, model: dict, reward_model: Path | None = None) -> Path:
    """A few steps of `stage` on chat data (text for pretrain), with `model` as the model section."""
    data = folder / "data"
    write_jsonl(data / "chat.jsonl", chat_sft_rows(16))
    write_jsonl(data / "prefs.jsonl", chat_preference_rows(16))
    write_jsonl(data / "text.jsonl", [{"text": row["messages"][-1]["content"]} for row in chat_sft_rows(32)])
    recipe: dict = {
        "stage": stage,
        "seed": 5,
        "model": model,
        "data": {"train": str(data / {"sft": "chat.jsonl", "pretrain": "text.jsonl"}.get(stage, "prefs.jsonl")), "max_length": 96},
        "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "log_every": 1, "save_every": 10},
        "generation": {"max_new_tokens": 6},
    }
    if stage == "ppo":
        recipe["data"]["train"] = str(data / "chat.jsonl")  # conversations: the prompt is what comes before the answer
        recipe["ppo"] = {"reward_model": str(reward_model), "mini_batch_size": 2, "ppo_epochs": 1}
    if stage == "collect-prefs":
        del recipe["train"]
        recipe["data"]["train"] = str(data / "chat.jsonl")
        recipe["data"]["max_rows"] = 4
        recipe["collect"] = {"samples_per_prompt": 2}
        recipe["label"] = {"by": "reward-model", "reward_model": str(reward_model)}
    return write_recipe(folder / f"{stage}.yaml", recipe)


def make_trl_output(base: Path, folder: Path) -> Path:
    """What TRL's SFTTrainer leaves in output_dir after a LoRA run: adapter, tokenizer, checkpoint-N/, args."""
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = datasets.Dataset.from_list(chat_sft_rows(8))
    args = SFTConfig(output_dir=str(folder), max_steps=1, per_device_train_batch_size=4, save_steps=1, report_to=[], use_cpu=True,
                     max_length=96, logging_steps=1, disable_tqdm=True)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(base)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=AutoTokenizer.from_pretrained(base),
                         peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))  # fmt: skip
    trainer.train()
    trainer.save_model(str(folder))
    return folder


def make_peft_adapter(base: Path, folder: Path) -> Path:
    """A bare PEFT adapter as `save_pretrained` writes it: trained-looking B matrices, no tokenizer."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, zoo):
    """inputs(kind) -> a model input of that kind on the tiny Qwen2 (ChatML, EOS != end of turn), built once."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind in built:
            return built[kind]
        base = zoo("qwen2")
        folder = tmp_path_factory.mktemp(kind)
        if kind == "hub":
            built[kind] = base
        elif kind in ("full-run", "lora-run", "qlora-run"):
            mode = {"full-run": "full", "lora-run": "lora", "qlora-run": "qlora"}[kind]
            code, err = invoke("sft", stage_recipe(folder, "sft", {"name_or_path": str(base), **MODES[mode]}), "--run-dir", folder / "run")
            assert code == 0, err
            built[kind] = folder / "run"
        elif kind == "trl-output":
            built[kind] = make_trl_output(base, folder / "out")
        else:
            built[kind] = make_peft_adapter(base, folder / "adapter")
        return built[kind]

    return get


def meaningful(stage: str, mode: str) -> bool:
    """ppo with full weights is its separate-models mode; collect-prefs samples without training (no LoRA)."""
    if stage == "collect-prefs":
        return mode != "lora"
    return True


# Every meaningful combination; a covering subset (each stage, kind and mode, and every bug of issue 11) runs in
# `make test`, the rest (about a minute more) in `make test-all`.
FAST = {
    ("sft", "lora-run", "full"), ("sft", "hub", "qlora"), ("sft", "trl-output", "lora"), ("sft", "peft-adapter", "full"),
    ("pretrain", "hub", "lora"), ("pretrain", "qlora-run", "full"),
    ("dpo", "lora-run", "lora"), ("dpo", "qlora-run", "qlora"), ("dpo", "full-run", "lora"), ("dpo", "peft-adapter", "lora"),
    ("rm-train", "lora-run", "full"), ("rm-train", "lora-run", "lora"), ("rm-train", "qlora-run", "qlora"), ("rm-train", "hub", "qlora"),
    ("ppo", "lora-run", "lora"), ("ppo", "lora-run", "full"), ("ppo", "qlora-run", "qlora"), ("ppo", "trl-output", "lora"),
    ("collect-prefs", "qlora-run", "full"), ("collect-prefs", "peft-adapter", "qlora"),
}  # fmt: skip
MATRIX = [
    pytest.param(stage, kind, mode, marks=() if (stage, kind, mode) in FAST else pytest.mark.slow)
    for stage, kind, mode in itertools.product(STAGES, KINDS, MODES)
    if meaningful(stage, mode)
]


def stop_ids(final: Path) -> list[int]:
    stops = GenerationConfig.from_pretrained(final).eos_token_id
    return stops if isinstance(stops, list) else [stops]


def end_of_turn_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(FAMILIES["qwen2"].end_of_turn)


def check_final(final: Path, stage: str) -> None:
    """final/ loads with transformers/peft alone, and its generation config stops at the end of the turn."""
    tokenizer = AutoTokenizer.from_pretrained(final)
    if stage == "rm-train":
        if (final / "adapter_config.json").exists():
            from peft import AutoPeftModelForSequenceClassification

            model = AutoPeftModelForSequenceClassification.from_pretrained(final, num_labels=1)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(final)
        ids = tokenizer(["a fine film", "dull"], return_tensors="pt", padding=True)  # a padded batch needs the pad id
        assert model(**ids).logits.shape == (2, 1)
        return
    if (final / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(final)
    else:
        model = AutoModelForCausalLM.from_pretrained(final)
        assert end_of_turn_id(tokenizer) in model.generation_config.eos_token_id  # transformers' own generate stops there
    stops = stop_ids(final)
    assert end_of_turn_id(tokenizer) in stops and tokenizer.eos_token_id in stops
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False, generation_config=GenerationConfig.from_pretrained(final))
    assert out.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.parametrize("stage, kind, mode", MATRIX)
def test_stage_from_input(stage, kind, mode, tmp_path, cli, inputs, zoo):
    model = {"name_or_path": str(inputs(kind)), **MODES[mode]}
    if stage == "ppo" and mode == "full":
        model["lora"] = None  # separate models: policy, frozen reference, critic
    recipe = stage_recipe(tmp_path, stage, model, reward_model=zoo("rm"))
    code, _, err = cli(stage, recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    if stage == "collect-prefs":
        assert len(read_jsonl(tmp_path / "run" / "prefs.jsonl")) >= 1
        return
    assert summary["steps"] == 2 and summary["parameters"]["trainable"] > 0
    check_final(tmp_path / "run" / "final", stage)


def test_a_lora_run_on_an_adapter_input_is_saved_merged_and_moves_with_its_run_dir(tmp_path, cli, inputs):
    """The base of a LoRA trained on another run's adapter exists only in the run dir (RUN/base): final/ holds
    the merged model, so the run dir can be moved or copied and final/ still loads, and matches the adapter."""
    recipe = stage_recipe(tmp_path, "dpo", {"name_or_path": str(inputs("lora-run")), **MODES["lora"]})
    code, _, err = cli("dpo", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    final = tmp_path / "run" / "final"
    assert not (final / "adapter_config.json").exists() and (final / "model.safetensors").exists()
    assert not (tmp_path / "run" / "base").exists()  # merged into final/, the cache of the base is removed
    shutil.move(tmp_path / "run", tmp_path / "moved")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moved" / "final")
    assert "dpo-cli" not in json.dumps(model.config.to_dict())  # a plain config: no path of this machine in it


def test_full_training_from_a_lora_run_trains_every_weight(tmp_path, cli, inputs):
    """Merged from an adapter (which peft loads frozen), the weights must train: every parameter changes."""
    recipe = stage_recipe(tmp_path, "sft", {"name_or_path": str(inputs("lora-run"))})
    code, _, err = cli("sft", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["parameters"]["trainable"] == summary["parameters"]["total"]


def test_a_reward_model_with_its_own_vocabulary_scores_chat_prompts(tmp_path, cli, zoo):
    """A classifier RM without a chat template reads conversations as HH transcripts (ppo and score)."""
    from dpo_cli.data.encoding import plain_transcript
    from dpo_cli.eval.judges import RewardModelJudge
    from dpo_cli.models.io import load_reward_model

    model, tokenizer = load_reward_model(str(zoo("rm")), torch.device("cpu"))
    judge = RewardModelJudge("rm", model, tokenizer, 4, torch.device("cpu"), 256)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert plain_transcript(conversation) == "\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant:"
    as_text = judge.score(["\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant:"], [" Hello there"]).values
    assert judge.score([conversation], ["Hello there"]).values == pytest.approx(as_text)


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_other_families_sft_then_dpo_on_lora(family, tmp_path, cli, zoo):
    """Llama 3 (BOS from tokenizer and template, <|eot_id|>, no pad) and Mistral ([INST], no pad): LoRA SFT on
    chat data, then DPO from that run; the tokenised sequences carry exactly one BOS."""
    from dpo_cli.data.encoding import encode_conversation

    tokenizer = AutoTokenizer.from_pretrained(zoo(family))
    ids, _ = encode_conversation(tokenizer, chat_sft_rows(1)[0]["messages"], None)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    sft = stage_recipe(tmp_path / "sft", "sft", {"name_or_path": str(zoo(family)), **MODES["lora"]})
    assert cli("sft", sft, "--run-dir", tmp_path / "sft-run")[0] == 0
    dpo = stage_recipe(tmp_path / "dpo", "dpo", {"name_or_path": str(tmp_path / "sft-run"), **MODES["lora"]})
    code, _, err = cli("dpo", dpo, "--run-dir", tmp_path / "dpo-run")
    assert code == 0, err
    final = tmp_path / "dpo-run" / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.convert_tokens_to_ids(FAMILIES[family].end_of_turn) in stop_ids(final)


def test_a_plain_text_pair_starts_with_the_tokenizers_bos(zoo):
    """Plain-text preference pairs are tokenised with the tokenizer's own special tokens, as sft trains and
    generation prompts are (TRL's DPOTrainer does the same): one BOS for Llama 3, none for Qwen2."""
    from dpo_cli.data.preference_pairs import sequence_ids

    llama = AutoTokenizer.from_pretrained(zoo("llama3"))
    ids, start = sequence_ids(llama, "A fine", " film")
    assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1 and ids[-1] == llama.eos_token_id
    assert ids[:start] == llama("A fine")["input_ids"]
    qwen = AutoTokenizer.from_pretrained(zoo("qwen2"))
    ids, _ = sequence_ids(qwen, "A fine", " film")
    assert ids == qwen("A fine film")["input_ids"] + [qwen.eos_token_id]


@pytest.mark.parametrize(
    "stage, source, expected",
    [
        ("dpo", "rm", "is a reward model (GPTNeoXForSequenceClassification), not a policy"),
        ("sft", "rm-run", "is a reward model's adapter (SEQ_CLS), not a policy"),
    ],
)
def test_a_reward_model_is_refused_as_a_policy(stage, source, expected, tmp_path, cli, zoo, inputs):
    if source == "rm":
        where = zoo("rm")
    else:
        rm = stage_recipe(tmp_path / "rm", "rm-train", {"name_or_path": str(zoo("qwen2")), **MODES["lora"]})
        assert cli("rm-train", rm, "--run-dir", tmp_path / "rm-run")[0] == 0
        where = tmp_path / "rm-run"
    code, _, err = cli(stage, stage_recipe(tmp_path, stage, {"name_or_path": str(where)}), "--run-dir", tmp_path / "run")
    assert code == 1 and expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before the run dir is touched


@pytest.mark.parametrize("mode", MODES)
def test_score_and_compare_take_reward_models_of_every_mode(mode, tmp_path, cli, zoo, inputs):
    """An rm-train run (full, LoRA, 4-bit LoRA on a LoRA SFT run's body) scores chat rows with `score` and is
    the proxy judge of `compare` over policies of every input kind."""
    rm = stage_recipe(tmp_path / "rm", "rm-train", {"name_or_path": str(inputs("lora-run")), **MODES[mode]})
    assert cli("rm-train", rm, "--run-dir", tmp_path / "rm-run")[0] == 0
    rows = [{"prompt": [{"role": "user", "content": "Review this film."}], "response": text} for text in ("A fine film.", "Dull.")]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    code, _, err = cli("score", tmp_path / "rm-run", "--data", tmp_path / "rows.jsonl", "--out", tmp_path / "scored.jsonl")
    assert code == 0, err
    assert all(isinstance(row["score"], float) for row in read_jsonl(tmp_path / "scored.jsonl"))
    if mode != "qlora":
        return
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": f"Review film {i}."}]} for i in range(4)])
    policies = {kind.replace("-", "_"): str(inputs(kind)) for kind in KINDS}
    compare = write_recipe(tmp_path / "compare.yaml", {
        "stage": "compare", "policies": policies, "data": {"train": str(tmp_path / "prompts.jsonl"), "max_length": 64},
        "generation": {"max_new_tokens": 4, "temperature": 1.0}, "judges": {"function": "length", "reward_model": str(tmp_path / "rm-run")},
    })  # fmt: skip
    code, _, err = cli("compare", compare, "--run-dir", tmp_path / "compare")
    assert code == 0, err
    assert set(json.loads((tmp_path / "compare" / "report.json").read_text())["policies"]) == set(policies)


def test_the_gpu_check_script_loads_and_lists_the_matrix():
    import subprocess
    import sys

    from helpers import REPO

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--allow-cpu" in result.stdout


def test_an_adapter_that_does_not_fit_its_base_is_refused(tmp_path, cli, zoo):
    """peft only warns when an adapter's weights match no module: training would run on the bare base."""
    from safetensors.torch import load_file, save_file

    adapter = make_peft_adapter(zoo("qwen2"), tmp_path / "adapter")
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({key.replace("q_proj", "qkv_proj"): value for key, value in weights.items()}, adapter / "adapter_model.safetensors")
    code, _, err = cli("sft", stage_recipe(tmp_path, "sft", {"name_or_path": str(adapter)}), "--run-dir", tmp_path / "run")
    assert code == 1 and "does not fit its base" in err and "match no module" in err and "Traceback" not in err
