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

``protocol``: ``paper`` (lr 5e-3, fp32 Adam moments, every network quantized from the weights
in ``precision`` with fp32 arithmetic) or ``official`` (train_zoodip.sh / train_zoodip.py: lr
1e-2, fp16 moments, the U-Net and VAE cast to ``precision`` and the text encoder kept in fp32
while quanto quantizes them, in each weight's own dtype; then the text encoder is cast).
``captions``: a JSON file in the official ``cc.json`` format ({subject: {image file: caption
with ``{}`` for the token}}): each image trains with its own caption (``--use_cc``) instead of
a random template, for the subjects the file has.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from methods.common.base import cpu_copy, require
from methods.common.conditioning import encode_prompts
from methods.common.diffusion import denoising_loss, denoising_losses
from methods.common.quantized_model import check_quantize, quantize_networks, quantized_fraction
from methods.common.subspace import SubspaceGradient
from methods.common.token_method import TokenConfig, TokenMethod, TokenRows, compact_vocabulary
from methods.common.zo import check_estimator, estimate_gradient, estimate_gradient_batched, forward_passes
from methods.common.zo_adam import STATE_DTYPES, ZOAdam

PROTOCOLS = ("paper", "official")
# what protocol=official takes from the official script when method.lr / adam_state_dtype are null
PROTOCOL_DEFAULTS = {
    "paper": {"lr": 5e-3, "adam_state_dtype": "fp32"},
    "official": {"lr": 1e-2, "adam_state_dtype": "fp16"},  # train_zoodip.sh; the fp16 row's m, v
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass
class ZOODiPConfig(TokenConfig):
    lr: float | None = None  # None: the protocol's
    protocol: str = "paper"
    captions: str | None = None
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
    adam_state_dtype: str | None = None  # None: the protocol's
    compact_vocabulary: bool = True  # keep only the embedding rows the training prompts use
    batched_passes: bool = False  # the n + 1 passes in one batched call: faster, (n + 1)x activations

    def __post_init__(self) -> None:
        require(
            self.protocol in PROTOCOLS,
            f"method.protocol={self.protocol!r}; choose one of: {', '.join(PROTOCOLS)}",
        )
        for key, value in PROTOCOL_DEFAULTS[self.protocol].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
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
        require(
            self.captions is None or Path(self.captions).is_file(),
            f"method.captions={self.captions!r} is not a file; give a cc.json-style file or null",
        )

    @property
    def load_precision(self) -> str:
        """The dtype the harness loads the model in: fp32 for ``official``, whose script casts
        the U-Net and VAE itself and quantizes the text encoder from fp32."""
        return "fp32" if self.protocol == "official" else self.precision


class ZOODiP(TokenMethod):
    name = "zoodip"
    display_name = "ZOODiP"
    color = "#000000"
    gradient_free = True
    Config = ZOODiPConfig

    def setup(self, components, subject) -> None:
        cfg, self.c = self.cfg, components
        self.token_id = self.add_token(components, subject)
        self.quantized_layers = self.quantize(components)
        self.captions = subject_captions(cfg.captions, subject.name) if cfg.captions else None
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

    def quantize(self, networks) -> dict[str, int]:
        """Quantize ``networks`` (Components or a pipeline) as the protocol says; layer counts."""
        cfg = self.cfg
        if cfg.protocol == "paper":
            return quantize_networks(networks, cfg.quantize, cfg.quantize_scope, cfg.int4_scheme)
        dtype = DTYPES[cfg.precision]  # official: unet.to(weight_dtype), vae.to(weight_dtype), then
        networks.unet.to(dtype)  # quanto.quantize(text_encoder, unet, vae) and text_encoder.half()
        networks.vae.to(dtype)
        counts = quantize_networks(networks, cfg.quantize, cfg.quantize_scope, cfg.int4_scheme, "weight")
        for encoder in (networks.text_encoder, getattr(networks, "text_encoder_2", None)):
            if encoder is not None:
                encoder.to(dtype)
        return counts

    def precompute(self, images, seed, steps) -> None:
        if self.captions is not None:
            require(
                len(self.captions) == len(images),
                f"method.captions has {len(self.captions)} captions for this subject's "
                f"{len(images)} images; give one per image file",
            )
        super().precompute(images, seed, steps)

    def training_prompts(self, batch, generator) -> list[str]:
        if self.captions is None:
            return super().training_prompts(batch, generator)
        token = self.cfg.placeholder_token
        return [self.captions[int(i)].format(token) for i in batch["image_index"]]

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
            "training_prompts": "captions" if self.captions is not None else "templates",
            "lr_used": self.cfg.lr,  # method.lr null: the protocol's
            "adam_state_dtype_used": self.cfg.adam_state_dtype,
            "forward_passes_per_step": forward_passes(self.cfg.estimator, self.cfg.n),
            "quantized_layers": sum(self.quantized_layers.values()),
            "quantized_weight_fraction": self.quantized_weight_fraction,
            "sg_removed_dims": int(self.subspace.removed_dims()) if self.subspace is not None else 0,
            "sg_kept_ratios": self.subspace.kept_ratios() if self.subspace is not None else [],  # Fig. 8
        }

    def state_dict(self):
        # the diffusers example's learned_embeds.safetensors: {token: (1, dim)}, in the model's dtype
        return self.rows.artifact(self.cfg.placeholder_token)

    def apply_weights_dtype(self):
        official = self.cfg.protocol == "official" and self.cfg.quantize_at_inference
        return torch.float32 if official else None  # official: quantizes as in training, from fp32

    def apply(self, pipeline, artifact) -> None:
        if self.cfg.quantize_at_inference:
            self.quantize(pipeline)
        super().apply(pipeline, artifact)


def subject_captions(path: str, subject: str) -> list[str] | None:
    """The captions of ``subject``'s images from a cc.json-style file, in image-file order
    (the order of the training images); None when the file has no entry for it."""
    entries = json.loads(Path(path).read_text()).get(subject)
    if entries is None:
        return None
    return [entries[name] for name in sorted(entries)]
