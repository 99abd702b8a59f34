"""Method names -> classes.

A method is one module of the ``methods`` package named after it (``methods/<name>.py``) and
one ``conf/method/<name>.yaml``. Its class registers itself when defined (``Method`` subclasses
with their own ``name``; ``Method.__init_subclass__``), so ``method_class(name)`` imports
``methods.<name>`` on first use: validating a config or listing the methods imports no method
module, and a class defined anywhere else (a test module, a user's package) is found once
its module is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING

from methods.common.errors import ConfigError

if TYPE_CHECKING:
    from methods.common.base import Method

PACKAGE = "methods"
PACKAGE_DIR = Path(__file__).resolve().parent.parent
REGISTERED: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> None:
    """Add ``cls`` under ``cls.name``; a second class under a taken name is refused (the same
    class defined again, e.g. its module reloaded, replaces itself)."""
    known = REGISTERED.get(cls.name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(
            f"method name {cls.name!r} of {cls.__module__}.{cls.__qualname__} is taken by "
            f"{known.__module__}.{known.__qualname__}; give the class another name"
        )
    REGISTERED[cls.name] = cls


def method_names() -> list[str]:
    """The methods this package ships: one module each at the top of ``methods/`` (found without
    importing any)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(PACKAGE_DIR)]) if not m.ispkg)


def method_class(name: str) -> type[Method]:
    if name not in REGISTERED and name in method_names():
        importlib.import_module(f"{PACKAGE}.{name}")
    if name not in REGISTERED:
        allowed = sorted(set(method_names()) | set(REGISTERED))
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(allowed)}")
    return REGISTERED[name]


def method_classes() -> dict[str, type[Method]]:
    """Every shipped method's class (imports every method module)."""
    return {name: method_class(name) for name in method_names()}
