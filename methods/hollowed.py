"""Hollowed Net (NeurIPS 2024): LoRA on a U-Net whose central layers are cut out.

The paper has no public code; this is our reading of it (../shared/papers/METHODS.md).

- Stage 1 (``precompute``, before step 0, counted as model load by the harness): for every
  step the loop will run, draw that step's sample exactly as the loop and the plain LoRA step
  would (the loop's image pick and flip, ``methods.common.sampling``, then the VAE
  posterior sample, t and the noise from the same generator), run the original U-Net up to
  the cut and store what crosses it (``methods.common.hollow_unet``) with the noisy latents, t and the
  target: safetensors files (``cache=disk``: a fresh folder under ``cache_dir``, or the
  system's temp dir, deleted with the method) or CPU tensors (``cache=host``).
- Stage 2 (``step``): the removed layers are gone (their modules replaced by weightless
  placeholders, so their weights are freed) and the hollowed forward reads the cached boundary
  tensors. LoRA (``lora_scope``): ``all`` (default, the paper's most likely reading) puts it on
  the attention projections of every kept layer, also the down layers upstream of the cut, whose
  effect through the removed middle is never trained (the cache holds the base U-Net's
  activations) yet after transfer flows through the deep layers; ``exact`` puts it only on the
  kept up layers, downstream of the cut, so stage 2 trains exactly the loss of the full U-Net
  with that LoRA. On the known-answer arms ``all`` closes more after transfer (docs/methods.md). With
  ``offload_encoders`` the VAE and text encoder leave the device too: stage 2 needs neither.
- Transfer (``apply``): the LoRA file uses the full U-Net's module names; it loads into the
  stock U-Net and is fused into it (layers that were removed simply get no LoRA).

With ``fraction=0`` nothing is removed and training equals ``method=lora`` step for step.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch._guards import detect_fake_mode

from methods.common.base import require
from methods.common.conditioning import encode_text
from methods.common.diffusion import encode_latents, noisy_latents
from methods.common.hollow_unet import (
    HollowPlan,
    UNetLayers,
    boundary_activations,
    hollowed_forward,
    plan_removal,
    remove_layers,
    unet_layers,
)
from methods.common.latent_cache import release_weights
from methods.common.lora_io import ATTENTION_PROJECTIONS, add_unet_lora
from methods.common.sampling import batch_pixels, draw_images, step_generator
from methods.common.timesteps import sample_timesteps
from methods.common.unet_finetune import UNetFinetune
from methods.lora import LoRA, LoRAConfig

CACHE_KINDS = ("disk", "host")
LORA_SCOPES = ("exact", "all")


@dataclasses.dataclass
class HollowedConfig(LoRAConfig):
    fraction: float = 0.5
    cache: str = "disk"
    cache_dir: str | None = None  # where the run's cache folder goes; None: the system's temp dir
    offload_encoders: bool = True
    lora_scope: str = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.lora_scope in LORA_SCOPES,
            f"method.lora_scope={self.lora_scope!r}; choose one of: {', '.join(LORA_SCOPES)}",
        )
        require(
            0 <= self.fraction < 1,
            f"method.fraction={self.fraction} must be in [0, 1) (share of U-Net layers removed)",
        )
        require(
            self.cache in CACHE_KINDS, f"method.cache={self.cache!r}; choose one of: {', '.join(CACHE_KINDS)}"
        )


class ActivationCache:
    """Stage-1 tensors, one entry per training step, off the training device."""

    def __init__(self, kind: str, directory: str | None = None):
        self.kind = kind
        self.nbytes = 0
        self._host: dict[int, dict[str, torch.Tensor]] = {}
        if kind == "disk":  # a fresh folder per run, deleted with the cache (at the latest at exit)
            if directory is not None:
                Path(directory).mkdir(parents=True, exist_ok=True)
            self._folder = tempfile.TemporaryDirectory(prefix="hollowed-cache-", dir=directory)
            self.directory = Path(self._folder.name)

    def _path(self, step: int) -> Path:
        return self.directory / f"step{step:07d}.safetensors"

    def put(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        if self.kind == "disk":
            save_file(tensors, str(self._path(step)))
            self.nbytes += self._path(step).stat().st_size
        else:
            self._host[step] = tensors
            self.nbytes += sum(v.numel() * v.element_size() for v in tensors.values())

    def get(self, step: int, device) -> dict[str, torch.Tensor]:
        if self.kind == "disk":
            path = self._path(step)
            if not path.exists():
                raise KeyError(f"no stage-1 cache entry for step {step} ({path})")
            tensors = load_file(str(path))
        else:
            if step not in self._host:
                raise KeyError(f"no stage-1 cache entry for step {step}")
            tensors = self._host[step]
        return {k: v.to(device) for k, v in tensors.items()}


def downstream_lora_targets(layers: UNetLayers, plan: HollowPlan) -> str:
    """peft ``target_modules`` (a regex on module names): the attention projections of the kept
    up layers, the only layers that run after everything the stage-1 cache holds: a LoRA
    upstream of the cut would change what the cache holds, and stage 2 cannot recompute it."""
    kept = [layers.up[k] for k in range(layers.K + 1) if k not in plan.removed_up]
    units = "|".join(f"{u.block}\\.attentions\\.{u.unit}" for u in kept)
    projections = "|".join(p.replace(".", "\\.") for p in ATTENTION_PROJECTIONS)
    return rf"up_blocks\.({units})\..*\.({projections})"


class HollowedNet(LoRA):
    name = "hollowed"
    display_name = "Hollowed Net"
    color = "#F0E442"
    Config = HollowedConfig

    def setup(self, components, subject) -> None:
        # LoRA and the optimizer come after stage 1, on the hollowed U-Net (precompute).
        self.c, self.subject = components, subject
        self.instance_prompt = self.cfg.instance_prompt.format(self.subject_phrase(subject))
        self.layers = unet_layers(components.unet)
        self.plan = plan_removal(self.layers, self.cfg.fraction)
        self.params, self.cache, self.removed_parameters = {}, None, 0

    def precompute(self, images: torch.Tensor, seed: int, steps: int) -> None:
        c, cfg = self.c, self.cfg
        # Fake tensors (memory prediction) cannot be written to a file.
        self.cache = ActivationCache("host" if detect_fake_mode() is not None else cfg.cache, cfg.cache_dir)
        with torch.no_grad():
            self.text = encode_text(c, [self.instance_prompt])
        num_train_timesteps = c.noise_scheduler.config.num_train_timesteps
        for step in range(steps):
            g = step_generator(seed, step)
            draw = draw_images(cfg.data, seed, step, len(images), cfg.batch_size, g)  # the loop's own
            latents = encode_latents(c.vae, batch_pixels(images, draw).to(c.device), g)
            t = sample_timesteps(cfg.timesteps, cfg.batch_size, g, num_train_timesteps, cfg.T_L, cfg.T_U)
            z_t, target = noisy_latents(c.noise_scheduler, latents, t, g)
            text = self.text.expand(cfg.batch_size)
            boundary = boundary_activations(c.unet, self.layers, self.plan, z_t, t.to(c.device), text)
            drawn = {"image_index": draw.image_index, "flipped": draw.flipped}
            self.cache.put(step, {**drawn, "z_t": z_t, "timesteps": t, "target": target, **boundary})

        self.removed_parameters = remove_layers(c.unet, self.layers, self.plan)
        if cfg.offload_encoders:
            for module in (c.vae, *c.text_encoders):
                release_weights(module)  # apply() uses a fresh pipeline
        UNetFinetune.setup(self, c, self.subject)  # LoRA on the kept layers (``prepare``), AdamW
        if c.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the removed weights' blocks back before training

    def prepare(self, components, subject):
        cfg = self.cfg
        targets = ATTENTION_PROJECTIONS
        if cfg.lora_scope == "exact" and self.plan.n_removed:
            targets = downstream_lora_targets(self.layers, self.plan)
        return add_unet_lora(
            components.unet, cfg.rank, cfg.lora_alpha, target_modules=targets, init_seed=cfg.lora_init_seed
        )

    def step(self, batch, step):
        if self.cache is None:
            raise RuntimeError(
                "Hollowed Net needs precompute(images, seed, steps) (its stage 1) before step()"
            )
        c = self.c
        entry = self.cache.get(step, c.device)
        drawn = {key: entry.pop(key) for key in ("image_index", "flipped")}
        if detect_fake_mode() is None and any(
            key in batch and not torch.equal(drawn[key].cpu(), batch[key].cpu()) for key in drawn
        ):
            raise RuntimeError(
                f"stage-1 entry {step} was drawn for images {drawn['image_index'].tolist()} "
                f"(flipped {drawn['flipped'].tolist()}) but the loop drew {batch['image_index'].tolist()} "
                f"(flipped {batch['flipped'].tolist()}): precompute no longer replays the loop's draws"
            )
        text = self.text.expand(entry["z_t"].shape[0])
        with self.autocast():
            pred = hollowed_forward(
                c.unet, self.layers, self.plan, entry["z_t"], entry["timesteps"], text, entry
            )
        return {"loss": self.backprop_step(self.loss(pred, entry["target"]))}

    def record_extras(self):
        kept = sum(p.numel() for p in self.c.unet.parameters() if not p.requires_grad)
        return {
            **super().record_extras(),
            "hollowed_layers": self.layers.count,
            "hollowed_layers_removed": self.plan.n_removed,
            "hollowed_removed_unet_parameters": self.removed_parameters,
            "hollowed_kept_unet_parameters": kept,
            "cache_bytes": self.cache.nbytes if self.cache else 0,
            "cache_kind": self.cache.kind if self.cache else None,
        }
