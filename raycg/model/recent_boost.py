"""Recent-item boost: the items a user acted on just before the request score `b` higher.

    score(u, i) = <user(u), item(i)> + b * [i in R(u)]

R(u) is the set of distinct items among u's last N actions (click, save, add_to_cart,
checkout) strictly before the request (`index.recent_items` = N; in serving, the request's
`recent_item_ids`). b >= 0 (`index.recent_boost`) is one number per model, fitted on the
validation window by default (raycg.train.validation: the b with the best validation recall
among `boost_grid`, which includes b = 0, the towers alone) and saved with the checkpoint.

Why not in the towers: on real logs most conversions repeat an item the user clicked before
(63% on the Tmall sample, 100% on Taobao's), and the re-engagement baseline beat every
two-tower variant there. Codes in the user vector (raycg.model.repeat_match) carried that
signal at the cost of noise on novel items and 128 more served columns; this rule is exact
and costs no column.

Only R(u)'s scores change, so the top-K of `score` is the top-K of a short merge: the towers'
top-K (from the item index, unchanged) and R(u) with boosted scores (`merge_recent`). A request
costs N extra dot products.

Shapes: top rows / scores [Q, K] (best first), recent rows / scores [Q, N] (row -1: padding)
-> rows / scores [Q, k].

Example: towers' top-3 rows [5, 2, 9] with scores [0.9, 0.8, 0.7]; R = rows [7, 2] with
scores [0.5, 0.8]; b = 0.25. Candidates: 5: 0.9, 9: 0.7, 7: 0.75, 2: 1.05 -> [2, 5, 7].
"""
from __future__ import annotations

import numpy as np
import torch

GAP_RANKS = (2, 5, 10, 20, 50, 100, 200, 500, 1000)  # boost_grid: median score gaps at these ranks
CHUNK = 4096  # queries per block in drop_recent / merge_recent


def distinct_recent(items: np.ndarray) -> np.ndarray:
    """[Q, N] item ids of the last N actions, most recent last, -1 padded (HistoryIndex.lookup,
    raycg.retrieve.requests.recent_actions) -> [Q, N] the distinct ones, most recent first,
    every repeat and padding -1.

    >>> distinct_recent(np.array([[-1, 4, 7, 4], [3, 3, 3, 3]]))
    array([[ 4,  7, -1, -1],
           [ 3, -1, -1, -1]])
    """
    items = np.asarray(items, np.int64)[:, ::-1]
    order = np.argsort(items, axis=1, kind="stable")  # equal ids: the most recent first
    ranked = np.take_along_axis(items, order, axis=1)
    repeat = np.zeros_like(items, dtype=bool)
    np.put_along_axis(repeat, order[:, 1:], ranked[:, 1:] == ranked[:, :-1], axis=1)
    out = np.where(repeat | (items < 0), -1, items)
    # the kept ids first, in recency order (a stable sort on "is padding")
    return np.take_along_axis(out, np.argsort(out < 0, axis=1, kind="stable"), axis=1)


def rows_of(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Item ids -> their rows in `sorted_ids` (the corpus), -1 for padding and unknown items."""
    from raycg.data.lookup import find_sorted

    ids = np.asarray(ids, np.int64)
    at, found = find_sorted(sorted_ids, ids.reshape(-1))
    return np.where(found & (ids.reshape(-1) >= 0), at, -1).reshape(ids.shape)


def recent_scores(query_emb: torch.Tensor, item_emb: torch.Tensor, rows: torch.Tensor,
                  chunk: int = 8192) -> torch.Tensor:
    """[Q, N] inner products of each query [Q, E] with its recent items' embeddings (rows of
    `item_emb` [I, E]; padding: -inf), float32, on the queries' device."""
    rows = rows.to(query_emb.device)
    out = torch.empty(rows.shape, dtype=torch.float32, device=query_emb.device)
    for s in range(0, len(rows), chunk):  # [chunk, N, E] gathered at a time
        picked = item_emb[rows[s:s + chunk].clamp(min=0).to(item_emb.device)].to(query_emb.device, torch.float32)
        out[s:s + chunk] = torch.einsum("qe,qne->qn", query_emb[s:s + chunk].float(), picked)
    return out.masked_fill(rows < 0, float("-inf"))


def _find(sorted_keys: torch.Tensor, order: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row, where each of `values` ([Q, M] rows >= 0; -1 padding) sits in the unsorted list
    whose sort is (`sorted_keys`, `order`) ([Q, L]): its column there, or -1."""
    at = torch.searchsorted(sorted_keys.contiguous(), values.clamp(min=0).contiguous())
    at = at.clamp(max=max(sorted_keys.shape[1] - 1, 0))
    found = (torch.gather(sorted_keys, 1, at) == values) & (values >= 0)
    return torch.gather(order, 1, at).masked_fill(~found, -1)


def drop_recent(top_rows, top_scores, rows, scores=None, chunk: int = CHUNK) -> torch.Tensor:
    """`top_scores` with -inf where the towers' top-K already holds a recent item of the query
    (it comes back boosted in `merge_recent`). Independent of the boost: one pass serves a grid.
    Exact id matches: each query's list sorted by row once, the recent rows searched in it.
    With the recent items' `scores`, only queries with one scoring about the K-th score or
    more are searched (the tolerance covers the two ways of computing the same product)."""
    top_rows, top_scores = torch.as_tensor(top_rows), torch.as_tensor(top_scores).float()
    rows = torch.as_tensor(rows)
    out = top_scores.clone()
    K = top_rows.shape[1]
    todo = torch.arange(len(top_rows), device=top_rows.device)
    if scores is not None and K:
        kth = top_scores[:, -1:]
        could = (rows >= 0) & (torch.as_tensor(scores).float() >= kth - 1e-4 * kth.abs().clamp(min=1.0))
        todo = todo[could.any(dim=1)]
    for s in range(0, len(todo), chunk):  # blocks of queries: temporaries stay small
        q = todo[s:s + chunk]
        where = _find(*torch.sort(top_rows[q], dim=1), rows[q])
        block = torch.cat([out[q], out.new_zeros((len(q), 1))], dim=1)  # column K: "not there"
        out[q] = block.scatter_(1, where.masked_fill(where < 0, K), float("-inf"))[:, :K]
    return out


def boosted_ranks(top_rows, top_scores, rows, scores, targets, boosts: list[float]) -> list[torch.Tensor]:
    """Where each of `targets` ([Q, M] rows, -1 padding: e.g. a query's positives) would sit
    in `merge_recent`'s list at each boost: [Q, M] 0-based ranks, K + N for an item in neither
    list (and padding). A boost grid costs a few searchsorted calls per boost, no merge."""
    top_rows, top_scores = torch.as_tensor(top_rows), torch.as_tensor(top_scores).float()
    rows, scores, targets = torch.as_tensor(rows), torch.as_tensor(scores).float(), torch.as_tensor(targets)
    Q, K = top_rows.shape
    N = rows.shape[1]
    by_row, order = torch.sort(top_rows, dim=1)
    in_top, in_rec = _find(by_row, order, targets), _find(*torch.sort(rows, dim=1), targets)
    hole = torch.zeros((Q, K + 1), dtype=torch.bool, device=top_rows.device)
    where = _find(by_row, order, rows)
    hole = hole.scatter_(1, where.masked_fill(where < 0, K), True)[:, :K]
    kept_before = torch.cat([torch.zeros((Q, 1), dtype=torch.long, device=hole.device),
                             torch.cumsum(~hole, dim=1)], dim=1)
    valid = scores.masked_fill(rows < 0, float("-inf"))
    neg_top = (-top_scores).contiguous()
    neg_rec = (-torch.sort(valid, dim=1, descending=True).values).contiguous()
    s_rec = torch.gather(valid, 1, in_rec.clamp(min=0))
    s_top = torch.gather(top_scores, 1, in_top.clamp(min=0))
    rec_ahead = torch.searchsorted(neg_rec, (-s_rec).contiguous(), right=False)  # recent items scoring more
    top_kept = torch.gather(kept_before, 1, in_top.clamp(min=0))
    out = []
    for b in boosts:
        # a recent target: the recent items ahead of it + the kept top items scoring as much or more
        at_rec = rec_ahead + torch.gather(
            kept_before, 1, torch.searchsorted(neg_top, (-(s_rec + b)).contiguous(), right=True))
        # a top-list target: the kept top items before it + the recent items whose boosted score beats it
        at_top = top_kept + torch.searchsorted(neg_rec, (-(s_top - b)).contiguous(), right=False)
        out.append(torch.where(in_rec >= 0, at_rec, torch.where(in_top >= 0, at_top, torch.full_like(at_top, K + N))))
    return out


def merge_recent(top_rows, top_scores, rows, scores, boost: float, k: int | None = None,
                 dropped: torch.Tensor | None = None, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of `score` above from the towers' top-K (`top_rows`, `top_scores`, best first)
    and the recent items (`rows`, `scores`: distinct per query, -1 padding). Returns (rows [Q, k],
    scores [Q, k]) best first; a recent item's score includes `boost`; on equal scores the
    towers' item comes first. k defaults to K. `dropped`: `drop_recent` of these lists, when
    several boosts are tried on them. Arrays or tensors; tensors come back.

    A merge of two sorted lists (no top-k over K + N columns): each list item's place is its
    rank in its own list plus the number of the other list's items that beat it."""
    top_rows, top_scores = torch.as_tensor(top_rows), torch.as_tensor(top_scores).float()
    rows, scores = torch.as_tensor(rows), torch.as_tensor(scores).float()
    Q, K = top_rows.shape
    k = K if k is None else min(k, K)
    if rows.shape[1] == 0 or Q == 0:
        return top_rows[:, :k], top_scores[:, :k]
    if dropped is None:
        dropped = drop_recent(top_rows, top_scores, rows, scores, chunk=chunk)
    out_rows = torch.empty((Q, k), dtype=top_rows.dtype, device=top_rows.device)
    out_scores = torch.empty((Q, k), device=top_scores.device)
    for s in range(0, Q, chunk):  # blocks of queries: temporaries stay small
        sl = slice(s, s + chunk)
        out_rows[sl], out_scores[sl] = _merge_block(top_rows[sl], top_scores[sl], dropped[sl], rows[sl],
                                                    scores[sl], float(boost), k)
    return out_rows, out_scores


def _merge_block(top_rows, top_scores, dropped, rows, scores, boost: float, k: int):
    Q, K = top_rows.shape
    N = rows.shape[1]
    hole = torch.isneginf(dropped) & ~torch.isneginf(top_scores)  # a recent item: it comes back boosted
    kept_before = torch.zeros((Q, K + 1), dtype=torch.int64, device=hole.device)
    torch.cumsum(~hole, dim=1, out=kept_before[:, 1:])
    boosted = (scores + boost).masked_fill(rows < 0, float("-inf"))
    boosted, by_score = torch.sort(boosted, dim=1, descending=True)
    recent = torch.gather(rows, 1, by_score)
    neg_top, neg_rec = (-top_scores).contiguous(), (-boosted).contiguous()  # ascending
    # top item i: its rank among the kept ones (holes keep their score; kept_before skips them)
    # + the recent items scoring strictly more
    top_at = kept_before[:, :K] + torch.searchsorted(neg_rec, neg_top, right=False)
    # recent item j: j + the kept top items scoring as much or more
    ahead = torch.searchsorted(neg_top, neg_rec, right=True)
    rec_at = torch.arange(N, device=rows.device).expand(Q, N) + torch.gather(kept_before, 1, ahead)
    bin_ = K + N  # holes and padding go to a column that is cut off
    at = torch.cat([top_at.masked_fill_(hole, bin_), rec_at.masked_fill_(recent < 0, bin_)], dim=1)
    out_rows = torch.full((Q, K + N + 1), -1, dtype=top_rows.dtype, device=top_rows.device)
    out_scores = torch.full((Q, K + N + 1), float("-inf"), device=top_scores.device)
    out_rows.scatter_(1, at, torch.cat([top_rows, recent], dim=1))
    out_scores.scatter_(1, at, torch.cat([top_scores, boosted], dim=1))
    return out_rows[:, :k], out_scores[:, :k]


def boost_grid(top_scores: torch.Tensor, scores: torch.Tensor) -> list[float]:
    """Candidate boosts: 0 (the towers alone), the median gap between the best and the r-th
    score of the towers' lists (r in GAP_RANKS, up to K: a recent item scoring like the r-th
    candidate moves to about the top), and one that puts every recent item first."""
    top_scores, scores = top_scores.float(), scores.float()
    K = top_scores.shape[1]
    grid = {0.0}
    for r in GAP_RANKS:
        if r <= K:
            grid.add(float((top_scores[:, 0] - top_scores[:, r - 1]).median()))
    valid = torch.isfinite(scores)
    if valid.any():
        lowest = scores.masked_fill(~valid, float("inf")).min(dim=1).values
        gap = (top_scores[:, 0] - lowest)[torch.isfinite(lowest)]
        grid.add(float(gap.max().clamp(min=0)) + 1.0)
    return sorted(b for b in grid if b >= 0 and np.isfinite(b))
