"""Plain LoRA (Hu et al., 2022) on the U-Net: the diffusers train_dreambooth_lora recipe.

The baseline of the Hollowed Net paper (LoRA r=128 and r=1; ranks 4 and 16 in its appendix):
``method=lora method.rank=128``. peft LoRA on the attention projections (to_q, to_k, to_v,
to_out.0), the DreamBooth training step of ``methods.common.unet_finetune`` (instance prompt "a photo
of sks dog", AdamW, gradient clipping). The stored file is a diffusers LoRA file; ``apply``
loads it into a stock pipeline and fuses it into the weights (no inference overhead).
Hollowed Net and selective BP-low / ZO-high build on this class.
"""

from __future__ import annotations

import dataclasses

import torch

from methods.common.base import require
from methods.common.lora_io import add_unet_lora, load_unet_lora, unet_lora_state_dict
from methods.common.unet_finetune import UNetFinetune, UNetFinetuneConfig


@dataclasses.dataclass
class LoRAConfig(UNetFinetuneConfig):
    rank: int = 4
    lora_alpha: float | None = None  # None: = rank (diffusers example)
    lora_init_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.rank >= 1, f"method.rank={self.rank} must be >= 1")
        require(
            self.lora_alpha is None or self.lora_alpha > 0,
            f"method.lora_alpha={self.lora_alpha} must be > 0 (or null for alpha = rank)",
        )


class LoRA(UNetFinetune):
    name = "lora"
    display_name = "LoRA"
    color = "#999999"
    Config = LoRAConfig
    artifact_filename = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights uses

    def prepare(self, components, subject):
        cfg = self.cfg
        return add_unet_lora(components.unet, cfg.rank, cfg.lora_alpha, init_seed=cfg.lora_init_seed)

    def backprop_step(self, loss: torch.Tensor) -> torch.Tensor:
        """The optimisation half of UNetFinetune.step, for subclasses with their own forward."""
        self.optimize(loss, list(self.params.values()), self.cfg.max_grad_norm)
        return loss.detach()

    def state_dict(self):
        return unet_lora_state_dict(self.c.unet)

    def apply(self, pipeline, artifact) -> None:
        load_unet_lora(pipeline, artifact)
        pipeline.fuse_lora()  # merged into the weights: the stock U-Net's inference cost
        pipeline.unload_lora_weights()  # drops the adapter layers, keeps the fused weights
