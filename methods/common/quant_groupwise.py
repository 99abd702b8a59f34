"""Affine group-wise integer weights (frozen): optimum-quanto's ``qint4``
weights, the ZOODiP paper's INT4. The weight, flattened per output channel, is cut into
groups of ``quanto_group_size`` values (128, or the largest multiple of 32 above 32 dividing
the row; one group per row if none does or the row is <= 128 long); per group
``scale = (max - min) / (2^bits - 1)``, ``shift = -min`` (a float), ``q = round((w + shift) /
scale)`` in ``[0, 2^bits - 1]`` and ``dequantized = q * scale - shift``: quanto's MaxOptimizer
and ``quantize_affine``.

The codes are packed as in ``methods.common.quant`` (two 4-bit codes per byte); layers are
``QuantizedLayer`` subclasses, so ``quantized_layers`` and the memory accounting see them.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.common.quant import QuantizedLayer, _pack_nibbles, _unpack_nibbles, arithmetic_view


def quanto_group_size(row_numel: int, group_size: int = 128) -> int:
    """optimum-quanto's group size for a row of ``row_numel`` weights (QModuleMixin): 128, else
    the largest multiple of 32 (> 32) below it that divides the row, else the whole row."""
    if row_numel <= group_size:
        return row_numel
    while row_numel % group_size and group_size > 32:
        group_size -= 32
    return group_size if row_numel % group_size == 0 else row_numel


def quantize_affine_groups(weight: torch.Tensor, bits: int, group_size: int, arithmetic: str = "fp32"):
    """(codes uint8 (groups, group_size) in [0, 2^bits - 1], scale (groups,), shift (groups,)),
    computed in fp32 or (``arithmetic="weight"``, as quanto) in the weight's dtype."""
    w = arithmetic_view(weight, arithmetic).reshape(-1, group_size)
    w_min, w_max = w.amin(dim=1), w.amax(dim=1)
    scale = (w_max - w_min) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: q = 0, exact
    shift = -w_min
    q = torch.round((w + shift[:, None]) / scale[:, None]).clamp(0, 2**bits - 1)
    return q.to(torch.uint8), scale, shift


class GroupwiseQuantizedLayer(QuantizedLayer):
    """A frozen Linear/Conv2d with affine group-wise integer weights (quanto's qint4); its
    ``scale`` and ``shift`` (one per group) are frozen buffers-as-parameters in the float dtype."""

    def __init__(
        self,
        layer,
        bits: int = 4,
        group_size: int = 128,
        scale_dtype: torch.dtype | None = None,
        arithmetic: str = "fp32",
    ):
        nn.Module.__init__(self)
        if bits not in (4, 8):
            raise ValueError(f"bits={bits}; quantization supports 4 or 8 bits")
        self._copy_geometry(layer)
        self.bits, self.symmetric = bits, False
        self.group_size = quanto_group_size(layer.weight[0].numel(), group_size)
        codes, scale, shift = quantize_affine_groups(layer.weight, bits, self.group_size, arithmetic)
        device = layer.weight.device
        qweight = codes.reshape(-1) if bits == 8 else _pack_nibbles(codes)
        self.register_buffer("qweight", qweight.to(device))
        self.register_buffer("zero_point", None)
        self.scale = nn.Parameter(scale.to(device, scale_dtype), requires_grad=False)
        self.shift = nn.Parameter(shift.to(device, scale_dtype), requires_grad=False)
        self.bias = (
            None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        )

    def integer_weight(self) -> torch.Tensor:
        """The codes in [0, 2^bits - 1] as int16, (groups, group_size)."""
        numel = self.qweight.numel() if self.bits == 8 else torch.Size(self.weight_shape).numel()
        codes = self.qweight if self.bits == 8 else _unpack_nibbles(self.qweight, numel)
        return codes.to(torch.int16).reshape(-1, self.group_size)

    def _dequantize(self, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if scale.requires_grad:
            raise RuntimeError("group-wise quantized layers are frozen: their scales cannot be trained")
        codes = self.integer_weight().to(dtype)
        weight = codes * scale.to(dtype)[:, None] - self.shift.to(dtype)[:, None]
        return weight.reshape(self.weight_shape)

    def extra_repr(self) -> str:
        kind = "conv2d" if self.is_conv else "linear"
        return f"{kind}, weight={self.weight_shape}, bits={self.bits}, affine, group_size={self.group_size}"


def quantize_model_groupwise(
    module: nn.Module,
    bits: int = 4,
    group_size: int = 128,
    scale_dtype: torch.dtype | None = None,
    arithmetic: str = "fp32",
) -> int:
    """As ``quantize_model``, with affine group-wise layers (quanto's qint4 scheme)."""
    targets = [(n, c) for n, c in module.named_modules() if n and isinstance(c, (nn.Linear, nn.Conv2d))]
    for name, child in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, GroupwiseQuantizedLayer(child, bits, group_size, scale_dtype, arithmetic))
    return len(targets)
