"""train.report_to: W&B (offline) and MLflow (a local file store) get the metrics.jsonl lines under the same
names (`train/loss`, `eval/loss`), the resolved recipe as config and the run dir; a resumed run goes on in
the same tracker run; a tracker whose package is missing is one line naming the extra."""

from __future__ import annotations

import glob
import json
import signal
import struct

import pytest

import dpo_cli.stages.sft
from helpers import interrupt_at_call, read_jsonl


def wandb_records(run_dir) -> list:
    """The records of W&B's offline run files (a LevelDB-style log of protobuf records: 32 KiB blocks, each
    record a 7-byte header of checksum, length and type: whole, first, middle or last piece)."""
    from wandb.proto import wandb_internal_pb2 as pb

    found = []
    for path in sorted(glob.glob(str(run_dir / "wandb" / "*" / "run-*.wandb"))):
        data, pos, pending = open(path, "rb").read(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if left < 7 or (kind == 0 and length == 0):
                pos += left
                continue
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(pending)
                found.append(record)
    return found


def wandb_history(run_dir) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in items.items():
                if not key.startswith("_"):
                    series.setdefault(key, []).append((int(items["_step"]), value))
    return series


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def test_wandb_and_mlflow_get_the_metrics_lines_the_recipe_and_the_run_dir_and_a_resume_goes_on(tmp_path, cli, sft_recipe, monkeypatch, offline):
    from mlflow import MlflowClient

    recipe = sft_recipe(train={"max_steps": 6, "save_every": 2, "eval_every": 3, "report_to": ["wandb", "mlflow"], "tracker_project": "films"})
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, dpo_cli.stages.sft, "lm_step", call=4, signum=signal.SIGTERM)
        code, _, err = cli("sft", recipe, "--run-dir", run)
        assert code == 143, err
    code, _, err = cli("sft", recipe, "--run-dir", run)
    assert code == 0, err
    lines = read_jsonl(run / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in lines if "split" not in r]
    evals = [(r["step"], r["loss"]) for r in lines if r.get("split") == "eval"]
    assert [s for s, _ in train] == [1, 2, 3, 4, 5, 6] and [s for s, _ in evals] == [3, 6]

    ids = json.loads((run / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    mlflow_run = client.get_run(ids["mlflow"])
    assert client.get_experiment(mlflow_run.info.experiment_id).name == "films" and mlflow_run.info.run_name == "run"
    assert mlflow_run.data.tags["dpo_cli.run_dir"] == str(run) and mlflow_run.data.params["train.max_steps"] == "6"
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], key)) for key in ("train/loss", "eval/loss")}
    assert dict(history["train/loss"]) == pytest.approx(dict(train)) and dict(history["eval/loss"]) == pytest.approx(dict(evals))
    assert "train/grad_norm" in mlflow_run.data.metrics and "train/lr" in mlflow_run.data.metrics
    assert mlflow_run.info.status == "FINISHED"  # KILLED after the interrupted attempt, then resumed to the end

    runs = {r.run.run_id for r in wandb_records(run) if r.WhichOneof("record_type") == "run"}
    assert runs == {ids["wandb"]}  # the resumed attempt went on in the same W&B run
    first = next(r.run for r in wandb_records(run) if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in first.config.update}
    assert first.project == "films" and config["run_dir"] == str(run) and config["train"]["max_steps"] == 6
    series = wandb_history(run)
    # both attempts' lines, one series (a step logged again after the resume has the same value: resume is exact)
    assert dict(series["train/loss"]) == pytest.approx(dict(train)) and dict(series["eval/loss"]) == pytest.approx(dict(evals))


def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, cli, sft_recipe):
    pytest.importorskip("wandb")
    try:
        import trackio  # noqa: F401  (only whether it imports)
    except ImportError:
        pass
    else:
        pytest.skip("trackio is installed here")
    code, _, err = cli("sft", sft_recipe(train={"report_to": ["trackio"]}), "--run-dir", tmp_path / "run")
    assert code == 1 and "pip install 'dpo-cli[trackio]'" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("validate", sft_recipe(train={"report_to": ["neptune"]}))
    assert code == 1 and "report_to" in err


def test_a_tracker_that_fails_mid_run_is_dropped_with_one_note_and_training_goes_on(tmp_path, cli, sft_recipe, monkeypatch, offline):
    import dpo_cli.train.trackers as trackers

    calls = []

    def flaky(self, metrics, step):
        calls.append(step)
        if len(calls) == 2:
            raise ConnectionError("the tracking server went away")

    monkeypatch.setattr(trackers.MlflowTracker, "log", flaky)
    code, _, err = cli("sft", sft_recipe(train={"max_steps": 4, "report_to": ["mlflow"]}), "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert err.count("train.report_to: mlflow failed (the tracking server went away)") == 1 and calls == [1, 2]
    assert (tmp_path / "run" / "final").is_dir() and len([r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "split" not in r]) == 4
