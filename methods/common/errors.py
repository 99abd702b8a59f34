"""ConfigError and ``require``: importable without torch, so that a config is checked (and
``--help`` answers) before the heavy libraries load. ``methods.common.base`` re-exports both.

A check stops at its first failed ``require``; inside :func:`every_problem` it notes the failure
and goes on, so that a sweep's validation lists every bad value of a section, not only the first.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

_noted: ContextVar[list[str] | None] = ContextVar("noted_config_problems", default=None)


class ConfigError(ValueError):
    """A bad configuration value: the message names the value and what is allowed."""


class ConfigErrors(ConfigError):
    """Several bad values, one message each (``messages``); ``str()`` is the first."""

    def __init__(self, messages: list[str]):
        self.messages = list(messages)
        super().__init__(self.messages[0])


def require(condition: bool, message: str) -> None:
    if condition:
        return
    noted = _noted.get()
    if noted is None:
        raise ConfigError(message)
    if message not in noted:
        noted.append(message)


def problem_messages(error: ConfigError) -> list[str]:
    return list(getattr(error, "messages", [str(error)]))


def every_problem(check: Callable[..., Any], *args: Any) -> Any:
    """``check(*args)`` with every failed ``require`` noted instead of raised at the first: its
    result if none failed, else ConfigErrors listing them all. An exception that follows a noted
    failure (a later line relying on the value just refused) is that failure's consequence."""
    noted: list[str] = []
    token = _noted.set(noted)
    try:
        result = check(*args)
    except ConfigError as e:
        noted += [m for m in problem_messages(e) if m not in noted]
    except Exception:
        if not noted:
            raise
    finally:
        _noted.reset(token)
    if noted:
        raise ConfigErrors(noted)
    return result
