"""ConfigError and ``require``: importable without torch, so that a config is checked (and
``--help`` answers) before the heavy libraries load. ``methods.base`` re-exports both."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value: the message names the value and what is allowed."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
