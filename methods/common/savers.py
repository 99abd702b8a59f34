"""The standard memory savers of the diffusers training examples, for every backprop method.

``train.*`` (the harness hands them to the method as :class:`Savers`):

- ``mixed_precision=no|fp16|bf16``: as accelerate does it in the diffusers examples. The frozen
  weights of the modules a method names (``half_modules``) are cast to the half type, trained
  parameters stay fp32, the forward runs under autocast, and fp16 scales the loss (GradScaler).
- ``gradient_checkpointing``: diffusers' ``enable_gradient_checkpointing`` on the U-Net, and
  transformers' ``gradient_checkpointing_enable`` on a text encoder that trains.
- ``set_grads_to_none``: ``optimizer.zero_grad(set_to_none=...)``; false (diffusers' default)
  keeps every gradient buffer allocated between steps.
- ``foreach``: the multi-tensor AdamW step (null: torch's choice, multi-tensor on CUDA); false
  steps tensor by tensor, without the full-size temporaries of the multi-tensor kernels.

``method.optimizer=adamw|adamw8bit`` (a method's own key): torch's AdamW, or bitsandbytes'
8-bit AdamW as diffusers' ``--use_8bit_adam`` (block-wise 8-bit moments for tensors of at
least 4096 values; smaller ones keep fp32 moments, bitsandbytes' default).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator

import torch

from methods.common.errors import ConfigError, require

MIXED_PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
OPTIMIZERS = ("adamw", "adamw8bit")


@dataclasses.dataclass(frozen=True)
class Savers:
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    set_grads_to_none: bool = True
    foreach: bool | None = None

    def __post_init__(self) -> None:
        require(
            self.mixed_precision in MIXED_PRECISIONS,
            f"train.mixed_precision={self.mixed_precision!r}; choose one of: {', '.join(MIXED_PRECISIONS)}",
        )

    @property
    def half_dtype(self) -> torch.dtype | None:
        return MIXED_PRECISIONS[self.mixed_precision]

    def changed(self) -> dict[str, object]:
        """The savers set away from their defaults, by their ``train.`` key."""
        default = Savers()
        return {
            f"train.{f.name}": getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }


def check_savers(method_cls, method_cfg, savers: Savers, device: torch.device | None = None) -> None:
    """One line for a saver that does not apply to the method or the device."""
    changed = savers.changed()
    if method_cls.gradient_free and changed:
        key, value = next(iter(changed.items()))
        value = str(value).lower() if isinstance(value, bool) else value  # as typed: true, not True
        raise ConfigError(
            f"{key}={value}: {method_cls.name} does not backpropagate, so no memory saver of "
            "train.* applies to it (its precision is method.precision)"
        )
    optimizer = getattr(method_cfg, "optimizer", "adamw")
    require(
        not (optimizer == "adamw8bit" and savers.foreach),
        "train.foreach=true with method.optimizer=adamw8bit: bitsandbytes' 8-bit AdamW has no "
        "multi-tensor step; use train.foreach=null",
    )
    if device is not None and device.type == "cuda" and savers.mixed_precision == "bf16":
        require(
            torch.cuda.is_bf16_supported(),
            "train.mixed_precision=bf16 but this GPU has no bf16 (before Ampere); use fp16",
        )


def make_adamw(params: list[torch.Tensor], optimizer: str, savers: Savers, **kwargs) -> torch.optim.Optimizer:
    """AdamW over ``params`` (``kwargs``: lr, betas, weight_decay, eps) as ``optimizer`` says."""
    if optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, foreach=savers.foreach, **kwargs)


def check_optimizer(optimizer: str) -> None:
    require(
        optimizer in OPTIMIZERS,
        f"method.optimizer={optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}",
    )


def cast_for_mixed_precision(modules: Iterable[torch.nn.Module], dtype: torch.dtype) -> None:
    """Every frozen floating-point parameter and buffer of ``modules`` to ``dtype`` and every
    trained parameter to fp32 (diffusers' ``cast_training_params``), in place; integer codes and
    4-bit weights are not touched."""
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if not tensor.is_floating_point():
                continue
            target = torch.float32 if tensor.requires_grad else dtype
            if tensor.dtype != target:
                tensor.data = tensor.data.to(target)


def enable_checkpointing(module: torch.nn.Module) -> None:
    """diffusers' or transformers' gradient checkpointing on ``module``."""
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers
        module.enable_gradient_checkpointing()
    elif hasattr(module, "activation_checkpointing_enable"):  # transformers (non-reentrant)
        module.activation_checkpointing_enable()
        module.train()  # transformers checkpoints only in training mode (CLIP has no dropout)
    elif hasattr(module, "gradient_checkpointing_enable"):  # older transformers
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        module.train()
    else:
        raise ConfigError(f"train.gradient_checkpointing: {type(module).__name__} cannot checkpoint")


class Backprop:
    """What the backprop methods share: the AdamW step with the savers on. A method calls
    :meth:`use_savers` at the end of its setup, runs its forward inside :meth:`autocast` and
    hands the loss to :meth:`optimize`."""

    savers: Savers
    optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler | None = None

    def half_modules(self) -> list[torch.nn.Module]:
        """The modules whose frozen weights mixed precision casts to the half type."""
        return []

    def checkpointed_modules(self) -> list[torch.nn.Module]:
        """The modules gradient checkpointing is enabled on."""
        return []

    def make_optimizer(self, params: list[torch.Tensor], **kwargs) -> torch.optim.Optimizer:
        return make_adamw(params, getattr(self.cfg, "optimizer", "adamw"), self.savers, **kwargs)

    def use_savers(self, device: torch.device) -> None:
        savers = self.savers
        if savers.half_dtype is not None:
            cast_for_mixed_precision(self.half_modules(), savers.half_dtype)
            if savers.half_dtype == torch.float16:
                self.scaler = torch.amp.GradScaler(torch.device(device).type)
        if savers.gradient_checkpointing:
            for module in self.checkpointed_modules():
                enable_checkpointing(module)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        dtype = self.savers.half_dtype
        if dtype is None:
            yield
            return
        with torch.autocast(self.c.device.type, dtype=dtype):
            yield

    def optimize(self, loss: torch.Tensor, params: list[torch.Tensor], max_grad_norm: float = 0.0) -> None:
        """Backward, optional clipping, the optimizer step and zeroing the gradients."""
        scaler = self.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if max_grad_norm:
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.savers.set_grads_to_none)
