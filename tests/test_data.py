"""Tests for benchmark.data: subjects, prompts, image loading and offline dataset fetching."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark import data
from benchmark.data import (
    LIVE_PROMPTS,
    OBJECT_PROMPTS,
    SUBJECTS,
    DatasetUnavailable,
    get_subject,
    load_images,
    load_pil_images,
    resolve_dataset_root,
    subject_image_paths,
)

DATASET = Path(
    os.environ.get("DREAMBOOTH_DATASET") or Path(__file__).resolve().parents[2] / "shared/dreambooth/dataset"
)
needs_dataset = pytest.mark.usefixtures("dataset_root")  # skips without it, fails under CI=true


def _parse_prompts_and_classes() -> tuple[list[tuple[str, str]], list[str], list[str]]:
    text = (DATASET / "prompts_and_classes.txt").read_text()
    classes_part, prompts_part = text.split("Prompts", 1)
    rows = [line.split(",") for line in classes_part.splitlines() if "," in line]
    assert rows[0] == ["subject_name", "class"]
    object_part, live_part = prompts_part.split("Live Subject Prompts")

    def templates(part: str) -> list[str]:
        return [t.replace("{0} {1}", "{}") for t in re.findall(r"'([^']*)'\.format", part)]

    return [tuple(r) for r in rows[1:]], templates(object_part), templates(live_part)


# ------------------------------------------------------------------ subjects and prompts


@needs_dataset
def test_subjects_and_prompts_match_dataset_file():
    classes, object_prompts, live_prompts = _parse_prompts_and_classes()
    assert len(classes) == 30 and len(object_prompts) == 25 and len(live_prompts) == 25
    assert [(s.name, s.class_noun) for s in SUBJECTS.values()] == classes
    assert list(OBJECT_PROMPTS) == object_prompts
    assert list(LIVE_PROMPTS) == live_prompts
    assert sorted(SUBJECTS) == sorted(p.name for p in DATASET.iterdir() if p.is_dir())


def test_live_subjects_are_the_cats_and_dogs():
    live = {n for n, s in SUBJECTS.items() if s.kind == "live"}
    assert live == {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}
    assert {s.kind for s in SUBJECTS.values()} == {"live", "object"}
    assert SUBJECTS["backpack_dog"].kind == "object"
    assert get_subject("dog6").prompt_templates == LIVE_PROMPTS
    assert get_subject("teapot").prompt_templates == OBJECT_PROMPTS


def test_prompts_fill_phrase():
    dog6 = get_subject("dog6")
    assert dog6.prompts("sks dog")[0] == "a sks dog in the jungle"
    assert dog6.prompts("<dog6>")[0] == "a <dog6> in the jungle"
    assert dog6.prompts("sks dog")[-1] == "a cube shaped sks dog"
    assert "a sks dog wearing a santa hat" in dog6.prompts("sks dog")
    vase = get_subject("vase").prompts("sks vase")
    assert len(vase) == 25 and "a sks vase floating in an ocean of milk" in vase
    assert all("{" not in p for p in vase)


def test_unknown_subject_names_value_and_choices():
    with pytest.raises(ValueError) as exc:
        get_subject("dgo6")
    msg = str(exc.value)
    assert "\n" not in msg and "'dgo6'" in msg
    assert all(name in msg for name in SUBJECTS)
    assert "backpack, backpack_dog," in msg


# ------------------------------------------------------------------ image loading


def _save(path: Path, rgb_columns: list[tuple[int, int, int]], height: int, col_width: int, **kw) -> Path:
    """Save an image made of vertical solid-colour stripes."""
    arr = np.concatenate([np.full((height, col_width, 3), c, np.uint8) for c in rgb_columns], axis=1)
    Image.fromarray(arr).save(path, **kw)
    return path


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@needs_dataset
def test_load_images_real_subject():
    paths = subject_image_paths(DATASET, get_subject("dog6"))
    assert paths == sorted(paths) and len(paths) >= 4 and all(p.suffix == ".jpg" for p in paths)
    x = load_images(paths, 64)
    assert x.shape == (len(paths), 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.5
    pil = load_pil_images(paths[:2], size=32)
    assert [im.size for im in pil] == [(32, 32)] * 2 and pil[0].mode == "RGB"
    assert min(load_pil_images(paths[:1])[0].size) > 64  # no resize without size


def test_center_crop_keeps_middle_of_wide_image(tmp_path):
    path = _save(tmp_path / "wide.png", [RED, GREEN, BLUE], height=20, col_width=20)  # 60x20
    (im,) = load_pil_images([path])
    assert im.size == (20, 20) and set(im.getdata()) == {GREEN}
    x = load_images([path], 8)
    assert x.shape == (1, 3, 8, 8)
    torch.testing.assert_close(x[0, :, 4, 4], torch.tensor([-1.0, 1.0, -1.0]), atol=0.02, rtol=0)


def test_center_crop_keeps_middle_of_tall_image(tmp_path):
    arr = np.concatenate([np.full((10, 10, 3), c, np.uint8) for c in (RED, GREEN, BLUE)], axis=0)
    Image.fromarray(arr).save(tmp_path / "tall.png")
    (im,) = load_pil_images([tmp_path / "tall.png"])
    assert im.size == (10, 10) and set(im.getdata()) == {GREEN}


def test_load_images_applies_exif_orientation(tmp_path):
    # Stored 64x32: left half red, right half blue. Orientation 6 = rotate 90 deg clockwise to display,
    # so the upright image is 32x64 with red on top; its centre square is red above, blue below.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path / "rotated.jpg", [RED, BLUE], height=32, col_width=32, exif=exif, quality=95)
    with Image.open(path) as raw:
        assert raw.size == (64, 32)  # the file really is stored sideways
    x = load_images([path], 16)[0]
    top, bottom = x[:, 2, 8], x[:, 13, 8]
    assert top[0] > 0.8 and top[2] < -0.8, top  # red
    assert bottom[2] > 0.8 and bottom[0] < -0.8, bottom  # blue
    assert load_pil_images([path])[0].size == (32, 32)


def test_load_images_non_image_names_file(tmp_path):
    bad = tmp_path / "fake.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        load_images([bad], 16)


def test_subject_image_paths_rejects_non_image_file(tmp_path):
    folder = tmp_path / "dog6"
    folder.mkdir()
    for i in range(2):
        _save(folder / f"0{i}.jpg", [RED, BLUE], height=8, col_width=8)
    _save(folder / "03.PNG", [BLUE, GREEN], height=8, col_width=8)
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    (folder / ".DS_Store").write_text("ignored: hidden")
    assert [p.name for p in subject_image_paths(tmp_path, "dog6")] == ["00.jpg", "01.jpg", "03.PNG"]
    (folder / "02.jpg").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError) as exc:
        subject_image_paths(tmp_path, get_subject("dog6"))
    assert str(folder / "02.jpg") in str(exc.value) and "\n" not in str(exc.value)


def _ramp(height: int = 32, width: int = 32) -> np.ndarray:
    """A left-to-right grey ramp, 0..1 (square: loading crops to the centre square)."""
    return np.tile(np.linspace(0.0, 1.0, width), (height, 1))


def test_a_16_bit_grey_png_keeps_its_values(tmp_path):
    path = tmp_path / "ramp16.png"
    Image.fromarray(np.rint(_ramp() * 65535).astype(np.uint16)).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # PIL's own convert("RGB") would clip it to white
    (im,) = load_pil_images([path])
    grey = np.asarray(im, dtype=np.float64)[..., 0]
    np.testing.assert_allclose(grey, _ramp() * 255, atol=0.51)  # one 8-bit rounding


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_composited_on_white(tmp_path, mode):
    arr = np.zeros((16, 16, 4), np.uint8)
    arr[..., 0] = 200  # red everywhere; the left half fully transparent
    arr[:, 8:, 3] = 255
    rgba = Image.fromarray(arr, mode="RGBA")
    image = rgba.convert(mode) if mode != "P" else rgba.quantize(colors=4)
    if mode == "P":  # palette transparency: the index the transparent half uses
        image.info["transparency"] = image.getpixel((0, 0))
    image.save(
        tmp_path / "alpha.png", **({"transparency": image.info["transparency"]} if mode == "P" else {})
    )
    (im,) = load_pil_images([tmp_path / "alpha.png"])
    out = np.asarray(im)
    assert (out[:, :8] == 255).all(), "transparent half not white"
    assert not (out[:, 8:] == 255).all() and (out[:, 8:] != 0).any(), "opaque half lost its colour"


def test_cmyk_and_palette_images_keep_their_colours(tmp_path):
    base = Image.fromarray(np.concatenate([np.full((16, 8, 3), c, np.uint8) for c in (RED, BLUE)], axis=1))
    base.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    base.convert("P", palette=Image.Palette.ADAPTIVE, colors=2).save(tmp_path / "palette.png")
    for name in ("cmyk.jpg", "palette.png"):
        (im,) = load_pil_images([tmp_path / name])
        left, right = np.asarray(im, dtype=float)[8, 2], np.asarray(im, dtype=float)[8, 13]
        assert left[0] > 200 and left[2] < 60 and right[2] > 200 and right[0] < 60, name


def test_a_floating_point_image_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(_ramp().astype(np.float32), mode="F").save(path)
    with pytest.raises(ValueError, match=re.escape(str(path))) as exc:
        load_images([path], 8)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("level", [0, 255, 128])
def test_a_constant_image_is_refused_naming_the_file(tmp_path, level):
    folder = tmp_path / "dog6"
    folder.mkdir()
    _save(folder / "00.jpg", [RED, BLUE], height=8, col_width=8)
    blank = np.full((16, 16), level, np.uint16 if level == 128 else np.uint8)
    if level == 128:  # a 16-bit grey image, nearly constant after scaling
        blank = blank * 257
    Image.fromarray(blank).save(folder / "01.png")
    with pytest.raises(ValueError) as exc:
        subject_image_paths(tmp_path, "dog6")
    assert str(folder / "01.png") in str(exc.value) and "constant" in str(exc.value)


def test_training_images_smaller_than_the_resolution_get_one_warning_line(tmp_path, caplog):
    big = _save(tmp_path / "big.png", [RED, BLUE], height=32, col_width=16)
    small = _save(tmp_path / "small.png", [RED, BLUE], height=8, col_width=4)
    with caplog.at_level("WARNING", logger="benchmark.data"):
        load_images([big, small], 16)
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message and "small.png" in message and "big.png" not in message and "16 px" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="benchmark.data"):
        load_images([big], 16)
    assert not caplog.records


@pytest.mark.parametrize("make_folder", [False, True], ids=["missing", "empty"])
def test_subject_image_paths_missing_or_empty_names_subject(tmp_path, make_folder):
    if make_folder:
        (tmp_path / "dog6").mkdir()
        (tmp_path / "dog6" / "readme.txt").write_text("x")
    with pytest.raises(ValueError) as exc:
        subject_image_paths(tmp_path, get_subject("dog6"))
    msg = str(exc.value)
    assert "'dog6'" in msg and str(tmp_path) in msg and "data.root=" in msg and "\n" not in msg


# ------------------------------------------------------------------ dataset fetching (offline)


def _make_archive(path: Path, skip: str | None = None) -> str:
    """Zip like GitHub's archive of google/dreambooth, one image per subject; return a file:// URL."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("dreambooth-main/", "")
        zf.writestr("dreambooth-main/README.md", "readme")
        zf.writestr("dreambooth-main/dataset/", "")
        for txt in sorted(DATASET.glob("*.txt")):
            zf.write(txt, f"dreambooth-main/dataset/{txt.name}")
        for name in SUBJECTS:
            if name != skip:
                zf.writestr(f"dreambooth-main/dataset/{name}/", "")
                first = sorted(DATASET.joinpath(name).glob("*.jpg"))[0]
                zf.write(first, f"dreambooth-main/dataset/{name}/{first.name}")
    return path.as_uri()


@needs_dataset
def test_download_extract_verify_then_reuse(tmp_path, monkeypatch):
    url = _make_archive(tmp_path / "main.zip")
    cache = tmp_path / "cache"
    root = resolve_dataset_root(None, True, str(cache), url=url)
    assert root == cache / "dataset"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(SUBJECTS)
    for subject in SUBJECTS.values():
        assert len(subject_image_paths(root, subject)) == 1
    assert (root / "prompts_and_classes.txt").is_file() and not (cache / "README.md").exists()
    assert sorted(p.name for p in cache.iterdir()) == ["dataset"]  # temp archive/extract cleaned up

    def no_download(*args):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(data, "_download", no_download)
    assert resolve_dataset_root(None, True, cache, url="file:///nonexistent.zip") == root
    assert resolve_dataset_root(None, False, cache) == root


@needs_dataset
def test_archive_missing_subject_is_named_and_leaves_no_dataset(tmp_path):
    url = _make_archive(tmp_path / "main.zip", skip="poop_emoji")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="poop_emoji"):
        resolve_dataset_root(None, True, cache, url=url)
    assert not (cache / "dataset").exists() and list(cache.iterdir()) == []


def test_explicit_root_is_used_as_is(tmp_path):
    assert resolve_dataset_root(str(tmp_path), False, tmp_path / "unused") == tmp_path
    assert not (tmp_path / "unused").exists()


def test_missing_without_download_explains_options(tmp_path):
    with pytest.raises(DatasetUnavailable) as exc:
        resolve_dataset_root(None, False, tmp_path)
    msg = str(exc.value)
    assert "data.download=true" in msg and "data.root" in msg and "\n" not in msg


def test_unreachable_url_raises_dataset_unavailable(tmp_path):
    url = "http://127.0.0.1:9/x.zip"  # discard port: nothing listens, connection refused
    with pytest.raises(DatasetUnavailable) as exc:
        resolve_dataset_root(None, True, tmp_path / "cache", url=url)
    msg = str(exc.value)
    assert "data.root" in msg and url in msg and "google/dreambooth" in msg and "\n" not in msg
    assert not (tmp_path / "cache" / "dataset").exists()
