"""Custom Diffusion (Kumari et al., CVPR 2023), as diffusers' train_custom_diffusion example
(``--freeze_model crossattn_kv``, its default): the key and value projections of every
cross-attention layer (attn2: they read the text) and a new modifier token ``<new1>`` train;
everything else is frozen. The instance prompt names the subject "<new1> dog".

- U-Net: attn2's processor is diffusers' ``CustomDiffusionAttnProcessor2_0`` with trainable
  ``to_k_custom_diffusion`` / ``to_v_custom_diffusion`` initialised from the layer's own K/V (the
  example); attn1 keeps its processor (the example sets an equivalent non-trainable one).
- Token: the whole input-embedding matrix is the AdamW parameter, as in the example; a gradient
  hook zeroes every row but the modifier token's (the example zeroes them before the step), and
  after each step those rows are put back (AdamW's weight decay would shrink them by lr x 1e-2 a
  step; the example lets it), so the rest of the vocabulary stays bit-identical.
- Prior preservation (optional, off by default): DreamBooth's class-image cache and prior loss
  (methods/dreambooth.py); the example retrieves real LAION images or generates them.
- Artifact: one safetensors file holding the K/V weights under the keys of diffusers'
  ``pytorch_custom_diffusion_weights`` and the token's row(s) under the token (SDXL: ``clip_l`` /
  ``clip_g``). ``apply`` loads the K/V part the way diffusers loads Custom Diffusion weights
  (``unet.load_attn_procs``, with the attn1 entries the example's .bin file holds), the token with
  ``load_textual_inversion``, then folds the K/V weights into attn2's own projections and puts the
  stock attention processors back: the same outputs at the stock pipeline's inference cost.
"""

from __future__ import annotations

import dataclasses

import torch

from methods.common.base import require
from methods.common.conditioning import encode_text
from methods.common.token_method import MAX_TOKEN_CHARS, TokenRows, add_placeholder_token, load_token
from methods.dreambooth import DreamBooth, DreamBoothConfig, class_images

CROSS_ATTENTION = "attn2.processor"
SELF_ATTENTION = "attn1.processor"
KV_WEIGHTS = ("to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight")


@dataclasses.dataclass
class CustomDiffusionConfig(DreamBoothConfig):
    identifier: str = "<new1>"  # the modifier token: a new word of the vocabulary
    initializer: str = "ktn"  # the example's --initializer_token default

    def __post_init__(self) -> None:
        super().__post_init__()
        token = self.identifier
        require(
            0 < len(token) <= MAX_TOKEN_CHARS and token.isprintable() and not any(c.isspace() for c in token),
            f"method.identifier={token[:40]!r} is the modifier token: give one new word of "
            f"1..{MAX_TOKEN_CHARS} printable characters without spaces, e.g. '<new1>'",
        )
        require(bool(self.initializer.strip()), "method.initializer must name one or more words")
        require(
            not self.train_text_encoder,
            "method.train_text_encoder=true: Custom Diffusion trains its modifier token's row of the "
            "text encoder, not the text encoder; use method=dreambooth for that",
        )


class CustomDiffusion(DreamBooth):
    name = "custom_diffusion"
    display_name = "Custom Diffusion"
    color = "#DDCC77"
    Config = CustomDiffusionConfig
    artifact_filename = "pytorch_custom_diffusion_weights.safetensors"
    in_papers = False  # beyond the papers: the report marks its rows

    def prepare(self, components, subject):
        self.class_pixels = None
        if self.cfg.prior_preservation:
            self.class_pixels = class_images(components, subject.class_noun, self.cfg)
            self.class_prompt = self.cfg.class_prompt.format(subject.class_noun)
        unet = components.unet
        unet.requires_grad_(False)
        for encoder in components.text_encoders:
            encoder.requires_grad_(False)
        params = add_kv_processors(unet)
        ids = [
            add_placeholder_token(tokenizer, encoder, self.cfg.identifier, self.cfg.initializer)
            for tokenizer, encoder in zip(components.tokenizers, components.text_encoders)
        ]
        self.rows = TokenRows(components.text_encoders, ids)
        self.original_tables = [w.detach().clone() for w in self.rows.weights]
        for k, (table, token_id) in enumerate(zip(self.rows.weights, ids)):
            table.requires_grad_(True)
            only_token = torch.zeros(table.shape[0], 1, dtype=table.dtype, device=table.device)
            only_token[token_id] = 1
            table.register_hook(lambda grad, mask=only_token: grad * mask)
            params[f"token_embedding{'' if k == 0 else f'_{k + 1}'}"] = table
        return params

    def encode_prompts_for_training(self, prompts):
        return encode_text(self.c, prompts)  # with gradients: the modifier token's row trains

    def half_modules(self):
        # the example casts the U-Net and the VAE; the text encoder holds the trained token row
        return [self.c.vae, self.c.unet]

    def checkpointed_modules(self):
        return [self.c.unet, *self.c.text_encoders]  # the example checkpoints both

    def step(self, batch, step):
        logs = super().step(batch, step)  # UNetFinetune's step: the savers, clipping, AdamW
        with torch.no_grad():  # every row but the token's back to its value
            for table, original, token_id in zip(
                self.rows.weights, self.original_tables, self.rows.token_ids
            ):
                row = table[token_id].clone()
                table.copy_(original)
                table[token_id] = row
        return logs

    def state_dict(self):
        kv = {
            f"{name}.{key}": getattr(processor, key.split(".")[0]).weight.detach()
            for name, processor in self.c.unet.attn_processors.items()
            if name.endswith(CROSS_ATTENTION)
            for key in KV_WEIGHTS
        }
        return {**kv, **self.rows.artifact(self.cfg.identifier)}

    def apply(self, pipeline, artifact) -> None:
        unet = pipeline.unet
        kv = {k: v for k, v in artifact.items() if "custom_diffusion" in k}
        # the example's .bin file: an empty entry per self-attention processor
        kv |= {name: {} for name in unet.attn_processors if name.endswith(SELF_ATTENTION)}
        # _pipeline: diffusers 0.42's load_attn_procs sets the processors only when it is given
        unet.load_attn_procs(kv, _pipeline=pipeline)
        load_token(
            pipeline, {k: v for k, v in artifact.items() if "custom_diffusion" not in k}, self.cfg.identifier
        )
        fold_kv_processors(unet)


def cross_attention_layers(unet) -> dict[str, torch.nn.Module]:
    """attn2 of every transformer block, by its processor's name."""
    return {
        name: unet.get_submodule(name.removesuffix(".processor"))
        for name in unet.attn_processors
        if name.endswith(CROSS_ATTENTION)
    }


def add_kv_processors(unet) -> dict[str, torch.nn.Parameter]:
    """Custom Diffusion's trainable K/V processors on every attn2 (the example: initialised from
    the layer's K/V); returns their weights by name."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    processors = dict(unet.attn_processors)
    params = {}
    for name, attn in cross_attention_layers(unet).items():
        processor = CustomDiffusionAttnProcessor2_0(
            train_kv=True, train_q_out=False, hidden_size=attn.to_k.out_features,
            cross_attention_dim=attn.to_k.in_features,
        ).to(attn.to_k.weight.device, attn.to_k.weight.dtype)  # fmt: skip
        with torch.no_grad():
            processor.to_k_custom_diffusion.weight.copy_(attn.to_k.weight)
            processor.to_v_custom_diffusion.weight.copy_(attn.to_v.weight)
        processors[name] = processor
        params[f"{name}.to_k_custom_diffusion.weight"] = processor.to_k_custom_diffusion.weight
        params[f"{name}.to_v_custom_diffusion.weight"] = processor.to_v_custom_diffusion.weight
    unet.set_attn_processor(processors)
    return params


def fold_kv_processors(unet) -> None:
    """The K/V weights of the Custom Diffusion processors copied into attn2's own to_k / to_v, and
    the stock processors put back: the same attention, the stock U-Net's layers and cost."""
    processors = unet.attn_processors
    with torch.no_grad():
        for name, attn in cross_attention_layers(unet).items():
            processor = processors[name]
            attn.to_k.weight.copy_(processor.to_k_custom_diffusion.weight)
            attn.to_v.weight.copy_(processor.to_v_custom_diffusion.weight)
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())  # what a stock U-Net is built with
