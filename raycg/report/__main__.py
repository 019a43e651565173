"""python -m raycg.report [grids=sim,tmall] [seeds=3] [out=report] [publish=docs/results.md] [HYDRA_OVERRIDE ...]

Runs every grid in `raycg/conf/report/<grid>.yaml` (variants x seeds, each a full train + eval run
with the baselines), then writes into `out`:
    README.md                 the report: recall tables with 95% intervals over seeds, paired
                              ablation deltas, the seed paper's claims, per-surface recall
    results.json              every run's metrics, overrides and wall time
    plots/<grid>_*.png        recall@K curves, bars per ablation
    configs/<grid>/*.yaml     the exact composed config of every run
    runs/<grid>/<variant>-s<seed>/   the run directories (checkpoint, eval.json, ...)
`publish=PATH` also writes the report to PATH with plots and configs beside it (PATH minus
.md), keeping its hand-written discussion section. Other key=value arguments are Hydra
overrides applied to every run (e.g. `trainer.epochs=1` for a quick look). A grid may also be
given as a path to a grid YAML file. Finished runs are reused, so a stopped report resumes.
"""
from __future__ import annotations

import os
import sys

from raycg.report.document import write_report
from raycg.report.grid import Grid

REPORT_KEYS = {"grids": "sim,tmall", "seeds": "3", "out": "report", "publish": ""}


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    opts, overrides = dict(REPORT_KEYS), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"unknown argument {arg!r}; expected key=value ({sorted(REPORT_KEYS)} or a Hydra override)")
        if key in REPORT_KEYS:
            opts[key] = value
        else:
            overrides.append(arg)
    if not opts["seeds"].isdigit() or int(opts["seeds"]) < 1:
        raise SystemExit(f"seeds={opts['seeds']!r}: expected a positive number of seeds")
    return opts, overrides


def load_grid(spec: str) -> Grid:
    return Grid.load(spec)  # a shipped grid's name or a grid YAML's path


def main(argv: list[str]) -> None:
    opts, overrides = parse_args(argv)
    seeds = list(range(int(opts["seeds"])))
    grids = [load_grid(g) for g in opts["grids"].split(",") if g]
    out_dir = os.path.abspath(opts["out"])
    command = "python -m raycg.report " + " ".join(argv) if argv else "python -m raycg.report"
    write_report(grids, seeds, out_dir, overrides, opts["publish"], command, log)


if __name__ == "__main__":
    main(sys.argv[1:])
