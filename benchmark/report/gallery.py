"""The qualitative gallery (ZOODiP Fig. 5): `gallery.html` in the report's folder, a static page
that opens from disk (relative links, no server, no network).

Per subject (a selector at the top shows one at a time): its real images, then a rows x
prompts grid of the generated images, one row per table row (a method, or a grid cell such
as tau=128, nu=1e-3), first seed. Each cell shows the image as a thumbnail linking to the full
PNG, with that image's CLIP-T / CLIP-I / DINO (the run's `images/scores.json`; a run scored
before those were written shows its run means, marked "run mean").
"""

from __future__ import annotations

import hashlib
import html
import json
import os
from pathlib import Path
from urllib.parse import quote

from omegaconf import OmegaConf
from PIL import Image

from benchmark import data
from benchmark.datasets import DREAMBOOTH
from benchmark.report.tables import Report, number, row_name
from methods.common.atomic import atomic_path, write_text_atomic

THUMB_PX = 160
SCORES = (("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("dino", "DINO"))

STYLE = """
body { font-family: sans-serif; margin: 1em; color: #222; }
h1 { font-size: 1.2em; } h2 { font-size: 1.05em; margin-top: 1.2em; }
.subject { display: none; } .subject.shown { display: block; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 4px; vertical-align: top; }
th { background: #f4f4f4; font-size: 0.8em; max-width: 12em; }
img { width: 128px; height: 128px; object-fit: cover; display: block; }
.scores { font-size: 0.7em; color: #444; white-space: nowrap; } .mean { color: #a60; }
.real img { display: inline-block; margin-right: 4px; }
"""
SCRIPT = """
function show(name) {
  for (const s of document.querySelectorAll('.subject'))
    s.classList.toggle('shown', s.id === 'subject-' + name);
}
document.getElementById('subject').addEventListener('change', e => show(e.target.value));
show(document.getElementById('subject').value);
window.addEventListener('load', () => {  // an image that did not decode is counted and reported
  const broken = [...document.images].filter(im => !im.complete || im.naturalWidth === 0);
  document.body.dataset.images = document.images.length;
  document.body.dataset.brokenImages = broken.length;
  if (broken.length) document.getElementById('broken').textContent = broken.length + ' images failed to load';
});
"""


def link(target: Path, page_dir: Path) -> str:
    return quote(os.path.relpath(target, page_dir).replace(os.sep, "/"))


def thumbnail(source: Path, thumbs: Path) -> Path:
    """A small JPEG of ``source`` (made once), so the page loads quickly with many images."""
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:10]
    target = thumbs / f"{digest}_{source.stem}.jpg"
    if not target.exists():
        thumbs.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as image, atomic_path(target) as tmp:
            image = image.convert("RGB")
            image.thumbnail((THUMB_PX, THUMB_PX))
            image.save(tmp, format="JPEG", quality=85)
    return target


def figure(image: Path, page_dir: Path, thumbs: Path, caption: str = "") -> str:
    return (
        f'<a href="{link(image, page_dir)}"><img src="{link(thumbnail(image, thumbs), page_dir)}" '
        f'alt="{html.escape(image.name)}"></a>{caption}'
    )


def has_images(report: Report) -> bool:
    ok = report.runs[report.runs["state"] == "ok"]
    return any((Path(path) / "images").is_dir() for path in ok["path"])


def run_subject(run_dir: Path, subject: str) -> data.Subject:
    """The subject as the dataset the run used describes it (its config.yaml); DreamBooth's if unknown."""
    if (run_dir / "config.yaml").exists():
        cfg = OmegaConf.load(run_dir / "config.yaml")
        try:
            return data.get_subject(subject, cfg.data)
        except (ValueError, OSError):
            pass
    return data.SUBJECTS.get(subject) or data.Subject(subject, subject, "object")


def real_images(run_dir: Path, subject: str) -> list[Path]:
    """The subject's images from the dataset the run used (its config.yaml); none if unknown."""
    if not (run_dir / "config.yaml").exists():
        return []
    cfg = OmegaConf.load(run_dir / "config.yaml")
    root = data.resolve_dataset_root(cfg.data.root, False, cfg.data.cache_dir)
    return data.subject_image_paths(root, run_subject(run_dir, subject))


def scores_line(scores: dict | None, run: dict) -> str:
    if scores:
        parts = [
            f"{label} {number(scores.get(key), 3)}" for key, label in SCORES if scores.get(key) is not None
        ]
        return f'<div class="scores">{" · ".join(parts)}</div>'
    parts = [f"{label} {number(run.get(key), 3)}" for key, label in SCORES]
    return f'<div class="scores mean">run mean: {" · ".join(parts)}</div>'


def subject_section(report: Report, subject: str, page_dir: Path, thumbs: Path) -> str:
    runs = report.runs[(report.runs["subject"] == subject) & (report.runs["state"] == "ok")]
    if runs.empty:
        return f'<div class="subject" id="subject-{subject}"><p>No finished run for {subject}.</p></div>'
    reals = real_images(Path(runs["path"].iloc[0]), subject)
    out = [f'<div class="subject" id="subject-{html.escape(subject)}">',
           f"<h2>{html.escape(subject)}: real images</h2>",
           '<div class="real">', *(figure(p, page_dir, thumbs) for p in reals), "</div>"]  # fmt: skip
    rows, prompts = [], {}
    for entry in report.table.to_dict("records"):
        member = runs
        for key in report.spec["rows"]:
            member = member[member[key].astype(str) == str(entry[key])]
        if member.empty:
            continue
        run = member.sort_values("seed").iloc[0].to_dict()
        images = Path(run["path"]) / "images"
        scored = json.loads((images / "scores.json").read_text()) if (images / "scores.json").exists() else {}
        prompts.update(scored.get("prompts", {}))
        by_prompt: dict[str, Path] = {}
        for png in sorted(images.glob("p*_*.png")):
            by_prompt.setdefault(png.name.split("_")[0], png)  # the prompt's first image
        rows.append((row_name(report, entry), run, by_prompt, scored.get("images", {})))
    columns = sorted({p for _, _, by_prompt, _ in rows for p in by_prompt})
    described = run_subject(Path(runs["path"].iloc[0]), subject)
    templates = described.prompt_templates  # runs without scores.json: the CLIP-T text
    for p in columns:
        prompts.setdefault(p, templates[int(p[1:])].format(described.class_noun))
    head = "".join(f"<th>{html.escape(prompts.get(p, p))}</th>" for p in columns)
    out += [
        "<h2>generated (first image of each prompt, first seed)</h2>",
        "<table>",
        f"<tr><th></th>{head}</tr>",
    ]
    for name, run, by_prompt, scores in rows:
        cells = "".join(
            "<td>" + (figure(by_prompt[p], page_dir, thumbs, scores_line(scores.get(by_prompt[p].name), run))
                      if p in by_prompt else "—") + "</td>"
            for p in columns
        )  # fmt: skip
        out.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return "\n".join([*out, "</table>", "</div>"])


def dataset_names(report: Report) -> str:
    """The datasets of the report's runs, as their records name them (DreamBooth before there were others)."""
    named = report.runs["dataset"].dropna() if "dataset" in report.runs else []
    return ", ".join(sorted(set(named))) or DREAMBOOTH


THUMBS = "gallery_thumbs"  # the page's thumbnails, beside it


def write_gallery(report: Report) -> Path:
    page_dir = report.out_dir
    thumbs = page_dir / THUMBS
    subjects = list(dict.fromkeys(report.runs["subject"].astype(str)))
    options = "".join(f'<option value="{html.escape(s)}">{html.escape(s)}</option>' for s in subjects)
    title = html.escape(f"{report.spec.get('title', report.name)} ({dataset_names(report)})")
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{title}: gallery</title>",
        f"<style>{STYLE}</style></head><body>", f"<h1>{title}: qualitative gallery</h1>",
        f'<label>Subject <select id="subject">{options}</select></label> <strong id="broken"></strong>',
        *(subject_section(report, s, page_dir, thumbs) for s in subjects),
        f"<script>{SCRIPT}</script>", "</body></html>",
    ])  # fmt: skip
    path = page_dir / "gallery.html"
    write_text_atomic(path, page)
    return path
