"""A report figure saved as PDF (vector, for the paper) and PNG, drawn off-screen (Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PNG_DPI = 200


def save(fig, stem: Path, layout: bool = True) -> list[Path]:
    """``stem``.pdf (vector) and ``stem``.png."""
    if layout:
        fig.tight_layout()
    paths = [stem.with_suffix(".pdf"), stem.with_suffix(".png")]
    fig.savefig(paths[0])
    fig.savefig(paths[1], dpi=PNG_DPI)
    plt.close(fig)
    return paths
