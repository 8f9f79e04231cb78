"""Several processes on CPU (torchrun, gloo): 2 processes with batch b train exactly like 1 process with
batch 2b (sft, dpo), PPO runs with global statistics, a run resumes on another number of processes, and
the FSDP / DeepSpeed settings and the accelerate configs build."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import REPO, assert_equivalent, read_jsonl, torchrun, train_records
from dpo_cli.losses import masked_whiten


def test_sft_two_processes_equal_one_with_twice_the_batch(tmp_path, cli, sft_recipe):
    # 48 rows, 8 held out: 40 = 5 global batches of 8 = 2 processes x 4
    two = sft_recipe("two.yaml", train={"max_steps": 5, "batch_size": 4, "save_every": 2, "log_every": 1, "learning_rate": 3e-3})
    one = sft_recipe("one.yaml", train={"max_steps": 5, "batch_size": 8, "save_every": 2, "log_every": 1, "learning_rate": 3e-3})
    assert cli("sft", one, "--run-dir", tmp_path / "one")[0] == 0
    done = torchrun("sft", two, "--run-dir", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_equivalent(tmp_path / "two", tmp_path / "one", ("loss", "grad_norm", "lr"))
    assert done.stdout.count("sft · completed") == 1  # only the main process prints
    checkpoint = tmp_path / "two" / "checkpoints" / "step-4"
    assert {"rng-rank0.pt", "rng-rank1.pt", "trainable.safetensors", "optimizer.pt"} <= {p.name for p in checkpoint.iterdir()}
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["device"].startswith("2 processes × CPU") and summary["tokens"] == train_records(tmp_path / "one")[-1]["tokens"]


def test_dpo_lora_two_processes_equal_one_with_twice_the_batch(tmp_path, cli, dpo_recipe, tiny_model_dir):
    # 40 pairs, 8 held out: 32 = 4 global batches of 8
    model = {"name_or_path": str(tiny_model_dir), "lora": {"r": 4, "dropout": 0.0}}
    dpo = {"beta": 0.1, "show_samples": 1, "precompute_ref": True}
    two = dpo_recipe("two.yaml", model=model, dpo=dpo, train={"max_steps": 4, "batch_size": 4, "log_every": 1, "save_every": 2})
    one = dpo_recipe("one.yaml", model=model, dpo=dpo, train={"max_steps": 4, "batch_size": 8, "log_every": 1, "save_every": 2})
    assert cli("dpo", one, "--run-dir", tmp_path / "one")[0] == 0
    done = torchrun("dpo", two, "--run-dir", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    names = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen")
    assert_equivalent(tmp_path / "two", tmp_path / "one", names)
    ref_two = load_file(str(tmp_path / "two" / "reference_logps-train.safetensors"))["logps"]
    ref_one = load_file(str(tmp_path / "one" / "reference_logps-train.safetensors"))["logps"]
    assert torch.allclose(ref_two, ref_one, atol=1e-5)  # scored in shards, gathered in the data's order


@pytest.mark.slow  # two processes (CI runs the slow tests)
def test_kto_two_processes_equal_one_with_twice_the_batch(tmp_path, cli, dpo_recipe, tiny_model_dir):
    """KTO's reference point is averaged over the processes and its per-kind means added up before dividing:
    the logged numbers and the updates are those of one process holding the whole batch."""
    model = {"name_or_path": str(tiny_model_dir), "lora": {"r": 4, "dropout": 0.0}}
    dpo = {"loss": "kto", "beta": 0.5, "show_samples": 0}
    train = {"max_steps": 4, "log_every": 1, "save_every": None, "learning_rate": 5e-3}
    two = dpo_recipe("two.yaml", model=model, dpo=dpo, train={**train, "batch_size": 4})
    one = dpo_recipe("one.yaml", model=model, dpo=dpo, train={**train, "batch_size": 8})
    assert cli("dpo", one, "--run-dir", tmp_path / "one")[0] == 0
    done = torchrun("dpo", two, "--run-dir", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_equivalent(tmp_path / "two", tmp_path / "one", ("loss", "grad_norm", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"), eval_loss=False)


@pytest.mark.slow  # 18 s on two processes (CI runs the slow tests)
def test_fsdp_full_shard_trains_like_one_process_and_resumes_from_its_shards(tmp_path, cli, sft_recipe):
    """FSDP on CPU (gloo): the same steps as one process with the global batch; its checkpoints are the
    engine's shards, and a run killed after one resumes from it to the same final weights."""
    train = {"max_steps": 4, "save_every": 2, "log_every": 1, "learning_rate": 3e-3}
    two = sft_recipe("fsdp.yaml", train={**train, "batch_size": 4}, distributed={"strategy": "fsdp"}, sft={"show_samples": 0})
    one = sft_recipe("one.yaml", train={**train, "batch_size": 8}, sft={"show_samples": 0})
    assert cli("sft", one, "--run-dir", tmp_path / "one")[0] == 0
    done = torchrun("sft", two, "--run-dir", tmp_path / "fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_equivalent(tmp_path / "fsdp", tmp_path / "one", ("loss", "grad_norm"))
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step-2"
    assert (checkpoint / "engine").is_dir() and not (checkpoint / "trainable.safetensors").exists()

    # as if killed in step 3: only the step-2 checkpoint and the metrics up to it are left
    run = tmp_path / "fsdp"
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    done = torchrun("sft", two, "--run-dir", run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    assert_equivalent(run, tmp_path / "one", ("loss", "grad_norm"))
    # a sharded checkpoint needs the engine and the number of processes that wrote it
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    code, _, err = cli("sft", two, "--run-dir", run)
    assert code == 1 and "holds the FSDP/DeepSpeed shards of 2 processes" in err


@pytest.mark.slow  # 13 s on two processes (CI runs the slow tests)
def test_fsdp_with_lora_on_a_bfloat16_base(tmp_path, sft_recipe, tiny_model_dir):
    recipe = sft_recipe(
        model={"name_or_path": str(tiny_model_dir), "dtype": "bfloat16", "lora": {"r": 4}},
        train={"max_steps": 2, "batch_size": 4, "log_every": 1, "save_every": None},
        distributed={"strategy": "fsdp"},
    )
    done = torchrun("sft", recipe, "--run-dir", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trainable weights are kept in bfloat16" in done.stderr
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_a_run_resumes_on_another_number_of_processes(tmp_path, cli, sft_recipe, monkeypatch):
    """Stopped on 1 process after 2 steps of 4 rows, finished on 2 (DDP checkpoints hold full weights): it
    goes on from row 8 of the data, now 8 rows a step, and ends at max_steps."""
    import signal

    import dpo_cli.stages.sft
    from helpers import interrupt_at_call

    recipe = sft_recipe(train={"max_steps": 4, "batch_size": 4, "save_every": None, "log_every": 1, "learning_rate": 3e-3})
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, dpo_cli.stages.sft, "lm_step", 2, signal.SIGTERM)
        assert cli("sft", recipe, "--run-dir", tmp_path / "run")[0] == 143
    done = torchrun("sft", recipe, "--run-dir", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "continues on 2 process(es) instead of 1" in done.stderr
    records = train_records(tmp_path / "run")
    assert [m["step"] for m in records] == [1, 2, 3, 4]
    assert [m["epoch"] for m in records] == [0.1, 0.2, 0.4, 0.6]  # 40 rows: 4, 8, then 16, 24 rows seen


def test_ppo_on_two_processes(tmp_path, ppo_recipe):
    recipe = ppo_recipe(train={"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "lr_scheduler": "constant", "log_every": 1, "save_every": 1})
    done = torchrun("ppo", recipe, "--run-dir", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in records] == [1, 2] and [m["episodes"] for m in records] == [4, 8]  # 2 processes x 2 prompts
    assert all(m["ratio/first_minibatch"] == pytest.approx(1.0) for m in records)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in (tmp_path / "run" / "checkpoints" / "step-1").iterdir()}
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()


def two_process_sum():
    """sum_over_processes for two threads standing in for two processes."""
    barrier, slots = threading.Barrier(2), [None, None]

    def for_rank(rank: int):
        def total(tensor: torch.Tensor) -> torch.Tensor:
            slots[rank] = tensor
            barrier.wait()
            out = slots[0] + slots[1]
            barrier.wait()
            return out

        return total

    return for_rank


def test_whitening_with_global_statistics_equals_whitening_everything():
    torch.manual_seed(0)
    values, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float()
    expected = masked_whiten(values, mask)
    for shift_mean in (True, False):
        expected = masked_whiten(values, mask, shift_mean=shift_mean)
        halves, total = [None, None], two_process_sum()

        def work(rank: int) -> None:
            rows = slice(3 * rank, 3 * rank + 3)
            halves[rank] = masked_whiten(values[rows], mask[rows], shift_mean=shift_mean, sum_over_processes=total(rank))

        threads = [threading.Thread(target=work, args=(rank,)) for rank in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert torch.allclose(torch.cat(halves), expected, atol=1e-6)
        assert not torch.allclose(masked_whiten(values[:3], mask[:3], shift_mean=shift_mean), expected[:3], atol=1e-3)  # local stats differ


@pytest.mark.parametrize("name", ["ddp", "fsdp-full-shard", "fsdp-qlora", "deepspeed-zero2", "deepspeed-zero2-offload", "deepspeed-zero3", "deepspeed-zero3-offload"])
def test_accelerate_configs_validate(name):
    """Every ready config in recipes/accelerate/ loads as accelerate's own ClusterConfig would and names
    a distributed type and a plugin accelerate builds."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    from dpo_cli.core.distributed import check_launcher
    from dpo_cli.core.sections import DistributedSection, QuantizationSection

    path = REPO / "recipes" / "accelerate" / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    kind = str(config.distributed_type)
    # the recipe lines the file's comment says to pair it with are valid and choose the same engine
    pair = yaml.safe_load("\n".join(line[4:] for line in path.read_text().splitlines() if line.startswith("#   ")))
    section = DistributedSection(**pair["distributed"])
    launched = {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(kind.split(".")[-1], "ddp")
    assert section.strategy == launched
    check_launcher(section.strategy, {"ACCELERATE_USE_FSDP": str(launched == "fsdp").lower(), "ACCELERATE_USE_DEEPSPEED": str(launched == "deepspeed").lower()})
    if "model" in pair:
        quantization = QuantizationSection(**pair["model"]["quantization"])
        assert quantization.quant_storage == pair["model"]["dtype"] == "bfloat16"
    if name.startswith("fsdp"):
        assert "FSDP" in kind
        fsdp = {k.removeprefix("fsdp_"): v for k, v in config.fsdp_config.items()}
        plugin = FullyShardedDataParallelPlugin(sharding_strategy=fsdp["sharding_strategy"], cpu_offload=fsdp.get("offload_params", False))
        assert plugin.sharding_strategy is not None
    elif name.startswith("deepspeed"):
        assert "DEEPSPEED" in kind
        ds = config.deepspeed_config
        plugin = DeepSpeedPlugin(zero_stage=ds["zero_stage"], offload_optimizer_device=ds["offload_optimizer_device"], offload_param_device=ds["offload_param_device"])
        assert plugin.zero_stage == int(name[len("deepspeed-zero")]) and ("offload" in name) == (ds["offload_optimizer_device"] == "cpu")
    else:
        assert "MULTI_GPU" in kind


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_distributed_sections_build_their_engine(strategy, monkeypatch):
    """The recipe's distributed section becomes accelerate's plugin (built here as on a 2-process job)."""
    import dpo_cli.core.distributed as distributed
    from dpo_cli.core.sections import DistributedSection

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    section = DistributedSection(strategy=strategy, fsdp_sharding="shard_grad_op", fsdp_cpu_offload=True, zero_stage=3, zero_offload=True)
    kwargs = distributed.accelerator_kwargs(section, grad_accum=2, max_grad_norm=1.0)
    if strategy == "fsdp":
        plugin = kwargs["fsdp_plugin"]
        assert plugin.sharding_strategy.name == "SHARD_GRAD_OP" and plugin.cpu_offload.offload_params
    else:
        plugin = kwargs["deepspeed_plugin"]
        assert plugin.zero_stage == 3
        assert plugin.deepspeed_config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert distributed.sharded_engine(section)


def test_a_launcher_that_contradicts_the_recipe_is_refused():
    from dpo_cli.core.distributed import check_launcher
    from dpo_cli.core.errors import UserError

    check_launcher("ddp", {})
    with pytest.raises(UserError, match="the accelerate config launches fsdp but the recipe says ddp"):
        check_launcher("ddp", {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(UserError, match="set distributed.strategy: deepspeed"):
        check_launcher("fsdp", {"ACCELERATE_USE_DEEPSPEED": "1"})


def test_the_gpu_smoke_script_runs_valid_commands(tmp_path, cli):
    """scripts/gpu_smoke.sh needs 2+ GPUs; here its --dry-run plan is checked: every launch names a shipped
    accelerate config whose engine the stage's recipe (with the script's --set options) agrees with."""
    import shlex
    import subprocess

    from dpo_cli.core.distributed import check_launcher
    from dpo_cli.core.recipe_loader import load_recipe

    plan = subprocess.run(["bash", str(REPO / "scripts" / "gpu_smoke.sh"), "--dry-run", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert plan.returncode == 0, plan.stderr
    commands = [shlex.split(line.split(": ", 1)[1]) for line in plan.stdout.splitlines() if line.startswith("== ")]
    assert len(commands) == 12
    for command in commands:
        config = yaml.safe_load((REPO / command[command.index("--config_file") + 1]).read_text())
        stage, recipe, *options = command[command.index("dpo_cli") + 1 :]
        if stage == "pipeline":
            assert cli("pipeline", REPO / recipe, "--dry-run", *options)[0] == 0
            continue
        overrides = [options[i + 1] for i, option in enumerate(options) if option == "--set"]
        resolved = load_recipe(REPO / recipe, stage, overrides, smoke=True)
        launched = {"FSDP": "ACCELERATE_USE_FSDP", "DEEPSPEED": "ACCELERATE_USE_DEEPSPEED"}.get(config["distributed_type"])
        check_launcher(resolved.distributed.strategy, {launched: "true"} if launched else {})


def test_process_shards_of_a_global_batch_are_the_one_process_batch():
    """Rank r of W takes rows r*b ... (r+1)*b - 1 of the global batch one process with batch W*b sees;
    an epoch's incomplete global batch is left out; too few rows for one is a clear error."""
    from datasets import Dataset

    from dpo_cli.core.errors import UserError
    from dpo_cli.train.loop import BatchStream

    data = Dataset.from_dict({"row": list(range(21))})
    rows = lambda batch: [r["row"] for r in batch]  # noqa: E731
    one = BatchStream(data, 6, seed=3, collate=rows)
    ranks = [BatchStream(data, 3, seed=3, collate=rows, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].per_epoch == 3 and one.per_epoch == 4  # 21 rows: 3 full global batches of 6
    for index in range(2 * ranks[0].per_epoch):  # two epochs
        epoch, within = divmod(index, ranks[0].per_epoch)
        assert ranks[0][index] + ranks[1][index] == one[epoch * one.per_epoch + within]
    with pytest.raises(UserError, match="data.train: 21 rows cannot fill one batch of 8 rows on each of 4 processes; lower train.batch_size"):
        BatchStream(data, 8, seed=3, collate=rows, world_size=4)


@pytest.mark.slow  # 12 s on two processes (CI runs the slow tests)
@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_critic_free_ppo_on_two_processes(advantage, tmp_path, ppo_recipe):
    """RLOO / GRPO through the DDP path (the policy alone in the combined forward): each process keeps its
    prompts' groups of samples."""
    recipe = ppo_recipe(
        train={"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "lr_scheduler": "constant", "log_every": 1, "save_every": 1},
        ppo={"advantage": advantage, "samples_per_prompt": 2},
    )  # fmt: skip
    done = torchrun("ppo", recipe, "--run-dir", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["episodes"] for m in records] == [8, 16] and all(m["ratio/first_minibatch"] == pytest.approx(1.0) for m in records)
    assert "value_loss" not in records[0] and (tmp_path / "run" / "final" / "adapter_config.json").exists()
