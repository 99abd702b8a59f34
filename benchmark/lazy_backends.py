"""Optional backends that load on first use, not when a library merely imports them.

diffusers (its quantizers) and peft run ``import bitsandbytes as bnb`` at start-up whenever
bitsandbytes is installed, which costs every process ~1.5 CPU seconds (it registers its torch
ops and pulls in torch._inductor's autotuning). Only QLoRA and the memory predictor's 4-bit
path use it. Here its top module is registered with :class:`importlib.util.LazyLoader`: the name
exists at once, the module runs on its first attribute access (``bnb.nn``, ``from bitsandbytes
import ...``), so every user gets the real module, and a run that never touches it never pays.

torchao and torchvision are not deferred: transformers imports names from them
(``from torchao... import ...``), which would load them at once anyway.

Installed by benchmark/__init__.py, before any entry point imports diffusers.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

DEFERRED = ("bitsandbytes",)


# what the import system set before running the module: reading them does not run it. Every
# later `import bitsandbytes` reads __spec__ (still initializing?), and inspect.getmodule, which
# torch.library calls whenever a library registers an op, reads every module's __file__.
# __path__ is not among them: importing a submodule runs the package first.
IMPORT_ATTRIBUTES = ("__spec__", "__name__", "__file__", "__cached__", "__loader__", "__package__")


class _DeferredModule(importlib.util._LazyModule):
    """LazyLoader's module (it runs on first use), but reading IMPORT_ATTRIBUTES does not run it."""

    def __getattribute__(self, attr):
        if attr == "__class__":  # isinstance() reads it
            return object.__getattribute__(self, attr)
        namespace = object.__getattribute__(self, "__dict__")
        if attr in IMPORT_ATTRIBUTES and attr in namespace:
            return namespace[attr]
        return super().__getattribute__(attr)


class _DeferringLoader(importlib.util.LazyLoader):
    def exec_module(self, module):
        super().exec_module(module)
        module.__class__ = _DeferredModule


class DeferredBackendFinder(importlib.abc.MetaPathFinder):
    """Finds ``DEFERRED`` top-level modules as the path finder does, wrapped in a LazyLoader."""

    def find_spec(self, name, path, target=None):
        if name not in DEFERRED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _DeferringLoader(spec.loader)
        return spec


def defer_optional_backends() -> None:
    if not any(isinstance(finder, DeferredBackendFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, DeferredBackendFinder())


def executed(name: str) -> bool:
    """Whether module ``name`` has run (a deferred module nobody has used yet has not)."""
    module = sys.modules.get(name)
    return isinstance(module, types.ModuleType) and not isinstance(module, importlib.util._LazyModule)
