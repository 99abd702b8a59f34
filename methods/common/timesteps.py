"""Diffusion timestep samplers for training.

- ``uniform``: t ~ U{0, ..., T-1} (DDPM / diffusers examples).
- ``puts``: Partial Uniform Timestep Sampling (ZOODiP): t ~ U{T_L, ..., T_U-1}; official code
  draws integers 500..899 with T = 1000.
- ``snr``: SNR-weighted sampling over {0, ..., T-1}: P(t) proportional to
  min(SNR(t), gamma) / SNR(t) = min(1, gamma / SNR(t)), SNR(t) = abar_t / (1 - abar_t),
  gamma = 5. This is the Min-SNR-gamma loss weight for epsilon prediction (Hang et al., 2023)
  used as a sampling distribution (same objective in expectation as weighting the loss of
  uniform samples): every timestep with SNR <= gamma (t >= 147 for SD's schedule) is
  equally likely, the clean end is down-weighted by its SNR (P(t < 100) = 2.9 %).

T_L and T_U are validated for every sampler (0 <= T_L < T_U <= T), used only by ``puts``.
"""

from __future__ import annotations

import torch

from methods.common.base import require

TIMESTEP_SAMPLERS = ("uniform", "puts", "snr")
SNR_GAMMA = 5.0  # Min-SNR-gamma's recommended value (Hang et al., 2023)


def check_timestep_bounds(kind: str, T_L: int, T_U: int, num_train_timesteps: int = 1000) -> None:
    require(
        kind in TIMESTEP_SAMPLERS, f"method.timesteps={kind!r}; choose one of: {', '.join(TIMESTEP_SAMPLERS)}"
    )
    require(
        0 <= T_L < T_U <= num_train_timesteps,
        f"method.T_L={T_L}, method.T_U={T_U}: need 0 <= T_L < T_U <= {num_train_timesteps}",
    )


def sd_alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """abar_t of Stable Diffusion's scaled-linear schedule (beta 0.00085 .. 0.012)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def snr_sampling_weights(alphas_cumprod: torch.Tensor, gamma: float = SNR_GAMMA) -> torch.Tensor:
    """Unnormalized P(t) = min(SNR(t), gamma) / SNR(t)."""
    abar = alphas_cumprod.double()
    snr = abar / (1 - abar)
    return snr.clamp(max=gamma) / snr


def sample_timesteps(
    kind: str,
    batch_size: int,
    generator: torch.Generator,
    num_train_timesteps: int = 1000,
    T_L: int = 500,
    T_U: int = 900,
    alphas_cumprod: torch.Tensor | None = None,
    snr_gamma: float = SNR_GAMMA,
) -> torch.Tensor:
    """Integer timesteps (CPU, int64) drawn from ``generator``. ``alphas_cumprod`` (the noise
    scheduler's) is used by ``snr`` only; default: SD's scaled-linear schedule."""
    check_timestep_bounds(kind, T_L, T_U, num_train_timesteps)
    if kind == "snr":
        if alphas_cumprod is None:
            alphas_cumprod = sd_alphas_cumprod(num_train_timesteps)
        weights = snr_sampling_weights(alphas_cumprod.cpu(), snr_gamma)
        return torch.multinomial(weights, batch_size, replacement=True, generator=generator)
    low, high = (0, num_train_timesteps) if kind == "uniform" else (T_L, T_U)
    return torch.randint(low, high, (batch_size,), generator=generator)
