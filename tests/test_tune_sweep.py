"""The Ray Tune sweep (raycg.tune.sweep, the logic of tune/sweep.py): the settings and their
errors, ASHA's decisions and the Optuna searcher without Ray; the table, plot and experiment
file on made-up results; then one real sweep (Optuna + ASHA, 2 trials of 2 epochs on the tiny
simulated dataset) and its restore."""
from __future__ import annotations

import json
import os
import shlex
import time
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from conftest import tiny_overrides
from raycg.config import compose
from raycg.tune import summary as sweep_summary
from raycg.tune import sweep

DEFAULT_KNOBS = ["loss.conversion_weight", "loss.engagement_weight", "loss.t_max", "loss.advertiser_weight",
                 "model.temperature", "trainer.lr"]


# -- settings (no Ray) ---------------------------------------------------------------------
def test_search_space_parsing():
    cfg = sweep.compose_sweep([])
    space = OmegaConf.to_container(cfg.tune.search_space)
    assert sweep.swept_keys(space) == DEFAULT_KNOBS
    assert cfg.tune.searcher == "optuna" and cfg.tune.scheduler == "asha"
    assert cfg.tune.scheduler_metric == "val_mean_recall" and cfg.tune.metric == "conversion_recall@100"
    # every default knob is a key of the run config, and Ray's Optuna conversion accepts the space
    run_cfg = compose([])
    for key in DEFAULT_KNOBS:
        assert OmegaConf.select(run_cfg, key) is not None, key
    from ray.tune.search.optuna import OptunaSearch

    dists = OptunaSearch.convert_search_space(sweep.build_param_space(space, "optuna"))
    assert dists["trainer/lr"].log and dists["model/temperature"].log and not dists["loss/conversion_weight"].log
    assert (dists["loss/t_max"].low, dists["loss/t_max"].high) == (10.0, 300.0)

    # grid leaves: random search enumerates them; TPE cannot, and the error names the key
    cfg = sweep.compose_sweep(["tune.searcher=random", "tune.search_space.loss.t_max={type:grid,values:[30,120]}",
                               "~tune.search_space.loss.engagement_weight"])
    space = OmegaConf.to_container(cfg.tune.search_space)
    assert "loss.engagement_weight" not in sweep.swept_keys(space)
    assert sweep.build_param_space(space, "random")["loss"]["t_max"] == {"grid_search": [30, 120]}
    assert sweep.check_sweep(cfg) == space
    with pytest.raises(ValueError, match=r"tune.search_space.loss.t_max: type grid .* needs tune.searcher=random"):
        sweep.build_param_space(space, "optuna")
    with pytest.raises(ValueError, match=r"tune.search_space.trainer.lr: uniform takes values \[low, high\]"):
        sweep.build_param_space({"trainer": {"lr": {"type": "uniform", "values": [0.1]}}})


@pytest.mark.parametrize("overrides, message", [
    (["tune.metric=conversion_recall@50"], r"tune.metric='conversion_recall@50' is not reported"),  # not in eval.ks
    (["tune.scheduler_metric=val_conversion_recall@50"], r"tune.scheduler_metric='val_conversion_recall@50' is not "
                                                         r"reported after each epoch"),
    (["tune.scheduler_metric=loss"], r"tune.scheduler_metric='loss' is not reported after each epoch"),
    (["data.validation_fraction=0"], r"data.validation_fraction=0.0 turns it off"),
    (["trainer.epochs=1"], r"tune.scheduler=asha stops trials between epochs, and trainer.epochs=1 has none"),
    (["trainer.epochs=null"], r"trainer.epochs=null \(auto\) in a sweep: trials and ASHA's rungs need"),
    (["tune.grace_period=4"], r"tune.grace_period=4: .*\(trainer.epochs=4\); expected 1 to 3"),
    (["tune.reduction_factor=1"], r"tune.reduction_factor=1.0: expected > 1"),
    (["tune.search_space.loss.t_max={type:grid,values:[30,120]}"], r"tune.search_space.loss.t_max: type grid"),
])
def test_bad_settings_fail_before_ray(overrides, message):
    with pytest.raises(ValueError, match=message):
        sweep.check_sweep(sweep.compose_sweep(overrides))


def test_fifo_needs_no_validation_window_and_the_sweep_checks_first():
    sweep.check_sweep(sweep.compose_sweep(["tune.scheduler=fifo", "data.validation_fraction=0", "trainer.epochs=1"]))
    import ray

    started = ray.is_initialized()
    with pytest.raises(ValueError, match="is not reported"):
        sweep.run_sweep(sweep.compose_sweep(["tune.metric=conversion_recall@50"]))
    assert ray.is_initialized() == started  # it failed before starting Ray


def test_asha_decides_between_epochs_and_never_on_the_last():
    """4 epochs, grace 1, reduction 2: decisions after epochs 1 and 2 only; a trial that trained
    every epoch is never stopped, and the final report (no epoch clock) is ignored."""
    cfg = sweep.compose_sweep(["trainer.epochs=4"])
    scheduler = sweep.make_scheduler(cfg.tune, cfg.trainer.epochs)
    trials = {name: SimpleNamespace(trial_id=name) for name in "abcd"}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)

    def epoch(name, epochs_done, value):
        return scheduler.on_trial_result(None, trials[name], {sweep.EPOCH_CLOCK: epochs_done, "val_mean_recall": value})

    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    assert [epoch("a", e, v) for e, v in [(1, 0.5), (2, 0.6), (3, 0.7), (4, 0.7)]] == [go] * 4
    assert epoch("b", 1, 0.1) == stop  # below the median of epoch 1 (a: 0.5)
    # c leads early and collapses after the last decision: it trains to the end, to its evaluation
    assert [epoch("c", e, v) for e, v in [(1, 0.9), (2, 0.9), (3, 0.0), (4, 0.0)]] == [go] * 4
    assert epoch("d", 1, 0.6) == go and epoch("d", 2, 0.1) == stop  # epoch 2: below the median of a and c
    final = {"val_mean_recall": 0.0, "conversion_recall@100": 0.0, "training_iteration": 5}
    assert scheduler.on_trial_result(None, trials["a"], final) == go
    assert [milestone for milestone, _ in scheduler._brackets[0]._rungs] == [2, 1]
    assert type(sweep.make_scheduler(sweep.compose_sweep(["tune.scheduler=fifo"]).tune, 4)) is FIFOScheduler


def test_optuna_searcher_is_seeded_and_learns_from_the_final_metric():
    cfg = sweep.compose_sweep([])
    space = sweep.build_param_space(OmegaConf.to_container(cfg.tune.search_space), "optuna")

    def searcher():
        s, max_concurrent = sweep.make_searcher(cfg.tune)
        assert max_concurrent == cfg.tune.max_concurrent_trials
        assert s.set_search_properties(None, None, space)
        return s

    first, second = searcher(), searcher()
    a = first.suggest("a")
    assert a == second.suggest("a")  # tune.seed: the same draws
    assert 0.5 <= a["loss"]["conversion_weight"] <= 3.0 and 3e-4 <= a["trainer"]["lr"] <= 1e-2
    first.on_trial_result("a", {sweep.EPOCH_CLOCK: 1, "val_mean_recall": 0.3})
    first.on_trial_result("a", {"val_mean_recall": 0.3, "conversion_recall@100": 0.5})  # the final report: no epoch
    first.on_trial_complete("a", {"val_mean_recall": 0.3, "conversion_recall@100": 0.5})
    first.suggest("b")
    first.on_trial_result("b", {sweep.EPOCH_CLOCK: 1, "val_mean_recall": 0.1})
    first.on_trial_complete("b", {sweep.EPOCH_CLOCK: 1, "val_mean_recall": 0.1})  # stopped by ASHA: no evaluation
    done, pruned = first._ot_study.trials
    assert done.state.name == "COMPLETE" and done.value == 0.5 and done.intermediate_values == {1: 0.3}
    assert pruned.state.name == "PRUNED" and pruned.intermediate_values == {1: 0.1}


# -- table, plot, experiment file (no Ray) -------------------------------------------------
def _fake_result(trial, params, epochs, started, final=None, error=None):
    """What summarize reads from a Tune Result: metrics (last report), config, metrics_dataframe."""
    rows = [{sweep.EPOCH_CLOCK: e, "val_mean_recall": 0.1 * e + params["loss"]["t_max"] / 1000,
             "training_iteration": e, "timestamp": started + e} for e in range(1, epochs + 1)]
    last = {"epoch": epochs - 1, "val_mean_recall": rows[-1]["val_mean_recall"], "trial_id": trial, "done": True,
            "run_dir": f"/runs/{trial}"}
    if final is not None:
        last.update({"conversion_recall@100": final, "engagement_recall@100": final / 2,
                     "popularity_conversion_recall@100": 0.1})
        last.update({"conversion_novel_recall@100": final / 3})  # reported, kept in sweep.json, not a table column
        rows.append({"val_mean_recall": last["val_mean_recall"], "training_iteration": epochs + 1,
                     "timestamp": started + epochs + 1})
    return SimpleNamespace(metrics=last, config=params, error=error, path=f"/tune/{trial}",
                           metrics_dataframe=pd.DataFrame(rows))


def _fake_summary():
    results = [  # in no particular order, like Optuna's random trial ids; "started" orders them
        _fake_result("c3", {"loss": {"t_max": 60.0}, "trainer": {"lr": 0.0005}}, 2, 300, final=0.55),
        _fake_result("a1", {"loss": {"t_max": 30.0}, "trainer": {"lr": 0.001}}, 2, 100, final=0.40),
        _fake_result("b2", {"loss": {"t_max": 120.0}, "trainer": {"lr": 0.003}}, 1, 200),  # stopped after epoch 1
    ]
    s = sweep_summary.summarize(results, ["loss.t_max", "trainer.lr"], "conversion_recall@100", "max",
                                "val_mean_recall", 2)
    s.update(name="fake", dir="/runs/fake", seconds=360.0, reused=[], searcher="optuna", scheduler="asha")
    return s


def test_summary_table_and_plot(tmp_path):
    s = _fake_summary()
    assert [(r["trial"], r["status"]) for r in s["trials"]] == [("a1", "evaluated"), ("b2", "stopped"),
                                                                 ("c3", "evaluated")]
    assert s["best"]["trial"] == "c3" and s["best"]["value"] == 0.55
    assert s["best"]["metrics"]["conversion_novel_recall@100"] == pytest.approx(0.55 / 3)
    assert s["trials"][1]["curve"] == [[1, pytest.approx(0.22)]] and s["trials"][1]["epochs"] == 1
    assert [e for e, _ in s["trials"][0]["curve"]] == [1, 2]  # the final report is not an epoch
    text = sweep_summary.format_summary(s)
    head, *_ = text.splitlines()
    assert head.split() == ["trial", "loss.t_max", "trainer.lr", "epochs", "val_mean_R", "conv", "R@100", "eng", "R@100"]
    lines = {line.split()[0]: line.split() for line in text.splitlines()[2:5]}
    assert lines["a1"] == ["a1", "30", "0.001", "2", "0.2300", "0.4000", "0.2000", "evaluated"]
    assert lines["b2"] == ["b2", "120", "0.003", "1", "0.2200", "n/a", "n/a", "stopped", "after", "epoch", "1"]
    assert lines["c3"][-1] == "best"
    assert "sweep: 3 trials (2 evaluated, 1 stopped early, 0 errors) in 360s, 30.0 trials/hour" in text

    s["plot"] = sweep_summary.write_plot(str(tmp_path / "sweep.png"), s,
                                         {"trainer.lr": {"type": "loguniform", "values": [1e-4, 1e-2]}})
    with open(s["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(s["plot"]).shape[1] > 800  # 3 panels side by side
    md = open(sweep_summary.write_markdown(str(tmp_path / "sweep.md"), s)).read().splitlines()
    table = [line for line in md if line.startswith("| ") and line[2:4] in ("a1", "b2", "c3")]
    assert len(table) == 3 and "**best**" in table[2] and "| 0.5500 |" in table[2]
    assert "![sweep](sweep.png)" in md


def test_experiment_file_replays_the_trial(tmp_path):
    """The experiment file = the swept values + every sweep setting that differs from the defaults;
    the replay overrides compose it exactly as `python -m raycg.train` would."""
    data_dir = str(tmp_path / "data")
    sweep_cfg = sweep.compose_sweep([*tiny_overrides(data_dir), "trainer.epochs=2", "model.cross=stacked"])
    base = OmegaConf.to_container(sweep_cfg, resolve=True, enum_to_str=True)
    base.pop("tune")
    params = {"loss.t_max": 42.5, "trainer.lr": 0.00123, "model.temperature": 0.07, "loss.advertiser_weight": 0.0}
    sweep_dir = str(tmp_path / "my sweep's")  # Hydra's quoting of the searchpath
    path = sweep_summary.write_experiment(sweep_dir, "my-sweep_best", params, base,
                                          OmegaConf.to_container(compose([]), resolve=True, enum_to_str=True),
                                          header="Best trial x.\nSwept: ...")
    assert path == os.path.join(sweep_dir, "experiment", "my-sweep_best.yaml")
    text = open(path).read()
    assert text.splitlines()[:3] == ["# @package _global_", "# Best trial x.", "# Swept: ..."]
    values = yaml.safe_load(text)
    assert "export" not in values and values["trainer"] == {"epochs": 2, "lr": 0.00123}
    assert list(sweep_cfg.eval.baselines) == ["popularity"] and "eval" not in values  # trials: one baseline

    rep = sweep_summary.replay(sweep_dir, path)
    assert shlex.split(rep["command"]) == ["python", "-m", "raycg.train", *rep["overrides"]]
    cfg = compose(rep["overrides"])
    for key, value in params.items():
        assert OmegaConf.select(cfg, key) == value, key
    assert cfg.trainer.epochs == 2 and cfg.model.cross == "stacked" and cfg.data.dir == data_dir
    assert cfg.data.sim.n_users == 400 and cfg.export is True  # the tiny dataset; the replay exports
    assert cfg.eval.baselines == compose([]).eval.baselines  # and scores every default baseline
    assert cfg.loss.conversion_weight == compose([]).loss.conversion_weight  # not swept, not overridden
    assert sweep_summary.replay("/runs/a-b_c.1", "/runs/a-b_c.1/experiment/x.yaml")["command"] == (
        "python -m raycg.train 'hydra.searchpath=[file:///runs/a-b_c.1]' experiment=x")


# -- a real sweep --------------------------------------------------------------------------
def test_sweep_optuna_asha_end_to_end(ray_session, tiny_data_dir, tmp_path):
    cfg = sweep.compose_sweep([  # each trial: 1 worker, 2 epochs on the tiny dataset, one baseline
        *tiny_overrides(tiny_data_dir), f"paths.runs_dir={tmp_path}",
        "trainer.epochs=2", "trainer.num_workers=1", "trainer.batch_size=256", "eval.ks=[10,100]",
        "eval.baselines=[popularity]",
        "tune.name=test-sweep", "tune.num_samples=2",  # Optuna (TPE), ASHA after epoch 1
    ])
    grid, summary = sweep.run_sweep(cfg)
    metric, epochs = "conversion_recall@100", 2
    sweep_dir = os.path.join(str(tmp_path), "test-sweep")

    assert len(grid) == 2 and grid.num_errors == 0, grid.errors
    rows = {r["trial"]: r for r in summary["trials"]}
    assert summary["trials"][0]["status"] == "evaluated"  # the first trial: ASHA had nothing to compare it with
    for result in grid:
        row = rows[result.metrics["trial_id"]]
        assert row["status"] in ("evaluated", "stopped")
        df = result.metrics_dataframe
        per_epoch = df[df[sweep.EPOCH_CLOCK].notna()]
        # every epoch reached Tune with its validation recall; training_iteration counts them
        assert list(per_epoch[sweep.EPOCH_CLOCK]) == list(range(1, row["epochs"] + 1)) == [e for e, _ in row["curve"]]
        assert list(per_epoch["training_iteration"]) == list(per_epoch[sweep.EPOCH_CLOCK])
        assert per_epoch["val_mean_recall"].between(0, 1).all()
        run_dir = result.metrics["run_dir"]  # the trial's own run directory, trained with its params
        assert run_dir.startswith(os.path.join(sweep_dir, "runs") + os.sep)
        with open(os.path.join(run_dir, "config.yaml")) as f:
            run_cfg = yaml.safe_load(f)
        for key in DEFAULT_KNOBS:
            assert sweep_summary._get(run_cfg, key) == sweep_summary._get(result.config, key), key
        assert not os.path.exists(os.path.join(run_dir, "export"))  # trials keep recall, no serving export
        if row["status"] == "evaluated":
            assert row["epochs"] == epochs and result.metrics["training_iteration"] == epochs + 1  # + the final report
            with open(os.path.join(run_dir, "eval.json")) as f:
                assert json.load(f)["model"]["conversion"]["100"] == result.metrics[metric]
        else:  # stopped by ASHA after epoch 1: no evaluation
            assert row["epochs"] == 1 and metric not in result.metrics
            assert not os.path.exists(os.path.join(run_dir, "eval.json"))
    assert len({tuple(sweep_summary._get(r.config, k) for k in DEFAULT_KNOBS) for r in grid}) == 2

    evaluated = {t: r["metrics"][metric] for t, r in rows.items() if r["status"] == "evaluated"}
    assert summary["best"]["value"] == max(evaluated.values())
    assert evaluated[summary["best"]["trial"]] == summary["best"]["value"]
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
        assert json.load(f)["best"]["trial"] == summary["best"]["trial"]
    with open(os.path.join(sweep_dir, "sweep.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(sweep_dir, "sweep.md")) as f:
        assert sum(line.startswith("| ") and "**best**" in line for line in f) == 1

    # no trial (stopped by ASHA or finished) left its Train workers' CPUs reserved
    deadline = time.monotonic() + 300  # a wait, not a timing check: cleanup is slow on a loaded box
    t0 = time.monotonic()
    while ray_session.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    free = ray_session.available_resources().get("CPU", 0)
    assert free == 2, f"{2 - free:g} CPU still reserved {time.monotonic() - t0:.0f}s after the sweep"

    # the printed replay command composes the best trial's config
    rep = summary["replay"]
    assert rep["experiment"] == os.path.join(sweep_dir, "experiment", "test-sweep_best.yaml")
    replayed = compose(shlex.split(rep["command"])[3:])
    for key, value in summary["best"]["params"].items():
        assert OmegaConf.select(replayed, key) == value, key
    assert replayed.trainer.epochs == epochs and replayed.data.dir == tiny_data_dir and replayed.export

    # the same command again (as after a killed sweep): Tune restores the experiment and the
    # searcher; both finished trials (evaluated or stopped) are reused and none trains again
    evals = {r.metrics["run_dir"]: os.path.getmtime(os.path.join(r.metrics["run_dir"], "metrics.jsonl")) for r in grid}
    grid2, summary2 = sweep.run_sweep(cfg)
    assert sorted(summary2["reused"]) == sorted(rows)
    assert len(grid2) == 2 and grid2.num_errors == 0
    assert summary2["best"]["trial"] == summary["best"]["trial"] and summary2["best"]["value"] == summary["best"]["value"]
    for run_dir, mtime in evals.items():
        assert os.path.getmtime(os.path.join(run_dir, "metrics.jsonl")) == mtime  # not trained again
