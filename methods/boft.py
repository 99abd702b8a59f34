"""BOFT (Liu et al., 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
Factorization"): each attention projection's weight is rotated by a product of
``butterfly_factor`` sparse orthogonal matrices (block-diagonal, ``blocks`` blocks, between
butterfly permutations), through peft's ``BOFTConfig``. Trained by the LoRA method's DreamBooth
step; ``apply`` merges the rotation into the stock U-Net (methods/common/peft_adapters.py).
"""

from __future__ import annotations

import dataclasses

from methods.common.base import require
from methods.common.peft_adapters import AdapterConfig, PeftAdapter, require_positive, target_modules


@dataclasses.dataclass
class BOFTConfig(AdapterConfig):
    blocks: int = 32  # peft's boft_block_num (in_features must divide by it)
    butterfly_factor: int = 5  # peft's boft_n_butterfly_factor (1: OFT)
    dropout: float = 0.1  # multiplicative dropout of whole blocks (training only)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(blocks=self.blocks, butterfly_factor=self.butterfly_factor)
        require(0 <= self.dropout < 1, f"method.dropout={self.dropout} must be in [0, 1)")
        factors = 2 ** (self.butterfly_factor - 1)
        require(
            self.blocks % factors == 0,
            f"method.blocks={self.blocks} must be a multiple of 2^(butterfly_factor - 1) = {factors}",
        )


class BOFT(PeftAdapter):
    name = "boft"
    display_name = "BOFT"
    color = "#332288"
    Config = BOFTConfig

    def peft_config(self):
        from peft import BOFTConfig as PeftBOFTConfig

        cfg = self.cfg
        return PeftBOFTConfig(
            boft_block_num=cfg.blocks, boft_block_size=0, boft_n_butterfly_factor=cfg.butterfly_factor,
            boft_dropout=cfg.dropout, target_modules=target_modules(),
        )  # fmt: skip
