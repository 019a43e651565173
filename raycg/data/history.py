"""The user's recent action sequence, looked up leakage-free (strictly before the row's time).

`HistoryIndex` holds every engagement / conversion event (impressions are not actions) sorted
by (user, timestamp), in flat arrays (CSR by user: sorted user ids, offsets) plus a composite
int64 sort key

    key = user_rank * span + (timestamp - ts_min),    span = ts_max - ts_min + 1

so "user u's events before time t" is one contiguous slice ending at
`searchsorted(key, rank(u) * span + clip(t - ts_min, 0, span), side="left")`: every key
below that query key belongs to an earlier user or to user u with timestamp < t. The slice
starts at the user's offset; the last L entries of it are the history.

`lookup(user_ids [B], timestamps [B], L)` returns `(item_ids [B, L] int64, actions [B, L] int64)`,
most recent last, left-padded with item -1 / action 0 (ACTION_CODES; 0 = padding). Fully
vectorised: two searchsorted calls and one gather, no per-row Python.

Strictly before is what makes the feature leakage-free: a training row never sees itself, an
event at the same second, or anything later, so appending future events (e.g. the evaluation
window) cannot change a training row's history. Events of one user with equal timestamps
keep their input order.

Tiny example, events of user 7 (t: action item): 10: click 100, 20: save 101, 30: checkout 102

    lookup([7, 7, 7, 8], [30, 31, 5, 99], 2)
      items   [[100, 101], [101, 102], [-1, -1], [-1, -1]]
      actions [[  1,   2], [  2,   4], [ 0,  0], [ 0,  0]]
    (the checkout at t=30 is excluded from its own row; user 8 is unknown -> all padding)

Built on the driver from four columns (user_id, item_id, event_type, timestamp) with pyarrow;
pass every split whose rows need histories (train + eval) to `build`: each row only ever sees
events strictly before its own timestamp, so including later files leaks nothing. It is
shipped to packers through the object store like `ImpressionIndex`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from raycg.data.lookup import find_sorted

ACTION_CODES = {"click": 1, "save": 2, "add_to_cart": 3, "checkout": 4}  # 0 = padding
NUM_ACTION_CODES = len(ACTION_CODES) + 1
_COLUMNS = ["user_id", "item_id", "event_type", "timestamp"]


@dataclass
class HistoryIndex:
    users: np.ndarray  # int64 [U], sorted unique user ids
    offsets: np.ndarray  # int64 [U + 1], user r's events are [offsets[r], offsets[r + 1])
    keys: np.ndarray  # int64 [N], user_rank * span + (timestamp - ts_min), sorted
    item_ids: np.ndarray  # int64 [N]
    actions: np.ndarray  # int8 [N], ACTION_CODES values
    timestamps: np.ndarray  # int64 [N]
    ts_min: int
    span: int  # ts_max - ts_min + 1

    @classmethod
    def from_events(cls, table: pa.Table) -> "HistoryIndex":
        """Index the click / save / add_to_cart / checkout rows of `table`; other rows are ignored."""
        etype = table.column("event_type")
        if pa.types.is_dictionary(etype.type):
            etype = etype.cast(pa.string())
        code = pc.index_in(etype, value_set=pa.array(list(ACTION_CODES)))  # null for impressions
        keep = np.asarray(code.is_valid())
        code = code.to_numpy(zero_copy_only=False)
        actions = (code[keep] + 1).astype(np.int8)  # index_in is 0-based, codes start at 1
        users = table.column("user_id").to_numpy().astype(np.int64)[keep]
        items = table.column("item_id").to_numpy().astype(np.int64)[keep]
        ts = table.column("timestamp").to_numpy().astype(np.int64)[keep]
        if len(ts) == 0:
            z = np.zeros(0, np.int64)
            return cls(users=z, offsets=np.zeros(1, np.int64), keys=z, item_ids=z,
                       actions=np.zeros(0, np.int8), timestamps=z, ts_min=0, span=1)
        uniq, rank = np.unique(users, return_inverse=True)
        ts_min = int(ts.min())
        span = int(ts.max()) - ts_min + 1
        if len(uniq) > (np.iinfo(np.int64).max - span) // span:
            raise ValueError(f"HistoryIndex: {len(uniq)} users x timestamp span {span} s overflows the int64 key")
        keys = rank.astype(np.int64) * span + (ts - ts_min)
        order = np.argsort(keys, kind="stable")  # ties (same user, same second) keep input order
        counts = np.bincount(rank, minlength=len(uniq))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(users=uniq.astype(np.int64), offsets=offsets, keys=keys[order], item_ids=items[order],
                   actions=actions[order], timestamps=ts[order], ts_min=ts_min, span=span)

    @classmethod
    def build(cls, files: list[str], extra: pa.Table | None = None) -> "HistoryIndex":
        """Read only the four needed columns of the action rows of `files` [+ the events of
        `extra`, e.g. the checked eval split]."""
        table = pads.dataset(list(files), format="parquet").to_table(
            columns=_COLUMNS, filter=pc.field("event_type").isin(list(ACTION_CODES)))
        if extra is not None:
            table = pa.concat_tables([table, extra.select(_COLUMNS).cast(table.schema)])
        return cls.from_events(table)

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, user_ids: np.ndarray, timestamps: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Each (user, t)'s last `length` actions with timestamp < t: (item_ids, actions), both int64 [B, L].

        Most recent last; left-padded with item -1 / action 0. Unknown users get all padding.
        """
        user_ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        timestamps = np.asarray(timestamps, dtype=np.int64).reshape(-1)
        if len(user_ids) != len(timestamps):
            raise ValueError(f"lookup: {len(user_ids)} user ids but {len(timestamps)} timestamps")
        b = len(user_ids)
        items = np.full((b, length), -1, dtype=np.int64)
        actions = np.zeros((b, length), dtype=np.int64)
        if len(self.users) == 0 or length == 0 or b == 0:
            return items, actions
        rank, known = find_sorted(self.users, user_ids)
        # t - ts_min clipped to [0, span]: rank * span + span is the next user's first key, so
        # side="left" still stops at the end of this user's events for t > ts_max.
        q = rank * self.span + np.clip(timestamps - self.ts_min, 0, self.span)
        end = np.searchsorted(self.keys, q, side="left")
        start = self.offsets[rank]
        end = np.where(known, end, start)  # unknown users: empty slice
        idx = end[:, None] - length + np.arange(length)[None, :]  # [B, L], last index = end - 1
        valid = idx >= start[:, None]
        src = idx[valid]
        items[valid] = self.item_ids[src]
        actions[valid] = self.actions[src]
        return items, actions
