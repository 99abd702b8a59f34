"""Shared pieces of the denoising objective E||eps - eps_theta(z_t, t, c)||^2."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.common.conditioning import unet_prediction


def randn(shape, generator: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise drawn on the CPU generator (same numbers on every device), then moved."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


@torch.no_grad()
def latent_distribution(vae, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's posterior for ``pixel_values``. No gradient ever flows into the
    VAE encoder (the ZOODiP paper blocks it for every method)."""
    dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    return dist.mean, dist.std


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
