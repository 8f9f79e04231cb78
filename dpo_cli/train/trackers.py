"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, MLflow and Trackio, each an optional
extra. Every tracker gets the metrics.jsonl lines under the same names, prefixed by their split
(`train/loss`, `eval/rewards/accuracies`, `policy/ground_truth`), the resolved recipe as the run's config and
the run dir's path; a resumed run goes on in the same tracker run (its id is kept in RUN/trackers.json).
Only the main process reports."""

from __future__ import annotations

import json
import os
import secrets
from typing import Any, Protocol

from dpo_cli.core.errors import UserError
from dpo_cli.core.rundir import RunDir
from dpo_cli.core.atomic import atomic_write_json

EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}  # tracker -> its pip extra
IDS_FILE = "trackers.json"


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, status: str) -> None: ...  # "completed", "interrupted" (resumable) or "failed"


def scalars(record: dict[str, Any], split: str) -> dict[str, float]:
    """A metrics line as a tracker takes it: numbers only, named `split/key`."""
    return {
        f"{split}/{key}": float(value)
        for key, value in record.items()
        if key not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested recipe keys as dotted names (MLflow and the trackers' tables take flat parameters)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _missing(name: str) -> UserError:
    return UserError(f"train.report_to: {name} needs the {EXTRAS[name]} package: pip install 'dpo-cli[{EXTRAS[name]}]'")


class TensorBoardTracker:
    def __init__(self, run: RunDir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(run.path / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, status: str) -> None:
        self.writer.close()


class WandbTracker:
    """W&B under RUN/wandb; WANDB_MODE=offline keeps everything on disk (`wandb sync` uploads it later)."""

    def __init__(self, run: RunDir, project: str, config: dict[str, Any], ids: dict[str, str]):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb") from None
        ids.setdefault("wandb", secrets.token_hex(4))  # W&B's own ids are 8 characters of [a-z0-9]
        try:
            self.run = wandb.init(
                project=project, name=run.path.name, id=ids["wandb"], resume="allow", dir=str(run.path), config=config,
                notes=f"dpo-cli run dir: {run.path}", settings=wandb.Settings(silent=True),
            )  # fmt: skip
        except Exception as exc:  # no login, no network: one line, how to go on without it
            raise UserError(
                f"train.report_to: wandb could not start ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
                "log in with `wandb login`, or set WANDB_MODE=offline to keep the run on disk"
            ) from None

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "completed" else 1)


class MlflowTracker:
    """MLflow at $MLFLOW_TRACKING_URI, else a local file store in RUN/mlruns (`mlflow ui --backend-store-uri RUN/mlruns`)."""

    def __init__(self, run: RunDir, project: str, config: dict[str, Any], ids: dict[str, str]):
        try:
            import mlflow
            from mlflow import MlflowClient
        except ImportError:
            raise _missing("mlflow") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run.path / "mlruns").as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for those who ask
        self.client = MlflowClient(tracking_uri=uri)
        self.metric = mlflow.entities.Metric
        if "mlflow" not in ids:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(project)
            created = self.client.create_run(experiment_id, run_name=run.path.name, tags={"dpo_cli.run_dir": str(run.path)})
            ids["mlflow"] = created.info.run_id
            params = [mlflow.entities.Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flat_config(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
                self.client.log_batch(ids["mlflow"], params=params[start : start + 100])
        self.run_id = ids["mlflow"]

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.metric(key, value, now, step) for key, value in metrics.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status={"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))


class TrackioTracker:
    def __init__(self, run: RunDir, project: str, config: dict[str, Any], ids: dict[str, str]):
        try:
            import trackio
        except ImportError:
            raise _missing("trackio") from None
        self.trackio = trackio
        ids.setdefault("trackio", f"{run.path.name}-{secrets.token_hex(3)}")  # two run dirs of one name stay two runs
        trackio.init(project=project, name=ids["trackio"], config={**config, "run_dir": str(run.path)}, resume="allow")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def close(self, status: str) -> None:
        self.trackio.finish()


class Trackers:
    """The recipe's trackers as one: `log(record, split)` sends a metrics line to each of them. A tracker is a
    side channel: one that fails after it started (a network error, a full quota) is named once and dropped,
    and training goes on (metrics.jsonl has every line)."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    @classmethod
    def open(cls, run: RunDir, names: list[str], project: str | None, config: dict[str, Any]) -> Trackers:
        ids_path = run.path / IDS_FILE
        ids: dict[str, str] = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        project = project or "dpo-cli"
        config = {**config, "run_dir": str(run.path)}
        opened: list[Tracker] = []
        try:
            for name in dict.fromkeys(names):  # each once, in the recipe's order
                if name == "tensorboard":
                    opened.append(TensorBoardTracker(run))
                elif name == "wandb":
                    opened.append(WandbTracker(run, project, config, ids))
                elif name == "mlflow":
                    opened.append(MlflowTracker(run, project, config, ids))
                elif name == "trackio":
                    opened.append(TrackioTracker(run, project, config, ids))
        except BaseException:
            cls(opened).close()
            raise
        if ids:
            atomic_write_json(ids_path, ids)
        return cls(opened)

    def log(self, record: dict[str, Any], split: str) -> None:
        metrics = scalars(record, split)
        if metrics:
            for tracker in list(self.trackers):
                self._guarded(tracker, lambda: tracker.log(metrics, int(record["step"])))

    def close(self, status: str = "completed") -> None:
        for tracker in list(self.trackers):
            self._guarded(tracker, lambda: tracker.close(status))
        self.trackers = []

    def _guarded(self, tracker: Tracker, call) -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - any failure of a side channel
            from dpo_cli.core.ui import note

            self.trackers.remove(tracker)
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            note(f"train.report_to: {type(tracker).__name__.removesuffix('Tracker').lower()} failed ({first}); it gets no more lines (metrics.jsonl has them all)")


def tracker_names(report_to: list[str], tensorboard: bool) -> list[str]:
    """train.report_to, with the older train.tensorboard: true as one more name."""
    return [*report_to, *(["tensorboard"] if tensorboard and "tensorboard" not in report_to else [])]


def recipe_config(run: RunDir) -> dict[str, Any]:
    """The resolved recipe the run dir holds (recipe.yaml), as the trackers' run config."""
    saved = run.saved_recipe()
    return saved if isinstance(saved, dict) else {}

