"""raycg-simulate / python -m raycg.simulate out=DIR [data=sim_small] [data.sim.KNOB=VALUE ...]  -- write a
simulated dataset.

The knobs are the data group's `data.sim.*` (raycg/conf/data/sim_default.yaml, every field of
raycg.data.simulate.SimConfig), so `data.sim.n_users=200000` means what it means for raycg-train.
`parallel=true|false` forces the Ray scale-out path or the in-memory one (default: by size);
`num_cpus=N` starts a local Ray of N CPUs for the scale-out path. Prints a JSON summary.
"""
import json
import os
import time

from omegaconf import DictConfig, OmegaConf

from raycg.config import hydra_app, require_complete
from raycg.data.sim.parallel import _peak_rss_mb
from raycg.data.simulate import SimConfig, use_parallel, write_dataset
from raycg.logs import set_level


@hydra_app("simulate")
def main(cfg: DictConfig, overrides: list[str]) -> dict:
    require_complete(cfg)  # out=...
    set_level(cfg.log_level)
    sim = SimConfig(**OmegaConf.to_container(cfg.data.sim, resolve=True))
    own_ray = cfg.num_cpus is not None and use_parallel(sim, cfg.parallel)
    if own_ray:
        import ray

        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        t0 = time.perf_counter()
        meta = write_dataset(sim, cfg.out, parallel=cfg.parallel)
        wall = time.perf_counter() - t0
    finally:
        if own_ray:
            ray.shutdown()
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(cfg.out) for f in fs)
    print(json.dumps({  # the command's output; progress goes through raycg.logs
        "wall_s": round(wall, 1), "n_impressions_shown": meta["n_impressions_shown"], "n_events": meta["n_events"],
        "n_train_events": meta["n_train_events"], "n_eval_events": meta["n_eval_events"],
        "ctr": round(meta["n_clicks"] / meta["n_impressions_shown"], 4),
        "conversion_per_click": round(meta["conversion_per_click"], 4),
        "shards": meta.get("shards", {"train": sim.num_shards, "eval": max(1, sim.num_shards // 2)}),
        "bytes_on_disk": size, "driver_peak_rss_mb": round(_peak_rss_mb()),
    }, indent=2), flush=True)
    return meta


if __name__ == "__main__":
    main()
