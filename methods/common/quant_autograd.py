"""The scale-trained quantized layers as the official TuneQDM layer runs them (``layer_impl=autograd``).

ugonfor/TuneQDM's ``TQLinear`` / ``TQConv2d`` build the float weight with plain autograd,

    weight = (weight_int.float() - zero_point) * delta_out * delta_in;  F.linear(x, weight)

so autograd keeps, per layer until the backward, ``weight_int.float() - zero_point`` (for
delta_out's gradient), its product with delta_out (for delta_in's) and the weight itself (for
the input's gradient): three fp32 weight-sized tensors (two without a trained delta_in: PEQA's
``(q - z) * s``). Ours (``layer_impl=recompute``, methods.common.quant) saves only the layer's
input and rebuilds the weight in the backward, one layer at a time. Same loss and gradients (up
to fp32 rounding); this variant exists so that the memory predictor can put the official
layer's peak beside the papers' memory column (docs/memory.md).
"""

from __future__ import annotations

import torch

from methods.common.quant import QuantizedLayer

LAYER_IMPLS = ("recompute", "autograd")


def autograd_output(
    base: QuantizedLayer, x: torch.Tensor, scale_out: torch.Tensor, scale_in: torch.Tensor | None = None
) -> torch.Tensor:
    """op(x, (q - zp) * scale_out[:, None] * scale_in[None, :]) without the bias, every
    intermediate kept by autograd as in the official layer (the weight is built in fp32 and cast
    to the input's dtype, as ``weight_float.to(x.dtype)`` there)."""
    integer = base._centered_integer(torch.float32)  # official: weight_int.float() - zero_point
    weight = integer * scale_out.float().reshape(-1, *([1] * (integer.dim() - 1)))
    if scale_in is not None:
        if base.is_conv and base.groups != 1:
            raise ValueError(
                f"layer_impl=autograd: a grouped convolution (groups={base.groups}) has no delta_in"
            )
        weight = weight * scale_in.float().reshape(1, -1, *([1] * (integer.dim() - 2)))
    return base._op(x, weight.to(x.dtype))


class AutogradQuantizedLayer(QuantizedLayer):
    """A QuantizedLayer whose trained scale is backpropagated by plain autograd (PEQA's
    ``layer_impl=autograd``); set on an existing layer with ``use_autograd``."""

    def quantized_output(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return autograd_output(self, x, self.scale if scale is None else scale)


def use_autograd(layer: QuantizedLayer) -> QuantizedLayer:
    """``layer`` itself, its forward now the plain-autograd one (no copy of its tensors)."""
    layer.__class__ = AutogradQuantizedLayer
    return layer
