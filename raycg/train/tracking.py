"""Experiment tracking (`logger` config group): the run's config, training curves and results
to MLflow or TensorBoard, beside metrics.jsonl and eval.json.

    tracker = build_tracker(cfg["logger"], run_dir, role="driver")   # in the driver, before fit
    tracker.log_params(flat_params(config))                           # the composed run config
    tracker.log_metrics({"train/loss": 1.9, "train/lr": 3e-3}, step)  # rank 0, every log interval
    tracker.log_metrics({"eval/model/conversion_recall@100": 0.61}, step)  # tracked as ..._recall_at_100
    tracker.close()

Who logs what: the driver logs the config and the final evaluation; rank 0 of the training
loop logs `train/*` at every `trainer.log_every_steps` (where the loop reads the loss anyway)
and `epoch/*` (every numeric epoch metric, the validation recall included) after each epoch;
other ranks log nothing. `step` is the optimiser step of the run (it goes on counting after a
resume). A resumed run (same run_name) continues the same MLflow run: the driver keeps its id
in <run>/mlflow_run.json and the worker opens that run. Libraries are imported only by the
tracker that uses them (`none` costs nothing).
"""
from __future__ import annotations

import json
import os
import time

TRACKERS = ("none", "mlflow", "tensorboard")
MLFLOW_RUN_FILE = "mlflow_run.json"


class NoTracker:
    """logger=none."""

    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def numeric(metrics: dict) -> dict[str, float]:
    """The int/float values of a metrics dict (bools and strings left out)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def tag(name: str) -> str:
    """A metric name both tools accept: "@" (recall@100) is not allowed in MLflow names and
    TensorBoard tags, so recall@100 is tracked as recall_at_100."""
    return name.replace("@", "_at_")


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """{"trainer.lr": "0.003", ...}: the leaves of a nested config as strings."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def eval_metrics(results: dict) -> dict[str, float]:
    """raycg eval results -> {"eval/<method>/<task>_recall@<K>": value} for every method."""
    out = {}
    for method in results.get("methods", []):
        for task, by_k in results.get(method, {}).items():
            if isinstance(by_k, dict):
                out.update({f"eval/{method}/{task}_recall@{k}": float(v) for k, v in by_k.items()
                            if isinstance(v, (int, float))})
    return out


class MlflowTracker:
    """logger=mlflow: MlflowClient calls on one run (no global `mlflow.start_run` state, so the
    driver and a worker process can log to the same run)."""

    def __init__(self, cfg: dict, run_dir: str, role: str):
        from mlflow.tracking import MlflowClient

        self.uri = cfg["tracking_uri"] or f"sqlite:///{os.path.abspath(run_dir)}/mlflow.db"
        self.client = MlflowClient(self.uri)
        path = os.path.join(run_dir, MLFLOW_RUN_FILE)
        self.role = role
        if os.path.exists(path):  # a resumed run, or the worker of this run
            with open(path) as f:
                self.run_id = json.load(f)["run_id"]
            self.resumed = True
            if role == "driver":  # a resume: the run is live again (it ended FAILED or FINISHED)
                self.client.update_run(self.run_id, status="RUNNING")
        elif role == "driver":
            exp = self.client.get_experiment_by_name(cfg["experiment"])
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(cfg["experiment"])
            self.run_id = self.client.create_run(exp_id, run_name=os.path.basename(run_dir)).info.run_id
            with open(path, "w") as f:
                json.dump({"run_id": self.run_id, "tracking_uri": self.uri}, f)
            self.resumed = False
        else:
            raise FileNotFoundError(f"{path}: the driver creates the MLflow run before training (logger=mlflow)")

    def log_params(self, params: dict) -> None:
        """Params are immutable in MLflow: a resumed run logs the keys it did not have, and a
        changed value (e.g. trainer.epochs=8 after 4) as the tag `resumed.<key>`."""
        from mlflow.entities import Param, RunTag

        have = self.client.get_run(self.run_id).data.params if self.resumed else {}
        new = [Param(k, v[:6000]) for k, v in params.items() if k not in have]
        changed = [RunTag(f"resumed.{k}", v[:5000]) for k, v in params.items() if k in have and have[k] != v]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(tag(k), v, now, int(step)) for k, v in numeric(metrics).items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def close(self, status: str = "FINISHED") -> None:
        """The driver ends the run: FINISHED, or FAILED when training or evaluation raised (a
        resume sets it RUNNING again). A worker leaves it to the driver; every call is written."""
        if self.role == "driver":
            self.client.set_terminated(self.run_id, status)


class TensorBoardTracker:
    """logger=tensorboard: tensorboardX event files in logger.dir (default <run>/tensorboard);
    each process writes its own file there, TensorBoard reads them all."""

    def __init__(self, cfg: dict, run_dir: str, role: str):
        from tensorboardX import SummaryWriter

        self.dir = cfg["dir"] or os.path.join(run_dir, "tensorboard")
        self.writer = SummaryWriter(logdir=self.dir, filename_suffix=f".{role}")

    def log_params(self, params: dict) -> None:
        table = "\n".join(f"    {k} = {v}" for k, v in sorted(params.items()))  # 4 spaces: a Markdown code block
        self.writer.add_text("config", table, 0)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for k, v in numeric(metrics).items():
            self.writer.add_scalar(tag(k), v, int(step))
        self.writer.flush()  # at most once per log interval

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


def build_tracker(cfg: dict | None, run_dir: str, role: str):
    """The tracker of `logger.kind` for this process (`role`: driver or worker)."""
    kind = (cfg or {}).get("kind", "none")
    if kind == "none":
        return NoTracker()
    if kind == "mlflow":
        return MlflowTracker(cfg, run_dir, role)
    if kind == "tensorboard":
        return TensorBoardTracker(cfg, run_dir, role)
    raise ValueError(f"logger.kind={kind!r}: expected one of {list(TRACKERS)}")
