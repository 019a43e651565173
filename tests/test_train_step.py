"""The training step on an explicit device: every tensor it creates lives there, nothing in it
synchronises with the host (checked by CUDA's sync debug mode on a GPU), checkpoints move
between devices, and the step's knobs (precision, clipping, LR schedule) do what they say.

Each test runs on the CPU; the same tests run on CUDA under the `gpu` marker
(`pytest -m gpu` on a GPU machine; skipped without CUDA).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from raycg.data.batches import ItemTable
from raycg.data.spec import FeatureSpec
from raycg.model.two_tower import TwoTowerModel
from raycg.model import checkpoint as ckpt_io
from raycg.train.optim import build_optimizer
from raycg.train.schedule import build_scheduler, lr_factor
from raycg.train.step import StepContext, train_step
from conftest import compose

N_ITEMS, B, H, L = 300, 64, 2, 4
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def configs(*overrides):
    cfg = compose(["loss=full", "loss.duration_weighting=true", "loss.mixed_negatives=32", "loss.hard_negatives=2", "model.heads=multi_head",
                   f"model.history.length={L}", *overrides])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["buckets"] = {"user": 101, "surface": 8, "context_item": N_ITEMS + 2, "query": 51, "item": N_ITEMS + 2,
                        "advertiser": 23, "category": 13}
    return model, OmegaConf.to_container(cfg.loss, resolve=True), OmegaConf.to_container(cfg.trainer, resolve=True)


def spec():
    return FeatureSpec(user_dense=6, item_dense=10, history_length=L)


def corpus(rng) -> ItemTable:
    ids = np.arange(N_ITEMS, dtype=np.int64)
    cat = np.stack([ids, rng.integers(0, 20, N_ITEMS), rng.integers(0, 10, N_ITEMS)], axis=1)
    return ItemTable(item_id=ids, cat=cat, dense=rng.standard_normal((N_ITEMS, 10)).astype(np.float32))


def packed_batch(rng, items: ItemTable, device) -> dict:
    """A packed batch as raycg.data.batches builds it, with conversions, clicks and saves."""
    rows = rng.integers(0, N_ITEMS, B)
    kind = rng.integers(0, 3, B)
    hard = rng.integers(0, N_ITEMS, (B, H))
    hard[::5, 1] = -1  # padding
    batch = {
        "user_cat": np.stack([rng.integers(0, 100, B), rng.integers(0, 3, B), rng.integers(-1, N_ITEMS, B),
                              rng.integers(-1, 50, B)], axis=1),
        "user_dense": rng.standard_normal((B, 6)).astype(np.float32),
        "item_cat": items.cat[rows], "item_dense": items.dense[rows],
        "signals": np.stack([kind == 0, kind == 1, kind == 2, rng.exponential(30, B) * (kind == 1)],
                            axis=1).astype(np.float32),
        "hard_rows": hard,
        "hist_items": np.where(rng.random((B, L)) < 0.3, -1, rng.integers(0, N_ITEMS, (B, L))),
        "hist_actions": rng.integers(0, 5, (B, L)),
    }
    return {k: torch.as_tensor(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}


def setup(device, precision="fp32", grad_clip_norm=None, seed=0, **trainer):
    rng = np.random.default_rng(seed)
    cfg_model, cfg_loss, cfg_train = configs()
    cfg_train.update(trainer)
    items = corpus(rng)
    torch.manual_seed(seed)
    model = TwoTowerModel(cfg_model, spec()).to(device)
    opt = build_optimizer(model, cfg_train, torch.device(device))
    sched = build_scheduler(opt, cfg_train["lr_schedule"], total_steps=10)
    ctx = StepContext(cfg_loss, items, device=device, seed=seed, freq_buckets=cfg_model["buckets"]["item"],
                      precision=precision, grad_clip_norm=grad_clip_norm)
    return rng, items, model, opt, sched, ctx


def tensors_of(ctx: StepContext, opt) -> dict[str, torch.Tensor]:
    out = {"item_cat": ctx.item_cat, "item_dense": ctx.item_dense, **dict(ctx.freq.named_buffers())}
    for i, st in enumerate(opt.state.values()):
        out.update({f"opt{i}.{k}": v for k, v in st.items() if torch.is_tensor(v) and k != "step"})
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_every_step_tensor_lives_on_the_device(device):
    rng, items, model, opt, sched, ctx = setup(device)
    for _ in range(3):
        loss, parts = train_step(model, model, packed_batch(rng, items, device), opt, ctx, sched)
    dev = torch.device(device).type
    assert ctx.gen.device.type == dev
    for name, t in {**tensors_of(ctx, opt), "loss": loss, **parts}.items():
        assert t.device.type == dev, f"{name} is on {t.device}, expected {device}"
    assert set(parts) == {"loss_engagement", "loss_conversion", "loss_advertiser"}
    assert torch.isfinite(loss) and loss.item() > 0
    assert ctx.step == 3 and (ctx.freq.A >= 0).sum().item() > 0


@pytest.mark.gpu
def test_cuda_step_never_synchronises_with_the_host():
    rng, items, model, opt, sched, ctx = setup("cuda", precision="bf16", grad_clip_norm=1.0)
    batches = [packed_batch(rng, items, "cuda") for _ in range(4)]
    train_step(model, model, batches[0], opt, ctx, sched)  # first step: lazy CUDA/optimizer init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation now raises
    try:
        for b in batches[1:]:
            loss, _ = train_step(model, model, b, opt, ctx, sched)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_towers_fp32_loss(device):
    rng, items, model, opt, sched, ctx = setup(device, precision="bf16")
    loss, parts = train_step(model, model, packed_batch(rng, items, device), opt, ctx, sched)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in parts.values())
    assert torch.isfinite(loss)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_clipping_bounds_the_global_norm(device):
    rng, items, model, opt, sched, ctx = setup(device, grad_clip_norm=0.05)
    train_step(model, model, packed_batch(rng, items, device), opt, ctx, sched)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert norm.item() <= 0.05 * (1 + 1e-4)
    rng, items, model, opt, sched, ctx = setup(device)
    train_step(model, model, packed_batch(rng, items, device), opt, ctx, sched)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert norm.item() > 0.05  # the clip above had something to clip


def test_lr_schedule_golden_values():
    # module docstring example, then linear and warm-up-only
    cos = lr_factor("cosine", 2, 6)
    np.testing.assert_allclose([cos(s) for s in range(7)], [0.5, 1, 1, 0.853553, 0.5, 0.146447, 0], atol=1e-6)
    lin = lr_factor("linear", 0, 4, min_lr_ratio=0.2)
    np.testing.assert_allclose([lin(s) for s in range(5)], [1, 0.8, 0.6, 0.4, 0.2], atol=1e-12)
    assert [lr_factor("constant", 3, None)(s) for s in range(5)] == [1 / 3, 2 / 3, 1, 1, 1]
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor("cosine", 10, 10)
    with pytest.raises(ValueError, match="decay"):
        lr_factor("step", 0, 10)


@pytest.mark.parametrize("device", DEVICES)
def test_scheduler_drives_the_optimizer_lr(device):
    rng, items, model, opt, sched, ctx = setup(
        device, lr_schedule={"decay": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.0, "total_steps": None})
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        train_step(model, model, packed_batch(rng, items, device), opt, ctx, sched)
    base = opt.defaults["lr"]
    f = lr_factor("cosine", 2, 10)
    np.testing.assert_allclose(lrs, [base * f(s) for s in range(4)], rtol=1e-12)


def resumed(device_from, device_to, tmp_path):
    """Train 2 steps on device_from, checkpoint, load on device_to as the loop does; return
    (original model, original ctx, loaded model, loaded optimizer, loaded ctx, rng, items)."""
    rng, items, model, opt, sched, ctx = setup(device_from)
    for _ in range(2):
        train_step(model, model, packed_batch(rng, items, device_from), opt, ctx, sched)
    ckpt_io.save(str(tmp_path), model, opt, 0, {"model": configs()[0]}, spec().to_dict(), scheduler=sched,
                 step_state=ctx.state_dict())
    state = ckpt_io.load_state(str(tmp_path))
    assert all(t.device.type == "cpu" for t in state["model"].values())
    _, _, model2, opt2, sched2, ctx2 = setup(device_to)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    ctx2.load_state_dict(state)
    return model, ctx, model2, opt2, ctx2, rng, items


@pytest.mark.parametrize("device_from,device_to", [
    ("cpu", "cpu"),
    pytest.param("cuda", "cpu", marks=pytest.mark.gpu),
    pytest.param("cpu", "cuda", marks=pytest.mark.gpu),
])
def test_checkpoint_resumes_on_another_device(device_from, device_to, tmp_path):
    model, ctx, model2, opt2, ctx2, rng, items = resumed(device_from, device_to, tmp_path)
    assert ctx2.step == 2 and ctx2.device.type == torch.device(device_to).type
    for name, t in tensors_of(ctx2, opt2).items():
        assert t.device.type == torch.device(device_to).type, name
    torch.testing.assert_close(ctx2.freq.B.cpu(), ctx.freq.B.cpu())
    model.eval(), model2.eval()
    batch = packed_batch(rng, items, "cpu")
    with torch.no_grad():
        want = model.embed_users({k: v.to(device_from) for k, v in batch.items()}).cpu()
        got = model2.embed_users({k: v.to(device_to) for k, v in batch.items()}).cpu()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and training goes on from there
    loss, _ = train_step(model2.train(), model2, packed_batch(rng, items, device_to), opt2, ctx2)
    assert torch.isfinite(loss).item()


def test_precision_auto_picks_bf16_only_where_the_cpu_computes_it_natively(monkeypatch):
    """trainer.precision=auto: bf16 on a CPU with AMX or AVX-512 BF16 (emulated bf16 is slower
    than fp32 elsewhere), fp32 on other CPUs; explicit settings are kept."""
    import raycg.train.step as step_mod

    assert step_mod.resolve_precision("fp32", "cpu") == "fp32" and step_mod.resolve_precision("bf16", "cpu") == "bf16"
    for amx, avx512_bf16, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        assert step_mod.resolve_precision("auto", "cpu") == expected
        ctx = setup("cpu", precision="auto")[-1]
        assert ctx.precision == expected and ctx.amp_dtype == step_mod.PRECISIONS[expected]
