"""Any event log -> raycg events, items and users, driven by a small mapping (docs/adapters.md).

A mapping says where each raycg field comes from in a CSV (with or without a header row) or
Parquet file; the Tmall, REES46 and Taobao UserBehavior formats are mapping presets
(`raycg/conf/convert/<name>.yaml`). A whole mapping, with every key it may have:

    name: mylog                     # meta["source"]
    format: csv                     # csv | parquet (default: from the file name)
    header: true                    # csv: false = no header row; columns are 0-based positions
    delimiter: ","
    columns:                        # raycg field -> source column: a name, a position, or a list
      user_id: user_id              #   of alternative names (the first present one is used)
      item_id: [product_id, item_id]
      event_type: action
    ids: int                        # int: non-negative integers (exact, 64-bit); hash: any string
                                    #   (user/item ids hashed to 63 bits with stable_hash)
    event_types:                    # source value -> click | save | add_to_cart | checkout,
      pv: click                     #   or null: dropped and counted under the source value;
      buy: checkout                 #   a value not listed is an error naming its line
      remove_from_cart: null
    lowercase_event_types: false
    timestamp:                      # one of (or a list of alternatives; the first whose columns
      column: ts                    #   all exist is used):
      unit: s                       #   numbers in s | ms | us | ns
      # format: ["%Y-%m-%d %H:%M:%S UTC", "%Y-%m-%d %H:%M:%S"]   strings (UTC)
      # month: month, day: day, year: 2015                       month and day columns
      # mmdd: time_stamp, year: 2015                             one mmdd column
    category: {column: cat_id, type: int, missing: drop}     # optional; absent: category 0
    advertiser: {column: seller_id, type: int, missing: drop} # optional; absent: advertiser 0.
                                    #   type hash: strings -> 1 + stable_hash("<salt>|<value>")
                                    #   mod 2^63-1 (salt: key `salt`), missing -> 0
    surface: home                   # a constant, or {column: X, values: {src: home|search|related}}
    click_duration:                 # none (default: all 0) | {column: X} seconds |
      from: next_event              #   {from: next_event}: seconds to the same user's next later
      session: user_session         #   event (within `session` when given), capped at cap_s
      cap_s: 300
    item_attributes:                # extra item-table columns, the item's most frequent value
      brand: {column: brand, type: string, lowercase: true}  # int | hash | string | float (median)
    user_attributes:                # users-table columns (ints), the user's most frequent value
      age_range: {column: age_range, optional: true}
    duplicates: drop                # drop: exact repeats of an event (every raycg column equal:
                                    #   double logging, or same-day repeats at day resolution)
                                    #   are dropped, counted in meta["dropped"]["duplicate"]; keep
    content:                        # a proxy content_emb: unit sum of fixed random directions of
      - {field: category}           #   these item fields (category, advertiser or an attribute);
      - {field: category_code, kind: path, separator: "."}   # kind value | path | bucket (of a
      - {field: price, kind: bucket, weight: 0.5}            #   float: floor(2 log2(1 + x)))
                                    # empty or absent: no content_emb (the item tower uses ids and
                                    #   stats only)

Every row ends in the output or in a counted drop: a *missing* user, item, time or event
type (and category/advertiser with `missing: drop`) drops the row, counted in
meta["dropped"]["missing_<column>"]; a missing attribute keeps the row with an unknown value,
counted in meta["imputed"]["<column>_missing"]; a value that is present but wrong (a
negative id, an unknown event type, an unparseable time) is a `ConversionError` naming the
file, the column, how many rows and an example with its line (CSV) or row (Parquet).

Reading the file and parsing a column: `raycg.data.source`; stable hashes and proxy vectors:
`raycg.data.hashing`; splitting and writing a data directory: `raycg.data.adapters`.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from raycg.config import CONF_DIR
from raycg.data.hashing import add_proxy_field, emb_column, price_bucket, unit_rows
from raycg.data.schema import EVENT_SCHEMA, EVENT_TYPES, SURFACES
from raycg.data.source import ConversionError, SourceFile, _Column

CONTENT_DIM = 16
PRESET_DIR = os.path.join(CONF_DIR, "convert")
MAPPING_KEYS = {"name", "format", "header", "delimiter", "columns", "ids", "event_types", "duplicates",
                "lowercase_event_types", "timestamp", "category", "advertiser", "surface",
                "click_duration", "item_attributes", "user_attributes", "content", "description"}
TIME_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


# ----------------------------------------------------------------------------- parsing


class Drops:
    """Row drops with one reason per row (the first that applies, in call order). `reasons` are
    listed in meta with 0 when they never occur."""

    def __init__(self, n: int, reasons: tuple[str, ...] = ()):
        self.keep = np.ones(n, dtype=bool)
        self.counts: dict[str, int] = {r: 0 for r in reasons}

    def drop(self, reason: str, mask: np.ndarray) -> None:
        self.counts.setdefault(reason, 0)
        new = mask & self.keep
        if new.any():
            self.counts[reason] += int(new.sum())
            self.keep &= ~mask


def mode_per_key(keys: np.ndarray, values: np.ndarray, present: np.ndarray | None = None):
    """Per key: most frequent value among present rows (ties -> smallest), and the number of
    keys with more than one distinct value. Keys without any present value are absent."""
    if present is None:
        present = np.ones(len(keys), dtype=bool)
    df = pd.DataFrame({"key": keys[present], "v": values[present]})
    counts = df.groupby(["key", "v"], sort=False).size().rename("n").reset_index()
    conflicts = int((counts.groupby("key").size() > 1).sum())
    counts = counts.sort_values(["key", "n", "v"], ascending=[True, False, True], kind="stable")
    best = counts.drop_duplicates("key")
    return dict(zip(best["key"].tolist(), best["v"].tolist())), conflicts


def session_durations(user: np.ndarray, session: np.ndarray, ts: np.ndarray, cap_s: float) -> np.ndarray:
    """Per row: seconds to the same (user, session)'s next event with a later timestamp,
    capped at `cap_s`; 0 for the session's last second. `session` is an int code per row,
    -1 = unknown session (duration 0).

    Events sharing a second count as simultaneous (their order inside the second is not
    meaningful), so each gets the gap to the next later second; the result does not depend
    on row order.
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


def events_table(user, item, adv, event_type, duration, ts, surface) -> pa.Table:
    n = len(user)
    return pa.table({
        "user_id": pa.array(user, pa.int64()),
        "item_id": pa.array(item, pa.int64()),
        "advertiser_id": pa.array(adv, pa.int64()),
        "surface": pa.array(surface, pa.string()),
        "event_type": pa.array(event_type, pa.string()),
        "click_duration": pa.array(np.asarray(duration, np.float32), pa.float32()),
        "timestamp": pa.array(ts, pa.int64()),
        "context_item_id": pa.array(np.full(n, -1, np.int64)),
        "query_id": pa.array(np.full(n, -1, np.int64)),
    }, schema=EVENT_SCHEMA)


def type_counts(event_type: np.ndarray) -> dict[str, int]:
    return {t: int((event_type == t).sum()) for t in EVENT_TYPES}


# ----------------------------------------------------------------------------- the mapping


def load_mapping(spec) -> dict:
    """A mapping dict, a YAML file, or a preset name (raycg/conf/convert/<name>.yaml) -> checked dict."""
    if isinstance(spec, dict):
        mapping = dict(spec)
    else:
        path = spec if os.path.isfile(spec) else os.path.join(PRESET_DIR, f"{spec}.yaml")
        if not os.path.isfile(path):
            presets = sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))
            raise ConversionError(f"mapping {spec!r}: neither a file nor a preset; presets: {presets}")
        with open(path) as f:
            mapping = yaml.safe_load(f) or {}
        mapping.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    unknown = sorted(set(mapping) - MAPPING_KEYS)
    if unknown:
        raise ConversionError(f"mapping {mapping.get('name', spec)!r}: unknown key(s) {unknown}; "
                              f"known: {sorted(MAPPING_KEYS)}")
    for key in ("columns", "event_types", "timestamp"):
        if not mapping.get(key):
            raise ConversionError(f"mapping {mapping.get('name', spec)!r}: '{key}' is required")
    missing = [f for f in ("user_id", "item_id", "event_type") if f not in mapping["columns"]]
    if missing:
        raise ConversionError(f"mapping {mapping.get('name')!r}: columns must name {missing}")
    bad = {k: v for k, v in mapping["event_types"].items() if v is not None and v not in EVENT_TYPES}
    if bad:
        raise ConversionError(f"mapping {mapping.get('name')!r}: event_types {bad}: expected one of "
                              f"{list(EVENT_TYPES)} or null (drop)")
    return mapping


def _timestamp_spec(src: SourceFile, spec) -> tuple[dict, list[str]]:
    """The first alternative whose columns all exist -> (spec, its columns)."""
    alternatives = spec if isinstance(spec, list) else [spec]
    wanted = []
    for alt in alternatives:
        refs = [alt[k] for k in ("column", "month", "day", "mmdd") if k in alt]
        try:
            return alt, [src.resolve(r, "timestamp") for r in refs]
        except ConversionError:
            wanted.append(" and ".join(repr(r) for r in refs))
    raise ConversionError(f"{src.path}: missing required timestamp column(s) {' (or '.join(wanted)}"
                          f"{')' * (len(wanted) - 1)}; file has columns {src.names}")


def _parse_timestamp(src: SourceFile, spec: dict, cols: dict[str, _Column]) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (unix seconds, missing mask, resolution in seconds)."""
    if "month" in spec or "mmdd" in spec:
        year = int(spec["year"])
        if "mmdd" in spec:
            c = cols["mmdd"]
            mmdd = c.ids("mmdd dates")
            month, day, miss = mmdd // 100, mmdd % 100, c.missing
            names = [src.display(c.column)]
        else:
            month, day = cols["month"].ids("month numbers"), cols["day"].ids("day numbers")
            miss = cols["month"].missing | cols["day"].missing
            names = [src.display(cols["month"].column), src.display(cols["day"].column)]
        n = len(month)
        dates = pd.to_datetime(pd.DataFrame({"year": np.full(n, year), "month": np.where(miss, 1, month),
                                             "day": np.where(miss, 1, day)}), errors="coerce", utc=True)
        bad = ~miss & np.asarray(dates.isna())
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ConversionError(
                f"{src.path}: column(s) {', '.join(repr(c) for c in names)} have {int(bad.sum())} of {n} rows "
                f"that are not a valid {year} date, e.g. month {month[i]} day {day[i]} at {src.where(i)}")
        epoch = pd.Timestamp(0, tz="UTC")
        secs = np.asarray((dates.fillna(epoch) - epoch) // pd.Timedelta(seconds=1), dtype=np.int64)
        return np.where(miss, 0, secs), miss, 86_400
    c = cols["column"]
    if "format" in spec:
        formats = spec["format"] if isinstance(spec["format"], list) else [spec["format"]]
        trimmed = pc.utf8_trim_whitespace(pc.fill_null(c.arr, ""))
        parsed = None
        for fmt in formats:
            p = pc.strptime(trimmed, format=fmt, unit="s", error_is_null=True)
            parsed = p if parsed is None else pc.coalesce(parsed, p)
        bad = ~c.missing & np.asarray(parsed.is_null())
        if bad.any():
            c.fail(bad, f"that are not timestamps in the format {' or '.join(repr(f) for f in formats)}")
        secs = pc.fill_null(pc.cast(parsed, pa.int64()), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        return secs, c.missing, 1
    unit = spec.get("unit", "s")
    if unit not in TIME_UNITS:
        raise ConversionError(f"mapping: timestamp.unit {unit!r}: expected one of {list(TIME_UNITS)}")
    values = c.floats()
    bad = ~c.missing & (values < 0)
    if bad.any():
        c.fail(bad, f"that are negative (expected unix time in {unit})")
    secs = np.floor(np.nan_to_num(values) / TIME_UNITS[unit]).astype(np.int64)
    return secs, c.missing, 1


def _id_values(c: _Column, kind: str, salt: str, lowercase: bool = True) -> np.ndarray:
    if kind == "int":
        return c.ids()
    if kind == "hash":
        return c.hashed(salt, lowercase)
    raise ConversionError(f"mapping: type {kind!r} for column '{c.src.display(c.column)}': expected int or hash")


def convert_log(path: str, mapping, content_dim: int = CONTENT_DIM) -> dict:
    """Read `path` with `mapping` (dict, YAML file or preset name; see the module docstring)
    -> dict(events=pa.Table, items=pa.Table, users=pa.Table, meta=dict), events in input
    order minus dropped rows (`raycg.data.adapters.write_data_dir` splits and writes them)."""
    m = load_mapping(mapping)
    src = SourceFile(path, m.get("format"), bool(m.get("header", True)), m.get("delimiter", ","))
    fields = m["columns"]
    col_of = {f: src.resolve(fields[f], f) for f in ("user_id", "item_id", "event_type")}
    ts_spec, ts_cols = _timestamp_spec(src, m["timestamp"])
    ts_keys = [k for k in ("column", "month", "day", "mmdd") if k in ts_spec]
    optional = {}  # role -> spec with a resolved column
    for role in ("category", "advertiser"):
        if m.get(role):
            spec = dict(m[role]) if isinstance(m[role], dict) else {"column": m[role]}
            spec["_col"] = src.resolve(spec["column"], role)
            optional[role] = spec
    surface = m.get("surface", "home")
    if isinstance(surface, dict):
        surface = dict(surface, _col=src.resolve(surface["column"], "surface"))
    elif surface not in SURFACES:
        raise ConversionError(f"mapping: surface {surface!r}: expected one of {list(SURFACES)} or "
                              "{column: X, values: {...}}")
    dur = m.get("click_duration") or {"from": "none"}
    dur_from = dur.get("from", "column" if "column" in dur else "none")
    if dur_from not in ("none", "column", "next_event"):
        raise ConversionError(f"mapping: click_duration.from {dur_from!r}: expected none, column or next_event")
    if dur_from == "column":
        dur["_col"] = src.resolve(dur["column"], "click_duration")
    if dur_from == "next_event" and dur.get("session") is not None:
        dur["_session"] = src.resolve(dur["session"], "click_duration.session")
    attrs = {}
    for name, spec in (m.get("item_attributes") or {}).items():
        spec = dict(spec) if isinstance(spec, dict) else {"column": spec}
        spec["_col"] = src.resolve(spec.get("column", name), f"item_attributes.{name}")
        attrs[name] = spec
    user_attrs = {}
    for name, spec in (m.get("user_attributes") or {}).items():
        spec = dict(spec) if isinstance(spec, dict) else {"column": spec}
        try:
            spec["_col"] = src.resolve(spec.get("column", name), f"user_attributes.{name}")
        except ConversionError:
            if spec.get("optional"):
                continue
            raise
        user_attrs[name] = spec

    used = [*col_of.values(), *ts_cols, *(s["_col"] for s in optional.values()),
            *(s["_col"] for s in attrs.values()), *(s["_col"] for s in user_attrs.values())]
    used += [surface["_col"]] if isinstance(surface, dict) else []
    used += [dur[k] for k in ("_col", "_session") if k in dur]
    raw = src.read(used)
    n_in = raw.num_rows
    cols = {c: _Column(src, c, raw.column(c).combine_chunks()) for c in dict.fromkeys(used)}
    ts_parts = {k: cols[c] for k, c in zip(ts_keys, ts_cols)}

    # the event type, checked against the mapping (a value it does not list is an error)
    et = cols[col_of["event_type"]]
    et_values = et.strings(bool(m.get("lowercase_event_types", False)))
    known = {str(k): v for k, v in m["event_types"].items()}
    present = ~et.missing
    unknown = present & ~np.isin(et_values.astype(str), list(known))
    if unknown.any():
        listing = ", ".join(f"{k} -> {v if v is not None else 'dropped'}" for k, v in known.items())
        et.fail(unknown, "with an unknown event type", f"; the mapping knows: {listing}")

    id_kind = m.get("ids", "int")
    user_all = _id_values(cols[col_of["user_id"]], id_kind, "user", lowercase=False)
    item_all = _id_values(cols[col_of["item_id"]], id_kind, "item", lowercase=False)
    ts_all, miss_t, resolution = _parse_timestamp(src, ts_spec, ts_parts)
    miss_u, miss_i = cols[col_of["user_id"]].missing, cols[col_of["item_id"]].missing

    # click durations from the next event use every row with a user and a time, including
    # rows dropped below (a dropped event is still the user's next action)
    dur_all = np.zeros(n_in)
    if dur_from == "next_event":
        if not float(dur.get("cap_s", 300)) > 0:
            raise ValueError(f"click_duration.cap_s must be > 0, got {dur.get('cap_s')}")
        session_code = np.zeros(n_in, dtype=np.int64)
        miss_s = np.zeros(n_in, dtype=bool)
        if "_session" in dur:
            sessions = cols[dur["_session"]].strings()
            miss_s = cols[dur["_session"]].missing
            session_code[:] = -1
            if (~miss_s).any():
                session_code[~miss_s] = pd.factorize(pd.Series(sessions[~miss_s]))[0]
        usable = ~miss_u & ~miss_t
        dur_all[usable] = session_durations(user_all[usable], session_code[usable], ts_all[usable],
                                            float(dur.get("cap_s", 300)))
    elif dur_from == "column":
        c = cols[dur["_col"]]
        dur_all = np.nan_to_num(c.floats())
        if (dur_all < 0).any():
            c.fail(dur_all < 0, "that are negative durations")

    # drops: one reason per row, the first that applies
    key = lambda c: src.key(c)  # noqa: E731
    reasons = [f"missing_{key(c)}" for c in ts_cols] + [f"missing_{key(col_of['event_type'])}",
                                                       f"missing_{key(col_of['user_id'])}",
                                                       f"missing_{key(col_of['item_id'])}"]
    for spec in optional.values():
        if spec.get("missing", "drop") == "drop":
            reasons.append(f"missing_{key(spec['_col'])}")
    null_values = [k for k, v in known.items() if v is None]
    drops = Drops(n_in, tuple(reasons) + tuple(null_values))
    for k, c in zip(ts_keys, ts_cols):
        drops.drop(f"missing_{key(c)}", ts_parts[k].missing)
    drops.drop(f"missing_{key(col_of['event_type'])}", et.missing)
    drops.drop(f"missing_{key(col_of['user_id'])}", miss_u)
    drops.drop(f"missing_{key(col_of['item_id'])}", miss_i)
    role_values = {}
    for role, spec in optional.items():
        c = cols[spec["_col"]]
        role_values[role] = _id_values(c, spec.get("type", "int"), spec.get("salt", role),
                                       spec.get("lowercase", True))
        if spec.get("missing", "drop") == "drop":
            drops.drop(f"missing_{key(spec['_col'])}", c.missing)
    for v in null_values:
        drops.drop(v, present & (et_values.astype(str) == v))
    keep = drops.keep

    etype = np.asarray([known[str(x)] for x in et_values[keep]], dtype=object)
    user, item, ts = user_all[keep], item_all[keep], ts_all[keep]
    is_click = etype == "click"
    duration = np.where(is_click, dur_all[keep], 0.0)
    if isinstance(surface, dict):
        c = cols[surface["_col"]]
        sv = c.strings()
        smap = {str(k): v for k, v in (surface.get("values") or {s: s for s in SURFACES}).items()}
        bad = keep & ~c.missing & ~np.isin(sv.astype(str), list(smap))
        if bad.any():
            c.fail(bad, "with an unknown surface", f"; the mapping knows: {smap}")
        surfaces = np.asarray([smap.get(str(s), "home") if s is not None else "home" for s in sv[keep]], dtype=object)
    else:
        surfaces = np.full(len(user), surface, dtype=object)

    # the item table: one value per item (the most frequent), float attributes the median
    imputed: dict[str, int] = {}
    conflicts: dict[str, int] = {}
    item_ids = np.unique(item)
    item_cols: dict[str, np.ndarray] = {}
    for role in ("advertiser", "category"):
        if role not in optional:
            item_cols[role] = np.zeros(len(item_ids), np.int64)
            continue
        spec, c = optional[role], cols[optional[role]["_col"]]
        miss = c.missing[keep]
        if spec.get("missing", "drop") != "drop":
            imputed[f"{key(spec['_col'])}_missing"] = int(miss.sum())
        of, conflicts[role] = mode_per_key(item, role_values[role][keep], ~miss)
        item_cols[role] = np.asarray([of.get(i, 0) for i in item_ids.tolist()], dtype=np.int64)
    extra: dict[str, pa.Array] = {}
    attr_values: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (values per item, present)
    for name, spec in attrs.items():
        c = cols[spec["_col"]]
        kind = spec.get("type", "string")
        miss = c.missing[keep]
        imputed[f"{key(spec['_col'])}_missing"] = int(miss.sum())
        if kind == "float":
            v = c.floats()[keep]
            med = pd.Series(v[~miss]).groupby(item[~miss]).median().to_dict()
            per_item = np.asarray([med.get(i, np.nan) for i in item_ids.tolist()], dtype=np.float64)
            extra[name] = pa.array(per_item, pa.float64())
            attr_values[name] = (per_item, np.isfinite(per_item))
            continue
        if kind == "string":
            v = c.strings(bool(spec.get("lowercase", False)))[keep]
        elif kind in ("int", "hash"):
            v = _id_values(c, kind, spec.get("salt", name), spec.get("lowercase", True))[keep]
        else:
            raise ConversionError(f"mapping: item_attributes.{name}.type {kind!r}: expected int, hash, string "
                                  "or float")
        of, conflicts[name] = mode_per_key(item, v, ~miss)
        if kind == "string":
            per_item = np.asarray([of.get(i) for i in item_ids.tolist()], dtype=object)
            extra[name] = pa.array(per_item.tolist(), pa.string())
            attr_values[name] = (per_item, np.asarray([x is not None for x in per_item], bool))
        else:
            per_item = np.asarray([of.get(i, -1) for i in item_ids.tolist()], dtype=np.int64)
            extra[name] = pa.array(per_item, pa.int64())
            attr_values[name] = (per_item, per_item >= 0)
    for k in ("_session", "_col"):
        if k in dur and dur_from in ("next_event", "column"):
            imputed[f"{key(dur[k])}_missing"] = int(cols[dur[k]].missing[keep].sum())
    item_table = {"item_id": pa.array(item_ids, pa.int64()),
                  "advertiser_id": pa.array(item_cols["advertiser"], pa.int64()),
                  "category_id": pa.array(item_cols["category"], pa.int64()), **extra}
    attr_values["category"] = (item_cols["category"], np.ones(len(item_ids), bool))
    attr_values["advertiser"] = (item_cols["advertiser"], item_cols["advertiser"] > 0)
    content = m.get("content") or []
    if content:
        item_table["content_emb"] = emb_column(_content_proxy(m["name"], content, attr_values, len(item_ids),
                                                              content_dim))
    items = pa.table(item_table)
    adv = item_cols["advertiser"][np.searchsorted(item_ids, item)]  # events carry their item's advertiser
    events = events_table(user, item, adv, etype, duration, ts, surfaces)

    user_ids = np.unique(user)
    users_cols = {"user_id": pa.array(user_ids, pa.int64())}
    user_meta = {}
    for name, spec in user_attrs.items():
        c = cols[spec["_col"]]
        vals = c.ids()[keep]
        miss = c.missing[keep]
        mode, n_conf = mode_per_key(user, vals, ~miss)
        users_cols[name] = pa.array([mode.get(u, -1) for u in user_ids.tolist()], pa.int64())
        user_meta[name] = {"missing_rows": int(miss.sum()), "users_with_several_values": n_conf}

    # exact repeats (every column equal: double logging, or a same-day repeat at day resolution)
    # are one event: dropped and counted, so a converted log passes data.check_duplicates
    dup = np.zeros(events.num_rows, bool)
    if m.get("duplicates", "drop") == "drop" and events.num_rows:
        dup = events.to_pandas().duplicated(keep="first").to_numpy()
        drops.counts["duplicate"] = int(dup.sum())
        if dup.any():
            events = events.filter(pa.array(~dup))
            etype, duration = etype[~dup], duration[~dup]
            is_click = etype == "click"
    elif m.get("duplicates", "drop") != "keep":
        raise ConversionError(f"mapping: duplicates {m['duplicates']!r}: expected drop or keep")
    meta = {
        "source": m["name"], "input": os.path.abspath(path), "rows_in": n_in, "rows_out": events.num_rows,
        "dropped": drops.counts, "imputed": imputed, "event_types": type_counts(etype),
        "mapping": {k: (v if v is not None else "dropped") for k, v in known.items()},
        "has_click_duration": dur_from != "none",
        "timestamp_resolution_s": resolution,
        "item_conflicts": conflicts, "users": user_meta,
        "n_users": int(len(user_ids)), "n_items": int(len(item_ids)),
        "n_advertisers": int(len(np.unique(item_cols["advertiser"]))),
        "advertiser": (f"column '{src.display(optional['advertiser']['_col'])}'" if "advertiser" in optional
                       else "none in the source: every item's advertiser is 0"),
        "content_emb": (f"proxy: unit sum of hashed random directions of {_content_fields(content)} "
                        f"(dim {content_dim})" if content else "none (the item tower uses ids and stats)"),
    }
    if src.header:
        meta["ignored_columns"] = [c for c in src.names if c not in set(used)]
    if dur_from == "next_event":
        cap = float(dur.get("cap_s", 300))
        d = duration[is_click]
        meta.update({"session_gap_cap_s": cap, "clicks_at_cap": int((d >= cap).sum()),
                     "clicks_zero_duration": int((d == 0).sum())})
    return {"events": events, "items": items, "users": pa.table(users_cols), "meta": meta}


def _content_fields(content: list) -> str:
    kinds = {"value": "", "path": " prefixes", "bucket": " bucket"}
    return ", ".join(f"{float(c.get('weight', 1)):g} x " * (float(c.get("weight", 1)) != 1) + c["field"]
                     + kinds.get(c.get("kind", "value"), "") for c in content)


def _content_proxy(source: str, content: list, attr_values: dict, n_items: int, dim: int) -> np.ndarray:
    emb = np.zeros((n_items, dim))
    for part in content:
        name = part["field"]
        if name not in attr_values:
            raise ConversionError(f"mapping: content field {name!r}: expected category, advertiser or one of "
                                  f"the item_attributes {sorted(set(attr_values) - {'category', 'advertiser'})}")
        values, present = attr_values[name]
        kind, weight, tag = part.get("kind", "value"), float(part.get("weight", 1.0)), f"{source}_{name}"
        if kind == "value":
            add_proxy_field(emb, tag, np.where(present, values, values[present][0] if present.any() else 0),
                            present, weight)
        elif kind == "bucket":
            add_proxy_field(emb, tag, price_bucket(np.nan_to_num(values.astype(np.float64))), present, weight)
        elif kind == "path":  # a.b.c: each prefix, weighted 1/sqrt(depth)
            sep = part.get("separator", ".")
            levels = [str(v).split(sep) if p else [] for v, p in zip(values.tolist(), present.tolist())]
            for k in range(max((len(x) for x in levels), default=0)):
                prefix = np.asarray([sep.join(x[:k + 1]) if len(x) > k else "" for x in levels], dtype=object)
                w = np.asarray([1.0 / math.sqrt(len(x)) if len(x) > k else 0.0 for x in levels])
                add_proxy_field(emb, tag, prefix, w > 0, weight * w)
        else:
            raise ConversionError(f"mapping: content kind {kind!r}: expected value, path or bucket")
    return unit_rows(emb)
