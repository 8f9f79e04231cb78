"""The process a stage runs in: device and mixed precision (through accelerate), seeding, peak memory and
library versions."""

from __future__ import annotations

import os
import platform
import random
import resource
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from dpo_cli.core.recipes import TrainSection


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_mixed_precision(setting: str, device_type: str) -> str:
    if setting != "auto":
        return setting
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


@dataclass
class Runtime:
    accelerator: Accelerator
    mixed_precision: str
    distributed: Any = None  # the recipe's distributed section (None: single-process stages)

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def sharded(self) -> bool:
        from dpo_cli.core.distributed import sharded_engine

        return sharded_engine(self.distributed)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def device_name(self) -> str:
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
        else:
            name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        if self.world_size > 1:
            engine = self.distributed.strategy if self.distributed is not None else "ddp"
            return f"{self.world_size} processes × {name}, {engine}"
        return name


class RssMonitor:
    """The peak resident memory of this process since the monitor started, sampled every 20 ms: unlike
    ru_maxrss it can start afresh for each stage of a pipeline that runs in one process."""

    def __init__(self, interval: float = 0.02):
        self.peak = _current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, _current_rss())

    def stop(self) -> int:
        self._stop.set()
        self.peak = max(self.peak, _current_rss())
        return self.peak


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the process-lifetime peak is the best there is
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


_MONITOR: RssMonitor | None = None


def setup_runtime(train: TrainSection, seed: int, distributed: Any = None) -> Runtime:
    from accelerate.state import AcceleratorState

    from dpo_cli.core.distributed import accelerator_kwargs

    AcceleratorState._reset_state()  # a fresh mixed-precision setting per stage, also in one process
    cuda = torch.cuda.is_available()
    mixed = resolve_mixed_precision(train.mixed_precision, "cuda" if cuda else "cpu")
    accelerator = Accelerator(mixed_precision=mixed, cpu=not cuda, **accelerator_kwargs(distributed, train.grad_accum, train.max_grad_norm))
    seed_everything(seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    global _MONITOR
    if _MONITOR is not None:
        _MONITOR.stop()
    _MONITOR = RssMonitor()  # this stage's peak, not an earlier stage's of the same process
    return Runtime(accelerator=accelerator, mixed_precision=mixed, distributed=distributed)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak bytes of the current stage: allocated on the GPU, or the process's resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    if _MONITOR is not None:
        return _MONITOR.stop(), "cpu_max_rss"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_max_rss"


def library_versions() -> dict[str, str]:
    names = ["dpo-cli", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "tokenizers"]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
