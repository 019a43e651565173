"""Exact top-K retrieval with faiss and recall@K.

recall@K for one query with held-out positive items P and retrieved list R_K:

    recall@K = |P ∩ R_K| / |P|

averaged over queries. Example:
    >>> recall_at_k([[1, 2, 3]], [np.array([3, 9])], ks=[2, 3])
    {2: 0.0, 3: 0.5}
"""
from __future__ import annotations

import time

import faiss
import numpy as np


def exact_top_k(item_emb: np.ndarray, query_emb: np.ndarray, k: int, batch_size: int = 4096,
                threads: int | None = None) -> tuple[np.ndarray, float]:
    """Row indices [Q, k] of the k highest inner products over the full corpus; faiss seconds."""
    if threads:
        faiss.omp_set_num_threads(int(threads))
    item_emb = np.ascontiguousarray(item_emb, dtype=np.float32)
    index = faiss.IndexFlatIP(item_emb.shape[1])
    t0 = time.perf_counter()
    index.add(item_emb)
    k = min(k, item_emb.shape[0])
    out = np.empty((len(query_emb), k), dtype=np.int64)
    for s in range(0, len(query_emb), batch_size):
        q = np.ascontiguousarray(query_emb[s:s + batch_size], dtype=np.float32)
        _, out[s:s + batch_size] = index.search(q, k)
    return out, time.perf_counter() - t0


def per_query_recall(top: np.ndarray, positives: list[np.ndarray], k: int) -> np.ndarray:
    """recall@k of each query; `top` [Q, >=k] ids, positives a list of id arrays."""
    out = np.empty(len(positives), dtype=np.float64)
    for i, pos in enumerate(positives):
        out[i] = np.isin(pos, top[i, :k]).mean()
    return out


def recall_at_k(top, positives: list[np.ndarray], ks) -> dict[int, float]:
    top = np.asarray(top)
    if len(positives) == 0:
        return {int(k): float("nan") for k in ks}
    return {int(k): float(per_query_recall(top, positives, k).mean()) for k in ks}
