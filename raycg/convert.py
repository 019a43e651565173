"""Convert an event log into a raycg data directory (docs/adapters.md).

    raycg-convert mapping=MAPPING input=INPUT out_dir=OUT_DIR [cutoff_ts=N] [eval_fraction=F] [shards=N] ...
    (or python -m raycg.convert ...; every option: raycg/conf/convert.yaml)

MAPPING is a preset (tmall, rees46, taobao_user_behavior: raycg/conf/convert/<name>.yaml) or your own
mapping YAML (column names or positions, event-type map, timestamp unit or format, surfaces,
optional advertiser, click duration from the next event; see raycg/data/logmap.py). INPUT is
CSV (with or without a header row) or Parquet. Then train with the default configuration:

    raycg-train data=files data.dir=OUT_DIR
"""
from __future__ import annotations

import sys

from omegaconf import DictConfig

from raycg.config import hydra_app, require_complete
from raycg.data.adapters import CONTENT_DIM, ConversionError, write_data_dir
from raycg.data.logmap import convert_log, load_mapping
from raycg.logs import set_level


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def summary(meta: dict) -> str:
    m = meta["marginals"]
    types = ", ".join(f"{k} {v:,}" for k, v in meta["event_types"].items() if v)
    dropped = {k: v for k, v in meta["dropped"].items() if v}
    imputed = {k: v for k, v in meta.get("imputed", {}).items() if v}
    lines = [
        f"{meta['source']}: read {meta['rows_in']:,} rows from {meta['input']}",
        f"  kept {meta['rows_out']:,} events: {types}",
        "  dropped " + (f"{sum(dropped.values()):,}: " + ", ".join(f"{k} {v:,}" for k, v in dropped.items())
                        if dropped else "0 (checked: " + ", ".join(meta["dropped"]) + ")"),
    ]
    if imputed:
        lines.append("  kept with an unknown value: " + ", ".join(f"{k} {v:,}" for k, v in imputed.items()))
    for col, info in meta.get("users", {}).items():
        if info.get("users_with_several_values"):
            lines.append(f"  warning: '{col}' varies within {info['users_with_several_values']} of "
                         f"{meta['n_users']} users (users.parquet keeps each user's most frequent value)")
    conflicts = {k: v for k, v in meta.get("item_conflicts", {}).items() if v}
    if conflicts:
        lines.append("  items with several values (item table keeps the most frequent): "
                     + ", ".join(f"{k} {v}" for k, v in conflicts.items()))
    if "session_gap_cap_s" in meta:
        lines.append(f"  click durations: gap to the next event (same user/session), cap {meta['session_gap_cap_s']:g} s; "
                     f"{meta['clicks_zero_duration']:,} clicks at 0 (session end), "
                     f"{meta['clicks_at_cap']:,} at the cap")
    elif meta.get("has_click_duration"):
        lines.append("  click durations: from the source column")
    else:
        lines.append("  click durations: none in the source (all 0): every click weighs 1 "
                     "(loss.duration_weighting=auto)")
    lines.append(f"  advertisers: {meta.get('advertiser', 'n/a')} ({meta.get('n_advertisers', 0):,}); "
                 f"content_emb: {meta.get('content_emb', 'n/a')}")
    lines.append(f"  corpus: the {meta['n_items']:,} items of the log; evaluation leaves out positives on items "
                 "without a training event (eval.cold_items=auto)")
    if meta.get("attribution"):
        a = meta["attribution"]
        lines.append(f"  attribution: {a['attributed']:,} of {a['conversions']:,} conversions attributed to the "
                     f"user's last click of the item within {a['window_s'] / 86400:g} days (request_ts)")
    lines += [
        f"  split at {meta['cutoff_ts']} ({meta['cutoff_utc']}, {meta['cutoff_rule']}): "
        f"train {meta['n_train_events']:,}, eval {meta['n_eval_events']:,} "
        f"({meta['eval_fraction_actual']:.1%})",
        f"  marginals: conversion/click {_fmt(m['conversion_per_click'])}, "
        f"events/user {_fmt(m['events_per_user_mean'], '.2f')} (median {_fmt(m['events_per_user_median'], 'g')}), "
        f"top-1% item share {_fmt(m['top1pct_item_share'])}, "
        "median click duration " + (f"{m['median_click_duration_s']:g} s" if m["median_click_duration_s"]
                                    is not None else "n/a (no durations in the source)"),
        "  wrote:",
        f"    {meta['paths']['items']} ({meta['n_items']:,} items)",
    ]
    if "users" in meta["paths"]:
        lines.append(f"    {meta['paths']['users']} ({meta['n_users']:,} users)")
    for split in ("train", "eval"):
        p = meta["paths"][split]
        lines.append(f"    {len(p)} {split} shard(s): {p[0]}" + (f" .. {p[-1]}" if len(p) > 1 else ""))
    lines.append(f"    {meta['paths']['meta']}")
    return "\n".join(lines)


@hydra_app("convert")
def main(cfg: DictConfig, overrides: list[str]) -> int:
    """0 after writing the data directory and printing its summary; 2 (with the error on stderr)
    when the log or the mapping cannot be converted."""
    require_complete(cfg)  # mapping=, input=, out_dir=
    set_level(cfg.log_level)
    content_dim = CONTENT_DIM if cfg.content_dim is None else cfg.content_dim
    try:
        mapping = load_mapping(cfg.mapping)
        if cfg.session_gap_cap is not None:
            if (mapping.get("click_duration") or {}).get("from") != "next_event":
                raise ConversionError(f"session_gap_cap: mapping {mapping['name']!r} does not derive click "
                                      "durations from the next event")
            if not cfg.session_gap_cap > 0:
                raise ValueError(f"session_gap_cap must be > 0, got {cfg.session_gap_cap}")
            mapping["click_duration"] = dict(mapping["click_duration"], cap_s=cfg.session_gap_cap)
        result = convert_log(cfg.input, mapping, content_dim=content_dim)
        meta = write_data_dir(result, cfg.out_dir, cutoff_ts=cfg.cutoff_ts,
                              eval_fraction=cfg.eval_fraction, num_shards=cfg.shards,
                              seed=cfg.seed, overwrite=cfg.overwrite,
                              attribution_window_s=cfg.attribution_window_days * 86_400 or None)
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(meta))  # the command's output
    return 0


if __name__ == "__main__":
    main()
