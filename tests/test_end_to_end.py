"""End to end on a real embedded Ray: simulate -> Ray Data -> Ray Train (2 DDP workers) -> faiss."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import pyarrow as pa

from conftest import compose
from raycg.data.pipeline import build_feature_store, checked_events, packed_training_dataset
from raycg.train.driver import run


def test_pipeline_row_accounting_and_batch_format(ray_session, small_data_dir):
    import pyarrow.parquet as pq

    train = os.path.join(small_data_dir, "events", "train")
    store = build_feature_store(train, os.path.join(small_data_dir, "items.parquet"), history_length=5)
    ds, stats = packed_training_dataset(train, store, batch_size=2048)
    events = pq.read_table(os.path.join(small_data_dir, "events", "train"), columns=["event_type"])
    positives = np.isin(events.column("event_type").to_numpy(zero_copy_only=False),
                        ["click", "save", "add_to_cart", "checkout"]).sum()
    assert stats["rows_read"] == events.num_rows
    assert stats["rows_used"] == positives
    assert stats["rows_used"] + stats["rows_not_positive"] == stats["rows_read"]
    batch = next(iter(ds.iter_torch_batches(batch_size=256)))
    # a handful of packed tensors, not one per column
    assert sorted(batch) == ["hist_actions", "hist_items", "item_cat", "item_dense", "signals", "user_cat", "user_dense"]
    assert tuple(batch["user_cat"].shape) == (256, 4) and tuple(batch["item_dense"].shape) == (256, 16 + 6)
    assert tuple(batch["user_dense"].shape) == (256, 6 + 16) and tuple(batch["hist_items"].shape) == (256, 5)


@pytest.fixture(scope="module")
def trained(ray_session, small_data_dir, tmp_path_factory):
    """One run on 2 DDP workers with every loss option on (logQ, cross-worker, mixed and hard
    negatives, advertiser loss), trained for 1 epoch and then resumed to 4 by the same command
    with more epochs. The tests below inspect it; eval.json is read here, before the evaluate
    CLI test writes it again."""
    runs = tmp_path_factory.mktemp("e2e")
    overrides = [
        "data=sim_small", f"data.dir={small_data_dir}", f"paths.runs_dir={runs}",
        "run_name=e2e", "trainer.num_workers=2", "trainer.batch_size=512", "loss=full",
        "logger=mlflow", "trainer.log_every_steps=5",
    ]
    first = run(compose(overrides + ["trainer.epochs=1", "export=false"]))  # the resumed run exports
    run_dir = runs / "e2e"
    first_lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    # the same run name again, with more epochs: resumes after epoch 0 instead of restarting
    results = run(compose(overrides + ["trainer.epochs=4"]))
    return SimpleNamespace(run_dir=run_dir, first=first, first_lines=first_lines, results=results,
                           lines=[json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
                           saved=json.loads((run_dir / "eval.json").read_text()))


def test_two_workers_resume_and_validate_every_epoch(trained):
    assert len(trained.first_lines) == 1 and json.loads(trained.first_lines[0])["epoch"] == 0
    lines = trained.lines
    assert [m["epoch"] for m in lines] == [0, 1, 2, 3]  # epoch 0 once: resumed, not restarted
    assert all(200 < m["peak_rss_mb"] < 24 * 1024 for m in lines)  # a worker with torch loaded, in MB (not KiB)
    assert lines[0] == json.loads(trained.first_lines[0])
    losses = [m["loss"] for m in lines]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    # validation-driven: recall on the validation window every epoch; the best epoch is evaluated
    val = [m["val_mean_recall"] for m in lines]
    assert all(0 < m["val_conversion_recall@100"] <= 1 for m in lines)
    assert all(v == pytest.approx(np.mean([m[k] for k in m if k.startswith("val_") and "recall@" in k]))
               for v, m in zip(val, lines))
    assert lines[-1]["best_epoch"] == int(np.argmax(val))
    assert trained.saved["checkpoint"] == str(trained.run_dir / "best")
    # the recent-item boost: fitted each epoch (b = 0, the towers alone, is a candidate), the best
    # epoch's saved with its checkpoint and evaluated
    assert all(m["val_mean_recall"] >= m["val_towers_mean_recall"] and m["val_recent_boost"] >= 0 for m in lines)
    best = json.loads((trained.run_dir / "best" / "meta.json").read_text())
    assert best["recent_boost"] == lines[best["epoch"]]["val_recent_boost"] == trained.saved["recent_boost"]["boost"]
    assert trained.saved["recent_boost"] == {"items": 50, "boost": best["recent_boost"],
                                             "source": "fitted on the validation window"}
    assert trained.first["model"]["conversion"][1000] <= 1.0
    # where it ran, kept with the results: 2 CPU workers on this host
    assert all(m["device"] == "cpu" for m in lines)
    env = trained.saved["environment"]
    assert (env["train_device"], env["train_workers"], env["cpus"]) == ("cpu", 2, os.cpu_count())
    import ray

    assert env["gpus"] == [] and env["ray"] == ray.__version__ and env["numpy"] == np.__version__


def test_two_workers_beat_popularity(trained):
    results, saved = trained.results, trained.saved
    assert saved["n_queries"]["conversion"] > 50
    model_r, pop_r = results["model"]["conversion"][100], results["popularity"]["conversion"][100]
    assert saved["model"]["conversion"]["100"] == model_r
    # a clear margin over popularity on held-out conversions
    assert model_r > 1.3 * pop_r and model_r - pop_r > 0.1, (model_r, pop_r)
    assert results["model"]["engagement"][100] > results["popularity"]["engagement"][100]
    # the baselines are scored on the same queries; ALS learns user taste that popularity lacks
    assert saved["methods"] == ["model", "popularity", "popularity_surface", "recent_engaged", "als_engagement",
                                "als_conversion"]
    # repeat vs novel positives, for every method: re-engagement owns the repeat part by
    # construction; the model must beat popularity where the user had not engaged before
    for method in saved["methods"]:
        assert {"conversion_repeat", "conversion_novel", "engagement_repeat", "engagement_novel"} <= set(
            saved[method])
    assert saved["recent_engaged"]["engagement_repeat"]["1000"] > 0.99
    assert saved["model"]["conversion_novel"]["100"] > saved["popularity"]["conversion_novel"]["100"] + 0.1
    assert 0 < saved["repeat_share"]["conversion"] < 0.5  # attributed to the click: mostly novel
    assert results["als_engagement"]["engagement"][100] > results["popularity"]["engagement"][100] + 0.05
    assert 0.9 < saved["als_coverage"]["als_engagement"]["engagement"] <= 1.0
    assert saved["als_coverage"]["als_conversion"]["engagement"] < saved["als_coverage"]["als_engagement"]["engagement"]
    by_surface = saved["detail"]["popularity_surface"]["engagement"]["100"]["by_group"]
    assert sorted(by_surface) == ["home", "related", "search"]


def test_full_objective_state_is_checkpointed_across_the_resume(trained):
    """logQ + cross-worker + mixed + hard negatives + advertiser loss: every part is trained, and
    the step counter and the logQ estimator survive the resume."""
    import torch

    lines = trained.lines
    for m in lines:
        assert all(math.isfinite(m[k]) for k in m if isinstance(m[k], float))
    state = torch.load(os.path.join(trained.results["checkpoint"], "model.pt"), weights_only=True)
    assert state["epoch"] == lines[-1]["best_epoch"]
    assert state["step"] == sum(m["steps"] for m in lines[:state["epoch"] + 1])  # counted on after the resume
    freq = state["freq"]  # the logQ estimator is checkpointed
    assert (freq["A"] >= 0).sum() > 100 and freq["A"].max() == state["step"] - 1


def test_mlflow_holds_the_curves_and_results_of_the_resumed_run(trained):
    """logger=mlflow through the real run: one MLflow run across the resume, the config as params,
    rank 0's per-step curves, every epoch's metrics (validation recall) and the final evaluation."""
    from mlflow.tracking import MlflowClient

    info = json.loads((trained.run_dir / "mlflow_run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["run_id"])
    assert len(client.search_runs([run.info.experiment_id])) == 1  # resumed, not a second run
    assert run.info.status == "FINISHED" and run.info.end_time is not None  # ended by the driver
    assert run.data.params["trainer.num_workers"] == "2" and run.data.params["loss.mixed_negatives"] != ""
    assert run.data.params["trainer.epochs"] == "1" and run.data.tags["resumed.trainer.epochs"] == "4"
    lines = trained.lines
    epochs = client.get_metric_history(run.info.run_id, "epoch/epoch")
    assert [m.value for m in epochs] == [0, 1, 2, 3]
    steps_per_epoch = lines[0]["steps"]
    assert [m.step for m in epochs] == [steps_per_epoch * (e + 1) for e in range(4)]  # optimiser steps, on after the resume
    val = client.get_metric_history(run.info.run_id, "epoch/val_mean_recall")
    assert [m.value for m in val] == pytest.approx([m["val_mean_recall"] for m in lines])
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(loss) >= 4 * (steps_per_epoch // 5) and all(math.isfinite(m.value) for m in loss)
    assert [m.step for m in loss] == sorted(m.step for m in loss) and loss[-1].step > steps_per_epoch
    for key in ("train/lr", "train/rows_per_s", "train/loss_unified"):
        assert client.get_metric_history(run.info.run_id, key), key
    assert run.data.metrics["eval/model/conversion_recall_at_100"] == pytest.approx(
        trained.results["model"]["conversion"][100])
    assert run.data.metrics["eval/popularity/engagement_recall_at_100"] == pytest.approx(
        trained.results["popularity"]["engagement"][100])


def test_evaluate_cli_reevaluates_the_same_checkpoint(trained):
    # python -m raycg.evaluate on the same run, other eval settings: same checkpoint, same recall;
    # the run embedded its small corpus and query sets in the driver, this one on Ray Data actors
    from raycg.evaluate import main as evaluate_main

    run_dir = trained.run_dir
    evaluate_main([f"run_dir={run_dir}", "eval.ks=[10,100]", "eval.baselines=[popularity]",
                   "eval.ray_inference_min_rows=0"])
    again = json.loads((run_dir / "eval.json").read_text())
    assert again["ks"] == [10, 100] and again["methods"] == ["model", "popularity"]
    assert again["checkpoint"] == trained.saved["checkpoint"]
    # the training's record is kept (epochs' metrics, where it trained); where this evaluation ran is added
    assert again["train_metrics"] == trained.saved["train_metrics"]
    assert again["environment"] == trained.saved["environment"]
    assert again["evaluation_environment"]["cpus"] == os.cpu_count()
    assert again["model"]["conversion"]["100"] == pytest.approx(trained.results["model"]["conversion"][100], abs=1e-9)
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="Could not override 'ks'"):
        evaluate_main([f"run_dir={run_dir}", "ks=[10]"])


def test_export_cli_writes_a_complete_export_elsewhere(trained, tmp_path):
    # python -m raycg.export on the same run: towers, feature tables, item embeddings and index
    from raycg.checksums import verify_checksums
    from raycg.export import main as export_main
    from raycg.model.export import FORMAT_VERSION

    out = tmp_path / "export"
    export_main([f"run_dir={trained.run_dir}", f"out={out}"])
    assert {"user_tower.pt2", "item_tower.pt2", "feature_spec.json", "items.parquet", "users.parquet",
            "item_embeddings.parquet", "items.faiss", "index.json", "checksums.json"} <= set(os.listdir(out))
    verify_checksums(str(out))
    assert json.loads((out / "feature_spec.json").read_text())["format_version"] == FORMAT_VERSION
    index = json.loads((out / "index.json").read_text())
    assert index["recall"]["value"] == 1.0  # exact index: small corpus
    assert (index["recent_items"], index["recent_boost"]) == (50, trained.saved["recent_boost"]["boost"])


class _Captured(Exception):
    """Raised by the stand-in TorchTrainer: the driver got as far as handing data to Ray Train."""


def training_inputs(monkeypatch, cfg) -> dict:
    """What `raycg.train.driver.run(cfg)` hands to Ray Train (train_loop_config, datasets), from
    the driver's own composition (paths, data checks, feature store, packing); stops there."""
    from raycg.train import driver

    captured = {}

    def capture(*args, **kwargs):
        captured.update(kwargs)
        raise _Captured

    with monkeypatch.context() as m:
        m.setattr(driver, "TorchTrainer", capture)
        with pytest.raises(_Captured):
            driver.run(cfg)
    return captured


def test_eval_window_cannot_change_training_features(ray_session, small_data_dir, tmp_path, monkeypatch):
    """User/item stats and training histories come from the training split only: a dataset whose
    eval split has extra conversions for existing users/items gives the workers exactly the same
    training rows and feature store, through the driver's own paths (data.dir -> train/eval)."""
    import shutil

    import pyarrow.parquet as pq

    from raycg.data.sim.config import SIM_EVENT_SCHEMA

    # a copy of the dataset whose eval split has extra conversions for existing users/items
    other = tmp_path / "data"
    shutil.copytree(small_data_dir, other)
    ev = pq.read_table(other / "events" / "eval" / "part-00000.parquet")
    extra = ev.slice(0, 500).set_column(4, "event_type", pa.array(["checkout"] * 500)).cast(SIM_EVENT_SCHEMA)
    pq.write_table(extra, other / "events" / "eval" / "part-extra.parquet")

    def inputs(data_dir, name):
        # deterministic: rows in file order, so the two runs compare row by row
        cfg = compose(["data=sim_small", f"data.dir={data_dir}", f"paths.runs_dir={tmp_path / 'runs'}",
                       f"run_name={name}", "trainer.deterministic=true"])
        got = training_inputs(monkeypatch, cfg)
        config = got["train_loop_config"]
        return ray_session.get(config["store_ref"][0]), got["datasets"]["train"].to_pandas(), config

    store_a, rows_a, config_a = inputs(small_data_dir, "a")
    store_b, rows_b, config_b = inputs(str(other), "b")
    assert config_b["data"]["eval_path"] == str(other / "events" / "eval")  # the copy, not the original
    assert config_a["model"]["history"]["length"] > 0 and len(rows_a) > 1000
    assert np.array_equal(store_a.items.dense, store_b.items.dense)
    assert np.array_equal(store_a.users.dense, store_b.users.dense)
    assert store_a.vocab.keys() == store_b.vocab.keys()
    assert all(np.array_equal(store_a.vocab[k], store_b.vocab[k]) for k in store_a.vocab)
    assert config_a["feature_spec"] == config_b["feature_spec"]  # normalisation statistics too
    assert config_a["data_stats"]["rows_used"] == config_b["data_stats"]["rows_used"]
    for col in ("user_cat", "item_cat", "user_dense", "item_dense", "hist_items", "hist_actions"):
        assert np.array_equal(np.stack(rows_a[col]), np.stack(rows_b[col])), col
    # and the eval split did change: the extra conversions are there for the evaluation to see
    assert config_b["data_stats"]["eval"]["rows_read"] == config_a["data_stats"]["eval"]["rows_read"] + 500


def test_bad_shard_fails_clearly_or_is_quarantined_and_counted(ray_session, small_data_dir, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    from raycg.data.sim.config import SIM_EVENT_SCHEMA

    root = tmp_path / "data"
    shutil.copytree(small_data_dir, root)
    train = root / "events" / "train"
    good = pq.read_table(train / "part-00000.parquet").slice(0, 300).cast(SIM_EVENT_SCHEMA)
    # one second later than the originals, so no row duplicates an existing event
    good = good.set_column(6, "timestamp", pa.array(np.asarray(good.column("timestamp")) + 1, pa.int64()))
    bad = good.set_column(4, "event_type", pa.array(["click"] * 100 + ["buy"] * 100 + ["click"] * 100))
    dur = np.asarray(bad.column("click_duration")).copy()
    dur[:50] = -1.0
    bad = bad.set_column(5, "click_duration", pa.array(dur, pa.float32()))
    pq.write_table(bad, train / "part-bad.parquet")  # 150 bad rows, 150 good clicks

    store = build_feature_store(str(train), str(root / "items.parquet"))
    with pytest.raises(Exception, match=r"part-bad\.parquet: column '(event_type|click_duration)'"):
        packed_training_dataset(str(train), store)

    ds, stats = packed_training_dataset(str(train), store, quarantine_dir=str(tmp_path / "q"))
    assert stats["rows_quarantined"] == 150
    events = pq.read_table(os.path.join(small_data_dir, "events", "train"), columns=["event_type"])
    positives = np.isin(events.column("event_type").to_numpy(zero_copy_only=False),
                        ["click", "save", "add_to_cart", "checkout"]).sum()
    assert stats["rows_used"] == positives + 150  # the 150 good clicks of the bad shard are kept
    assert stats["rows_used"] + stats["rows_not_positive"] + stats["rows_quarantined"] == stats["rows_read"]
    reasons = pq.read_table(tmp_path / "q").column("quarantine_reason").to_pylist()
    assert sorted(set(reasons)) == ["click_duration:bad_float", "event_type:unknown_value"]

    # the evaluation split's check (checked_events, files read in threads) has the same two modes;
    # the bad shard sorts between good ones, so the error must name it whatever order threads finish
    evals = tmp_path / "eval"
    evals.mkdir()
    for i, table in enumerate([good, bad, good]):  # timestamps shifted per file: no duplicate events
        shifted = table.set_column(6, "timestamp", pa.array(np.asarray(table.column("timestamp")) + i, pa.int64()))
        pq.write_table(shifted, evals / f"part-{i}.parquet")
    with pytest.raises(Exception, match=r"part-1\.parquet: column '(event_type|click_duration)'"):
        checked_events(str(evals), store)
    kept, stats = checked_events(str(evals), store, quarantine_dir=str(tmp_path / "qe"))
    assert stats == {"rows_read": 900, "rows_quarantined": 150, "rows_used": 750, "files_empty": 0}
    assert kept.num_rows == 750 and pq.read_table(tmp_path / "qe").num_rows == 150
