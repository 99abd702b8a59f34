"""A subject's image set: which files under ``data.root/<subject>/`` are its photos, and a
fingerprint of their names and bytes. Runs are keyed by the fingerprint, not by the folder: the
same photos in another folder are the same run, a changed photo is a new one. Light (no torch),
so that planning a sweep or a report can key runs without loading anything heavy."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
FINGERPRINT_CHARS = 8


def is_image_name(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def image_files(folder: str | Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """The folder's image files (those of ``names`` only, if given), sorted by name; [] if it is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_image_name(p) and (names is None or p.name in names))


def fingerprint(folder: str | Path, names: tuple[str, ...] | None = None) -> str | None:
    """Hex digest of the folder's image names and bytes (those of ``names`` only, if given; None:
    no images there). Files are read once per (name, size, modification time)."""
    files = image_files(folder, names)
    if not files:
        return None
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _fingerprint(str(Path(folder).resolve()), stats)


@lru_cache(maxsize=256)
def _fingerprint(folder: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha1()
    for name, _, _ in stats:
        digest.update(name.encode() + b"\0" + hashlib.sha1((Path(folder) / name).read_bytes()).digest())
    return digest.hexdigest()[:FINGERPRINT_CHARS]
