"""Per-run eval.json records -> means and intervals over seeds, paired ablation deltas, Markdown.

Interval over seeds: Student-t 95% interval of the mean of n seeds,
    mean +- t_{0.975, n-1} * sd / sqrt(n)        (n = 3: t = 4.303)
Paired delta of variant a vs b: the same interval over the per-seed relative differences
(a_s - b_s) / b_s, so seed-to-seed noise shared by both runs cancels.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

TASK_SHORT = {"conversion": "conv", "engagement": "eng", "conversion_advertiser": "adv",
              "conversion_novel": "conv novel", "conversion_repeat": "conv repeat",
              "engagement_novel": "eng novel", "engagement_repeat": "eng repeat"}
BASELINE_LABEL = {
    "popularity": "popularity (global)",
    "popularity_surface": "popularity (per surface)",
    "recent_engaged": "re-engagement (the user's recent items, then popularity)",
    "als_engagement": "implicit ALS on engagement",
    "als_conversion": "implicit ALS on conversions",
}


def seed_interval(values, level: float = 0.95, bounds: tuple[float, float] | None = None
                  ) -> tuple[float, float, float]:
    """(mean, lo, hi) over seeds; lo = hi = mean for a single seed. NaNs are ignored.
    `bounds` clips the interval to the metric's range (recall: [0, 1])."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if len(v) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return mean, lo, hi


RECALL = (0.0, 1.0)


def metric(record: dict, method: str, task: str, k: int) -> float | None:
    block = record["eval"].get(method, {}).get(task, {})
    value = block.get(str(k), block.get(k))
    return None if value is None else float(value)


def rows_for(records: list[dict], variants: list[str], reference: str) -> list[tuple[str, str, list[dict]]]:
    """[(label, method, records)]: one row per variant (model), then the baselines (scored in
    the reference variant's runs, one per seed)."""
    rows = []
    for v in variants:
        label = f"two-tower: {v}" + (" (reference)" if v == reference else "")
        rows.append((label, "model", [r for r in records if r["variant"] == v]))
    ref = [r for r in records if r["variant"] == reference]
    methods = ref[0]["eval"].get("methods", ["model", "popularity"]) if ref else []
    for m in methods:
        if m != "model":
            rows.append((f"baseline: {BASELINE_LABEL.get(m, m)}", m, ref))
    return rows


def _fmt(mean: float, lo: float, hi: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.4f} [{lo:.4f}, {hi:.4f}]" if hi - lo > 5e-5 else f"{mean:.4f}"


def recall_table(records, variants, reference, columns: list[tuple[str, int]]) -> str:
    head = "| method | " + " | ".join(f"{TASK_SHORT[t]} R@{k}" for t, k in columns) + " |"
    lines = [head, "|" + " --- |" * (len(columns) + 1)]
    for label, method, recs in rows_for(records, variants, reference):
        cells = [_fmt(*seed_interval([metric(r, method, t, k) for r in recs], bounds=RECALL)) for t, k in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_delta(records, a: str, b: str, task: str, k: int, method: str = "model") -> dict:
    """Per-seed relative difference of variant a over variant b; seeds present in both."""
    by_seed = {}
    for r in records:
        if r["variant"] in (a, b):
            by_seed.setdefault(r["seed"], {})[r["variant"]] = metric(r, method, task, k)
    rel, absd = [], []
    for seed, pair in sorted(by_seed.items()):
        if pair.get(a) is not None and pair.get(b):
            rel.append(pair[a] / pair[b] - 1.0)
            absd.append(pair[a] - pair[b])
    mean, lo, hi = seed_interval(rel, bounds=(-1.0, float("inf")))  # a ratio cannot fall below -100%
    return {"a": a, "b": b, "task": task, "k": k, "n_seeds": len(rel), "rel_mean": mean, "rel_lo": lo,
            "rel_hi": hi, "abs_mean": seed_interval(absd)[0], "per_seed": rel}


def verdict(d: dict) -> str:
    if d["n_seeds"] == 0:
        return "not run"
    if d["n_seeds"] < 2:
        return "one seed only: no interval"
    if d["rel_lo"] > 0:
        return f"{d['a']} better (interval above 0)"
    if d["rel_hi"] < 0:
        return f"{d['b']} better (interval below 0)"
    return "no significant difference (interval spans 0)"


def _pct(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{100 * x:+.1f}%"


def delta_cell(d: dict, seeds: bool = False) -> str:
    """A paired delta as "+1.2% [-0.3%, +2.7%]"; one seed has no interval, no seed is "not run".
    `seeds`: also say over how many seeds."""
    if d["n_seeds"] == 0:
        return "not run"
    if d["n_seeds"] == 1:
        return f"{_pct(d['rel_mean'])} (1 seed)"
    cell = f"{_pct(d['rel_mean'])} [{_pct(d['rel_lo'])}, {_pct(d['rel_hi'])}]"
    return f"{cell} ({d['n_seeds']} seeds)" if seeds else cell


def delta_table(records, variants, reference, columns) -> str:
    head = "| variant vs reference | " + " | ".join(f"{TASK_SHORT[t]} R@{k}" for t, k in columns) + " |"
    lines = [head, "|" + " --- |" * (len(columns) + 1)]
    for v in variants:
        if v == reference:
            continue
        cells = [delta_cell(paired_delta(records, v, reference, t, k)) for t, k in columns]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims_table(records, claims: list[dict]) -> str:
    lines = ["| seed's claim | our comparison | ours: relative change [95% interval over seeds] | verdict |",
             "| --- | --- | --- | --- |"]
    for c in claims:
        d = paired_delta(records, c["a"], c["b"], c["task"], int(c["k"]))
        lines.append(f"| {c['seed']} | {c['a']} vs {c['b']}, {TASK_SHORT[c['task']]} R@{c['k']} | "
                     f"{delta_cell(d)} | {verdict(d)} |")
    return "\n".join(lines)


def surface_table(records, reference: str, task: str, k: int) -> str:
    """Per-surface recall@k of the reference model and the baselines (mean over seeds)."""
    ref = [r for r in records if r["variant"] == reference]
    if not ref:
        return ""
    methods = ref[0]["eval"].get("methods", ["model"])
    surfaces = sorted(ref[0]["eval"]["detail"]["model"].get(task, {}).get(str(k), {}).get("by_group", {}))
    lines = ["| method | " + " | ".join(surfaces) + " |", "|" + " --- |" * (len(surfaces) + 1)]
    for m in methods:
        vals = []
        for s in surfaces:
            xs = [r["eval"]["detail"][m].get(task, {}).get(str(k), {}).get("by_group", {}).get(s) for r in ref]
            vals.append(f"{seed_interval(xs)[0]:.4f}")
        label = f"two-tower: {reference}" if m == "model" else BASELINE_LABEL.get(m, m)
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def claims_vs_scale(points: list[tuple[int, list[dict]]], claims: list[dict]) -> tuple[str, dict]:
    """The paired claim deltas of one grid family at each scale: `points` = [(scale, records)].
    Returns (a Markdown table: one row per claim, one column per scale, with the seeds' interval
    and the seed paper's number), {claim index: [(scale, paired_delta)]} for the plot)."""
    points = sorted(points, key=lambda p: p[0])
    series = {i: [(scale, paired_delta(recs, c["a"], c["b"], c["task"], int(c["k"]))) for scale, recs in points]
              for i, c in enumerate(claims)}
    head = ("| seed's claim | comparison | " + " | ".join(f"scale {scale:,}" for scale, _ in points) + " |")
    lines = [head, "|" + " --- |" * (len(points) + 2)]
    for i, c in enumerate(claims):
        cells = [delta_cell(d, seeds=True) for _, d in series[i]]
        lines.append(f"| {c['seed']} | {c['a']} vs {c['b']}, {TASK_SHORT[c['task']]} R@{c['k']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines), series
