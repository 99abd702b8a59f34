"""Subspace Gradient (ZOODiP): project the noisy ZO gradient off the low-variance directions
of the token's recent history.

The token value after each update goes into a circular buffer of ``tau`` rows (never cleared,
as the official code). Every ``tau`` updates: standardize the buffer per dimension (z-score,
population std, constant dimensions left unscaled: sklearn's StandardScaler), take its
principal components (SVD of the centered, standardized buffer), find the first index i*
whose cumulative explained-variance share exceeds 1 - nu, and from then on project the
gradient off the components after i*: g' = g - (g P^T) P, P = those components. Before the
first recomputation P is empty. The normalization's dimension becomes d - rows(P).

As the official code, P holds only directions inside the buffer's span (at most
min(tau, d) components), and it is used on the raw gradient although it was found on
standardized values. nu -> 0 keeps every direction.

The removed components are stored as a fixed-shape matrix with zeroed rows for the kept
ones (no data-dependent shapes: FakeTensorMode-safe).
"""

from __future__ import annotations

from typing import Any

import torch


def low_variance_components(history: torch.Tensor, nu: float) -> torch.Tensor:
    """(min(rows, d), d) matrix whose nonzero rows are the principal components after the
    first one at which the cumulative explained variance exceeds 1 - nu."""
    x = history.double()
    std = x.std(dim=0, unbiased=False)
    x = (x - x.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))
    _, singular, components = torch.linalg.svd(x, full_matrices=False)
    variance = singular**2
    cumulative = torch.cumsum(variance, 0) / variance.sum().clamp_min(torch.finfo(x.dtype).tiny)
    exceeded = cumulative > 1 - nu  # monotone: False ... False True ... True
    # component i is removed iff i > i*, i.e. iff the share already exceeded at i - 1
    removed = torch.cat([exceeded.new_zeros(1), exceeded[:-1]])
    return (components * removed[:, None]).to(history.dtype)


class SubspaceGradient:
    def __init__(self, dim: int, tau: int, nu: float, device=None):
        self.dim, self.tau, self.nu = dim, tau, nu
        self.history = torch.zeros(tau, dim, dtype=torch.float32, device=device)
        self.count = 0  # values recorded so far
        self.removed = torch.zeros(min(tau, dim), dim, dtype=torch.float32, device=device)
        self.kept: list[torch.Tensor] = []  # i* (components kept) at each recomputation: Fig. 8

    def record(self, value: torch.Tensor) -> None:
        """Add the token value after an update; recompute the projection every tau values."""
        self.history[self.count % self.tau] = value.detach().reshape(-1).float()
        self.count += 1
        if self.count % self.tau == 0:
            self.removed = low_variance_components(self.history, self.nu)
            self.kept.append(self.removed.shape[0] - self.removed_dims())  # a tensor: no host sync here

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        flat = grad.reshape(-1).float()
        projected = flat - (self.removed @ flat) @ self.removed
        return projected.reshape(grad.shape).to(grad.dtype)

    def removed_dims(self) -> torch.Tensor:
        return (self.removed.abs().sum(dim=1) > 0).sum()

    def effective_dim(self) -> torch.Tensor:
        """d minus the projected-out directions (the official normalization's d)."""
        return self.dim - self.removed_dims()

    def kept_ratios(self) -> list[float]:
        """i*/tau at every recomputation so far (ZOODiP Fig. 8's histogram)."""
        return [int(k) / self.tau for k in self.kept]

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history.clone(), "count": self.count, "removed": self.removed.clone(),
            "kept": [int(k) for k in self.kept],
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.copy_(state["history"])
        self.count = int(state["count"])
        self.removed = state["removed"].to(self.history.device).clone()
        self.kept = [torch.tensor(k) for k in state.get("kept", [])]
