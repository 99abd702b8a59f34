"""Known-answer personalization (`experiment=recovery`): can a method recover a hidden teacher?

1. A teacher is drawn from the run's seed and kept from the method: a token embedding for the
   token methods (TI, GF-TI, ZOODiP), per-channel scale factors for PEQA / TuneQDM, a low-rank
   (LoRA-shaped) change of every attention projection for the other weight methods.
2. The base: with ``recovery.fit_steps > 0`` (the tiny model's default) its U-Net is first fitted
   so that with the teacher in place it models the subject's real images, without it the class's
   (benchmark/recovery/fit.py); training images = the subject's, held out = fresh draws on them.
   With ``fit_steps=0`` (real weights) the model with the teacher in place generates the training
   and the held-out images.
3. The method personalizes from its usual initialization on the training images, through the
   ordinary train loop; its artifact is snapshotted at a few steps (the curve).
4. Every snapshot, the initial artifact and the teacher are put into a fresh stock pipeline by
   the method's own ``apply`` and scored on the same held-out (image, noise, t, prompt) draws:
   denoising loss, and the fraction of the initial-to-teacher gap closed
   ``(L_init - L) / (L_init - L_teacher)`` (1 = as good as the teacher). Token methods also get
   the cosine and distance of their token to the teacher's.

Nothing here touches a method: it uses the contract (setup, precompute, step, state_dict, apply).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from methods.common.atomic import atomic_path
from methods.common.base import LOW_RANK_TEACHER, SCALES_TEACHER, TOKEN_TEACHER, Method, require
from methods.common.conditioning import token_ids
from methods.common.diffusion import encode_latents, noisy_latents

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
SNAPSHOT_DIR = "snapshots"
CONTRAST_CLASSES = ("same_class", "other_classes", "inverted")


@dataclasses.dataclass
class RecoveryConfig:
    """The ``recovery:`` block of conf/experiment/recovery.yaml."""

    arm: str = ""  # the row's name in the report (conf/experiment/recovery/<arm>.yaml)
    token_scale: float = 1.0  # ||teacher - e0|| / ||e0|| (token methods)
    scales_std: float = 0.1  # teacher scale = init scale * (1 + std * N(0, 1)), per channel (PEQA, TuneQDM)
    lora_rank: int = 4  # teacher: rank-r change of every attention projection (other weight methods)
    lora_scale: float = 0.5  # ||delta W||_F / ||W||_F per projection
    train_images: int = 8
    heldout_images: int = 8
    # with the fitted base: hold the subject's last k images out of training (the fit saw them)
    # and score on them too (recovery_image_*), beside the held-out draws on the training images.
    # Not in recovery.yaml (pass +recovery.holdout_images=k): absent, it keeps the runs' keys.
    holdout_images: int = 0
    heldout_draws: int = 64
    draw_batch: int = 16
    generation_steps: int = 10
    guidance_scale: float = 1.0
    prompt: str = "a photo of {}"  # {} = the method's subject phrase ("<sks>" or "sks dog")
    curve_points: int = 5  # snapshots at evenly spaced steps, step 0 included
    # the fitted base (benchmark/recovery/fit.py); 0 = the model as it is, images made by the teacher
    fit_steps: int = 0
    fit_lr: float = 1e-3
    fit_batch: int = 8  # per step: this many subject draws (with the teacher) and class draws
    class_images: int = 16  # C: up to this many images of other subjects of the class
    # weight teachers: fit the teacher's parameters jointly with W (the draw is its start), so that
    # it is near the optimum on S of its parameterization (benchmark/recovery/fit.py)
    fit_teacher: bool = True
    teacher_steps: int = 0  # then this many steps fitting the teacher alone on S (W frozen)
    # The token teacher's fit (token methods only; None: the shared value above). The weight
    # teachers never read these keys.
    token_fit_steps: int | None = None
    token_fit_lr: float | None = None
    token_fit_batch: int | None = None
    token_teacher_steps: int | None = None  # teacher-only steps after the token's joint fit (W frozen)
    token_joint_fit: bool = False  # fit the teacher token with W, from the seeded draw
    token_attention_gain: float = 1.0  # the token fit starts with attn2.to_out x this gain
    token_class_images: str = "same_class"  # C of the token fit: same_class | other_classes | inverted

    def __post_init__(self) -> None:
        for key in (
            "token_scale",
            "scales_std",
            "lora_scale",
            "guidance_scale",
            "fit_steps",
            "fit_lr",
            "teacher_steps",
            "holdout_images",
        ):
            require(getattr(self, key) >= 0, f"recovery.{key}={getattr(self, key)} must be >= 0")
        for key in (
            "lora_rank",
            "train_images",
            "heldout_images",
            "heldout_draws",
            "draw_batch",
            "fit_batch",
            "class_images",
        ):
            require(getattr(self, key) >= 1, f"recovery.{key}={getattr(self, key)} must be >= 1")
        for key, least in (
            ("token_fit_steps", 0),
            ("token_fit_lr", 0),
            ("token_fit_batch", 1),
            ("token_teacher_steps", 0),
            ("token_attention_gain", 0),
        ):
            value = getattr(self, key)
            require(value is None or value >= least, f"recovery.{key}={value} must be >= {least} (or null)")
        require(
            not (self.token_teacher_steps and not self.token_joint_fit),
            f"recovery.token_teacher_steps={self.token_teacher_steps} needs recovery.token_joint_fit=true "
            "(only the jointly fitted teacher token is a leaf to fit); set it to 0",
        )
        require(
            self.token_class_images in CONTRAST_CLASSES,
            f"recovery.token_class_images={self.token_class_images!r}; "
            f"choose one of: {', '.join(CONTRAST_CLASSES)}",
        )
        require(
            not (self.holdout_images and not self.fit_steps),
            f"recovery.holdout_images={self.holdout_images} needs the fitted base (recovery.fit_steps > 0); "
            "with fit_steps=0 the held-out images are already generated apart (recovery.heldout_images)",
        )
        require(self.generation_steps >= 1, f"recovery.generation_steps={self.generation_steps} must be >= 1")
        require(self.curve_points >= 2, f"recovery.curve_points={self.curve_points} must be >= 2")
        require(
            self.prompt.count("{}") == 1,
            f"recovery.prompt={self.prompt!r} must contain one '{{}}' for the subject phrase",
        )

    def for_teacher(self, kind: str) -> RecoveryConfig:
        """The settings the ``kind`` teacher's fit uses: the token_* keys in place for the token
        teacher; the weight teachers' unchanged."""
        if kind != TOKEN_TEACHER:
            return self
        return dataclasses.replace(
            self,
            fit_steps=self.fit_steps if self.token_fit_steps is None else self.token_fit_steps,
            fit_lr=self.fit_lr if self.token_fit_lr is None else self.token_fit_lr,
            fit_batch=self.fit_batch if self.token_fit_batch is None else self.token_fit_batch,
            teacher_steps=self.teacher_steps
            if self.token_teacher_steps is None
            else self.token_teacher_steps,
        )


def teacher_kind(method: Method) -> str:
    """The teacher the method can represent (``Method.teacher_kind``)."""
    return method.teacher_kind


def teacher_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + 777_777)  # apart from the train steps' streams


# -- the teacher ---------------------------------------------------------------------------


def token_teacher(initial: dict[str, torch.Tensor], seed: int, scale: float) -> dict[str, torch.Tensor]:
    """{token: e0 + delta}, ||delta|| = scale * ||e0||, delta's direction uniform."""
    (name, e0), g = next(iter(initial.items())), teacher_generator(seed)
    delta = torch.randn(e0.shape, generator=g, dtype=torch.float64)
    delta = delta / delta.norm() * scale * e0.double().norm()
    return {name: (e0.double() + delta).to(e0.dtype)}


def scale_factors(unet, seed: int, std: float) -> dict[str, torch.Tensor]:
    """{layer weight name: 1 + std * N(0, 1) per output channel} for every Linear/Conv2d of the
    U-Net (the layers PEQA and TuneQDM quantize): the scales teacher, independent of the method."""
    g, factors = teacher_generator(seed), {}
    for name, module in sorted(unet.named_modules()):
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            factor = 1 + std * torch.randn(module.weight.shape[0], generator=g, dtype=torch.float64)
            factors[f"{name}.weight"] = factor.float()
    return factors


def scales_teacher(
    initial: dict[str, torch.Tensor], factors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The method's scales times the layer's factors: PEQA's ``<layer>.scale``; TuneQDM's
    ``<layer>.delta_out``, the same factor for all its timestep sets (a timestep-independent
    teacher), its ``delta_in`` left as it is."""
    teacher = {}
    for key, value in initial.items():
        layer, _, kind = key.rpartition(".")
        if kind == "delta_in":
            teacher[key] = value.clone()
        else:
            teacher[key] = (value.double() * factors[f"{layer}.weight"].double()).to(value.dtype)
    return teacher


def lora_teacher(unet, seed: int, rank: int, scale: float) -> dict[str, torch.Tensor]:
    """{projection weight name: delta W} for every attention projection: delta W = B A (rank
    ``rank``, Gaussian), scaled to ||delta W||_F = scale * ||W||_F. Added to the weights, it is
    a merged LoRA: every LoRA method can represent it exactly up to its rank."""
    g, deltas = teacher_generator(seed), {}
    for name, module in sorted(unet.named_modules()):
        if not isinstance(module, torch.nn.Linear) or not name.endswith(ATTENTION_PROJECTIONS):
            continue
        weight = module.weight.detach().double().cpu()
        r = min(rank, *weight.shape)
        delta = torch.randn(weight.shape[0], r, generator=g, dtype=torch.float64) @ torch.randn(
            r, weight.shape[1], generator=g, dtype=torch.float64
        )
        deltas[f"{name}.weight"] = (delta * scale * weight.norm() / delta.norm()).float()
    return deltas


def draw_change(kind: str, initial_token, unet, seed: int, rc: RecoveryConfig) -> dict[str, torch.Tensor]:
    """The teacher as a change of the base, drawn from the seed: the token (token methods), the
    per-layer scale factors (PEQA, TuneQDM) or the weight deltas (LoRA-shaped)."""
    if kind == TOKEN_TEACHER:
        return token_teacher(initial_token, seed, rc.token_scale)
    if kind == SCALES_TEACHER:
        return scale_factors(unet, seed, rc.scales_std)
    return lora_teacher(unet, seed, rc.lora_rank, rc.lora_scale)


def teacher_artifact(kind: str, change, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher as the method's artifact (what its ``apply`` or ``install`` puts in place)."""
    return scales_teacher(initial, change) if kind == SCALES_TEACHER else change


def is_projection_weight(key: str) -> bool:
    """``key`` names an attention projection's weight (``<module>.to_q.weight``), as the
    LoRA-shaped teacher's keys do; a method's artifact (LoRA factors, a whole U-Net) does not."""
    module, _, leaf = key.rpartition(".")
    return leaf == "weight" and module.endswith(ATTENTION_PROJECTIONS)


def install(pipeline, method: Method, kind: str, artifact: dict[str, torch.Tensor] | None) -> None:
    """Put an artifact into a stock pipeline: the method's own ``apply``, or (the LoRA-shaped
    teacher) its weight changes added in place. None: the base model as it is."""
    if artifact is None:
        return
    if kind == LOW_RANK_TEACHER and all(is_projection_weight(k) for k in artifact):
        with torch.no_grad():
            for name, delta in artifact.items():
                weight = pipeline.unet.get_parameter(name)
                weight += delta.to(weight.device, weight.dtype)
        return
    method.apply(pipeline, artifact)


# -- images and scores ---------------------------------------------------------------------


def generate(pipeline, prompt: str, count: int, resolution: int, seed: int, rc: RecoveryConfig):
    """``count`` images (N,3,R,R in [-1,1], float32, CPU); image i from generator (seed, i)."""
    images = []
    for start in range(0, count, rc.draw_batch):
        chunk = range(start, min(count, start + rc.draw_batch))
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in chunk]
        out = pipeline(
            [prompt] * len(chunk), height=resolution, width=resolution, generator=generators,
            num_inference_steps=rc.generation_steps, guidance_scale=rc.guidance_scale, output_type="pt",
        ).images  # fmt: skip
        images.append(out.float().cpu() * 2 - 1)
    return torch.cat(images).clamp(-1, 1)


@torch.no_grad()
def heldout_scores(pipeline, images, prompt: str, seed: int, rc) -> tuple[float, torch.Tensor]:
    """(mean denoising loss, the noise predictions) over ``rc.heldout_draws`` draws of (image,
    VAE sample, t uniform in [0, T), noise): the same draws for every model scored with the same
    seed (common random numbers: differences between models are not drowned by the draws' noise)."""
    unet, device = pipeline.unet, pipeline.unet.device
    scheduler = pipeline_noise_scheduler(pipeline)
    g = torch.Generator().manual_seed(seed * 1_000_003 + 555_555)
    hidden = pipeline.text_encoder(token_ids(pipeline.tokenizer, [prompt], device))[0]
    total, predictions = 0.0, []
    while sum(len(p) for p in predictions) < rc.heldout_draws:
        bsz = min(rc.draw_batch, rc.heldout_draws - sum(len(p) for p in predictions))
        index = torch.randint(len(images), (bsz,), generator=g)
        latents = encode_latents(pipeline.vae, images[index].to(device), g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=g)
        z_t, target = noisy_latents(scheduler, latents, t, g)
        pred = unet(z_t.to(unet.dtype), t.to(device), hidden.expand(bsz, -1, -1).to(unet.dtype)).sample
        total += float(torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="sum"))
        predictions.append(pred.float().cpu())
    predictions = torch.cat(predictions)
    return total / predictions.numel(), predictions


def heldout_loss(pipeline, images, prompt: str, seed: int, rc: RecoveryConfig) -> float:
    return heldout_scores(pipeline, images, prompt, seed, rc)[0]


def prediction_distance(predictions: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean squared distance of a model's noise predictions to the teacher's on the same draws:
    0 at the teacher whatever the weights (the known optimum of this score)."""
    return float((predictions.double() - teacher.double()).pow(2).mean())


def apply_error(change: torch.Tensor, reference: torch.Tensor) -> float | None:
    """||change - reference||^2 / ||reference||^2 of the teacher's change of the noise
    predictions (teacher's minus start's) put in by the method's ``apply`` against the teacher
    put in directly (``fit.install_reference``): 0 for a faithful apply up to the method's own
    rounding (quantization); about 0.25 for an apply that puts in half of the teacher's change."""
    norm = reference.double().pow(2).sum()
    return float((change.double() - reference.double()).pow(2).sum() / norm) if norm > 0 else None


def pipeline_noise_scheduler(pipeline):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipeline.scheduler.config)


def gap_closed(loss: float, initial: float, teacher: float) -> float | None:
    """(L_init - L) / (L_init - L_teacher); None when the teacher is no better than the start."""
    gap = initial - teacher
    return (initial - loss) / gap if gap > 0 else None


def token_scores(artifact, initial, teacher) -> dict[str, float]:
    """Cosine of the token to the teacher's, and its distance to it relative to the start's."""
    (e,), (e0,), (et,) = ([v.double().flatten() for v in a.values()] for a in (artifact, initial, teacher))
    return {
        "token_cosine": float(torch.nn.functional.cosine_similarity(e, et, dim=0)),
        "token_distance": float((e - et).norm() / (e0 - et).norm()),
    }


# -- snapshots (the curve) -----------------------------------------------------------------


def curve_steps(steps: int, points: int) -> list[int]:
    return sorted({round(i * steps / (points - 1)) for i in range(points)})


def snapshot_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step{step:07d}.safetensors"


def save_snapshot(run_dir: Path, step: int, method: Method) -> None:
    path = snapshot_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in method.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def load_snapshot(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(snapshot_path(run_dir, step)))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def curve_fields(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step scores as parallel lists (``curve_<name>``) plus the last point's values."""
    fields: dict[str, Any] = {f"curve_{k}": [p.get(k) for p in points] for k in points[0]}
    fields.update({f"recovery_{k}": v for k, v in points[-1].items() if k != "step"})
    return fields
