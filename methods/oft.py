"""OFT (Qiu et al., 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"): each
attention projection's weight is rotated by a learned block-diagonal orthogonal matrix (``blocks``
blocks over its input dimension; Cayley parametrisation), through peft's ``OFTConfig``. Trained by
the LoRA method's DreamBooth step; ``apply`` merges the rotation into the stock U-Net
(methods/common/peft_adapters.py).
"""

from __future__ import annotations

import dataclasses

from methods.common.peft_adapters import AdapterConfig, PeftAdapter, require_positive, target_modules


@dataclasses.dataclass
class OFTConfig(AdapterConfig):
    blocks: int = 4  # peft's OFTConfig.r: blocks per layer (in_features must divide by it)
    coft: bool = False
    use_cayley_neumann: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(blocks=self.blocks)


class OFT(PeftAdapter):
    name = "oft"
    display_name = "OFT"
    color = "#88CCEE"
    Config = OFTConfig

    def peft_config(self):
        from peft import OFTConfig as PeftOFTConfig

        cfg = self.cfg
        return PeftOFTConfig(
            r=cfg.blocks, oft_block_size=0, coft=cfg.coft, use_cayley_neumann=cfg.use_cayley_neumann,
            target_modules=target_modules(),
        )  # fmt: skip
