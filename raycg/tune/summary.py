"""What a sweep leaves behind: the trial table (printed, sweep.md), the plot (sweep.png) and the
best trial as a Hydra experiment file with its replay command. No Ray here except reading the
ResultGrid that `summarize` is given.

    summarize(grid, ...)            one row per trial: params, epochs, validation curve, final recall, status
    format_summary(s) / write_markdown(path, s)    the table, best marked
    write_plot(path, s, types)      final metric vs each knob (one panel each) + validation curves per trial
    write_experiment(...)           <sweep_dir>/experiment/<name>.yaml (`# @package _global_`)
    replay(sweep_dir, path)         the overrides and the command that train the best trial again
"""
from __future__ import annotations

import math
import os
import re
import shlex

import yaml

EPOCH_CLOCK = "epochs_done"  # the epoch reports carry it (raycg.tune.sweep.EpochReportCallback); the final report not
# Not written to the experiment file: the replay exports (the trials did not), gets a fresh run
# name, needs no dashboard (only Tune's cleanup of Train workers did) and scores the default
# baselines (trials score only popularity: the others do not change from trial to trial).
NOT_REPLAYED = ("export", "run_name", "ray.include_dashboard", "eval.baselines")


# -- the trial table -----------------------------------------------------------------------
def summarize(grid, keys: list[str], metric: str, mode: str, progress: str, epochs: int) -> dict:
    """Rows of the trial table and the best trial by `metric` among the evaluated trials.
    status: evaluated (final recall reported) | stopped (by the scheduler, before its
    evaluation) | error | unfinished."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        df = result.metrics_dataframe
        curve = _curve(df, progress)
        status = ("error" if result.error is not None else "evaluated" if _finite(m.get(metric))
                  else "stopped" if m.get("done") else "unfinished")
        rows.append({
            "trial": m.get("trial_id") or os.path.basename(result.path or ""),
            "status": status,
            "error": None if result.error is None else repr(result.error),
            "params": {k: _get(result.config, k) for k in keys},
            "epochs": int(m["epoch"]) + 1 if "epoch" in m else 0,
            "progress": curve[-1][1] if curve else None,  # the scheduler metric after the last epoch
            "curve": curve,
            "metrics": {k: v for k, v in m.items() if "recall@" in k and not k.startswith(("popularity_", "val_"))},
            "popularity": m.get(f"popularity_{metric}"),
            "run_dir": m.get("run_dir"),
            "started": float(df["timestamp"].min()) if df is not None and "timestamp" in df else None,
        })
    # the order the trials ran in (Optuna's trial ids are random); trials that never reported last
    rows.sort(key=lambda r: (r["started"] is None, r["started"] or 0.0))
    scored = [r for r in rows if r["status"] == "evaluated"]
    if not scored:
        errors = "\n".join(f"  {r['trial']}: {r['status']} {r['error'] or ''}" for r in rows)
        raise RuntimeError(f"no trial reported {metric}; trials:\n{errors}")
    sign = 1 if mode == "max" else -1
    best = max(scored, key=lambda r: sign * r["metrics"][metric])
    return {"metric": metric, "mode": mode, "progress_metric": progress, "epochs": epochs, "keys": keys,
            "trials": rows, "best": {**best, "value": best["metrics"][metric]}}


def _curve(df, metric: str) -> list[list[float]]:
    """[[epoch, value], ...] of the epoch reports in a trial's metrics dataframe (progress.csv)."""
    if df is None or EPOCH_CLOCK not in df or metric not in df:
        return []
    rows = df[[EPOCH_CLOCK, metric]].dropna()
    return [[int(e), float(v)] for e, v in zip(rows[EPOCH_CLOCK], rows[metric])]


def _get(d: dict | None, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _metric_columns(s: dict) -> list[str]:
    """The table's final-recall columns: tune.metric first, then recall@K of the two tasks (sweep.json
    keeps every recall the evaluation reported: repeat/novel, advertiser)."""
    shown = {k for r in s["trials"] for k in r["metrics"] if re.fullmatch(r"(conversion|engagement)_recall@\d+", k)}
    return sorted(shown | {s["metric"]}, key=lambda k: (k != s["metric"], k.split("@")[0], int(k.split("@")[1])))


def _short(metric: str) -> str:
    return metric.replace("conversion_", "conv ").replace("engagement_", "eng ").replace("recall", "R")


def _status(r: dict, s: dict) -> str:
    if r["trial"] == s["best"]["trial"]:
        return "best"
    if r["status"] == "stopped":
        return f"stopped after epoch {r['epochs']}"
    return f"ERROR {r['error'][:80]}" if r["status"] == "error" else r["status"]


def summary_line(s: dict) -> str:
    """Counts, wall time and trials/hour (over the trials this run trained: reused ones cost nothing)."""
    counts = {st: sum(r["status"] == st for r in s["trials"]) for st in ("evaluated", "stopped", "error", "unfinished")}
    ran = len(s["trials"]) - len(s.get("reused", []))
    rate = (f"{ran / s['seconds'] * 3600:.1f} trials/hour" if ran and s.get("seconds") else "no trial ran")
    reused = f", {len(s['reused'])} reused from the interrupted run" if s.get("reused") else ""
    return (f"sweep: {len(s['trials'])} trials ({counts['evaluated']} evaluated, {counts['stopped']} stopped early, "
            f"{counts['error']} errors{reused}) in {s.get('seconds', 0):.0f}s, {rate} -> {s.get('dir')}")


def format_summary(s: dict) -> str:
    """The printed table: trials x knobs x epochs, last validation metric and final recall; best marked."""
    metric_cols = _metric_columns(s)
    widths = [max(12, len(k) + 1) for k in s["keys"]]
    prog = s["progress_metric"]
    head = (f"{'trial':<14}" + "".join(f"{k:>{w}}" for k, w in zip(s["keys"], widths)) + f"{'epochs':>8}"
            + f"{_short(prog):>{max(13, len(prog) + 1)}}" + "".join(f"{_short(c):>13}" for c in metric_cols))
    lines = [head, "-" * len(head)]
    for r in s["trials"]:
        line = (f"{str(r['trial']):<14}" + "".join(f"{_fmt(r['params'][k]):>{w}}" for k, w in zip(s["keys"], widths))
                + f"{r['epochs']:>8}" + f"{_fmt(r['progress']):>{max(13, len(prog) + 1)}}"
                + "".join(f"{_fmt(r['metrics'].get(c)):>13}" for c in metric_cols))
        lines.append(f"{line}   {_status(r, s)}")
    b = s["best"]
    lines.append(f"best trial {b['trial']}: {s['metric']} = {b['value']:.4f} ({s['mode']}; popularity baseline "
                 f"{_fmt(b['popularity'])}); run dir {b['run_dir']}")
    lines.append("best config (overrides): " + " ".join(f"{k}={_override(v)}" for k, v in b["params"].items()))
    if "replay" in s:
        lines.append(f"best trial as an experiment: {s['replay']['experiment']}; train it again (and export) with")
        lines.append(f"  {s['replay']['command']}")
    if "table" in s:
        lines.append(f"table {s['table']}, plot {s['plot']}")
    lines.append(summary_line(s))
    return "\n".join(lines)


def write_markdown(path: str, s: dict) -> str:
    """sweep.md: the same table in Markdown, the replay command and the plot."""
    metric_cols = _metric_columns(s)
    cols = ["trial", *s["keys"], "epochs", s["progress_metric"], *metric_cols, "status"]
    out = [f"# Sweep {s.get('name', '')}", "",
           f"Searcher {s.get('searcher')}, scheduler {s.get('scheduler')} on {s['progress_metric']} "
           f"({s['epochs']} epochs per trial at most); best by {s['metric']} ({s['mode']}), the final evaluation.", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in s["trials"]:
        status = _status(r, s)
        cells = [str(r["trial"]), *(_fmt(r["params"][k]) for k in s["keys"]), str(r["epochs"]), _fmt(r["progress"]),
                 *(_fmt(r["metrics"].get(c)) for c in metric_cols), f"**{status}**" if status == "best" else status]
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    out += ["", summary_line(s), ""]
    if "replay" in s:
        out += [f"The best trial as a Hydra experiment: `{s['replay']['experiment']}`. Train it again (and export):",
                "", "```", s["replay"]["command"], "```", ""]
    if s.get("plot"):
        out += [f"![sweep]({os.path.basename(s['plot'])})", ""]
    with open(path, "w") as f:
        f.write("\n".join(out))
    return path


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
        return f"{v:.4f}" if 1e-2 <= abs(v) < 10 or v == 0 else f"{v:.4g}"
    return str(v)


# -- the plot ------------------------------------------------------------------------------
def write_plot(path: str, s: dict, leaves: dict) -> str:
    """One panel per swept knob: the final metric of each evaluated trial against the knob's value
    over its search range (`leaves`: dotted key -> {type, values}; best starred; dotted lines: trials
    stopped before their evaluation); last panel: the scheduler metric per epoch of every trial
    (dashed: stopped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    keys, metric = s["keys"], s["metric"]
    n = len(keys) + 1
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    evaluated = [r for r in s["trials"] if r["status"] == "evaluated"]
    stopped = [r for r in s["trials"] if r["status"] == "stopped"]
    best = s["best"]
    for ax, key in zip(axes.flat, keys):
        values = [r["params"][key] for r in s["trials"]]
        categorical = not all(_finite(v) for v in values)
        cats = sorted({str(v) for v in values}) if categorical else []
        pos = (lambda v: cats.index(str(v))) if categorical else (lambda v: v)
        ax.scatter([pos(r["params"][key]) for r in evaluated], [r["metrics"][metric] for r in evaluated],
                   color="tab:blue", s=28)
        ax.scatter([pos(best["params"][key])], [best["value"]], marker="*", s=220, color="tab:red", zorder=3)
        for r in stopped:
            ax.axvline(pos(r["params"][key]), color="0.6", ls=":", lw=1)
        leaf = leaves.get(key, {})
        if categorical:
            ax.set_xticks(range(len(cats)), cats)
        elif leaf.get("type") in ("uniform", "loguniform", "randint"):
            low, high = leaf["values"]
            if leaf["type"] == "loguniform":
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels overlap on narrow ranges
                ax.set_xlim(low / 1.1, high * 1.1)
            else:
                ax.set_xlim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        ax.set_xlabel(key)
        ax.set_ylabel(_short(metric))
        ax.grid(alpha=0.3)
    ax = axes.flat[len(keys)]
    for i, r in enumerate(s["trials"]):
        if not r["curve"]:
            continue
        epochs, values = zip(*r["curve"])
        is_best = r["trial"] == best["trial"]
        ax.plot(epochs, values, "--" if r["status"] == "stopped" else "-", marker="o", ms=3,
                lw=2.5 if is_best else 1.2, color="tab:red" if is_best else plt.cm.tab10(i % 10),
                label=f"{r['trial']}" + (" (best)" if is_best else ""))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(s["progress_metric"])
    ax.grid(alpha=0.3)
    if len(s["trials"]) <= 12:
        ax.legend(fontsize=6)
    for extra in list(axes.flat)[n:]:
        extra.set_visible(False)
    fig.suptitle(f"sweep {s.get('name', '')}: {len(s['trials'])} trials ({len(stopped)} stopped early), "
                 f"{s.get('searcher')} + {s.get('scheduler')}; * best by {metric}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the best trial as a Hydra experiment --------------------------------------------------
def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def _set(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


_ABSENT = object()


def experiment_values(params: dict, base: dict, defaults: dict) -> dict:
    """The swept values (dotted keys) on top of every setting of the sweep's base config that
    differs from `defaults` (the run config with no overrides): what the trial trained with."""
    values: dict = {}
    for key, value in _leaves(base):
        if key not in NOT_REPLAYED and _get_or_absent(defaults, key) != value:
            _set(values, key, value)
    for key, value in params.items():
        _set(values, key, value)
    return values


def _get_or_absent(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _ABSENT
        d = d[part]
    return d


def write_experiment(sweep_dir: str, name: str, params: dict, base: dict, defaults: dict, header: str = "") -> str:
    """<sweep_dir>/experiment/<name>.yaml: a global-package experiment like raycg/conf/experiment/*.yaml,
    replayed with `hydra.searchpath=[file://<sweep_dir>] experiment=<name>` (see `replay`)."""
    path = os.path.join(sweep_dir, "experiment", f"{name}.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    with open(path, "w") as f:
        f.write("# @package _global_\n" + comments)
        yaml.safe_dump(experiment_values(params, base, defaults), f, sort_keys=False)
    return path


def replay(sweep_dir: str, experiment_path: str) -> dict:
    """The overrides (and the shell command) that compose the experiment file as `python -m raycg.train`
    does: Hydra's searchpath adds <sweep_dir> as a config root, so experiment=<name> finds it."""
    name = os.path.splitext(os.path.basename(experiment_path))[0]
    root = f"file://{os.path.abspath(sweep_dir)}"
    if not re.fullmatch(r"[\w/.:+-]+", root):  # spaces, quotes, ...: a quoted string in Hydra's grammar
        root = "'" + root.replace("\\", "\\\\").replace("'", "\\'") + "'"
    overrides = [f"hydra.searchpath=[{root}]", f"experiment={name}"]
    return {"experiment": experiment_path, "overrides": overrides,
            "command": "python -m raycg.train " + " ".join(shlex.quote(o) for o in overrides)}
