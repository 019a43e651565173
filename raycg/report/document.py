"""The report document: every grid's runs -> README.md (tables, plots, configs) and the
published copy (`publish=PATH`, keeping its hand-written discussion). `python -m raycg.report`
(raycg/report/__main__.py) parses the arguments and calls `write_report`."""
from __future__ import annotations

import json
import os
import shutil
import time

from omegaconf import OmegaConf

from raycg.host import describe_host, host_line
from raycg.logs import get_logger
from raycg.report.grid import Grid, load_records, prepare_source, run_grid
from raycg.report.plots import claims_vs_scale_plot, save_plots
from raycg.report.summary import claims_table, claims_vs_scale, delta_table, recall_table, surface_table

log_info = get_logger("report").info

DISCUSSION = ("<!-- discussion -->", "<!-- /discussion -->")


def machine() -> str:
    return host_line(describe_host())


def ran_on(records: list[dict]) -> str:
    """Where a grid's runs trained, from each run's eval.json (`environment`, kept since
    2026-12-07; of older records only the config's trainer.use_gpu is known):
    "NVIDIA H100 80GB HBM3 (16-core host): 3 runs; CPU (2 cores, ...): 2 runs"."""
    counts: dict[str, int] = {}
    for r in records:
        env = r["eval"].get("environment")
        if env is None:  # only the composed config tells
            gpu = "config" in r and OmegaConf.create(r["config"]).trainer.use_gpu
            where = "a GPU, card not recorded" if gpu else "CPU, machine not recorded"
        elif env.get("train_device") in (None, "cpu"):
            where = f"CPU ({env.get('cpus')} cores, {env.get('cpu_model')})"
        else:
            where = f"{env['train_device']} ({env.get('cpus')}-core host)"
        counts[where] = counts.get(where, 0) + 1
    return "; ".join(f"{where}: {_count(n, 'run')}" for where, n in counts.items())


def grid_section(grid: Grid, records: list[dict], plots: list[str], link_dir: str, seeds: int) -> str:
    ran_variants = {r["variant"] for r in records}
    variants = [v for v in grid.variants if v in ran_variants]  # reuse_only: a variant without runs has no row
    ref = [r for r in records if r["variant"] == grid.reference]
    ev = ref[0]["eval"]
    ks = [int(k) for k in ev["ks"]]
    k_small, k_big = (100 if 100 in ks else ks[0]), ks[-1]
    columns = [("conversion", k_small), ("conversion", k_big), ("engagement", k_small), ("engagement", k_big),
               ("conversion_advertiser", k_small)]
    if ks[0] < k_small:  # a smaller K keeps the advertiser level from saturating (many advertisers hit @100)
        columns.append(("conversion_advertiser", ks[0]))
    nq = ev["n_queries"]
    minutes = sum(r["seconds"] for r in records) / 60
    ran = {(r["variant"], r["seed"]) for r in records}
    missing = [f"{v}-s{s}" for v in grid.variants for s in range(seeds) if (v, s) not in ran]
    count = (f"{_count(len(variants), 'variant')} x {_count(seeds, 'seed')} = {_count(len(records), 'training run')}"
             if not missing else
             f"{len(records)} of {_count(len(grid.variants) * seeds, 'training run')} ({_count(len(grid.variants), 'variant')} "
             f"x {_count(seeds, 'seed')}; not run: {', '.join(missing)})")
    cov = ev.get("als_coverage", {})
    cov_txt = "; ".join(f"{m}: {100 * c.get('conversion', 0):.0f}% of conversion queries, "
                        f"{100 * c.get('engagement', 0):.0f}% of engagement queries" for m, c in cov.items())
    parts = [
        f"## {grid.title}",
        "",
        f"- **Runs:** {count}, each "
        f"`python -m raycg.train {' '.join(grid.base)} <variant overrides> seed=<s>` "
        f"({_trainer(ref[0])}). Total run time {minutes:.1f} min, "
        f"{minutes * 60 / max(len(records), 1):.0f} s per run. Trained on: {ran_on(records)}.",
        f"- **Evaluation:** exact inner-product search ({ev.get('search_backend', 'faiss')}) over all "
        f"{ev['n_items']:,} items; "
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
        "| variant | overrides on top of the base | recent-item boost (per seed) |",
        "| --- | --- | --- |",
        *[f"| {v} | `{' '.join(o) if o else '(none)'}` | {_boosts(records, v)} |" for v, o in grid.variants.items()],
        "",
    ]
    return "\n".join(parts)


def scale_sections(sections: list[tuple[Grid, list[dict]]], link_dir: str, plot_dir: str) -> list[str]:
    """A claims-vs-scale section per grid family run at two or more scales (Grid.family / scale):
    each claim of the family's smallest grid whose two variants ran at two or more scales (a
    demo-only condition is left out), paired over seeds at every scale."""
    families: dict[str, list[tuple[Grid, list[dict]]]] = {}
    for grid, records in sections:
        if grid.family and grid.scale:
            families.setdefault(grid.family, []).append((grid, records))
    out = []
    for family, members in families.items():
        if len({g.scale for g, _ in members}) < 2:
            continue
        members.sort(key=lambda m: m[0].scale)
        ran = [{r["variant"] for r in recs} for _, recs in members]
        claims = [c for c in members[0][0].claims if sum({c["a"], c["b"]} <= names for names in ran) >= 2]
        if not claims:
            continue
        table, series = claims_vs_scale([(g.scale, recs) for g, recs in members], claims)
        os.makedirs(plot_dir, exist_ok=True)
        plot = claims_vs_scale_plot(series, claims, os.path.join(plot_dir, f"{family}_claims_vs_scale.png"),
                                    f"{family}: the seed's claims against scale (dashed: the seed's number)")
        out += [f"## Claims vs scale: {family}", "",
                "Grids: " + ", ".join(f"{g.name} (scale {g.scale:,}, {_count(len({r['seed'] for r in recs}), 'seed')})"
                                      for g, recs in members) + ". Each cell: relative change of the first "
                "variant over the second, mean [95% interval] of the per-seed ratios.", "",
                table, "", f"![{os.path.basename(plot)}]({link_dir}/plots/{os.path.basename(plot)})", ""]
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _trainer(record: dict) -> str:
    """How the run trained: Ray Train workers on CPU or GPU (its composed config), and its search backend."""
    t = OmegaConf.create(record["config"]).trainer
    device = f"{t.num_workers} GPU worker(s)" if t.use_gpu else f"{t.num_workers} CPU workers"
    backend = record["eval"].get("search_backend")
    return f"Ray Train, {device}" + (f"; search: {backend}" if backend else "")


def _boosts(records: list[dict], variant: str) -> str:
    """The recent-item boost each seed's run served (raycg.model.recent_boost), or off."""
    found = [r["eval"].get("recent_boost") or {} for r in records if r["variant"] == variant]
    if not found:
        return "not run"
    if not any(b.get("items") for b in found):
        return "off"
    return ", ".join(f"{b.get('boost', 0):.3g}" for b in found) + f" ({found[0].get('source', '')})"


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


def write_records(path: str, records: list[dict]) -> None:
    """A report's run records, one per line (diffs stay readable), without the local run directory."""
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps({k: v for k, v in r.items() if k != "run_dir"}, sort_keys=True)
                                    for r in records) + "\n]\n")


def write_report(grids: list[Grid], seeds: list[int], out_dir: str, overrides: list[str], publish: str,
                 command: str, log=log_info, train: bool = True, records_from: list[str] = (),
                 max_minutes: float | None = None) -> None:
    """Run every grid (`run_grid`) and write `out_dir`/README.md, results.json, plots/ and
    configs/; with `publish` (a path, or "") also the report at that path with its plots, configs
    and results.json beside it. `records_from`: earlier reports' results.json files whose runs are
    reused; `max_minutes`: start no run that would end past this budget. `command` is quoted in
    the header."""
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    earlier = load_records(list(records_from))
    deadline = t0 + max_minutes * 60 if max_minutes is not None else None
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    sections, all_records, skipped = [], [], []
    for grid in grids:
        extra = prepare_source(grid, out_dir, log)
        if extra is None:
            log(f"report: {grid.name}: source {grid.source_csv} not found; skipping this grid")
            skipped.append(f"{grid.name} (source {grid.source_csv} not found)")
            continue
        records = run_grid(grid, seeds, out_dir, extra + overrides, log, train=train, earlier=earlier,
                           deadline=deadline)
        if not any(r["variant"] == grid.reference for r in records):  # only with train=False
            log(f"report: {grid.name}: no finished run of the reference {grid.reference}; skipping this grid")
            skipped.append(f"{grid.name} (no finished run of the reference {grid.reference})")
            continue
        all_records += records
        sections.append((grid, records))
    wall = (time.perf_counter() - t0) / 60
    write_records(os.path.join(out_dir, "results.json"), all_records)
    header = "\n".join([
        "# raycg results: ablations and baselines",
        "",
        f"Generated by `{command}` (`make report`). {len(all_records)} runs, "
        f"{sum(r['seconds'] for r in all_records) / 60:.0f} min of training + evaluation in total "
        f"(sum of the runs' wall times); this invocation started {started} and took {wall:.0f} min "
        f"(runs finished earlier are reused).",
        "",
        f"**Machine** (of this invocation; each grid's **Runs** line names the CPU or GPU workers its runs "
        f"trained on, which may be another machine's: `reuse_only`): {machine()}.",
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
        body += scale_sections(sections, link_dir, plot_dir)
        return "\n".join(body)

    write_markdown(os.path.join(out_dir, "README.md"), render(".", os.path.join(out_dir, "plots")))
    log(f"report: written -> {os.path.join(out_dir, 'README.md')}")
    if publish:
        path = os.path.abspath(publish)
        side = os.path.splitext(path)[0]
        os.makedirs(side, exist_ok=True)
        for grid, _ in sections:
            dst = os.path.join(side, "configs", grid.name)
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(os.path.join(out_dir, "configs", grid.name), dst)
        # the published runs' records: the report can be rebuilt from the repository alone
        # (`records=[<side>/results.json] reuse_only=true`), without the run directories
        write_records(os.path.join(side, "results.json"), all_records)
        write_markdown(path, render(os.path.basename(side), os.path.join(side, "plots")))
        log(f"report: published -> {path} (+ {side}/plots, {side}/configs, {side}/results.json)")
