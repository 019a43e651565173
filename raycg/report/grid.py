"""Run one ablation grid: every (variant, seed) is a full `raycg.train` run (Ray Train fit +
evaluation with the baselines) in its own run directory. Finished runs (eval.json present)
are skipped, so an interrupted report resumes where it stopped."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass

from omegaconf import OmegaConf

from raycg.config import CONF_DIR, compose
from raycg.config.schema import GridConfig
from raycg.logs import get_logger

log_info = get_logger("report").info


@dataclass
class Grid:
    """A grid file (raycg/conf/report/<name>.yaml, or any YAML path), checked against GridConfig."""

    name: str
    title: str
    base: list[str]
    variants: dict[str, list[str]]
    reference: str
    claims: list[dict]
    source_csv: str | None  # a real log converted at run time ($VARS expanded); absent: grid skipped
    source_format: str | None  # its raycg.convert mapping (a preset or YAML); None: the grid name
    family: str | None = None  # grids of one family at several `scale`s: the claims-vs-scale section
    scale: int | None = None

    @classmethod
    def load(cls, name: str) -> "Grid":
        """A shipped grid by name, or a grid YAML file by path."""
        if name.endswith((".yaml", ".yml")):
            path = name
            if not os.path.exists(path):
                raise SystemExit(f"report grid file {path} does not exist")
        else:
            path = os.path.join(CONF_DIR, "report", f"{name}.yaml")
            if not os.path.exists(path):
                choices = sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, "report")) if f.endswith(".yaml"))
                raise SystemExit(f"report grid {name!r}: no {path}; choose from {choices}")
        # typed like every other config: unknown keys and wrong types fail here, naming the key
        checked = OmegaConf.merge(OmegaConf.structured(GridConfig), OmegaConf.load(path))
        grid = cls(**OmegaConf.to_container(checked, resolve=False, throw_on_missing=True))
        if grid.reference not in grid.variants:
            raise ValueError(f"{path}: reference {grid.reference!r} is not one of the variants {list(grid.variants)}")
        for claim in grid.claims:
            missing = {claim["a"], claim["b"]} - set(grid.variants)
            if missing:
                raise ValueError(f"{path}: claim {claim} names unknown variant(s) {sorted(missing)}")
        return grid


def select_variants(grid: Grid, names: list[str]) -> Grid:
    """The grid with only the named variants among its own (the reference always kept) and the
    claims between two of them: a part of a grid to run now, the rest later."""
    keep = [v for v in grid.variants if v in names or v == grid.reference]
    claims = [c for c in grid.claims if c["a"] in keep and c["b"] in keep]
    return dataclasses.replace(grid, variants={v: grid.variants[v] for v in keep}, claims=claims)


def prepare_source(grid: Grid, out_dir: str, log=log_info) -> list[str] | None:
    """Extra overrides for a grid on a converted real log; None when the source is absent."""
    if not grid.source_csv:
        return []
    csv = os.path.abspath(os.path.expandvars(grid.source_csv))
    if not os.path.exists(csv):
        return None
    data_dir = os.path.abspath(os.path.join(out_dir, "data", grid.name))
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        from raycg.data.adapters import write_data_dir
        from raycg.data.logmap import convert_log

        mapping = grid.source_format or grid.name
        log(f"report: {grid.name}: converting {csv} ({mapping}) -> {data_dir}")
        write_data_dir(convert_log(csv, mapping), data_dir)
    return [f"data.dir={data_dir}"]


def compose_run(overrides: list[str]):
    """The config `python -m raycg.train <overrides>` would run with."""
    return compose(overrides)


def run_overrides(grid: Grid, variant: str, seed: int, runs_dir: str, extra: list[str]) -> list[str]:
    # no serving export per run (the report compares recall); a grid or the command line may turn it on
    return ["export=false", *grid.base, *extra, *(grid.variants[variant] or []), f"seed={seed}",
            f"run_name={variant}-s{seed}", f"paths.runs_dir={runs_dir}"]


def _comparable(overrides: list[str]) -> list[str]:
    # where the run directory lay is the machine's business, not the run's
    return [o for o in overrides if not o.startswith("paths.runs_dir=")]


def load_records(paths: list[str]) -> dict[tuple, dict]:
    """Finished runs from earlier reports' results.json files (another machine's, or a published
    report's), keyed by (grid, variant, seed); a later file wins."""
    found = {}
    for path in paths:
        if not os.path.exists(path):
            raise SystemExit(f"report records file {path} does not exist")
        with open(path) as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise SystemExit(f"report records file {path}: not JSON ({e})") from None
        if not isinstance(records, list):
            raise SystemExit(f"report records file {path}: expected a list of run records (a report's "
                             f"results.json), got {type(records).__name__}")
        for i, r in enumerate(records):
            missing = {"grid", "variant", "seed", "seconds", "overrides", "eval", "config"} - set(r)
            if missing:
                raise SystemExit(f"report records file {path}: record {i} lacks {sorted(missing)} (records "
                                 f"written before the report kept each run's config cannot be reused)")
            found[(r["grid"], r["variant"], r["seed"])] = r
    return found


def run_grid(grid: Grid, seeds: list[int], out_dir: str, extra: list[str], log=log_info,
             train: bool = True, earlier: dict | None = None, deadline: float | None = None) -> list[dict]:
    """Train + evaluate every (variant, seed); returns one record per run (eval.json, timing, the
    composed config). With `train=False` nothing is trained: only the runs finished earlier are
    returned. `earlier`: records of runs finished elsewhere (`load_records`), reused when their
    overrides are this grid's. `deadline` (a `time.perf_counter()` value): no run starts that the
    mean run time so far says would end after it; the rest are reported as not run."""
    from raycg.train.driver import run

    runs_dir = os.path.abspath(os.path.join(out_dir, "runs", grid.name))
    config_dir = os.path.join(out_dir, "configs", grid.name)
    os.makedirs(config_dir, exist_ok=True)
    records = []
    # seed-major: a grid run in pieces has every variant of seed 0 (the paired comparisons) first
    todo = [(v, s) for s in seeds for v in grid.variants]
    t_grid, trained, t_trained = time.perf_counter(), 0, 0.0  # runs trained here and their time: the ETA
    for i, (variant, seed) in enumerate(todo):
        run_dir = os.path.join(runs_dir, f"{variant}-s{seed}")
        eval_path = os.path.join(run_dir, "eval.json")
        timing_path = os.path.join(run_dir, "report_timing.json")
        config_path = os.path.join(config_dir, f"{variant}-s{seed}.yaml")
        overrides = run_overrides(grid, variant, seed, runs_dir, extra)
        step = f"report: {grid.name} {i + 1}/{len(todo)} {variant} seed {seed}"
        record = (earlier or {}).get((grid.name, variant, seed))
        if record is not None and _comparable(record["overrides"]) != _comparable(overrides):
            log(f"{step}: a records file has this run with other overrides ({' '.join(record['overrides'])}); "
                f"not reused")
            record = None
        finished = os.path.exists(eval_path) and os.path.exists(timing_path)
        if finished:  # a grid edited since (a base or variant override) makes it another experiment
            with open(timing_path) as f:
                ran_with = json.load(f)["overrides"]
            if _comparable(ran_with) != _comparable(overrides):
                log(f"{step}: {run_dir} finished with other overrides ({' '.join(ran_with)}); not reused")
                finished = False
        if finished:
            log(f"{step}: done earlier, reusing {eval_path}")
        elif record is not None:
            log(f"{step}: done earlier on another machine, reusing its record")
            with open(config_path, "w") as f:
                f.write(record["config"])
            records.append({**record, "run_dir": None})
            continue
        elif not train:
            log(f"{step}: not run (reuse_only: no finished run in {run_dir})")
            continue
        elif deadline is not None and time.perf_counter() + (t_trained / trained if trained else 0) > deadline:
            log(f"{step}: not run (max_minutes: it would end past the time budget)")
            continue
        else:
            if os.path.exists(run_dir):
                shutil.rmtree(run_dir)  # a run stopped mid-way: start it again from scratch
            log(f"{step}: python -m raycg.train {' '.join(overrides)}")
            t0 = time.perf_counter()
            run(compose_run(overrides))
            with open(timing_path, "w") as f:
                json.dump({"seconds": time.perf_counter() - t0, "overrides": overrides}, f)
            done = i + 1
            elapsed = time.perf_counter() - t_grid
            trained, t_trained = trained + 1, t_trained + time.perf_counter() - t0
            eta = f", ETA {t_trained / trained * (len(todo) - done) / 60:.1f} min" if done < len(todo) else ""
            log(f"report: {grid.name}: {done}/{len(todo)} runs, {elapsed / 60:.1f} min so far{eta}")
        shutil.copyfile(os.path.join(run_dir, "config.yaml"), config_path)
        with open(eval_path) as f:
            results = json.load(f)
        with open(timing_path) as f:
            timing = json.load(f)
        with open(config_path) as f:
            config = f.read()
        records.append({"grid": grid.name, "variant": variant, "seed": seed, "run_dir": run_dir,
                        "seconds": timing["seconds"], "overrides": timing["overrides"], "eval": results,
                        "config": config})
    return records
