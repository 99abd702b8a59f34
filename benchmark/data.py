"""Subjects (benchmark.datasets: DreamBooth's 30, your own, other datasets'), image loading and
checking, and fetching the DreamBooth dataset."""

from __future__ import annotations

import logging
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from benchmark.datasets import LIVE_PROMPTS, OBJECT_PROMPTS, SUBJECTS, Subject, subject_for  # noqa: F401 (re-exported)
from benchmark.image_set import image_files, is_image_name

_log = logging.getLogger(__name__)

DATASET_ARCHIVE_URL = "https://github.com/google/dreambooth/archive/refs/heads/main.zip"
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises on bad files
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as a viewer shows them
MIN_PIXEL_STD = 1.0  # 8-bit levels: below it an image is (nearly) constant and teaches nothing

_BY_HAND = (
    "clone or download https://github.com/google/dreambooth and set data.root=<path to its dataset/ folder>"
)


def get_subject(name: str, data_cfg: Any = None) -> Subject:
    """The subject ``name`` of the dataset ``data_cfg`` (the config's ``data`` section) describes;
    without it, one of the 30 DreamBooth subjects."""
    if data_cfg is None:
        if name not in SUBJECTS:
            raise ValueError(f"unknown subject {name!r}; choose one of: {', '.join(SUBJECTS)}")
        return SUBJECTS[name]
    return subject_for(data_cfg, name)


def _open_rgb(path: Path) -> Image.Image:
    """Open ``path`` upright (EXIF orientation applied) as 8-bit RGB with its real values;
    ValueError naming the file where that is not possible."""
    try:
        with Image.open(path) as im:
            return _to_rgb(ImageOps.exif_transpose(im), path)
    except _PIL_ERRORS as e:
        raise _unreadable(path, e) from None


def _to_rgb(im: Image.Image, path: Path) -> Image.Image:
    """16-bit grey scaled to 8 bits (PIL's own conversion clips it to white), transparency
    composited on ``ALPHA_BACKGROUND``, palette / CMYK / grey / bilevel converted by PIL."""
    if im.mode in _SIXTEEN_BIT or im.mode == "I":
        values = np.asarray(im, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"{im.mode} pixel values outside 0..65535 in {path}; save it as 8- or 16-bit")
        scale = 257.0 if im.mode in _SIXTEEN_BIT or values.max() > 255 else 1.0
        grey = Image.fromarray(np.rint(values / scale).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if im.mode == "F":
        raise ValueError(f"floating-point image {path} (mode F); save it as 8- or 16-bit")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _unreadable(path: Path, e: Exception) -> ValueError:
    return ValueError(f"cannot read image file {path} ({type(e).__name__}: {e}); remove or replace it")


def subject_image_paths(root: str | Path, subject: Subject | str) -> list[Path]:
    """Sorted image files of ``subject`` under ``root``; each is decoded once, so a truncated,
    corrupt or blank file is named here, before a run starts (``verify()`` would not decode the data)."""
    subject = subject if isinstance(subject, Subject) else Subject(subject, "", "object")
    folder = Path(root) / subject.relative_folder
    paths = image_files(folder, subject.files)
    if not paths:
        raise ValueError(
            f"dataset root {root} has no images for subject {subject.name!r} (expected {folder}/*.jpg); "
            "set data.root=<dir holding the subject folders>"
        )
    for p in paths:
        spread = float(np.asarray(_open_rgb(p), dtype=np.float32).std())
        if spread < MIN_PIXEL_STD:
            raise ValueError(
                f"image {p} is (nearly) constant (pixel standard deviation {spread:.2f} of 255); "
                "remove or replace it"
            )
    return paths


def _center_square(im: Image.Image, size: int | None) -> Image.Image:
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side))
    return im if size is None or side == size else im.resize((size, size), Image.Resampling.BICUBIC)


def load_pil_images(paths: Iterable[str | Path], size: int | None = None) -> list[Image.Image]:
    """Upright RGB images, center-cropped to a square and resized to ``size`` if given."""
    return [_center_square(_open_rgb(Path(p)), size) for p in paths]


def load_images(paths: Iterable[str | Path], resolution: int) -> torch.Tensor:
    """float32 tensor (N, 3, R, R) in [-1, 1] of center-cropped, resized images; one warning
    line names the images smaller than ``resolution`` (they are upscaled)."""
    paths = [Path(p) for p in paths]
    originals = [_open_rgb(p) for p in paths]
    small = [(min(im.size), p.name) for p, im in zip(paths, originals) if min(im.size) < resolution]
    if small:
        smallest, name = min(small)
        _log.warning(
            f"{len(small)} of {len(originals)} training images are smaller than {resolution} px and are "
            f"upscaled (smallest: {name}, {smallest} px): {', '.join(n for _, n in sorted(small))}"
        )
    arrays = [np.asarray(_center_square(im, resolution), dtype=np.float32) for im in originals]
    if not arrays:
        return torch.empty(0, 3, resolution, resolution)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0).contiguous()


# --------------------------------------------------------------------------- dataset fetching


class DatasetUnavailable(RuntimeError):
    """The dataset is not on disk and could not be (or was not allowed to be) downloaded."""


def _missing_subjects(root: Path) -> list[str]:
    def has_images(d: Path) -> bool:
        return d.is_dir() and any(is_image_name(p) for p in d.iterdir())

    return [s for s in SUBJECTS if not has_images(root / s)]


def _download(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f)


def _extract_dataset(archive: Path, dest: Path) -> None:
    """Extract the ``*/dataset/`` subtree of ``archive`` into the (empty) folder ``dest``."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            parts = Path(info.filename).parts
            if len(parts) < 3 or parts[1] != "dataset" or info.is_dir() or ".." in parts:
                continue
            out = dest.joinpath(*parts[2:])
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)


def resolve_dataset_root(
    root: str | Path | None, download: bool, cache_dir: str | Path, url: str = DATASET_ARCHIVE_URL
) -> Path:
    """Folder holding the 30 subject folders: ``root`` if given, else ``cache_dir/dataset``
    (downloaded from ``url`` when missing and ``download`` is true)."""
    if root is not None:
        return Path(root).expanduser()
    cache = Path(cache_dir).expanduser()
    dest = cache / "dataset"
    if not _missing_subjects(dest):
        return dest
    if not download:
        raise DatasetUnavailable(
            f"DreamBooth dataset not found in {dest}; set data.download=true to fetch it from {url}, "
            f"or {_BY_HAND}"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dataset-", dir=cache) as tmp:
        archive, extracted = Path(tmp) / "archive.zip", Path(tmp) / "dataset"
        try:
            _download(url, archive)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise DatasetUnavailable(
                f"could not download the DreamBooth dataset from {url} ({reason}); {_BY_HAND}"
            ) from None
        try:
            _extract_dataset(archive, extracted)
        except zipfile.BadZipFile:
            raise ValueError(f"download from {url} is not a zip archive; {_BY_HAND}") from None
        missing = _missing_subjects(extracted)
        if missing:
            raise ValueError(f"archive {url} lacks images for subjects: {', '.join(missing)}; {_BY_HAND}")
        if dest.exists():
            if not _missing_subjects(dest):  # another process finished first
                return dest
            shutil.rmtree(dest)
        extracted.rename(dest)
    return dest
