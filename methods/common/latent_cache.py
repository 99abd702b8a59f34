"""Training-image latents encoded once before step 0 (``method.cache_latents``).

The VAE's posterior (mean, std) of every training image and of its horizontal flip is kept;
each step still draws its own posterior sample from the step's generator, exactly as
``diffusion.encode_latents`` does, so the step sees the same latents as with the VAE in the
loop (bit-identical at batch 1 on CPU: each image is encoded on its own, as a batch of one is).
The VAE's weights are then released: training needs it no more, and generation builds a fresh
pipeline. A batch names its images by ``image_index`` (the loop's ``index`` before flipping
existed) and ``flipped`` (absent: not flipped).
"""

from __future__ import annotations

import torch

from methods.common.diffusion import latent_distribution, sample_latents


def release_weights(module: torch.nn.Module) -> None:
    """Drop every parameter and buffer of ``module`` (each becomes None, like an absent bias):
    its weights are freed and the module can no longer run."""
    for sub in module.modules():
        for name in list(sub._parameters):
            sub.register_parameter(name, None)
        for name in list(sub._buffers):
            sub.register_buffer(name, None)


class LatentCache:
    """Posterior mean and std of each (image, flipped), as (2, N, C, h, w) tensors."""

    def __init__(self, vae, images: torch.Tensor):
        self.scaling_factor = vae.config.scaling_factor
        means, stds = [], []
        for flipped in (False, True):
            for image in images:
                pixels = image[None].flip(-1) if flipped else image[None]
                mean, std = latent_distribution(vae, pixels)
                means.append(mean[0])
                stds.append(std[0])
        self.mean = torch.stack(means).unflatten(0, (2, len(images)))
        self.std = torch.stack(stds).unflatten(0, (2, len(images)))

    @property
    def nbytes(self) -> int:
        return 2 * self.mean.numel() * self.mean.element_size()

    def sample(self, batch, generator: torch.Generator) -> torch.Tensor:
        """Latents of ``batch``'s images, one posterior sample each from ``generator``."""
        index = batch.get("image_index", batch.get("index"))
        if index is None:
            raise KeyError("a batch for cached latents needs 'image_index' (the training image's position)")
        flipped = batch.get("flipped")
        flipped = torch.zeros_like(index, dtype=torch.bool) if flipped is None else flipped
        where = (flipped.long().to(self.mean.device), index.to(self.mean.device))
        return sample_latents(self.mean[where], self.std[where], generator, self.scaling_factor)
