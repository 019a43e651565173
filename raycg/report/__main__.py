"""raycg-report / python -m raycg.report [grids=[sim,tmall]] [seeds=3] [out=report] [publish=docs/results.md] [HYDRA_OVERRIDE ...]

Runs every grid in `raycg/conf/report/<grid>.yaml` (variants x seeds, each a full train + eval run
with the baselines), then writes into `out`:
    README.md                 the report: recall tables with 95% intervals over seeds, paired
                              ablation deltas, the seed paper's claims, per-surface recall
    results.json              every run's metrics, overrides and wall time
    plots/<grid>_*.png        recall@K curves, bars per ablation
    configs/<grid>/*.yaml     the exact composed config of every run
    runs/<grid>/<variant>-s<seed>/   the run directories (checkpoint, eval.json, ...)
`publish=PATH` also writes the report to PATH with plots and configs beside it (PATH minus
.md), keeping its hand-written discussion section. The options are the keys of
raycg/conf/report.yaml; every other override is a `raycg-train` override (the run config is
composed with the report's, so it is checked at once), applied to every run (e.g.
`trainer.epochs=1` for a quick look). A grid may also be given as a path to a grid YAML file
(`grids=[my_grid.yaml]`). Finished runs are reused, so a stopped report resumes; so are the
runs in `records=[...]` (earlier reports' results.json, e.g. a GPU machine's), and
`max_minutes=M` starts no run that would end past M minutes, and `variants=[a,b]` keeps only
those variants of each grid (and its reference): a grid can run in pieces.
"""
from __future__ import annotations

import os

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from raycg.config import hydra_app
from raycg.config.schema import ReportConfig, RunConfig
from raycg.logs import set_level
from raycg.report.document import write_report
from raycg.report.grid import Grid, select_variants

# the report's own keys (raycg/conf/report.yaml); every other override goes to the runs
REPORT_KEYS = {f for f in ReportConfig.__dataclass_fields__ if f not in RunConfig.__dataclass_fields__}


def run_overrides_given(overrides: list[str]) -> list[str]:
    """The command-line overrides that are not the report's own keys: applied to every run."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [text for text, o in zip(overrides, parsed) if o.key_or_group not in REPORT_KEYS]


def load_grid(spec: str) -> Grid:
    return Grid.load(spec)  # a shipped grid's name or a grid YAML's path


@hydra_app("report")
def main(cfg: DictConfig, argv: list[str]) -> None:
    set_level(cfg.log_level)
    if cfg.seeds < 1:
        raise SystemExit(f"seeds={cfg.seeds}: expected a positive number of seeds")
    overrides = run_overrides_given(argv)
    seeds = list(range(cfg.seeds))
    grids = [load_grid(g) for g in cfg.grids]
    if cfg.variants:
        unknown = set(cfg.variants) - {v for g in grids for v in g.variants}
        if unknown:
            raise SystemExit(f"variants={list(cfg.variants)}: {sorted(unknown)} in none of the grids "
                             f"{[g.name for g in grids]}")
        grids = [select_variants(g, list(cfg.variants)) for g in grids]
    out_dir = os.path.abspath(cfg.out)
    command = "python -m raycg.report " + " ".join(argv) if argv else "python -m raycg.report"
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        raise SystemExit(f"max_minutes={cfg.max_minutes}: expected a positive time budget in minutes, or null")
    write_report(grids, seeds, out_dir, overrides, cfg.publish or "", command, train=not cfg.reuse_only,
                 records_from=[os.path.abspath(p) for p in cfg.records], max_minutes=cfg.max_minutes)


if __name__ == "__main__":
    main()
