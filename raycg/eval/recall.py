"""Exact top-K retrieval (faiss on CPU, torch on GPU) and recall@K.

recall@K for one query with held-out positive items P and retrieved list R_K:

    recall@K = |P ∩ R_K| / |P|

averaged over queries. Example:
    >>> recall_at_k([[1, 2, 3]], [np.array([3, 9])], ks=[2, 3])
    {2: 0.0, 3: 0.5}
"""
from __future__ import annotations

import time

import numpy as np
import torch


def exact_top_k(item_emb: np.ndarray, query_emb: np.ndarray, k: int, batch_size: int = 4096,
                threads: int | None = None, device: str = "cpu", with_scores: bool = False) -> tuple:
    """Row indices [Q, k] of the k highest inner products over the full corpus; search seconds.
    `with_scores`: (rows, their inner products [Q, k] float32 (numpy), seconds).

    device "cpu": faiss `IndexFlatIP`; "cuda": `torch_top_k` on the GPU (same neighbours; faiss
    is not needed there).
    """
    k = min(k, item_emb.shape[0])
    if torch.device(device).type == "cuda":
        t0 = time.perf_counter()
        if not with_scores:
            return torch_top_k(item_emb, query_emb, k, device=device), time.perf_counter() - t0
        rows, scores = torch_top_k(item_emb, query_emb, k, device=device, with_scores=True)
        return rows, scores.cpu().numpy(), time.perf_counter() - t0
    import faiss  # CPU path only: GPU machines may not have faiss

    if threads:
        faiss.omp_set_num_threads(int(threads))
    item_emb = np.ascontiguousarray(item_emb, dtype=np.float32)
    index = faiss.IndexFlatIP(item_emb.shape[1])
    t0 = time.perf_counter()
    index.add(item_emb)
    out = np.empty((len(query_emb), k), dtype=np.int64)
    scores = np.empty((len(query_emb), k), dtype=np.float32)
    for s in range(0, len(query_emb), batch_size):
        q = np.ascontiguousarray(query_emb[s:s + batch_size], dtype=np.float32)
        scores[s:s + batch_size], out[s:s + batch_size] = index.search(q, k)
    return (out, scores, time.perf_counter() - t0) if with_scores else (out, time.perf_counter() - t0)


def _as_device_tensor(x, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)


def torch_top_k(item_emb, query_emb, k: int, device: str = "cuda",
                block_elements: int = 1 << 28, with_scores: bool = False):
    """Exact top-k by inner product with torch: chunked matrix product + `topk`, row indices [Q, k]
    (`with_scores`: and their inner products, a float32 tensor [Q, k] on `device`).

    Scores are fp32 in blocks of at most `block_elements` (queries x items, 1 GiB by default);
    a query block that needs several item blocks merges their top-k lists (the top-k of the
    union of per-block top-k lists is the global top-k).
    """
    device = torch.device(device)
    n = item_emb.shape[0]
    k = min(k, n)
    items = _as_device_tensor(item_emb, device)  # numpy arrays or tensors (e.g. already on the GPU)
    q_block = max(1, min(len(query_emb), block_elements // max(n, 1)))
    i_block = max(k, min(n, block_elements // q_block))
    out = np.empty((len(query_emb), k), dtype=np.int64)
    values = torch.empty((len(query_emb), k), dtype=torch.float32, device=device) if with_scores else None
    with torch.no_grad():
        for s in range(0, len(query_emb), q_block):
            q = _as_device_tensor(query_emb[s:s + q_block], device)
            best_v = best_i = None
            for j in range(0, n, i_block):
                v, i = torch.topk(q @ items[j:j + i_block].T, min(k, min(n, j + i_block) - j), dim=1)
                i += j
                if best_v is not None:
                    v, pick = torch.topk(torch.cat([best_v, v], dim=1), k, dim=1)
                    i = torch.gather(torch.cat([best_i, i], dim=1), 1, pick)
                best_v, best_i = v, i
            out[s:s + len(q)] = best_i.cpu().numpy()
            if with_scores:
                values[s:s + len(q)] = best_v
    return (out, values) if with_scores else out


def flat_positive_ranks(top: np.ndarray, positives: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(ranks, lengths): the 0-based rank of every positive in its query's list `top[i]` ([Q, K]
    ids; K if absent), all queries' positives in one flat array, and each query's count.

    Vectorised (no per-query loop): pass j compares the j-th positive of every query that has
    one with its row, in chunks of rows; pass 0 reads `top` in place. A positive listed twice
    in a row counts at its first rank. One pass serves every k <= K.
    """
    top = np.asarray(top)
    K = top.shape[1] if top.ndim == 2 else 0
    lengths = np.fromiter((len(p) for p in positives), dtype=np.int64, count=len(positives))
    if lengths.sum() == 0:
        return np.zeros(0, dtype=np.int64), lengths
    flat = np.concatenate([np.asarray(p).ravel() for p in positives])
    ranks = np.full(len(flat), K, dtype=np.int64)
    if K == 0:
        return ranks, lengths
    if top.strides[0] == 0:  # one list for every query (np.broadcast_to, e.g. global popularity)
        return _ranks_in_one_list(top[0], flat), lengths
    starts = np.cumsum(lengths) - lengths
    chunk = max(1, (1 << 24) // K)  # ~16M comparisons (16 MB of booleans) at a time
    for j in range(int(lengths.max())):
        q = np.flatnonzero(lengths > j)
        at = starts[q] + j
        for s in range(0, len(q), chunk):
            rows = top[s:s + chunk] if j == 0 else top[q[s:s + chunk]]  # pass 0: every query, a view
            want = flat[at[s:s + chunk]]
            first = (rows == want[:, None]).argmax(axis=1)  # 0 where absent too: checked below
            ranks[at[s:s + chunk]] = np.where(rows[np.arange(len(rows)), first] == want, first, K)
    return ranks, lengths


def _ranks_in_one_list(row: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """0-based first position of each id in `row`, len(row) where absent."""
    order = np.argsort(row, kind="stable")  # stable: equal ids keep their first position first
    sorted_row = row[order]
    pos = np.searchsorted(sorted_row, ids).clip(0, max(len(row) - 1, 0))
    found = sorted_row[pos] == ids if len(row) else np.zeros(len(ids), bool)
    return np.where(found, order[pos], len(row)).astype(np.int64)


def shared_positive_ranks(lists: np.ndarray, list_of_query: np.ndarray, positives: list[np.ndarray],
                          ) -> tuple[np.ndarray, np.ndarray]:
    """`flat_positive_ranks` where query q's list is `lists[list_of_query[q]]` ([R, K] ids, R small:
    one popularity list per surface, say): a lookup per positive, no [Q, K] comparison."""
    lengths = np.fromiter((len(p) for p in positives), dtype=np.int64, count=len(positives))
    K = lists.shape[1]
    if lengths.sum() == 0:
        return np.zeros(0, dtype=np.int64), lengths
    flat = np.concatenate([np.asarray(p).ravel() for p in positives])
    which = np.repeat(np.asarray(list_of_query), lengths)
    ranks = np.full(len(flat), K, dtype=np.int64)
    for r in np.unique(which):
        at = which == r
        ranks[at] = _ranks_in_one_list(lists[r], flat[at])
    return ranks, lengths


def positive_ranks(top: np.ndarray, positives: list[np.ndarray]) -> list[np.ndarray]:
    """0-based rank of each positive in its query's list `top[i]` ([Q, K] ids); K if absent."""
    ranks, lengths = flat_positive_ranks(top, positives)
    return np.split(ranks, np.cumsum(lengths)[:-1]) if len(lengths) else []


def recall_from_flat_ranks(ranks: np.ndarray, lengths: np.ndarray, k: int) -> np.ndarray:
    """recall@k of each query from its positives' 0-based ranks (`flat_positive_ranks` layout:
    every query's positives in one flat array, `lengths[q]` of them for query q)."""
    if len(lengths) == 0:
        return np.zeros(0)
    if (lengths == 0).any():
        raise ValueError(f"recall: query {int(np.argmax(lengths == 0))} has no positives")
    hits = np.add.reduceat((ranks < k).astype(np.float64), np.cumsum(lengths) - lengths)
    return hits / lengths


def per_query_recall(top: np.ndarray, positives: list[np.ndarray], k: int) -> np.ndarray:
    """recall@k of each query; `top` [Q, >=k] ids, positives a list of id arrays."""
    return recall_from_flat_ranks(*flat_positive_ranks(np.asarray(top)[:, :k], positives), k)


def recall_at_k(top, positives: list[np.ndarray], ks) -> dict[int, float]:
    top = np.asarray(top)
    if len(positives) == 0:
        return {int(k): float("nan") for k in ks}
    return {int(k): float(per_query_recall(top, positives, k).mean()) for k in ks}


def bootstrap_cis(values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> list[tuple[float, float]]:
    """Percentile bootstrap intervals of the mean of each row of `values` ([n, Q] per-query
    values, e.g. recall at each K), resampling queries: one draw serves every row.

    Recall takes few distinct values (0, 1/2, 1, ...), so queries fall into C classes of equal
    value columns. Resampling Q queries with replacement draws each class Multinomial(Q, n_c / Q)
    times: the same distribution as drawing indices, at C instead of Q numbers per replicate
    (100k queries: ~10 classes). Index draws serve the case of many classes.
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    Q = values.shape[1]
    if Q == 0:
        return [(float("nan"), float("nan"))] * len(values)
    rng = np.random.default_rng(seed)
    classes, inverse = _distinct_columns(values)  # [C, n] distinct columns
    if len(classes) * 4 <= Q:
        counts = rng.multinomial(Q, np.bincount(inverse.ravel(), minlength=len(classes)) / Q, size=n_boot)
        means = (counts @ classes).T / Q  # [n, n_boot]
    else:
        means = np.empty((len(values), n_boot))
        for b in range(0, n_boot, 100):  # chunks keep memory at 100 x Q indices
            idx = rng.integers(0, Q, size=(min(100, n_boot - b), Q))
            for row, v in enumerate(values):
                means[row, b:b + len(idx)] = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2], axis=1)
    return [(float(a), float(b)) for a, b in zip(lo, hi)]


def _distinct_columns(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(values.T, axis=0, return_inverse=True)` by one lexsort of the columns (the
    axis=0 unique compares rows as raw bytes: ~20 ms per 100k queries, this ~5 ms)."""
    order = np.lexsort(values[::-1])  # the first row is the primary key, as in np.unique's order
    cols = values[:, order]
    new = np.ones(cols.shape[1], bool)
    new[1:] = (cols[:, 1:] != cols[:, :-1]).any(axis=0)
    inverse = np.empty(cols.shape[1], np.int64)
    inverse[order] = np.cumsum(new) - 1
    return cols[:, new].T, inverse


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-query values (resampling queries)."""
    return bootstrap_cis(np.asarray(values, dtype=np.float64)[None, :], n_boot, level, seed)[0]


def recall_report(top_ids: np.ndarray, positives: list[np.ndarray], ks, groups: np.ndarray | None = None,
                  n_boot: int = 1000) -> dict:
    """{k: {"mean", "ci95": [lo, hi], "by_group": {g: mean}}} from per-query recall@k."""
    return recall_report_from_ranks(*flat_positive_ranks(top_ids, positives), ks, groups, n_boot)


def recall_report_from_ranks(ranks: np.ndarray, lengths: np.ndarray, ks, groups: np.ndarray | None = None,
                             n_boot: int = 1000, group_names: list[str] | None = None) -> dict:
    """`recall_report` from `flat_positive_ranks` output: one ranking pass can feed several
    reports (e.g. a subset of queries or of positives, selected on the flat arrays).
    `group_names`: `groups` are already codes into it (saves a string sort per report)."""
    per_query = np.stack([recall_from_flat_ranks(ranks, lengths, k) for k in ks]) if len(ks) else np.zeros((0, 0))
    cis = bootstrap_cis(per_query, n_boot)
    if groups is not None:
        if group_names is None:
            names, group_of = np.unique(np.asarray(groups), return_inverse=True)
        else:
            group_of = np.asarray(groups, np.int64)
            present = np.bincount(group_of, minlength=len(group_names)) > 0
            names = np.asarray(group_names, dtype=object)[present]  # as np.unique: only groups with queries
            group_of = (np.cumsum(present) - 1)[group_of]
        size = np.bincount(group_of.ravel(), minlength=len(names))
    out = {}
    for i, k in enumerate(ks):
        entry = {"mean": float(per_query[i].mean()), "ci95": list(cis[i])}
        if groups is not None:
            sums = np.bincount(group_of.ravel(), weights=per_query[i], minlength=len(names))
            entry["by_group"] = {str(g): float(sums[j] / size[j]) for j, g in enumerate(names)}
        out[int(k)] = entry
    return out
