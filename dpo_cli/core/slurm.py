"""Slurm: a job warned of its end (SIGUSR1 from `--signal=USR1@120`) or preempted (SIGTERM) has already
written a checkpoint at the step boundary; here it puts itself back in the queue, once, so the next
allocation resumes from the run dir.

`DPO_CLI_REQUEUE_ON` chooses the signals that requeue (default `SIGUSR1,SIGTERM`; empty: never). Note that
`scancel` also sends SIGTERM: set `DPO_CLI_REQUEUE_ON=SIGUSR1` in the sbatch script if a cancelled job
must stay cancelled.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

DEFAULT_SIGNALS = "SIGUSR1,SIGTERM"


def job_id(env: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The id `scontrol requeue` takes: ARRAYJOB_TASK for an array task (the plain SLURM_JOB_ID of an
    array task names only that task's allocation, not the array element to requeue), else SLURM_JOB_ID."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def requeue_signals(env: dict[str, str] | os._Environ = os.environ) -> set[str]:
    return {name.strip().upper() for name in env.get("DPO_CLI_REQUEUE_ON", DEFAULT_SIGNALS).split(",") if name.strip()}


def requeue(signal_name: str, run_path: Path) -> str | None:
    """Requeue this Slurm job after a stop by `signal_name` (main process only). Returns a line for the user,
    or None when there is nothing to do (not under Slurm, another signal). A marker in the run dir, named
    after the job and its restart count, makes it happen once per allocation whatever signals follow."""
    job = job_id()
    if job is None or signal_name not in requeue_signals():
        return None
    marker = run_path / f".requeued-{job}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return None
    except OSError:  # a run dir we cannot write to: still requeue, the run is what matters
        pass
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return f"not requeued: `scontrol` is not on PATH (job {job}); resubmit the job to resume"
    done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
    answer = (done.stderr or done.stdout).strip()
    if done.returncode != 0 and "pending execution" in answer:
        # preempted with PreemptMode=REQUEUE or `scontrol requeue` from outside: Slurm requeues it already
        return f"Slurm job {job} is already requeued by the scheduler; it resumes from {run_path} when it starts again"
    if done.returncode != 0:
        return f"`scontrol requeue {job}` failed ({answer}); resubmit the job to resume"
    return f"requeued Slurm job {job}; it resumes from {run_path} when it starts again"
