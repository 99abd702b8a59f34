"""Textual Inversion (Gal et al., 2023), as the diffusers textual_inversion example.

One new token is added to the tokenizer; the whole input-embedding matrix is the AdamW
parameter (as in the example, so its gradient and optimizer state are what the paper's
memory figure measures), and after every step all rows but the new token's are put back,
so they stay bit-identical.
"""

from __future__ import annotations

import dataclasses

import torch

from methods.base import require
from methods.diffusion import denoising_loss
from methods.token_method import TokenConfig, TokenMethod


@dataclasses.dataclass
class TIConfig(TokenConfig):
    def __post_init__(self) -> None:
        super().__post_init__()
        # The paper's TI baseline is FP32; AdamW on fp16 embedding rows diverges.
        require(self.precision == "fp32", f"method.precision={self.precision!r}; TI trains in fp32 only")


class TextualInversion(TokenMethod):
    name = "ti"
    Config = TIConfig

    def setup(self, components, subject) -> None:
        self.c = components
        self.token_id = self.add_token(components, subject)
        self.embeddings = components.text_encoder.get_input_embeddings().weight
        self.embeddings.requires_grad_(True)
        self.original_embeddings = self.embeddings.detach().clone()
        self.keep_rows = torch.ones(self.embeddings.shape[0], dtype=torch.bool, device=self.embeddings.device)
        self.keep_rows[self.token_id] = False
        # diffusers example: AdamW(betas 0.9/0.999, weight_decay 1e-2, eps 1e-8)
        self.optimizer = torch.optim.AdamW([self.embeddings], lr=self.cfg.lr, weight_decay=1e-2, eps=1e-8)

    def trainable_parameters(self):
        return {"token_embedding": self.embeddings}

    def step(self, batch, step):
        c = self.c
        z_t, t, target, ids = self.denoising_inputs(batch)
        hidden = c.text_encoder(ids)[0]
        loss = denoising_loss(c.unet, z_t, t, hidden, target)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # only the new token's row may change
            self.embeddings[self.keep_rows] = self.original_embeddings[self.keep_rows]
        return {"loss": loss.detach()}

    def state_dict(self):
        # the diffusers example's learned_embeds.safetensors: {token: (1, dim)}
        return {self.cfg.placeholder_token: self.embeddings[self.token_id : self.token_id + 1].detach()}
