"""Ray Data ingest in its own process: a Ray actor beside the training worker fills
shared-memory slots; the worker only copies each filled slot to its device.

    worker's Ray Data shard ──(IngestActor: iter_batches, numpy)──> slot k of a shared-memory ring
    slot k ──(training worker: one host->device copy, page-locked on CUDA)──> batches (device slices)

Why a process. Ray Data's iterator fetches, deserialises and formats blocks in Python
threads of the process that consumes them. A GPU step of this model is launch-bound (host
work per step ~ GPU work per step), so those threads compete with the training thread for
the GIL. Measured with py-spy in a Ray Train worker on one H200 (default model, batch 8192,
the in-process iterator): the GIL was held 66% of the time, 45% of it by Ray's iterator threads
(block deserialisation, Arrow tensor extensions, locks), and the training step ran at 30% of
its speed on GPU-resident data. Here the worker's host work per transfer is one small Ray
call and one copy; everything else runs in the actor, under its own GIL.

Protocol (the actor runs its method calls in order, so slots come back in order):

    start_epoch() -> column layout      a new pass over the shard (every epoch)
    attach(path, layout, rows)          once: the ring file (np.memmap) the worker created
    fill(k) -> n rows (0: epoch over)   the next transfer of the epoch into slot k

The worker keeps every slot queued (`prefetch_transfers + 1` slots), consumes slot k and
queues it again once its copy has finished. `prefetch_epoch()` queues the next epoch's
start and its first fills as soon as an epoch's batches are consumed, so the next pass's first
transfer is produced while the worker validates and checkpoints (it waited 0.3-0.5 s per
epoch for it on an H200). Only full batches are yielded; the rows of the
last partial batch are dropped (drop_last), as in `raycg.train.feed.device_batches`.
"""
from __future__ import annotations

import collections
import os
import shutil
import tempfile
from typing import Iterator

import numpy as np
import ray
import torch


def slot_layout(columns: dict[str, tuple[str, tuple]], rows: int) -> tuple[dict, int]:
    """{column: (offset, dtype, shape)} of one slot holding `rows` rows, and the slot's bytes
    (every column 64-byte aligned)."""
    layout, offset = {}, 0
    for name, (dtype, row_shape) in sorted(columns.items()):
        shape = (rows, *row_shape)
        layout[name] = (offset, dtype, shape)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        offset += (nbytes + 63) // 64 * 64
    return layout, offset


def slot_views(buffer: np.ndarray, layout: dict, slot_bytes: int, slot: int) -> dict[str, np.ndarray]:
    base = slot * slot_bytes
    return {name: buffer[base + off: base + off + int(np.prod(shape)) * np.dtype(dt).itemsize].view(dt).reshape(shape)
            for name, (off, dt, shape) in layout.items()}


class IngestActor:
    """Iterates one worker's Ray Data shard in its own process, into shared-memory slots."""

    def __init__(self, shard, transfer_rows: int, prefetch_batches: int):
        self.shard, self.rows, self.prefetch = shard, transfer_rows, prefetch_batches
        self.iterator, self.pending, self.buffer = None, None, None

    def start_epoch(self) -> dict:
        self.iterator = iter(self.shard.iter_batches(batch_size=self.rows, batch_format="numpy",
                                                     prefetch_batches=self.prefetch, drop_last=False))
        self.pending = next(self.iterator, None)  # the layout comes from the first batch
        if self.pending is None:
            return {}
        return {k: (np.asarray(v).dtype.str, tuple(np.asarray(v).shape[1:])) for k, v in self.pending.items()}

    def attach(self, path: str, layout: dict, slot_bytes: int, slots: int) -> None:
        self.buffer = np.memmap(path, dtype=np.uint8, mode="r+", shape=(slot_bytes * slots,))
        self.layout, self.slot_bytes = layout, slot_bytes

    def fill(self, slot: int) -> int:
        batch, self.pending = (self.pending, None) if self.pending is not None else (next(self.iterator, None), None)
        if batch is None:
            return 0
        views = slot_views(self.buffer, self.layout, self.slot_bytes, slot)
        n = 0
        for name, view in views.items():
            values = np.asarray(batch[name])
            n = len(values)
            view[:n] = values
        return n


def _ring_path(rank: int, nbytes: int) -> str:
    """A file for the ring in /dev/shm when it has room, else the temp directory."""
    for d in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(d) and shutil.disk_usage(d).free > 2 * nbytes:
            return os.path.join(d, f"raycg-ingest-{os.getpid()}-{rank}.bin")
    raise OSError(f"no room for a {nbytes / 2**20:.0f} MiB ingest buffer in /dev/shm or {tempfile.gettempdir()}")


class ProcessFeed:
    """`device_batches` with the Ray Data iteration in an `IngestActor` (module docstring)."""

    def __init__(self, shard, batch_size: int, device, transfer_batches: int = 1, prefetch_transfers: int = 2,
                 rank: int = 0):
        if batch_size <= 0 or transfer_batches <= 0:
            raise ValueError(f"batch_size={batch_size} and transfer_batches={transfer_batches} must be > 0")
        self.batch_size, self.device, self.rank = batch_size, torch.device(device), rank
        self.rows = batch_size * transfer_batches
        self.slots = max(1, prefetch_transfers) + 1
        node = ray.get_runtime_context().get_node_id()  # shared memory: the actor must run on this node
        self.actor = ray.remote(IngestActor).options(
            num_cpus=0, scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(shard, self.rows, prefetch_transfers)
        self.buffer = self.path = None
        self.registered = False
        self.next_epoch = None  # (start_epoch ref, queued fills) from prefetch_epoch
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _allocate(self, columns: dict) -> None:
        self.layout, self.slot_bytes = slot_layout(columns, self.rows)
        nbytes = self.slot_bytes * self.slots
        self.path = _ring_path(self.rank, nbytes)
        self.buffer = np.memmap(self.path, dtype=np.uint8, mode="w+", shape=(nbytes,))
        if self.device.type == "cuda":  # page-locked: truly asynchronous copies, no staging copy
            err = torch.cuda.cudart().cudaHostRegister(self.buffer.ctypes.data, nbytes, 0)
            self.registered = int(err) == 0
        ray.get(self.actor.attach.remote(self.path, self.layout, self.slot_bytes, self.slots))

    def _take(self, slot: int, n: int) -> dict[str, torch.Tensor]:
        views = slot_views(self.buffer, self.layout, self.slot_bytes, slot)
        if self.device.type == "cpu":
            return {k: torch.from_numpy(np.array(v[:n])) for k, v in views.items()}  # a copy: the slot is reused
        # copy on a side stream: waiting for the copy must not wait for the queued training steps
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            out = {k: torch.from_numpy(v[:n]).to(self.device, non_blocking=self.registered) for k, v in views.items()}
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        main.wait_event(copied)
        for t in out.values():
            t.record_stream(main)  # allocated on the copy stream, used on the main one
        copied.synchronize()  # the copy (only) is done: the slot may be refilled
        return out

    def prefetch_epoch(self) -> None:
        """Start the next pass now (the actor runs it while this worker does other work). Call
        only after `epoch()`'s batches are all consumed: every slot is free then."""
        if self.next_epoch is None and self.buffer is not None:
            start = self.actor.start_epoch.remote()
            self.next_epoch = (start, collections.deque((k, self.actor.fill.remote(k)) for k in range(self.slots)))

    def epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over the shard: full batches of `batch_size` rows on the device."""
        start, queue = self.next_epoch or (self.actor.start_epoch.remote(), None)
        self.next_epoch = None
        columns = ray.get(start)
        if not columns:
            return
        if self.buffer is None:
            self._allocate(columns)
        if queue is None:
            queue = collections.deque((k, self.actor.fill.remote(k)) for k in range(self.slots))
        done = False
        while queue:
            slot, ref = queue.popleft()
            n = ray.get(ref)
            if n == 0 or done:
                done = True
                continue  # drain what is still queued
            block = self._take(slot, n)
            queue.append((slot, self.actor.fill.remote(slot)))
            for row in range(0, n - self.batch_size + 1, self.batch_size):
                yield {k: v[row:row + self.batch_size] for k, v in block.items()}

    def close(self) -> None:
        ray.kill(self.actor)
        if self.buffer is not None:
            if self.registered:
                torch.cuda.cudart().cudaHostUnregister(self.buffer.ctypes.data)
            del self.buffer
            os.unlink(self.path)
            self.buffer = None
