"""Evaluation at corpus scale: 1M items x ~100k queries through the real evaluation path.

Simulates (once, cached under data/sim/) a dataset with --items items and enough users for
~100k engagement queries, builds the training-split feature store and normalisation exactly
as a training run does, writes an *untrained* (random-init) checkpoint, and runs
`evaluate_checkpoint` on it: Ray Data batch inference over the corpus and the queries, exact
faiss search (top-1000), recall with bootstrap intervals, and the baselines. The recall of a
random model is meaningless; this measures where the time goes:

    python benchmarks/eval_scale.py                                  # 1M items, 100k users
    python benchmarks/eval_scale.py --items 200000 --users 20000     # a quicker look
    python benchmarks/eval_scale.py index.recent_boost=0.5           # with the recent-item boost
                                                                     # (an untrained model fits none)

Prints the phase times and the faiss share of the total.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raycg.data.spec import FeatureSpec  # noqa: E402
from raycg.eval.evaluate import evaluate_checkpoint, format_phases, format_table  # noqa: E402
from raycg.model.two_tower import TwoTowerModel  # noqa: E402
from raycg.report.grid import compose_run  # noqa: E402
from raycg.model.checkpoint import recent_boost, save  # noqa: E402
from raycg.model.repeat_match import history_lookup_length  # noqa: E402
from raycg.train.driver import build_trainer, ensure_data, init_ray, resolve_paths  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--baselines", default="popularity,popularity_surface",
                   help="comma list of eval.baselines; the ALS ones add one more exact search over the "
                        "corpus per query each")
    p.add_argument("--ks", default="100,1000")
    p.add_argument("--max-queries", type=int, default=None,
                   help="eval.max_queries: score a uniform sample of this many queries per task")
    p.add_argument("--json", default=None, help="also write the results (eval.json's content) here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the run (e.g. eval.device=cpu)")
    args = p.parse_args()
    cfg = compose_run([
        f"data.sim.n_users={args.users}", f"data.sim.n_items={args.items}",
        f"data.sim.n_advertisers={max(500, args.items // 200)}", "data.sim.n_categories=300",
        f"eval.ks=[{args.ks}]", f"eval.baselines=[{args.baselines}]", "run_name=eval_scale",
        f"eval.max_queries={'null' if args.max_queries is None else args.max_queries}",
        f"paths.runs_dir={tempfile.mkdtemp(prefix='raycg-eval-scale-')}", *args.overrides,
    ])
    resolve_paths(cfg)
    init_ray(cfg)
    t0 = time.perf_counter()
    ensure_data(cfg)
    trainer, run_dir, store = build_trainer(cfg)  # feature store + normalisation as in training
    print(f"[eval_scale] data + features: {time.perf_counter() - t0:.1f}s", flush=True)

    # the model build_trainer printed the card of (same config and FeatureSpec), saved untrained
    spec_dict = trainer.train_loop_config["feature_spec"]
    ckpt = os.path.join(run_dir, "checkpoint_untrained")
    os.makedirs(ckpt, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = TwoTowerModel(OmegaConf.to_container(cfg.model, resolve=True), FeatureSpec.from_dict(spec_dict))
    if store.vocab:
        model.set_vocabularies(store.vocab)
    save(ckpt, model, torch.optim.Adam(model.parameters()), 0, OmegaConf.to_container(cfg, resolve=True), spec_dict)

    t1 = time.perf_counter()
    results = evaluate_checkpoint(ckpt, OmegaConf.to_container(cfg.data, resolve=True),
                                  OmegaConf.to_container(cfg.eval, resolve=True),
                                  history_length=history_lookup_length(cfg.model.history), store=store, seed=cfg.seed,
                                  new_users=cfg.index.new_users,
                                  popularity_weights=(cfg.loss.conversion_weight, cfg.loss.engagement_weight),
                                  recent_boost=recent_boost(ckpt, OmegaConf.to_container(cfg, resolve=True)))
    wall = time.perf_counter() - t1
    print("\n" + format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    sec = results["seconds"]
    nq = results["n_queries"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n[eval_scale] corpus {results['n_items']:,} items; queries: {nq['engagement']:,} engagement + "
          f"{nq['conversion']:,} conversion; top-{max(results['ks'])} exact search")
    print(f"[eval_scale] evaluate_checkpoint {wall:.1f}s: exact search {sec['search']:.1f}s "
          f"({100 * sec['search'] / sec['total']:.0f}% of the total), baselines + recall scoring "
          f"{sec['scoring_and_baselines']:.1f}s, the rest (Ray Data embedding, query building, feature "
          f"store) {sec['total'] - sec['search'] - sec['scoring_and_baselines']:.1f}s; "
          f"driver peak RSS {peak:.1f} GiB")
    print("[eval_scale] evaluation phases:\n" + format_phases(results))


if __name__ == "__main__":
    main()
