"""`python -m benchmark.devtools.quant_range [model=sd15] [model.path=...]`: how many output rows
of the U-Net's Linear/Conv2d weights lie on one side of 0. Those are the rows where the official
TuneQDM range (each row's own [min, max], ``method.quant_range=minmax``) and the range widened to
include 0 (PEQA, ``include_zero``) give different codes and scales; for every other row the two
are the same. Also prints the largest |q - zero_point| of the minmax codes (exact in fp16 up to
2048). Prints one line; the default model is sd15_arch (random weights: an approximation, its
symmetric initialisation has hardly any such rows; pass model=sd15 for the real weights).
"""

from __future__ import annotations

import sys

import torch
from hydra import compose, initialize_config_dir
from torch import nn

from benchmark import models
from benchmark.devtools.speed import CONF
from methods.common.quant import quantize_per_channel


def one_sign_rows(unet: nn.Module) -> dict[str, int]:
    counts = {"layers": 0, "rows": 0, "one_sign_rows": 0, "max_centered_code": 0}
    for module in unet.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        w = module.weight.detach().float().reshape(module.weight.shape[0], -1)
        counts["layers"] += 1
        counts["rows"] += w.shape[0]
        counts["one_sign_rows"] += int(((w.amin(dim=1) > 0) | (w.amax(dim=1) < 0)).sum())
        q, _, zero_point = quantize_per_channel(w, 8, symmetric=False, include_zero=False)
        centered = (q.int() - zero_point.int()[:, None]).abs().max()
        counts["max_centered_code"] = max(counts["max_centered_code"], int(centered))
    return counts


def main(argv: list[str]) -> None:
    overrides = argv or ["model=sd15_arch"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=tuneqdm", *overrides])
    torch.manual_seed(0)
    counts = one_sign_rows(models.load_components(cfg.model).unet)
    print(f"{cfg.model.name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
