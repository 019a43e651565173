"""A Ray Tune sweep of raycg runs; `python tune/sweep.py [hydra overrides]` runs it.

Each trial is one real raycg run (raycg.train.driver.run: TorchTrainer fit -> faiss recall@K)
with the trial's values merged into the main config; the sweep settings are the `tune` config
group (raycg/conf/tune/default.yaml, loaded by default, `tune=<name>` picks another). Optuna's
TPE proposes the trials (or Tune's random/grid generator, tune.searcher=random), ASHA stops the
weak ones between epochs on their validation recall (tune.scheduler=asha), and the best trial by
the final evaluation's recall (tune.metric) becomes a Hydra experiment file. Examples:

    python tune/sweep.py experiment=smoke tune.num_samples=4
    python tune/sweep.py data=sim_small tune.num_samples=12 tune.metric=engagement_recall@1000

Layout under <paths.runs_dir>/<tune.name>/ (the Tune experiment directory):
    <trial dirs>/              Tune's own trial state and results (progress.csv: one row per report)
    runs/<trial>/              one raycg run directory per trial (config.yaml, checkpoints, eval.json)
    sweep.json                 the trial table and the best trial
    sweep.md, sweep.png        the table and the plots (raycg.tune.summary)
    experiment/<name>_best.yaml  the best trial as a Hydra experiment; the sweep prints its replay command
"""
from __future__ import annotations

import importlib.util
import json
import os
import time

import ray
from omegaconf import DictConfig, OmegaConf
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import DEFAULT_METRIC
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from raycg.config import compose, hydra_app
from raycg.config.schema import RunConfig
from raycg.logs import get_logger, set_level
from raycg.train.driver import ensure_data, init_ray, resolve_paths, run
from raycg.tune.summary import (
    EPOCH_CLOCK,
    format_summary,
    replay,
    summarize,
    write_experiment,
    write_markdown,
    write_plot,
)

log = get_logger("tune").info
SAMPLERS = {
    "grid": tune.grid_search,
    "choice": tune.choice,
    "uniform": lambda v: tune.uniform(*v),
    "loguniform": lambda v: tune.loguniform(*v),
    "randint": lambda v: tune.randint(*v),
}
TASKS = ("conversion", "engagement")


def compose_sweep(overrides: list[str]) -> DictConfig:
    """The config exactly as `python tune/sweep.py <overrides>` sees it (raycg/conf/sweep.yaml)."""
    return compose(overrides, config_name="sweep")


# -- search space --------------------------------------------------------------------------
def _is_leaf(node) -> bool:
    return isinstance(node, dict) and "type" in node


def build_param_space(space: dict, searcher: str = "random", prefix: str = "") -> dict:
    """{loss: {t_max: {type: choice, values: [...]}}} -> {loss: {t_max: tune.choice([...])}}."""
    out = {}
    for key, node in space.items():
        name = f"tune.search_space.{prefix}{key}"
        if _is_leaf(node):
            if node["type"] not in SAMPLERS:
                raise ValueError(f"{name}: unknown type {node['type']!r}; one of {sorted(SAMPLERS)}")
            if node["type"] == "grid" and searcher == "optuna":
                raise ValueError(f"{name}: type grid (every value, for every sample) needs tune.searcher=random; "
                                 f"with tune.searcher=optuna use {{type: choice, values: {list(node['values'])}}} "
                                 "(a categorical TPE learns over)")
            values = list(node["values"])
            if node["type"] in ("uniform", "loguniform", "randint") and len(values) != 2:
                raise ValueError(f"{name}: {node['type']} takes values [low, high], got {values}")
            out[key] = SAMPLERS[node["type"]](values)
        elif isinstance(node, dict):
            out[key] = build_param_space(node, searcher, f"{prefix}{key}.")
        else:
            raise ValueError(f"{name}: expected {{type, values}} or a nested mapping, got {node!r}")
    return out


def swept_keys(space: dict, prefix: str = "") -> list[str]:
    """Dotted config keys of the search space leaves: ['loss.conversion_weight', ...]."""
    keys = []
    for key, node in space.items():
        if _is_leaf(node):
            keys.append(prefix + key)
        else:
            keys.extend(swept_keys(node, f"{prefix}{key}."))
    return keys


def search_leaves(space: dict, prefix: str = "") -> dict:
    """{'trainer.lr': {'type': 'loguniform', 'values': [...]}, ...}: the plot's axes show each range."""
    out = {}
    for key, node in space.items():
        if _is_leaf(node):
            out[prefix + key] = node
        else:
            out.update(search_leaves(node, f"{prefix}{key}."))
    return out


def _plain(x):
    """numpy scalars (tune.choice may hand them out) -> Python, so OmegaConf accepts them."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x.item() if hasattr(x, "item") else x


def recall_metrics(results: dict) -> dict:
    """raycg eval results -> flat Tune metrics: conversion_recall@100, popularity_conversion_recall@100, ..."""
    out = {}
    for method, prefix in (("model", ""), ("popularity", "popularity_")):
        for task, by_k in results.get(method, {}).items():
            for k, value in by_k.items():
                out[f"{prefix}{task}_recall@{int(k)}"] = float(value)
    return out


# -- checks before Ray ---------------------------------------------------------------------
def check_sweep(cfg: DictConfig) -> dict:
    """Every sweep setting that can be wrong, checked before Ray starts; returns the search space."""
    ts = cfg.tune
    if ts.mode not in ("max", "min"):
        raise ValueError(f"tune.mode must be max or min, got {ts.mode!r}")
    ks = [int(k) for k in cfg.eval.ks]
    valid = [f"{task}_recall@{k}" for task in TASKS for k in ks]
    if ts.metric not in valid:
        raise ValueError(f"tune.metric={ts.metric!r} is not reported; one of {valid} (eval.ks)")
    if ts.num_samples < 1:
        raise ValueError(f"tune.num_samples={ts.num_samples}: expected at least 1")
    if cfg.trainer.epochs is None:
        raise ValueError("trainer.epochs=null (auto) in a sweep: trials and ASHA's rungs need a fixed number of "
                         "epochs; set trainer.epochs (sweep.yaml's 4)")
    if ts.scheduler == "asha":
        check_scheduler(cfg, ks)
    space = OmegaConf.to_container(ts.search_space, resolve=True)
    if not swept_keys(space):
        raise ValueError("tune.search_space is empty: nothing to sweep")
    build_param_space(space, ts.searcher)  # raises on a bad leaf, naming its key
    return space


def check_scheduler(cfg: DictConfig, ks: list[int]) -> None:
    """ASHA compares trials by a per-epoch validation recall: the run must measure it."""
    ts = cfg.tune
    valid = ["val_mean_recall", *(f"val_{task}_recall@{k}" for task in TASKS for k in ks)]
    if ts.scheduler_metric not in valid:
        raise ValueError(f"tune.scheduler_metric={ts.scheduler_metric!r} is not reported after each epoch; "
                         f"one of {valid} (eval.ks)")
    if not cfg.data.validation_fraction > 0:
        raise ValueError(f"tune.scheduler=asha compares trials by {ts.scheduler_metric} on the validation window "
                         f"after each epoch, but data.validation_fraction={cfg.data.validation_fraction} turns it "
                         "off; set data.validation_fraction (e.g. 0.1) or tune.scheduler=fifo")
    if cfg.trainer.epochs < 2:
        raise ValueError(f"tune.scheduler=asha stops trials between epochs, and trainer.epochs={cfg.trainer.epochs} "
                         "has none: train at least 2 epochs, or use tune.scheduler=fifo")
    if not 1 <= ts.grace_period < cfg.trainer.epochs:
        raise ValueError(f"tune.grace_period={ts.grace_period}: ASHA's first decision comes after that many epochs "
                         f"and must come before the last one (trainer.epochs={cfg.trainer.epochs}); expected 1 to "
                         f"{cfg.trainer.epochs - 1}, or tune.scheduler=fifo")
    if not ts.reduction_factor > 1:
        raise ValueError(f"tune.reduction_factor={ts.reduction_factor}: expected > 1 (2 keeps the better half)")


# -- searcher and scheduler ----------------------------------------------------------------
class FinalMetricOptunaSearch(OptunaSearch):
    """Optuna TPE on the trial's final `objective` (the evaluation's recall), which only the last
    report carries. Tune checks every result for its searcher's metric and the epoch reports have
    no evaluation, so the searcher is registered under Tune's anonymous DEFAULT_METRIC (exempt from
    that check) and reads its objective itself. Epoch reports pass `progress` (the scheduler's
    validation recall) as Optuna intermediate values: TPE ranks ASHA-stopped trials (Optuna's
    "pruned", no final value) by them, below every finished one."""

    def __init__(self, objective: str, mode: str, progress: str, sampler):
        super().__init__(metric=DEFAULT_METRIC, mode=mode, sampler=sampler)
        self.objective, self.progress = objective, progress

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value = result.get(self.progress)
        if (EPOCH_CLOCK in result and value is not None and trial_id in self._ot_trials
                and trial_id not in self._completed_trials):
            self._ot_trials[trial_id].report(float(value), int(result[EPOCH_CLOCK]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        value = (result or {}).get(self.objective)
        super().on_trial_complete(trial_id, None if value is None else {DEFAULT_METRIC: value}, error)


def make_searcher(ts: DictConfig):
    """(search_alg, max_concurrent_trials for TuneConfig) for tune.searcher."""
    if ts.searcher == "random":
        return BasicVariantGenerator(max_concurrent=ts.max_concurrent_trials, random_state=ts.seed), None
    import optuna

    sampler = optuna.samplers.TPESampler(seed=ts.seed, n_startup_trials=ts.startup_trials)
    searcher = FinalMetricOptunaSearch(ts.metric, str(ts.mode), ts.scheduler_metric, sampler)
    return searcher, ts.max_concurrent_trials  # Tune wraps it in a ConcurrencyLimiter


def make_scheduler(ts: DictConfig, epochs: int):
    """ASHA on the epoch reports' validation recall, clocked in epochs (EPOCH_CLOCK): rungs at
    grace_period x reduction_factor^k epochs up to max_t = epochs - 1, so no decision falls on the
    last epoch (a trial that trained every epoch gets its evaluation). stop_last_trials=False: a
    trial past the last rung continues instead of being stopped at max_t. The final report has no
    EPOCH_CLOCK, and ASHA skips results without its time attribute."""
    if ts.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr=EPOCH_CLOCK, metric=ts.scheduler_metric, mode="max",  # recalls: higher is better
                         max_t=epochs - 1, grace_period=ts.grace_period, reduction_factor=ts.reduction_factor,
                         stop_last_trials=False)


# -- one trial (runs in a Tune actor) ------------------------------------------------------
class EpochReportCallback(TuneReportCallback):
    """Each epoch's report (rank 0's metrics, validation recall included) to Tune, with the epoch
    count (ASHA's clock: unlike training_iteration it stays right when a restarted trial resumes
    its Train run mid-way) and the trial's run directory (an ASHA-stopped trial has no final report)."""

    def __init__(self, run_dir: str):
        super().__init__()
        self.run_dir = run_dir

    def after_report(self, run_context, metrics, checkpoint):
        first = {**metrics[0], EPOCH_CLOCK: metrics[0]["epoch"] + 1, "run_dir": self.run_dir}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def train_trial(config: dict, base_cfg: dict, runs_dir: str) -> None:
    """Merge the trial's sample into the base config, run raycg, report recall@K to Tune."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    # typed like a composed config (raycg.config.schema): a swept value of the wrong type fails here
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), base_cfg, OmegaConf.create(_plain(config)))
    cfg.paths.runs_dir = runs_dir
    cfg.run_name = tune.get_context().get_trial_name()  # unique in the sweep
    run_dir = os.path.join(runs_dir, cfg.run_name)
    results = run(cfg, callbacks=[EpochReportCallback(run_dir)])
    # the last epoch's metrics (its validation recall keeps the scheduler's key in every result)
    train = {k: v for k, v in results["train_metrics"].items() if isinstance(v, (int, float))}
    tune.report({**train, **recall_metrics(results), "run_dir": run_dir, "eval_s": results["seconds"]["total"]})


# -- the sweep (driver) --------------------------------------------------------------------
def run_sweep(cfg: DictConfig) -> tuple[tune.ResultGrid, dict]:
    """Check the settings, simulate the data once, run the trials; print/write the table, the plot
    and the best trial's experiment file. Returns (grid, summary)."""
    ts = cfg.tune
    space = check_sweep(cfg)  # before Ray: a bad setting costs seconds
    resolve_paths(cfg)
    if cfg.ray.include_dashboard is None:
        # without it a finished trial's worker reservation leaked on the 2-core box; a host without
        # the dashboard's packages (the lent GPU machine's wheel set) runs the sweep without it
        cfg.ray.include_dashboard = importlib.util.find_spec("aiohttp_cors") is not None
        if not cfg.ray.include_dashboard:
            log("tune: Ray's dashboard packages are not installed (ray[default]); starting Ray without it")
    init_ray(cfg)
    ensure_data(cfg)  # once, here: trials then only read it

    name = ts.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = os.path.join(cfg.paths.runs_dir, name)
    keys = swept_keys(space)
    base_cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # plain YAML for the experiment file
    base_cfg.pop("tune")
    base_cfg["run_name"] = None

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base_cfg=base_cfg, runs_dir=os.path.join(sweep_dir, "runs")),
        OmegaConf.to_container(ts.trial_resources))
    reused = []
    if tune.Tuner.can_restore(sweep_dir):
        # the same tune.name again (e.g. after the sweep was killed): Tune restores the trials and
        # the searcher's state (Optuna's study); finished trials (evaluated or stopped by ASHA)
        # are kept, unfinished and errored ones run again
        # Tune keeps exactly the TERMINATED trials. Their last result's "done" flag is no proof:
        # Tune 2.60 sets it in memory after the function returns and may never save it.
        reused = [t.trial_id for t in tune.ExperimentAnalysis(sweep_dir).trials if t.status == "TERMINATED"]
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
        log(f"tune: resuming sweep {name} from {sweep_dir}: {len(reused)} finished trial(s) reused "
            f"({', '.join(map(str, reused)) or 'none'}); the others run (again)")
    else:
        tuner = new_tuner(trainable, space, ts, cfg.trainer.epochs, name, cfg.paths.runs_dir)
    log(f"tune: sweep {name}: {ts.searcher} search over {keys} -> {ts.metric} ({ts.mode}); scheduler "
        f"{ts.scheduler}" + (f" on {ts.scheduler_metric}" if ts.scheduler == "asha" else "") + f"; dir {sweep_dir}")
    t0 = time.perf_counter()
    grid = tuner.fit()
    seconds = time.perf_counter() - t0

    summary = summarize(grid, keys, ts.metric, str(ts.mode), ts.scheduler_metric, cfg.trainer.epochs)
    summary.update(name=name, dir=sweep_dir, seconds=seconds, reused=reused, searcher=str(ts.searcher),
                   scheduler=str(ts.scheduler))
    best = summary["best"]
    experiment = write_experiment(sweep_dir, f"{_config_name(name)}_best", best["params"], base_cfg,
                                  default_run_config(), header=_experiment_header(summary))
    summary["replay"] = replay(sweep_dir, experiment)
    summary["plot"] = write_plot(os.path.join(sweep_dir, "sweep.png"), summary, search_leaves(space))
    summary["table"] = write_markdown(os.path.join(sweep_dir, "sweep.md"), summary)
    with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print("\n" + format_summary(summary), flush=True)  # the sweep's result table: output, not a log line
    return grid, summary


def new_tuner(trainable, space: dict, ts: DictConfig, epochs: int, name: str, runs_dir: str) -> tune.Tuner:
    search_alg, max_concurrent = make_searcher(ts)
    return tune.Tuner(
        trainable,
        param_space=build_param_space(space, ts.searcher),
        tune_config=tune.TuneConfig(
            num_samples=ts.num_samples,
            # metric/mode are not given to Tune: Tune would require them in every result, and the
            # epoch reports have no evaluation recall yet. The searcher and the scheduler carry
            # their own; the best trial is picked from the final results (raycg.tune.summary).
            search_alg=search_alg,
            scheduler=make_scheduler(ts, epochs),
            max_concurrent_trials=max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=runs_dir,
            failure_config=tune.FailureConfig(max_failures=ts.max_failures), verbose=1),
    )


def default_run_config() -> dict:
    """`python -m raycg.train` with no overrides, paths resolved like the sweep's: the experiment
    file keeps only the sweep settings that differ from it."""
    cfg = compose([])
    resolve_paths(cfg)
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def _config_name(name: str) -> str:
    """A Hydra option name from a sweep name (letters, digits, - and _)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _experiment_header(s: dict) -> str:
    b = s["best"]
    return "\n".join([
        f"Best trial {b['trial']} of sweep {s['name']} ({s['dir']}): {s['metric']} = {b['value']:.4f}.",
        "Swept (the trial's values): " + ", ".join(f"{k}={v}" for k, v in b["params"].items()) + ".",
        "The other keys are the sweep's settings that differ from `python -m raycg.train` with no overrides",
        "(export is left on: the replay writes <run>/export/).",
    ])


@hydra_app("sweep")
def main(cfg: DictConfig, overrides: list[str]) -> None:
    """The command line (tune/sweep.py): compose raycg/conf/sweep.yaml with the overrides, run the sweep."""
    set_level(cfg.log_level)
    run_sweep(cfg)
