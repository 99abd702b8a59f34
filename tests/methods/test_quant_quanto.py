"""Our INT8 and INT4 weights against optimum-quanto (the official ZOODiP code's quantizer, a
test-only dependency), layer by layer, on fp32, fp16 and bf16 weights.

What matches: with ``arithmetic="weight"`` (scale and codes computed in the weight's dtype, as
quanto does) the integer codes, scales and shifts equal quanto's for every dtype. With the default
``arithmetic="fp32"`` they equal quanto's on fp32 weights only; on fp16 and bf16 weights some codes
differ by one. quanto's bf16 INT4 matmul path (TinyGemm: Linear, group 128) stores the group's
midpoint instead of its shift and recomputes the shift from it: that one differs from the stored
shift by up to a bf16 rounding in some groups."""

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
            "g128": nn.Linear(256, 32),  # 32 rows: quanto's bf16 TinyGemm packing needs a multiple of 16
            "g64": nn.Linear(320, 8),
            "short": nn.Linear(100, 6),
            "conv": nn.Conv2d(16, 8, 3),
            "conv_g128": nn.Conv2d(128, 4, 1),
        }
    )
    with torch.no_grad():
        model["g128"].weight[0, :128] = 0.25  # a constant group
    return model


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def quanto_weights(qtype, dtype=torch.float32) -> dict[str, object]:
    model = layers().to(dtype)
    quanto.quantize(model, weights=qtype)
    quanto.freeze(model)
    return {name: module.weight for name, module in model.items()}


def test_group_sizes_follow_quanto():
    assert [quanto_group_size(n) for n in (256, 320, 100, 144, 128, 4608)] == [128, 64, 100, 144, 128, 128]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_codes_and_scales_equal_quanto_qint8(dtype):
    theirs = quanto_weights(quanto.qint8, dtype)
    for name, layer in layers().to(dtype).items():
        ours = QuantizedLayer(layer, bits=8, symmetric=True, scale_dtype=dtype, arithmetic="weight")
        weight = theirs[name]
        assert torch.equal(ours.integer_weight(), weight._data.to(torch.int16)), name
        assert torch.equal(ours.scale, weight._scale.reshape(-1)), name
        if dtype == torch.float32:  # the default arithmetic is the weight's on fp32 weights
            default = QuantizedLayer(layer, bits=8, symmetric=True)
            assert torch.equal(default.integer_weight(), ours.integer_weight()), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [8, 4])
def test_default_fp32_arithmetic_differs_from_quanto_on_half_weights(dtype, bits):
    """The default (fp32) arithmetic on fp16/bf16 weights: some codes one off quanto's, none more."""
    codes = {}
    for arithmetic in ("fp32", "weight"):
        model = layers().to(dtype)
        if bits == 8:
            quantized = [QuantizedLayer(m, 8, True, dtype, arithmetic) for m in model.values()]
        else:
            quantized = [GroupwiseQuantizedLayer(m, 4, 128, dtype, arithmetic) for m in model.values()]
        codes[arithmetic] = torch.cat([q.integer_weight().reshape(-1) for q in quantized])
    off = (codes["fp32"] - codes["weight"]).abs()
    assert off.max() == 1 and 0 < (off > 0).float().mean() < 0.5


def quanto_qbits(weight):
    """A quanto qint4 weight as its plain WeightQBitsTensor (bf16 TinyGemm weights: unpacked, the
    shift recomputed from the stored midpoint as quanto's own dequantization does)."""
    return weight.weight_qbits_tensor() if type(weight).__name__ == "TinyGemmWeightQBitsTensor" else weight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int4_affine_group_codes_scales_and_shifts_equal_quanto_qint4(dtype):
    theirs = quanto_weights(quanto.qint4, dtype)
    assert type(theirs["g128"]).__name__ == (
        "TinyGemmWeightQBitsTensor" if dtype == torch.bfloat16 else "WeightQBitsTensor"
    )
    for name, layer in layers().to(dtype).items():
        ours = GroupwiseQuantizedLayer(layer, bits=4, group_size=128, scale_dtype=dtype, arithmetic="weight")
        weight = quanto_qbits(theirs[name])
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
        theirs_dequantized = codes.to(dtype) * scale[:, None] - shift[:, None]
        ours_dequantized = ours._dequantize(ours.scale, dtype)
        assert torch.equal(ours_dequantized.reshape(-1), theirs_dequantized.reshape(-1)), name


def test_int4_bf16_tinygemm_shift_is_ours_up_to_one_rounding():
    """bf16 INT4 Linear weights (group 128) go to quanto's TinyGemm layout: it keeps
    midpoint = bf16(8 scale - shift) and its matmul uses 8 scale - midpoint. Groups whose
    weights are centred away from 0 then get a shift one bf16 rounding away from the stored one;
    codes and scales are unchanged."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 32)
    with torch.no_grad():
        layer.weight[:16] += 0.05  # off-centre groups
    layer = layer.to(torch.bfloat16)
    model = nn.ModuleDict({"w": layer})
    ours = GroupwiseQuantizedLayer(layer, 4, 128, torch.bfloat16, "weight")
    quanto.quantize(model, weights=quanto.qint4)
    quanto.freeze(model)
    weight = model["w"].weight
    assert type(weight).__name__ == "TinyGemmWeightQBitsTensor"
    scale = weight._scale_shift[..., 0].t().reshape(-1)
    stored_midpoint = weight._scale_shift[..., 1].t().reshape(-1)
    assert torch.equal(scale, ours.scale)
    assert torch.equal(stored_midpoint, (8 * ours.scale - ours.shift).to(torch.bfloat16))
    recomputed = quanto_qbits(weight)._shift.reshape(-1)
    assert torch.equal(recomputed, 8 * scale - stored_midpoint)
    differ = recomputed != ours.shift  # groups 0-31: the off-centre rows 0-15; 32-63: centred rows
    assert differ[:32].any()
    assert not differ[32:].any()  # centred: 8 scale - shift is exact in bf16, so is the round trip
    bound = torch.maximum(ours.shift.float().abs(), 8 * ours.scale.float()) * 2.0**-7  # one bf16 ulp
    assert ((recomputed.float() - ours.shift.float()).abs() <= bound).all()
