"""What DreamBooth, QLoRA, PEQA and TuneQDM share: the diffusers DreamBooth training step.

Every step: the instance prompt "a photo of sks dog" (fixed, as the diffusers
train_dreambooth example), the VAE posterior sample, one timestep and noise per sample, the
frozen text encoder, backprop into whatever the method made trainable, gradient clipping at
``max_grad_norm`` and AdamW (the example's defaults: betas 0.9/0.999, weight decay 1e-2,
eps 1e-8, constant learning rate). A method only says what it trains (``prepare``), what it
stores (``state_dict``) and how a stock pipeline takes it (``apply``).
"""

from __future__ import annotations

import abc
import dataclasses

import torch
import torch.nn.functional as F

from methods.common.base import Method, MethodConfig, require
from methods.common.conditioning import encode_text, unet_prediction
from methods.common.diffusion import encode_latents, noisy_latents
from methods.common.savers import Backprop, check_optimizer
from methods.common.timesteps import check_timestep_bounds, sample_timesteps


@dataclasses.dataclass
class UNetFinetuneConfig(MethodConfig):
    precision: str = "fp32"
    identifier: str = "sks"
    instance_prompt: str = "a photo of {}"
    timesteps: str = "uniform"
    T_L: int = 500
    T_U: int = 900
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    optimizer: str = "adamw"  # adamw | adamw8bit (methods.common.savers)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optimizer(self.optimizer)
        # The baselines train in fp32 (the diffusers example's default, no mixed precision).
        require(
            self.precision == "fp32", f"method.precision={self.precision!r}; this method trains in fp32 only"
        )
        require(bool(self.identifier.strip()), "method.identifier must be a non-empty word such as 'sks'")
        require(
            self.instance_prompt.count("{}") == 1,
            f"method.instance_prompt={self.instance_prompt!r} must contain one '{{}}' for the subject phrase",
        )
        check_timestep_bounds(self.timesteps, self.T_L, self.T_U)
        require(
            self.max_grad_norm >= 0,
            f"method.max_grad_norm={self.max_grad_norm} must be >= 0 (0: no clipping)",
        )
        require(self.weight_decay >= 0, f"method.weight_decay={self.weight_decay} must be >= 0")


class UNetFinetune(Backprop, Method):
    Config = UNetFinetuneConfig

    def subject_phrase(self, subject) -> str:
        return f"{self.cfg.identifier} {subject.class_noun}"

    @abc.abstractmethod
    def prepare(self, components, subject) -> dict[str, torch.nn.Parameter]:
        """Freeze, quantize or wrap ``components.unet``; return the trainable tensors by name."""

    def setup(self, components, subject) -> None:
        self.c = components
        self.instance_prompt = self.cfg.instance_prompt.format(self.subject_phrase(subject))
        self.params = self.prepare(components, subject)
        self.optimizer = self.make_optimizer(
            list(self.params.values()),
            lr=self.cfg.lr,
            betas=(0.9, 0.999),
            weight_decay=self.cfg.weight_decay,
            eps=1e-8,
        )
        self.use_savers(components.device)

    def half_modules(self):
        c = self.c
        return [c.vae, *c.text_encoders, c.unet]

    def checkpointed_modules(self):
        return [self.c.unet]

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return self.params

    def training_batch(self, batch, generator) -> tuple[torch.Tensor, list[str]]:
        """Pixels and prompts of one step (DreamBooth appends its class images here)."""
        pixels = batch["pixel_values"]
        return pixels, [self.instance_prompt] * pixels.shape[0]

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred.float(), target.float())

    def step(self, batch, step):
        c, cfg, g = self.c, self.cfg, batch["generator"]
        pixels, prompts = self.training_batch(batch, g)
        latents = encode_latents(c.vae, pixels, g)
        num_train_timesteps = c.noise_scheduler.config.num_train_timesteps
        t = sample_timesteps(cfg.timesteps, latents.shape[0], g, num_train_timesteps, cfg.T_L, cfg.T_U)
        z_t, target = noisy_latents(c.noise_scheduler, latents, t, g)
        with self.autocast():
            cond = self.encode_prompts_for_training(prompts)
            pred = unet_prediction(c.unet, z_t, t, cond)
        loss = self.loss(pred, target)
        self.optimize(loss, list(self.params.values()), cfg.max_grad_norm)
        return {"loss": loss.detach()}

    def encode_prompts_for_training(self, prompts: list[str]):
        with torch.no_grad():  # the text encoder is frozen (DreamBooth may train it)
            return encode_text(self.c, prompts)
