"""Shared pieces of the denoising objective E||eps - eps_theta(z_t, t, c)||^2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from methods.common.conditioning import unet_prediction


def randn(shape, generator: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise drawn on the CPU generator (same numbers on every device), then moved."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def vae_needs_fp32(vae) -> bool:
    """An fp16 VAE whose config says it overflows in fp16 (``force_upcast``: SDXL's stock VAE, whose
    activations reach inf and decode to NaN); diffusers' SDXL pipeline decodes it in fp32, and so
    does every encode here. The model loader clears the flag for SD1.x/2.x, whose pipelines never
    upcast (benchmark.models.load_components)."""
    return bool(getattr(vae.config, "force_upcast", False)) and any(
        p.dtype == torch.float16 for p in vae.parameters()
    )


@contextmanager
def vae_in_fp32(vae) -> Iterator[torch.dtype]:
    """Where :func:`vae_needs_fp32`, the VAE's fp16 parameters and buffers are fp32 inside the block
    and the very same tensors again after it (integer codes and fp32 quantization scales are not
    touched). Yields the dtype to feed the VAE."""
    if not vae_needs_fp32(vae):
        yield vae.dtype
        return
    kept = [(t, t.data) for t in (*vae.parameters(), *vae.buffers()) if t.dtype == torch.float16]
    try:
        for tensor, data in kept:
            tensor.data = data.float()
        yield torch.float32
    finally:
        for tensor, data in kept:
            tensor.data = data


@torch.no_grad()
def latent_distribution(vae, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's posterior for ``pixel_values``, in the VAE's dtype (computed in fp32
    where the VAE overflows in fp16: :func:`vae_in_fp32`). No gradient ever flows into the VAE
    encoder (the ZOODiP paper blocks it for every method)."""
    dtype = vae.dtype
    with vae_in_fp32(vae) as compute_dtype:
        dist = vae.encode(pixel_values.to(vae.device, compute_dtype)).latent_dist
        return dist.mean.to(dtype), dist.std.to(dtype)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, scaling_factor: float):
    """One posterior sample x the VAE's scaling factor, its noise drawn from ``generator``."""
    eps = randn(mean.shape, generator, mean.device, mean.dtype)
    return (mean + std * eps) * scaling_factor


def encode_latents(vae, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """VAE posterior sample x scaling factor (``latent_distribution`` then ``sample_latents``)."""
    mean, std = latent_distribution(vae, pixel_values)
    return sample_latents(mean, std, generator, vae.config.scaling_factor)


def noisy_latents(scheduler, latents: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator):
    """(z_t, target): z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps; target = eps (or v)."""
    timesteps = timesteps.to(latents.device)
    noise = randn(latents.shape, generator, latents.device, latents.dtype)
    z_t = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        return z_t, scheduler.get_velocity(latents, noise, timesteps)
    return z_t, noise


def denoising_loss(unet, z_t, timesteps, cond, target) -> torch.Tensor:
    """MSE between the U-Net's prediction and its target, in fp32. ``cond``: a
    ``methods.common.conditioning.Conditioning`` (any family) or SD1/SD2 hidden states."""
    pred = unet_prediction(unet, z_t, timesteps, cond)
    return F.mse_loss(pred.float(), target.float())


def denoising_losses(unet, z_t, timesteps, cond, target, groups: int) -> torch.Tensor:
    """``groups`` denoising losses from one U-Net call: the conditioning (a Conditioning or
    SD1/SD2 hidden states) holds ``groups`` consecutive blocks of len(z_t) rows, each block
    scored on the same (z_t, t, target)."""
    repeat = (groups,) + (1,) * (z_t.dim() - 1)
    pred = unet_prediction(unet, z_t.repeat(repeat), timesteps.to(z_t.device).repeat(groups), cond)
    errors = F.mse_loss(pred.float(), target.float().repeat(repeat), reduction="none")
    return errors.reshape(groups, -1).mean(dim=1)
