"""Selective BP-low / ZO-high (2025): LoRA trained by two kinds of step, chosen per step.

The paper has no public code; this is our reading of it (../shared/papers/METHODS.md).
Each step draws one timestep t (shared by the batch), then picks its kind with probability
``p_bp(t / T, progress)`` (``method.schedule``, progress = step / steps):

- BP-low: the images resized to ``low_resolution``, one backprop step of the LoRA (the plain
  LoRA step: AdamW, gradient clipping);
- ZO-high: the images at ``high_resolution``, a zeroth-order estimate of the LoRA gradient
  (``methods.common.zo``: RGE by default, same latent, noise and t for all forward passes) under
  no_grad, and an update by ``zo_optimizer``: ``adam`` (default) is ZOODiP's recipe, the
  estimate normalized by sqrt((d + n - 1) / n) and ZO-Adam (``methods.common.zo_adam``, moments of its
  own, separate from BP-low's AdamW); ``sgd`` is MeZO's p -= zo_lr * g. With MeZO's unnormalized
  ZO-SGD at zo_lr 1e-5 (an earlier default) a ZO-high step moved the LoRA ~250x less
  than a BP-low step and lowered the loss ~5000x less: the method reduced to "BP-low on some
  steps". ZO-Adam's per-coordinate step is ~zo_lr whatever the estimate's scale, so a ZO-high
  step does measurable work (``nox -s calibrate_selective`` prints the descent per step kind).

The default schedule, p_bp = 1 - (t/T) * progress^gamma, makes BP-low less likely as t grows
(structure is decided at high t, where the low-resolution mismatch hurts) and ZO-high more
likely as training progresses (ZO from scratch fails to personalize); at progress 0 every
step is BP-low. A BP-low step leaves nothing behind (grads set to None, loss detached), so the
peak memory is that of the larger step kind, not their sum.

t and the choice are drawn on Python numbers (a ``random.Random`` seeded from the step's
generator): the branch never reads a tensor, so it also runs under FakeTensorMode.
"""

from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn.functional as F

from methods.common.base import cpu_copy, require
from methods.common.conditioning import encode_text, unet_prediction
from methods.common.diffusion import encode_latents, noisy_latents
from methods.common.zo import check_estimator, estimate_gradient, forward_passes
from methods.common.zo_adam import ZOAdam
from methods.lora import LoRA, LoRAConfig


def timestep_progress(t_frac: float, progress: float, cfg) -> float:
    """1 - (t/T) * progress^gamma: falls with t and with progress; 1 at progress 0."""
    return 1.0 - t_frac * progress**cfg.gamma


def always_bp_low(t_frac: float, progress: float, cfg) -> float:
    return 1.0


def always_zo_high(t_frac: float, progress: float, cfg) -> float:
    return 0.0


def fixed(t_frac: float, progress: float, cfg) -> float:
    return cfg.p_bp


SCHEDULES = {f.__name__: f for f in (timestep_progress, always_bp_low, always_zo_high, fixed)}
ZO_OPTIMIZERS = ("adam", "sgd")


@dataclasses.dataclass
class SelectiveConfig(LoRAConfig):
    schedule: str = "timestep_progress"
    gamma: float = 1.0
    p_bp: float = 0.5  # the `fixed` schedule's probability
    low_resolution: int | None = None  # None: high_resolution // 2
    high_resolution: int = 512
    estimator: str = "rge"
    n: int = 2
    mu: float = 1e-3
    zo_optimizer: str = "adam"
    zo_lr: float = 3e-3
    zo_normalize: bool = True
    zo_adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.schedule in SCHEDULES,
            f"method.schedule={self.schedule!r}; choose one of: {', '.join(SCHEDULES)}",
        )
        require(self.gamma > 0, f"method.gamma={self.gamma} must be > 0")
        require(0 <= self.p_bp <= 1, f"method.p_bp={self.p_bp} must be in [0, 1]")
        if self.low_resolution is None:
            self.low_resolution = self.high_resolution // 2
        for key in ("low_resolution", "high_resolution"):
            value = getattr(self, key)
            require(value >= 8 and value % 8 == 0, f"method.{key}={value} must be a positive multiple of 8")
        require(
            self.low_resolution <= self.high_resolution,
            f"method.low_resolution={self.low_resolution} must be <= "
            f"method.high_resolution={self.high_resolution}",
        )
        require(
            self.timesteps in ("uniform", "puts"),
            f"method.timesteps={self.timesteps!r}; choose uniform or puts",
        )
        check_estimator(self.estimator, self.n, self.mu)
        require(self.zo_lr >= 0, f"method.zo_lr={self.zo_lr} must be >= 0")
        require(
            self.zo_optimizer in ZO_OPTIMIZERS,
            f"method.zo_optimizer={self.zo_optimizer!r}; choose one of: {', '.join(ZO_OPTIMIZERS)}",
        )
        require(self.zo_adam_eps > 0, f"method.zo_adam_eps={self.zo_adam_eps} must be > 0")


def resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return pixels
    return F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class Selective(LoRA):
    name = "selective"
    display_name = "Selective BP/ZO"
    color = "#882255"
    Config = SelectiveConfig

    def setup(self, components, subject) -> None:
        super().setup(components, subject)
        self.counts = {"bp_low": 0, "zo_high": 0}
        cfg = self.cfg
        self.zo_adam = (
            ZOAdam(list(self.params.values()), cfg.zo_lr, eps=cfg.zo_adam_eps)
            if cfg.zo_optimizer == "adam"
            else None
        )

    def choose(self, generator: torch.Generator, step: int) -> tuple[int, bool]:
        """(t, whether this step is BP-low), from the step's generator."""
        cfg = self.cfg
        rng = random.Random(generator.initial_seed())
        T = self.c.noise_scheduler.config.num_train_timesteps
        t = rng.randrange(*((0, T) if cfg.timesteps == "uniform" else (cfg.T_L, cfg.T_U)))
        p_bp = SCHEDULES[cfg.schedule](t / T, step / cfg.steps, cfg)
        return t, rng.random() < p_bp

    def step(self, batch, step):
        c, cfg, g = self.c, self.cfg, batch["generator"]
        t_value, bp_low = self.choose(g, step)
        pixels = resize(batch["pixel_values"], cfg.low_resolution if bp_low else cfg.high_resolution)
        latents = encode_latents(c.vae, pixels, g)
        t = torch.full((latents.shape[0],), t_value, dtype=torch.long, device=latents.device)
        z_t, target = noisy_latents(c.noise_scheduler, latents, t, g)
        with torch.no_grad():  # the text encoder is frozen
            cond = encode_text(c, [self.instance_prompt] * latents.shape[0])

        def loss_fn() -> torch.Tensor:
            with self.autocast():
                pred = unet_prediction(c.unet, z_t, t, cond)
            return self.loss(pred, target)

        if bp_low:
            loss = self.backprop_step(loss_fn())
        else:
            loss = self.zo_step(loss_fn, g)
        self.counts["bp_low" if bp_low else "zo_high"] += 1
        return {"loss": loss, "bp_low": float(bp_low)}

    def zo_step(self, loss_fn, generator) -> torch.Tensor:
        cfg, params = self.cfg, list(self.params.values())
        grads, loss = estimate_gradient(
            loss_fn, params, cfg.estimator, cfg.n, cfg.mu, generator, cfg.zo_normalize
        )
        if self.zo_adam is not None:
            self.zo_adam.step(grads)
        else:
            with torch.no_grad():
                for p, grad in zip(params, grads):
                    p.sub_(grad, alpha=cfg.zo_lr)
        return loss

    def checkpoint(self):
        state = {**super().checkpoint(), "step_counts": dict(self.counts)}
        if self.zo_adam is not None:
            state["zo_adam"] = cpu_copy(self.zo_adam.state_dict())
        return state

    def restore(self, state) -> None:
        super().restore(state)
        self.counts.update(state.get("step_counts", {}))
        if self.zo_adam is not None and "zo_adam" in state:
            self.zo_adam.load_state_dict(state["zo_adam"])

    def record_extras(self):
        cfg = self.cfg
        zo_passes = forward_passes(cfg.estimator, cfg.n)
        steps = self.counts["bp_low"] + self.counts["zo_high"]
        # the mean over the steps run: a BP-low step is one forward pass (and a backward)
        mean_passes = (self.counts["bp_low"] + zo_passes * self.counts["zo_high"]) / steps if steps else None
        return {
            **super().record_extras(),
            "forward_passes_per_step": mean_passes,
            "bp_low_steps": self.counts["bp_low"],
            "zo_high_steps": self.counts["zo_high"],
            "zo_forward_passes_per_step": zo_passes,
            "low_resolution_px": cfg.low_resolution,
            "high_resolution_px": cfg.high_resolution,
        }
