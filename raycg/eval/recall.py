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
                threads: int | None = None, device: str = "cpu") -> tuple[np.ndarray, float]:
    """Row indices [Q, k] of the k highest inner products over the full corpus; search seconds.

    device "cpu": faiss `IndexFlatIP`; "cuda": `torch_top_k` on the GPU (same neighbours; faiss
    is not needed there).
    """
    k = min(k, item_emb.shape[0])
    if torch.device(device).type == "cuda":
        t0 = time.perf_counter()
        return torch_top_k(item_emb, query_emb, k, device=device), time.perf_counter() - t0
    import faiss  # CPU path only: GPU machines may not have faiss

    if threads:
        faiss.omp_set_num_threads(int(threads))
    item_emb = np.ascontiguousarray(item_emb, dtype=np.float32)
    index = faiss.IndexFlatIP(item_emb.shape[1])
    t0 = time.perf_counter()
    index.add(item_emb)
    out = np.empty((len(query_emb), k), dtype=np.int64)
    for s in range(0, len(query_emb), batch_size):
        q = np.ascontiguousarray(query_emb[s:s + batch_size], dtype=np.float32)
        _, out[s:s + batch_size] = index.search(q, k)
    return out, time.perf_counter() - t0


def _as_device_tensor(x, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)


def torch_top_k(item_emb, query_emb, k: int, device: str = "cuda",
                block_elements: int = 1 << 28) -> np.ndarray:
    """Exact top-k by inner product with torch: chunked matrix product + `topk`, row indices [Q, k].

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
    return out


def positive_ranks(top: np.ndarray, positives: list[np.ndarray]) -> list[np.ndarray]:
    """0-based rank of each positive in its query's list `top[i]` ([Q, K] ids); K if absent.

    One pass serves every k <= K: a positive is a hit at k when its rank < k.
    """
    top = np.asarray(top)
    K = top.shape[1] if top.ndim == 2 else 0
    out = []
    for i, pos in enumerate(positives):
        eq = top[i][None, :] == np.asarray(pos)[:, None]  # [P, K]
        out.append(np.where(eq.any(axis=1), eq.argmax(axis=1), K))
    return out


def _recall_from_ranks(ranks: list[np.ndarray], k: int) -> np.ndarray:
    lengths = np.array([len(r) for r in ranks], dtype=np.int64)
    if len(ranks) == 0:
        return np.zeros(0)
    if (lengths == 0).any():
        raise ValueError(f"recall: query {int(np.argmax(lengths == 0))} has no positives")
    hits = np.add.reduceat((np.concatenate(ranks) < k).astype(np.float64), np.cumsum(lengths) - lengths)
    return hits / lengths


def per_query_recall(top: np.ndarray, positives: list[np.ndarray], k: int) -> np.ndarray:
    """recall@k of each query; `top` [Q, >=k] ids, positives a list of id arrays."""
    return _recall_from_ranks(positive_ranks(np.asarray(top)[:, :k], positives), k)


def recall_at_k(top, positives: list[np.ndarray], ks) -> dict[int, float]:
    top = np.asarray(top)
    if len(positives) == 0:
        return {int(k): float("nan") for k in ks}
    return {int(k): float(per_query_recall(top, positives, k).mean()) for k in ks}


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-query values (resampling queries)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for b in range(0, n_boot, 100):  # chunks keep memory at 100 x Q indices
        idx = rng.integers(0, len(values), size=(min(100, n_boot - b), len(values)))
        means[b:b + len(idx)] = values[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def recall_report(top_ids: np.ndarray, positives: list[np.ndarray], ks, groups: np.ndarray | None = None,
                  n_boot: int = 1000) -> dict:
    """{k: {"mean", "ci95": [lo, hi], "by_group": {g: mean}}} from per-query recall@k."""
    out = {}
    ranks = positive_ranks(top_ids, positives)
    for k in ks:
        per_query = _recall_from_ranks(ranks, k)
        entry = {"mean": float(per_query.mean()), "ci95": list(bootstrap_ci(per_query, n_boot))}
        if groups is not None:
            entry["by_group"] = {str(g): float(per_query[groups == g].mean()) for g in np.unique(groups)}
        out[int(k)] = entry
    return out
