"""Gradient-Free Textual Inversion (Fei et al., 2023; the ZOODiP paper's GF-TI baseline):
CMA-ES over a low-dimensional subspace of the token embedding space, forward passes only.

Subspace: the top ``subspace_dim`` principal directions P (k x d) of the vocabulary embedding
matrix (PCA of all its rows, before the placeholder is added). A candidate x in R^k is the
token e0 + x P, e0 = the initializer's embedding (the class noun). CMA-ES (the ``cma``
package) starts at x = 0 with step size sigma.

One harness step = one CMA-ES generation: ``popsize`` candidates, each scored by one forward
pass of the text encoder and U-Net on the step's batch (the same image, timestep, noise and
prompt for the whole generation: common random numbers, so the ranking compares candidates,
not noise draws), then ``tell``. ``method.steps`` counts generations: the ZOODiP paper's
13,000 GF-TI "steps" at 0.74 it/s (Table 2, 293 min) fit a generation of 20 forward passes
better than a single evaluation (see conf/method/gfti.yaml).

CMA-ES draws its normal samples from the step's generator (the ``randn`` option), so a run
is reproducible; the whole CMA-ES object is pickled into the checkpoint. The artifact is the
distribution mean (cma's ``xfavorite``, its estimate for noisy objectives), written into the
placeholder's embedding row after every generation.

Not FakeTensorMode-compatible: CMA-ES needs the losses as real numbers.
"""

from __future__ import annotations

import dataclasses
import pickle

import cma
import numpy as np
import torch

from methods.base import require
from methods.conditioning import encode_prompts
from methods.diffusion import denoising_loss
from methods.quantized_model import check_quantize, quantize_networks
from methods.token_method import TokenConfig, TokenMethod


@dataclasses.dataclass
class GFTIConfig(TokenConfig):
    quantize: str = "none"
    subspace_dim: int = 256
    popsize: int = 20
    sigma: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_quantize(self.quantize)
        require(self.subspace_dim >= 1, f"method.subspace_dim={self.subspace_dim} must be >= 1")
        require(self.popsize >= 2, f"method.popsize={self.popsize} must be >= 2 (CMA-ES ranks candidates)")
        require(self.sigma > 0, f"method.sigma={self.sigma} must be > 0")


def principal_directions(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k principal directions (k x d, unit rows) of the rows of ``embeddings``."""
    x = embeddings.detach().double()
    x = x - x.mean(dim=0)
    _, vectors = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
    return vectors.flip(-1)[:, :k].T.contiguous()


class StepNormal:
    """cma's ``randn`` option: N(0, 1) samples from the current step's torch generator."""

    generator: torch.Generator | None = None

    def __call__(self, *shape: int) -> np.ndarray:
        if self.generator is None:
            raise RuntimeError("CMA-ES sampled outside a training step")
        return torch.randn(shape, generator=self.generator, dtype=torch.float64).numpy()


class GradientFreeTI(TokenMethod):
    name = "gfti"
    Config = GFTIConfig

    def setup(self, components, subject) -> None:
        cfg, self.c = self.cfg, components
        # SDXL: each token's two rows side by side (the two tokenizers share one vocabulary)
        vocabulary = torch.cat([e.get_input_embeddings().weight for e in components.text_encoders], dim=1)
        self.subspace_dim = min(cfg.subspace_dim, vocabulary.shape[1])  # 32 on the tiny model
        self.basis = principal_directions(vocabulary, self.subspace_dim).to(vocabulary.device)
        self.token_id = self.add_token(components, subject)
        quantize_networks(components, cfg.quantize)
        self.embeddings = components.text_encoder.get_input_embeddings().weight  # frozen
        self.initial_token = self.rows.read().double().clone()
        self.randn = StepNormal()
        options = {"popsize": cfg.popsize, "seed": np.nan, "randn": self.randn, "verbose": -9}
        self.es = cma.CMAEvolutionStrategy(np.zeros(self.subspace_dim), cfg.sigma, options)

    def token_from(self, x) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(x), dtype=torch.float64, device=self.basis.device)
        return self.initial_token + x @ self.basis

    def _write_token(self, token: torch.Tensor) -> None:
        self.rows.write(token)

    def step(self, batch, step):
        c, g = self.c, batch["generator"]
        with torch.no_grad():
            z_t, t, target, ids = self.denoising_inputs(batch)
            self.randn.generator = g
            try:
                candidates = self.es.ask()
            finally:
                self.randn.generator = None
            losses = []
            for x in candidates:
                self._write_token(self.token_from(x))
                losses.append(denoising_loss(c.unet, z_t, t, encode_prompts(c, ids), target).float())
            losses = torch.stack(losses).cpu()
            self.es.tell(candidates, losses.double().numpy().tolist())
            self._write_token(self.token_from(self.es.mean))
        return {"loss": losses.mean(), "best_loss": losses.min(), "sigma": float(self.es.sigma)}

    def trainable_parameters(self):
        return {}  # CMA-ES state, not tensors: see checkpoint()

    def checkpoint(self):
        return {"es": pickle.dumps(self.es)}

    def restore(self, state) -> None:
        self.es = pickle.loads(state["es"])
        self.randn = self.es.opts["randn"]
        with torch.no_grad():
            self._write_token(self.token_from(self.es.mean))

    def record_extras(self):
        return {
            "forward_passes_per_step": self.cfg.popsize,
            "subspace_dim": self.subspace_dim,
            "cma_sigma": float(self.es.sigma),
        }

    def state_dict(self):
        return self.rows.artifact(self.cfg.placeholder_token)

    def apply(self, pipeline, artifact) -> None:
        quantize_networks(pipeline, self.cfg.quantize)
        super().apply(pipeline, artifact)
