"""The process a stage runs in: device and mixed precision (through accelerate), seeding, stop signals,
peak memory and library versions."""

from __future__ import annotations

import os
import platform
import random
import resource
import signal
import threading
from dataclasses import dataclass
from importlib import metadata
from types import FrameType

import numpy as np
import torch
from accelerate import Accelerator

from dpo_cli.recipes import TrainSection


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

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def setup_runtime(train: TrainSection, seed: int) -> Runtime:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a fresh mixed-precision setting per stage, also in one process
    cuda = torch.cuda.is_available()
    mixed = resolve_mixed_precision(train.mixed_precision, "cuda" if cuda else "cpu")
    accelerator = Accelerator(mixed_precision=mixed, cpu=not cuda)
    seed_everything(seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    return Runtime(accelerator=accelerator, mixed_precision=mixed)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak bytes: allocated on the GPU, or the process's maximum resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
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


class StopSignals:
    """SIGINT/SIGTERM only set a flag; the loop checkpoints at the next step boundary and stops.

    A second SIGINT while stopping raises KeyboardInterrupt, for a user who does not want to wait.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
