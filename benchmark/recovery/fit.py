"""The fitted base of the recovery experiment (``recovery.fit_steps > 0``): a base model for
which the teacher is, by construction, what tells the subject from its class.

A random network is no denoiser of its own samples, so on random weights a drawn teacher is
not a better model of anything than the start (README, "Known-answer personalization"). Before
the method starts, every U-Net weight W is fitted (Adam, seeded) on

    L_fit(W) = loss(W (+) teacher, P, S) + loss(W, P, C)

P: the method's subject prompt ("a photo of <sks>" with the token at its start, or "a photo of
sks dog"); S: the subject's real images; C: images of other subjects of its class; loss: the
ordinary denoising loss (random t, noise, VAE posterior sample). ``W (+) teacher`` is applied
functionally (``torch.func.functional_call``): the token teacher changes P's text states, the
LoRA-shaped teacher adds its delta W, the scales teacher multiplies each layer's weight rows by
its per-output-channel factor. The method then loads the fitted W, trains from its usual start
on S, and is scored on fresh (noise, t) draws of S: the start models S as the class, the teacher
as the subject, so L_init(S) > L_teacher(S).

With ``recovery.fit_teacher`` (the weight teachers' default) the teacher's own parameters are
fitted jointly with W (``JointTeacher``): the seeded draw is only the teacher's start; the LoRA-
shaped teacher stays rank r (its factors are fitted), the scales teacher's factors are fitted.
Then ``recovery.teacher_steps`` more steps fit the teacher alone on S (W frozen): the teacher
is then (near) a stationary point of the loss on S within its parameterization, so a method
restricted to that parameterization cannot beat it by much on S (full fine-tuning can).

The fit depends only on its inputs, so it is cached under ``<paths.results>/recovery_bases/``
by a hash of them: every arm with the same teacher, prompt and seed shares one fit.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.func import functional_call

from benchmark.recovery.teacher import save_tensors
from methods.common.base import LOW_RANK_TEACHER, SCALES_TEACHER, TOKEN_TEACHER
from methods.common.diffusion import latent_distribution, noisy_latents, randn

log = logging.getLogger(__name__)
BASES_DIR = "recovery_bases"
TEACHER_TOKEN_KEY = "recovery.teacher_token"  # the jointly fitted teacher token, stored with its base


def teacher_weights(params: dict[str, torch.Tensor], kind: str, teacher: dict[str, torch.Tensor]):
    """The U-Net weights the teacher overrides, as functions of ``params`` (gradients flow):
    LoRA-shaped: W + delta W; scales: each weight's rows times its factor; token: none."""
    if kind == LOW_RANK_TEACHER:
        return {name: params[name] + delta.to(params[name]) for name, delta in teacher.items()}
    if kind == SCALES_TEACHER:
        return {
            name: params[name] * factor.to(params[name]).view(-1, *[1] * (params[name].dim() - 1))
            for name, factor in teacher.items()
        }
    return {}


@torch.no_grad()
def install_reference(pipeline, kind: str, change: dict[str, torch.Tensor], placeholder: str | None) -> None:
    """Put the teacher (its change of the base, ``draw_change`` or fitted) into a stock pipeline
    without the method's code: the token written into the text encoder's embedding table; the
    LoRA-shaped delta added to, the scale factors multiplied into the weights (as the fit does).
    What a method's own ``apply`` of the teacher is checked against (``recovery_apply_error``)."""
    if kind == TOKEN_TEACHER:
        write_token(pipeline.tokenizer, pipeline.text_encoder, placeholder, next(iter(change.values())))
        return
    params = {name: pipeline.unet.get_parameter(name) for name in change}
    for name, value in teacher_weights(params, kind, change).items():
        params[name].copy_(value)


def write_token(tokenizer, text_encoder, token: str, row: torch.Tensor) -> None:
    """``token``'s row of the embedding table set to ``row`` (the token added if new)."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token])
        text_encoder.resize_token_embeddings(len(tokenizer))
    embedding = text_encoder.get_input_embeddings().weight
    embedding[tokenizer.convert_tokens_to_ids(token)] = row.reshape(-1).to(embedding)


class JointTeacher:
    """A weight teacher whose parameters the fit trains with W: the LoRA-shaped teacher as its
    rank-r factors (delta W = U V, split from the drawn delta by an SVD), the scales teacher as
    its per-channel factors. ``current()`` is the teacher as ``teacher_weights`` takes it."""

    def __init__(self, kind: str, teacher: dict[str, torch.Tensor], rank: int, device):
        self.kind = kind
        self.factors: dict[str, list[torch.Tensor]] = {}
        for name, value in teacher.items():
            if kind == LOW_RANK_TEACHER:
                u, s, vh = torch.linalg.svd(value.double(), full_matrices=False)
                root = s[:rank].sqrt()
                pieces = [u[:, :rank] * root, root[:, None] * vh[:rank]]
            else:
                pieces = [value.double()]
            self.factors[name] = [p.float().to(device).requires_grad_(True) for p in pieces]

    def parameters(self) -> list[torch.Tensor]:
        return [p for pieces in self.factors.values() for p in pieces]

    def current(self) -> dict[str, torch.Tensor]:
        if self.kind == LOW_RANK_TEACHER:
            return {name: u @ v for name, (u, v) in self.factors.items()}
        return {name: factor for name, (factor,) in self.factors.items()}


def fit_key(parts: list) -> str:
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, dict) and all(isinstance(v, torch.Tensor) for v in part.values()):
            for name in sorted(part):
                digest.update(name.encode())
                digest.update(part[name].detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(part, torch.Tensor):
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


def fit_base(
    components, kind, teacher, subject_images, class_images, states, rc, seed: int, token_states=None
):
    """Fit ``components.unet`` in place on L_fit (module docstring); returns the losses per step.
    ``states``: (P's text states with the teacher, P's text states at the start) — equal for
    the weight teachers. ``teacher``: a dict (fixed) or a ``JointTeacher`` (fitted with W).
    ``token_states`` (a ``TeacherTokenStates``; the token teacher's joint fit): the teacher's
    states come from it, and its token is fitted with W."""
    unet, scheduler = components.unet, components.noise_scheduler
    device, scaling = unet.device, components.vae.config.scaling_factor
    posteriors = [latent_distribution(components.vae, x) for x in (subject_images, class_images)]
    unet.requires_grad_(True).train()
    params = dict(unet.named_parameters())
    joint = teacher if isinstance(teacher, JointTeacher) else None
    trained = [*params.values(), *([token_states.token] if token_states is not None else [])]
    optimizer = torch.optim.Adam([*trained, *(joint.parameters() if joint else [])], lr=rc.fit_lr)
    losses = []
    fits_teacher = joint is not None or token_states is not None
    for step in range(rc.fit_steps + (rc.teacher_steps if fits_teacher else 0)):
        teacher_only = step >= rc.fit_steps  # then the teacher alone on S, W frozen
        if teacher_only:
            unet.requires_grad_(False)
        g = torch.Generator().manual_seed(seed * 1_000_003 + 333_333 + step)
        total = 0.0
        for (mean, std), hidden, with_teacher in zip(posteriors, states, (True, False)):
            if teacher_only and not with_teacher:
                continue
            index = torch.randint(len(mean), (rc.fit_batch,), generator=g)
            latents = (mean[index] + std[index] * randn(mean[index].shape, g, device)) * scaling
            t = torch.randint(0, scheduler.config.num_train_timesteps, (rc.fit_batch,), generator=g)
            z_t, target = noisy_latents(scheduler, latents, t, g)
            current = joint.current() if joint else teacher
            weights = teacher_weights(params, kind, current) if with_teacher else {}
            if with_teacher and token_states is not None:
                hidden = token_states()
            args = (z_t, t.to(device), hidden.expand(rc.fit_batch, -1, -1))
            pred = functional_call(unet, weights, args, strict=False).sample
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    unet.requires_grad_(False).eval()
    return losses


class TeacherTokenStates:
    """P's text states as a function of the teacher token, which is a leaf to fit (the joint
    fit, ``recovery.token_joint_fit``): the token's embedding row replaced functionally."""

    def __init__(self, text_encoder, ids: torch.Tensor, row: int, start: torch.Tensor):
        self.encoder, self.ids, self.row = text_encoder, ids, row
        embedding = text_encoder.get_input_embeddings().weight
        self.weight_name = next(n for n, p in text_encoder.named_parameters() if p is embedding)
        self.weight = embedding.detach()
        self.token = start.detach().clone().float().to(self.weight.device).requires_grad_(True)

    def __call__(self) -> torch.Tensor:
        rows = torch.tensor([self.row], device=self.weight.device)
        weight = self.weight.index_put((rows,), self.token.to(self.weight.dtype))
        return functional_call(self.encoder, {self.weight_name: weight}, (self.ids,))[0]


def fitted_base(path: Path, fit):
    """The fitted U-Net state from ``path``, fitting it first (``fit()`` -> state) if absent."""
    if path.exists():
        return load_file(str(path))
    state = fit()
    save_tensors(path, state)
    return state


def bases_dir(results: str | Path) -> Path:
    return Path(results) / BASES_DIR
