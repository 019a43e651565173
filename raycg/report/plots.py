"""PNG plots of a grid: recall@K curves and per-ablation bars (matplotlib, no display)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from raycg.report.summary import RECALL, TASK_SHORT, metric, rows_for, seed_interval  # noqa: E402


def recall_curves(records, variants, reference, ks, path: str, title: str) -> str:
    """recall@K vs K (log axis) per method, mean over seeds with the interval shaded."""
    tasks = ["conversion", "engagement", "conversion_advertiser"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.8))
    rows = rows_for(records, variants, reference)
    for ax, task in zip(axes, tasks):
        for i, (label, method, recs) in enumerate(rows):
            stats = np.array([seed_interval([metric(r, method, task, k) for r in recs], bounds=RECALL) for k in ks])
            style = "-" if method == "model" else "--"
            ax.plot(ks, stats[:, 0], style, marker="o", ms=3, label=label, color=plt.cm.tab20(i % 20))
            if i == 0 or method != "model":  # shade the reference and the baselines; ablations would clutter
                ax.fill_between(ks, stats[:, 1], stats[:, 2], alpha=0.12, color=plt.cm.tab20(i % 20))
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_ylabel(f"{TASK_SHORT[task]} recall@K")
        ax.set_title(task.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ablation_bars(records, variants, reference, columns, path: str, title: str) -> str:
    """One bar group per metric column, one bar per method; error bars = 95% interval over seeds."""
    rows = rows_for(records, variants, reference)
    fig, axes = plt.subplots(1, len(columns), figsize=(5.5 * len(columns), 5))
    for ax, (task, k) in zip(np.atleast_1d(axes), columns):
        stats = np.array([seed_interval([metric(r, method, task, k) for r in recs], bounds=RECALL)
                          for _, method, recs in rows])
        y = np.arange(len(rows))
        colors = ["tab:blue" if m == "model" else "tab:gray" for _, m, _ in rows]
        colors[0] = "tab:red"  # the reference design
        err = np.vstack([stats[:, 0] - stats[:, 1], stats[:, 2] - stats[:, 0]])
        ax.barh(y, stats[:, 0], xerr=err, color=colors, capsize=3)
        ax.set_yticks(y, [label.replace("two-tower: ", "").replace("baseline: ", "") for label, _, _ in rows],
                      fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"{TASK_SHORT[task]} recall@{k}")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_plots(records, grid, ks, columns, plot_dir: str) -> list[str]:
    os.makedirs(plot_dir, exist_ok=True)
    variants = list(grid.variants)
    return [
        recall_curves(records, variants, grid.reference, ks, os.path.join(plot_dir, f"{grid.name}_recall_at_k.png"),
                      f"{grid.title}: recall@K, mean over seeds (shaded: 95% interval of the reference and baselines)"),
        ablation_bars(records, variants, grid.reference, columns, os.path.join(plot_dir, f"{grid.name}_ablations.png"),
                      f"{grid.title}: red = reference design, blue = ablations, gray = baselines"),
    ]


def claims_vs_scale_plot(series: dict, claims: list[dict], path: str, title: str) -> str:
    """Each claim's relative change (mean over seeds, 95% interval as error bars) against the
    scale (log axis); the seed paper's number dashed where the claim gives one."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, c in enumerate(claims):
        pts = series[i]
        x = np.array([scale for scale, _ in pts], dtype=float)
        mean = np.array([d["rel_mean"] for _, d in pts]) * 100
        lo, hi = np.array([d["rel_lo"] for _, d in pts]) * 100, np.array([d["rel_hi"] for _, d in pts]) * 100
        err = np.vstack([np.nan_to_num(mean - lo), np.nan_to_num(hi - mean)])
        color = plt.cm.tab10(i % 10)
        label = f"{c['a']} vs {c['b']}, {TASK_SHORT[c['task']]} R@{c['k']}"
        ax.errorbar(x * (1 + 0.04 * i), mean, yerr=err, marker="o", capsize=3, color=color, label=label)
        if c.get("claimed") is not None:
            ax.axhline(100 * c["claimed"], ls="--", lw=1, color=color)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("scale")
    ax.set_ylabel("relative change, % (95% interval over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
