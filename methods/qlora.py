"""QLoRA (Dettmers et al., 2023) for the U-Net: its Linear layers quantized to 4-bit NF4 with
bitsandbytes (double quantization, block size 64: the QLoRA defaults), frozen, and LoRA
trained on the attention projections through peft's bitsandbytes LoRA layer.

bitsandbytes has no 4-bit convolution, so Conv2d layers stay in the training dtype (as
diffusers' own ``BitsAndBytesConfig`` quantization of a U-Net). The stored LoRA is a
diffusers LoRA file: a stock fp16/fp32 pipeline takes it with ``load_lora_weights``.

``eval_base``: the base the LoRA is evaluated on. ``full`` (default) loads it into the stock
full-precision pipeline, as the diffusers LoRA recipe's final inference does; ``nf4`` first
quantizes the pipeline's U-Net exactly as in training (from its fp32 weights), so the scored
model is the trained one. ``compute_dtype``: the dtype of the 4-bit matmuls; ``auto`` is the
QLoRA paper's bf16 on CUDA (fp16 on a GPU without bf16) and fp32 elsewhere (CPU bf16 matmuls
are slow and gain nothing).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from methods.common.base import require
from methods.common.lora_io import add_unet_lora, load_unet_lora, unet_lora_state_dict
from methods.common.unet_finetune import UNetFinetune, UNetFinetuneConfig

COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EVAL_BASES = ("full", "nf4")


def resolve_compute_dtype(name: str, device) -> torch.dtype:
    """``auto``: bf16 on CUDA (QLoRA paper), fp16 on a GPU without bf16 (before Ampere: V100, T4),
    fp32 elsewhere. The record's ``qlora_compute_dtype`` says which."""
    if name == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return COMPUTE_DTYPES[name]


@dataclasses.dataclass
class QLoRAConfig(UNetFinetuneConfig):
    rank: int = 2
    lora_alpha: float = 2.0
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "auto"
    eval_base: str = "full"
    lora_init_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.rank >= 1, f"method.rank={self.rank} must be >= 1")
        require(self.lora_alpha > 0, f"method.lora_alpha={self.lora_alpha} must be > 0")
        require(
            self.quant_type in ("nf4", "fp4"), f"method.quant_type={self.quant_type!r}; choose nf4 or fp4"
        )
        require(
            self.blocksize in (64, 128, 256, 512, 1024, 2048, 4096),
            f"method.blocksize={self.blocksize}; choose a power of two from 64 to 4096",
        )
        require(
            self.compute_dtype == "auto" or self.compute_dtype in COMPUTE_DTYPES,
            f"method.compute_dtype={self.compute_dtype!r}; choose auto or one of {', '.join(COMPUTE_DTYPES)}",
        )
        require(
            self.eval_base in EVAL_BASES,
            f"method.eval_base={self.eval_base!r}; choose one of {', '.join(EVAL_BASES)}",
        )


def quantize_linear_4bit(
    module: nn.Module, quant_type: str = "nf4", compute_dtype=torch.float32, double_quant=True, blocksize=64
) -> int:
    """Replace every nn.Linear inside ``module`` by a bitsandbytes Linear4bit holding its weight
    quantized (packed uint8 + per-block absmax). Returns how many were replaced."""
    import bitsandbytes as bnb

    targets = [(name, m) for name, m in module.named_modules() if name and isinstance(m, nn.Linear)]
    for name, linear in targets:
        with torch.device("meta"):  # no throw-away random init
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=double_quant,
                quant_type=quant_type,
            )
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data,
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type=quant_type,
            blocksize=blocksize,
        )
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        layer = layer.to(linear.weight.device)  # Params4bit quantizes when moved to a device
        # bitsandbytes >= 0.48 repacks a CPU layer for its bf16 kernel at the first no-grad eval
        # forward: absmax rounded to bf16, and it fails for in_features < 2 * blocksize. Evaluation
        # keeps the training path, so the scored model is the trained one.
        layer.support_avx512bf16_for_cpu = False
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, layer)
    return len(targets)


class QLoRA(UNetFinetune):
    name = "qlora"
    display_name = "QLoRA"
    color = "#E69F00"
    Config = QLoRAConfig
    artifact_filename = "pytorch_lora_weights.safetensors"

    @classmethod
    def quantization(cls, config) -> str:
        """The 4-bit data type the base weights are stored in (``method.quant_type``)."""
        quant_type = config.get("method.quant_type")
        return quant_type.upper() if isinstance(quant_type, str) else "NF4"

    def quantize(self, unet, device) -> int:
        cfg = self.cfg
        self.compute_dtype = resolve_compute_dtype(cfg.compute_dtype, device)
        count = quantize_linear_4bit(
            unet, cfg.quant_type, self.compute_dtype, cfg.double_quant, cfg.blocksize
        )
        # what diffusers' bnb quantizer sets: peft then wraps Linear4bit with its bnb LoRA layer
        unet.is_loaded_in_4bit = True
        return count

    def prepare(self, components, subject):
        cfg, unet = self.cfg, components.unet
        self.quantized_layers = self.quantize(unet, components.device)
        return add_unet_lora(unet, cfg.rank, cfg.lora_alpha, init_seed=cfg.lora_init_seed)

    def state_dict(self):
        return unet_lora_state_dict(self.c.unet)

    def apply_weights_dtype(self):
        # nf4: quantize the fp32 weights, as in training (fp16 weights give other NF4 codes)
        return torch.float32 if self.cfg.eval_base == "nf4" else None

    def apply(self, pipeline, artifact) -> None:
        if self.cfg.eval_base == "nf4":
            self.quantize(pipeline.unet, pipeline.unet.device)
        load_unet_lora(pipeline, artifact)

    def record_extras(self):
        dtype_name = {v: k for k, v in COMPUTE_DTYPES.items()}[self.compute_dtype]
        return {
            **super().record_extras(),
            "quantized_linear_layers": self.quantized_layers,
            "qlora_compute_dtype": dtype_name,  # what compute_dtype=auto resolved to
        }
