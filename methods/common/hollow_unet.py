"""The U-Net as a symmetric sequence of layers, and its hollowed forward (Hollowed Net).

What a "layer" is (the paper does not say; this is our definition). diffusers'
``UNet2DConditionModel`` keeps a stack of skip tensors: ``conv_in``'s output is skip 0, and
every down-block unit and every downsampler pushes one more, up to skip K (K = 11 for SD1.5,
3 for the tiny model). Every up-block unit pops exactly one. So:

- down layer k (k = 1..K): what turns skip k-1 into skip k, i.e. one ResNet(+attention) unit
  of a down block, or a down block's downsampler;
- mid: the whole mid block (ResNet, attention, ResNet) is one layer;
- up layer k (k = K..0): the up-block unit (ResNet on [hidden, skip k], + attention) that
  consumes skip k; a block's upsampler belongs to its last unit.

The sequence that ``fraction`` counts over is down 1..K, mid, up K..1: 2K+1 layers (23 for
SD1.5). ``conv_in`` with up layer 0 (its mirror), the time embedding and the output head are
the stem and are never removed. Removal goes from the middle outwards: mid first, then down K,
up K, down K-1, up K-1, ... (``round(fraction * (2K+1))`` layers, halves rounded up).

What crosses the cut (what stage 1 stores, per sample): the hidden state entering the first
kept up layer, and every skip tensor that a kept up layer takes from a removed down layer (with
this order, at most one: when a down layer is removed but its mirror is not yet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from methods.common.base import ConfigError
from methods.common.conditioning import Conditioning, added_cond_kwargs

HIDDEN = "hidden"


def skip_key(k: int) -> str:
    return f"skip{k}"


@dataclass(frozen=True)
class DownLayer:
    block: int
    unit: int | None  # None: the block's downsampler


@dataclass(frozen=True)
class UpLayer:
    block: int
    unit: int
    upsamples: bool  # the block's last unit, in a block with an upsampler


@dataclass(frozen=True)
class UNetLayers:
    """down[k-1] is down layer k (k = 1..K); up[k] is up layer k (k = 0..K)."""

    down: tuple[DownLayer, ...]
    up: tuple[UpLayer, ...]

    @property
    def K(self) -> int:
        return len(self.down)

    @property
    def count(self) -> int:
        """Layers in the sequence that ``fraction`` counts over: down 1..K, mid, up K..1."""
        return 2 * self.K + 1


@dataclass(frozen=True)
class HollowPlan:
    removed_down: frozenset[int]  # k in 1..K
    removed_mid: bool
    removed_up: frozenset[int]  # k in 1..K

    @property
    def n_removed(self) -> int:
        return len(self.removed_down) + len(self.removed_up) + int(self.removed_mid)

    @property
    def cached_skips(self) -> tuple[int, ...]:
        """Skips a kept up layer takes from a removed down layer."""
        return tuple(sorted(self.removed_down - self.removed_up))

    def boundary_keys(self) -> tuple[str, ...]:
        if not self.n_removed:
            return ()
        return (HIDDEN, *(skip_key(k) for k in self.cached_skips))


def unet_layers(unet) -> UNetLayers:
    """The layer sequence of an SD-style ``UNet2DConditionModel`` (SD1.x, SD2.x, SDXL; refuses
    other variants). SDXL's deeper transformers are inside its attention modules: one unit each."""
    cfg = unet.config
    unsupported = {
        "class_embed_type": cfg.class_embed_type,
        "addition_embed_type": cfg.addition_embed_type if cfg.addition_embed_type != "text_time" else None,
        "encoder_hid_dim_type": getattr(cfg, "encoder_hid_dim_type", None),
        "time_embedding_act_fn": getattr(cfg, "time_embedding_act_fn", None),
    }
    bad = {k: v for k, v in unsupported.items() if v is not None}
    if bad or cfg.center_input_sample:
        raise ConfigError(
            "hollowed U-Net supports Stable Diffusion 1.x/2.x/XL U-Nets only; "
            f"this one has {bad or 'center_input_sample'}"
        )
    down: list[DownLayer] = []
    for b, block in enumerate(unet.down_blocks):
        down += [DownLayer(b, j) for j in range(len(block.resnets))]
        if block.downsamplers is not None:
            down.append(DownLayer(b, None))
    up_forward: list[UpLayer] = []
    for b, block in enumerate(unet.up_blocks):
        last = len(block.resnets) - 1
        up_forward += [UpLayer(b, j, j == last and block.upsamplers is not None) for j in range(last + 1)]
    if len(up_forward) != len(down) + 1:
        raise ConfigError(
            f"U-Net is not symmetric: {len(down) + 1} skip tensors but {len(up_forward)} up units"
        )
    return UNetLayers(tuple(down), tuple(reversed(up_forward)))  # the first up unit consumes skip K


def plan_removal(layers: UNetLayers, fraction: float) -> HollowPlan:
    """Remove ``round(fraction * (2K+1))`` layers from the middle outwards (module docstring)."""
    n = min(math.floor(fraction * layers.count + 0.5), layers.count)
    order = [("down", k) if i % 2 == 0 else ("up", k) for k in range(layers.K, 0, -1) for i in range(2)]
    picked = order[: max(n - 1, 0)]
    return HollowPlan(
        removed_down=frozenset(k for kind, k in picked if kind == "down"),
        removed_mid=n >= 1,
        removed_up=frozenset(k for kind, k in picked if kind == "up"),
    )


class RemovedLayer(nn.Module):
    """Stands where a removed module was: holds no weights, refuses to run."""

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "this layer was removed from the hollowed U-Net; its output comes from the stage-1 cache"
        )


def remove_layers(unet, layers: UNetLayers, plan: HollowPlan) -> int:
    """Replace the removed layers' modules in ``unet`` by ``RemovedLayer``; nothing keeps a
    reference to them, so their weights are freed. Returns the number of parameters removed."""
    removed: list[nn.Module] = []

    def replace(container, index):
        removed.append(container[index])
        container[index] = RemovedLayer()

    for k in plan.removed_down:
        layer = layers.down[k - 1]
        block = unet.down_blocks[layer.block]
        if layer.unit is None:
            replace(block.downsamplers, 0)
        else:
            replace(block.resnets, layer.unit)
            if hasattr(block, "attentions"):
                replace(block.attentions, layer.unit)
    for k in plan.removed_up:
        layer = layers.up[k]
        block = unet.up_blocks[layer.block]
        replace(block.resnets, layer.unit)
        if hasattr(block, "attentions"):
            replace(block.attentions, layer.unit)
        if layer.upsamples:
            replace(block.upsamplers, 0)
    if plan.removed_mid:
        removed.append(unet.mid_block)
        unet.mid_block = RemovedLayer()
    count = sum(p.numel() for module in removed for p in module.parameters())
    removed.clear()
    return count


# -- forward passes, unit by unit (the order of UNet2DConditionModel.forward) ---------------


def _attend(block, j: int, h: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    if not hasattr(block, "attentions"):
        return h
    return block.attentions[j](h, encoder_hidden_states=text, return_dict=False)[0]


def _resnet(block, j: int, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The block's j-th resnet, checkpointed as diffusers' block forward does when the U-Net's
    gradient checkpointing is on (its attentions checkpoint their transformer blocks themselves)."""
    resnet = block.resnets[j]
    if torch.is_grad_enabled() and getattr(block, "gradient_checkpointing", False):
        return block._gradient_checkpointing_func(resnet, h, emb)
    return resnet(h, emb)


def _down(unet, layer: DownLayer, h, emb, text):
    block = unet.down_blocks[layer.block]
    if layer.unit is None:
        return block.downsamplers[0](h)
    return _attend(block, layer.unit, _resnet(block, layer.unit, h, emb), text)


def _up(unet, layer: UpLayer, h, skip, emb, text, upsample_size):
    block = unet.up_blocks[layer.block]
    h = _resnet(block, layer.unit, torch.cat([h, skip], dim=1), emb)
    h = _attend(block, layer.unit, h, text)
    if layer.upsamples:
        h = block.upsamplers[0](h, upsample_size)
    return h


def _embed(unet, sample, timestep, cond: Conditioning):
    """(time embedding + SDXL's added text/size embedding, text states) as diffusers' forward.
    ``cond``: a Conditioning, or SD1/SD2 hidden states as a tensor."""
    if isinstance(cond, torch.Tensor):
        cond = Conditioning(cond)
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    added = added_cond_kwargs(cond, sample, unet.dtype)
    if added is not None:
        emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=cond.hidden, added_cond_kwargs=added)
    return emb, cond.hidden.to(unet.dtype)


def _upsample_size(unet, sample, skips, k):
    """diffusers forwards the next skip's size only when the input is not a multiple of 2^ups."""
    factor = 2**unet.num_upsamplers
    if k == 0 or not any(d % factor for d in sample.shape[-2:]):
        return None
    return skips[k - 1].shape[2:]


@torch.no_grad()
def boundary_activations(
    unet, layers: UNetLayers, plan: HollowPlan, sample, timestep, text
) -> dict[str, torch.Tensor]:
    """Stage 1: run the full U-Net up to the cut and return what crosses it (``boundary_keys``).
    ``unet`` must still hold every layer; ``text`` is the prompt's conditioning."""
    if not plan.n_removed:
        return {}
    emb, text = _embed(unet, sample, timestep, text)
    h = unet.conv_in(sample)
    skips = [h]
    for layer in layers.down:
        h = _down(unet, layer, h, emb, text)
        skips.append(h)
    h = unet.mid_block(h, emb, encoder_hidden_states=text)
    for k in sorted(plan.removed_up, reverse=True):
        h = _up(unet, layers.up[k], h, skips[k], emb, text, _upsample_size(unet, sample, skips, k))
    return {HIDDEN: h, **{skip_key(k): skips[k] for k in plan.cached_skips}}


def hollowed_forward(
    unet, layers: UNetLayers, plan: HollowPlan, sample, timestep, text, boundary
) -> torch.Tensor:
    """Stage 2: the kept layers only; ``boundary`` (from ``boundary_activations``) stands in for
    the removed ones. With nothing removed this is the full U-Net's forward."""
    emb, text = _embed(unet, sample, timestep, text)
    h = unet.conv_in(sample)
    skips: dict[int, torch.Tensor] = {0: h}
    for k, layer in enumerate(layers.down, start=1):
        if k in plan.removed_down:
            break
        h = _down(unet, layer, h, emb, text)
        skips[k] = h
    if plan.removed_mid:
        h = boundary[HIDDEN].to(h.dtype)
        skips.update({k: boundary[skip_key(k)].to(h.dtype) for k in plan.cached_skips})
    else:
        h = unet.mid_block(h, emb, encoder_hidden_states=text)
    for k in range(layers.K, -1, -1):
        if k in plan.removed_up:
            continue
        h = _up(unet, layers.up[k], h, skips[k], emb, text, _upsample_size(unet, sample, skips, k))
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)
