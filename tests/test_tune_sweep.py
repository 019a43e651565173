"""A real Ray Tune sweep (raycg.tune.sweep): Optuna TPE + ASHA on the per-epoch validation recall,
2 trials of 2 epochs on the tiny simulated dataset; the settings it checks before Ray starts."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import tiny_overrides
from raycg.tune import sweep


def test_search_space_parsing():
    cfg = sweep.compose_sweep(["tune.search_space.loss.t_max={type:choice,values:[30,120]}",
                               "~tune.search_space.loss.engagement_weight"])
    from omegaconf import OmegaConf
    space = OmegaConf.to_container(cfg.tune.search_space)
    assert sweep.swept_keys(space) == ["loss.conversion_weight", "loss.t_max", "loss.advertiser_weight",
                                       "model.temperature", "trainer.lr"]
    params = sweep.build_param_space(space)
    assert params["loss"]["t_max"].categories == [30, 120]
    assert params["trainer"]["lr"].lower == 0.001 and params["trainer"]["lr"].upper == 0.01
    assert "trainer" in cfg and cfg.tune.metric == "conversion_recall@100"
    assert (cfg.tune.searcher, cfg.tune.scheduler, cfg.tune.scheduler_metric) == ("optuna", "asha", "val_mean_recall")


@pytest.mark.parametrize("overrides,message", [
    (["tune.metric=conversion_recall@50"], "is not reported"),  # not in eval.ks
    (["tune.search_space.loss.t_max={type:grid,values:[30,120]}"], r"\['loss.t_max'\]: `grid` leaves need tune.searcher=random"),
    (["data.validation_fraction=0"], "no validation window"),
    (["tune.scheduler_metric=val_loss"], "is not reported after each epoch"),
    (["tune.grace_period=9", "trainer.epochs=2"], "must be 1..trainer.epochs=2"),
    (["tune.search_space.loss.t_max={type:normal,values:[1,2]}"], "unknown type 'normal'"),
])
def test_bad_sweep_settings_fail_before_ray_starts(overrides, message):
    import ray

    cfg = sweep.compose_sweep(overrides)
    started = ray.is_initialized()
    with pytest.raises(ValueError, match=message):
        sweep.run_sweep(cfg)
    assert ray.is_initialized() == started


def test_the_best_trial_becomes_an_experiment_that_replays(tmp_path):
    from conftest import compose

    summary = {"metric": "conversion_recall@100", "mode": "max",
               "best": {"trial": "t1", "value": 0.5, "params": {"loss.conversion_weight": 2.5, "trainer.lr": 0.0042,
                                                               "loss.t_max": 30.0}}}
    exp = sweep.write_experiment(summary, str(tmp_path), "mysweep")
    assert exp["name"] == "mysweep_best" and exp["path"] == str(tmp_path / "experiment" / "mysweep_best.yaml")
    overrides = [a.strip("'") for a in exp["replay"].split()[3:]]  # python -m raycg.train <overrides>
    cfg = compose(overrides)
    assert (cfg.loss.conversion_weight, cfg.trainer.lr, cfg.loss.t_max) == (2.5, 0.0042, 30.0)
    assert cfg.loss.engagement_weight == compose([]).loss.engagement_weight  # what was not swept stays


def test_sweep_optuna_asha(ray_session, tiny_data_dir, tmp_path):
    cfg = sweep.compose_sweep([  # each trial: 1 worker, 2 epochs on the tiny dataset, one baseline
        *tiny_overrides(tiny_data_dir), f"paths.runs_dir={tmp_path}",
        "trainer.epochs=2", "trainer.num_workers=1", "trainer.batch_size=256", "eval.ks=[10,100]",
        "eval.baselines=[popularity]", "tune.name=test-sweep", "tune.num_samples=2",
        "~tune.search_space.loss.engagement_weight", "~tune.search_space.loss.t_max",
        "~tune.search_space.loss.advertiser_weight", "~tune.search_space.model",
    ])
    grid, summary = sweep.run_sweep(cfg)
    metric = "conversion_recall@100"
    sweep_dir = tmp_path / "test-sweep"

    assert len(grid) == 2 and grid.num_errors == 0, grid.errors
    assert summary["keys"] == ["loss.conversion_weight", "trainer.lr"]
    finished = [r for r in summary["trials"] if r["stopped_after_epochs"] is None]
    assert finished and summary["best"]["trial"] in [r["trial"] for r in finished]  # ASHA stops at most one
    for row, result in zip(summary["trials"], grid):
        assert result.error is None
        # Tune saw the validation recall after each epoch (what Optuna and ASHA read)
        assert 1 <= len(row["curve"]) <= 2 and all(0.0 <= v <= 1.0 for v in row["curve"])
        if row["stopped_after_epochs"] is not None:
            continue
        assert len(row["curve"]) == 2
        value = result.metrics[metric]
        assert 0.0 <= value <= 1.0
        # The trial's run directory is its own, inside the sweep, and trained with its params.
        run_dir = result.metrics["run_dir"]
        assert run_dir.startswith(os.path.join(str(tmp_path), "test-sweep", "runs") + os.sep)
        with open(os.path.join(run_dir, "config.yaml")) as f:
            run_cfg = yaml.safe_load(f)
        assert run_cfg["loss"]["conversion_weight"] == result.config["loss"]["conversion_weight"]
        assert run_cfg["trainer"]["lr"] == result.config["trainer"]["lr"]
        assert 0.5 <= run_cfg["loss"]["conversion_weight"] <= 3.0 and 0.001 <= run_cfg["trainer"]["lr"] <= 0.01
        with open(os.path.join(run_dir, "eval.json")) as f:
            assert json.load(f)["model"]["conversion"]["100"] == value
        assert not os.path.exists(os.path.join(run_dir, "export"))  # trials keep recall, no serving export
        assert result.metrics["training_iteration"] == 3  # 2 epochs via TuneReportCallback + the final report

    best = summary["best"]
    assert best["value"] == max(r["metrics"][metric] for r in finished)
    with open(sweep_dir / "sweep.json") as f:
        assert json.load(f)["best"]["trial"] == best["trial"]
    table = (sweep_dir / "sweep.md").read_text()
    assert "<- best" in table and "trials/hour" in table and "optuna search, asha scheduler" in table
    assert (sweep_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the best trial as an experiment file: the printed command composes to its values
    from conftest import compose

    replay = compose([a.strip("'") for a in summary["experiment"]["replay"].split()[3:]])
    assert replay.loss.conversion_weight == pytest.approx(best["params"]["loss.conversion_weight"])
    assert replay.trainer.lr == pytest.approx(best["params"]["trainer.lr"])

    # the same command again (as after a killed sweep): Tune restores the experiment, the
    # finished trials are reused and none trains again
    evals = {r["run_dir"]: os.path.getmtime(os.path.join(r["run_dir"], "eval.json")) for r in finished}
    grid2, summary2 = sweep.run_sweep(cfg)
    assert sorted(summary2["reused"]) == sorted(r["trial"] for r in finished)
    assert len(grid2) == 2 and grid2.num_errors == 0
    assert summary2["best"]["value"] == summary["best"]["value"]
    for run_dir, mtime in evals.items():
        assert os.path.getmtime(os.path.join(run_dir, "eval.json")) == mtime  # not evaluated again
