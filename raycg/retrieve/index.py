"""The item index: faiss over the item embeddings, exact for small corpora, approximate above
`index.exact_max_items`, with its recall against exact search measured on real queries.

    n_items <= exact_max_items   IndexFlatIP                      (exact; recall 1)
    index.kind = ivf             IndexIVFFlat, inner product, nlist lists (null: 4 sqrt(N)),
                                 searching nprobe of them
    index.kind = hnsw            IndexHNSWFlat, inner product, M = hnsw_m, efSearch = ef_search

recall@k of the index = mean over queries of |index top-k ∩ exact top-k| / k (exact =
IndexFlatIP over the same vectors), written to index.json next to the index file.
"""
from __future__ import annotations

import math
import time

import numpy as np

KINDS = ("ivf", "hnsw")
NEW_USERS = ("model", "popularity")  # what a request with nothing personal gets (FeatureStore.new_users)
KEYS = ("exact_max_items", "kind", "nlist", "nprobe", "hnsw_m", "ef_search", "recall_k", "recall_queries", "batch_size",
        "new_users", "recent_items", "recent_boost")


def settings(cfg: dict) -> dict:
    """The `index.*` keys (raycg/conf/config.yaml; a checkpoint of an older raycg gets them from
    raycg.model.checkpoint.LEGACY_KEYS): every key given, no unknown one, a known kind."""
    cfg = dict(cfg)
    unknown, missing = set(cfg) - set(KEYS), [k for k in KEYS if k not in cfg]
    if unknown:
        raise ValueError(f"index: unknown key(s) {sorted(unknown)}; known: {sorted(KEYS)}")
    if missing:
        raise ValueError(f"index: missing key(s) {missing}")
    if cfg["kind"] not in KINDS:
        raise ValueError(f"index.kind={cfg['kind']!r}: expected one of {list(KINDS)}")
    if cfg["new_users"] not in NEW_USERS:
        raise ValueError(f"index.new_users={cfg['new_users']!r}: expected one of {list(NEW_USERS)}")
    if int(cfg["recent_items"]) < 0:
        raise ValueError(f"index.recent_items={cfg['recent_items']}: expected 0 (off) or a positive number of actions")
    if cfg["recent_boost"] is not None and not float(cfg["recent_boost"]) >= 0:
        raise ValueError(f"index.recent_boost={cfg['recent_boost']}: expected null (fitted on the validation window) "
                         "or a boost >= 0")
    return cfg


def build_index(emb: np.ndarray, cfg: dict):
    """(faiss index over the rows of `emb` [N, d], description for index.json)."""
    import faiss

    cfg = settings(cfg)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    t0 = time.perf_counter()
    if n <= cfg["exact_max_items"]:
        index, desc = faiss.IndexFlatIP(d), {"kind": "flat", "exact": True}
    elif cfg["kind"] == "ivf":
        nlist = int(cfg["nlist"] or max(1, round(4 * math.sqrt(n))))
        nlist = min(nlist, n)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)  # train on at most 256 vectors per list
        sample = emb[rng.choice(n, min(n, 256 * nlist), replace=False)] if n > 256 * nlist else emb
        index.train(sample)
        index.nprobe = min(int(cfg["nprobe"]), nlist)
        desc = {"kind": "ivf", "exact": False, "nlist": nlist, "nprobe": int(index.nprobe)}
    else:
        index = faiss.IndexHNSWFlat(d, int(cfg["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = int(cfg["ef_search"])
        desc = {"kind": "hnsw", "exact": False, "hnsw_m": int(cfg["hnsw_m"]), "ef_search": int(cfg["ef_search"])}
    index.add(emb)
    desc.update(n_items=int(n), dim=int(d), exact_max_items=int(cfg["exact_max_items"]),
                build_s=round(time.perf_counter() - t0, 3))
    return index, desc


def search(index, queries: np.ndarray, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(rows [Q, k], scores [Q, k]) of the k best items of each query; k <= index size."""
    k = min(int(k), index.ntotal)
    rows = np.empty((len(queries), k), dtype=np.int64)
    scores = np.empty((len(queries), k), dtype=np.float32)
    for s in range(0, len(queries), batch_size):
        q = np.ascontiguousarray(queries[s:s + batch_size], dtype=np.float32)
        scores[s:s + len(q)], rows[s:s + len(q)] = index.search(q, k)
    return rows, scores


def index_recall(index, emb: np.ndarray, queries: np.ndarray, k: int) -> float:
    """mean |index top-k ∩ exact top-k| / k over `queries` (exact: IndexFlatIP over `emb`)."""
    import faiss

    if len(queries) == 0:
        return float("nan")
    k = min(int(k), len(emb))
    exact = faiss.IndexFlatIP(emb.shape[1])
    exact.add(np.ascontiguousarray(emb, dtype=np.float32))
    want, _ = search(exact, queries, k)
    got, _ = search(index, queries, k)
    hits = [len(np.intersect1d(a, b[b >= 0])) for a, b in zip(want, got)]
    return float(np.mean(hits) / k)
