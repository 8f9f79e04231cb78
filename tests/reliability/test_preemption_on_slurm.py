"""Promise: under a real scheduler, a job stopped by its time-limit signal or preempted with `scontrol requeue`
checkpoints, is requeued exactly once and ends at train.max_steps with the weights of an uninterrupted run.

The test starts a single-node Slurm of its own (Debian's slurmctld, slurmd and munge, `make slurm-deps`
installs them; config, state, ports and munge socket in a temporary folder) and submits the shipped
scripts/slurm/single-node.sbatch with `sbatch`. Skipped, with the reason, where they cannot start."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, assert_same_run, read_jsonl, skip_without_system

pytestmark = pytest.mark.slow

MAX_STEPS = 3000
SCRIPT = REPO / "scripts" / "slurm" / "single-node.sbatch"
DAEMONS = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd"}  # binary -> Debian package
CLIENTS = ("sbatch", "scontrol", "squeue", "sinfo")


def _binary(name: str) -> str | None:
    return shutil.which(name) or next((str(Path(d) / name) for d in ("/usr/sbin", "/sbin") if (Path(d) / name).exists()), None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Cluster:
    """A one-node Slurm for this test: `run(*command)` runs a Slurm client against it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
        self.processes: list[subprocess.Popen] = []

    def run(self, *command: str) -> str:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(command)}: {done.stderr or done.stdout}"
        return done.stdout.strip()

    def job(self, job_id: str) -> dict[str, str]:
        fields = self.run("scontrol", "show", "job", "-o", job_id).split()
        return dict(field.split("=", 1) for field in fields if "=" in field)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.folder.glob("*.log")))


def _start(folder: Path) -> Cluster:
    for name in ("state", "spool"):
        (folder / name).mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    munge_socket = folder / "munge.socket"
    subprocess.run(
        [_binary("munged"), "--force", f"--socket={munge_socket}", f"--key-file={key}", f"--pid-file={folder / 'munged.pid'}",
         f"--log-file={folder / 'munged.log'}", f"--seed-file={folder / 'munged.seed'}"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    node = socket.gethostname().split(".")[0]
    (folder / "slurm.conf").write_text(
        "\n".join([
            "ClusterName=dpocli-test", f"SlurmctldHost={node}", "SlurmUser=root", "SlurmdUser=root",
            # cred_expire also delays a requeued job's restart: 10 s instead of Slurm's 120
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge_socket},cred_expire=10",
            f"StateSaveLocation={folder / 'state'}", f"SlurmdSpoolDir={folder / 'spool'}",
            f"SlurmctldPidFile={folder / 'slurmctld.pid'}", f"SlurmdPidFile={folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={folder / 'slurmctld.log'}", f"SlurmdLogFile={folder / 'slurmd.log'}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1", "ReturnToService=2", "JobRequeue=1", "KillWait=60", "MinJobAge=600",
            f"NodeName={node} CPUs={os.cpu_count()} State=UNKNOWN",
            f"PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n"
    )  # fmt: skip
    cluster = Cluster(folder)
    for daemon in ("slurmctld", "slurmd"):
        cluster.processes.append(
            subprocess.Popen([_binary(daemon), "-D", "-f", str(folder / "slurm.conf")], env=cluster.env,
                             stdout=subprocess.DEVNULL, stderr=open(folder / f"{daemon}.stderr.log", "w"))
        )  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=cluster.env, capture_output=True, text=True).stdout.strip()
        if state == "idle":
            return cluster
        if any(p.poll() is not None for p in cluster.processes):
            break
        time.sleep(0.5)
    _stop(cluster)
    skip_without_system(f"the test's Slurm did not come up (node state {state!r}):\n{cluster.logs()}")


def _stop(cluster: Cluster) -> None:
    subprocess.run(["scancel", "--full", "--user=root"], env=cluster.env, capture_output=True)
    for process in cluster.processes:
        process.terminate()
    for process in cluster.processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    pid_file = cluster.folder / "munged.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().strip()), 15)
        except (ValueError, ProcessLookupError):
            pass


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [f"{name} (Debian package {package})" for name, package in DAEMONS.items() if _binary(name) is None]
    missing += [f"{name} (Debian package slurm-client)" for name in CLIENTS if _binary(name) is None]
    if missing:
        skip_without_system(f"a real Slurm needs {', '.join(missing)}: `make slurm-deps` installs them (root, Debian)")
    if os.geteuid() != 0:
        skip_without_system("starting slurmd (which runs jobs as their user) and a private munged needs root")
    cluster = _start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    _stop(cluster)


@pytest.fixture(scope="module")
def long_recipe(tmp_path_factory, tiny_model_dir):
    """An sft run of about a minute of training on this machine: longer than the wait for Slurm's time-limit
    signal once it is due (slurmctld checks time limits every 30 s). Its uninterrupted run is the reference
    both tests compare with."""
    from helpers import write_jsonl, write_recipe
    from dpo_cli.demo import demo_rows

    folder = tmp_path_factory.mktemp("slurm-recipe")
    write_jsonl(folder / "train.jsonl", demo_rows("demo:sft?n=64"))
    recipe = write_recipe(folder / "sft.yaml", {
        "stage": "sft", "seed": 7, "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": "train.jsonl", "max_length": 96},
        "train": {"max_steps": MAX_STEPS, "batch_size": 8, "learning_rate": 1e-3, "log_every": 10, "save_every": None},
        "sft": {"show_samples": 0},
    })  # fmt: skip
    reference = folder / "reference"
    done = subprocess.run([sys.executable, "-m", "dpo_cli", "sft", str(recipe), "--run-dir", str(reference)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return recipe, reference


def submit(cluster: Cluster, folder: Path, recipe: Path, run: Path, *options: str) -> str:
    """The shipped sbatch script, on this node's CPUs (its GPU and CPU requests overridden), one process."""
    path = f"{Path(sys.executable).parent}:{cluster.env['PATH']}"
    return cluster.run(
        "sbatch", "--parsable", f"--chdir={folder}", f"--output={folder / 'job-%j.out'}", "--gpus-per-node=0",
        f"--cpus-per-task={os.cpu_count()}", f"--export=ALL,PATH={path},GPUS=1,OMP_NUM_THREADS=1", *options,
        str(SCRIPT), "sft", str(recipe), "--run-dir", str(run),
    )  # fmt: skip


def wait_for(condition, what: str, cluster: Cluster, job: str, output: Path, seconds: float) -> None:
    deadline = time.time() + seconds
    while not condition():
        log = output.read_text()[-3000:] if output.exists() else "(no job output yet)"
        assert time.time() < deadline, f"timed out waiting for {what}; job {cluster.job(job)}\n{cluster.logs()}\n{log}"
        time.sleep(0.1)


def finished(cluster: Cluster, job: str) -> bool:
    return cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def logged_steps(run: Path) -> list[int]:
    metrics = run / "metrics.jsonl"
    return [m["step"] for m in read_jsonl(metrics) if m.get("split") != "eval"] if metrics.exists() else []


def check_one_requeue_and_an_exact_end(cluster: Cluster, job: str, run: Path, reference: Path, output: Path, signal: str) -> None:
    wait_for(lambda: finished(cluster, job), "the requeued job to finish", cluster, job, output, 600)
    state, log = cluster.job(job), output.read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", f"{state}\n{log[-4000:]}"
    assert f"interrupted by {signal} at step" in log and "resuming from" in log, log[-4000:]
    assert logged_steps(run) == list(range(10, MAX_STEPS + 1, 10))  # every step once, none repeated, ending at max_steps
    assert_same_run(run, reference)


def test_a_job_hit_by_its_time_limit_signal_requeues_once_and_ends_exactly(tmp_path, slurm, long_recipe):
    recipe, reference = long_recipe
    run = tmp_path / "run"
    # The time limit's warning: SIGUSR1 50 s before the limit (the script asks 120 s before 24 h). Slurm may send
    # it well before it is due (CI saw it 10 s into a 1-minute job, while torchrun itself was still importing),
    # so the limit is cut to 1 minute once the job trains: the warning is then due at once and comes at
    # slurmctld's next check, while training still runs.
    job = submit(slurm, tmp_path, recipe, run, "--time=30", "--signal=USR1@50")
    output = tmp_path / f"job-{job}.out"
    wait_for(lambda: len(logged_steps(run)) >= 3, "the job to train", slurm, job, output, 300)
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=1")
    wait_for(lambda: (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()), "the time-limit checkpoint", slurm, job, output, 300)
    # The requeued allocation gets room to finish (a real job's next allocation has its whole time limit).
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=30")
    check_one_requeue_and_an_exact_end(slurm, job, run, reference, output, "SIGUSR1")


def test_a_job_preempted_with_scontrol_requeue_resumes_once_and_ends_exactly(tmp_path, slurm, long_recipe):
    recipe, reference = long_recipe
    run = tmp_path / "run"
    job = submit(slurm, tmp_path, recipe, run, "--time=30")
    output = tmp_path / f"job-{job}.out"
    wait_for(lambda: len(logged_steps(run)) >= 3, "the job to train", slurm, job, output, 300)
    slurm.run("scontrol", "requeue", job)  # what a preemption with PreemptMode=REQUEUE does: SIGTERM, then requeue
    check_one_requeue_and_an_exact_end(slurm, job, run, reference, output, "SIGTERM")
    assert "already requeued by the scheduler" in output.read_text()
