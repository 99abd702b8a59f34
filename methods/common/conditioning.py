"""The U-Net's text conditioning, for each family (SD1/SD2: one text encoder; SDXL: two).

- SD1.x / SD2.x: the text encoder's last hidden state (SD2's encoder config already stops at
  OpenCLIP's penultimate layer).
- SDXL (as diffusers' StableDiffusionXLPipeline and its training examples): both encoders'
  penultimate hidden states side by side (768 + 1280 = 2048 dims) for cross-attention, plus
  the added conditioning: the second encoder's pooled projection (``text_embeds``) and
  ``time_ids`` = (original h, w, crop top, left, target h, w), here the training image's size
  with no crop (the images are square-resized, never cropped).

``prompt_ids`` tokenizes once per tokenizer, ``encode_prompts`` runs the text encoder(s) (a
token method writes its token's rows in between), ``unet_prediction`` calls the U-Net.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

VAE_DOWNSAMPLING = 8  # every family's VAE: latents are pixels / 8


def token_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


class Conditioning(NamedTuple):
    hidden: torch.Tensor  # encoder_hidden_states (B, 77, D)
    pooled: torch.Tensor | None = None  # SDXL: the second encoder's pooled projection (B, P)

    def expand(self, batch_size: int) -> Conditioning:
        """A one-prompt conditioning repeated (as a view) for ``batch_size`` samples."""
        pooled = None if self.pooled is None else self.pooled.expand(batch_size, -1)
        return Conditioning(self.hidden.expand(batch_size, -1, -1), pooled)


def prompt_ids(components, prompts: list[str]) -> tuple[torch.Tensor, ...]:
    """Token ids of ``prompts``, one (B, 77) tensor per tokenizer."""
    return tuple(token_ids(t, prompts, components.device) for t in components.tokenizers)


def encode_prompts(components, ids: tuple[torch.Tensor, ...]) -> Conditioning:
    if components.text_encoder_2 is None:
        return Conditioning(components.text_encoder(ids[0])[0])
    first = components.text_encoder(ids[0], output_hidden_states=True)
    second = components.text_encoder_2(ids[1], output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return Conditioning(hidden, second.text_embeds)


def encode_text(components, prompts: list[str]) -> Conditioning:
    return encode_prompts(components, prompt_ids(components, prompts))


def added_cond_kwargs(cond: Conditioning, sample: torch.Tensor, dtype: torch.dtype) -> dict | None:
    """SDXL's ``added_cond_kwargs`` for latents ``sample`` (None for SD1/SD2)."""
    if cond.pooled is None:
        return None
    h, w = (VAE_DOWNSAMPLING * s for s in sample.shape[-2:])
    time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=dtype, device=sample.device)
    return {"text_embeds": cond.pooled.to(dtype), "time_ids": time_ids.expand(sample.shape[0], -1)}


def unet_prediction(unet, z_t: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
    """The U-Net's output for ``cond`` (a Conditioning, or SD1/SD2 hidden states as a tensor)."""
    if isinstance(cond, torch.Tensor):
        cond = Conditioning(cond)
    kwargs = {}
    added = added_cond_kwargs(cond, z_t, unet.dtype)
    if added is not None:
        kwargs["added_cond_kwargs"] = added
    return unet(z_t, timesteps.to(z_t.device), cond.hidden.to(unet.dtype), **kwargs).sample
