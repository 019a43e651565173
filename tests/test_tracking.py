"""Experiment tracking (raycg/train/tracking.py): what a tracker writes is read back with the
tool's own reader (MlflowClient; TensorBoard event files through their protobufs). No Ray."""
from __future__ import annotations

import glob
import os
import struct

import pytest

from raycg.train.tracking import build_tracker, eval_metrics, flat_params

MLFLOW = {"kind": "mlflow", "tracking_uri": None, "experiment": "raycg-test", "dir": None}
TENSORBOARD = {"kind": "tensorboard", "tracking_uri": None, "experiment": "raycg", "dir": None}


def read_events(logdir: str) -> tuple[dict[str, list[tuple[int, float]]], dict[str, str]]:
    """({scalar tag: [(step, value)]}, {text tag: text}) of every event file in `logdir`:
    TFRecords (8-byte length, 4-byte crc, the Event proto, 4-byte crc)."""
    from tensorboardX.proto import event_pb2

    scalars, texts = {}, {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("tensor") and v.tensor.string_val:
                    texts[v.tag] = v.tensor.string_val[0].decode()
                else:
                    scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars, texts


def test_mlflow_driver_and_worker_log_to_one_run_that_a_resume_continues(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    driver = build_tracker(MLFLOW, run_dir, "driver")
    driver.log_params(flat_params({"trainer": {"lr": 0.003, "epochs": 1}, "eval": {"ks": [100, 1000]}}))
    worker = build_tracker(MLFLOW, run_dir, "worker")  # another process in a real run: the same run id
    assert worker.run_id == driver.run_id
    worker.log_metrics({"train/loss": 2.5, "train/lr": 0.003, "epoch": 0, "flag": True, "name": "x"}, step=10)
    worker.log_metrics({"train/loss": 2.1}, step=20)
    driver.log_metrics(eval_metrics({"methods": ["model", "popularity"],
                                     "model": {"conversion": {100: 0.61, 1000: 0.92}},
                                     "popularity": {"conversion": {100: 0.2}}}), step=20)
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    history = [(m.step, m.value) for m in client.get_metric_history(driver.run_id, "train/loss")]
    assert history == [(10, 2.5), (20, 2.1)]
    data = client.get_run(driver.run_id).data
    assert data.params == {"trainer.lr": "0.003", "trainer.epochs": "1", "eval.ks": "[100, 1000]"}
    assert data.metrics["eval/model/conversion_recall_at_100"] == pytest.approx(0.61)
    assert data.metrics["eval/popularity/conversion_recall_at_100"] == pytest.approx(0.2)
    assert "flag" not in data.metrics and "name" not in data.metrics  # numbers only
    # the same run_name again, with more epochs: the same MLflow run, the change as a tag
    again = build_tracker(MLFLOW, run_dir, "driver")
    assert again.run_id == driver.run_id
    again.log_params(flat_params({"trainer": {"lr": 0.003, "epochs": 4}, "eval": {"ks": [100, 1000]}}))
    run = client.get_run(driver.run_id)
    assert run.data.params["trainer.epochs"] == "1" and run.data.tags["resumed.trainer.epochs"] == "4"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_mlflow_run_status_follows_the_driver(tmp_path):
    """RUNNING while training, FAILED when the driver saw an error, RUNNING again on the resume,
    FINISHED at the end; a worker's close leaves the status to the driver."""
    from mlflow.tracking import MlflowClient

    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    driver = build_tracker(MLFLOW, run_dir, "driver")
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    status = lambda: client.get_run(driver.run_id).info.status  # noqa: E731
    assert status() == "RUNNING"
    build_tracker(MLFLOW, run_dir, "worker").close()
    assert status() == "RUNNING"
    driver.close("FAILED")
    assert status() == "FAILED"
    resumed = build_tracker(MLFLOW, run_dir, "driver")
    assert resumed.run_id == driver.run_id and status() == "RUNNING"
    resumed.close()
    assert status() == "FINISHED"


def test_a_worker_without_the_drivers_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="the driver creates the MLflow run"):
        build_tracker(MLFLOW, str(tmp_path), "worker")


def test_tensorboard_event_files_hold_the_scalars_and_the_config(tmp_path):
    run_dir = str(tmp_path)
    driver, worker = build_tracker(TENSORBOARD, run_dir, "driver"), build_tracker(TENSORBOARD, run_dir, "worker")
    driver.log_params({"trainer.lr": "0.003"})
    worker.log_metrics({"train/loss": 2.5, "epoch/val_mean_recall": 0.4}, step=10)
    worker.log_metrics({"train/loss": 2.0}, step=20)
    driver.log_metrics({"eval/model/conversion_recall@100": 0.61}, step=20)
    driver.close()
    worker.close()
    scalars, texts = read_events(os.path.join(run_dir, "tensorboard"))
    assert scalars["train/loss"] == [(10, 2.5), (20, 2.0)]
    assert scalars["epoch/val_mean_recall"] == [(10, pytest.approx(0.4))]
    assert scalars["eval/model/conversion_recall_at_100"] == [(20, pytest.approx(0.61))]
    assert "trainer.lr = 0.003" in texts["config/text_summary"]


def test_no_tracker_writes_nothing_and_an_unknown_kind_is_refused(tmp_path):
    tracker = build_tracker({"kind": "none", "tracking_uri": None, "experiment": "raycg", "dir": None},
                            str(tmp_path), "driver")
    tracker.log_params({"a": "1"})
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    tracker.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="logger.kind='wandb'"):
        build_tracker({"kind": "wandb"}, str(tmp_path), "driver")


def test_flat_params_and_eval_metrics():
    assert flat_params({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
    assert eval_metrics({"methods": ["model"], "model": {"engagement": {"100": 0.5}}, "ks": [100]}) == {
        "eval/model/engagement_recall@100": 0.5}
