"""Optimisers: Adam for the dense parameters; with `model.sparse_tables`, the id tables get
sparse gradients and an optimiser that reads and writes only the rows a step looked up.

    dense parameters (towers, heads, history encoder)    Adam / AdamW (fused on CUDA)
    id tables, model.sparse_tables=false (default)       the same Adam: every row, every step
    id tables, model.sparse_tables=true                  trainer.table_optimizer:
        sparse_adam   torch.optim.SparseAdam ("lazy" Adam: a row's moments move only on the
                      steps that look it up; equal to Adam on a row's first update)
        adagrad       torch.optim.Adagrad on sparse gradients (equal to dense Adagrad on every
                      row at every step: a row without gradient does not move in either)

Why. With dense gradients a step costs O(table rows): the table's gradient is allocated and
zeroed, Adam reads and writes four table-sized arrays, and DDP all-reduces the whole gradient.
With sparse ones it costs O(rows looked up) (`benchmarks/table_scale.py` measures both).

Under DDP the tables are left out of DDP's all-reduce; `SparseGradSync` all-gathers every
rank's (row index, gradient row) pairs instead and averages them, like DDP does for dense
gradients. There are at most as many pairs as lookups in a step; ranks exchange their counts
first (a table used twice may merge duplicate rows). Bytes per step and rank: at most
world x lookups x (8 + 4 x dim) per table, against 4 x rows x dim for a dense all-reduce.

Limits: the tables take no weight decay and no gradient clipping (`trainer.grad_clip_norm`
clips the dense parameters); the count exchange, SparseAdam and Adagrad (which coalesce the
gradient) synchronise with the host on CUDA; not yet run on a GPU.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

TABLE_OPTIMIZERS = ("sparse_adam", "adagrad")
GRAD_SYNCS = ("ddp", "allreduce")  # trainer.grad_sync: how dense gradients are averaged over ranks


def sparse_tables(model: nn.Module) -> dict[str, nn.Parameter]:
    """{parameter name: weight} of every nn.Embedding with sparse gradients (a table shared by two
    modules, the item id of the history encoder and the item tower, appears once)."""
    out, seen = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module.sparse and id(module.weight) not in seen:
            seen.add(id(module.weight))
            out[f"{name}.weight" if name else "weight"] = module.weight
    return out


class Optimizers:
    """Several optimisers stepped as one (dense Adam + the tables' sparse optimiser); what the
    training loop, the LR schedule and checkpoints need of an optimiser."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers.values():
            o.step()

    def state_dict(self) -> dict:
        return {"optimizers": {k: o.state_dict() for k, o in self.optimizers.items()}}

    def load_state_dict(self, state: dict) -> None:
        if "optimizers" not in state or set(state["optimizers"]) != set(self.optimizers):
            raise ValueError(f"optimizer state for {sorted(state.get('optimizers', ['one dense optimizer']))}, "
                             f"this run has {sorted(self.optimizers)} (model.sparse_tables changed?)")
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])


class Schedulers:
    """One LR schedule per optimiser of an `Optimizers`, stepped together."""

    def __init__(self, schedulers: dict):
        self.schedulers = schedulers

    def step(self) -> None:
        for s in self.schedulers.values():
            s.step()

    def get_last_lr(self) -> list[float]:
        return [lr for s in self.schedulers.values() for lr in s.get_last_lr()]

    def state_dict(self) -> dict:
        return {k: s.state_dict() for k, s in self.schedulers.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, s in self.schedulers.items():
            s.load_state_dict(state[k])


def build_optimizer(model: nn.Module, cfg_train: dict, device: torch.device):
    """Adam (fused on CUDA) for every parameter; with sparse tables, `Optimizers` of Adam for the
    dense parameters and `trainer.table_optimizer` for the tables."""
    tables = sparse_tables(model)
    lr, wd = cfg_train["lr"], cfg_train["weight_decay"]
    fused = torch.device(device).type == "cuda"
    if not tables:
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd, fused=fused)
    table_ids = {id(p) for p in tables.values()}
    dense = [p for p in model.parameters() if id(p) not in table_ids]
    kind = cfg_train["table_optimizer"]
    table_lr = cfg_train["table_lr"] or lr  # null: the dense learning rate
    if kind == "sparse_adam":
        table_opt = torch.optim.SparseAdam(list(tables.values()), lr=table_lr)
    elif kind == "adagrad":
        table_opt = torch.optim.Adagrad(list(tables.values()), lr=table_lr)
    else:
        raise ValueError(f"trainer.table_optimizer={kind!r}: expected one of {list(TABLE_OPTIMIZERS)}")
    return Optimizers({"dense": torch.optim.Adam(dense, lr=lr, weight_decay=wd, fused=fused), "tables": table_opt})


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters gradient clipping applies to (every one but the sparse tables)."""
    table_ids = {id(p) for p in sparse_tables(model).values()}
    return [p for p in model.parameters() if id(p) not in table_ids]


class SparseGradSync:
    """Averages the sparse table gradients over the ranks of the default process group (the
    tables are excluded from DDP); call after `backward()`. `bytes_per_step`: bytes this rank
    receives per step (module docstring).

    A table used twice in a step (the item id: item tower and history) accumulates two sparse
    gradients, and PyTorch may merge their duplicate rows, so ranks can hold different numbers
    of (row, gradient) pairs: the counts are exchanged first and each rank's pairs padded to the
    largest with zero gradient on row 0 (the missing-id row, which stays zero) and trimmed after.
    """

    def __init__(self, tables: dict[str, nn.Parameter]):
        self.tables = tables
        self.world = dist.get_world_size()
        self.bytes_per_step = 0

    def __call__(self) -> None:
        received = 0
        for p in self.tables.values():
            g = p.grad
            if g is None:
                continue
            idx, val = g._indices()[0], g._values()
            count = torch.tensor([idx.numel()], device=idx.device)
            counts = [torch.empty_like(count) for _ in range(self.world)]
            dist.all_gather(counts, count)
            counts = [int(c) for c in counts]
            n = max(counts)
            if idx.numel() < n:
                idx = torch.cat([idx, idx.new_zeros(n - idx.numel())])
                val = torch.cat([val, val.new_zeros((n - len(val), *val.shape[1:]))])
            idx, val = idx.contiguous(), val.contiguous()
            idx_all = [torch.empty_like(idx) for _ in range(self.world)]
            val_all = [torch.empty_like(val) for _ in range(self.world)]
            dist.all_gather(idx_all, idx)
            dist.all_gather(val_all, val)
            rows = torch.cat([t[:c] for t, c in zip(idx_all, counts)])
            vals = torch.cat([t[:c] for t, c in zip(val_all, counts)])
            # uncoalesced (a row may come from several ranks: the optimizer sums duplicates); the
            # indices are in range by construction, so no per-step invariant check (and no warning)
            p.grad = torch.sparse_coo_tensor(rows[None], vals / self.world, p.shape, check_invariants=False)
            received += sum(t.numel() * t.element_size() for t in idx_all + val_all) + 8 * self.world
        self.bytes_per_step = received


class DenseGradSync:
    """Averages the dense gradients over the ranks with one all-reduce of one flat buffer; call
    after `backward()`. With `trainer.grad_sync=allreduce` the model is not wrapped in DDP.

    Why. DDP all-reduces gradient buckets from autograd hooks during the backward pass, which
    overlaps communication with compute but splits a compiled model into one graph per bucket
    (Dynamo's DDPOptimizer) and runs the hooks on the host. The GPU step of this model is
    launch-bound (host work per step ~ GPU work per step), so without DDP the whole compiled
    step can be CUDA-graphed as on one GPU, at the price of one all-reduce that does not
    overlap the backward pass. `benchmarks/gpu_train.py` measures both.

    The parameters are the same objects on every rank (`broadcast_parameters` once at start);
    a parameter without a gradient on this rank contributes zeros, as in DDP.
    """

    def __init__(self, params: list[nn.Parameter]):
        self.params = [p for p in params if p.requires_grad]
        self.world = dist.get_world_size()
        self.bytes_per_step = 4 * sum(p.numel() for p in self.params)

    def __call__(self) -> None:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        dist.all_reduce(flat)
        flat.div_(self.world)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p)
            offset += n


def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Every rank starts from rank `src`'s parameters and buffers (what DDP does on wrapping)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src)
