"""Reliability end to end (docs/reliability.md): bad evaluation data, empty shards, damaged
checkpoints, loopback-only Ray, failing fast before Ray starts, determinism."""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, compose, tiny_overrides
from raycg.data.schema import EventSchemaError
from raycg.train.driver import run
from raycg.train.preflight import PreflightError


def files_dir(sim_dir: str, out: str, eval_edit=None, users_edit=None, empty_train_shard=False) -> str:
    """A `data=files` directory linking the simulated data in `sim_dir`, with an edited copy of the first eval
    file (`eval_edit(table) -> table`) and/or users table, and optionally an empty train shard."""
    os.makedirs(os.path.join(out, "events"), exist_ok=True)
    os.symlink(os.path.join(sim_dir, "items.parquet"), os.path.join(out, "items.parquet"))
    src_train = os.path.join(sim_dir, "events", "train")
    if empty_train_shard:
        shutil.copytree(src_train, os.path.join(out, "events", "train"))
        first = sorted(os.listdir(src_train))[0]
        table = pq.read_table(os.path.join(src_train, first))
        pq.write_table(table.slice(0, 0), os.path.join(out, "events", "train", "part-empty.parquet"))
    else:
        os.symlink(src_train, os.path.join(out, "events", "train"))
    shutil.copytree(os.path.join(sim_dir, "events", "eval"), os.path.join(out, "events", "eval"))
    if eval_edit is not None:
        first = os.path.join(out, "events", "eval", sorted(os.listdir(os.path.join(out, "events", "eval")))[0])
        pq.write_table(eval_edit(pq.read_table(first)), first)
    users = pq.read_table(os.path.join(sim_dir, "users.parquet"))
    pq.write_table(users_edit(users) if users_edit else users, os.path.join(out, "users.parquet"))
    return out


def overrides(data_dir: str, runs: str, name: str, *extra: str) -> list[str]:
    return ["data=files", f"data.dir={data_dir}", "data.users_path=${data.dir}/users.parquet",
            "data.item_categorical=[tier]", "data.user_categorical=[segment]", f"paths.runs_dir={runs}",
            f"run_name={name}", "trainer.num_workers=1", "trainer.batch_size=512", "trainer.epochs=1",
            "eval.baselines=[popularity]", "export=false", *extra]


def set_item(table: pa.Table, rows: int, value: int) -> pa.Table:
    """Conversion rows are what evaluation queries on: give the first `rows` of them `value`."""
    conv = np.flatnonzero(np.isin(table.column("event_type").to_numpy(zero_copy_only=False),
                                  ["add_to_cart", "checkout"]))[:rows]
    items = table.column("item_id").to_numpy().copy()
    items[conv] = value
    return table.set_column(table.schema.get_field_index("item_id"), "item_id", pa.array(items, pa.int64()))


@pytest.mark.parametrize("value,message", [
    (-5, r"eval/part-\d+\.parquet: column 'item_id' has 20 of \d+ rows below 0, e\.g\. -5"),
    (10**9, r"eval/part-\d+\.parquet: column 'item_id' has 20 of \d+ rows not in the item table"),
])
def test_bad_eval_rows_stop_the_run_before_training(ray_session, tiny_data_dir, tmp_path, value, message):
    data = files_dir(tiny_data_dir, str(tmp_path / "data"), eval_edit=lambda t: set_item(t, 20, value))
    with pytest.raises(EventSchemaError, match=message):
        run(compose(overrides(data, str(tmp_path / "runs"), "bad_eval")))
    assert not os.path.exists(tmp_path / "runs" / "bad_eval" / "metrics.jsonl")  # nothing was trained


def dup_user(users: pa.Table) -> pa.Table:
    return pa.concat_tables([users, users.slice(0, 1)])


def test_quarantine_accounts_for_every_split(deterministic_pair):
    # run a of the pair: an empty training shard, 5 evaluation rows with item_id -5 and a
    # duplicated user, with data.on_bad_rows=quarantine
    run_dir = deterministic_pair.runs / "a"
    results = deterministic_pair.results["a"]
    saved = json.loads((run_dir / "eval.json").read_text())
    rows = saved["eval_rows"]
    assert rows["rows_quarantined"] == 5 and rows["rows_used"] == rows["rows_read"] - 5
    quarantined = pq.read_table(run_dir / "quarantine" / "eval")
    assert quarantined.num_rows == 5 and set(quarantined.column("quarantine_reason").to_pylist()) == {
        "item_id:below_min"}
    stats = json.loads((run_dir / "data_stats.json").read_text())
    assert stats["files_empty"] == 1 and stats["users_rows_quarantined"] == 1
    assert stats["eval"] == rows
    assert pq.read_table(run_dir / "quarantine" / "users" / "users.parquet").column(
        "quarantine_reason").to_pylist() == ["user_id:duplicate"]
    out = deterministic_pair.out_a
    assert "skipped 1 empty Parquet file" in out
    assert "WARNING: 5 of" in out and "evaluation rows" in out and "max_quarantined_fraction" in out
    assert results["model"]["conversion"][100] > 0


def damage(path, nbytes=512):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2:len(data) // 2 + nbytes] = np.random.default_rng(0).integers(0, 256, nbytes, np.uint8).tobytes()
    open(path, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def deterministic_pair(ray_session, tiny_data_dir, tmp_path_factory):
    """Two runs of the same deterministic config under different names (2 workers, 2 epochs,
    3 checkpoints kept) on a copy of the tiny dataset with rows to quarantine (an empty training
    shard, 5 evaluation rows with item_id -5, a duplicated user). Their metrics, results and
    run a's output are read here: the quarantine test reads run a, the damaged-checkpoint test
    goes on with run b."""
    root = tmp_path_factory.mktemp("det")
    data = files_dir(tiny_data_dir, str(root / "data"), eval_edit=lambda t: set_item(t, 5, -5),
                     users_edit=dup_user, empty_train_shard=True)
    runs = root / "runs"

    def args(name):
        return ["data=files", f"data.dir={data}", "data.users_path=${data.dir}/users.parquet",
                "data.item_categorical=[tier]", "data.user_categorical=[segment]", f"paths.runs_dir={runs}",
                f"run_name={name}", "trainer.batch_size=128", "trainer.deterministic=true",
                "trainer.checkpoints_to_keep=3", "eval.baselines=[popularity]", "export=false",
                "data.on_bad_rows=quarantine", "data.max_quarantined_fraction=0.0001"]

    with contextlib.redirect_stdout(io.StringIO()) as out_a:  # raycg's log lines go to the current stdout
        results = {"a": run(compose(args("a") + ["trainer.epochs=2"]))}
    results["b"] = run(compose(args("b") + ["trainer.epochs=2"]))
    metrics = {name: [json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
               for name in results}
    return SimpleNamespace(runs=runs, args=args, results=results, metrics=metrics, out_a=out_a.getvalue())


TIMINGS = {"epoch_s", "rows_per_s", "data_wait_s", "validation_s", "peak_rss_mb"}  # measured, not computed


def test_deterministic_runs_are_bit_identical(deterministic_pair):
    a, b = (deterministic_pair.metrics[n] for n in ("a", "b"))
    assert [m["epoch"] for m in a] == [m["epoch"] for m in b] == [0, 1]
    for ma, mb in zip(a, b):  # every loss part and validation recall of every epoch, exactly
        assert {k: v for k, v in ma.items() if k not in TIMINGS} == {k: v for k, v in mb.items() if k not in TIMINGS}
    assert a[0]["loss"] != a[1]["loss"]  # (and the model did train)
    ra, rb = (deterministic_pair.results[n] for n in ("a", "b"))
    assert ra["model"] == rb["model"]  # the same weights: the same recall


def test_damaged_newest_checkpoint_resumes_from_an_intact_one(deterministic_pair):
    from raycg.model.checkpoint import evaluation_checkpoint, load_model

    run_dir = deterministic_pair.runs / "b"
    newest = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_2"))[-1]  # checkpoint_<time>
    damage(run_dir / newest / "model.pt")
    # and a line written for an epoch whose checkpoint Ray never committed (worker killed)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "loss": 0.0}) + "\n")
    # the same command again with one more epoch: resumes after epoch 0 (the newest intact checkpoint)
    results = run(compose(deterministic_pair.args("b") + ["trainer.epochs=3"]))
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]
    # evaluated from an intact checkpoint, and `python -m raycg.evaluate` picks one too
    assert results["checkpoint"] != str(run_dir / newest)
    chosen = evaluation_checkpoint(str(run_dir))
    assert chosen != str(run_dir / newest)
    load_model(chosen)


def test_batch_larger_than_the_split_is_one_clear_error(ray_session, tiny_data_dir, tmp_path):
    # with the batch size kept as given (min_steps_per_epoch=0), a batch larger than a worker's
    # share of the split stops the run before any worker starts
    with pytest.raises(PreflightError, match=r"trainer.batch_size=20000 x trainer.num_workers=2: the training "
                                             r"split has [\d,]+ positive rows, [\d,]+ per worker"):
        run(compose([*tiny_overrides(tiny_data_dir), f"paths.runs_dir={tmp_path}",
                     "trainer.batch_size=20000", "trainer.min_steps_per_epoch=0"]))


def test_small_split_gets_a_smaller_batch(capsys):
    from raycg.train.driver import fit_batch_size

    cfg = compose([])
    assert cfg.trainer.batch_size == 1024 and cfg.trainer.min_steps_per_epoch == 8
    fit_batch_size(cfg, 1_555)  # 1,555 rows per worker: halve until 8 steps fit -> 128 (12 steps)
    assert cfg.trainer.batch_size == 128 and "trainer.batch_size 1024 -> 128 (12 steps per epoch" in capsys.readouterr().out
    fit_batch_size(cfg, 100)  # never below 16
    assert cfg.trainer.batch_size == 16
    big = compose([])
    fit_batch_size(big, 8 * 1024)  # enough rows: unchanged
    assert big.trainer.batch_size == 1024


def test_auto_epochs_reach_min_steps_on_a_small_split_and_an_explicit_count_is_kept(capsys):
    from raycg.train.driver import fit_epochs

    cfg = compose([])
    assert cfg.trainer.epochs is None and cfg.trainer.min_steps == 250 and cfg.trainer.batch_size == 1024
    fit_epochs(cfg, 14 * 1024)  # 14 steps per epoch (the REES46 sample): 4 epochs are 56 steps -> 18 epochs
    assert cfg.trainer.epochs == 18 and "14 steps per epoch: 18 epochs for trainer.min_steps=250" in capsys.readouterr().out
    big = compose([])
    fit_epochs(big, 106 * 1024)  # the simulated default: 4 x 106 = 424 steps >= 250
    assert big.trainer.epochs == 4 and capsys.readouterr().out == ""
    streamed = compose([])
    fit_epochs(streamed, None)  # rows not counted (data.materialize=false): 4
    assert streamed.trainer.epochs == 4
    given = compose(["trainer.epochs=2"])
    fit_epochs(given, 10 * 1024)
    assert given.trainer.epochs == 2


def raycg_train(tmp_path, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raycg.train", f"paths.runs_dir={tmp_path}/runs", "run_name=x",
                           "ray.num_cpus=2", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.parametrize("args,message", [
    # Hydra's message, at composition (raycg.config.schema)
    (["model.cross=stakced"], "Invalid value 'stakced', expected one of [parallel, stacked, cross_only, mlp_only]"),
    (["trainer.epochs=0"], "trainer.epochs=0: must be a number >= 1"),
    (["data=files", "data.dir=/nonexistent/logs"], "data.dir=/nonexistent/logs: no such directory"),
])
def test_bad_settings_fail_before_ray_starts(tmp_path, args, message):
    proc = raycg_train(tmp_path, *args)
    assert proc.returncode != 0 and message in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr  # the message, not a stack
    assert "[raycg] data:" not in proc.stdout and "Started a local Ray instance" not in proc.stderr
    assert not os.path.exists(tmp_path / "runs")  # no half-made run directory


def test_infeasible_workers_fail_at_once(ray_session, tmp_path, capsys):
    # the embedded Ray of the session has 2 CPUs (as `ray.num_cpus=2` gives the CLI): 5 workers x
    # 0.45 CPU cannot be placed, and the run stops at once, before any data or run directory exists
    message = ("trainer.num_workers=5 x trainer.cpus_per_worker=0.45 does not fit the embedded Ray (CPU: 2.25 asked, "
               "2 in the cluster)")
    with pytest.raises(PreflightError, match=re.escape(message)):
        run(compose(["experiment=smoke", "trainer.num_workers=5", f"paths.runs_dir={tmp_path}/runs", "run_name=x",
                     f"data.dir={tmp_path}/data"]))
    assert "[raycg] data:" not in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "data")


LISTEN = """
import json, psutil
from omegaconf import OmegaConf
from raycg.train.driver import init_ray
init_ray(OmegaConf.create({"ray": {"address": None, "num_cpus": 1, "include_dashboard": True},
                           "trainer": {"deterministic": False}}))
import time; time.sleep(2)
me = psutil.Process()
pids = {p.pid for p in [me] + me.children(recursive=True)}
print(json.dumps(sorted({(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                         if c.status == psutil.CONN_LISTEN and c.pid in pids})))
"""


@pytest.mark.slow  # starts a real Ray (in a subprocess)
def test_embedded_ray_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", LISTEN], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listening = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(listening) >= 5  # GCS, raylet, dashboard, agents, workers
    exposed = [(ip, port) for ip, port in listening if ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_worker_progress_line_is_printed_once(capfd):
    # Ray Train replaces `print` in workers with one that prints AND logs (each line twice)
    import builtins
    import logging

    from ray.train.v2._internal.logging.patch_print import redirected_print

    from raycg.train.loop import worker_logger

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    original = builtins.print
    builtins.print = redirected_print
    try:
        worker_logger(0).info("epoch 0 done")
    finally:
        builtins.print = original
        logging.getLogger().removeHandler(handler)
    assert capfd.readouterr().out.count("[raycg] epoch 0 done") == 1 and records == []


def test_failed_run_says_how_to_resume(ray_session, tiny_data_dir, tmp_path, capsys):
    with pytest.raises(Exception, match="training loss is nan"):  # lr 1e30: the loss explodes
        run(compose([*tiny_overrides(tiny_data_dir), f"paths.runs_dir={tmp_path}",
                     "run_name=boom", "trainer.num_workers=1", "trainer.epochs=1", "trainer.batch_size=512",
                     "trainer.lr=1e30", "eval.baselines=[popularity]", "logger=mlflow"]))
    out = capsys.readouterr().out
    assert "Running the same command again (run_name=boom) resumes" in out and "trainer.max_failures" in out
    from mlflow.tracking import MlflowClient  # the tracked run says it failed, not RUNNING forever

    info = json.loads((tmp_path / "boom" / "mlflow_run.json").read_text())
    assert MlflowClient(info["tracking_uri"]).get_run(info["run_id"]).info.status == "FAILED"


def test_gpu_shares_reach_ray_and_bad_ones_fail_before_it():
    """trainer.gpus_per_worker and eval.actor_gpus: a fraction lets several Tune trials share a
    GPU. The preflight sums them, Ray Train's workers and the evaluation's Ray Data actors ask
    for exactly that share, and a share Ray cannot place fails at composition time."""
    from raycg.eval.embed import _map_kwargs
    from raycg.train.preflight import check_config, required_resources

    shared = compose(["trainer=gpu", "trainer.num_workers=2", "trainer.gpus_per_worker=0.25", "eval.actor_gpus=0.25"])
    check_config(shared)
    assert required_resources(shared) == {"CPU": 8, "GPU": 0.5}
    assert required_resources(compose(["trainer=gpu", "trainer.num_workers=2"])) == {"CPU": 8, "GPU": 2.0}
    assert "GPU" not in required_resources(compose([]))  # CPU workers ask for no GPU, whatever the share
    assert _map_kwargs("ckpt", [], 64, True, 0.25)["num_gpus"] == 0.25
    assert _map_kwargs("ckpt", [], 64, False, 0.25)["num_gpus"] == 0
    for bad in (["trainer.gpus_per_worker=1.5"], ["trainer.gpus_per_worker=0"], ["eval.actor_gpus=-1"]):
        with pytest.raises(PreflightError, match=re.escape(bad[0]) + ": expected a fraction"):
            check_config(compose(["trainer=gpu", *bad]))


def test_sparse_tables_under_torch_compile_are_refused_with_the_two_ways_out():
    from raycg.train.preflight import check_config

    # torch.compile's backward of a sparse embedding fails (CPU and CUDA): refused before Ray starts
    with pytest.raises(PreflightError, match=r"model.sparse_tables=true with trainer.compile=true: .* set "
                                             r"trainer.compile=false .*or model.sparse_tables=false"):
        check_config(compose(["trainer=gpu", "model.sparse_tables=true"]))
    check_config(compose(["trainer=gpu", "model.sparse_tables=true", "trainer.compile=false"]))
    check_config(compose(["model.sparse_tables=true"]))  # the CPU trainer does not compile


def test_advertiser_block_rows_is_null_or_positive():
    from raycg.train.preflight import check_config

    check_config(compose(["loss.advertiser_block_rows=4096"]))
    check_config(compose(["loss.advertiser_block_rows=null"]))
    with pytest.raises(PreflightError, match=r"loss.advertiser_block_rows=0: must be a number >= 1"):
        check_config(compose(["loss.advertiser_block_rows=0"]))


def test_shuffle_once_needs_a_materialized_split():
    from raycg.train.preflight import check_config

    check_config(compose(["data.materialize=false", "data.shuffle=epoch"]))
    check_config(compose(["data.materialize=false", "data.shuffle=none"]))
    with pytest.raises(PreflightError, match=r"data.shuffle=once with data.materialize=false: .*data.shuffle=epoch"):
        check_config(compose(["data.materialize=false", "data.shuffle=once"]))
    with pytest.raises(Exception) as bad:
        compose(["data.shuffle=global"])
    assert "Invalid value 'global', expected one of [none, once, epoch]" in str(bad.value.__cause__)
