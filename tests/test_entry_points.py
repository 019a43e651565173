"""Every entry point is a Hydra app on raycg/conf: each composes, its required `???` keys fail
clearly, typos fail at composition, and the console scripts point at them. No Ray."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest
import torch
from hydra.errors import ConfigCompositionException

from conftest import ROOT
from raycg.config import ConfigError, compose, require_complete

# config name -> (module with `main`, the overrides its required keys need)
APPS = {
    "config": ("raycg.train.__main__", []),
    "evaluate": ("raycg.evaluate", ["run_dir=runs/x"]),
    "export": ("raycg.export", ["run_dir=runs/x"]),
    "report": ("raycg.report.__main__", []),
    "simulate": ("raycg.simulate", ["out=/tmp/sim"]),
    "convert": ("raycg.convert", ["mapping=tmall", "input=log.csv", "out_dir=/tmp/out"]),
    "sweep": ("raycg.tune.sweep", []),  # also tune/sweep.py
    "retrieve": ("raycg.retrieve.__main__", ["export_dir=runs/x/export"]),
}
SCRIPTS = {"raycg-train": "config", "raycg-evaluate": "evaluate", "raycg-export": "export",
           "raycg-report": "report", "raycg-simulate": "simulate", "raycg-convert": "convert",
           "raycg-tune": "sweep", "raycg-retrieve": "retrieve"}


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("name", sorted(APPS))
def test_every_app_config_composes_complete(name):
    cfg = compose(APPS[name][1], config_name=name)
    require_complete(cfg)
    if APPS[name][1]:  # without its required keys: an error naming each of them
        with pytest.raises(ConfigError, match="missing required setting"):
            require_complete(compose([], config_name=name))


def test_apps_config_files_are_all_covered():
    from raycg.config import CONF_DIR

    assert sorted(f[:-5] for f in os.listdir(CONF_DIR) if f.endswith(".yaml")) == sorted(APPS)


def test_console_scripts_are_the_apps():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert set(scripts) == set(SCRIPTS)
    import importlib

    for script, target in scripts.items():
        module, _, attr = target.partition(":")
        assert module == APPS[SCRIPTS[script]][0] and attr == "main"
        assert callable(getattr(importlib.import_module(module), attr))


@pytest.mark.parametrize("module,argv,missing", [
    ("raycg.evaluate", [], "run_dir"),
    ("raycg.export", ["out=/tmp/x"], "run_dir"),
    ("raycg.simulate", ["data=sim_small"], "out"),
    ("raycg.convert", ["mapping=tmall"], "input, out_dir"),
    ("raycg.retrieve.__main__", ["user_id=1"], "export_dir"),
])
def test_required_keys_fail_clearly_before_any_work(module, argv, missing):
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(ConfigError, match=rf"missing required setting\(s\): {missing}; give them"):
        main(argv)


def test_the_command_line_says_what_is_missing_and_what_is_unknown():
    proc = cli("raycg.export")
    assert proc.returncode == 1 and "error: missing required setting(s): run_dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = cli("raycg.evaluate", "run_dir=runs/x", "ks=[10]")  # eval.ks, not ks
    assert proc.returncode == 1 and "Could not override 'ks'" in proc.stderr
    proc = cli("raycg.evaluate", "run_dir=runs/x", "eval.ks=[10,100]", "--cfg", "job")
    assert proc.returncode == 0 and "run_dir: runs/x" in proc.stdout and "- 10\n  - 100" in proc.stdout


def test_a_typo_fails_with_hydra_s_message_before_ray_starts(tmp_path):
    proc = cli("raycg.train", "model.cros=stacked", f"paths.runs_dir={tmp_path}/runs")
    assert proc.returncode == 1
    assert "Could not override 'model.cros'" in proc.stderr and "Key 'cros' not in 'ModelConfig'" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    assert not os.path.exists(tmp_path / "runs")


def test_export_app_names_a_run_without_checkpoints(tmp_path):
    """The export itself (towers, feature tables, item index) needs the run's data and Ray: the
    end-to-end run in test_end_to_end.py exports through this app."""
    from raycg.export import main
    from raycg.model.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=rf"{tmp_path}: no checkpoint_\* directory"):
        main([f"run_dir={tmp_path}"])


def test_evaluate_applies_only_the_eval_keys_given():
    from raycg.evaluate import given_keys

    argv = ["run_dir=runs/x", "eval.ks=[10,100]", "eval.als.factors=8", "eval.baselines=[popularity]"]
    cfg = compose(argv, config_name="evaluate")
    given = given_keys(cfg, argv, "eval")
    assert given == {"ks": [10, 100], "als": {"factors": 8}, "baselines": ["popularity"]}
    assert given_keys(cfg, ["run_dir=runs/x"], "eval") == {}  # the run's stored settings, untouched
    assert given_keys(compose(["run_dir=x", "eval=default"], config_name="evaluate"), ["eval=default"],
                      "eval")["ks"] == [100, 1000]
    with pytest.raises(ConfigCompositionException, match="eval.device=gpu"):
        compose(["run_dir=x", "eval.device=gpu"], config_name="evaluate")


def test_simulate_app_writes_the_dataset_of_the_data_group(tmp_path, capsys):
    from raycg.simulate import main

    out = tmp_path / "sim"
    meta = main([f"out={out}", "data=sim_small", "data.sim.n_users=60", "data.sim.n_items=50",
                 "data.sim.n_advertisers=5", "data.sim.n_categories=5", "parallel=false"])
    assert (out / "items.parquet").exists() and meta["config"]["n_users"] == 60
    # the rest from data=sim_small (over sim_default), not from SimConfig's own defaults
    assert meta["config"]["num_shards"] == 4 and meta["config"]["requests_per_user"] == 15
    text = capsys.readouterr().out
    summary = json.loads(text[text.rindex('{\n  "wall_s"'):])
    assert summary["n_events"] == meta["n_events"]
