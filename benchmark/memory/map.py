"""Which method fits which GPU: the memory map of every method x model (`nox -s memory_models`).

Reads the predictions (``python -m benchmark.memory ... csv=results/memory/predicted.csv``),
draws one figure (methods x models, each cell the predicted allocator peak, the device-level
figure and the training compute, coloured by the smallest common GPU it fits) and prints the
README's Markdown table.

A card of N GB is taken to hold N GiB (8 GB = 8192 MiB, as nvidia-smi reports them). A method
fits when its device-level figure (``predicted_device_bytes``: the caching-allocator model's
reserved peak plus the CUDA context term, benchmark/memory/device.py) fits; a row without it
falls back to the allocator peak plus ``CONTEXT_MARGIN_GIB``. Predictions, not measurements:
`nox -s memory_gpu` measures the real peaks.

    python -m benchmark.memory.map [results/memory/predicted.csv] [figure.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402

GPU_GB = (8, 12, 16, 24, 40, 80)  # common cards: RTX 4060/3060 12 GB/4080/4090/A100 40 GB/H100
CONTEXT_MARGIN_GIB = 1.0
GIB = 2**30
MODEL_ORDER = ("sd15_arch", "sd21_arch", "sdxl_arch")
MODEL_LABELS = {"sd15_arch": "SD1.5 (512 px)", "sd21_arch": "SD2.1 (768 px)", "sdxl_arch": "SDXL (1024 px)"}
DEFAULT_CSV = Path("results/memory/predicted.csv")


def smallest_gpu(peak_bytes: float, device_bytes: float | None = None) -> int | None:
    """The smallest card in GPU_GB that holds ``device_bytes``, or without it ``peak_bytes``
    plus the margin; None: none does."""
    has_device = device_bytes is not None and not pd.isna(device_bytes)
    need = device_bytes / GIB if has_device else peak_bytes / GIB + CONTEXT_MARGIN_GIB
    return next((gb for gb in GPU_GB if need <= gb), None)


# How a row's memory savers read (methods/common/savers.py); all three: the leanest setting.
SAVER_LABELS = {
    "train.mixed_precision=fp16": "fp16",
    "train.mixed_precision=bf16": "bf16",
    "train.gradient_checkpointing=true": "checkpointing",
    "method.optimizer=adamw8bit": "8-bit AdamW",
}
LEANEST = ("train.mixed_precision=fp16", "train.gradient_checkpointing=true", "method.optimizer=adamw8bit")


def short_variant(variant: str) -> str:
    """A row's overrides as the map shows them: ``leanest`` for fp16 + checkpointing + 8-bit
    AdamW, saver names, other keys without their ``method.``/``train.`` prefix."""
    parts = variant.split()
    lean = all(p in parts for p in LEANEST)
    rest = [p for p in parts if not (lean and p in LEANEST)]
    shown = [SAVER_LABELS.get(p) or p.split(".", 1)[-1].replace("schedule=", "") for p in rest]
    return " ".join((["leanest"] if lean else []) + shown)


def memory_grid(csv: Path, column: str = "predicted_peak_bytes") -> pd.DataFrame:
    """``column`` (default: the predicted peak bytes), one row per method (with its variant), one
    column per model; the methods in the order the CSV first names them (the sweep's order),
    variants after their method. NaN where the CSV has no such value."""
    table = pd.read_csv(csv, keep_default_na=False)
    variants = [short_variant(v) for v in table["variant"]]
    table["row"] = [m if not v else f"{m} ({v})" for m, v in zip(table["method"], variants)]
    table["value"] = pd.to_numeric(table[column], errors="coerce") if column in table else float("nan")
    grid = table.groupby(["row", "model"], sort=False)["value"].first().unstack("model")
    rank = {m: i for i, m in enumerate(dict.fromkeys(table["method"]))}
    rows = sorted(grid.index, key=lambda r: (rank.get(r.split(" ")[0], len(rank)), r))
    columns = [m for m in MODEL_ORDER if m in grid.columns] + [
        m for m in grid.columns if m not in MODEL_ORDER
    ]
    return grid.loc[rows, columns]


def row_label(row: str) -> str:
    """The method's display name (declared on its class), its variant after it."""
    from methods.common.errors import ConfigError
    from methods.common.registry import method_class

    method, _, variant = row.partition(" ")
    try:
        name = method_class(method).display_name
    except ConfigError:  # a row of a method since removed
        name = method
    return f"{name} {variant}".strip()


def _at(grid: pd.DataFrame | None, row, model) -> float | None:
    if grid is None or row not in grid.index or model not in grid.columns:
        return None
    value = grid.loc[row, model]
    return None if pd.isna(value) else float(value)


def pflop(flops: float | None) -> str:
    return (
        ""
        if flops is None
        else f"{flops / 1e15:,.1f} PFLOP"
        if flops >= 1e14
        else f"{flops / 1e15:.3f} PFLOP"
    )


def cell(peak_bytes: float, device_bytes: float | None = None, train_flops: float | None = None) -> str:
    """``peak [· device] (card)[ · compute]``, GB = 1e9 bytes."""
    if pd.isna(peak_bytes):
        return "–"
    gpu = smallest_gpu(peak_bytes, device_bytes)
    device = "" if device_bytes is None else f" · {device_bytes / 1e9:.2f}"
    compute = "" if train_flops is None else f" · {pflop(train_flops)}"
    return f"{peak_bytes / 1e9:.2f}{device} ({f'{gpu} GB' if gpu else '> 80 GB'}){compute}"


def markdown(
    grid: pd.DataFrame, device: pd.DataFrame | None = None, flops: pd.DataFrame | None = None
) -> str:
    header = "| method | " + " | ".join(MODEL_LABELS.get(m, m) for m in grid.columns) + " |"
    lines = [header, "|---" * (len(grid.columns) + 1) + "|"]
    for row, values in grid.iterrows():
        cells = [cell(v, _at(device, row, m), _at(flops, row, m)) for m, v in values.items()]
        lines.append(f"| {row_label(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw(
    grid: pd.DataFrame, path: Path, device: pd.DataFrame | None = None, flops: pd.DataFrame | None = None
) -> Path:
    tiers = [*GPU_GB, None]
    colors = ["#1a9850", "#66bd63", "#a6d96a", "#fee08b", "#fdae61", "#f46d43", "#a50026"]
    index = pd.DataFrame(
        [[tiers.index(smallest_gpu(grid.loc[r, m], _at(device, r, m))) if pd.notna(grid.loc[r, m]) else None
          for m in grid.columns] for r in grid.index]
    )  # fmt: skip
    fig, ax = plt.subplots(figsize=(1.8 * len(grid.columns) + 4.5, 0.42 * len(grid) + 1.8))
    cmap = ListedColormap(colors)
    norm = BoundaryNorm(range(len(tiers) + 1), cmap.N)
    ax.imshow(index.astype(float).to_numpy(), cmap=cmap, norm=norm, aspect="auto")
    for i, row in enumerate(grid.index):
        for j, model in enumerate(grid.columns):
            peak, dev, compute = grid.loc[row, model], _at(device, row, model), _at(flops, row, model)
            text = "–" if pd.isna(peak) else f"{peak / 1e9:.2f} GB" + (f" · {dev / 1e9:.2f}" if dev else "")
            if compute is not None and not pd.isna(peak):
                text += f"\n{pflop(compute)}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(grid.columns)), [MODEL_LABELS.get(m, m) for m in grid.columns])
    ax.set_yticks(range(len(grid)), [row_label(row) for row in grid.index])
    ax.xaxis.tick_top()
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors]
    labels = [f"fits {gb} GB" for gb in GPU_GB] + ["> 80 GB"]
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fit = (
        "device level" if device is not None and device.notna().any().any()
        else f"peak + {CONTEXT_MARGIN_GIB:g} GiB"
    )  # fmt: skip
    ax.set_title(
        "Predicted training memory, batch 1, native resolution: allocator peak · device level (GB = 1e9 B);\n"
        f"training compute (PFLOP); colour: smallest card (N GB = N GiB) holding the {fit}",
        fontsize=9, pad=26,
    )  # fmt: skip
    if any("(leanest" in row for row in grid.index):
        note = "leanest: fp16 mixed precision + gradient checkpointing + 8-bit AdamW"
        ax.text(0.5, -0.01, note, transform=ax.transAxes, ha="center", va="top", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def seconds(csv: Path) -> str:
    """Each prediction's wall and CPU seconds (the CSV's ``predicted_*seconds``), one line each."""
    table = pd.read_csv(csv, keep_default_na=False)
    if "predicted_cpu_seconds" not in table.columns:
        return "seconds: not in this CSV"
    lines = [f"{'method':<28}{'model':<12}{'wall s':>8}{'CPU s':>8}"]
    for _, row in table.iterrows():
        method = f"{row['method']} {row['variant']}".strip()
        wall, cpu = row["predicted_seconds"], row["predicted_cpu_seconds"]
        lines.append(f"{method:<28}{row['model']:<12}{str(wall):>8}{str(cpu):>8}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    csv = Path(argv[0]) if argv else DEFAULT_CSV
    figure = Path(argv[1]) if len(argv) > 1 else csv.with_name("memory_map.png")
    grid = memory_grid(csv)
    device, flops = memory_grid(csv, "predicted_device_bytes"), memory_grid(csv, "predicted_train_flops")
    print(markdown(grid, device, flops))
    print(seconds(csv))
    print(f"figure: {draw(grid, figure, device, flops)}")


if __name__ == "__main__":
    main(sys.argv[1:])
