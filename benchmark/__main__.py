"""`python -m benchmark method=ti subject=dog6 [model=tiny] [-m sweeps]` (Hydra)."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from benchmark.run import run


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    record = run(cfg)
    if record["status"] != "ok" and HydraConfig.get().mode == RunMode.RUN:
        sys.exit(1)


if __name__ == "__main__":
    main()
