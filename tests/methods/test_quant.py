"""methods.common.quant: integer storage, error within one quantization step, exact scale gradients,
and no float copy of a weight kept as module state or saved for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.common.base import ConfigError
from methods.common.quant import (
    QuantizedLayer,
    _pack_nibbles,
    _unpack_nibbles,
    quantize_model,
    quantized_layers,
)

CASES = [
    (kind, bits, symmetric) for kind in ("linear", "conv") for bits in (8, 4) for symmetric in (True, False)
]


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.Linear(13, 7) if kind == "linear" else nn.Conv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        layer.weight[0] = 0.0  # an all-zero channel must not divide by zero
        layer.weight[1] = layer.weight[1].abs() + 0.1  # an all-positive channel
    return layer


def _input(kind: str) -> torch.Tensor:
    return torch.randn(2, 4, 13) if kind == "linear" else torch.randn(2, 3, 6, 6)


def _reference(q: QuantizedLayer, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Plain autograd through a float dequantized weight."""
    w = q._centered_integer(torch.float32) * scale.reshape(-1, *([1] * (len(q.weight_shape) - 1)))
    if q.is_conv:
        return F.conv2d(x, w, q.bias, q.stride, q.padding, q.dilation, q.groups)
    return F.linear(x, w, q.bias)


@pytest.mark.parametrize("kind,bits,symmetric", CASES)
def test_integer_storage_and_error_within_one_step(kind, bits, symmetric):
    layer = _layer(kind)
    q = QuantizedLayer(layer, bits=bits, symmetric=symmetric)
    numel = layer.weight.numel()
    if bits == 8:
        assert q.qweight.dtype == torch.int8 and tuple(q.qweight.shape) == tuple(layer.weight.shape)
    else:
        assert q.qweight.dtype == torch.uint8 and q.qweight.numel() == (numel + 1) // 2  # two codes per byte
    # no float copy of the weight anywhere in the module's state
    floats = [t for t in [*q.parameters(), *q.buffers()] if t.is_floating_point()]
    assert all(t.numel() <= layer.weight.shape[0] for t in floats)

    step = q.scale.detach().reshape(-1, *([1] * (layer.weight.dim() - 1)))
    error = (q.dequantized_weight() - layer.weight).abs()
    assert (error <= step * 0.5 + 1e-7).all()  # round to nearest: half a step at most
    assert torch.equal(q.dequantized_weight()[0], torch.zeros_like(layer.weight[0]))

    centered = q._centered_integer(torch.float32)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        assert q.zero_point is None and centered.abs().max() == qmax  # the range is used
    else:
        codes = centered + q.zero_point.reshape(-1, *([1] * (centered.dim() - 1))).float()
        codes += 128 if bits == 8 else 0  # int8 storage holds unsigned codes shifted by -128
        assert codes.min() >= 0 and codes.max() == 2**bits - 1


@pytest.mark.parametrize("kind,bits,symmetric", CASES)
def test_forward_and_gradients_match_plain_autograd(kind, bits, symmetric):
    q = QuantizedLayer(_layer(kind), bits=bits, symmetric=symmetric)
    q.scale.requires_grad_(True)
    x = _input(kind).requires_grad_(True)
    y = q(x)

    scale_ref = q.scale.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _reference(q, x_ref, scale_ref)
    torch.testing.assert_close(y, y_ref)

    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(q.scale.grad, scale_ref.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_backward_saves_no_float_weight(kind):
    q = QuantizedLayer(_layer(kind), bits=8)
    q.scale.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(_input(kind).requires_grad_(True))
    assert not any(shape == q.weight_shape and dtype.is_floating_point for shape, dtype in saved)
    y.sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0


@pytest.mark.parametrize("kind,bits,symmetric", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dequantized_weight_is_integer_times_scale_and_leaves_the_codes_alone(kind, bits, symmetric, dtype):
    q = QuantizedLayer(_layer(kind), bits=bits, symmetric=symmetric)
    codes = q.qweight.clone()
    integer = q.integer_weight().float()
    if q.zero_point is not None:
        integer = integer - q.zero_point.reshape(-1, *([1] * (integer.dim() - 1))).float()
    expected = integer.to(dtype) * q.scale.to(dtype).reshape(-1, *([1] * (integer.dim() - 1)))
    assert torch.equal(q._dequantize(q.scale, dtype), expected)  # the same bits as out of place
    assert torch.equal(q.qweight, codes)


def test_nibble_packing_round_trips_odd_lengths():
    codes = torch.randint(0, 16, (11,), dtype=torch.int16)
    packed = _pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 6
    assert torch.equal(_unpack_nibbles(packed, 11).to(torch.int16), codes)


def test_quantize_model_replaces_every_linear_and_conv_and_keeps_outputs_close():
    from omegaconf import OmegaConf

    from benchmark.models import build_from_config
    from tests.conftest import CONF_DIR

    unet = build_from_config(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml")).unet
    expected = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    x, t, h = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    with torch.no_grad():
        before = unet(x, t, h).sample
    skipped = expected[0]
    assert quantize_model(unet, bits=8, skip=lambda name, _: name == skipped) == len(expected) - 1
    layers = quantized_layers(unet)
    assert sorted(layers) == sorted(expected[1:])
    assert isinstance(unet.get_submodule(skipped), (nn.Linear, nn.Conv2d))
    with torch.no_grad():
        after = unet(x, t, h).sample
    assert (after - before).abs().max() < 0.05 * before.abs().max()


def test_bad_bits_are_refused():
    with pytest.raises(ValueError, match="bits=3"):
        QuantizedLayer(nn.Linear(2, 2), bits=3)


def test_qlora_linear_weights_are_packed_nf4_within_one_step():
    import bitsandbytes as bnb

    from methods.qlora import quantize_linear_4bit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    original = model[0].weight.detach().clone()
    assert quantize_linear_4bit(model, blocksize=64) == 2
    layer = model[0]
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == original.numel() // 2
    dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    # NF4's widest gap between neighbouring levels is 0.304 x the block's absmax (block = 64
    # consecutive weights); round to nearest errs by at most half of it (+ the 8-bit absmax).
    absmax = original.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    error = (dequantized.reshape(-1, 64) - original.reshape(-1, 64)).abs()
    assert (error <= 0.16 * absmax).all()
    assert error.max() > 0  # it really is quantized


def official_tuneqdm_quantize(weight: torch.Tensor):
    """ugonfor/TuneQDM core.py, asymmetric INT8: (q - zero_point as float, scale); a row's own
    [min, max], zero_point = -128 - round(min / scale), q clamped to [-128, 127]."""
    w = weight.reshape(weight.shape[0], -1)
    w_min, w_max = w.min(dim=1).values, w.max(dim=1).values
    scale = ((w_max - w_min) / 255).clamp(min=1e-8)
    zero_point = -128 - torch.round(w_min / scale)
    q = torch.clamp(torch.round(w / scale[:, None] + zero_point[:, None]), -128, 127).to(torch.int8)
    return (q.float() - zero_point[:, None]).reshape(weight.shape), scale


def one_sign_rows() -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(64, 6)
    with torch.no_grad():
        layer.weight[0] = layer.weight[0].abs() + 0.05  # all positive
        layer.weight[1] = -(layer.weight[1].abs() + 0.02)  # all negative
        layer.weight[2] = layer.weight[2].abs() * 1e-3 + 1.0  # all positive, far from 0
    return layer


def test_minmax_range_is_the_official_tuneqdm_quantization_and_include_zero_widens():
    layer = one_sign_rows()
    expected, expected_scale = official_tuneqdm_quantize(layer.weight.detach())
    minmax = QuantizedLayer(layer, bits=8, symmetric=False, include_zero=False)
    assert torch.equal(minmax._centered_integer(torch.float32), expected)
    assert torch.equal(minmax.scale, expected_scale)
    widened = QuantizedLayer(layer, bits=8, symmetric=False)  # PEQA's reading: the range includes 0
    differs = (widened.scale != expected_scale).tolist()
    assert differs == [True, True, True, False, False, False]  # exactly the rows of one sign
    error = (minmax.dequantized_weight() - layer.weight).abs().amax(dim=1)
    widened_error = (widened.dequantized_weight() - layer.weight).abs().amax(dim=1)
    assert (error[:3] < widened_error[:3]).all() and (error <= minmax.scale / 2 + 1e-7).all()


def test_minmax_range_keeps_a_constant_row_exact():
    layer = nn.Linear(8, 2)
    with torch.no_grad():
        layer.weight[0] = 0.3
        layer.weight[1] = 0.0
    q = QuantizedLayer(layer, bits=8, symmetric=False, include_zero=False)
    assert torch.equal(q.dequantized_weight(), layer.weight.detach())


def test_tuneqdm_quantizes_with_the_official_range_and_peqa_widens_to_zero(tiny_cfg):
    from benchmark.config import method_config
    from methods.peqa import quantize_unet

    expected_scale = official_tuneqdm_quantize(one_sign_rows().weight.detach())[1]
    scales = {}
    for name in ("tuneqdm", "peqa"):
        cfg = method_config(tiny_cfg(f"method={name}"))
        (layer,) = quantize_unet(nn.Sequential(one_sign_rows()), cfg).values()
        scales[name] = layer.scale
    assert torch.equal(scales["tuneqdm"], expected_scale)
    assert (scales["peqa"] != expected_scale).tolist()[:3] == [True, True, True]
    with pytest.raises(ConfigError, match="method.quant_range='zero'; choose one of: include_zero, minmax"):
        method_config(tiny_cfg("method=tuneqdm", "method.quant_range=zero"))


def test_quant_range_devtool_counts_the_rows_of_one_sign():
    from benchmark.devtools.quant_range import one_sign_rows as count

    conv = nn.Conv2d(2, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -1.0], [-2.0, 0.5], [-0.5, -0.25]]).reshape(3, 2, 1, 1))
    counts = count(nn.Sequential(one_sign_rows(), conv))
    assert counts["layers"] == 2 and counts["rows"] == 9
    assert counts["one_sign_rows"] == 4  # the Linear's rows 0-2 and the conv's last row
    plain = nn.Sequential(nn.Linear(64, 6))
    with torch.no_grad():
        plain[0].weight.copy_(torch.linspace(-1, 1, 384).reshape(64, 6).T)
    assert count(plain)["one_sign_rows"] == 0
