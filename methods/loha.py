"""LoHa (Hyeon-Woo et al., 2022, FedPara; the LyCORIS family for Stable Diffusion, Yeh et al.,
2024): the weight change of each attention projection is the Hadamard product of two rank-r
products, ``(B1 A1) * (B2 A2) * alpha / r``, through peft's ``LoHaConfig``. Trained by the LoRA
method's DreamBooth step; ``apply`` merges it into the stock U-Net (methods/common/peft_adapters.py).
"""

from __future__ import annotations

import dataclasses

from methods.common.peft_adapters import AdapterConfig, PeftAdapter, require_positive, target_modules


@dataclasses.dataclass
class LoHaConfig(AdapterConfig):
    rank: int = 8
    alpha: float = 8.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(rank=self.rank, alpha=self.alpha)


class LoHa(PeftAdapter):
    name = "loha"
    display_name = "LoHa"
    color = "#44AA99"
    Config = LoHaConfig

    def peft_config(self):
        from peft import LoHaConfig as PeftLoHaConfig

        return PeftLoHaConfig(r=self.cfg.rank, alpha=self.cfg.alpha, target_modules=target_modules())
