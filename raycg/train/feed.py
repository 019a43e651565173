"""Training batches on the worker's device, from the worker's Ray Data shard.

Ray Data hands over `transfer_batches x batch_size` rows at a time (pinned host memory and
one non-blocking host-to-device copy per transfer on CUDA); the training batches are then
slices of that block on the device (views: no copy). Ray's per-batch work (block
resolution, concatenation, tensor formatting) runs in its background threads, in the same
process and under the same GIL as the training step, so it is paid once per transfer
instead of once per step.

    rows of one rank's shard ──Ray Data──> [T*B rows on device] ──slice──> B, B, ..., B

Only full batches are yielded; the rows left over at the end of the epoch (fewer than B) are
dropped, as `drop_last=True` would. Ray Train splits a dataset into equal shards
(`streaming_split(equal=True)`), so every rank runs the same number of steps, which DDP's
collectives need.

Example: 100,000 rows, B=8192, T=4 -> transfers of 32,768, 32,768, 32,768, 1,696 rows;
12 steps of 8,192 (98,304 rows); 1,696 rows dropped.
"""
from __future__ import annotations

from typing import Iterator

import torch


def device_batches(shard, batch_size: int, device: torch.device | str, transfer_batches: int = 1,
                   prefetch_transfers: int = 2) -> Iterator[dict[str, torch.Tensor]]:
    """Full training batches of `batch_size` rows on `device` from a Ray `DataIterator` (or a
    Dataset). `prefetch_transfers`: transfers Ray prepares ahead in its background threads."""
    if batch_size <= 0 or transfer_batches <= 0:
        raise ValueError(f"batch_size={batch_size} and transfer_batches={transfer_batches} must be > 0")
    device = torch.device(device)
    for block in shard.iter_torch_batches(
        batch_size=batch_size * transfer_batches, device=device, pin_memory=device.type == "cuda",
        prefetch_batches=prefetch_transfers, drop_last=False,
    ):
        n = len(next(iter(block.values())))
        for start in range(0, n - batch_size + 1, batch_size):
            yield {k: v[start:start + batch_size] for k, v in block.items()}


class ThreadFeed:
    """`device_batches` per epoch (the in-process counterpart of raycg.train.ingest.ProcessFeed)."""

    def __init__(self, shard, batch_size: int, device, transfer_batches: int = 1, prefetch_transfers: int = 2):
        self.args = (shard, batch_size, device, transfer_batches, prefetch_transfers)

    def epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        return device_batches(*self.args)

    def prefetch_epoch(self) -> None:
        pass  # Ray Data's iterator starts a pass when asked for its first batch

    def close(self) -> None:
        pass
