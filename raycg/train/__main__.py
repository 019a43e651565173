"""python -m raycg.train [hydra overrides]  -- simulate/train/evaluate one run (raycg-train)."""
from omegaconf import DictConfig

from raycg.config import hydra_app
from raycg.train.driver import run


@hydra_app("config")
def main(cfg: DictConfig, overrides: list[str]) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
