"""A real Ray Tune sweep (raycg.tune.sweep, the logic of tune/sweep.py): 2 trials of 1 epoch on
the tiny simulated dataset."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import tiny_overrides
from raycg.tune import sweep


def test_search_space_parsing():
    cfg = sweep.compose_sweep(["tune.search_space.loss.t_max={type:grid,values:[30,120]}",
                               "~tune.search_space.loss.engagement_weight"])
    from omegaconf import OmegaConf
    space = OmegaConf.to_container(cfg.tune.search_space)
    assert sweep.swept_keys(space) == ["loss.conversion_weight", "loss.t_max"]
    params = sweep.build_param_space(space)
    assert params["loss"]["t_max"] == {"grid_search": [30, 120]}
    assert "trainer" in cfg and cfg.tune.metric == "conversion_recall@100"
    bad = sweep.compose_sweep(["tune.metric=conversion_recall@50"])  # not in eval.ks
    with pytest.raises(ValueError, match="is not reported"):
        sweep.run_sweep(bad)  # fails before Ray starts


def test_sweep_two_trials(ray_session, tiny_data_dir, tmp_path):
    cfg = sweep.compose_sweep([  # each trial: 1 worker, 1 epoch on the tiny dataset, one baseline
        *tiny_overrides(tiny_data_dir), f"paths.runs_dir={tmp_path}",
        "trainer.epochs=1", "trainer.num_workers=1", "trainer.batch_size=256", "eval.ks=[10,100]",
        "eval.baselines=[popularity]",
        "tune.name=test-sweep", "tune.num_samples=1",  # grid of 2 conversion weights -> 2 trials
    ])
    grid, summary = sweep.run_sweep(cfg)
    metric = "conversion_recall@100"

    assert len(grid) == 2
    assert grid.num_errors == 0 and grid.num_terminated == 2, grid.errors
    values = []
    for result in grid:
        assert result.error is None
        value = result.metrics[metric]
        assert 0.0 <= value <= 1.0
        values.append(value)
        # The trial's run directory is its own, inside the sweep, and trained with its params.
        run_dir = result.metrics["run_dir"]
        assert run_dir.startswith(os.path.join(str(tmp_path), "test-sweep", "runs") + os.sep)
        with open(os.path.join(run_dir, "config.yaml")) as f:
            run_cfg = yaml.safe_load(f)
        for key in ("conversion_weight", "engagement_weight", "t_max"):
            assert run_cfg["loss"][key] == result.config["loss"][key]
        with open(os.path.join(run_dir, "eval.json")) as f:
            assert json.load(f)["model"]["conversion"]["100"] == value
        assert not os.path.exists(os.path.join(run_dir, "export"))  # trials keep recall, no serving export
        assert result.metrics["training_iteration"] == 2  # 1 epoch via TuneReportCallback + the final report

    assert len({r.metrics["run_dir"] for r in grid}) == 2
    configs = [tuple(r.config["loss"][k] for k in ("conversion_weight", "engagement_weight", "t_max")) for r in grid]
    assert len(set(configs)) == 2
    assert sorted(c[0] for c in configs) == [1.0, 3.0]

    best = grid.get_best_result(metric=metric, mode="max")
    assert best.metrics[metric] == max(values)
    assert summary["best"]["value"] == max(values)
    assert summary["best"]["trial"] == best.metrics["trial_id"]
    assert summary["best"]["params"]["loss.conversion_weight"] == best.config["loss"]["conversion_weight"]
    with open(os.path.join(str(tmp_path), "test-sweep", "sweep.json")) as f:
        assert json.load(f)["best"]["trial"] == best.metrics["trial_id"]

    # the same command again (as after a killed sweep): Tune restores the experiment, both
    # finished trials are reused and none trains again
    evals = {r.metrics["run_dir"]: os.path.getmtime(os.path.join(r.metrics["run_dir"], "eval.json")) for r in grid}
    grid2, summary2 = sweep.run_sweep(cfg)
    assert sorted(summary2["reused"]) == sorted(r.metrics["trial_id"] for r in grid)
    assert len(grid2) == 2 and grid2.num_errors == 0
    assert summary2["best"]["value"] == summary["best"]["value"]
    for run_dir, mtime in evals.items():
        assert os.path.getmtime(os.path.join(run_dir, "eval.json")) == mtime  # not evaluated again
