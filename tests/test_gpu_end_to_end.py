"""`python -m raycg.train trainer=gpu` end to end on every GPU of the machine (1, 2 or 4 Ray
Train workers, NCCL), every loss option on: logQ, cross-worker, mixed and impression hard
negatives, advertiser loss, both heads, history; then resume on the GPU, evaluate (embedding
on GPU actors, exact top-K with torch on the GPU) and export. Skipped without CUDA.
"""
import json
import math

import pytest

from conftest import compose

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    if ray.is_initialized():  # the shared 2-CPU Ray of earlier modules (conftest.ray_session): too small here
        ray.shutdown()
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_gpu_training_every_loss_option_resume_evaluate_export(ray_gpu, small_data_dir, tmp_path):
    import torch

    from raycg.train.driver import run

    gpus = torch.cuda.device_count()
    overrides = [
        "data=sim_small", f"data.dir={small_data_dir}", f"paths.runs_dir={tmp_path}", "run_name=gpu_e2e",
        "trainer=gpu", f"trainer.num_workers={gpus}", "trainer.cpus_per_worker=2", "trainer.batch_size=512",
        "trainer.transfer_batches=4", "trainer.lr_schedule.warmup_steps=2", "trainer.grad_clip_norm=1.0",
        "loss=full", "model.heads=multi_head", "loss.cross_worker_negatives=true", "loss.log_q_correction=true",
        "model.history.length=5", "eval.baselines=[popularity,popularity_surface]",
    ]
    run(compose(overrides + ["trainer.epochs=1"]))
    results = run(compose(overrides + ["trainer.epochs=3"]))  # same run name: resumes on the GPU(s)
    run_dir = tmp_path / "gpu_e2e"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert all(math.isfinite(m["loss"]) for m in metrics) and metrics[-1]["loss"] < metrics[0]["loss"]
    assert {"loss_conversion", "loss_engagement", "loss_advertiser"} <= set(metrics[-1])
    assert results["search_backend"].startswith("torch")
    # the recent-item boost, fitted on the GPU's validation lists, is the one evaluated and exported
    best = json.loads((run_dir / "best" / "meta.json").read_text())
    assert best["recent_boost"] == metrics[best["epoch"]]["val_recent_boost"] == results["recent_boost"]["boost"] >= 0
    assert all(m["val_mean_recall"] >= m["val_towers_mean_recall"] for m in metrics)
    model_r, pop_r = results["model"]["conversion"][100], results["popularity"]["conversion"][100]
    assert model_r > pop_r + 0.1, (model_r, pop_r)
    assert (run_dir / "export" / "user_tower.pt2").exists() and (run_dir / "export" / "item_tower.pt2").exists()
