"""LoRA on the U-Net's attention projections via peft, saved and loaded in diffusers' format.

The recipe of diffusers' train_dreambooth_lora example: peft ``LoraConfig`` on
``to_q, to_k, to_v, to_out.0``, Gaussian init, ``lora_alpha = rank``; the file is
``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`` with the ``unet.`` prefix
(what ``StableDiffusionPipeline.save_lora_weights`` writes), so a stock pipeline loads it with
``load_lora_weights``.
"""

from __future__ import annotations

import torch

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_PREFIX = "unet."


def add_unet_lora(
    unet,
    rank: int,
    alpha: float | None = None,
    target_modules=ATTENTION_PROJECTIONS,
    init_seed: int = 0,
) -> dict[str, torch.nn.Parameter]:
    """Wrap ``unet``'s target layers (module-name suffixes, or one regex that peft full-matches)
    with trainable LoRA (rank ``rank``, alpha defaults to rank;
    A is Gaussian, B zero, drawn from ``init_seed`` without touching the global RNG).
    Returns the LoRA parameters by name; everything else stays frozen."""
    from peft import LoraConfig  # here, not at the top: validating a config must not wait for peft

    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights="gaussian",
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        unet.add_adapter(config)
    return {name: p for name, p in unet.named_parameters() if "lora_" in name and p.requires_grad}


def unet_lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The LoRA weights in diffusers' file format (keys ``unet.<module>.lora.down.weight``).

    The file holds no alpha, and ``load_lora_weights`` then uses alpha = rank; so a LoRA trained
    with another alpha has its scaling alpha/rank folded into the up (B) matrices."""
    config = unet.peft_config["default"]
    scaling = config.lora_alpha / config.r
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {
        UNET_PREFIX + k: (v.detach() * scaling if scaling != 1 and ".lora.up." in k else v.detach())
        for k, v in state.items()
    }


def load_unet_lora(pipeline, state: dict[str, torch.Tensor]) -> None:
    """Attach a diffusers-format LoRA file to a stock pipeline (``load_lora_weights``)."""
    pipeline.load_lora_weights(dict(state))
