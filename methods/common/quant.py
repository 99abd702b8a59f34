"""Per-output-channel integer weight quantization of Linear and Conv2d layers.

One implementation for PEQA, TuneQDM and ZOODiP's frozen INT8/INT4 model. The integer
weights live in memory as integers and are dequantized on the fly, one layer at a time:

- ``bits=8``: ``qweight`` is an int8 tensor of the weight's shape.
- ``bits=4``: ``qweight`` is a flat uint8 tensor holding two 4-bit codes per byte (low
  nibble first); ``integer_weight()`` unpacks it.

Symmetric: ``scale = max|w| / (2^(bits-1) - 1)``, ``q`` in ``[-(2^(bits-1)-1), 2^(bits-1)-1]``,
no zero point. Asymmetric min-max (PEQA, TuneQDM): ``scale = (max - min) / (2^bits - 1)``,
``zero_point = round(-min / scale)``, ``q`` in ``[0, 2^bits - 1]``; with ``include_zero`` (PEQA)
min and max are first widened to include 0, without it (official TuneQDM) a row of one sign keeps
its own range and its zero point lies outside ``[0, 2^bits - 1]``. Unsigned 8-bit codes do
not fit int8, so they are stored shifted by -128 together with the zero point (the
difference ``q - zero_point`` is unchanged): ``dequantized = (integer - zero_point) * scale``
holds for every case. 4-bit codes are stored as ``q + 8`` (symmetric) or ``q`` (asymmetric).

``arithmetic``: where scale and codes are computed. ``fp32`` (default): from the weight's values
in fp32. ``weight``: in the weight's own dtype, as optimum-quanto does (``scale = max|w| / qmax``
and ``w / scale`` each rounded to that dtype, codes clamped to the int8 range, so -128 can occur);
for fp32 weights the two agree, for fp16 and bf16 weights some codes differ by one
(tests/methods/test_quant_quanto.py). Asymmetric codes are always computed in fp32.

Affine group-wise int4 (quanto's ``qint4``): ``methods.common.quant_groupwise``.

Backprop through the scale does not keep a float copy of the weight alive until
backward: ``_QuantizedOp`` saves only the layer's input and recomputes the dequantized
weight in backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=1).reshape(-1)[:numel]


ARITHMETICS = ("fp32", "weight")


def arithmetic_view(weight: torch.Tensor, arithmetic: str) -> torch.Tensor:
    """``weight`` detached, in the dtype its scale and codes are computed in (module docstring)."""
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic={arithmetic!r}; choose one of: {', '.join(ARITHMETICS)}")
    return weight.detach() if arithmetic == "weight" else weight.detach().float()


def quantize_per_channel(
    weight: torch.Tensor, bits: int, symmetric: bool, arithmetic: str = "fp32", include_zero: bool = True
):
    """(integer codes as int16 of ``weight``'s shape, scale (out,), zero_point (out,) or None).
    Codes and zero point are in the "integer" domain of the module docstring."""
    if symmetric and arithmetic == "weight":  # quanto's ops on the weight's own shape, bit for bit
        w, qmax = weight.detach(), 2 ** (bits - 1) - 1
        scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w / scale).clamp(-qmax - 1, qmax)  # quanto clamps to the int range: bf16 can
        return q.to(torch.int16), scale.reshape(-1), None  # round max|w| / scale to 127.5 -> -128
    w = arithmetic_view(weight, arithmetic).float().reshape(weight.shape[0], -1)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().amax(dim=1) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w / scale[:, None]).clamp(-qmax, qmax)
        return q.to(torch.int16).reshape(weight.shape), scale, None
    levels = 2**bits - 1
    w_min, w_max = w.amin(dim=1), w.amax(dim=1)
    # include_zero: the range includes 0, so 0 is exactly representable. Otherwise the row's own
    # [min, max] (official TuneQDM); a constant row keeps the widened range, where it is exact.
    widen = torch.ones_like(w_min, dtype=torch.bool) if include_zero else w_min == w_max
    w_min = torch.where(widen, w_min.clamp(max=0), w_min)
    w_max = torch.where(widen, w_max.clamp(min=0), w_max)
    scale = (w_max - w_min) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.round(-w_min / scale)
    zero_point = torch.where(widen, zero_point.clamp(0, levels), zero_point)  # else: may lie outside
    q = torch.round(w / scale[:, None] + zero_point[:, None]).clamp(0, levels)
    shift = 128 if bits == 8 else 0
    zero_point = zero_point - shift
    zp_dtype = torch.int16 if zero_point.abs().max() < 2**15 else torch.int32
    return (q - shift).to(torch.int16).reshape(weight.shape), scale, zero_point.to(zp_dtype)


class _QuantizedOp(torch.autograd.Function):
    """y = op(x, dequantized(q, scale)) without saving the float weight for backward."""

    @staticmethod
    def forward(ctx, x, scale, layer):
        device = x.device.type
        if torch.is_autocast_enabled(device):  # as autocast's own linear/conv: half input, saved so
            x = x.to(torch.get_autocast_dtype(device))
        ctx.layer, ctx.x_shape = layer, x.shape
        ctx.save_for_backward(x if scale.requires_grad else None, scale)
        weight = layer._dequantize(scale, x.dtype)
        return layer._op(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        x, scale = ctx.saved_tensors
        grad_x = grad_scale = None
        need_x, need_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_x or need_scale:
            weight = layer._dequantize(scale, grad_out.dtype)
        if need_x:
            grad_x = layer._grad_input(grad_out, weight, ctx.x_shape)
        if need_scale:
            grad_weight = layer._grad_weight(x, grad_out)  # transient, one layer at a time
            integer = layer._centered_integer(torch.float32)
            grad_scale = (grad_weight.float() * integer).reshape(integer.shape[0], -1).sum(dim=1)
            grad_scale = grad_scale.to(scale.dtype)
        return grad_x, grad_scale, None


class QuantizedLayer(nn.Module):
    """A frozen integer Linear/Conv2d with a per-output-channel ``scale`` (an nn.Parameter,
    frozen unless a method trains it; fp32 unless ``scale_dtype`` is given) and the original
    (frozen) ``bias``."""

    def __init__(
        self,
        layer: nn.Linear | nn.Conv2d,
        bits: int = 8,
        symmetric: bool = True,
        scale_dtype: torch.dtype | None = None,
        arithmetic: str = "fp32",
        include_zero: bool = True,
    ):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits={bits}; quantization supports 4 or 8 bits")
        self.bits, self.symmetric = bits, symmetric
        self._copy_geometry(layer)
        integer, scale, zero_point = quantize_per_channel(
            layer.weight, bits, symmetric, arithmetic, include_zero
        )
        device = layer.weight.device
        if bits == 8:
            qweight = integer.to(torch.int8)
        else:
            qweight = _pack_nibbles(integer + (8 if symmetric else 0))
        self.register_buffer("qweight", qweight.to(device))
        self.register_buffer("zero_point", None if zero_point is None else zero_point.to(device))
        self.scale = nn.Parameter(scale.to(device, scale_dtype), requires_grad=False)
        self.bias = (
            None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        )

    def _copy_geometry(self, layer: nn.Linear | nn.Conv2d) -> None:
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"can only quantize nn.Linear or nn.Conv2d, got {type(layer).__name__}")
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.weight_shape = tuple(layer.weight.shape)
        if self.is_conv:
            self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
            self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, layer.padding
            self.dilation, self.groups = layer.dilation, layer.groups
            if layer.padding_mode != "zeros":
                raise ValueError(f"padding_mode={layer.padding_mode!r} is not supported; only 'zeros'")
        else:
            self.in_features, self.out_features = layer.in_features, layer.out_features

    # -- integer weights -----------------------------------------------------------
    def integer_weight(self) -> torch.Tensor:
        """The stored codes as int16, in the weight's shape (see the module docstring)."""
        if self.bits == 8:
            return self.qweight.to(torch.int16)
        numel = 1
        for d in self.weight_shape:
            numel *= d
        codes = _unpack_nibbles(self.qweight, numel).to(torch.int16)
        return (codes - (8 if self.symmetric else 0)).reshape(self.weight_shape)

    def _centered_integer(self, dtype: torch.dtype) -> torch.Tensor:
        """q - zero_point, in ``dtype`` (exact: |q - zp| <= 255 when the range includes 0); a new tensor."""
        if self.bits == 8 and self.zero_point is None:  # int8 is exact in any float: no int16 copy
            return self.qweight.to(dtype, copy=True)
        integer = self.integer_weight()
        if self.zero_point is not None:
            integer = integer - self.zero_point.reshape(-1, *([1] * (integer.dim() - 1)))
        return integer.to(dtype)

    def _dequantize(self, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        integer = self._centered_integer(dtype)
        scale = scale.to(dtype).reshape(-1, *([1] * (integer.dim() - 1)))
        if scale.requires_grad and torch.is_grad_enabled():
            return integer * scale
        return integer.mul_(scale)  # the same product in place: one weight-sized temporary, not two

    def dequantized_weight(self) -> torch.Tensor:
        """(q - zero_point) * scale in the original weight's shape, fp32."""
        return self._dequantize(self.scale, torch.float32)

    # -- the op and its gradients ---------------------------------------------------------
    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, weight)

    def _grad_input(self, grad_out, weight, x_shape):
        if self.is_conv:
            return torch.nn.grad.conv2d_input(
                x_shape, weight, grad_out, self.stride, self.padding, self.dilation, self.groups
            )
        return grad_out @ weight

    def _grad_weight(self, x, grad_out):
        if self.is_conv:
            return torch.nn.grad.conv2d_weight(
                x, self.weight_shape, grad_out, self.stride, self.padding, self.dilation, self.groups
            )
        return grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])

    def quantized_output(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """op(x, (q - zp) * scale) without the bias; ``scale`` defaults to ``self.scale``."""
        scale = self.scale if scale is None else scale
        return _QuantizedOp.apply(x, scale, self)

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return y
        bias = self.bias.to(y.dtype)
        return y + (bias.reshape(1, -1, 1, 1) if self.is_conv else bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(self.quantized_output(x))

    def extra_repr(self) -> str:
        kind = "conv2d" if self.is_conv else "linear"
        sym = "symmetric" if self.symmetric else "asymmetric"
        return f"{kind}, weight={self.weight_shape}, bits={self.bits}, {sym}"


def quantize_model(
    module: nn.Module,
    bits: int = 8,
    symmetric: bool = True,
    skip: Callable[[str, nn.Module], bool] | None = None,
    scale_dtype: torch.dtype | None = None,
    arithmetic: str = "fp32",
    include_zero: bool = True,
) -> int:
    """Replace every nn.Linear / nn.Conv2d inside ``module`` (not ``module`` itself) in place by
    a QuantizedLayer; ``skip(qualified_name, layer)`` -> True keeps a layer as it is.
    Returns how many layers were replaced."""
    targets = [
        (name, child)
        for name, child in module.named_modules()
        if name and isinstance(child, (nn.Linear, nn.Conv2d)) and not (skip and skip(name, child))
    ]
    for name, child in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, QuantizedLayer(child, bits, symmetric, scale_dtype, arithmetic, include_zero))
    return len(targets)


def quantized_layers(module: nn.Module) -> dict[str, QuantizedLayer]:
    return {name: m for name, m in module.named_modules() if isinstance(m, QuantizedLayer)}
