"""python -m raycg.retrieve export_dir=runs/<name>/export user_id=42 [surface=related context_item_id=7
       query_id=-1 recent_item_ids=[3,9] recent_event_types=[click,save]] [k=100]
   python -m raycg.retrieve export_dir=runs/<name>/export input=requests.parquet output=top.parquet [k=100]

One request: prints {"item_ids": [...], "scores": [...]} (JSON, best first). A batch: every row of
`input` (request columns of raycg/retrieve/requests.py; other columns pass through) ->
`output` with item_ids / scores list columns, by Ray Data map_batches (an embedded Ray on
127.0.0.1, or `ray.address`). Settings: raycg/conf/retrieve.yaml.
"""
from __future__ import annotations

import json
import os
import sys
import time

from omegaconf import DictConfig, OmegaConf

from raycg.checksums import DamagedFileError
from raycg.config import hydra_app, require_complete
from raycg.logs import get_logger, set_level
from raycg.retrieve.requests import FIELDS, RequestError

logger = get_logger("retrieve")


def init_ray(cfg: DictConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address is None and not os.environ.get("RAY_ADDRESS"):  # embedded, loopback only
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        import ray._private.ray_constants as ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(address="local", _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", include_dashboard=False,
                 num_cpus=cfg.ray.num_cpus, log_to_driver=False)
    else:
        ray.init(address=cfg.ray.address)
    ray.data.DataContext.get_current().enable_progress_bars = False


def run(cfg: DictConfig) -> dict:
    from raycg.retrieve.retriever import Retriever, retrieve_parquet

    if cfg.input is not None:
        if cfg.output is None:
            raise RequestError("input=... needs output=<file>.parquet")
        init_ray(cfg)
        t0 = time.perf_counter()
        rows = retrieve_parquet(cfg.export_dir, cfg.input, cfg.output, int(cfg.k), int(cfg.batch_size),
                                int(cfg.actors))
        secs = time.perf_counter() - t0
        logger.info(f"retrieve: {rows:,} requests -> {cfg.output} (top-{cfg.k}) in {secs:.1f}s")
        return {"rows": rows, "output": cfg.output}
    if cfg.user_id is None:
        raise RequestError("give user_id=<id> (one request) or input=<requests.parquet> output=<file> (a batch)")
    request = {f: OmegaConf.to_container(cfg[f]) if OmegaConf.is_list(cfg[f]) else cfg[f] for f in FIELDS}
    ids, scores = Retriever(cfg.export_dir, threads=cfg.threads).retrieve(k=int(cfg.k), **request)
    out = {"item_ids": ids.tolist(), "scores": [round(float(s), 6) for s in scores]}
    print(json.dumps(out), flush=True)  # the command's output: one request's top-K
    return out


@hydra_app("retrieve")
def main(cfg: DictConfig, overrides: list[str]) -> int:
    require_complete(cfg)  # export_dir=...
    set_level(cfg.log_level)
    try:
        run(cfg)
    except (RequestError, DamagedFileError) as e:  # a clear message, not a traceback
        print(f"error: {e}", file=sys.stderr, flush=True)  # the command's output: why it refused
        return 2
    return 0


if __name__ == "__main__":
    main()
