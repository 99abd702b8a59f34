"""Which subjects a dataset holds: DreamBooth's 30, your own photos, and the readers of other
datasets' layouts. Light (no torch, no PIL): the run key and sweep planning read it.

A subject is a name, a class noun, a type (``live`` or ``object``: which evaluation prompt list
it gets, as in DreamBooth) and where its photos are under ``data.root``. ``data.dataset`` picks
the reader:

- ``dreambooth`` (default): the 30 DreamBooth subjects, ``data.root/<subject>/*.jpg``. Any other
  folder under ``data.root`` is a subject of your own given ``data.class_noun`` and
  ``data.subject_type``.
- ``custom``: ``data.root/<subject>/`` photo folders and ``data.root/subjects.yaml``::

      mydog: {class_noun: dog, type: live}
      mymug: {class_noun: mug, type: object, prompts: ["a {} on a desk", "a {} in the snow"]}

  ``prompts`` (optional) replace the type's list; ``{}`` is where the subject's phrase goes.
- ``customconcept101``: CustomConcept101 as released (github.com/adobe-research/custom-diffusion,
  ``customconcept101/``): ``data.root/dataset.json``, a list of entries with ``instance_data_dir``
  (the concept's photo folder, relative to data.root, e.g. ``./benchmark_dataset/cat``),
  ``class_prompt`` (its class noun) and ``prompt_filename`` (a text file of prompts, one a line,
  ``{}`` where the concept goes). The subject's name is its folder's name. CustomConcept101 names
  no live/object type: live where the class noun is an animal or a person (``LIVE_NOUNS``),
  object otherwise.
- ``dreambenchpp``: DreamBench++ as released (github.com/yuangpeng/dreambench_plus):
  ``data.root/images/<category>/<index>.jpg`` (one photo per subject) and
  ``data.root/captions/<category>/<index>.txt`` (first line: the subject, e.g. ``dog``; then its
  prompts). The subject's name is ``<category>_<index>``; ``animal`` and ``human`` are live, the
  other categories objects. Each prompt's first mention of the subject becomes ``{}``.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# the dataset's name, not the method's: spelt as one string so that no constant of benchmark/ is a
# method name (tests/methods/test_method_contract.py)
DATASETS = tuple("dreambooth custom customconcept101 dreambenchpp".split())
DREAMBOOTH = DATASETS[0]  # the default: google/dreambooth's 30 subjects
SUBJECT_TYPES = ("live", "object")
CUSTOM_INDEX = "subjects.yaml"
LIVE_NOUNS = {"cat", "dog", "person", "man", "woman", "boy", "girl", "horse", "bird", "pet", "tortoise"}

_COMMON = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
)
_ATTRIBUTES = ("a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}")

OBJECT_PROMPTS: tuple[str, ...] = (
    *_COMMON,
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
    *_ATTRIBUTES,
)

LIVE_PROMPTS: tuple[str, ...] = (
    *_COMMON,
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
    *_ATTRIBUTES,
)


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str
    kind: str  # "live" or "object"
    own_prompts: tuple[str, ...] | None = None  # the dataset's prompt templates; None: the type's list
    folder: str | None = None  # its photos' folder relative to data.root; None: <name>
    files: tuple[str, ...] | None = None  # its photos in that folder; None: every image there

    @property
    def prompt_templates(self) -> tuple[str, ...]:
        if self.own_prompts:
            return self.own_prompts
        return LIVE_PROMPTS if self.kind == "live" else OBJECT_PROMPTS

    def prompts(self, phrase: str) -> list[str]:
        """The evaluation prompts with ``phrase`` (e.g. "sks dog" or "<dog6>") filled in."""
        return [t.format(phrase) for t in self.prompt_templates]

    @property
    def relative_folder(self) -> str:
        return self.folder if self.folder is not None else self.name


_LIVE = {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}
# "subject_name,class" rows of google/dreambooth's dataset/prompts_and_classes.txt, in file order
_CLASSES = """
backpack,backpack
backpack_dog,backpack
bear_plushie,stuffed animal
berry_bowl,bowl
can,can
candle,candle
cat,cat
cat2,cat
clock,clock
colorful_sneaker,sneaker
dog,dog
dog2,dog
dog3,dog
dog5,dog
dog6,dog
dog7,dog
dog8,dog
duck_toy,toy
fancy_boot,boot
grey_sloth_plushie,stuffed animal
monster_toy,toy
pink_sunglasses,glasses
poop_emoji,toy
rc_car,toy
red_cartoon,cartoon
robot_toy,toy
shiny_sneaker,sneaker
teapot,teapot
vase,vase
wolf_plushie,stuffed animal
"""
SUBJECTS: dict[str, Subject] = {
    name: Subject(name, noun, "live" if name in _LIVE else "object")
    for name, noun in (row.split(",") for row in _CLASSES.strip().splitlines())
}


def _get(section: Any, key: str, default: Any = None) -> Any:
    if isinstance(section, Mapping):
        return section.get(key, default)
    return getattr(section, key, default)


def subject_for(data_cfg: Any, name: str) -> Subject:
    """The subject ``name`` of the dataset ``data_cfg`` describes (the ``data`` section: a dict,
    a DictConfig or the schema); ValueError, one line naming the bad value and what to do."""
    dataset = _get(data_cfg, "dataset", DREAMBOOTH)
    if dataset not in DATASETS:
        raise ValueError(f"data.dataset={dataset!r} is not a dataset; choose one of: {', '.join(DATASETS)}")
    if dataset == DREAMBOOTH:
        return _dreambooth_or_own(data_cfg, name)
    root = _get(data_cfg, "root")
    if root is None:
        raise ValueError(f"dataset={dataset} needs data.root=<the dataset's folder>")
    subjects = read_dataset(dataset, Path(str(root)).expanduser())
    if name not in subjects:
        shown = ", ".join(list(subjects)[:40]) or "none"
        raise ValueError(f"subject={name!r} is not in dataset={dataset} at {root}; its subjects: {shown}")
    return subjects[name]


def _dreambooth_or_own(data_cfg: Any, name: str) -> Subject:
    noun, kind = _get(data_cfg, "class_noun"), _get(data_cfg, "subject_type")
    if name in SUBJECTS:
        if noun is not None or kind is not None:
            raise ValueError(
                f"subject={name!r} is a DreamBooth subject (class {SUBJECTS[name].class_noun!r}): "
                "data.class_noun and data.subject_type are for your own subjects; rename your folder"
            )
        return SUBJECTS[name]
    if noun is None or not str(noun).strip():
        raise ValueError(
            f"subject={name!r} is not a DreamBooth subject; choose one of: {', '.join(SUBJECTS)}; "
            f"or, for your own photos in data.root/{name}/, give data.class_noun=<noun> and "
            "data.subject_type=live|object"
        )
    return Subject(name, str(noun).strip(), _checked_type(kind, f"subject={name!r}: data.subject_type"))


def _checked_type(kind: Any, where: str) -> str:
    if kind not in SUBJECT_TYPES:
        raise ValueError(f"{where}={kind!r}; choose live (animals, people) or object")
    return str(kind)


def read_dataset(dataset: str, root: Path) -> dict[str, Subject]:
    """Every subject of ``dataset`` at ``root``, by name, in the dataset's order."""
    readers = {
        "custom": read_custom,
        "customconcept101": read_customconcept101,
        "dreambenchpp": read_dreambenchpp,
    }
    if dataset == DREAMBOOTH:
        return dict(SUBJECTS)
    return readers[dataset](root)


def read_custom(root: Path) -> dict[str, Subject]:
    index = root / CUSTOM_INDEX
    if not index.is_file():
        raise ValueError(
            f"dataset=custom: no {index}; write one line per subject: "
            "<name>: {class_noun: <noun>, type: live|object}"
        )
    try:
        entries = yaml.safe_load(index.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"cannot read {index}: {str(e).splitlines()[0]}") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{index} must map each subject folder to {{class_noun: <noun>, type: live|object}}")
    subjects = {}
    for name, entry in entries.items():
        entry = entry if isinstance(entry, dict) else {}
        noun = entry.get("class_noun")
        if not isinstance(noun, str) or not noun.strip():
            raise ValueError(f"{index}: subject {name!r} has no class_noun; add class_noun: <noun>")
        kind = _checked_type(entry.get("type"), f"{index}: subject {name!r} type")
        prompts = entry.get("prompts")
        if prompts is not None and not (
            isinstance(prompts, list) and prompts and all("{}" in str(p) for p in prompts)
        ):
            raise ValueError(
                f"{index}: subject {name!r} prompts must be a list of texts, each with {{}} for the subject"
            )
        subjects[str(name)] = Subject(
            str(name), noun.strip(), kind, tuple(map(str, prompts)) if prompts else None
        )
    return subjects


def read_customconcept101(root: Path) -> dict[str, Subject]:
    index = root / "dataset.json"
    if not index.is_file():
        raise ValueError(f"dataset=customconcept101: no {index}; set data.root=<the customconcept101 folder>")
    try:
        entries = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot read {index}: {e}") from None
    subjects = {}
    for entry in entries:
        folder = Path(str(entry["instance_data_dir"]))
        name, noun = folder.name, str(entry.get("class_prompt") or "").strip()
        if not noun:
            raise ValueError(f"{index}: concept {name!r} has no class_prompt (its class noun)")
        prompts = None
        if entry.get("prompt_filename"):
            lines = (root / entry["prompt_filename"]).read_text().splitlines()
            prompts = tuple(line.strip() for line in lines if "{}" in line) or None
        kind = "live" if noun.split()[-1] in LIVE_NOUNS else "object"
        subjects[name] = Subject(name, noun, kind, prompts, folder=folder.as_posix().removeprefix("./"))
    return subjects


def read_dreambenchpp(root: Path) -> dict[str, Subject]:
    images = root / "images"
    if not images.is_dir():
        raise ValueError(f"dataset=dreambenchpp: no {images}; set data.root=<the DreamBench++ data folder>")
    subjects = {}
    for image in sorted(images.glob("*/*.jpg")):
        category, index = image.parent.name, image.stem
        caption = root / "captions" / category / f"{index}.txt"
        if not caption.is_file():
            raise ValueError(f"dataset=dreambenchpp: {image} has no caption file {caption}")
        noun, *lines = [line.strip() for line in caption.read_text().splitlines() if line.strip()]
        mention = re.compile(rf"\b{re.escape(noun)}\b", re.IGNORECASE)
        prompts = tuple(
            mention.sub("{}", p.replace("{", "(").replace("}", ")"), count=1)
            if mention.search(p)
            else f"{{}}, {p}"
            for p in lines
        )
        name = f"{category}_{index}"
        kind = "live" if category in ("animal", "human") else "object"
        subjects[name] = Subject(
            name, noun, kind, prompts or None, folder=f"images/{category}", files=(image.name,)
        )
    return subjects


def subject_entry(values: dict[str, Any]) -> dict[str, Any] | None:
    """What the run key holds of a subject read from a dataset's index (class noun, type,
    prompts): None for DreamBooth's own subjects and for yours (data.* already holds them),
    or where the index cannot be read (validation names why)."""
    data = values.get("data") or {}
    if data.get("dataset", DREAMBOOTH) == DREAMBOOTH:
        return None
    try:
        s = subject_for(data, str(values["subject"]))
    except (ValueError, OSError, KeyError, TypeError):
        return None
    return {
        "class_noun": s.class_noun,
        "kind": s.kind,
        "prompts": list(s.prompt_templates),
        "folder": s.relative_folder,
        "files": s.files,
    }


def main(argv: list[str]) -> int:
    """``python -m benchmark.datasets <dataset> <root>``: its subjects, comma-separated, for a sweep
    over all of them:
    ``-m dataset=custom data.root=<root> subject=$(python -m benchmark.datasets custom <root>)``."""
    if len(argv) != 2 or argv[0] not in DATASETS:
        print(f"usage: python -m benchmark.datasets {{{','.join(DATASETS)}}} <root>", file=sys.stderr)
        return 2
    try:
        print(",".join(read_dataset(argv[0], Path(argv[1]).expanduser())))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
