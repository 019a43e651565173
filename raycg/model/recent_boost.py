"""Recent-item boost: the items a user acted on just before the request score `b` higher.

    score(u, i) = <user(u), item(i)> + b * [i in R(u)]

R(u) is the set of distinct items among u's last N actions (click, save, add_to_cart,
checkout) strictly before the request (`index.recent_items` = N; in serving, the request's
`recent_item_ids`). b >= 0 (`index.recent_boost`) is one number per model, fitted on the
validation window by default (`fit_boost`: the b with the best validation recall among a
grid that includes b = 0, the towers alone) and saved with the checkpoint.

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

GAP_RANKS = (2, 5, 10, 20, 50, 100, 200, 500, 1000)  # fit_boost's grid: median score gaps at these ranks


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


def merge_recent(top_rows, top_scores, rows, scores, boost: float, k: int | None = None,
                 pair_chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of `score` above from the towers' top-K (`top_rows`, `top_scores`) and the
    recent items (`rows`, `scores`: distinct per query, -1 padding). Returns (rows [Q, k],
    scores [Q, k]) best first; a recent item's score includes `boost`. k defaults to K.
    Arrays or tensors; tensors come back."""
    top_rows, top_scores = torch.as_tensor(top_rows), torch.as_tensor(top_scores).float()
    rows, scores = torch.as_tensor(rows), torch.as_tensor(scores).float()
    k = top_rows.shape[1] if k is None else min(k, top_rows.shape[1])
    if rows.shape[1] == 0 or top_rows.shape[0] == 0:
        return top_rows[:, :k], top_scores[:, :k]
    # a recent item already among the top-K leaves that list (it comes back boosted). Only items
    # scoring about the K-th score or more can be there; the tolerance covers the two ways of
    # computing the same product (index search, gathered dot product)
    kth = top_scores[:, -1:]
    maybe = (rows >= 0) & (scores >= kth - 1e-4 * kth.abs().clamp(min=1.0))
    q_idx, n_idx = maybe.nonzero(as_tuple=True)
    top_scores = top_scores.clone()
    for s in range(0, len(q_idx), pair_chunk):
        q, n = q_idx[s:s + pair_chunk], n_idx[s:s + pair_chunk]
        same = top_rows[q] == rows[q, n][:, None]  # [P, K]
        hit = same.any(dim=1)
        top_scores[q[hit], same[hit].int().argmax(dim=1)] = float("-inf")
    cand_scores = torch.cat([top_scores, (scores + float(boost)).masked_fill(rows < 0, float("-inf"))], dim=1)
    best, pick = torch.topk(cand_scores, k, dim=1)
    return torch.gather(torch.cat([top_rows, rows], dim=1), 1, pick), best


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
