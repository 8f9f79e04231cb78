"""Several processes (torchrun, accelerate launch; under Slurm through scripts/slurm/): who is who, and the
few collective operations the stages need. With one process every helper is a no-op, so the stages read the same either way.

Launch: `torchrun --nproc_per_node N -m dpo_cli STAGE RECIPE` or `accelerate launch -m dpo_cli ...`; on CPU
the processes talk over gloo, on GPUs over NCCL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def state() -> Any:
    """accelerate's process state; creating it joins the process group when launched with several processes."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def world_size() -> int:
    return state().num_processes


def rank() -> int:
    return state().process_index


def is_main() -> bool:
    return state().is_main_process


def barrier() -> None:
    if world_size() > 1:
        state().wait_for_everyone()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process goes first (writes a shared file, fills a cache), then the others (read it)."""
    with state().main_process_first():
        yield


def _device() -> torch.device:
    return state().device


def reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over processes."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor.tolist()


def sum_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor summed over processes (a new tensor; the argument is left as it was)."""
    if world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return total


def mean(value: float) -> float:
    """The mean of a number over processes."""
    return reduce_sum([value])[0] / world_size()


def reduce_max(value: float) -> float:
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.item())


def broadcast(obj: Any) -> Any:
    """The main process's object, on every process."""
    if world_size() == 1:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def main_has(path: Any) -> bool:
    """Whether the main process sees `path`: the same answer everywhere, so every process takes the same
    branch (a file the main process is about to write may appear to the others at any moment)."""
    return bool(broadcast(path.exists()))


def gather(items: list[Any]) -> list[Any]:
    """Every process's list, concatenated in rank order (on every process)."""
    if world_size() == 1:
        return list(items)
    lists: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(lists, items)
    return [item for part in lists for item in part]


def shard(count: int) -> range:
    """This process's contiguous share of `count` items (the first processes take one more when uneven)."""
    size, process = world_size(), rank()
    base, extra = divmod(count, size)
    start = process * base + min(process, extra)
    return range(start, start + base + (1 if process < extra else 0))


LAUNCHER_ENGINES = {"ACCELERATE_USE_FSDP": "fsdp", "ACCELERATE_USE_DEEPSPEED": "deepspeed"}


def check_launcher(strategy: str, env: Any = None) -> None:
    """The recipe chooses the engine; an `accelerate launch` config that asks for another one is an error
    rather than a silent override (accelerate would otherwise build its own from the config)."""
    import os

    env = os.environ if env is None else env
    for variable, engine in LAUNCHER_ENGINES.items():
        if str(env.get(variable, "")).lower() in ("1", "true") and strategy != engine:
            from dpo_cli.core.errors import UserError

            raise UserError(
                f"distributed.strategy: the accelerate config launches {engine} but the recipe says {strategy}; "
                f"set distributed.strategy: {engine} (the recipe decides the engine) or launch with recipes/accelerate/ddp.yaml"
            )


def accelerator_kwargs(distributed: Any, grad_accum: int = 1, max_grad_norm: float | None = None) -> dict[str, Any]:
    """The Accelerator's engine for several processes, from the recipe's `distributed` section."""
    if distributed is None or world_size() == 1:
        return {}
    check_launcher(distributed.strategy)
    if distributed.strategy == "ddp":
        from accelerate.utils import DistributedDataParallelKwargs

        return {"kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=distributed.find_unused_parameters)]}
    if distributed.strategy == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(
            sharding_strategy=distributed.fsdp_sharding.upper(),
            cpu_offload=distributed.fsdp_cpu_offload,
            use_orig_params=True,  # LoRA: frozen and trainable parameters side by side
            auto_wrap_policy="transformer_based_wrap",  # one unit per decoder layer (the model's _no_split_modules)
        )
        return {"fsdp_plugin": plugin}
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(
        zero_stage=distributed.zero_stage,
        offload_optimizer_device="cpu" if distributed.zero_offload else "none",
        offload_param_device="cpu" if distributed.zero_offload and distributed.zero_stage == 3 else "none",
        gradient_accumulation_steps=grad_accum,  # the engine counts the loop's backward passes per step
        gradient_clipping=max_grad_norm,
    )
    return {"deepspeed_plugin": plugin}


def sharded_engine(distributed: Any) -> bool:
    """FSDP and DeepSpeed keep shards of the model and optimizer on each process: checkpoints go through
    accelerate's save_state/load_state, and a full state dict is gathered for final/."""
    return distributed is not None and distributed.strategy in ("fsdp", "deepspeed") and world_size() > 1


def fsdp_uniform_dtype(model: torch.nn.Module) -> str | None:
    """FSDP flattens each layer's parameters into one tensor of one dtype: trainable weights (LoRA, float32
    masters) are cast to the frozen base's dtype. Returns a note for the user when that happened."""
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.dtype.is_floating_point}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    if len(frozen) != 1 or trainable <= frozen:
        return None
    (dtype,) = frozen
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)
    return f"fsdp: the trainable weights are kept in {str(dtype).removeprefix('torch.')}, the base's dtype (FSDP shards one dtype per layer)"
