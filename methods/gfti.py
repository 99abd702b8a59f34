"""Gradient-Free Textual Inversion (Fei et al., 2023; the ZOODiP paper's GF-TI baseline):
CMA-ES over a low-dimensional subspace of the token embedding space, forward passes only.

Subspace: the top ``subspace_dim`` principal directions P (k x d) of the vocabulary embedding
matrix (PCA of all its rows, before the placeholder is added). ``pca_solver``: ``randomized``
(default: what feizc's ``PCA(n_components=256)`` ran, sklearn's svd_solver "auto" of its time
choosing randomized SVD for a 49408 x 768 matrix; seeded here by ``pca_seed``, unseeded there) or
``exact`` (an eigendecomposition of the covariance). A candidate x in R^k is the
token e0 + x P, e0 = the initializer's embedding (the class noun). CMA-ES (the ``cma``
package) starts at x = 0 with step size sigma.

One harness step = one CMA-ES generation of ``popsize`` candidates, then ``tell``. How a
candidate is scored is ``protocol``:

- ``official`` (feizc's train_inversion.py, the default): the mean loss over every training
  image x ``repeats`` (5), in shuffled batches of ``repeats``, each sample with a random
  horizontal flip (p = 0.5), template, VAE posterior sample and noise drawn afresh for every
  candidate; one timestep per batch position, drawn once per generation and shared by all
  candidates. The token is e0 + mean + x P (sklearn's ``PCA.inverse_transform`` adds the
  vocabulary mean), and the artifact is the best candidate of the last generation.
- ``ours``: one image, timestep, noise and prompt per generation shared by all candidates
  (common random numbers, one forward pass per candidate), token e0 + x P (x = 0 is the
  class noun), artifact = the CMA-ES mean (cma's ``xfavorite``).

The initial token e0 is ``init``: ``cross_attention`` (feizc's initialize_inversion.py, the
default: a unit-norm vector from CLIP image features of the training images attending over
ImageNet class names, ``methods.common.gfti_init``; the CLIP named by ``init_clip``) or
``initializer`` (the embedding of ``method.initializer``, the class noun by default).

CMA-ES draws its normal samples from the step's generator (the ``randn`` option), so a run
is reproducible; the whole CMA-ES object is pickled into the checkpoint.

Not FakeTensorMode-compatible: CMA-ES needs the losses as real numbers.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import torch
from torch._guards import detect_fake_mode

from methods.common.base import cpu_copy, require
from methods.common.conditioning import encode_prompts, prompt_ids
from methods.common.diffusion import denoising_loss, latent_distribution, noisy_latents, randn
from methods.common.gfti_init import class_keys, cross_attention_token
from methods.common.latent_cache import release_weights
from methods.common.prompts import sample_prompts
from methods.common.quantized_model import check_quantize, quantize_networks
from methods.common.token_method import TokenConfig, TokenMethod

PROTOCOLS = ("official", "ours")
INITS = ("cross_attention", "initializer")
PCA_SOLVERS = ("randomized", "exact")


@dataclasses.dataclass
class GFTIConfig(TokenConfig):
    quantize: str = "none"
    quantize_scope: str = "all"
    int4_scheme: str = "affine_group128"
    subspace_dim: int = 256
    popsize: int = 20
    sigma: float = 1.0
    protocol: str = "official"
    repeats: int = 5
    flip_p: float = 0.5
    init: str = "cross_attention"
    init_clip: list[str] | None = None  # per text encoder: hub id, folder, or "random"
    pca_solver: str = "randomized"
    pca_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_quantize(self.quantize, self.int4_scheme, self.quantize_scope)
        require(self.subspace_dim >= 1, f"method.subspace_dim={self.subspace_dim} must be >= 1")
        require(self.popsize >= 2, f"method.popsize={self.popsize} must be >= 2 (CMA-ES ranks candidates)")
        require(self.sigma > 0, f"method.sigma={self.sigma} must be > 0")
        require(
            self.protocol in PROTOCOLS,
            f"method.protocol={self.protocol!r}; choose one of: {', '.join(PROTOCOLS)}",
        )
        require(self.repeats >= 1, f"method.repeats={self.repeats} must be >= 1")
        require(0 <= self.flip_p <= 1, f"method.flip_p={self.flip_p} must be in [0, 1]")
        require(self.init in INITS, f"method.init={self.init!r}; choose one of: {', '.join(INITS)}")
        require(
            self.pca_solver in PCA_SOLVERS,
            f"method.pca_solver={self.pca_solver!r}; choose one of: {', '.join(PCA_SOLVERS)}",
        )
        require(
            self.init != "cross_attention" or bool(self.init_clip),
            "method.init=cross_attention needs the CLIP model whose text tower is the model's text "
            "encoder: set model.text_encoder_clip=[<hub id or folder>] (one per text encoder), "
            "or method.init=initializer",
        )


def principal_directions(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k principal directions (k x d, unit rows) of the rows of ``embeddings``."""
    x = embeddings.detach().double()
    x = x - x.mean(dim=0)
    _, vectors = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
    return vectors.flip(-1)[:, :k].T.contiguous()


def permuted_lower(m: torch.Tensor) -> torch.Tensor:
    """P L of m = P L U (scipy's ``lu(m, permute_l=True)``), n x min(n, k), without the n x n
    permutation matrix ``torch.linalg.lu`` builds (49408^2 floats for CLIP's vocabulary)."""
    n, k = m.shape
    r = min(n, k)
    lu, pivots, _ = torch.linalg.lu_factor_ex(m)  # a rank-deficient m is fine (U singular)
    lower = torch.tril(lu[:, :r], diagonal=-1) + torch.eye(n, r, dtype=m.dtype, device=m.device)
    rows = list(range(n))
    for i, pivot in enumerate(pivots.tolist()):  # LAPACK's row swaps, 1-based, in order
        rows[i], rows[pivot - 1] = rows[pivot - 1], rows[i]
    out = torch.empty_like(lower)
    out[torch.tensor(rows, device=m.device)] = lower
    return out


def randomized_principal_directions(embeddings: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Top-k principal directions (k x d, unit rows) as sklearn's ``PCA(k, svd_solver="randomized",
    random_state=seed)`` finds them (``randomized_svd``, Halko et al.): in fp32, 10 oversamples,
    4 power iterations (7 if k < d / 10) normalized by LU, the Gaussian sketch drawn by numpy's
    RandomState(seed), signs as sklearn 1.2's ``svd_flip`` (largest |U| entry positive)."""
    x = embeddings.detach().float()
    x = x - x.mean(dim=0)
    n_iter = 7 if k < 0.1 * min(x.shape) else 4
    sketch = np.random.RandomState(seed).normal(size=(x.shape[1], k + 10)).astype(np.float32)
    q = torch.from_numpy(sketch).to(x.device)
    for _ in range(n_iter):
        for a in (x, x.T):
            q = permuted_lower(a @ q)
    q, _ = torch.linalg.qr(x @ q)
    u_hat, _, vt = torch.linalg.svd(q.T @ x, full_matrices=False)
    u = q @ u_hat
    signs = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True))).reshape(-1, 1)
    return (vt * signs)[:k].double().contiguous()


class StepNormal:
    """cma's ``randn`` option: N(0, 1) samples from the current step's torch generator."""

    generator: torch.Generator | None = None

    def __call__(self, *shape: int) -> np.ndarray:
        if self.generator is None:
            raise RuntimeError("CMA-ES sampled outside a training step")
        return torch.randn(shape, generator=self.generator, dtype=torch.float64).numpy()


class GradientFreeTI(TokenMethod):
    name = "gfti"
    display_name = "GF-TI"
    color = "#D55E00"
    gradient_free = True
    step_unit = "generation"  # one CMA-ES generation (popsize candidates)
    Config = GFTIConfig

    def setup(self, components, subject) -> None:
        cfg, self.c = self.cfg, components
        # SDXL: each token's two rows side by side (the two tokenizers share one vocabulary)
        vocabulary = torch.cat([e.get_input_embeddings().weight for e in components.text_encoders], dim=1)
        self.subspace_dim = min(cfg.subspace_dim, vocabulary.shape[1])  # 32 on the tiny model
        if cfg.pca_solver == "randomized":
            basis = randomized_principal_directions(vocabulary, self.subspace_dim, cfg.pca_seed)
        else:
            basis = principal_directions(vocabulary, self.subspace_dim)
        self.basis = basis.to(vocabulary.device)
        # official: PCA.inverse_transform adds the vocabulary mean to x P
        mean = vocabulary.detach().double().mean(dim=0)
        self.offset = mean if cfg.protocol == "official" else torch.zeros_like(mean)
        self.token_id = self.add_token(components, subject)
        # cross_attention: the keys and values now, before quantization (a random CLIP's text
        # tower is the text encoder); the queries (the images) come in precompute
        self.init_keys = None
        if cfg.init == "cross_attention" and detect_fake_mode() is None:
            encoders = zip(components.tokenizers, components.text_encoders, cfg.init_clip)
            self.init_keys = [class_keys(tokenizer, encoder, clip) for tokenizer, encoder, clip in encoders]
        quantize_networks(components, cfg.quantize, cfg.quantize_scope, cfg.int4_scheme)
        self.embeddings = components.text_encoder.get_input_embeddings().weight  # frozen
        self.initial_token = self.rows.read().double().clone()  # init=initializer (or fake tensors)
        self.randn = StepNormal()
        options = {"popsize": cfg.popsize, "seed": np.nan, "randn": self.randn, "verbose": -9}
        import cma  # here, not at the top: it loads matplotlib, and validation must not wait for it

        self.es = cma.CMAEvolutionStrategy(np.zeros(self.subspace_dim), cfg.sigma, options)
        self.best_x = np.zeros(self.subspace_dim)  # official: the best candidate of the last generation
        self.num_images = 0  # official: set by precompute

    def precompute(self, images, seed, steps) -> None:
        """official: the VAE posterior (mean, std) of every image and of its mirror image, once;
        each sample then draws its latent from it (the same draw as encoding it again).
        init=cross_attention: e0 from the images (methods.common.gfti_init), then the CLIP is freed."""
        if self.init_keys is not None:
            rows = [cross_attention_token(keys, images) for keys in self.init_keys]
            self.initial_token = torch.cat(rows).double().to(self.basis.device)
            self.init_keys = None
            with torch.no_grad():
                self._write_token(self.token_from(self.saved_x()))
        if self.cfg.protocol != "official":
            return super().precompute(images, seed, steps)  # cache_latents (methods/common/latent_cache.py)
        vae = self.c.vae
        self.num_images = len(images)
        dists = [latent_distribution(vae, pixels[None]) for pixels in torch.cat([images, images.flip(-1)])]
        self.posterior_mean = torch.cat([mean for mean, _ in dists])
        self.posterior_std = torch.cat([std for _, std in dists])
        if self.cfg.cache_latents:
            release_weights(vae)  # the posteriors are all that training needs of it

    def token_from(self, x) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(x), dtype=torch.float64, device=self.basis.device)
        return self.initial_token + self.offset + x @ self.basis

    def saved_x(self):
        return self.best_x if self.cfg.protocol == "official" else self.es.mean

    def _write_token(self, token: torch.Tensor) -> None:
        self.rows.write(token)

    def step(self, batch, step):
        g = batch["generator"]
        with torch.no_grad():
            self.randn.generator = g
            try:
                candidates = self.es.ask()
            finally:
                self.randn.generator = None
            losses = torch.stack(
                self._official_losses(candidates, g)
                if self.cfg.protocol == "official"
                else self._shared_batch_losses(candidates, batch)
            ).cpu()
            self.es.tell(candidates, losses.double().numpy().tolist())
            self.best_x = np.asarray(candidates[int(losses.argmin())])
            self._write_token(self.token_from(self.saved_x()))
        return {"loss": losses.mean(), "best_loss": losses.min(), "sigma": float(self.es.sigma)}

    def _shared_batch_losses(self, candidates, batch) -> list[torch.Tensor]:
        """ours: every candidate on the step's image, timestep, noise and prompt."""
        c = self.c
        z_t, t, target, ids = self.denoising_inputs(batch)
        losses = []
        for x in candidates:
            self._write_token(self.token_from(x))
            losses.append(denoising_loss(c.unet, z_t, t, encode_prompts(c, ids), target).float())
        return losses

    def _official_losses(self, candidates, g) -> list[torch.Tensor]:
        """feizc's ``calculate_mse_loss``: all images x repeats, fresh draws per candidate, one
        timestep per batch position shared by the generation."""
        if not self.num_images:
            raise RuntimeError("protocol=official scores every training image: call precompute() first")
        c, cfg = self.c, self.cfg
        num_train_timesteps = c.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, num_train_timesteps, (cfg.repeats,), generator=g)
        image_of_item = torch.arange(self.num_images).repeat(cfg.repeats)
        losses = []
        for x in candidates:
            self._write_token(self.token_from(x))
            order = torch.randperm(len(image_of_item), generator=g)
            flipped = torch.rand(len(image_of_item), generator=g) < cfg.flip_p
            batches = order.split(cfg.repeats)
            total = 0.0
            for items in batches:
                posterior = (image_of_item[items] + self.num_images * flipped[items]).to(c.device)
                mean, std = self.posterior_mean[posterior], self.posterior_std[posterior]
                latents = (
                    mean + std * randn(mean.shape, g, mean.device, mean.dtype)
                ) * c.vae.config.scaling_factor
                z_t, target = noisy_latents(c.noise_scheduler, latents, t[: len(items)], g)
                ids = prompt_ids(c, sample_prompts(cfg.placeholder_token, len(items), g))
                hidden = encode_prompts(c, ids)
                total = total + denoising_loss(c.unet, z_t, t[: len(items)], hidden, target).float()
            losses.append(total / len(batches))
        return losses

    def checkpoint(self):
        return cpu_copy(
            {
                "es": pickle.dumps(self.es),
                "best_x": torch.as_tensor(self.best_x),
                "initial_token": self.initial_token,
            }
        )

    def restore(self, state) -> None:
        self.es = pickle.loads(state["es"])
        self.randn = self.es.opts["randn"]
        if "best_x" in state:  # checkpoints written before protocol=official have none
            self.best_x = state["best_x"].cpu().numpy()  # a checkpoint loaded onto a GPU too
        if "initial_token" in state:  # e0 as trained (cross_attention: not recomputed)
            self.initial_token = state["initial_token"].to(self.initial_token.device)
        with torch.no_grad():
            self._write_token(self.token_from(self.saved_x()))

    def record_extras(self):
        return {
            "forward_passes_per_step": self.forward_passes_per_step(),
            "subspace_dim": self.subspace_dim,
            "cma_sigma": float(self.es.sigma),
            "initial_token_norm": float(self.initial_token.norm()),
            "cma_evaluations": int(self.es.countevals),  # candidates scored (feizc's --budget)
        }

    def forward_passes_per_step(self) -> int:
        """U-Net samples per generation (official: popsize x images x repeats)."""
        if self.cfg.protocol == "ours":
            return self.cfg.popsize
        return self.cfg.popsize * max(self.num_images, 1) * self.cfg.repeats

    def state_dict(self):
        return self.rows.artifact(self.cfg.placeholder_token)

    def apply(self, pipeline, artifact) -> None:
        quantize_networks(pipeline, self.cfg.quantize, self.cfg.quantize_scope, self.cfg.int4_scheme)
        super().apply(pipeline, artifact)
