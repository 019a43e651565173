"""Impression hard negatives: items shown to a user that got no engagement.

`ImpressionIndex` holds, per user, the item-table rows of that user's training-window
impressions (CSR layout: sorted user ids, offsets, rows). The packer draws
`loss.hard_negatives` of them per positive row (uniformly, with replacement); rows whose
user has no impressions get -1 (padding, masked in the loss).

Built on the driver from two columns of the training split (user_id, item_id of
`impression` events) with pyarrow; it is shipped to packers through the object store.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from raycg.data.batches import ItemTable
from raycg.data.lookup import find_sorted


@dataclass
class ImpressionIndex:
    users: np.ndarray  # int64 [U], sorted
    offsets: np.ndarray  # int64 [U + 1]
    item_rows: np.ndarray  # int64 [n impressions], rows of the ItemTable

    @classmethod
    def from_events(cls, events: pa.Table, items: ItemTable) -> "ImpressionIndex":
        imp = events.filter(pc.equal(events.column("event_type"), "impression"))
        users = imp.column("user_id").to_numpy().astype(np.int64)
        rows = items.rows(imp.column("item_id").to_numpy().astype(np.int64), "impressions")
        order = np.argsort(users, kind="stable")
        users, rows = users[order], rows[order]
        uniq, starts = np.unique(users, return_index=True)
        offsets = np.append(starts, len(users)).astype(np.int64)
        return cls(users=uniq, offsets=offsets, item_rows=rows)

    @classmethod
    def build(cls, files: list[str], items: ItemTable, before_ts: int | None = None) -> "ImpressionIndex":
        """Impressions of `files` [strictly before `before_ts`: the training part of a split]."""
        keep = pc.field("event_type") == "impression"
        if before_ts is not None:
            keep = keep & (pc.field("timestamp") < before_ts)
        table = pads.dataset(files, format="parquet").to_table(columns=["user_id", "item_id", "event_type"],
                                                               filter=keep)
        return cls.from_events(table, items)

    def __len__(self) -> int:
        return len(self.item_rows)

    def sample(self, user_ids: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """[B, k] item-table rows shown to each user without engagement; -1 where none."""
        out = np.full((len(user_ids), k), -1, dtype=np.int64)
        if len(self.users) == 0 or k == 0:
            return out
        pos, has = find_sorted(self.users, user_ids)
        start, count = self.offsets[pos][has], np.diff(self.offsets)[pos][has]
        draw = (rng.random((int(has.sum()), k)) * count[:, None]).astype(np.int64)
        out[has] = self.item_rows[start[:, None] + draw]
        return out
