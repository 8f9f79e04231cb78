"""Stop signals: SIGINT, SIGTERM and Slurm's SIGUSR1 warning end a training run at a step boundary, with a
checkpoint, instead of killing it.

This module imports nothing heavy: the entry point calls `hold_warning_signal` before torch is imported, so a
SIGUSR1 that arrives while a stage still loads (Slurm may send its time-limit warning up to a minute early,
and a short allocation can warn within seconds of the start) is kept for the training loop instead of killing
the process, whose default action for SIGUSR1 that is.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_held: str | None = None  # a SIGUSR1 received while no training session was listening


def _hold(signum: int, _frame: FrameType | None) -> None:
    global _held
    _held = signal.Signals(signum).name


def hold_warning_signal() -> None:
    """From now on, a SIGUSR1 outside a training session is kept for the next one (which checkpoints after its
    first step and stops), and never kills the process. SIGINT and SIGTERM keep their default outside a
    session: a user's Ctrl-C while a model loads should not wait for a first step."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, _hold)


def take_held_signal() -> str | None:
    global _held
    held, _held = _held, None
    return held


class StopSignals:
    """SIGINT/SIGTERM/SIGUSR1 only set a flag; the loop checkpoints at the next step boundary and stops.

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
        self.received = take_held_signal()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # SIGUSR1: Slurm's warning before preemption
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def agreed(self) -> str | None:
        """The signal any process received (the same answer on every process, so all stop at the same step
        boundary); a collective call, made by every process at every boundary."""
        from dpo_cli.core.distributed import reduce_max

        mine = int(signal.Signals[self.received]) if self.received else 0
        signum = int(reduce_max(float(mine)))
        return signal.Signals(signum).name if signum else None
