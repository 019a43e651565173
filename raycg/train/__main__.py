"""python -m raycg.train [hydra overrides]  -- simulate/train/evaluate one run."""
import hydra
from omegaconf import DictConfig

from raycg.train.driver import run


@hydra.main(config_path="../../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
