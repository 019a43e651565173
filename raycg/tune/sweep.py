"""A Ray Tune sweep of loss weights, t_max, the advertiser-loss weight, the temperature and the
learning rate; `raycg-tune [hydra overrides]` (or `python tune/sweep.py`) runs it.

Each trial is one real raycg run (raycg.train.driver.run: TorchTrainer fit -> faiss recall@K)
with the trial's values merged into the main config; the sweep settings are the `tune` config
group (raycg/conf/tune/default.yaml, loaded by default, `tune=<name>` picks another).

Search and early stopping: Optuna's TPE proposes each trial's values (`tune.searcher=optuna`;
`random` samples them, and is the one that takes `grid` leaves), and ASHA stops trials whose
per-epoch validation recall (`tune.scheduler_metric`, reported after every epoch through
TuneReportCallback) trails the others' at the same epoch (`tune.scheduler=asha`; `fifo` runs
every trial to the end). Both read that validation metric (the last part of the training
window, never the evaluation window); the best trial is the finished one with the highest
`tune.metric` (the evaluation's recall). The sweep ends with a table (sweep.md), a plot
(sweep.png: the final metric against each knob, validation curves per trial) and the best
trial as a Hydra experiment file that `python -m raycg.train` replays (the command is printed).
Examples:

    python tune/sweep.py experiment=smoke trainer.epochs=1
    python tune/sweep.py data=sim_small tune.num_samples=2 tune.metric=engagement_recall@1000

Layout under <paths.runs_dir>/<tune.name>/ (the Tune experiment directory):
    <trial dirs>/     Tune's own trial state and results
    runs/<trial>/     one raycg run directory per trial (config.yaml, checkpoints, eval.json)
    sweep.json        the trial table and the best trial; sweep.md the table, sweep.png the plot
    experiment/<name>_best.yaml   the best trial's values (`experiment=<name>_best
                      hydra.searchpath=[file://<sweep dir>]` replays it)
"""
from __future__ import annotations

import json
import math
import os
import time

import ray
from omegaconf import DictConfig, OmegaConf
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from raycg.config import compose, hydra_app
from raycg.config.schema import RunConfig
from raycg.logs import get_logger, set_level
from raycg.train.driver import ensure_data, init_ray, resolve_paths, run

log = get_logger("tune").info
SAMPLERS = {
    "grid": tune.grid_search,
    "choice": tune.choice,
    "uniform": lambda v: tune.uniform(*v),
    "loguniform": lambda v: tune.loguniform(*v),
    "randint": lambda v: tune.randint(*v),
}


def compose_sweep(overrides: list[str]) -> DictConfig:
    """The config exactly as `python tune/sweep.py <overrides>` sees it (raycg/conf/sweep.yaml)."""
    return compose(overrides, config_name="sweep")


# -- search space --------------------------------------------------------------------------
def _is_leaf(node) -> bool:
    return isinstance(node, dict) and "type" in node


def build_param_space(space: dict) -> dict:
    """{loss: {t_max: {type: choice, values: [...]}}} -> {loss: {t_max: tune.choice([...])}}."""
    out = {}
    for key, node in space.items():
        if _is_leaf(node):
            if node["type"] not in SAMPLERS:
                raise ValueError(f"search_space {key}: unknown type {node['type']!r}; one of {sorted(SAMPLERS)}")
            values = list(node["values"])
            if node["type"] in ("uniform", "loguniform", "randint") and len(values) != 2:
                raise ValueError(f"search_space {key}: {node['type']} takes values [low, high], got {values}")
            out[key] = SAMPLERS[node["type"]](values)
        elif isinstance(node, dict):
            out[key] = build_param_space(node)
        else:
            raise ValueError(f"search_space {key}: expected {{type, values}} or a nested mapping, got {node!r}")
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


def _plain(x):
    """numpy scalars (tune.choice may hand them out) -> Python, so OmegaConf accepts them."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x.item() if hasattr(x, "item") else x


def _get(d: dict | None, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def recall_metrics(results: dict) -> dict:
    """raycg eval results -> flat Tune metrics: conversion_recall@100, popularity_conversion_recall@100, ..."""
    out = {}
    for method, prefix in (("model", ""), ("popularity", "popularity_")):
        for task, by_k in results[method].items():
            for k, value in by_k.items():
                out[f"{prefix}{task}_recall@{int(k)}"] = float(value)
    return out


# -- one trial (runs in a Tune actor) ------------------------------------------------------
def train_trial(config: dict, base_cfg: dict, runs_dir: str) -> None:
    """Merge the trial's sample into the base config, run raycg, report recall@K to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    ray.data.DataContext.get_current().enable_progress_bars = False
    # typed like a composed config (raycg.config.schema): a swept value of the wrong type fails here
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), base_cfg, OmegaConf.create(_plain(config)))
    cfg.paths.runs_dir = runs_dir
    cfg.run_name = tune.get_context().get_trial_name()  # unique in the sweep
    # TuneReportCallback forwards each epoch's ray.train.report metrics (loss, rows/s) to Tune.
    results = run(cfg, callbacks=[TuneReportCallback()])
    train = {k: v for k, v in results["train_metrics"].items() if isinstance(v, (int, float))}
    tune.report({**train, **recall_metrics(results),
                 "run_dir": os.path.join(runs_dir, cfg.run_name), "eval_s": results["seconds"]["total"]})


# -- the sweep (driver) --------------------------------------------------------------------
def run_sweep(cfg: DictConfig) -> tuple[tune.ResultGrid, dict]:
    """Simulate the data once, run the trials, print/write the table. Returns (grid, summary)."""
    ts = cfg.tune
    check_sweep(cfg)  # before Ray starts
    resolve_paths(cfg)
    if cfg.ray.include_dashboard is None:
        cfg.ray.include_dashboard = True  # without it a finished trial's worker reservation leaks
    init_ray(cfg)
    ensure_data(cfg)  # once, here: trials then only read it

    name = ts.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = os.path.join(cfg.paths.runs_dir, name)
    space = OmegaConf.to_container(ts.search_space, resolve=True)
    keys = swept_keys(space)
    base_cfg = OmegaConf.to_container(cfg, resolve=True)
    base_cfg.pop("tune")
    base_cfg["run_name"] = None

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base_cfg=base_cfg, runs_dir=os.path.join(sweep_dir, "runs")),
        OmegaConf.to_container(ts.trial_resources))
    reused = []
    if tune.Tuner.can_restore(sweep_dir):
        # the same tune.name again (e.g. after the sweep was killed): finished trials are kept,
        # unfinished and errored ones run again
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
        reused = [r.metrics.get("trial_id") for r in tuner.get_results()
                  if r.error is None and r.metrics and "run_dir" in r.metrics]
        log(f"tune: resuming sweep {name} from {sweep_dir}: {len(reused)} finished trial(s) reused "
            f"({', '.join(map(str, reused)) or 'none'}); the others run (again)")
    else:
        tuner = new_tuner(trainable, space, ts, name, cfg.paths.runs_dir, cfg.trainer.epochs)
    log(f"tune: sweep {name}: {keys} -> {ts.metric} ({ts.mode}); dir {sweep_dir}")
    t0 = time.perf_counter()
    grid = tuner.fit()
    summary = summarize(grid, keys, ts.metric, ts.mode, ts.scheduler_metric)
    summary.update(name=name, dir=sweep_dir, seconds=time.perf_counter() - t0, reused=reused,
                   searcher=ts.searcher, scheduler=ts.scheduler)
    summary["experiment"] = write_experiment(summary, sweep_dir, name)
    with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    table = format_summary(summary)
    with open(os.path.join(sweep_dir, "sweep.md"), "w") as f:
        f.write(f"# Sweep {name}\n\n```\n{table}\n```\n\n![sweep](sweep.png)\n")
    plot_sweep(grid, summary, os.path.join(sweep_dir, "sweep.png"))
    print("\n" + table, flush=True)  # the sweep's result table: output, not a log line
    return grid, summary


def check_sweep(cfg: DictConfig) -> None:
    """Settings the sweep needs, checked before Ray starts (each error names its key)."""
    ts = cfg.tune
    if ts.mode not in ("max", "min"):
        raise ValueError(f"tune.mode must be max or min, got {ts.mode!r}")
    valid = [f"{task}_recall@{int(k)}" for task in ("conversion", "engagement") for k in cfg.eval.ks]
    if ts.metric not in valid:
        raise ValueError(f"tune.metric={ts.metric!r} is not reported; one of {valid} (eval.ks)")
    if ts.searcher == "optuna" or ts.scheduler == "asha":
        if not cfg.data.validation_fraction > 0:
            raise ValueError(f"tune.searcher={ts.searcher} / tune.scheduler={ts.scheduler} read the per-epoch "
                             f"validation recall, and data.validation_fraction={cfg.data.validation_fraction} leaves "
                             "no validation window: set it > 0, or tune.searcher=random tune.scheduler=fifo")
        per_epoch = ["val_mean_recall"] + [f"val_{t}_recall@{int(k)}" for t in ("conversion", "engagement")
                                           for k in cfg.eval.ks]
        if ts.scheduler_metric not in per_epoch:
            raise ValueError(f"tune.scheduler_metric={ts.scheduler_metric!r} is not reported after each epoch; "
                             f"one of {per_epoch}")
    space = OmegaConf.to_container(ts.search_space, resolve=True)
    build_param_space(space)  # unknown types, malformed leaves
    grids = [k for k in swept_keys(space) if _leaf(space, k)["type"] == "grid"]
    if ts.searcher == "optuna" and grids:
        raise ValueError(f"tune.search_space {grids}: `grid` leaves need tune.searcher=random (Optuna proposes "
                         "values one trial at a time); use {type: choice, values: [...]} with optuna")
    if ts.scheduler == "asha" and not 1 <= ts.grace_period <= cfg.trainer.epochs:
        raise ValueError(f"tune.grace_period={ts.grace_period}: must be 1..trainer.epochs={cfg.trainer.epochs} "
                         "(epochs every trial runs before ASHA may stop it)")


def _leaf(space: dict, dotted: str) -> dict:
    for part in dotted.split("."):
        space = space[part]
    return space


def new_tuner(trainable, space: dict, ts: DictConfig, name: str, runs_dir: str, epochs: int) -> tune.Tuner:
    """Searcher and scheduler both read `tune.scheduler_metric`, the validation recall that every
    report carries (each epoch's, and the final one, which repeats the last epoch's metrics);
    the evaluation's recall (tune.metric) exists only in the final report and picks the best."""
    metric, mode = str(ts.scheduler_metric), str(ts.mode)  # plain str: Tune asserts type(metric) == type(mode)
    if ts.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = ConcurrencyLimiter(OptunaSearch(metric=metric, mode=mode, seed=ts.seed),
                                    max_concurrent=ts.max_concurrent_trials)
    else:
        search = BasicVariantGenerator(max_concurrent=ts.max_concurrent_trials, random_state=ts.seed)
    if ts.scheduler == "asha":
        # training_iteration counts reports: one per epoch, then the final one after evaluation
        scheduler = ASHAScheduler(metric=metric, mode=mode, time_attr="training_iteration", max_t=epochs + 1,
                                  grace_period=ts.grace_period, reduction_factor=ts.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=build_param_space(space),
        tune_config=tune.TuneConfig(num_samples=ts.num_samples, search_alg=search, scheduler=scheduler),
        run_config=tune.RunConfig(
            name=name, storage_path=runs_dir,
            failure_config=tune.FailureConfig(max_failures=ts.max_failures), verbose=1),
    )


def validation_curve(result, scheduler_metric: str) -> list[float]:
    """The trial's per-epoch validation metric, from Tune's own result history (the final
    report, which has `run_dir`, repeats the last epoch and is left out)."""
    df = result.metrics_dataframe
    if df is None or scheduler_metric not in df:
        return []
    if "run_dir" in df:
        df = df[df["run_dir"].isna()]
    return [float(v) for v in df[scheduler_metric].dropna()]


def summarize(grid: tune.ResultGrid, keys: list[str], metric: str, mode: str,
              scheduler_metric: str = "val_mean_recall") -> dict:
    rows = []
    for result in grid:
        m = result.metrics or {}
        curve = validation_curve(result, scheduler_metric)
        rows.append({
            "trial": m.get("trial_id") or os.path.basename(result.path or ""),
            "error": None if result.error is None else repr(result.error),
            "params": {k: _get(result.config, k) for k in keys},
            "metrics": {k: v for k, v in m.items() if "recall@" in k and not k.startswith(("popularity_", "val_"))},
            "popularity": m.get(f"popularity_{metric}"),
            "run_dir": m.get("run_dir"),
            "curve": curve,
            # stopped by the scheduler: no final evaluation, so not a candidate for the best
            "stopped_after_epochs": None if result.error is not None or "run_dir" in m else len(curve),
        })
    scored = [r for r in rows if r["error"] is None and _finite(r["metrics"].get(metric))]
    if not scored:
        errors = "\n".join(f"  {r['trial']}: {r['error']}" for r in rows)
        raise RuntimeError(f"no trial reported {metric}; trial errors:\n{errors}")
    pick = max if mode == "max" else min
    best_row = pick(scored, key=lambda r: r["metrics"][metric])
    return {"metric": metric, "mode": mode, "keys": keys, "scheduler_metric": scheduler_metric, "trials": rows,
            "best": {**best_row, "value": best_row["metrics"][metric]}}


def write_experiment(summary: dict, sweep_dir: str, name: str) -> dict:
    """The best trial's swept values as a Hydra experiment file, and the command that replays it."""
    best = summary["best"]
    tree: dict = {}
    for key, value in best["params"].items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _plain(value)
    exp_name = f"{name}_best"
    path = os.path.join(sweep_dir, "experiment", f"{exp_name}.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# @package _global_\n# Best trial {best['trial']} of sweep {name}: {summary['metric']} = "
                f"{best['value']:.4f} ({summary['mode']}). Replay: see sweep.md\n")
        f.write(OmegaConf.to_yaml(OmegaConf.create(tree)))
    command = (f"python -m raycg.train experiment={exp_name} 'hydra.searchpath=[file://{os.path.abspath(sweep_dir)}]'")
    return {"name": exp_name, "path": path, "replay": command}


def plot_sweep(grid: tune.ResultGrid, summary: dict, path: str) -> None:
    """One panel per swept knob (the final metric of every finished trial against the knob's
    value) and one of the validation curves per trial (stopped trials end early)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys, metric = summary["keys"], summary["metric"]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(3.2 * (len(keys) + 1), 3.0), squeeze=False)
    done = [r for r in summary["trials"] if _finite(r["metrics"].get(metric))]
    for ax, key in zip(axes[0], keys):
        xs = [r["params"][key] for r in done]
        ax.scatter(xs, [r["metrics"][metric] for r in done], s=18)
        if isinstance(summary["best"]["params"][key], (int, float)):
            ax.scatter([summary["best"]["params"][key]], [summary["best"]["value"]], s=60, marker="*", color="C3")
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
    ax = axes[0][-1]
    for r in summary["trials"]:
        if r["curve"]:
            ax.plot(range(1, len(r["curve"]) + 1), r["curve"], marker=".", alpha=0.8,
                    linestyle="--" if r["stopped_after_epochs"] else "-")
    ax.set_xlabel("epoch (dashed: stopped early)", fontsize=8)
    ax.set_ylabel(summary["scheduler_metric"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def format_summary(s: dict) -> str:
    metric_cols = sorted({k for r in s["trials"] for k in r["metrics"]},
                         key=lambda k: (k != s["metric"], k))
    short = [c.replace("conversion_", "conv ").replace("engagement_", "eng ").replace("recall", "R") for c in metric_cols]
    widths = [max(12, len(k) + 1) for k in s["keys"]]
    head = f"{'trial':<14}" + "".join(f"{k:>{w}}" for k, w in zip(s["keys"], widths)) + "".join(f"{c:>13}" for c in short)
    lines = [head, "-" * len(head)]
    for r in s["trials"]:
        line = f"{str(r['trial']):<14}" + "".join(f"{_fmt(r['params'][k]):>{w}}" for k, w in zip(s["keys"], widths))
        if r["error"]:
            line += f"  ERROR {r['error'][:80]}"
        elif r.get("stopped_after_epochs") is not None:
            line += f"  stopped by {s.get('scheduler', 'the scheduler')} after {r['stopped_after_epochs']} epoch(s)"
        else:
            line += "".join(f"{_fmt(r['metrics'].get(c)):>13}" for c in metric_cols)
        lines.append(line + ("   <- best" if r["trial"] == s["best"]["trial"] else ""))
    b = s["best"]
    lines.append(f"best trial {b['trial']}: {s['metric']} = {b['value']:.4f} ({s['mode']}; popularity baseline "
                 f"{_fmt(b['popularity'])})")
    lines.append("best config (overrides): " + " ".join(
        f"{k}={_override(v)}" for k, v in b["params"].items()))
    lines.append(f"best run dir: {b['run_dir']}")
    if "experiment" in s:
        lines.append(f"replay the best trial: {s['experiment']['replay']}")
    if "seconds" in s:
        ran = len(s["trials"]) - len(s.get("reused", []))
        rate = f", {ran / s['seconds'] * 3600:.0f} trials/hour" if ran and s["seconds"] > 0 else ""
        lines.append(f"sweep ({s.get('searcher', '?')} search, {s.get('scheduler', '?')} scheduler): "
                     f"{len(s['trials'])} trials in {s['seconds']:.0f}s{rate} -> {s['dir']}/sweep.md, sweep.png")
    return "\n".join(lines).rstrip()


def _override(v) -> str:
    """A Hydra override value; floats stay floats (1.0, not 1)."""
    if isinstance(v, float):
        text = f"{v:.6g}"
        return text if any(c in text for c in ".einn") else text + ".0"
    return str(v)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.4g}"
    return str(v)


@hydra_app("sweep")
def main(cfg: DictConfig, overrides: list[str]) -> None:
    """The command line (tune/sweep.py): compose raycg/conf/sweep.yaml with the overrides, run the sweep."""
    set_level(cfg.log_level)
    run_sweep(cfg)
