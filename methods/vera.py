"""VeRA (Kopiczko et al., 2024, "Vector-based Random Matrix Adaptation"): one pair of frozen random
matrices A (r x in), B (out x r) shared by every attention projection, and per layer two trained
vectors: the change is ``diag(b) B diag(d) A``, through peft's ``VeraConfig``.

The shared projections are not stored: they are drawn again from ``projection_prng_key`` on the
CPU (peft's ``save_projection=False``; the paper's point: only the vectors and a seed are kept), so
the artifact holds the vectors alone and ``apply`` rebuilds A and B from the same key. Trained by
the LoRA method's DreamBooth step; ``apply`` merges into the stock U-Net
(methods/common/peft_adapters.py).
"""

from __future__ import annotations

import dataclasses

from methods.common.peft_adapters import AdapterConfig, PeftAdapter, require_positive, target_modules


@dataclasses.dataclass
class VeRAConfig(AdapterConfig):
    rank: int = 256
    d_initial: float = 0.1
    projection_prng_key: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(rank=self.rank, d_initial=self.d_initial)


class VeRA(PeftAdapter):
    name = "vera"
    display_name = "VeRA"
    color = "#AA4499"
    Config = VeRAConfig

    def peft_config(self):
        from peft import VeraConfig

        cfg = self.cfg
        return VeraConfig(
            r=cfg.rank, d_initial=cfg.d_initial, projection_prng_key=cfg.projection_prng_key,
            save_projection=False, target_modules=target_modules(),
        )  # fmt: skip
