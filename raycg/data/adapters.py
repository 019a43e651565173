"""Format adapters: public shopping logs -> the raycg data-dir layout (docs/adapters.md).

Two sources are supported:

- Tmall IJCAI-15 "Repeat Buyers" user log (`tmall_to_events`): user, item, category,
  merchant (= advertiser), brand, month/day, action 0 click / 1 cart / 2 buy / 3 favourite,
  optionally age_range/gender. The original column names (`seller_id`, `action_type`,
  `time_stamp` = mmdd) are accepted as well. A `province` column (not in the original data)
  is never read.
- REES46 "eCommerce behavior data from multi category store" (`rees46_to_events`):
  event_time, event_type (view/cart/remove_from_cart/purchase), product_id, category_id,
  category_code, brand, price, user_id, user_session.

Both return ``dict(events=pa.Table, items=pa.Table, users=pa.Table, meta=dict)``;
`write_data_dir` then splits by time, validates and writes

    OUT/items.parquet  OUT/users.parquet  OUT/events/{train,eval}/part-*.parquet  OUT/meta.json

Input rules (never a silent drop):
- a missing required column, an unparseable value (non-integer or negative id, unknown
  event type / action code, bad date) raises `ConversionError` naming the file, the column,
  how many rows are bad and an example with its line number;
- a *missing* (empty/NaN) value in a column that identifies the event (user, item, time,
  event type; Tmall also category and merchant) drops the row, counted in
  ``meta["dropped"]["missing_<column>"]``; documented non-events (REES46 remove_from_cart)
  are dropped and counted under their own reason. ``meta["rows_in"] ==
  meta["rows_out"] + sum(meta["dropped"].values())`` always holds;
- a missing item attribute (brand, category_code, price, user_session) keeps the row with an
  "unknown" value, counted in ``meta["imputed"]``.

The returned events keep the input row order (minus dropped rows); `write_data_dir` shuffles
them into shards.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import math
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raycg.data.schema import (
    CONVERSION_EVENTS,
    EVENT_SCHEMA,
    EVENT_TYPES,
    ITEM_COLUMNS,
    EventSchemaError,
    check_parquet_files,
    check_values,
    event_columns,
)
from raycg.data.simulate import time_split, write_shards

CONTENT_DIM = 16

TMALL_YEAR = 2015  # IJCAI-15 logs cover 2015-05-11 .. 2015-11-11 (month/day only in the file)
TMALL_ACTIONS = {0: "click", 1: "add_to_cart", 2: "checkout", 3: "save"}
TMALL_ACTION_NAMES = {0: "click", 1: "add-to-cart", 2: "buy", 3: "favourite"}

REES46_EVENTS = {"view": "click", "cart": "add_to_cart", "purchase": "checkout",
                 "remove_from_cart": None}  # None: dropped, counted in meta["dropped"]
REES46_COLUMNS = ("event_time", "event_type", "product_id", "category_id", "category_code",
                  "brand", "price", "user_id", "user_session")

UNKNOWN_ADVERTISER = 0  # REES46 rows without a brand
_INT63 = (1 << 63) - 1


class ConversionError(EventSchemaError):
    """Malformed source log: names the file, the column, how many rows and an example."""


# ----------------------------------------------------------------------------- hashing


def stable_hash(text: str) -> int:
    """A process- and platform-independent 64-bit hash (blake2b), as a Python int."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def brand_advertiser_id(brand: str) -> int:
    """REES46 advertiser id of a brand: 1 + blake2b64(brand.strip().lower()) mod (2^63 - 1).

    Stable across files and runs (converting 2019-Oct and 2019-Nov separately gives the same
    ids); 0 is reserved for "no brand" (`UNKNOWN_ADVERTISER`).
    """
    return 1 + stable_hash("brand|" + brand.strip().lower()) % _INT63


def _proxy_vectors(field: str, values, dim: int) -> dict:
    """One fixed random Gaussian direction per distinct value (= a random projection of the
    one-hot encoding), seeded by a stable hash of (field, value)."""
    out = {}
    for v in values:
        rng = np.random.default_rng(stable_hash(f"{field}|{v}"))
        out[v] = rng.standard_normal(dim) / math.sqrt(dim)
    return out


def _add_field(emb: np.ndarray, field: str, values: np.ndarray, present: np.ndarray,
               weight: float = 1.0) -> None:
    """emb[i] += weight * direction(field, values[i]) for rows where present[i]."""
    idx = np.flatnonzero(present)
    if not len(idx):
        return
    uniq, inv = np.unique(values[idx], return_inverse=True)
    vecs = _proxy_vectors(field, uniq.tolist(), emb.shape[1])
    table = np.stack([vecs[u] for u in uniq.tolist()])
    emb[idx] += weight * table[inv.reshape(-1)]


def _unit(emb: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    return (emb / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def _emb_column(emb: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float32).ravel()), emb.shape[1])


# ----------------------------------------------------------------------------- reading


def _header(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        row = next(csv.reader(f), None)
    if not row:
        raise ConversionError(f"{path}: empty file (no header row)")
    return [c.strip() for c in row]


def _resolve(path: str, header: list[str], name: str, aliases: tuple[str, ...] = ()) -> str:
    for candidate in (name, *aliases):
        if candidate in header:
            return candidate
    alt = f" (or {', '.join(repr(a) for a in aliases)})" if aliases else ""
    raise ConversionError(f"{path}: missing required column '{name}'{alt}; file has columns {header}")


def _read_strings(path: str, columns: list[str]) -> pa.Table:
    """The named columns as strings (nulls for empty/NaN/NULL cells); nothing else is read."""
    try:
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                include_columns=columns, column_types={c: pa.string() for c in columns},
                strings_can_be_null=True),
        )
    except (pa.ArrowInvalid, OSError) as e:
        raise ConversionError(f"{path}: cannot parse CSV: {e}") from e
    return table.combine_chunks()


def _example(values: pa.Array, mask: np.ndarray) -> str:
    i = int(np.flatnonzero(mask)[0])
    return f"{values[i].as_py()!r} at line {i + 2}"


def _missing(arr: pa.Array) -> np.ndarray:
    trimmed = pc.utf8_trim_whitespace(arr)
    return np.asarray(pc.fill_null(pc.equal(trimmed, ""), True))


def _parse_ids(path: str, name: str, arr: pa.Array, what: str = "non-negative integer ids"):
    """Strings -> (int64 values with 0 where missing, missing mask). Exact for 64-bit ids
    (no float round trip); "123.0" is accepted, "-1", "1.5", "abc" are errors."""
    missing = _missing(arr)
    trimmed = pc.utf8_trim_whitespace(pc.fill_null(arr, ""))
    ok = np.asarray(pc.match_substring_regex(trimmed, r"^\+?[0-9]+(\.0*)?$"))
    bad = ~missing & ~ok
    if bad.any():
        raise ConversionError(
            f"{path}: column '{name}' has {int(bad.sum())} of {len(arr)} rows that are not {what}, "
            f"e.g. {_example(arr, bad)}")
    digits = pc.replace_substring_regex(pc.replace_substring_regex(trimmed, r"\.0*$", ""), r"^\+", "")
    digits = pc.if_else(pa.array(missing), "0", digits)
    try:
        values = pc.cast(digits, pa.int64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid as e:
        raise ConversionError(f"{path}: column '{name}' has ids that do not fit int64: {e}") from e
    return values.astype(np.int64), missing


def _parse_floats(path: str, name: str, arr: pa.Array):
    missing = _missing(arr)
    values = pd.to_numeric(pd.Series(arr.to_pandas()).str.strip(), errors="coerce").to_numpy(np.float64)
    bad = ~missing & ~np.isfinite(values)
    if bad.any():
        raise ConversionError(
            f"{path}: column '{name}' has {int(bad.sum())} of {len(arr)} rows that are not numbers, "
            f"e.g. {_example(arr, bad)}")
    return np.where(missing, np.nan, values), missing


def _strings(arr: pa.Array) -> np.ndarray:
    """Object array of stripped strings, None where missing."""
    missing = _missing(arr)
    values = np.asarray(pc.utf8_trim_whitespace(pc.fill_null(arr, "")).to_pylist(), dtype=object)
    values[missing] = None
    return values


class _Drops:
    """Row drops with one reason per row (the first that applies), in column order.
    `reasons` are listed in meta with 0 when they never occur."""

    def __init__(self, n: int, reasons: tuple[str, ...] = ()):
        self.keep = np.ones(n, dtype=bool)
        self.counts: dict[str, int] = {r: 0 for r in reasons}

    def drop(self, reason: str, mask: np.ndarray) -> None:
        new = mask & self.keep
        if new.any():
            self.counts[reason] = self.counts.get(reason, 0) + int(new.sum())
            self.keep &= ~mask


def _item_mode(item_ids: np.ndarray, values: np.ndarray, present: np.ndarray | None = None):
    """Per item: most frequent value among present rows (ties -> smallest), and the number of
    items with more than one distinct value. Items without any present value get None."""
    if present is None:
        present = np.ones(len(item_ids), dtype=bool)
    df = pd.DataFrame({"item": item_ids[present], "v": values[present]})
    counts = df.groupby(["item", "v"], sort=False).size().rename("n").reset_index()
    conflicts = int((counts.groupby("item").size() > 1).sum())
    counts = counts.sort_values(["item", "n", "v"], ascending=[True, False, True], kind="stable")
    best = counts.drop_duplicates("item")
    return dict(zip(best["item"].tolist(), best["v"].tolist())), conflicts


def _events_table(user, item, adv, event_type, duration, ts) -> pa.Table:
    n = len(user)
    cols = {
        "user_id": pa.array(user, pa.int64()),
        "item_id": pa.array(item, pa.int64()),
        "advertiser_id": pa.array(adv, pa.int64()),
        "surface": pa.array(np.full(n, "home", dtype=object), pa.string()),
        "event_type": pa.array(event_type, pa.string()),
        "click_duration": pa.array(np.asarray(duration, np.float32), pa.float32()),
        "timestamp": pa.array(ts, pa.int64()),
        "context_item_id": pa.array(np.full(n, -1, np.int64)),
        "query_id": pa.array(np.full(n, -1, np.int64)),
    }
    return pa.table(cols, schema=EVENT_SCHEMA)


def _type_counts(event_type: np.ndarray) -> dict[str, int]:
    return {t: int((event_type == t).sum()) for t in EVENT_TYPES}


# ----------------------------------------------------------------------------- Tmall


def tmall_to_events(path: str, content_dim: int = CONTENT_DIM) -> dict:
    """Tmall IJCAI-15 user log (CSV) -> events, items, users, meta.

    action 0 click -> click, 3 favourite -> save, 1 cart -> add_to_cart, 2 buy -> checkout.
    surface = home, no context/query, click_duration = 0 (the log has none), timestamp =
    00:00:00 UTC of 2015-month-day (day resolution). advertiser = merchant (seller) id.
    Items: category/merchant/brand = the item's most frequent value; content_emb = the unit
    sum of fixed random directions for its category and brand (a content proxy).
    Users: age_range and gender (if present) = the user's most frequent value, -1 if missing.
    """
    header = _header(path)
    cols = {
        "user_id": _resolve(path, header, "user_id"),
        "item_id": _resolve(path, header, "item_id"),
        "cat_id": _resolve(path, header, "cat_id", ("category_id",)),
        "merchant_id": _resolve(path, header, "merchant_id", ("seller_id",)),
        "brand_id": _resolve(path, header, "brand_id"),
        "action": _resolve(path, header, "action", ("action_type",)),
    }
    if "month" in header or "day" in header:
        cols["month"] = _resolve(path, header, "month")
        cols["day"] = _resolve(path, header, "day")
    elif "time_stamp" in header:
        cols["time_stamp"] = "time_stamp"
    else:
        raise ConversionError(
            f"{path}: missing required column 'month' and 'day' (or 'time_stamp' as mmdd); "
            f"file has columns {header}")
    user_cols = [c for c in ("age_range", "gender") if c in header]
    raw = _read_strings(path, list(cols.values()) + user_cols)
    n_in = raw.num_rows
    col = lambda k: raw.column(cols[k]).combine_chunks()  # noqa: E731

    date_reasons = ("missing_time_stamp",) if "time_stamp" in cols else ("missing_month", "missing_day")
    drops = _Drops(n_in, tuple(f"missing_{cols[k]}" for k in
                               ("user_id", "item_id", "cat_id", "merchant_id", "action")) + date_reasons)
    ids = {}
    for key in ("user_id", "item_id", "cat_id", "merchant_id"):
        ids[key], miss = _parse_ids(path, cols[key], col(key))
        drops.drop(f"missing_{cols[key]}", miss)
    action, miss = _parse_ids(path, cols["action"], col("action"), what="action codes 0-3")
    drops.drop(f"missing_{cols['action']}", miss)
    bad = ~miss & ~np.isin(action, list(TMALL_ACTIONS))
    if bad.any():
        known = ", ".join(f"{k} {v}" for k, v in TMALL_ACTION_NAMES.items())
        raise ConversionError(
            f"{path}: column '{cols['action']}' has {int(bad.sum())} of {n_in} rows with an unknown "
            f"action code, e.g. {_example(col('action'), bad)}; known codes: {known}")
    if "time_stamp" in cols:
        mmdd, miss = _parse_ids(path, "time_stamp", col("time_stamp"), what="mmdd dates")
        drops.drop("missing_time_stamp", miss)
        month, day, date_cols = mmdd // 100, mmdd % 100, ("time_stamp",)
    else:
        month, miss_m = _parse_ids(path, cols["month"], col("month"), what="month numbers")
        day, miss_d = _parse_ids(path, cols["day"], col("day"), what="day numbers")
        drops.drop("missing_month", miss_m)
        drops.drop("missing_day", miss_d)
        date_cols = ("month", "day")
    keep = drops.keep
    dates = pd.to_datetime(
        pd.DataFrame({"year": np.full(n_in, TMALL_YEAR), "month": np.where(keep, month, 1),
                      "day": np.where(keep, day, 1)}), errors="coerce", utc=True)
    bad = keep & np.asarray(dates.isna())
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ConversionError(
            f"{path}: column(s) {', '.join(repr(c) for c in date_cols)} have {int(bad.sum())} of "
            f"{n_in} rows that are not a valid {TMALL_YEAR} date, e.g. month {month[i]} day {day[i]} "
            f"at line {i + 2}")
    epoch = pd.Timestamp(0, tz="UTC")
    secs = (dates.fillna(epoch) - epoch) // pd.Timedelta(seconds=1)  # unit-independent
    ts_all = np.where(keep, np.asarray(secs, dtype=np.int64), 0)
    brand_all, brand_miss_all = _parse_ids(path, cols["brand_id"], col("brand_id"))

    user, item = ids["user_id"][keep], ids["item_id"][keep]
    cat, merchant = ids["cat_id"][keep], ids["merchant_id"][keep]
    brand, brand_miss = brand_all[keep], brand_miss_all[keep]
    etype = np.asarray([TMALL_ACTIONS[a] for a in range(4)], dtype=object)[action[keep]]
    ts = ts_all[keep]

    # item table: one category / merchant / brand per item (the most frequent)
    cat_of, cat_conf = _item_mode(item, cat)
    adv_of, adv_conf = _item_mode(item, merchant)
    brand_of, brand_conf = _item_mode(item, brand, ~brand_miss)
    item_ids = np.asarray(sorted(cat_of), dtype=np.int64)
    item_cat = np.asarray([cat_of[i] for i in item_ids.tolist()], dtype=np.int64)
    item_adv = np.asarray([adv_of[i] for i in item_ids.tolist()], dtype=np.int64)
    item_brand = np.asarray([brand_of.get(i, -1) for i in item_ids.tolist()], dtype=np.int64)
    emb = np.zeros((len(item_ids), content_dim))
    _add_field(emb, "tmall_category", item_cat, np.ones(len(item_ids), bool))
    _add_field(emb, "tmall_brand", item_brand, item_brand >= 0)
    items = pa.table({
        "item_id": pa.array(item_ids), "advertiser_id": pa.array(item_adv),
        "category_id": pa.array(item_cat), "brand_id": pa.array(item_brand),
        "content_emb": _emb_column(_unit(emb)),
    })
    # events carry the item's advertiser, so events and item table agree
    adv = item_adv[np.searchsorted(item_ids, item)]
    events = _events_table(user, item, adv, etype, np.zeros(len(user), np.float32), ts)

    users_cols = {"user_id": np.unique(user)}
    user_meta = {}
    for c in user_cols:
        vals, miss = _parse_ids(path, c, raw.column(c).combine_chunks())
        mode, conflicts = _item_mode(user, vals[keep], ~miss[keep])
        users_cols[c] = np.asarray([mode.get(u, -1) for u in users_cols["user_id"].tolist()], np.int64)
        user_meta[c] = {"missing_rows": int(miss[keep].sum()), "users_with_several_values": conflicts}
    users = pa.table({k: pa.array(v, pa.int64()) for k, v in users_cols.items()})

    meta = {
        "source": "tmall", "input": os.path.abspath(path), "rows_in": n_in,
        "rows_out": events.num_rows, "dropped": drops.counts,
        "imputed": {f"{cols['brand_id']}_missing": int(brand_miss.sum())},
        "event_types": _type_counts(etype),
        "mapping": {f"{k} ({TMALL_ACTION_NAMES[k]})": v for k, v in TMALL_ACTIONS.items()},
        "has_click_duration": False,
        "timestamp_resolution_s": 86400,
        "item_conflicts": {"category": cat_conf, "advertiser": adv_conf, "brand": brand_conf},
        "users": user_meta,
        "n_users": int(len(users_cols["user_id"])), "n_items": int(len(item_ids)),
        "content_emb": f"proxy: unit sum of hashed random directions of category and brand (dim {content_dim})",
        "ignored_columns": [c for c in header if c not in set(cols.values()) | set(user_cols)],
    }
    return {"events": events, "items": items, "users": users, "meta": meta}


# ----------------------------------------------------------------------------- REES46


def session_durations(user: np.ndarray, session: np.ndarray, ts: np.ndarray,
                      cap_s: float) -> np.ndarray:
    """Per row: seconds to the same (user, session)'s next event with a later timestamp,
    capped at `cap_s`; 0 for the session's last second. `session` is an int code per row,
    -1 = unknown session (duration 0).

    Events sharing a second count as simultaneous (the log has 1-s resolution, and their
    order inside the second is not meaningful), so each gets the gap to the next later
    second; the result does not depend on row order.
    """
    n = len(ts)
    out = np.zeros(n, dtype=np.float64)
    if n == 0:
        return out
    order = np.lexsort((ts, session, user))
    u, s, t = user[order], session[order], ts[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (u[1:] != u[:-1]) | (s[1:] != s[:-1])
    new_run = new_group.copy()
    new_run[1:] |= t[1:] != t[:-1]
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_ts = t[run_start]
    run_group = np.cumsum(new_group)[run_start]
    next_ts = np.empty_like(run_ts)
    next_ts[:-1] = run_ts[1:]
    has_next = np.zeros(len(run_ts), dtype=bool)
    has_next[:-1] = run_group[1:] == run_group[:-1]
    gap = np.where(has_next, np.minimum(next_ts - run_ts, cap_s), 0.0)
    out[order] = gap[run_id]
    out[session < 0] = 0.0
    return out


def _price_bucket(price: np.ndarray) -> np.ndarray:
    """Half-octave price buckets: floor(2 * log2(1 + price))."""
    return np.floor(2.0 * np.log2(1.0 + np.maximum(price, 0.0))).astype(np.int64)


def rees46_to_events(path: str, session_gap_cap_s: float = 300.0,
                     content_dim: int = CONTENT_DIM) -> dict:
    """REES46 multi-category store events (CSV) -> events, items, users, meta.

    view -> click, cart -> add_to_cart, purchase -> checkout; remove_from_cart rows are
    dropped (counted in meta["dropped"]). advertiser = `brand_advertiser_id(brand)`, 0 for a
    missing brand. click_duration of a view = `session_durations` (gap to the same user's next
    later event in the same user_session, capped at `session_gap_cap_s`; 0 for the session's
    last second); other events 0. timestamp = event_time (UTC) in unix seconds.
    content_emb = unit sum of hashed random directions of category_id, each category_code
    prefix, brand and a half-octave price bucket (a content proxy).
    """
    if not session_gap_cap_s > 0:
        raise ValueError(f"session_gap_cap_s must be > 0, got {session_gap_cap_s}")
    header = _header(path)
    for c in REES46_COLUMNS:
        _resolve(path, header, c)
    raw = _read_strings(path, list(REES46_COLUMNS))
    n_in = raw.num_rows
    col = lambda k: raw.column(k).combine_chunks()  # noqa: E731

    drops = _Drops(n_in, ("missing_event_time", "missing_event_type", "missing_user_id",
                          "missing_product_id", "missing_category_id",
                          *(k for k, v in REES46_EVENTS.items() if v is None)))
    # event time: "2019-10-01 00:00:00 UTC" (a bare "YYYY-MM-DD HH:MM:SS" is read as UTC)
    et = col("event_time")
    miss_t = _missing(et)
    trimmed = pc.utf8_trim_whitespace(pc.fill_null(et, ""))
    parsed = pc.strptime(trimmed, format="%Y-%m-%d %H:%M:%S UTC", unit="s", error_is_null=True)
    parsed = pc.coalesce(parsed, pc.strptime(trimmed, format="%Y-%m-%d %H:%M:%S", unit="s",
                                             error_is_null=True))
    bad = ~miss_t & np.asarray(parsed.is_null())
    if bad.any():
        raise ConversionError(
            f"{path}: column 'event_time' has {int(bad.sum())} of {n_in} rows that are not "
            f"'YYYY-MM-DD HH:MM:SS UTC' timestamps, e.g. {_example(et, bad)}")
    ts_all = pc.fill_null(pc.cast(parsed, pa.int64()), 0).to_numpy(zero_copy_only=False).astype(np.int64)

    etype_raw = col("event_type")
    miss_e = _missing(etype_raw)
    names = pc.utf8_lower(pc.utf8_trim_whitespace(pc.fill_null(etype_raw, "")))
    bad = ~miss_e & ~np.asarray(pc.is_in(names, value_set=pa.array(list(REES46_EVENTS))))
    if bad.any():
        raise ConversionError(
            f"{path}: column 'event_type' has {int(bad.sum())} of {n_in} rows with unknown value, "
            f"e.g. {_example(etype_raw, bad)}; known: {list(REES46_EVENTS)}")
    names = np.asarray(names.to_pylist(), dtype=object)

    user_all, miss_u = _parse_ids(path, "user_id", col("user_id"))
    item_all, miss_i = _parse_ids(path, "product_id", col("product_id"))
    cat_all, miss_c = _parse_ids(path, "category_id", col("category_id"))
    price_all, miss_p = _parse_floats(path, "price", col("price"))
    session_raw = _strings(col("user_session"))
    miss_s = np.asarray([s is None for s in session_raw], dtype=bool)
    session_code = np.full(n_in, -1, dtype=np.int64)
    if (~miss_s).any():
        session_code[~miss_s] = pd.factorize(pd.Series(session_raw[~miss_s]))[0]

    # durations over every row that has a user, a session and a time (including
    # remove_from_cart and rows dropped below: they are still the user's next action)
    usable = ~miss_u & ~miss_t
    dur_all = np.zeros(n_in)
    dur_all[usable] = session_durations(user_all[usable], session_code[usable], ts_all[usable],
                                        float(session_gap_cap_s))

    drops.drop("missing_event_time", miss_t)
    drops.drop("missing_event_type", miss_e)
    drops.drop("missing_user_id", miss_u)
    drops.drop("missing_product_id", miss_i)
    drops.drop("missing_category_id", miss_c)
    for name, mapped in REES46_EVENTS.items():
        if mapped is None:
            drops.drop(name, names == name)
    keep = drops.keep

    etype = np.asarray([REES46_EVENTS[x] for x in names[keep]], dtype=object)
    is_click = etype == "click"
    dur = np.where(is_click, dur_all[keep], 0.0)
    user, item, cat, ts = user_all[keep], item_all[keep], cat_all[keep], ts_all[keep]
    brand = _strings(col("brand"))[keep]
    brand = np.asarray([b.lower() if b is not None else None for b in brand], dtype=object)
    code = _strings(col("category_code"))[keep]
    price, p_miss = price_all[keep], miss_p[keep]
    b_miss = np.asarray([b is None for b in brand], dtype=bool)
    c_miss = np.asarray([c is None for c in code], dtype=bool)

    # item table: the item's most frequent category / brand / code, median price
    cat_of, cat_conf = _item_mode(item, cat)
    brand_of, brand_conf = _item_mode(item, brand, ~b_miss)
    code_of, code_conf = _item_mode(item, code, ~c_miss)
    price_of = pd.Series(price[~p_miss]).groupby(item[~p_miss]).median().to_dict()
    item_ids = np.asarray(sorted(cat_of), dtype=np.int64)
    il = item_ids.tolist()
    item_cat = np.asarray([cat_of[i] for i in il], dtype=np.int64)
    item_brand = np.asarray([brand_of.get(i) for i in il], dtype=object)
    item_code = np.asarray([code_of.get(i) for i in il], dtype=object)
    item_price = np.asarray([price_of.get(i, np.nan) for i in il], dtype=np.float64)
    adv_cache: dict = {}
    item_adv = np.asarray([UNKNOWN_ADVERTISER if b is None else adv_cache.setdefault(b, brand_advertiser_id(b))
                           for b in item_brand.tolist()], dtype=np.int64)

    emb = np.zeros((len(item_ids), content_dim))
    _add_field(emb, "rees46_category", item_cat, np.ones(len(il), bool))
    has_code = np.asarray([c is not None for c in item_code], dtype=bool)
    levels = [c.split(".") if c else [] for c in item_code.tolist()]
    depth = max((len(x) for x in levels), default=0)
    for k in range(depth):
        prefix = np.asarray([".".join(x[:k + 1]) if len(x) > k else "" for x in levels], dtype=object)
        w = np.asarray([1.0 / math.sqrt(len(x)) if len(x) > k else 0.0 for x in levels])
        part = np.zeros_like(emb)
        _add_field(part, "rees46_code", prefix, has_code & (w > 0))
        emb += w[:, None] * part
    has_brand = np.asarray([b is not None for b in item_brand], dtype=bool)
    _add_field(emb, "rees46_brand", np.where(has_brand, item_brand, ""), has_brand)
    has_price = np.isfinite(item_price)
    _add_field(emb, "rees46_price", _price_bucket(np.nan_to_num(item_price)), has_price, weight=0.5)
    items = pa.table({
        "item_id": pa.array(item_ids), "advertiser_id": pa.array(item_adv),
        "category_id": pa.array(item_cat),
        "brand": pa.array(item_brand.tolist(), pa.string()),
        "category_code": pa.array(item_code.tolist(), pa.string()),
        "price": pa.array(item_price, pa.float64()),
        "content_emb": _emb_column(_unit(emb)),
    })
    adv = item_adv[np.searchsorted(item_ids, item)]
    events = _events_table(user, item, adv, etype, dur, ts)
    users = pa.table({"user_id": pa.array(np.unique(user), pa.int64())})

    clicks = int(is_click.sum())
    meta = {
        "source": "rees46", "input": os.path.abspath(path), "rows_in": n_in,
        "rows_out": events.num_rows, "dropped": drops.counts,
        "imputed": {"brand_missing": int(b_miss.sum()), "category_code_missing": int(c_miss.sum()),
                    "price_missing": int(p_miss.sum()),
                    "user_session_missing": int(miss_s[keep].sum())},
        "event_types": _type_counts(etype),
        "mapping": {k: (v if v is not None else "dropped") for k, v in REES46_EVENTS.items()},
        "has_click_duration": True,
        "session_gap_cap_s": float(session_gap_cap_s),
        "clicks_at_cap": int((dur[is_click] >= session_gap_cap_s).sum()),
        "clicks_zero_duration": int((dur[is_click] == 0).sum()) if clicks else 0,
        "timestamp_resolution_s": 1,
        "item_conflicts": {"category": cat_conf, "brand": brand_conf, "category_code": code_conf},
        "n_users": int(users.num_rows), "n_items": int(len(item_ids)),
        "n_advertisers": int(len(np.unique(item_adv))),
        "content_emb": ("proxy: unit sum of hashed random directions of category_id, category_code "
                        f"prefixes, brand and 0.5 x half-octave price bucket (dim {content_dim})"),
    }
    return {"events": events, "items": items, "users": users, "meta": meta}


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
        "counts": _type_counts(et),
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
        "train_event_types": _type_counts(np.asarray(train.column("event_type").to_pylist(), dtype=object)),
        "eval_event_types": _type_counts(np.asarray(evaluation.column("event_type").to_pylist(), dtype=object)),
        "time_span_utc": [_iso(ts.min()), _iso(ts.max())],
        "marginals": marginals(events, has_dur),
        "attribution": attribution,
        "paths": paths,
    })
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    meta["paths"]["meta"] = os.path.join(out_dir, "meta.json")
    return meta
