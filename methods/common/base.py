"""The method contract: the harness owns the loop, a method owns only what differs.

A method is a small class registered by name (``methods.common.registry``) with a typed config
dataclass. The harness calls, in order::

    method = Method(cfg, savers)            # cfg: the method's Config, validated; savers: train.*
    method.setup(components, subject)       # freeze, quantize, add token, wrap LoRA, ...
    method.precompute(images, seed, steps)  # optional: all training images (Hollowed Net's stage 1)
    for step in range(steps):
        logs = method.step(batch, step)     # one optimisation step; logs["loss"] is required
    method.state_dict()                     # exactly what a user stores (Storage column)
    method.apply(pipeline, artifact)        # put a stored artifact into a stock pipeline

``checkpoint()`` / ``restore()`` make runs resumable; their default covers methods whose
state is their trainable tensors plus one torch optimizer.

What the harness shows or decides about a method is declared on its class (``name``,
``display_name``, ``color``, ``gradient_free``, ``teacher_kind``, ``step_unit``,
``quantization``, ``in_papers``); nothing outside the method's module names it.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file

from methods.common.atomic import atomic_path
from methods.common.errors import ConfigError, require
from methods.common.registry import register
from methods.common.savers import Savers

__all__ = ["ConfigError", "Method", "MethodConfig", "require"]

# The known-answer experiment's hidden teacher (benchmark/recovery.py), by what a method trains:
TOKEN_TEACHER = "token"  # a token embedding (token methods)
SCALES_TEACHER = "scales"  # per-output-channel scale factors of every Linear/Conv2d (scale tuning)
LOW_RANK_TEACHER = "lora"  # a rank-r change of every attention projection (weight methods)
TEACHER_KINDS = (TOKEN_TEACHER, SCALES_TEACHER, LOW_RANK_TEACHER)
DEFAULT_COLOR = "#444444"


SAMPLINGS = ("epoch", "replacement")


@dataclasses.dataclass
class DataConfig:
    """How the loop draws training images (``methods.common.sampling``); ``method.data.*``, because
    the reference scripts differ per method (each method's YAML says what its reference does).

    - ``sampling=epoch``: the DataLoader(shuffle=True) of the diffusers and official scripts: each
      epoch is a seeded permutation of ``repeats`` copies of the images (diffusers' textual
      inversion dataset has ``repeats=100``); ``replacement``: every draw uniform and independent.
    - ``flip_p``: probability of a horizontal flip of each drawn image (RandomHorizontalFlip)."""

    flip_p: float = 0.0
    sampling: str = "epoch"
    repeats: int = 1

    def __post_init__(self) -> None:
        require(0 <= self.flip_p <= 1, f"method.data.flip_p={self.flip_p} must be in [0, 1]")
        require(
            self.sampling in SAMPLINGS,
            f"method.data.sampling={self.sampling!r}; choose one of: {', '.join(SAMPLINGS)}",
        )
        require(self.repeats >= 1, f"method.data.repeats={self.repeats} must be >= 1")


@dataclasses.dataclass
class MethodConfig:
    """Fields every method has; each method extends this with its own knobs."""

    name: str
    steps: int
    lr: float
    batch_size: int = 1
    resolution: int = 512
    data: DataConfig = dataclasses.field(default_factory=DataConfig)

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
    # ``method=<name>`` on the command line, ``name:`` in conf/method/<name>.yaml, the module
    # methods/<name>.py; a subclass that sets it is registered (``methods.common.registry``).
    name: ClassVar[str]
    # How tables and figures show the method (the papers' spelling; default: ``name``) and its
    # colour in every figure (default: grey). Not inherited: each registered class has its own.
    display_name: ClassVar[str]
    color: ClassVar[str]
    # No backpropagation through the model (ZOODiP Table 1's "Grad-free" column).
    gradient_free: ClassVar[bool] = False
    # The known-answer experiment's teacher: one of TEACHER_KINDS.
    teacher_kind: ClassVar[str] = LOW_RANK_TEACHER
    # What one training step is, where it is not one optimisation step (GF-TI: a generation).
    step_unit: ClassVar[str] = "step"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    artifact_filename: ClassVar[str] = "artifact.safetensors"
    # True for token methods (TI, GF-TI, ZOODiP): evaluation prompts omit the class noun.
    token_only_prompts: ClassVar[bool] = False
    # False for a method beyond the papers this suite reproduces (no paper value): reports mark it.
    in_papers: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            return  # a family of methods (TokenMethod, UNetFinetune): not a method of its own
        cls.display_name = cls.__dict__.get("display_name", cls.name)
        cls.color = cls.__dict__.get("color", DEFAULT_COLOR)
        if cls.teacher_kind not in TEACHER_KINDS:
            raise TypeError(
                f"{cls.__qualname__}.teacher_kind={cls.teacher_kind!r}; "
                f"choose one of: {', '.join(TEACHER_KINDS)}"
            )
        register(cls)

    @classmethod
    def quantization(cls, config: Mapping[str, Any]) -> str:
        """How the base weights are stored during training, from a run's flat config
        (``method.quantize``, ``method.bits``): NF4, INT8, INT4 or '' (full precision)."""
        quantize = config.get("method.quantize")
        if isinstance(quantize, str) and quantize not in ("", "none"):
            return quantize.upper()
        bits = config.get("method.bits")
        if bits is not None and bits == bits:  # nan: a table row without the key
            return f"INT{int(bits)}"
        return ""

    def __init__(self, cfg: MethodConfig, savers: Savers | None = None):
        self.cfg = cfg
        self.savers = savers or Savers()  # train.*: the memory savers (methods.common.savers)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None  # mixed_precision=fp16's loss scale

    # -- the contract ------------------------------------------------------------------
    @abc.abstractmethod
    def setup(self, components, subject) -> None:
        """Prepare ``components`` before step 0: the harness's model (``tokenizer``(s),
        ``text_encoder``(s), ``vae``, ``unet``, ``noise_scheduler``, ``device``, ``dtype``;
        ``pipeline()`` wraps them in the family's stock diffusers pipeline)."""

    @abc.abstractmethod
    def step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor | float]:
        """One optimisation step. ``batch`` holds ``pixel_values`` (B,3,H,W in [-1,1], already
        flipped where ``flipped``), ``image_index`` (LongTensor (B,): which training image, in the
        subject's image order), ``flipped`` (BoolTensor (B,)) and a CPU ``generator`` seeded from
        (seed, step): draw all randomness from it."""

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
        generation dtype."""
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
        """What resuming needs, every tensor copied to the CPU (:func:`cpu_copy`)."""
        state: dict[str, Any] = {"trainable": self.trainable_parameters()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()  # references to the live state
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return cpu_copy(state)

    def restore(self, state: dict[str, Any]) -> None:
        params = self.trainable_parameters()
        with torch.no_grad():
            for k, v in state["trainable"].items():
                params[k].copy_(v)
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def record_extras(self) -> dict[str, Any]:
        """Method-specific record fields (e.g. step-kind counts, forward passes per step)."""
        return {}

    def save_artifact(self, directory: Path) -> Path:
        path = Path(directory) / self.artifact_filename
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        return path


def cpu_copy(state: Any) -> Any:
    """``state`` (nested dicts, lists, tuples) with every tensor copied to the CPU, detached. A
    checkpoint then costs no GPU memory when it is taken (SD1.5 DreamBooth's U-Net and Adam state:
    gigabytes), and holds copies, not the references ``optimizer.state_dict()`` returns. Every
    method's ``checkpoint`` returns its state through it; ``restore`` moves tensors back."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_copy(v) for v in state)
    return state
