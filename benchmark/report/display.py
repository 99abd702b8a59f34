"""How things are shown: one display name and one colour per method, the papers' notation for
swept config keys. Every figure, table and page of the report takes its labels from here."""

from __future__ import annotations

from typing import Any

# A method's display name and colour are declared on its class (methods.common.base.Method);
# mode=real (the real images scored against themselves: the upper bound) is no method.
REAL = "real"
REAL_DISPLAY = ("Real images", "#666666")
UNKNOWN_COLOR = "#444444"

# Swept keys in the papers' notation: (matplotlib mathtext, also LaTeX; plain text for markdown)
AXES: dict[str, tuple[str, str]] = {
    "method": ("Method", "Method"),
    "method.tau": (r"$\tau$", "τ"),
    "method.nu": (r"$\nu$", "ν"),
    "method.T_L": (r"$T_L$", "T_L"),
    "method.T_U": (r"$T_U$", "T_U"),
    "method.n": (r"$n$", "n"),
    "method.mu": (r"$\mu$", "μ"),
    "method.fraction": ("fraction removed", "fraction removed"),
    "method.rank": ("LoRA rank", "LoRA rank"),
    "method.estimator": ("estimator", "estimator"),
    "method.timesteps": ("timestep sampling", "timestep sampling"),
    "method.quantize": ("quantization", "quantization"),
    "method.sg": ("Subspace Gradient", "Subspace Gradient"),
}


def method_type(key: Any):
    """The class of the method named ``key`` (``methods.common.registry``); None if no method has
    that name (mode=real, a run of a method since removed)."""
    from methods.common.errors import ConfigError
    from methods.common.registry import method_class

    try:
        return method_class(str(key))
    except ConfigError:
        return None


def method_name(key: Any) -> str:
    if str(key) == REAL:
        return REAL_DISPLAY[0]
    cls = method_type(key)
    return cls.display_name if cls else str(key)


def method_color(key: Any) -> str:
    if str(key) == REAL:
        return REAL_DISPLAY[1]
    cls = method_type(key)
    return cls.color if cls else UNKNOWN_COLOR


def beyond_papers(key: Any) -> bool:
    """A method the papers do not have (``Method.in_papers`` false): no paper value to compare."""
    cls = method_type(key)
    return bool(cls and not cls.in_papers)


def gradient_free(key: Any) -> bool:
    """No backpropagation through the model (ZOODiP Table 1's "Grad-free" column)."""
    cls = method_type(key)
    return bool(cls and cls.gradient_free)


def axis_label(key: str, text: bool = False) -> str:
    """`method.tau` -> $\\tau$ (figures and LaTeX) or τ (``text``: markdown); an unknown key
    loses its `method.` prefix."""
    if key in AXES:
        return AXES[key][int(text)]
    return key.removeprefix("method.")


def value_label(key: str, value: Any) -> str:
    """A row value as a reader sees it: method keys by their display name."""
    return method_name(value) if key == "method" else str(value)


def quantization(row: dict[str, Any]) -> str:
    """The weights' storage during training, from a record: NF4, INT8, INT4 or '' (full
    precision); the method's class reads its own config keys (``Method.quantization``)."""
    from methods.common.base import Method

    return (method_type(row.get("method")) or Method).quantization(row)
