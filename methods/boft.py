"""BOFT (Liu et al., 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
Factorization"): each attention projection's weight is rotated by a product of
``butterfly_factor`` sparse orthogonal matrices (block-diagonal with blocks of ``block_size``,
or ``blocks`` blocks, between butterfly permutations), through peft's ``BOFTConfig``. Trained by
the LoRA method's DreamBooth step; ``apply`` merges the rotation into the stock U-Net
(methods/common/peft_adapters.py).

peft builds butterfly factors > 1 only when its CUDA extension (``fbd_cuda``, compiled at first
use: needs ninja and the CUDA toolkit) loads; without it peft silently trains one factor (OFT with
one block-diagonal rotation). Here that is an error, not a silent change of method. The defaults
are peft's (4 x 4 blocks, one factor), which run anywhere; the BOFT authors' DreamBooth setting
(``method.blocks=32 method.block_size=0 method.butterfly_factor=5``) needs the extension.
"""

from __future__ import annotations

import dataclasses

from methods.common.base import require
from methods.common.peft_adapters import AdapterConfig, PeftAdapter, require_positive, target_modules


@dataclasses.dataclass
class BOFTConfig(AdapterConfig):
    block_size: int = 4  # peft's boft_block_size (in_features must divide by it); or 0 and ``blocks``
    blocks: int = 0  # peft's boft_block_num; exactly one of block_size and blocks is nonzero
    butterfly_factor: int = 1  # peft's boft_n_butterfly_factor (1: one block-diagonal rotation)
    dropout: float = 0.0  # multiplicative dropout of whole blocks (training only)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(butterfly_factor=self.butterfly_factor)
        require(
            self.block_size >= 0 and self.blocks >= 0 and (self.block_size == 0) != (self.blocks == 0),
            f"method.block_size={self.block_size}, method.blocks={self.blocks}: set exactly one of them "
            "(> 0) and the other to 0",
        )
        require(0 <= self.dropout < 1, f"method.dropout={self.dropout} must be in [0, 1)")


class BOFT(PeftAdapter):
    name = "boft"
    display_name = "BOFT"
    color = "#332288"
    Config = BOFTConfig

    def peft_config(self):
        from peft import BOFTConfig as PeftBOFTConfig

        cfg = self.cfg
        return PeftBOFTConfig(
            boft_block_size=cfg.block_size, boft_block_num=cfg.blocks,
            boft_n_butterfly_factor=cfg.butterfly_factor, boft_dropout=cfg.dropout,
            target_modules=target_modules(),
        )  # fmt: skip

    def prepare(self, components, subject):
        params = super().prepare(components, subject)
        factors = {p.shape[0] for name, p in params.items() if name.endswith(".boft_R")}
        require(
            factors == {self.cfg.butterfly_factor},
            f"method.butterfly_factor={self.cfg.butterfly_factor} but peft built {sorted(factors)} "
            "factor(s): "
            "its BOFT CUDA extension (fbd_cuda: ninja and the CUDA toolkit) did not load; install them "
            "or set method.butterfly_factor=1",
        )
        return params
