"""Which training images a step sees, and whether each is flipped (``method.data``).

Every draw is a function of (seed, step) alone, so a resumed run sees the same images:

- ``sampling=epoch``: the run's draws, in order, walk epochs; epoch e is a permutation of
  ``repeats`` copies of the N images (N x repeats slots, slot s is image s mod N) from a
  generator seeded with (seed, e). Draw number ``step * batch_size + b`` is slot
  ``(step * batch_size + b) mod (N x repeats)`` of epoch ``(step * batch_size + b) // (N x repeats)``,
  so a batch may straddle two epochs (the DataLoader would end an epoch with a short batch).
- ``sampling=replacement``: ``batch_size`` uniform draws from the step's own generator
  (:func:`step_generator`), before the method draws anything from it.
- flips: one uniform number per drawn image from a generator seeded with (seed, step), flipped
  when below ``flip_p`` (torchvision's RandomHorizontalFlip), applied to the pixels.

The epoch and flip generators are streams of their own: they never shift the step's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.common.base import DataConfig

_EPOCH_STREAM, _FLIP_STREAM = 1, 2


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of step ``step`` of a run seeded ``seed``: the batch's ``generator``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _stream_generator(stream: int, seed: int, counter: int) -> torch.Generator:
    """A generator for (stream, seed, counter), disjoint from step_generator's seeds
    (seed * 1_000_003 + step stays below 2**48 for any realistic seed and step)."""
    return torch.Generator().manual_seed(stream * 2**48 + seed * 1_000_003 + counter)


def epoch_order(seed: int, epoch: int, n_images: int, repeats: int = 1) -> torch.Tensor:
    """Image indices of epoch ``epoch``: a permutation of ``repeats`` copies of 0..n_images-1."""
    slots = torch.randperm(n_images * repeats, generator=_stream_generator(_EPOCH_STREAM, seed, epoch))
    return slots % n_images


@dataclass(frozen=True)
class Draw:
    image_index: torch.Tensor  # LongTensor (B,), into the subject's images
    flipped: torch.Tensor  # BoolTensor (B,)


def draw_images(
    data: DataConfig, seed: int, step: int, n_images: int, batch_size: int, generator: torch.Generator
) -> Draw:
    """Step ``step``'s images (module docstring); ``generator`` is the step's own, used only by
    ``sampling=replacement``."""
    if data.sampling == "replacement":
        index = torch.randint(n_images, (batch_size,), generator=generator)
    else:
        per_epoch = n_images * data.repeats
        draws = range(step * batch_size, (step + 1) * batch_size)
        orders = {e: epoch_order(seed, e, n_images, data.repeats) for e in {d // per_epoch for d in draws}}
        index = torch.stack([orders[d // per_epoch][d % per_epoch] for d in draws])
    coins = torch.rand(batch_size, generator=_stream_generator(_FLIP_STREAM, seed, step))
    return Draw(index, coins < data.flip_p)


def batch_pixels(images: torch.Tensor, draw: Draw) -> torch.Tensor:
    """The drawn images (B,3,H,W), mirrored left-right where ``draw.flipped``."""
    picked = images[draw.image_index.to(images.device)]
    flipped = draw.flipped.to(images.device).view(-1, 1, 1, 1)
    return torch.where(flipped, picked.flip(-1), picked)


def training_batch(
    images: torch.Tensor, data: DataConfig, seed: int, step: int, batch_size: int, generator: torch.Generator
) -> dict:
    """The batch dict a method's ``step`` receives (``methods.common.base.Method.step``)."""
    draw = draw_images(data, seed, step, len(images), batch_size, generator)
    return {
        "pixel_values": batch_pixels(images, draw),
        "image_index": draw.image_index,
        "flipped": draw.flipped,
        "generator": generator,
    }
