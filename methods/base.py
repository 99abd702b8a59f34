"""The method contract: the harness owns the loop, a method owns only what differs.

A method is a small class registered by name (``methods.registry``) with a typed config
dataclass. The harness calls, in order::

    method = Method(cfg)                    # cfg: the method's Config, validated
    method.setup(components, subject)       # freeze, quantize, add token, wrap LoRA, ...
    method.precompute(images, seed, steps)  # optional: all training images (Hollowed Net's stage 1)
    for step in range(steps):
        logs = method.step(batch, step)     # one optimisation step; logs["loss"] is required
    method.state_dict()                     # exactly what a user stores (Storage column)
    method.apply(pipeline, artifact)        # put a stored artifact into a stock pipeline

``checkpoint()`` / ``restore()`` make runs resumable; their default covers methods whose
state is their trainable tensors plus one torch optimizer.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file

from benchmark.atomic import atomic_path
from methods.errors import ConfigError, require

__all__ = ["ConfigError", "Method", "MethodConfig", "require"]


@dataclasses.dataclass
class MethodConfig:
    """Fields every method has; each method extends this with its own knobs."""

    name: str
    steps: int
    lr: float
    batch_size: int = 1
    resolution: int = 512

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # lr=inf would diverge at step 1: no knob may be inf or nan
            value = getattr(self, f.name)
            require(
                not isinstance(value, float) or math.isfinite(value),
                f"method.{f.name}={value} must be a finite number",
            )
        require(self.steps >= 1, f"method.steps={self.steps} must be >= 1")
        require(self.lr >= 0, f"method.lr={self.lr} must be >= 0")
        require(self.batch_size >= 1, f"method.batch_size={self.batch_size} must be >= 1")
        require(
            self.resolution >= 8 and self.resolution % 8 == 0,
            f"method.resolution={self.resolution} must be a positive multiple of 8 (the VAE downsamples 8x)",
        )


class Method(abc.ABC):
    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    artifact_filename: ClassVar[str] = "artifact.safetensors"
    # True for token methods (TI, GF-TI, ZOODiP): evaluation prompts omit the class noun.
    token_only_prompts: ClassVar[bool] = False

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg
        self.optimizer: torch.optim.Optimizer | None = None

    # -- the contract ------------------------------------------------------------------
    @abc.abstractmethod
    def setup(self, components, subject) -> None:
        """Prepare ``components`` (benchmark.models.Components) before step 0."""

    @abc.abstractmethod
    def step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor | float]:
        """One optimisation step. ``batch`` holds ``pixel_values`` (B,3,H,W in [-1,1]) and a
        CPU ``generator`` seeded from (seed, step): draw all randomness from it."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly what a user would store; its safetensors size is the Storage column."""

    @abc.abstractmethod
    def apply(self, pipeline, artifact: dict[str, torch.Tensor]) -> None:
        """Put ``artifact`` (a ``state_dict()``, e.g. reloaded from disk) into a stock diffusers
        StableDiffusionPipeline, in place. Uses only ``self.cfg``: works without ``setup``."""

    @abc.abstractmethod
    def subject_phrase(self, subject) -> str:
        """How prompts name the subject: "<tok>" for token methods, "sks dog" otherwise."""

    # -- defaults the harness uses -----------------------------------------------------
    def apply_weights_dtype(self) -> torch.dtype | None:
        """The dtype the stock pipeline's weights must have when ``apply`` runs; None: the
        generation dtype. A method that re-quantizes the base model (PEQA, TuneQDM, QLoRA on
        NF4) asks for fp32, so that it quantizes the weights it was trained on (fp16 weights
        round to different integer codes); the harness then casts the pipeline to the
        generation dtype (``benchmark.models.cast_pipeline``)."""
        return None

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Named trainable tensors (checkpointed; counted in the record)."""
        return {}

    def precompute(self, images: torch.Tensor, seed: int, steps: int) -> None:
        """Optional stage between ``setup`` and step 0 that sees the whole training set
        (``images``: N,3,H,W in [-1,1], CPU), the run's seed and the number of steps the loop
        will run; its memory counts as model load, not training. Hollowed Net stores its
        activation cache here. Default: nothing."""
        return None

    def checkpoint(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "trainable": {k: v.detach().clone() for k, v in self.trainable_parameters().items()}
        }
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        params = self.trainable_parameters()
        with torch.no_grad():
            for k, v in state["trainable"].items():
                params[k].copy_(v)
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])

    def record_extras(self) -> dict[str, Any]:
        """Method-specific record fields (e.g. step-kind counts, forward passes per step)."""
        return {}

    def save_artifact(self, directory: Path) -> Path:
        path = Path(directory) / self.artifact_filename
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        return path
