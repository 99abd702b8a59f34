"""Diffusion timestep samplers for training.

- ``uniform``: t ~ U{0, ..., T-1} (DDPM / diffusers examples).
- ``puts``: Partial Uniform Timestep Sampling (ZOODiP): t ~ U{T_L, ..., T_U-1}; official code
  draws integers 500..899 with T = 1000.
"""

from __future__ import annotations

import torch

from methods.base import require

TIMESTEP_SAMPLERS = ("uniform", "puts")


def check_timestep_bounds(kind: str, T_L: int, T_U: int, num_train_timesteps: int = 1000) -> None:
    require(kind in TIMESTEP_SAMPLERS, f"method.timesteps={kind!r}; choose one of: {', '.join(TIMESTEP_SAMPLERS)}")
    if kind == "puts":
        require(
            0 <= T_L < T_U <= num_train_timesteps,
            f"method.T_L={T_L}, method.T_U={T_U}: need 0 <= T_L < T_U <= {num_train_timesteps}",
        )


def sample_timesteps(
    kind: str,
    batch_size: int,
    generator: torch.Generator,
    num_train_timesteps: int = 1000,
    T_L: int = 500,
    T_U: int = 900,
) -> torch.Tensor:
    """Integer timesteps (CPU, int64) drawn from ``generator``."""
    check_timestep_bounds(kind, T_L, T_U, num_train_timesteps)
    low, high = (0, num_train_timesteps) if kind == "uniform" else (T_L, T_U)
    return torch.randint(low, high, (batch_size,), generator=generator)
