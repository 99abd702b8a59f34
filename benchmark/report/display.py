"""How things are shown: one display name and one colour per method, the papers' notation for
swept config keys. Every figure, table and page of the report takes its labels from here."""

from __future__ import annotations

from typing import Any

# (display name as in the ZOODiP / DreamBooth papers, colour: colour-blind-safe Okabe-Ito + greys)
METHODS: dict[str, tuple[str, str]] = {
    "dreambooth": ("DreamBooth", "#0072B2"),
    "qlora": ("QLoRA", "#E69F00"),
    "peqa": ("PEQA", "#009E73"),
    "tuneqdm": ("TuneQDM", "#CC79A7"),
    "ti": ("TI", "#56B4E9"),
    "gfti": ("GF-TI", "#D55E00"),
    "zoodip": ("ZOODiP", "#000000"),
    "hollowed": ("Hollowed Net", "#F0E442"),
    "lora": ("LoRA", "#999999"),
    "selective": ("Selective BP/ZO", "#882255"),
    "real": ("Real images", "#666666"),
}
GRADIENT_FREE = {"gfti", "zoodip"}  # ZOODiP Table 1's "Grad-free" column

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


def method_name(key: Any) -> str:
    return METHODS.get(str(key), (str(key), ""))[0]


def method_color(key: Any) -> str:
    return METHODS.get(str(key), ("", "#444444"))[1]


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
    """The weights' storage during training, from a record: NF4, INT8, INT4 or '' (full precision)."""
    if row.get("method") == "qlora":
        return "NF4"
    quantize = row.get("method.quantize")
    if isinstance(quantize, str) and quantize not in ("", "none"):
        return quantize.upper()
    bits = row.get("method.bits")
    if bits is not None and bits == bits:  # PEQA, TuneQDM: integer weights
        return f"INT{int(bits)}"
    return ""
