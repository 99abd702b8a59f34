"""Subjects of your own and other datasets' layouts: what each reader finds, the one-line
refusals of bad input, the run key of DreamBooth runs, and one tiny end-to-end run each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmark import datasets
from benchmark.config import config_digest, run_dir_for, run_key
from benchmark.report.gallery import dataset_names
from benchmark.report.tables import build_report
from benchmark.schema import problems
from tests.conftest import compose, run_sweep_in_process

FEW = 3  # dog6 photos copied into each fixture


def copy_dog6(dataset_root: Path, folder: Path, n: int = FEW) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(dataset_root.glob("dog6/*.jpg"))[:n]
    for p in photos:
        shutil.copy(p, folder / p.name)
    return [p.name for p in photos]


@pytest.fixture
def own_root(tmp_path, dataset_root):
    root = tmp_path / "photos"
    copy_dog6(dataset_root, root / "mydog")
    return root


@pytest.fixture
def custom_root(tmp_path, dataset_root):
    root = tmp_path / "custom"
    copy_dog6(dataset_root, root / "rex")
    copy_dog6(dataset_root, root / "mug")
    (root / "subjects.yaml").write_text(
        "rex: {class_noun: dog, type: live}\n"
        "mug: {class_noun: mug, type: object, prompts: ['a {} on a desk', 'a {} in the rain']}\n"
    )
    return root


@pytest.fixture
def cc101_root(tmp_path, dataset_root):
    """CustomConcept101's released layout: dataset.json, benchmark_dataset/<concept>/, prompts/."""
    root = tmp_path / "customconcept101"
    copy_dog6(dataset_root, root / "benchmark_dataset" / "pet_dog1")
    (root / "prompts").mkdir()
    (root / "prompts" / "pet.txt").write_text("photo of a {}\n{} swimming in a pool\n{} in times square\n")
    entry = {
        "instance_prompt": "<new1> dog",
        "class_prompt": "dog",
        "instance_data_dir": "./benchmark_dataset/pet_dog1",
        "class_data_dir": "./real_reg/samples_dog/",
        "prompt_filename": "./prompts/pet.txt",
    }
    (root / "dataset.json").write_text(json.dumps([entry]))
    return root


@pytest.fixture
def dreambenchpp_root(tmp_path, dataset_root):
    """DreamBench++'s released layout: images/<category>/<n>.jpg, captions/<category>/<n>.txt."""
    root = tmp_path / "dreambenchpp"
    (root / "images" / "animal").mkdir(parents=True)
    (root / "captions" / "animal").mkdir(parents=True)
    shutil.copy(sorted(dataset_root.glob("dog6/*.jpg"))[0], root / "images" / "animal" / "0.jpg")
    shutil.copy(sorted(dataset_root.glob("dog6/*.jpg"))[1], root / "images" / "animal" / "1.jpg")
    (root / "captions" / "animal" / "0.txt").write_text(
        "dog\nA dog reading a book\nA watercolor painting of a dog\n"
    )
    (root / "captions" / "animal" / "1.txt").write_text("dog\nA dog in space\nA dog on a boat\n")
    return root


def tiny(tmp_path, *overrides: str):
    return compose(
        [
            "model=tiny",
            f"paths.results={tmp_path / 'results'}",
            "train.progress=false",
            "train.profile_steps=0",
            *overrides,
        ]
    )


# --------------------------------------------------------------------------- readers


def test_own_subject_gets_the_live_prompts_with_its_class_noun(own_root):
    data_cfg = {"dataset": "dreambooth", "root": str(own_root), "class_noun": "corgi", "subject_type": "live"}
    subject = datasets.subject_for(data_cfg, "mydog")
    assert subject.prompt_templates == datasets.LIVE_PROMPTS
    assert "a corgi wearing a santa hat" in subject.prompts(subject.class_noun)
    as_object = datasets.subject_for({**data_cfg, "subject_type": "object"}, "mydog")
    assert as_object.prompt_templates == datasets.OBJECT_PROMPTS


def test_custom_reader_reads_subjects_yaml(custom_root):
    subjects = datasets.read_custom(custom_root)
    assert list(subjects) == ["rex", "mug"]
    assert subjects["rex"].kind == "live" and subjects["rex"].prompt_templates == datasets.LIVE_PROMPTS
    assert subjects["mug"].prompts("sks mug") == ["a sks mug on a desk", "a sks mug in the rain"]


def test_customconcept101_reader(cc101_root):
    (subject,) = datasets.read_customconcept101(cc101_root).values()
    assert (subject.name, subject.class_noun, subject.kind) == ("pet_dog1", "dog", "live")
    assert subject.relative_folder == "benchmark_dataset/pet_dog1"
    assert subject.prompts("<new1> dog")[1] == "<new1> dog swimming in a pool"


def test_dreambenchpp_reader(dreambenchpp_root):
    subjects = datasets.read_dreambenchpp(dreambenchpp_root)
    assert list(subjects) == ["animal_0", "animal_1"]
    first = subjects["animal_0"]
    assert first.kind == "live" and first.files == ("0.jpg",) and first.relative_folder == "images/animal"
    assert first.prompts("sks dog") == ["A sks dog reading a book", "A watercolor painting of a sks dog"]


# --------------------------------------------------------------------------- bad input: one line each


def test_bad_subjects_are_refused_one_line_each(tmp_path, own_root, dataset_root):
    (own_root / "empty").mkdir()
    base = [f"data.root={own_root}"]
    cases = {
        "no images": (["subject=empty", "data.class_noun=dog", "data.subject_type=live"], "has no images"),
        "no class noun": (["subject=mydog"], "data.class_noun=<noun>"),
        "unknown type": (["subject=mydog", "data.class_noun=dog", "data.subject_type=plant"], "'plant'"),
        "collides": (
            ["subject=dog6", "data.class_noun=cat", "data.subject_type=live", f"data.root={dataset_root}"],
            "is a DreamBooth subject",
        ),
        "no such dataset": (["subject=mydog", "data.dataset=laion"], "data.dataset='laion'"),
    }
    for name, (overrides, expected) in cases.items():
        found = problems(tiny(tmp_path, *base, *overrides), check_device=False)
        assert len(found) == 1 and expected in found[0], (name, found)


def test_custom_index_without_class_noun_is_refused(tmp_path, custom_root):
    (custom_root / "subjects.yaml").write_text("rex: {type: live}\n")
    found = problems(
        tiny(tmp_path, "dataset=custom", f"data.root={custom_root}", "subject=rex"), check_device=False
    )
    assert len(found) == 1 and "no class_noun" in found[0], found


def test_bad_subject_exits_2_with_one_line(tmp_path, own_root, capsys):
    from benchmark.sweep.preflight import exit_on_bad_input

    with pytest.raises(SystemExit) as exited:
        exit_on_bad_input(
            ["subject=mydog", f"data.root={own_root}", "model=tiny", f"paths.results={tmp_path}"]
        )
    assert exited.value.code == 2
    assert "data.class_noun=<noun>" in capsys.readouterr().err.strip().splitlines()[-1]


# --------------------------------------------------------------------------- run key


def test_dreambooth_run_key_has_no_trace_of_the_new_keys(dataset_root):
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(compose(["model=tiny", f"data.root={dataset_root}"]), resolve=True)
    new_keys = ("dataset", "class_noun", "subject_type")
    assert set(new_keys) <= set(plain["data"])
    before = {**plain, "data": {k: v for k, v in plain["data"].items() if k not in new_keys}}
    assert config_digest(plain) == config_digest(before)
    own = {
        **plain,
        "subject": "mydog",
        "data": {**plain["data"], "class_noun": "dog", "subject_type": "live"},
    }
    assert config_digest(own) != config_digest({**own, "data": {**own["data"], "class_noun": "cat"}})


def test_custom_subjects_class_noun_is_in_the_run_key(tmp_path, custom_root):
    cfg = tiny(tmp_path, "dataset=custom", f"data.root={custom_root}", "subject=rex")
    before = run_key(cfg)
    (custom_root / "subjects.yaml").write_text("rex: {class_noun: puppy, type: live}\n")
    assert run_key(cfg) != before


# --------------------------------------------------------------------------- end to end, tiny


def one_run(tmp_path, *overrides: str) -> dict:
    args = ["method=ti", "model=tiny", f"paths.results={tmp_path / 'results'}", "train.progress=false"]
    args += ["train.profile_steps=0", "train.max_steps=1", *overrides]
    (record,) = run_sweep_in_process(args)
    assert record["status"] == "ok", record.get("error")
    return record


def test_own_subject_end_to_end(tmp_path, own_root):
    record = one_run(
        tmp_path, "subject=mydog", f"data.root={own_root}", "data.class_noun=dog", "data.subject_type=live"
    )
    assert record["subject"] == "mydog" and record["dataset"] == "dreambooth"
    assert record["data_root"] == str((own_root / "mydog").resolve())


def test_custom_dataset_sweeps_its_subjects_and_the_report_names_it(tmp_path, custom_root):
    from benchmark.report.tables import provenance

    args = ["method=ti", "model=tiny", f"paths.results={tmp_path / 'results'}", "train.progress=false"]
    args += ["train.profile_steps=0", "train.max_steps=1", "dataset=custom", f"data.root={custom_root}"]
    records = run_sweep_in_process([*args, "subject=rex,mug"])
    assert sorted(r["subject"] for r in records) == ["mug", "rex"]
    assert all(r["status"] == "ok" and r["dataset"] == "custom" for r in records)
    mug = next(r for r in records if r["subject"] == "mug")
    scored = json.loads(
        (tmp_path / "results" / "runs" / "ti" / "mug" / mug["run_key"] / "images" / "scores.json").read_text()
    )
    assert [p.split(" ", 2)[2] for p in scored["prompts"].values()] == ["on a desk", "in the rain"]
    report = build_report(["experiment=table1", *args, "subject=rex,mug"])
    assert "Dataset: custom." in provenance(report)
    assert dataset_names(report) == "custom"  # the gallery's title


def test_customconcept101_end_to_end(tmp_path, cc101_root):
    record = one_run(tmp_path, "dataset=customconcept101", f"data.root={cc101_root}", "subject=pet_dog1")
    assert record["subject"] == "pet_dog1" and record["dataset"] == "customconcept101"


def test_dreambenchpp_end_to_end(tmp_path, dreambenchpp_root):
    record = one_run(tmp_path, "dataset=dreambenchpp", f"data.root={dreambenchpp_root}", "subject=animal_1")
    assert record["subject"] == "animal_1" and record["dataset"] == "dreambenchpp"
    run_dir = run_dir_for(
        compose(
            [
                "method=ti",
                "model=tiny",
                f"paths.results={tmp_path / 'results'}",
                "train.max_steps=1",
                "dataset=dreambenchpp",
                f"data.root={dreambenchpp_root}",
                "subject=animal_1",
            ]
        )
    )
    assert run_dir.name.endswith(record["data_images"])


def test_all_subjects_of_a_dataset_for_a_sweep(custom_root, capsys):
    assert datasets.main(["custom", str(custom_root)]) == 0
    assert capsys.readouterr().out.strip() == "rex,mug"
    assert datasets.main(["custom", str(custom_root / "nowhere")]) == 2
