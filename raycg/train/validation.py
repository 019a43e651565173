"""Validation-driven training: recall@K on a validation window after every epoch, the best
checkpoint kept, early stopping.

    training split:  [ ........ training part ........ | validation window )   evaluation split
                                                validation_cutoff             (never used here)

`data.validation_fraction` of the training split's time span, at its end, is the validation
window (raycg.data.pipeline.validation_cutoff): its events are not trained on, and its
conversions and engagements become queries exactly like the evaluation split's
(raycg.eval.queries: attributed requests, history strictly before the query time). Features
(user and item stats, impressions for hard negatives) come from the training part only.

After each epoch rank 0 embeds the item corpus and the validation queries with the current
model and computes recall@K by exact search on its device; `EarlyStopping` keeps the best
epoch, and training stops after `patience` epochs without improving by `min_delta`.

With `index.recent_items` > 0 the recall is that of what is served: the towers' top-K merged
with each user's recent items boosted by b (raycg.model.recent_boost). b is fitted here each
epoch (the best validation recall over `boost_grid`, which holds b = 0), unless
`index.recent_boost` fixes it; the best epoch's b is saved with its checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch

from raycg.data.lookup import find_sorted
from raycg.data.schema import find_problems, event_columns
from raycg.eval.queries import TASKS, build_queries, drop_cold_positives, sample_queries
from raycg.eval.recall import recall_from_flat_ranks, recall_at_k, torch_top_k
from raycg.model.recent_boost import boosted_ranks, boost_grid, distinct_recent, recent_scores, rows_of


@dataclass
class ValidationSet:
    """What rank 0 needs to score the validation window: the packed item corpus, and per
    task the packed query features and each query's positive item ids."""

    item_ids: np.ndarray
    items: dict  # item_cat, item_dense
    queries: dict = field(default_factory=dict)  # task -> (packed user inputs, positives)
    recent: dict = field(default_factory=dict)  # task -> [Q, N] rows of each query's recent items (-1: none)
    rows: int = 0  # checked events of the validation window
    sampled_from: dict = field(default_factory=dict)  # task -> its query count before max_queries

    @classmethod
    def build(cls, train_files: list[str], store, before_ts: int, known_items: np.ndarray | None = None,
              max_queries: int | None = None, seed: int = 0, recent_items: int = 0, history=None) -> "ValidationSet":
        """Events of the training split at/after `before_ts` -> queries. Rows that break a rule are
        left out here: the training pass saw every row and failed on them or quarantined them.
        `known_items`: keep only positives on these items (eval.cold_items; drop_cold_positives).
        `max_queries`: at most that many queries per task, a sample fixed by `seed` (the same
        queries every epoch, so epochs are compared on one set)."""
        names = [c.name for c in event_columns(pads.dataset(train_files[0], format="parquet").schema.names)]
        table = pads.dataset(train_files, format="parquet").to_table(
            columns=names, filter=pc.field("timestamp") >= before_ts)
        bad = np.zeros(table.num_rows, bool)
        for p in find_problems(table, event_columns(table.column_names)):
            bad |= p.mask
        ids = table.column("item_id").fill_null(-1).to_numpy().astype(np.int64)
        bad |= ~find_sorted(store.items.item_id, ids)[1]
        table = table.filter(pa.array(~bad))
        out = cls(item_ids=store.items.item_id, items=store.items.pack(), rows=table.num_rows)
        for task in TASKS:
            queries, positives = build_queries(table, task)
            if known_items is not None:
                queries, positives, _ = drop_cold_positives(queries, positives, known_items)
            if max_queries is not None and len(positives) > max_queries:
                out.sampled_from[task] = len(positives)
            queries, positives = sample_queries(queries, positives, max_queries, seed)
            if positives:
                out.queries[task] = (store.pack_users(queries), positives)
                if recent_items > 0:
                    users = queries.column("user_id").to_numpy().astype(np.int64)
                    times = queries.column("timestamp").to_numpy().astype(np.int64)
                    ids = distinct_recent(history.lookup(users, times, recent_items)[0])
                    out.recent[task] = rows_of(ids, out.item_ids)
        return out

    def describe(self) -> str:
        return ", ".join(f"{task} {len(p):,} queries" + (f" (a sample of {self.sampled_from[task]:,}: "
                                                         "trainer.early_stopping.max_queries)"
                                                         if task in self.sampled_from else "")
                         for task, (_, p) in self.queries.items())


def _embed(fn, arrays: dict, device: torch.device, chunk: int = 65536) -> torch.Tensor:
    n = len(next(iter(arrays.values())))
    parts = []
    for s in range(0, n, chunk):
        # np.array copies: the arrays may be read-only views of Ray's object store, which torch warns about
        batch = {k: torch.from_numpy(np.array(v[s:s + chunk])).to(device) for k, v in arrays.items()}
        parts.append(fn(batch).float())
    return torch.cat(parts)


@torch.no_grad()
def validation_recall(core, vset: ValidationSet, device: torch.device, ks: list[int], autocast,
                      boost: float | None = None) -> dict:
    """{"val_<task>_recall@<k>": recall} of the current model on the validation window, and
    their mean, "val_mean_recall" (steadier than any one of them on a small window).

    With recent items in `vset`: the recall of the towers merged with the boosted recent items,
    at `boost`, or (None) at the boost of `boost_grid` with the best mean, reported as
    "val_recent_boost" (ties: the smaller boost); "val_towers_mean_recall" is the towers' alone
    (b = 0). Each boost costs a few searchsorted calls on the positives (`boosted_ranks`)."""
    was_training = core.training
    core.eval()
    K = max(ks)
    lists = {}  # task -> (top rows, top scores, recent rows, recent scores)
    try:
        with autocast:
            items = _embed(core.embed_items, vset.items, device)
            for task, (packed, _) in vset.queries.items():
                queries = _embed(core.embed_users, packed, device)
                if task not in vset.recent:
                    lists[task] = (torch_top_k(items, queries, K, device=device),)
                    continue
                rows, scores = torch_top_k(items, queries, K, device=device, with_scores=True)
                recent = torch.from_numpy(vset.recent[task]).to(device)
                lists[task] = (torch.from_numpy(rows).to(device), scores, recent, recent_scores(queries, items, recent))
    finally:
        core.train(was_training)
    if not vset.recent:
        return _recall_table(vset, {task: top for task, (top,) in lists.items()}, ks)
    grid = [0.0, float(boost)] if boost is not None else boost_grid(
        torch.cat([v[1] for v in lists.values()]), torch.cat([v[3] for v in lists.values()]))
    ranks = {}  # task -> (per boost [Q, M] ranks of the positives, positives mask [Q, M], lengths [Q])
    for task, (top, top_s, rec, rec_s) in lists.items():
        positives = vset.queries[task][1]
        lengths = np.array([len(p) for p in positives], dtype=np.int64)
        mask = np.arange(lengths.max()) < lengths[:, None]
        padded = np.full(mask.shape, -1, dtype=np.int64)
        padded[mask] = np.concatenate(positives)
        targets = torch.from_numpy(rows_of(padded, vset.item_ids)).to(device)
        ranks[task] = ([r.cpu().numpy() for r in boosted_ranks(top, top_s, rec, rec_s, targets, grid)], mask, lengths)
    table = []
    for i, b in enumerate(grid):
        out = {}
        for task, (per_boost, mask, lengths) in ranks.items():
            flat = per_boost[i][mask]
            for k in ks:
                out[f"val_{task}_recall@{k}"] = float(recall_from_flat_ranks(flat, lengths, k).mean())
        out["val_mean_recall"] = sum(out.values()) / len(out)
        table.append((b, out))
    towers = table[0][1]["val_mean_recall"]  # b = 0 comes first
    b, out = (table[1] if boost is not None else
              max(table, key=lambda entry: entry[1]["val_mean_recall"]))  # max keeps the first of equals
    return {**out, "val_towers_mean_recall": towers, "val_recent_boost": b}


def _recall_table(vset: ValidationSet, top_rows: dict, ks: list[int]) -> dict:
    out = {}
    for task, rows in top_rows.items():
        for k, value in recall_at_k(vset.item_ids[rows], vset.queries[task][1], ks).items():
            out[f"val_{task}_recall@{k}"] = value
    if out:
        out["val_mean_recall"] = sum(out.values()) / len(out)
    return out


@dataclass
class EarlyStopping:
    """Best value of `metric` (higher is better) so far, its epoch, and epochs since it improved."""

    metric: str
    patience: int
    min_delta: float = 0.0
    best: float = float("-inf")
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, epoch: int, metrics: dict) -> bool:
        """Record an epoch; True if it is the new best."""
        if self.metric not in metrics:
            raise KeyError(f"trainer.early_stopping.metric={self.metric!r} is not measured; "
                           f"validation reports {sorted(k for k in metrics if k.startswith('val_'))}")
        value = metrics[self.metric]
        if value > self.best + self.min_delta or self.best_epoch < 0:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
