"""`python -m benchmark.memory method=zoodip [model=sd15_arch] [format=json]`: a method's predicted
(and with measure=true measured) peak training memory (benchmark.memory.cli). Hydra's entry
point lives here, in ``__main__``, so that its config_path is read relative to this file."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from benchmark.memory.cli import bad_values, report


@hydra.main(version_base="1.3", config_path="../../conf", config_name="memory")
def main(cfg: DictConfig) -> None:
    ok = report(cfg)
    if not ok and HydraConfig.get().mode == RunMode.RUN:
        sys.exit(1)


if __name__ == "__main__":
    from benchmark.sweep.plan import Check
    from benchmark.sweep.preflight import exit_on_bad_input

    exit_on_bad_input(sys.argv[1:], "memory", Check(values=bad_values))
    main()
