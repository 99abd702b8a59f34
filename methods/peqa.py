"""PEQA (Kim et al., NeurIPS 2023), on the diffusers DreamBooth script as in the ZOODiP paper:
every Linear and Conv2d of the U-Net quantized per output channel by round-to-nearest
min-max (asymmetric, with zero points: the paper's Eq. 2), integer weights and zero points
frozen, only the per-channel scales trained. The stored artifact is the scales; a stock
pipeline is quantized the same way (deterministic, from its own weights) and takes them.
"""

from __future__ import annotations

import dataclasses

import torch

from methods.common.base import SCALES_TEACHER, require
from methods.common.quant import quantize_model, quantized_layers
from methods.common.quant_autograd import LAYER_IMPLS, use_autograd
from methods.common.unet_finetune import UNetFinetune, UNetFinetuneConfig

QUANT_RANGES = ("include_zero", "minmax")


@dataclasses.dataclass
class ScaleTuningConfig(UNetFinetuneConfig):
    bits: int = 8
    symmetric: bool = False
    # asymmetric codes' range: include_zero (each row's [min, max] widened to include 0: PEQA's
    # reading of its Eq. 2) | minmax (the row's own [min, max]: the official TuneQDM code)
    quant_range: str = "include_zero"
    layer_impl: str = "recompute"  # methods.common.quant_autograd: recompute | autograd

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.bits in (4, 8), f"method.bits={self.bits}; choose 8 (INT8) or 4 (INT4)")
        require(
            self.quant_range in QUANT_RANGES,
            f"method.quant_range={self.quant_range!r}; choose one of: {', '.join(QUANT_RANGES)}",
        )
        require(
            self.layer_impl in LAYER_IMPLS,
            f"method.layer_impl={self.layer_impl!r}; choose one of: {', '.join(LAYER_IMPLS)}",
        )


def quantize_unet(unet, cfg: ScaleTuningConfig, scale_dtype: torch.dtype | None = None):
    """All U-Net Linear/Conv2d layers -> QuantizedLayer; returns them by name. The scales are
    fp32 unless ``scale_dtype`` is given: a pipeline passes its own dtype, so that an fp16
    U-Net stays fp16 throughout (diffusers reads ``unet.dtype`` off its parameters)."""
    include_zero = cfg.quant_range == "include_zero"
    quantize_model(unet, cfg.bits, cfg.symmetric, scale_dtype=scale_dtype, include_zero=include_zero)
    return quantized_layers(unet)


def check_artifact_keys(artifact, expected: set[str], method: str) -> None:
    if set(artifact) != expected:
        missing, extra = sorted(expected - set(artifact)), sorted(set(artifact) - expected)
        raise ValueError(
            f"{method} artifact does not fit this U-Net: missing {missing[:3]}, unexpected {extra[:3]} "
            "(was it trained on another model?)"
        )


class PEQA(UNetFinetune):
    name = "peqa"
    display_name = "PEQA"
    color = "#009E73"
    teacher_kind = SCALES_TEACHER
    Config = ScaleTuningConfig
    artifact_filename = "scales.safetensors"

    def prepare(self, components, subject):
        layers = quantize_unet(components.unet, self.cfg)
        for layer in layers.values():
            layer.scale.requires_grad_(True)
            if self.cfg.layer_impl == "autograd":
                use_autograd(layer)
        return {f"{name}.scale": layer.scale for name, layer in layers.items()}

    def state_dict(self):
        return {k: v.detach() for k, v in self.params.items()}

    def apply_weights_dtype(self):
        return torch.float32  # quantize the fp32 weights, as in training: the same integer codes

    def apply(self, pipeline, artifact) -> None:
        layers = quantize_unet(pipeline.unet, self.cfg, scale_dtype=pipeline.unet.dtype)
        check_artifact_keys(artifact, {f"{name}.scale" for name in layers}, "PEQA")
        with torch.no_grad():
            for name, layer in layers.items():
                layer.scale.copy_(artifact[f"{name}.scale"])

    def record_extras(self):
        return {**super().record_extras(), "quantized_layers": len(self.params)}
