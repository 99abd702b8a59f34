"""A report's predicted-memory section (``report.predicted: <csv>``, e.g. experiment=savers): the
rows of `nox -s memory`'s CSV for the report's methods, each at the settings the report's rows
name (the papers' defaults, or the savers of a row), with the allocator peak, the device-level
figure, the training compute and, where a GPU measured it, the measured peaks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmark.report.display import method_name
from benchmark.report.tables import markdown

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = {
    "predicted_peak_gb": "Allocator peak (GB)",
    "predicted_device_gb": "Device level (GB)",
    "predicted_device_gib": "Device level (GiB)",
    "predicted_train_pflop": "Compute (PFLOP)",
    "measured_peak_allocated_gb": "Measured allocator (GB)",
    "measured_nvml_peak_gb": "Measured NVML (GB)",
}


def predicted_rows(csv: Path, methods: list[str]) -> pd.DataFrame:
    """The CSV's rows of ``methods`` (in that order), each method's paper row first."""
    table = pd.read_csv(csv, keep_default_na=False)
    table = table[table["method"].isin(methods)]
    order = {m: i for i, m in enumerate(methods)}
    table = table.assign(_m=table["method"].map(order), _v=table["variant"].ne(""))
    table = table.sort_values(["_m", "_v", "variant"], kind="stable")
    shown = pd.DataFrame(
        {
            "Method": [method_name(m) for m in table["method"]],
            "Setting": [v or "paper (defaults)" for v in table["variant"]],
            "Model": table["model"],
        }
    )
    for column, label in COLUMNS.items():
        if column in table:
            shown[label] = table[column].replace("", "–").to_numpy()
    return shown.reset_index(drop=True)


def predicted_section(spec: dict, methods: list[str]) -> list[str]:
    """Markdown lines of the section; none where the report names no CSV."""
    source = spec.get("predicted")
    if not source:
        return []
    csv = Path(source) if Path(source).is_absolute() else ROOT / source
    if not csv.exists():
        return [
            "## Predicted memory and compute",
            "",
            f"{source} does not exist yet: `nox -s memory` writes it.",
            "",
        ]
    rows = predicted_rows(csv, methods)
    return [
        "## Predicted memory and compute",
        "",
        f"From {source} (`nox -s memory`: SD1.5 architecture, 512 px, batch 1, fake tensors on a CPU; "
        "measured columns only where `nox -s memory_gpu` ran on a GPU).",
        "",
        markdown(rows),
        "",
    ]
