"""Where ids sit in a sorted id table: the one searchsorted + clip + hit-mask lookup.

    pos, hit = find_sorted(table, ids)        # numpy
    pos, hit = find_sorted_torch(table, ids)  # torch tensors (the model's id vocabularies)

`table` is sorted ascending (and unique, for `pos` to be the one match). `hit[i]` says
whether `ids[i]` is in the table; where it is, `table[pos[i]] == ids[i]`. Elsewhere `pos[i]` is
a valid index of the table (the insertion point clipped to the last row), or 0 for an empty
table, so `values[pos]` never raises and only `values[pos[hit]]` means anything.

Example: table [10, 20, 30], ids [20, 5, 25, 99] -> pos [1, 0, 2, 2], hit [T, F, F, F].
"""
from __future__ import annotations

import numpy as np


def find_sorted(table: np.ndarray, ids) -> tuple[np.ndarray, np.ndarray]:
    """(position, found) of each id in the ascending array `table`; see the module docstring."""
    ids = np.asarray(ids)
    if len(table) == 0:
        return np.zeros(ids.shape, np.intp), np.zeros(ids.shape, bool)
    pos = np.searchsorted(table, ids).clip(0, len(table) - 1)
    return pos, table[pos] == ids


def find_sorted_torch(table, ids):
    """`find_sorted` for torch tensors (on the ids' device; traceable and compilable)."""
    import torch  # here: the rest of raycg.data does not need torch

    if table.numel() == 0:
        return torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    pos = torch.searchsorted(table, ids.contiguous()).clamp_(max=table.numel() - 1)
    return pos, table[pos] == ids
