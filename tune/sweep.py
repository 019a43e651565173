"""python tune/sweep.py [hydra overrides]  -- a Ray Tune sweep of loss weights and t_max.

Each trial is one real raycg run (raycg.train.driver.run: TorchTrainer fit -> faiss recall@K)
with the trial's values merged into the main config; the sweep settings are the `tune` config
group (raycg/conf/tune/default.yaml, loaded by default, `tune=<name>` picks another). Examples:

    python tune/sweep.py experiment=smoke trainer.epochs=1
    python tune/sweep.py data=sim_small tune.num_samples=2 tune.metric=engagement_recall@1000

The sweep itself is raycg.tune.sweep (`run_sweep`); this script is its Hydra entry point.
"""
from __future__ import annotations

from raycg.tune.sweep import main

if __name__ == "__main__":
    main()
