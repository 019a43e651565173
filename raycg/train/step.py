"""One optimisation step, and the state a step carries between batches.

    batch (packed, on `device`)
      -> logQ estimator update (global ids, identical on every rank)
      -> extra candidates appended to the item side (impression hard negatives, mixed negatives)
      -> towers under autocast (bf16 on GPU with `trainer.precision=bf16`)
      -> loss in fp32 (raycg.losses.objective; logits at temperature 0.05 need fp32's resolution)
      -> backward, optional gradient clipping, optimizer step, LR schedule step

Named ranges (raycg.negatives / towers / loss / backward / optimizer) label the step in a
`torch.profiler` trace. Nothing here reads a tensor back to the host: the loss and its parts are returned as
tensors, and the caller reads them every `trainer.log_every_steps`.
Every tensor the step creates lives on `StepContext.device`.
"""
from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function

from raycg.losses.frequency import StreamingFrequencyEstimator
from raycg.losses.objective import EAGER, Candidates, LossKernels, mixed_log_q, training_loss
from raycg.model.two_tower import TwoTowerModel
from raycg.train.optim import dense_parameters

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
# CPU instructions that compute in bf16 natively: without them bf16 autocast is emulated, and slower
_CPU_BF16 = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


def resolve_precision(setting: str, device: torch.device | str) -> str:
    """`trainer.precision=auto` -> bf16 where the device computes in bf16 natively (a CUDA GPU
    with bf16; a CPU with AMX or AVX-512 BF16), fp32 elsewhere; fp32 and bf16 stay as they are.
    (2-core Xeon with AMX, default model, 3 epochs: 21.1-21.7k rows/s in bf16 against
    14.7-15.4k in fp32, recall within one seed's noise.)"""
    if setting != "auto":
        return str(setting)
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if any(getattr(torch.cpu, f, lambda: False)() for f in _CPU_BF16) else "fp32"


class StepContext:
    """What a step needs beyond the batch and the model: corpus tensors for extra negatives,
    the logQ frequency estimator, the random generator for mixed negatives, precision, gradient
    clipping, the loss kernels (eager or compiled) and the global step (identical on every rank).
    """

    def __init__(self, cfg_loss: dict, items=None, *, device: torch.device | str = "cpu", seed: int = 0,
                 freq_buckets: int = 1, precision: str = "fp32", grad_clip_norm: float | None = None,
                 kernels: LossKernels = EAGER):
        precision = resolve_precision(precision, device)
        if precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={precision!r}: expected one of {['auto', *PRECISIONS]}")
        self.precision = precision
        self.cfg = cfg_loss
        self.device = torch.device(device)
        self.step = 0
        self.amp_dtype = PRECISIONS[precision]
        self.grad_clip_norm = grad_clip_norm
        self.kernels = kernels
        self.item_cat = self.item_dense = None
        if items is not None:
            self.item_cat = torch.tensor(items.cat, device=self.device)  # a copy: object-store arrays are read-only
            self.item_dense = torch.tensor(items.dense, device=self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.freq = None
        if cfg_loss["log_q_correction"]:
            self.freq = StreamingFrequencyEstimator(freq_buckets, alpha=cfg_loss["freq_alpha"]).to(self.device)
        self.mixed = int(cfg_loss["mixed_negatives"])
        self.mixed_log_q = mixed_log_q(self.mixed, len(self.item_cat)) if self.mixed and items is not None else None
        self.grad_syncs: list = []  # raycg.train.optim.SparseGradSync / DenseGradSync: after backward
        self.clip_params = None  # the parameters gradient clipping applies to (not sparse tables)

    def autocast(self):
        """Autocast context for the towers (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def state_dict(self) -> dict:
        return {"step": self.step, "freq": self.freq.state_dict() if self.freq is not None else None,
                "gen": self.gen.get_state(), "gen_device": self.gen.device.type}

    def load_state_dict(self, state: dict) -> None:
        self.step = state.get("step", 0)
        if self.freq is not None and state.get("freq") is not None:
            self.freq.load_state_dict(state["freq"])  # copies into the buffers on self.device
        if state.get("gen") is not None and state.get("gen_device") == self.gen.device.type:
            self.gen.set_state(state["gen"])  # CPU and CUDA generator states differ: same kind only

    def extra_items(self, batch: dict) -> tuple[dict, Candidates, int, int]:
        """Batch with hard/mixed candidate items appended to the item side (one tower call,
        inside the DDP forward); returns (batch, ids of the extras, H, M)."""
        H = batch["hard_rows"].shape[1] if "hard_rows" in batch else 0
        M = self.mixed
        if H == 0 and M == 0:
            return batch, Candidates(), 0, 0
        if self.item_cat is None:
            raise ValueError("hard or mixed negatives need the item corpus: StepContext(items=...)")
        rows = [batch["hard_rows"].reshape(-1).clamp(min=0)] if H else []
        if M:
            rows.append(torch.randint(0, len(self.item_cat), (M,), generator=self.gen, device=self.device))
        rows = torch.cat(rows)
        out = dict(batch)
        out["item_cat"] = torch.cat([batch["item_cat"], self.item_cat[rows]])
        out["item_dense"] = torch.cat([batch["item_dense"], self.item_dense[rows]])
        ids = self.item_cat[rows, 0]
        extra = Candidates()
        if H:
            hard_ids = ids[: len(batch["hard_rows"]) * H].reshape(-1, H)
            extra.hard_ids = torch.where(batch["hard_rows"] < 0, torch.full_like(hard_ids, -1), hard_ids)
        if M:
            extra.mixed_ids = ids[len(ids) - M:]
            extra.mixed_log_q = self.mixed_log_q
        return out, extra, H, M


def train_step(model, core: TwoTowerModel, batch: dict, optimizer, ctx: StepContext,
               scheduler=None) -> tuple[torch.Tensor, dict]:
    """One optimisation step on a packed batch (see raycg.data.batches) that is already on
    `ctx.device`. `model` is what runs the forward (DDP-wrapped and/or compiled), `core` the
    plain TwoTowerModel. Returns (loss, parts) as detached tensors."""
    B = len(batch["signals"])
    with record_function("raycg.negatives"):
        if ctx.freq is not None:
            ctx.freq.update_global(batch["item_cat"][:, 0], ctx.step, same_size=True)
        augmented, extra, H, M = ctx.extra_items(batch)
    with record_function("raycg.towers"), ctx.autocast():
        user_out, item_all = model(augmented)
    with record_function("raycg.loss"):
        user_out = {h: v.float() for h, v in user_out.items()}
        item_all = {h: v.float() for h, v in item_all.items()}
        item_out = {h: v[:B] for h, v in item_all.items()}
        if H:
            extra.hard = {h: v[B:B + B * H].reshape(B, H, -1) for h, v in item_all.items()}
        if M:
            extra.mixed = {h: v[len(v) - M:] for h, v in item_all.items()}
        loss, parts = training_loss(user_out, item_out, batch, ctx.cfg, core.temperature, extra, ctx.freq,
                                    core.serve_head, kernels=ctx.kernels, score_extras=core.score_extras)
    with record_function("raycg.backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for sync in ctx.grad_syncs:
            sync()
    with record_function("raycg.optimizer"):
        if ctx.grad_clip_norm:
            if ctx.clip_params is None:
                ctx.clip_params = dense_parameters(core)
            torch.nn.utils.clip_grad_norm_(ctx.clip_params, ctx.grad_clip_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    ctx.step += 1
    return loss.detach(), parts
