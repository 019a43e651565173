"""python -m raycg.train [hydra overrides]  -- simulate/train/evaluate one run (raycg-train)."""
from omegaconf import DictConfig

from raycg.config import hydra_app
from raycg.train.preflight import check_config, check_data_dir


@hydra_app("config")
def main(cfg: DictConfig, overrides: list[str]) -> None:
    # a bad setting fails in well under a second: before torch and Ray are even imported
    check_config(cfg)
    check_data_dir(cfg)
    from raycg.train.driver import run

    run(cfg)


if __name__ == "__main__":
    main()
