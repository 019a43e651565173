"""Format adapters: event logs -> the raycg data-dir layout (docs/adapters.md).

Reading is `raycg.data.logmap.convert_log` with a mapping: any CSV (with or without a header
row) or Parquet log, described by a small YAML mapping; the public formats are presets of it
(`conf/convert/<name>.yaml`):

- `tmall`: Tmall IJCAI-15 "Repeat Buyers" user log: user, item, category, merchant (=
  advertiser), brand, month/day (or time_stamp = mmdd), action 0 click / 1 cart / 2 buy /
  3 favourite, optionally age_range/gender. `tmall_to_events(path)`.
- `rees46`: REES46 "eCommerce behavior data from multi category store": event_time,
  event_type (view/cart/remove_from_cart/purchase), product_id, category_id, category_code,
  brand (= advertiser, hashed), price, user_id, user_session (click duration = seconds to the
  session's next event). `rees46_to_events(path)`.
- `taobao_user_behavior`: Taobao UserBehavior.csv, no header row: user, item, category,
  pv/fav/cart/buy, unix seconds; no advertiser and no content vectors.

Each returns ``dict(events=pa.Table, items=pa.Table, users=pa.Table, meta=dict)``;
`write_data_dir` then attributes conversions to their click (last click), splits by time,
validates and writes

    OUT/items.parquet  OUT/users.parquet  OUT/events/{train,eval}/part-*.parquet  OUT/meta.json

Input rules (never a silent drop): see `raycg.data.logmap`. ``meta["rows_in"] ==
meta["rows_out"] + sum(meta["dropped"].values())`` always holds.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycg.data.datadir import time_split, write_shards
from raycg.data.hashing import hashed_id
from raycg.data.logmap import (  # noqa: F401  (re-exported: the adapters' public names)
    CONTENT_DIM,
    ConversionError,
    convert_log,
    load_mapping,
    session_durations,
    type_counts,
)
from raycg.data.schema import CONVERSION_EVENTS, ITEM_COLUMNS, check_parquet_files, check_values, event_columns

UNKNOWN_ADVERTISER = 0  # REES46 rows without a brand


def brand_advertiser_id(brand: str) -> int:
    """REES46 advertiser id of a brand: 1 + blake2b64("brand|" + brand.strip().lower()) mod
    (2^63 - 1). Stable across files and runs (converting 2019-Oct and 2019-Nov separately
    gives the same ids); 0 is reserved for "no brand" (`UNKNOWN_ADVERTISER`)."""
    return hashed_id("brand", brand.strip().lower())


def tmall_to_events(path: str, content_dim: int = CONTENT_DIM) -> dict:
    """Tmall IJCAI-15 user log (CSV) -> events, items, users, meta (the `tmall` preset).

    action 0 click -> click, 3 favourite -> save, 1 cart -> add_to_cart, 2 buy -> checkout.
    surface = home, no context/query, click_duration = 0 (the log has none), timestamp =
    00:00:00 UTC of 2015-month-day (day resolution). advertiser = merchant (seller) id.
    Items: category/merchant/brand = the item's most frequent value; content_emb = the unit
    sum of fixed random directions for its category and brand (a content proxy).
    Users: age_range and gender (if present) = the user's most frequent value, -1 if missing.
    """
    return convert_log(path, "tmall", content_dim)


def rees46_to_events(path: str, session_gap_cap_s: float = 300.0, content_dim: int = CONTENT_DIM) -> dict:
    """REES46 multi-category store events (CSV) -> events, items, users, meta (the `rees46`
    preset with click_duration.cap_s = `session_gap_cap_s`).

    view -> click, cart -> add_to_cart, purchase -> checkout; remove_from_cart rows are
    dropped (counted in meta["dropped"]). advertiser = `brand_advertiser_id(brand)`, 0 for a
    missing brand. click_duration of a view = `session_durations` (gap to the same user's next
    later event in the same user_session, capped; 0 for the session's last second).
    """
    if not session_gap_cap_s > 0:
        raise ValueError(f"session_gap_cap_s must be > 0, got {session_gap_cap_s}")
    mapping = load_mapping("rees46")
    mapping["click_duration"] = dict(mapping["click_duration"], cap_s=float(session_gap_cap_s))
    mapping["name"] = "rees46"
    return convert_log(path, mapping, content_dim)


# ----------------------------------------------------------------------------- writing


def quantile_cutoff(ts: np.ndarray, eval_fraction: float) -> int:
    """The timestamp t (one of the distinct ones, not the first) such that the share of events
    with timestamp >= t is closest to `eval_fraction`; train and eval are both non-empty."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    uniq, counts = np.unique(np.asarray(ts, dtype=np.int64), return_counts=True)
    if len(uniq) < 2:
        raise ConversionError(
            f"all {len(ts)} events share one timestamp ({uniq[0] if len(uniq) else 'none'}); "
            "a time split needs at least two")
    at_or_after = np.cumsum(counts[::-1])[::-1] / counts.sum()  # share with ts >= uniq[k]
    k = 1 + int(np.argmin(np.abs(at_or_after[1:] - eval_fraction)))
    return int(uniq[k])


def marginals(events: pa.Table, has_click_duration: bool = True) -> dict:
    """Aggregate statistics to compare against the simulator and other logs."""
    et = np.asarray(events.column("event_type").to_pylist(), dtype=object)
    users = events.column("user_id").to_numpy()
    items = events.column("item_id").to_numpy()
    n = len(et)
    clicks = int((et == "click").sum())
    conversions = int(np.isin(et, list(CONVERSION_EVENTS)).sum())
    _, per_user = np.unique(users, return_counts=True)
    _, per_item = np.unique(items, return_counts=True)
    top_k = max(1, math.ceil(0.01 * len(per_item))) if len(per_item) else 0
    top_share = float(np.sort(per_item)[::-1][:top_k].sum() / n) if n else float("nan")
    out = {
        "n_events": n, "n_users": int(len(per_user)), "n_items": int(len(per_item)),
        "counts": type_counts(et),
        "conversion_per_click": conversions / clicks if clicks else None,
        "checkout_per_click": int((et == "checkout").sum()) / clicks if clicks else None,
        "events_per_user_mean": float(per_user.mean()) if n else None,
        "events_per_user_median": float(np.median(per_user)) if n else None,
        "top1pct_items": top_k,
        "top1pct_item_share": top_share,
        "median_click_duration_s": None,
        "median_click_duration_nonzero_s": None,
    }
    if has_click_duration and clicks:
        d = events.column("click_duration").to_numpy()[et == "click"].astype(np.float64)
        out["median_click_duration_s"] = float(np.median(d))
        if (d > 0).any():
            out["median_click_duration_nonzero_s"] = float(np.median(d[d > 0]))
        out["click_zero_duration_share"] = float((d == 0).mean())
    return out


def _iso(ts: int) -> str:
    return _dt.datetime.fromtimestamp(int(ts), tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def attribute_last_click(events: pa.Table, window_s: float) -> tuple[pa.Table, dict]:
    """Last-click attribution for logs without request ids: each conversion (add_to_cart,
    checkout) is attributed to the same user's latest click or save of the same item at or
    before it, at most `window_s` seconds earlier. Adds `request_ts` (that click's timestamp;
    -1 where none qualifies or for other events) and gives attributed conversions the click's
    surface and context. Returns (events, counts).

    Example: clicks of (u1, i7) at t=100 and t=300, a checkout at t=400 -> request_ts 300; a
    checkout of (u1, i8) with no click -> -1 (its own request).
    """
    etype = np.asarray(events.column("event_type").to_pylist(), dtype=object)
    user = events.column("user_id").to_numpy().astype(np.int64)
    item = events.column("item_id").to_numpy().astype(np.int64)
    ts = events.column("timestamp").to_numpy().astype(np.int64)
    is_conv = np.isin(etype, list(CONVERSION_EVENTS))
    is_click = np.isin(etype, ["click", "save"])
    request_ts = np.full(len(ts), -1, dtype=np.int64)
    source = np.full(len(ts), -1, dtype=np.int64)  # row of the attributed click
    if is_conv.any() and is_click.any():
        pairs = np.stack([user, item], axis=1)
        _, pair = np.unique(pairs, axis=0, return_inverse=True)
        pair = pair.reshape(-1).astype(np.int64)
        span = int(ts.max() - ts.min()) + 1
        key = pair * span + (ts - ts.min())  # (pair, time) in one sortable number
        clicks = np.flatnonzero(is_click)
        clicks = clicks[np.argsort(key[clicks], kind="stable")]
        conv = np.flatnonzero(is_conv)
        at = np.searchsorted(key[clicks], key[conv], side="right") - 1  # latest click at or before
        ok = at >= 0
        hit = clicks[np.where(ok, at, 0)]
        ok &= (pair[hit] == pair[conv]) & (ts[conv] - ts[hit] <= window_s)
        request_ts[conv[ok]] = ts[hit[ok]]
        source[conv[ok]] = hit[ok]
    out = events.append_column("request_ts", pa.array(request_ts, pa.int64()))
    attributed = source >= 0
    if attributed.any():  # the conversion takes its request's context
        for name in ("surface", "context_item_id", "query_id"):
            col = out.column(name).to_numpy(zero_copy_only=False).copy()
            col[attributed] = col[source[attributed]]
            out = out.set_column(out.schema.get_field_index(name), name,
                                 pa.array(col, out.schema.field(name).type))
    counts = {"conversions": int(is_conv.sum()), "attributed": int(attributed.sum()), "window_s": window_s}
    return out, counts


def write_data_dir(result: dict, out_dir: str, cutoff_ts: int | None = None,
                   eval_fraction: float = 0.2, num_shards: int = 2, seed: int = 0,
                   overwrite: bool = False, attribution_window_s: float | None = 7 * 86_400) -> dict:
    """Validate, split by time and write the data-dir layout; returns meta (also meta.json).

    attribution_window_s (None: off): last-click attribution of conversions
    (`attribute_last_click`) before the split; the counts go to meta["attribution"].

    cutoff_ts None: `quantile_cutoff(timestamps, eval_fraction)`. Train = events before the
    cutoff, eval = at/after it. Refuses to write over existing shards unless `overwrite`
    (then only `part-*.parquet` files in events/train and events/eval are removed).
    """
    from raycg.data.batches import ItemTable  # the pipeline's own item-table checks

    events, items, users = result["events"], result["items"], result.get("users")
    source = result["meta"].get("source", "converted")
    attribution = None
    if attribution_window_s is not None and "request_ts" not in events.column_names:
        events, attribution = attribute_last_click(events, attribution_window_s)
    check_values(events, f"{source} events (before writing)", event_columns(events.column_names))
    table = ItemTable.from_arrow(items, source=f"{source} items (before writing)")
    table.rows(events.column("item_id").to_numpy(), f"{source} events (before writing)")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")

    ts = events.column("timestamp").to_numpy()
    cutoff_rule = "given" if cutoff_ts is not None else f"quantile: ~{eval_fraction:g} of events at/after"
    if cutoff_ts is None:
        cutoff_ts = quantile_cutoff(ts, eval_fraction)
    train, evaluation = time_split(events, int(cutoff_ts))
    for name, part in (("train", train), ("eval", evaluation)):
        if part.num_rows == 0:
            raise ConversionError(
                f"cutoff {cutoff_ts} ({_iso(cutoff_ts)}) leaves no {name} events; timestamps span "
                f"{int(ts.min())} ({_iso(ts.min())}) .. {int(ts.max())} ({_iso(ts.max())})")

    train_dir = os.path.join(out_dir, "events", "train")
    eval_dir = os.path.join(out_dir, "events", "eval")
    for d in (train_dir, eval_dir):
        old = sorted(f for f in os.listdir(d) if f.endswith(".parquet")) if os.path.isdir(d) else []
        if old and not overwrite:
            raise ConversionError(f"{d} already holds {len(old)} Parquet file(s), e.g. {old[0]}; "
                                  "use another output directory or overwrite=True (--overwrite)")
        for f in old:
            if f.startswith("part-"):
                os.remove(os.path.join(d, f))
    os.makedirs(out_dir, exist_ok=True)
    train_paths = write_shards(train, train_dir, min(num_shards, train.num_rows), seed)
    eval_paths = write_shards(evaluation, eval_dir, min(num_shards, evaluation.num_rows), seed + 1)
    check_parquet_files(train_paths)
    check_parquet_files(eval_paths)
    items_path = os.path.join(out_dir, "items.parquet")
    pq.write_table(items, items_path)
    check_parquet_files([items_path], ITEM_COLUMNS)
    paths = {"items": items_path, "train": train_paths, "eval": eval_paths}
    if users is not None:
        paths["users"] = os.path.join(out_dir, "users.parquet")
        pq.write_table(users, paths["users"])

    has_dur = bool(result["meta"].get("has_click_duration", True))
    meta = dict(result["meta"])
    meta.update({
        "cutoff_ts": int(cutoff_ts), "cutoff_utc": _iso(cutoff_ts),
        "cutoff_rule": cutoff_rule,
        "eval_fraction_requested": eval_fraction,
        "n_train_events": train.num_rows, "n_eval_events": evaluation.num_rows,
        "eval_fraction_actual": evaluation.num_rows / events.num_rows,
        "train_event_types": type_counts(np.asarray(train.column("event_type").to_pylist(), dtype=object)),
        "eval_event_types": type_counts(np.asarray(evaluation.column("event_type").to_pylist(), dtype=object)),
        "time_span_utc": [_iso(ts.min()), _iso(ts.max())],
        "marginals": marginals(events, has_dur),
        "attribution": attribution,
        # the item table holds the items that appear in the log (not a catalogue): evaluation
        # leaves out positives on items without a training event (eval.cold_items=auto)
        "corpus": "log",
        "paths": paths,
    })
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    meta["paths"]["meta"] = os.path.join(out_dir, "meta.json")
    return meta
