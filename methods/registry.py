"""Method names -> classes. Adding a method = one module + one line here + one conf/method YAML."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from methods.errors import ConfigError

if TYPE_CHECKING:
    from methods.base import Method

METHODS: dict[str, str] = {
    "ti": "methods.textual_inversion:TextualInversion",
    "dreambooth": "methods.dreambooth:DreamBooth",
    "qlora": "methods.qlora:QLoRA",
    "peqa": "methods.peqa:PEQA",
    "tuneqdm": "methods.tuneqdm:TuneQDM",
    "lora": "methods.lora:LoRA",
    "hollowed": "methods.hollowed:HollowedNet",
    "selective": "methods.selective:Selective",
    "zoodip": "methods.zoodip:ZOODiP",
    "gfti": "methods.gfti:GradientFreeTI",
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    module_name, class_name = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
