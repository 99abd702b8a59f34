"""LoKr (LyCORIS, Yeh et al., 2024): the weight change of each attention projection is a Kronecker
product ``W1 ⊗ (B2 A2) * alpha / r`` (the larger factor low-rank), through peft's ``LoKrConfig``.
Trained by the LoRA method's DreamBooth step; ``apply`` merges it into the stock U-Net
(methods/common/peft_adapters.py).
"""

from __future__ import annotations

import dataclasses

from methods.common.base import require
from methods.common.peft_adapters import AdapterConfig, PeftAdapter, require_positive, target_modules


@dataclasses.dataclass
class LoKrConfig(AdapterConfig):
    rank: int = 8
    alpha: float = 8.0
    decompose_factor: int = -1  # -1: the factor pair closest to the square root of each dimension

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(rank=self.rank, alpha=self.alpha)
        require(
            self.decompose_factor == -1 or self.decompose_factor >= 1,
            f"method.decompose_factor={self.decompose_factor} must be -1 (automatic) or >= 1",
        )


class LoKr(PeftAdapter):
    name = "lokr"
    display_name = "LoKr"
    color = "#117733"
    Config = LoKrConfig

    def peft_config(self):
        from peft import LoKrConfig as PeftLoKrConfig

        cfg = self.cfg
        return PeftLoKrConfig(
            r=cfg.rank,
            alpha=cfg.alpha,
            decompose_factor=cfg.decompose_factor,
            target_modules=target_modules(),
        )
