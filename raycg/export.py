"""raycg-export / python -m raycg.export run_dir=runs/<name> [out=<dir>]  -- torch.export towers, feature
tables, item embeddings and the faiss item index (raycg.retrieve.build), from the run's best (else newest
intact) checkpoint."""
import os

from omegaconf import DictConfig, OmegaConf

from raycg.config import hydra_app, require_complete
from raycg.logs import set_level


@hydra_app("export")
def main(cfg: DictConfig, overrides: list[str]) -> None:
    require_complete(cfg)  # run_dir=...
    set_level(cfg.log_level)
    # torch and Ray load only once the command line is known to be complete
    from raycg.data.pipeline import checked_events, feature_store_from_config, validation_cutoff
    from raycg.model.checkpoint import evaluation_checkpoint, load_model, recent_boost
    from raycg.retrieve.build import export_run
    from raycg.train.driver import init_ray

    ckpt = evaluation_checkpoint(cfg.run_dir)  # <run>/best, else the newest intact one
    model, config = load_model(ckpt)
    out = cfg.out or f"{cfg.run_dir.rstrip('/')}/export"
    init_ray(OmegaConf.create(config))  # the run's own Ray settings (embedded: loopback only)
    data = config["data"]  # features as the run built them: stats from before its validation window
    store = feature_store_from_config(data, before_ts=validation_cutoff(data["train_path"],
                                                                        data["validation_fraction"]))
    quarantine = os.path.join(cfg.run_dir, "quarantine", "eval") if data["on_bad_rows"] == "quarantine" else None
    eval_events = checked_events(data["eval_path"], store, quarantine_dir=quarantine)[0]
    export_run(model, store, out, config["index"], eval_events=eval_events, train_path=data["train_path"],
               seed=config["seed"], ray_min_rows=config["eval"]["ray_inference_min_rows"],
               popularity_weights=(config["loss"]["conversion_weight"], config["loss"]["engagement_weight"]),
               recent_boost=recent_boost(ckpt, config))
    print(f"[raycg] exported {ckpt} -> {out}")
    for name in sorted(os.listdir(out)):
        print(f"  {name}")


if __name__ == "__main__":
    main()
