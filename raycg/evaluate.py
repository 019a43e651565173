"""raycg-evaluate / python -m raycg.evaluate run_dir=runs/<name> [eval.KEY=VALUE ...]  -- evaluate a run's
best (else newest intact) checkpoint.

Uses the data paths and eval settings stored with the checkpoint; the `eval.` keys given on the
command line replace the stored ones (e.g. `eval.ks=[10,100,1000] eval.baselines=[popularity]`;
checked against the eval schema when Hydra composes raycg/conf/evaluate.yaml). Prints the recall
table and writes <run_dir>/eval.json.
"""
import json
import os

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from raycg.config import hydra_app, require_complete
from raycg.logs import set_level


def given_keys(cfg: DictConfig, overrides: list[str], group: str) -> dict:
    """The values of `group` that the command line set (as composed, so typed and checked):
    `eval.ks=[10,100]` -> {"ks": [10, 100]}; the group itself (`eval=default`) -> all of it."""
    picked = OmegaConf.create({group: {}})
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key == group:
            return OmegaConf.to_container(cfg[group], resolve=True)
        if key.startswith(group + "."):
            OmegaConf.update(picked, key, OmegaConf.select(cfg, key), force_add=True)
    return OmegaConf.to_container(picked, resolve=True)[group]


@hydra_app("evaluate")
def main(cfg: DictConfig, overrides: list[str]) -> None:
    require_complete(cfg)  # run_dir=...
    set_level(cfg.log_level)
    # torch and Ray load only once the command line is known to be complete
    from raycg.eval.evaluate import evaluate_checkpoint, format_table, timing_line, write_results
    from raycg.model.checkpoint import evaluation_checkpoint, load_model, recent_boost
    from raycg.model.repeat_match import history_lookup_length
    from raycg.host import describe_host
    from raycg.train.driver import init_ray

    ckpt = evaluation_checkpoint(cfg.run_dir)  # <run>/best, else the newest intact one
    _, config = load_model(ckpt)
    eval_cfg = OmegaConf.to_container(OmegaConf.merge(config["eval"], given_keys(cfg, overrides, "eval")),
                                      resolve=True)
    init_ray(OmegaConf.create(config))  # the run's own Ray settings (embedded: loopback only)
    results = evaluate_checkpoint(ckpt, config["data"], eval_cfg,
                                  history_length=history_lookup_length(config["model"]["history"]),
                                  seed=config["seed"], new_users=config["index"]["new_users"],
                                  popularity_weights=(config["loss"]["conversion_weight"],
                                                      config["loss"]["engagement_weight"]),
                                  recent_boost=recent_boost(ckpt, config),
                                  quarantine_dir=os.path.join(cfg.run_dir, "quarantine", "eval"))
    results["checkpoint"] = ckpt
    # the training's record (its epochs' metrics, where it trained) stays with the run's results;
    # this command adds where the evaluation ran
    previous = os.path.join(cfg.run_dir, "eval.json")
    if os.path.exists(previous):
        with open(previous) as f:
            before = json.load(f)
        results.update({k: before[k] for k in ("train_metrics", "environment") if k in before})
    results["evaluation_environment"] = describe_host()
    path = write_results(cfg.run_dir, results)
    print("\n" + format_table(results))  # the command's output (progress goes through raycg.logs)
    print(timing_line(results, path))


if __name__ == "__main__":
    main()
