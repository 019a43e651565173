"""python tune/sweep.py [hydra overrides]  -- a Ray Tune sweep (Optuna TPE + ASHA) of the loss
weights, t_max, the advertiser-loss weight, the temperature and the learning rate.

Each trial is one real raycg run (raycg.train.driver.run: TorchTrainer fit -> faiss recall@K)
with the trial's values merged into the main config; the sweep settings are the `tune` config
group (raycg/conf/tune/default.yaml, loaded by default, `tune=<name>` picks another). It ends
with a table, a plot and the best trial as an experiment file (tune/README.md). Examples:

    python tune/sweep.py experiment=smoke tune.num_samples=4
    python tune/sweep.py data=sim_small tune.num_samples=12 tune.metric=engagement_recall@1000

The sweep itself is raycg.tune.sweep (`run_sweep`); this script is its Hydra entry point.
"""
from __future__ import annotations

from raycg.tune.sweep import main

if __name__ == "__main__":
    main()
