"""raycg-export / python -m raycg.export run_dir=runs/<name> [out=<dir>]  -- TorchScript towers + feature spec."""
from omegaconf import DictConfig

from raycg.config import hydra_app, require_complete
from raycg.logs import set_level
from raycg.model.checkpoint import evaluation_checkpoint, load_model
from raycg.model.export import export_towers


@hydra_app("export")
def main(cfg: DictConfig, overrides: list[str]) -> None:
    require_complete(cfg)  # run_dir=...
    set_level(cfg.log_level)
    ckpt = evaluation_checkpoint(cfg.run_dir)  # <run>/best, else the newest intact one
    model, _ = load_model(ckpt)
    paths = export_towers(model, cfg.out or f"{cfg.run_dir.rstrip('/')}/export")
    print(f"[raycg] exported {ckpt}:")  # the command's output: the files written
    for name, path in paths.items():
        print(f"  {name:<13} {path}")


if __name__ == "__main__":
    main()
