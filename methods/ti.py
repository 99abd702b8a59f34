"""Textual Inversion (Gal et al., 2023), as the diffusers textual_inversion example.

One new token is added to the tokenizer; the whole input-embedding matrix is the AdamW
parameter (as in the example, so its gradient and optimizer state are what the paper's
memory figure measures), and after every step all rows but the new token's are put back,
so they stay bit-identical. SDXL: both encoders' matrices train, as diffusers'
textual_inversion_sdxl example.

A checkpoint holds the token's rows only: of each matrix and of AdamW's moments (SD1.5: a few KB,
not the 3 x 49,409 x 768 floats = 455 MB of the full matrices and moments). That resumes the run
bit for bit: AdamW is elementwise, so the token's row moves by its own moments alone, and every
other row is put back after each step, so their moments (nonzero for the prompts' words) never
reach the model; a restore rebuilds them as zeros.
"""

from __future__ import annotations

import dataclasses

import torch

from methods.common.base import cpu_copy, require
from methods.common.conditioning import encode_prompts
from methods.common.diffusion import denoising_loss
from methods.common.savers import Backprop, check_optimizer
from methods.common.token_method import TokenConfig, TokenMethod


@dataclasses.dataclass
class TIConfig(TokenConfig):
    optimizer: str = "adamw"  # adamw | adamw8bit (methods.common.savers)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optimizer(self.optimizer)
        # The paper's TI baseline is FP32; AdamW on fp16 embedding rows diverges.
        require(self.precision == "fp32", f"method.precision={self.precision!r}; TI trains in fp32 only")


class TextualInversion(Backprop, TokenMethod):
    name = "ti"
    display_name = "TI"
    color = "#56B4E9"
    Config = TIConfig

    def setup(self, components, subject) -> None:
        self.c = components
        self.token_id = self.add_token(components, subject)
        self.tables = self.rows.weights  # one embedding matrix per text encoder
        self.embeddings = self.tables[0]
        self.original_tables, self.keep_rows = [], []
        for table, token_id in zip(self.tables, self.rows.token_ids):
            table.requires_grad_(True)
            self.original_tables.append(table.detach().clone())
            keep = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
            keep[token_id] = False
            self.keep_rows.append(keep)
        # diffusers example: AdamW(betas 0.9/0.999, weight_decay 1e-2, eps 1e-8)
        self.optimizer = self.make_optimizer(self.tables, lr=self.cfg.lr, weight_decay=1e-2, eps=1e-8)
        self.use_savers(components.device)

    def half_modules(self):
        # the diffusers example casts the U-Net and the VAE; the text encoder trains: fp32
        return [self.c.vae, self.c.unet]

    def checkpointed_modules(self):
        return [self.c.unet, *self.c.text_encoders]  # the example checkpoints both

    def trainable_parameters(self):
        names = ["token_embedding", "token_embedding_2"]
        return dict(zip(names, self.tables))

    def step(self, batch, step):
        c = self.c
        z_t, t, target, ids = self.denoising_inputs(batch)
        with self.autocast():
            loss = denoising_loss(c.unet, z_t, t, encode_prompts(c, ids), target)
        self.optimize(loss, self.tables)
        with torch.no_grad():  # only the new token's row may change
            for table, original, keep in zip(self.tables, self.original_tables, self.keep_rows):
                table[keep] = original[keep]
        return {"loss": loss.detach()}

    def checkpoint(self):
        if self.cfg.optimizer == "adamw8bit":  # block-wise 8-bit moments: no row of their own
            return super().checkpoint()
        optimizer = self.optimizer.state_dict()
        token_rows, moments = [], {}
        for k, (table, row) in enumerate(zip(self.tables, self.rows.token_ids)):
            token_rows.append(table[row])  # copied by cpu_copy: a view would save the whole matrix
            state = optimizer["state"].get(k, {})  # exp_avg, exp_avg_sq: the token's row; step as is
            moments[k] = {n: v[row] if v.shape == table.shape else v for n, v in state.items()}
        optimizer["state"] = moments
        scaler = {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}
        return cpu_copy({"token_rows": token_rows, "optimizer": optimizer, **scaler})

    def restore(self, state) -> None:
        if "trainable" in state:  # a checkpoint of the full matrices, written by earlier versions
            super().restore(state)
            return
        moments = state["optimizer"]["state"]
        optimizer = {**state["optimizer"], "state": {}}
        for k, (table, row) in enumerate(zip(self.tables, self.rows.token_ids)):
            with torch.no_grad():
                table[row] = state["token_rows"][k].to(table.device)
            optimizer["state"][k] = {n: _full_size(v, table, row) for n, v in moments[k].items()}
        self.optimizer.load_state_dict(optimizer)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def state_dict(self):
        # the diffusers example's learned_embeds.safetensors: {token: (1, dim)}; SDXL: clip_l/clip_g
        return self.rows.artifact(self.cfg.placeholder_token)


def _full_size(value: torch.Tensor, table: torch.Tensor, row: int) -> torch.Tensor:
    """A checkpointed row of a full-size optimizer state, as the full state with zeros elsewhere;
    other state (the step count) as it is."""
    if value.shape != table.shape[1:]:
        return value
    full = torch.zeros_like(table)
    full[row] = value.to(table.device)
    return full
