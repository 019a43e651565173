"""Stable hashing for converted logs: ids for strings (users, items, brands) and fixed random
directions per value (the proxy content vectors of `raycg.data.logmap`'s `content` key).

Process- and platform-independent (blake2b), so converting two files of one log separately
gives the same ids and vectors.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa

_INT63 = (1 << 63) - 1


def stable_hash(text: str) -> int:
    """A process- and platform-independent 64-bit hash (blake2b), as a Python int."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def hashed_id(salt: str, value: str) -> int:
    """1 + blake2b64("<salt>|<value>") mod (2^63 - 1): a positive int64 id for a string,
    stable across files and runs (0 stays free for "unknown")."""
    return 1 + stable_hash(f"{salt}|{value}") % _INT63


def _proxy_vectors(field: str, values, dim: int) -> dict:
    """One fixed random Gaussian direction per distinct value (= a random projection of the
    one-hot encoding), seeded by a stable hash of (field, value)."""
    out = {}
    for v in values:
        rng = np.random.default_rng(stable_hash(f"{field}|{v}"))
        out[v] = rng.standard_normal(dim) / math.sqrt(dim)
    return out


def add_proxy_field(emb: np.ndarray, field: str, values: np.ndarray, present: np.ndarray,
                    weight: float | np.ndarray = 1.0) -> None:
    """emb[i] += weight * direction(field, values[i]) for rows where present[i]."""
    idx = np.flatnonzero(present)
    if not len(idx):
        return
    uniq, inv = np.unique(values[idx], return_inverse=True)
    vecs = _proxy_vectors(field, uniq.tolist(), emb.shape[1])
    table = np.stack([vecs[u] for u in uniq.tolist()])
    w = weight[idx, None] if isinstance(weight, np.ndarray) else weight
    emb[idx] += w * table[inv.reshape(-1)]


def unit_rows(emb: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    return (emb / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def emb_column(emb: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float32).ravel()), emb.shape[1])


def price_bucket(price: np.ndarray) -> np.ndarray:
    """Half-octave buckets: floor(2 * log2(1 + x))."""
    return np.floor(2.0 * np.log2(1.0 + np.maximum(price, 0.0))).astype(np.int64)
