"""Our INT8 and INT4 weights against optimum-quanto (the official ZOODiP code's quantizer, a
test-only dependency): the same integer codes, scales and shifts, layer by layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.common.quant import QuantizedLayer
from methods.common.quant_groupwise import GroupwiseQuantizedLayer, quanto_group_size

quanto = pytest.importorskip("optimum.quanto")


def quanto_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's reference unpack (optimum/quanto/library/unpack.py): value i of each byte goes to
    row block i. Its CPU kernel is a C++ extension compiled on first use, which tests avoid."""
    per_byte = 8 // bits
    return torch.cat([(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(per_byte)])


def layers() -> nn.ModuleDict:
    """Rows of 256 (group 128), 320 (group 64), 100 (<= 128: one group per row) and 144 (no
    multiple of 32 divides it: one group per row), as Linear and Conv2d."""
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "g128": nn.Linear(256, 24),
            "g64": nn.Linear(320, 8),
            "short": nn.Linear(100, 6),
            "conv": nn.Conv2d(16, 8, 3),
            "conv_g128": nn.Conv2d(128, 4, 1),
        }
    )
    with torch.no_grad():
        model["g128"].weight[0, :128] = 0.25  # a constant group
    return model


def quanto_weights(qtype) -> dict[str, object]:
    model = layers()
    quanto.quantize(model, weights=qtype)
    quanto.freeze(model)
    return {name: module.weight for name, module in model.items()}


def test_group_sizes_follow_quanto():
    assert [quanto_group_size(n) for n in (256, 320, 100, 144, 128, 4608)] == [128, 64, 100, 144, 128, 128]


def test_int8_codes_and_scales_equal_quanto_qint8():
    theirs = quanto_weights(quanto.qint8)
    for name, layer in layers().items():
        ours = QuantizedLayer(layer, bits=8, symmetric=True)
        weight = theirs[name]
        assert torch.equal(ours.integer_weight(), weight._data.to(torch.int16)), name
        torch.testing.assert_close(ours.scale, weight._scale.reshape(-1), rtol=0, atol=0)


def test_int4_affine_group_codes_scales_and_shifts_equal_quanto_qint4():
    theirs = quanto_weights(quanto.qint4)
    for name, layer in layers().items():
        ours = GroupwiseQuantizedLayer(layer, bits=4, group_size=128)
        weight = theirs[name]
        packed = weight._data
        codes = (
            quanto_unpack(packed._data, packed._bits)[: packed.shape[0]]
            if hasattr(packed, "_bits")
            else packed
        )
        scale, shift = weight._scale.reshape(-1), weight._shift.reshape(-1)
        constant = scale == 0  # quanto divides by 0 there; ours stores scale 1 and code 0 (exact)
        assert constant.any() == (name == "g128")
        assert ours.group_size == (weight._group_size or ours.integer_weight().shape[1]), name
        codes = codes.reshape(ours.integer_weight().shape).to(torch.int16)
        assert torch.equal(ours.integer_weight()[~constant], codes[~constant]), name
        assert torch.equal(ours.scale[~constant], scale[~constant]), name
        assert torch.equal(ours.shift, shift), name
        # quanto's dequantization (QBitsDequantizer: data * scale - shift) of its own codes
        theirs_dequantized = codes * scale[:, None] - shift[:, None]
        assert torch.equal(ours.dequantized_weight().reshape(-1), theirs_dequantized.reshape(-1)), name
