"""ZO-Adam: Adam on an estimated gradient, as the official ZOODiP code.

m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -= lr * m_hat / (sqrt(v_hat) + eps), with
bias-corrected m_hat, v_hat, b1 = 0.9, b2 = 0.999 and eps = 1e-3 (official; far larger than
Adam's usual 1e-8, so small estimated gradients give small steps). No weight decay. Nothing
touches ``.grad``: the gradient is passed in.

``state_dtype``: fp32 (default) or fp16. The official code keeps m and v in the fp16 dtype of
the embedding row and does this arithmetic in fp16, where (1 - b2) g^2 underflows to 0 for
|g| below ~5e-3; v then stays too small and the step grows, up to (|g| + eps) / eps times
the fp32 step (2x at |g| = eps). fp16 reproduces that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

STATE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class ZOAdam:
    def __init__(
        self,
        params: Sequence[torch.Tensor],
        lr: float,
        betas=(0.9, 0.999),
        eps: float = 1e-3,
        state_dtype: str = "fp32",
    ):
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype={state_dtype!r}; choose one of: {', '.join(STATE_DTYPES)}")
        self.params = list(params)
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.dtype = STATE_DTYPES[state_dtype]
        self.m = [torch.zeros_like(p, dtype=self.dtype) for p in self.params]
        self.v = [torch.zeros_like(p, dtype=self.dtype) for p in self.params]
        self.iterations = 0

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        b1, b2 = self.betas
        self.iterations += 1
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            g = g.to(self.dtype)  # fp16: every operation below rounds to fp16, as the official code
            m.mul_(b1).add_(g * (1 - b1))
            v.mul_(b2).add_(g**2 * (1 - b2))
            m_hat = m / (1 - b1**self.iterations)
            v_hat = v / (1 - b2**self.iterations)
            p.sub_((self.lr * m_hat / (v_hat.sqrt() + self.eps)).to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {
            "m": [m.clone() for m in self.m],
            "v": [v.clone() for v in self.v],
            "iterations": self.iterations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for mine, saved in zip(self.m + self.v, state["m"] + state["v"]):
            mine.copy_(saved)
        self.iterations = int(state["iterations"])
