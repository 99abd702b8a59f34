"""peft's adapter family beyond LoRA (LoHa, LoKr, OFT, BOFT, VeRA) on the U-Net, trained by the
LoRA method's DreamBooth step and merged into a stock pipeline.

Each method module (methods/loha.py, ...) declares its Config and how its knobs become a peft
config (``PeftAdapter.peft_config``); everything else is here:

- ``prepare``: peft's tuner of the config (``LoHaModel``, ..., ``VeraModel``) injects the adapter
  into the U-Net's target layers in place, its initialisation drawn from ``init_seed`` without
  touching the global RNG. (Not ``unet.add_adapter``: peft refuses VeRA there, its shared
  projections live on the tuner.)
- ``state_dict``: the trained adapter tensors under peft's state-dict keys (the module path and
  the tensor's name, the adapter name stripped, as ``get_peft_model_state_dict``), with the
  ``unet.`` prefix. VeRA's shared projections are not in it (``save_projection=False``).
- ``apply``: the same tuner on the stock pipeline's U-Net, the stored tensors copied in, then
  the tuner's ``merge_and_unload``: every adapter layer merged into its base weight and replaced
  by it, so the U-Net is a stock one with the stock inference cost.
"""

from __future__ import annotations

import abc
import dataclasses

import torch

from methods.common.base import require
from methods.common.lora_io import ATTENTION_PROJECTIONS, UNET_PREFIX
from methods.common.unet_finetune import UNetFinetuneConfig
from methods.lora import LoRA


@dataclasses.dataclass
class AdapterConfig(UNetFinetuneConfig):
    init_seed: int = 0  # the adapter's random initialisation (where it has one)


class PeftAdapter(LoRA):
    in_papers = False  # beyond the papers: the report marks these rows
    """A peft adapter on ``ATTENTION_PROJECTIONS`` (LoRA's targets). Subclasses set ``name``,
    ``Config`` and ``peft_config``."""

    Config = AdapterConfig
    artifact_filename = "adapter_model.safetensors"  # peft's file name for an adapter's weights

    @abc.abstractmethod
    def peft_config(self):
        """The peft config of this method's adapter (targets: ``ATTENTION_PROJECTIONS``)."""

    def prepare(self, components, subject):
        components.unet.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.init_seed)
            inject(components.unet, self.peft_config())
        params = adapter_tensors(components.unet)
        for p in params.values():
            p.requires_grad_(True)
        require(bool(params), "the adapter found no target layer in the U-Net")
        return params

    def state_dict(self):
        return {UNET_PREFIX + k: v.detach() for k, v in self.params.items()}

    def apply(self, pipeline, artifact) -> None:
        tuner = attach(pipeline.unet, self.peft_config(), artifact)
        tuner.merge_and_unload()  # the stock layers, the adapter folded into their weights


ADAPTER_NAME = "default"


def inject(unet, config):
    """peft's tuner of ``config`` wrapped around ``unet``: the adapter layers replace the target
    layers of ``unet`` itself. Returns the tuner (``merge_and_unload`` undoes the wrapping)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    device = next(unet.parameters()).device
    tuner = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type](unet, config, ADAPTER_NAME)
    unet.to(device)  # peft leaves some adapter buffers on the CPU (BOFT's permutations boft_P)
    return tuner


def adapter_tensors(unet) -> dict[str, torch.nn.Parameter]:
    """The adapter's trainable tensors by peft's state-dict key: ``<module>.<tensor>`` (e.g.
    ``...attn1.to_q.hada_w1_a``), the adapter name left out."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                if ADAPTER_NAME not in getattr(module, attr):  # e.g. LoHa's conv-only factors
                    continue
                value = getattr(module, attr)[ADAPTER_NAME]
                for pname, p in (
                    [("", value)] if isinstance(value, torch.nn.Parameter) else value.named_parameters()
                ):
                    tensors[".".join(x for x in (name, attr, pname) if x)] = p
    return tensors


def attach(unet, config, artifact: dict[str, torch.Tensor]):
    """The adapter of ``config`` on ``unet`` holding the stored tensors (not merged); the tuner."""
    tuner = inject(unet, config)
    tensors = adapter_tensors(unet)
    stored = {k.removeprefix(UNET_PREFIX): v for k, v in artifact.items()}
    require(
        set(stored) == set(tensors),
        f"the artifact's tensors do not match the adapter of method.* here: "
        f"{sorted(set(stored) ^ set(tensors))[:3]} ...",
    )
    with torch.no_grad():
        for key, p in tensors.items():
            p.copy_(stored[key])
    return tuner


def target_modules() -> list[str]:
    return list(ATTENTION_PROJECTIONS)


def require_positive(**values: int | float) -> None:
    for key, value in values.items():
        require(value > 0, f"method.{key}={value} must be > 0")
