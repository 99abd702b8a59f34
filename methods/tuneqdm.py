"""TuneQDM (Ryu et al., ECCV 2024), after the official code (ugonfor/TuneQDM): the U-Net's
Linear/Conv2d layers quantized per output channel by asymmetric min-max INT8, integer
weights frozen, and N timestep-aware sets of trainable scales; the set used at timestep t
is floor(t * N / T). Each set has ``delta_out`` (per output channel, initialised to the
quantization scale) and, optionally, ``delta_in`` (per input channel, initialised to 1):

    W_k = (q - zero_point) * delta_out[k][:, None] * delta_in[k][None, :]

Per-channel scales commute with the matmul/convolution, so each sample of a batch uses its
own set: ``y = op(x * delta_in[k], W_ref) * delta_out[k] / scale_ref + bias``, with
``W_ref = (q - zero_point) * scale_ref`` and ``scale_ref`` the frozen initial scale (the
official code picks one set per batch, from its first sample). A forward pre-hook on the
U-Net reads the timestep argument, so a stock pipeline with the scales installed picks the
set at every denoising step by itself.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from methods.common.base import SCALES_TEACHER, require
from methods.common.quant import QuantizedLayer
from methods.common.quant_autograd import autograd_output
from methods.common.unet_finetune import UNetFinetune
from methods.peqa import ScaleTuningConfig, check_artifact_keys, quantize_unet


@dataclasses.dataclass
class TuneQDMConfig(ScaleTuningConfig):
    quant_range: str = "minmax"  # official TuneQDM: no widening to include 0
    timestep_sets: int = 4
    train_delta_in: bool = True
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.timestep_sets >= 1, f"method.timestep_sets={self.timestep_sets} must be >= 1")
        require(
            self.num_train_timesteps >= self.timestep_sets,
            f"method.num_train_timesteps={self.num_train_timesteps} must be >= "
            f"method.timestep_sets={self.timestep_sets}",
        )


class TimestepSets:
    """The scale-set index of every sample of the U-Net's current call, shared by its layers."""

    def __init__(self, num_sets: int, num_train_timesteps: int):
        self.num_sets, self.num_train_timesteps = num_sets, num_train_timesteps
        self.index: torch.Tensor | None = None

    def set_from_timesteps(self, timesteps, batch_size: int, device) -> None:
        t = torch.as_tensor(timesteps, device=device).reshape(-1).expand(batch_size)
        index = torch.div(t * self.num_sets, self.num_train_timesteps, rounding_mode="floor")
        self.index = index.long().clamp(0, self.num_sets - 1)

    def unet_pre_hook(self, unet, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.set_from_timesteps(timestep, sample.shape[0], sample.device)


class TimestepScaledLayer(nn.Module):
    """A QuantizedLayer (frozen, its ``scale`` the reference) with N sets of trainable scales."""

    def __init__(self, base: QuantizedLayer, sets: TimestepSets, with_delta_in: bool):
        super().__init__()
        self.base = base
        self.sets = sets  # a plain object, not a submodule
        n = sets.num_sets
        in_channels = base.weight_shape[1] * (base.groups if base.is_conv else 1)
        self.delta_out = nn.Parameter(base.scale.detach().clone().repeat(n, 1))
        self.delta_in = (
            nn.Parameter(torch.ones(n, in_channels, device=base.scale.device, dtype=base.scale.dtype))
            if with_delta_in
            else None
        )

    @property
    def in_features(self) -> int:  # SDXL's pipeline reads add_embedding.linear_1.in_features
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def _per_sample(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, C) -> broadcastable over x's channel axis (dim 1 for conv, last for linear)."""
        if self.base.is_conv:
            return values[:, :, None, None]
        return values.reshape(values.shape[0], *([1] * (x.dim() - 2)), values.shape[1])

    def set_index(self, x: torch.Tensor) -> torch.Tensor:
        index = self.sets.index
        if index is None or index.shape[0] != x.shape[0]:
            raise RuntimeError(
                "TuneQDM layers need the timestep of every sample: call them through the U-Net, "
                "whose forward pre-hook sets it"
            )
        return index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self.set_index(x)
        if self.delta_in is not None:
            x = x * self._per_sample(self.delta_in[index], x).to(x.dtype)
        y = self.base.quantized_output(x)  # with the frozen reference scale
        ratio = self.delta_out[index] / self.base.scale.detach()
        return self.base.add_bias(y * self._per_sample(ratio, y).to(y.dtype))


class AutogradTimestepScaledLayer(TimestepScaledLayer):
    """``layer_impl=autograd``: the official TQLinear/TQConv2d forward, the fp32 weight built from
    the integer one by plain autograd (methods.common.quant_autograd) with one set per batch, the
    first sample's, as the official code picks it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.set_index(x)[0]
        delta_in = None if self.delta_in is None else self.delta_in[k]
        return self.base.add_bias(autograd_output(self.base, x, self.delta_out[k], delta_in))


def timestep_scaled_unet(
    unet, cfg: TuneQDMConfig, scale_dtype: torch.dtype | None = None
) -> dict[str, TimestepScaledLayer]:
    """Quantize ``unet``, wrap every quantized layer with scale sets (fp32, or ``scale_dtype``
    as in ``quantize_unet``), install the pre-hook."""
    sets = TimestepSets(cfg.timestep_sets, cfg.num_train_timesteps)
    layers = {}
    for name, base in quantize_unet(unet, cfg, scale_dtype).items():
        kind = AutogradTimestepScaledLayer if cfg.layer_impl == "autograd" else TimestepScaledLayer
        layer = kind(base, sets, cfg.train_delta_in)
        parent_name, _, attr = name.rpartition(".")
        setattr(unet.get_submodule(parent_name) if parent_name else unet, attr, layer)
        layers[name] = layer
    unet.register_forward_pre_hook(sets.unet_pre_hook, with_kwargs=True)
    return layers


def scale_tensors(layers: dict[str, TimestepScaledLayer]) -> dict[str, nn.Parameter]:
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.delta_out"] = layer.delta_out
        if layer.delta_in is not None:
            tensors[f"{name}.delta_in"] = layer.delta_in
    return tensors


class TuneQDM(UNetFinetune):
    name = "tuneqdm"
    display_name = "TuneQDM"
    color = "#CC79A7"
    teacher_kind = SCALES_TEACHER
    Config = TuneQDMConfig
    artifact_filename = "scales.safetensors"

    def prepare(self, components, subject):
        params = scale_tensors(timestep_scaled_unet(components.unet, self.cfg))
        for p in params.values():
            p.requires_grad_(True)
        return params

    def state_dict(self):
        return {k: v.detach() for k, v in self.params.items()}

    def apply_weights_dtype(self):
        return torch.float32  # quantize the fp32 weights, as in training: the same integer codes

    def apply(self, pipeline, artifact) -> None:
        tensors = scale_tensors(timestep_scaled_unet(pipeline.unet, self.cfg, pipeline.unet.dtype))
        check_artifact_keys(artifact, set(tensors), "TuneQDM")
        with torch.no_grad():
            for key, tensor in tensors.items():
                tensor.copy_(artifact[key])

    def record_extras(self):
        return {**super().record_extras(), "timestep_sets": self.cfg.timestep_sets}
