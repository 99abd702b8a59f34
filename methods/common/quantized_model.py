"""The frozen, weight-quantized Stable Diffusion of ZOODiP: INT8 (or INT4) weights for every
Linear and Conv2d of the U-Net, VAE and text encoder; embeddings and norms stay in the model's
float dtype.

Storage is ``methods.common.quant`` (the suite's one quantizer): symmetric per-output-channel
codes, one scale per output channel, dequantized on the fly one layer at a time. For
``int8`` this is the storage of optimum-quanto's ``qint8`` weights that the official ZOODiP
code uses (int8 data + one scale per output channel, activations in the float dtype).
torchao's int8 weight-only quantization and bitsandbytes' Int8 cover nn.Linear only, not the
U-Net's and VAE's Conv2d, hence the shared quantizer. ``int4`` is, by default, quanto's
``qint4`` as the paper used it: affine, group size 128 (``methods.common.quant_groupwise``);
``int4_scheme=symmetric_channel`` keeps the per-output-channel symmetric codes. ``scope``
says which networks are quantized: ``all`` (the paper's INT8 model, 96.4 % of the weights) or
``unet`` (its INT4 model, Table S8).

The scales are kept in the model's float dtype (as quanto does) so that diffusers'
``module.dtype`` (its first floating parameter) still names the activation dtype.
"""

from __future__ import annotations

import torch

from methods.common.base import require
from methods.common.quant import quantize_model, quantized_layers
from methods.common.quant_groupwise import quantize_model_groupwise

QUANTIZE_BITS = {"int8": 8, "int4": 4, "none": None}
INT4_SCHEMES = ("affine_group128", "symmetric_channel")
NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")  # the last: SDXL only
SCOPES = {"all": NETWORKS, "unet": ("unet",)}


def check_quantize(mode: str, int4_scheme: str = "affine_group128", scope: str = "all") -> None:
    require(mode in QUANTIZE_BITS, f"method.quantize={mode!r}; choose one of: {', '.join(QUANTIZE_BITS)}")
    require(
        int4_scheme in INT4_SCHEMES,
        f"method.int4_scheme={int4_scheme!r}; choose one of: {', '.join(INT4_SCHEMES)}",
    )
    require(scope in SCOPES, f"method.quantize_scope={scope!r}; choose one of: {', '.join(SCOPES)}")


def quantize_frozen(
    module: torch.nn.Module,
    mode: str,
    dtype: torch.dtype | None = None,
    int4_scheme: str = "affine_group128",
    arithmetic: str = "fp32",
) -> int:
    """Quantize every Linear/Conv2d of ``module`` in place (``mode`` int8 | int4 | none); the
    scales take ``dtype`` (default: the module's float dtype); ``arithmetic``: fp32 or the
    weight's own dtype (quanto's, ``methods.common.quant``). Returns how many layers."""
    check_quantize(mode, int4_scheme)
    bits = QUANTIZE_BITS[mode]
    if bits is None:
        return 0
    if dtype is None:
        dtype = next(p.dtype for p in module.parameters() if p.is_floating_point())
    if bits == 4 and int4_scheme == "affine_group128":
        return quantize_model_groupwise(module, 4, 128, dtype, arithmetic)
    return quantize_model(module, bits, True, scale_dtype=dtype, arithmetic=arithmetic)


def quantize_networks(
    networks, mode: str, scope: str = "all", int4_scheme: str = "affine_group128", arithmetic: str = "fp32"
) -> dict[str, int]:
    """Quantize ``networks.unet`` (and, with scope ``all``, ``.vae``, ``.text_encoder`` and SDXL's
    ``.text_encoder_2``) of Components or a pipeline; returns the layer count per network (0 where
    not quantized)."""
    check_quantize(mode, int4_scheme, scope)
    return {
        name: quantize_frozen(module, mode, None, int4_scheme, arithmetic) if name in SCOPES[scope] else 0
        for name, module in _networks(networks)
    }


def _networks(networks) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n in NETWORKS if (m := getattr(networks, n, None)) is not None]


def quantized_fraction(networks) -> float:
    """Share of the weights (parameters and integer codes) stored as integers; the ZOODiP
    paper reports 96.4 % for SD1.5."""
    integer = floating = 0
    for _, module in _networks(networks):
        for layer in quantized_layers(module).values():
            integer += int(torch.Size(layer.weight_shape).numel())
        floating += sum(p.numel() for p in module.parameters())
    total = integer + floating
    return integer / total if total else 0.0
