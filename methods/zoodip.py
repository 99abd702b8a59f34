"""ZOODiP (Seo et al., CVPR 2025): textual inversion of one token by zeroth-order optimization
on a weight-quantized Stable Diffusion, with no backpropagation.

One step: encode the image, draw one timestep (PUTS by default), one noise and one prompt;
estimate the token's gradient from n + 1 forward passes that share them (RGE, ``methods.common.zo``);
project it off the history's low-variance directions (Subspace Gradient, ``methods.common.subspace``);
update the token with ZO-Adam (``methods.common.zo_adam``); record the new token in the history.

The token is a separate fp32 vector (the official code updates the fp16 embedding row in
place); before every forward pass it is written, in the model's dtype, into its embedding row.
Every other row and every quantized weight stays bit-identical. The artifact is that row: a
diffusers textual-inversion file. ``apply`` quantizes the stock pipeline the same way before
loading it, as the official inference notebook does (``quantize_at_inference``).

The naive ZO-TI of the paper's ablation: ``method.sg=false method.timesteps=uniform``.
"""

from __future__ import annotations

import dataclasses

import torch

from methods.common.base import cpu_copy, require
from methods.common.conditioning import encode_prompts
from methods.common.diffusion import denoising_loss, denoising_losses
from methods.common.quantized_model import check_quantize, quantize_networks, quantized_fraction
from methods.common.subspace import SubspaceGradient
from methods.common.token_method import TokenConfig, TokenMethod, TokenRows, compact_vocabulary
from methods.common.zo import check_estimator, estimate_gradient, estimate_gradient_batched, forward_passes
from methods.common.zo_adam import STATE_DTYPES, ZOAdam


@dataclasses.dataclass
class ZOODiPConfig(TokenConfig):
    precision: str = "fp16"
    timesteps: str = "puts"
    quantize: str = "int8"
    quantize_scope: str = "all"
    int4_scheme: str = "affine_group128"
    quantize_at_inference: bool = True
    estimator: str = "rge"
    n: int = 2
    mu: float = 1e-3
    normalize: bool = True
    sg: bool = True
    tau: int = 128
    nu: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-3
    adam_state_dtype: str = "fp32"
    compact_vocabulary: bool = True  # keep only the embedding rows the training prompts use
    batched_passes: bool = False  # the n + 1 passes in one batched call: faster, (n + 1)x activations

    def __post_init__(self) -> None:
        super().__post_init__()
        check_quantize(self.quantize, self.int4_scheme, self.quantize_scope)
        check_estimator(self.estimator, self.n, self.mu)
        require(self.tau >= 2, f"method.tau={self.tau} must be >= 2 (history length for the PCA)")
        require(0 < self.nu < 1, f"method.nu={self.nu} must be in (0, 1)")
        require(
            0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
            f"method.beta1={self.beta1}, beta2={self.beta2}: need [0, 1)",
        )
        require(self.adam_eps > 0, f"method.adam_eps={self.adam_eps} must be > 0")
        require(
            self.adam_state_dtype in STATE_DTYPES,
            f"method.adam_state_dtype={self.adam_state_dtype!r}; choose one of: {', '.join(STATE_DTYPES)}",
        )


class ZOODiP(TokenMethod):
    name = "zoodip"
    display_name = "ZOODiP"
    color = "#000000"
    gradient_free = True
    Config = ZOODiPConfig

    def setup(self, components, subject) -> None:
        cfg, self.c = self.cfg, components
        self.token_id = self.add_token(components, subject)
        self.quantized_layers = quantize_networks(
            components, cfg.quantize, cfg.quantize_scope, cfg.int4_scheme
        )
        self.quantized_weight_fraction = quantized_fraction(components)
        if cfg.compact_vocabulary:  # SDXL: each encoder keeps its own rows
            compact = [
                compact_vocabulary(tokenizer, encoder, cfg.placeholder_token)
                for tokenizer, encoder in zip(components.tokenizers, components.text_encoders)
            ]
            ids = [c.row(i) for c, i in zip(compact, self.rows.token_ids)]
            self.rows = TokenRows(components.text_encoders, ids, self.rows.vocabulary_ids)
        self.token = self.rows.read().float().clone()  # SDXL: both encoders' rows, concatenated
        self.subspace = (
            SubspaceGradient(self.token.numel(), cfg.tau, cfg.nu, self.token.device) if cfg.sg else None
        )
        self.adam = ZOAdam([self.token], cfg.lr, (cfg.beta1, cfg.beta2), cfg.adam_eps, cfg.adam_state_dtype)

    @property
    def token_row(self) -> int:
        """The placeholder's row in the (first) text encoder's embedding matrix, compacted or not."""
        return self.rows.token_ids[0]

    def trainable_parameters(self):
        return {"token_embedding": self.token}

    def _write_token(self) -> None:
        self.rows.write(self.token)

    def loss_functions(self, z_t, t, target, ids):
        """(loss of the current token, losses of a list of token values in one batched call)."""
        c = self.c

        def loss_fn() -> torch.Tensor:
            self._write_token()
            return denoising_loss(c.unet, z_t, t, encode_prompts(c, ids), target)

        def losses_fn(points) -> torch.Tensor:  # one text-encoder and one U-Net call for all points
            tokens = torch.stack([token for (token,) in points]).repeat_interleave(len(ids[0]), dim=0)
            repeated = tuple(i.repeat(len(points), 1) for i in ids)
            with self.rows.substituted(tokens):  # SDXL: each encoder its part of the vector
                cond = encode_prompts(c, repeated)
            return denoising_losses(c.unet, z_t, t, cond, target, len(points))

        return loss_fn, losses_fn

    def estimate(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(gradient estimate before Subspace Gradient, loss) on the step's batch: n + 1 forward
        passes, one after another or (``batched_passes``) in one batched call."""
        cfg, g = self.cfg, batch["generator"]
        with torch.no_grad():
            loss_fn, losses_fn = self.loss_functions(*self.denoising_inputs(batch))
            effective_dim = self.subspace.effective_dim() if self.subspace is not None else None
            if cfg.batched_passes:
                estimator, fn = estimate_gradient_batched, losses_fn
            else:
                estimator, fn = estimate_gradient, loss_fn
            (grad,), loss = estimator(
                fn, [self.token], cfg.estimator, cfg.n, cfg.mu, g, cfg.normalize, effective_dim
            )
        return grad, loss

    def step(self, batch, step):
        grad, loss = self.estimate(batch)
        with torch.no_grad():
            if self.subspace is not None:
                grad = self.subspace.project(grad)
            self.adam.step([grad])
            self._write_token()
            if self.subspace is not None:
                self.subspace.record(self.token)
        return {"loss": loss}

    def checkpoint(self):
        state = {"token": self.token, "adam": self.adam.state_dict()}
        if self.subspace is not None:
            state["subspace"] = self.subspace.state_dict()
        return cpu_copy(state)

    def restore(self, state) -> None:
        self.token.copy_(state["token"])
        self.adam.load_state_dict(state["adam"])
        if self.subspace is not None:
            self.subspace.load_state_dict(state["subspace"])
        with torch.no_grad():
            self._write_token()

    def record_extras(self):
        return {
            "forward_passes_per_step": forward_passes(self.cfg.estimator, self.cfg.n),
            "quantized_layers": sum(self.quantized_layers.values()),
            "quantized_weight_fraction": self.quantized_weight_fraction,
            "sg_removed_dims": int(self.subspace.removed_dims()) if self.subspace is not None else 0,
            "sg_kept_ratios": self.subspace.kept_ratios() if self.subspace is not None else [],  # Fig. 8
        }

    def state_dict(self):
        # the diffusers example's learned_embeds.safetensors: {token: (1, dim)}, in the model's dtype
        return self.rows.artifact(self.cfg.placeholder_token)

    def apply(self, pipeline, artifact) -> None:
        if self.cfg.quantize_at_inference:
            quantize_networks(pipeline, self.cfg.quantize, self.cfg.quantize_scope, self.cfg.int4_scheme)
        super().apply(pipeline, artifact)
