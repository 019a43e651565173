"""python -m raycg.report [grids=sim,tmall] [seeds=3] [out=report] [publish=docs/results.md] [HYDRA_OVERRIDE ...]

Runs every grid in `conf/report/<grid>.yaml` (variants x seeds, each a full train + eval run
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

import json
import os
import platform
import shutil
import sys
import time

from raycg.report.grid import Grid, run_grid
from raycg.report.plots import save_plots
from raycg.report.summary import claims_table, delta_table, recall_table, surface_table

REPORT_KEYS = {"grids": "sim,tmall", "seeds": "3", "out": "report", "publish": ""}
DISCUSSION = ("<!-- discussion -->", "<!-- /discussion -->")


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
    if spec.endswith((".yaml", ".yml")):
        from omegaconf import OmegaConf

        if not os.path.exists(spec):
            raise SystemExit(f"report grid file {spec} does not exist")
        grid = Grid(**OmegaConf.to_container(OmegaConf.load(spec), resolve=False))
        if grid.reference not in grid.variants:
            raise SystemExit(f"{spec}: reference {grid.reference!r} is not one of the variants {list(grid.variants)}")
        return grid
    return Grid.load(spec)


def prepare_source(grid: Grid, out_dir: str) -> list[str] | None:
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
        log(f"[raycg.report] {grid.name}: converting {csv} ({mapping}) -> {data_dir}")
        write_data_dir(convert_log(csv, mapping), data_dir)
    return [f"data.dir={data_dir}"]


def machine() -> str:
    import ray
    import torch

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, no GPU used; {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"Ray {ray.__version__}")


def grid_section(grid: Grid, records: list[dict], plots: list[str], link_dir: str, seeds: int) -> str:
    variants = list(grid.variants)
    ref = [r for r in records if r["variant"] == grid.reference]
    ev = ref[0]["eval"]
    ks = [int(k) for k in ev["ks"]]
    k_small, k_big = (100 if 100 in ks else ks[0]), ks[-1]
    columns = [("conversion", k_small), ("conversion", k_big), ("engagement", k_small), ("engagement", k_big),
               ("conversion_advertiser", k_small)]
    nq = ev["n_queries"]
    minutes = sum(r["seconds"] for r in records) / 60
    cov = ev.get("als_coverage", {})
    cov_txt = "; ".join(f"{m}: {100 * c.get('conversion', 0):.0f}% of conversion queries, "
                        f"{100 * c.get('engagement', 0):.0f}% of engagement queries" for m, c in cov.items())
    parts = [
        f"## {grid.title}",
        "",
        f"- **Runs:** {len(variants)} variants x {seeds} seeds = {len(records)} training runs, each "
        f"`python -m raycg.train {' '.join(grid.base)} <variant overrides> seed=<s>` "
        f"(Ray Train, 2 workers). Total run time {minutes:.1f} min, "
        f"{minutes * 60 / max(len(records), 1):.0f} s per run.",
        f"- **Evaluation:** exact faiss inner-product search over all {ev['n_items']:,} items; "
        f"{nq.get('conversion', 0):,} conversion queries, {nq.get('engagement', 0):,} engagement queries "
        f"(held-out window). Baselines are fitted on the same training window and scored on the same queries.",
        f"- **ALS coverage** (queries whose user has training interactions of that kind; the rest get "
        f"that kind's popularity): {cov_txt or 'n/a'}.",
        "",
        f"### Recall (mean over seeds [95% interval over seeds])",
        "",
        recall_table(records, variants, grid.reference, columns),
        "",
        f"### Novel vs repeat positives (recall@{k_small})",
        "",
        "A positive is *repeat* when the user acted on the item before the query time "
        f"({100 * ev.get('repeat_share', {}).get('conversion', float('nan')):.0f}% of conversion and "
        f"{100 * ev.get('repeat_share', {}).get('engagement', float('nan')):.0f}% of engagement positives "
        "here); the re-engagement baseline owns those by construction. The model's job is the novel ones.",
        "",
        recall_table(records, variants, grid.reference,
                     [(t, k_small) for t in ("conversion_novel", "conversion_repeat", "engagement_novel",
                                            "engagement_repeat")]),
        "",
        f"### Ablations against the reference ({grid.reference}), paired by seed",
        "",
        "Relative change of the variant over the reference, mean [95% interval] of the per-seed ratios.",
        "",
        delta_table(records, variants, grid.reference, columns),
        "",
        "### The seed paper's directions",
        "",
        claims_table(records, grid.claims) if grid.claims else "(no claims listed for this grid)",
        "",
        f"### Conversion recall@{k_small} per surface (mean over seeds)",
        "",
        surface_table(records, grid.reference, "conversion", k_small),
        "",
        "### Plots",
        "",
        *[f"![{os.path.basename(p)}]({link_dir}/plots/{os.path.basename(p)})" for p in plots],
        "",
        "### Variants and exact configs",
        "",
        f"The composed config of every run is in `{link_dir}/configs/{grid.name}/<variant>-s<seed>.yaml`.",
        "",
        "| variant | overrides on top of the base |",
        "| --- | --- |",
        *[f"| {v} | `{' '.join(o) if o else '(none)'}` |" for v, o in grid.variants.items()],
        "",
    ]
    return "\n".join(parts)


def write_markdown(path: str, body: str) -> None:
    """Write the report, keeping the hand-written discussion block of an existing file."""
    discussion = f"{DISCUSSION[0]}\n(No discussion written yet.)\n{DISCUSSION[1]}"
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if DISCUSSION[0] in old and DISCUSSION[1] in old:
            discussion = old[old.index(DISCUSSION[0]):old.index(DISCUSSION[1]) + len(DISCUSSION[1])]
    with open(path, "w") as f:
        f.write(body.replace("{discussion}", discussion))


def main(argv: list[str]) -> None:
    opts, overrides = parse_args(argv)
    seeds = list(range(int(opts["seeds"])))
    grids = [load_grid(g) for g in opts["grids"].split(",") if g]
    out_dir = os.path.abspath(opts["out"])
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    sections, all_records, skipped = [], [], []
    for grid in grids:
        extra = prepare_source(grid, out_dir)
        if extra is None:
            log(f"[raycg.report] {grid.name}: source {grid.source_csv} not found; skipping this grid")
            skipped.append(f"{grid.name} (source {grid.source_csv} not found)")
            continue
        records = run_grid(grid, seeds, out_dir, extra + overrides, log)
        all_records += records
        sections.append((grid, records))
    wall = (time.perf_counter() - t0) / 60
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(all_records, f, indent=1)
    command = "python -m raycg.report " + " ".join(argv) if argv else "python -m raycg.report"
    header = "\n".join([
        "# raycg results: ablations and baselines",
        "",
        f"Generated by `{command}` (`make report`). {len(all_records)} runs, "
        f"{sum(r['seconds'] for r in all_records) / 60:.0f} min of training + evaluation in total "
        f"(sum of the runs' wall times); this invocation started {started} and took {wall:.0f} min "
        f"(runs finished earlier are reused).",
        "",
        f"**Machine:** {machine()}.",
        "",
        "Intervals: a per-metric 95% Student-t interval over the seeds (3 seeds: mean +- 4.30 sd/sqrt(3)); "
        "every run's eval.json also holds a per-query bootstrap interval. `conv` = held-out "
        "add-to-cart/checkout items, `eng` = held-out click/save items, `adv` = the held-out "
        "conversion's advertiser among the top-K items' advertisers.",
        "",
        *(["**Skipped grids:** " + ", ".join(skipped), ""] if skipped else []),
        "{discussion}",
        "",
    ])

    def render(link_dir: str, plot_dir: str) -> str:
        body = [header]
        for grid, records in sections:
            plots = save_plots(records, grid, [int(k) for k in records[0]["eval"]["ks"]],
                               [("conversion", 100), ("conversion", 1000), ("engagement", 1000)], plot_dir)
            body.append(grid_section(grid, records, plots, link_dir, len(seeds)))
        return "\n".join(body)

    write_markdown(os.path.join(out_dir, "README.md"), render(".", os.path.join(out_dir, "plots")))
    log(f"[raycg.report] report -> {os.path.join(out_dir, 'README.md')}")
    if opts["publish"]:
        path = os.path.abspath(opts["publish"])
        side = os.path.splitext(path)[0]
        os.makedirs(side, exist_ok=True)
        for grid, _ in sections:
            dst = os.path.join(side, "configs", grid.name)
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(os.path.join(out_dir, "configs", grid.name), dst)
        write_markdown(path, render(os.path.basename(side), os.path.join(side, "plots")))
        log(f"[raycg.report] published -> {path} (+ {side}/plots, {side}/configs)")


if __name__ == "__main__":
    main(sys.argv[1:])
