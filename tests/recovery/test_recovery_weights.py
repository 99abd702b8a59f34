"""Known-answer personalization, the weight arms: every weight arm (the methods and the
comparison arms Hollowed Net at fraction 0.5, selective without ZO-high steps), run once on the
tiny model with a fitted base and a jointly fitted teacher, closes at least 0.8 of what it closed
on the same seed (an arm whose learning halves fails), and the paired arms keep their order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmark.recovery.teacher import gap_closed
from benchmark.run import run
from tests.conftest import OnDemand, compose

# xdist_group: one worker runs the fixture once
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("recovery_weights")]

# The CI configuration is the full version's (the arms' yamls and recovery/_weights.yaml: a
# 40-step joint fit, 60 teacher-only steps, 20 training steps at each arm's recovery lr, 32
# held-out draws) at one seed; the margins come from seeds 0-7 of it (docs/recovery.md, "Weight arms"):
#   python -m benchmark -m experiment=recovery '+experiment/recovery=<the 8 arms>' seed=0,1,2,3,4,5,6,7 \
#       data.root=../shared/dreambooth/dataset paths.results=<dir>
SEED = 0
# arm: (the seed-0 fraction of the gap closed at step 20, the bound's share of it, the greatest
# prediction distance to the teacher or None). Seed 0 (the whole run of 2026-12-07, one thread,
# the arms' defaults; the weight arms' rows agree across runs and machines to 0.002): DreamBooth
# 1.58, QLoRA 0.38, PEQA 0.92, TuneQDM 0.83, Hollowed f0 0.42, f0.5 0.40 (lora_scope=all; 0.39 with
# exact), selective 0.43 (zo_lr 3e-3; 0.44 with 1e-3), without ZO-high 0.51. The bound: 0.8 of it
# (an arm whose learning halves fails). The distance: the greatest over seeds 0-7 plus a margin
# (QLoRA 0.80, PEQA 0.50, TuneQDM 0.82, Hollowed 0.79 / 0.85, selective 0.80 / 0.74; below
# 1: the predictions moved toward the teacher's). DreamBooth (every weight) can leave the
# teacher's predictions behind while it fits S better than the teacher (distance 1.15 on one
# seed): no distance bound.
SHARE = 0.8
MARGINS = {
    "dreambooth": (1.58, None),
    "qlora": (0.38, 0.9),
    "peqa": (0.92, 0.65),
    "tuneqdm": (0.83, 0.92),
    "hollowed_f0": (0.42, 0.9),
    "hollowed_f05": (0.40, 0.95),
    "hollowed_f05_exact": (0.385, None),  # a comparison arm: LoRA on the layers after the cut only
    "selective": (0.43, 0.9),
    "selective_bp_only": (0.51, 0.85),
}
# The method's apply of the scales teacher against its factors multiplied into the weights
# (recovery_apply_error; PEQA and TuneQDM quantize the base: not exact). The LoRA-shaped teacher
# is put in by adding its delta to the weights for every arm (teacher.install): nothing to check.
APPLY_ERROR = 0.02
# (better, worse): held on every one of seeds 0-7 in the whole run of 2026-12-07, by 0.011-0.097
# (Hollowed, f0.5 with its default lora_scope=all; docs/recovery.md) and 0.040-0.186 (selective,
# its default zo_lr 3e-3) of the gap; on seed 0, the CI seed: 0.023 and 0.080.
ORDERINGS = [("hollowed_f0", "hollowed_f05"), ("selective_bp_only", "selective")]


@pytest.fixture(scope="session")  # session: never torn down between modules on a worker
def weight_runs(tmp_path_factory, dataset_root):
    """{arm: (cfg, record)}: each weight arm run once when first read, one results folder (the
    fits are shared: one for the LoRA-shaped teacher, one for the scales teacher)."""
    results = tmp_path_factory.mktemp("recovery_weights") / "results"

    def make(key: str):
        arm, _, lean = key.partition("+")
        cfg = compose(
            ["experiment=recovery", f"+experiment/recovery={arm}", f"seed={SEED}",
             f"data.root={dataset_root}", f"paths.results={results}", "train.progress=false",
             "train.profile_steps=0", *(LEANEST if lean else ())]
        )  # fmt: skip
        return cfg, run(cfg)

    return OnDemand(make)


@pytest.mark.parametrize("arm", list(MARGINS))
def test_every_weight_arm_closes_a_real_part_of_the_gap(weight_runs, arm):
    _, record = weight_runs[arm]
    assert record["status"] == "ok", record["error"]
    assert record["recovery_gap"] > 0.01 * record["recovery_loss_initial"]  # a gap worth closing
    seed0, most_distance = MARGINS[arm]
    assert record["recovery_gap_closed"] > SHARE * seed0, record["curve_gap_closed"]
    if record["teacher_kind"] == "scales":
        assert record["recovery_apply_error"] < APPLY_ERROR  # the method's apply puts the teacher in
    if most_distance is not None:
        assert record["recovery_prediction_distance"] < most_distance


# The leanest standard setting (methods/common/savers.py): fp16 autocast with the frozen weights
# in fp16 and a loss scale, activations recomputed in backward, 8-bit AdamW moments.
LEANEST = ("train.mixed_precision=fp16", "train.gradient_checkpointing=true", "method.optimizer=adamw8bit")


@pytest.mark.parametrize("arm", ["dreambooth", "peqa"])  # LoRA's path: tests/methods/test_savers.py
def test_weight_arms_close_their_gap_with_the_leanest_savers(weight_runs, arm):
    """Full fine-tuning and scale tuning (its own autograd layer under autocast) learn as in
    fp32: the same bound, and within 0.2 of the fp32 run's fraction on the same seed."""
    _, lean = weight_runs[f"{arm}+lean"]
    _, full = weight_runs[arm]
    assert lean["status"] == "ok", lean["error"]
    assert lean["train.mixed_precision"] == "fp16" and lean["method.optimizer"] == "adamw8bit"
    assert lean["recovery_gap_closed"] > SHARE * MARGINS[arm][0], lean["curve_gap_closed"]
    assert abs(lean["recovery_gap_closed"] - full["recovery_gap_closed"]) < 0.2


@pytest.mark.parametrize("better, worse", ORDERINGS)
def test_the_paired_arms_keep_the_order_measured_on_every_seed(weight_runs, better, worse):
    """Hollowed Net: the whole U-Net's LoRA (fraction 0) closes more than the kept layers' (0.5);
    selective: BP-low only closes more than with ZO-high steps, at 20 steps."""
    closed = {arm: weight_runs[arm][1]["recovery_gap_closed"] for arm in (better, worse)}
    assert closed[better] > closed[worse], closed


def test_a_fitted_weight_run_records_its_curve_and_artifact(weight_runs, dataset_root):
    """The fitted LoRA-shaped path end to end: curve, artifact = last snapshot, the subject's
    photos as images, the base and its fitted teacher cached, the rerun reads the record."""
    from benchmark import data

    cfg, record = weight_runs["hollowed_f05"]
    run_dir = Path(cfg.paths.results) / "runs" / "hollowed" / "dog6" / record["run_key"]
    assert record["curve_step"] == [0, 10, 20]
    assert {len(record[k]) for k in record if k.startswith("curve_")} == {3}
    assert record["curve_loss"][0] == record["recovery_loss_initial"]
    assert record["curve_prediction_distance"][0] == 1.0
    assert record["recovery_gap_closed"] == gap_closed(
        record["recovery_loss"], record["recovery_loss_initial"], record["recovery_loss_teacher"]
    )
    artifact = load_file(str(run_dir / json.loads((run_dir / "trained.json").read_text())["artifact"]))
    last = load_file(str(run_dir / "snapshots" / "step0000020.safetensors"))
    assert artifact.keys() == last.keys() and all(torch.equal(artifact[k], last[k]) for k in artifact)
    images = load_file(str(run_dir / "recovery_images.safetensors"))
    photos = data.load_images(data.subject_image_paths(dataset_root, "dog6"), 64)
    assert torch.equal(images["train"], photos) and torch.equal(images["heldout"], photos)
    bases = Path(cfg.paths.results) / "recovery_bases"
    assert (bases / f"{record['recovery_base']}.safetensors").exists()
    assert (bases / f"{record['recovery_base']}.teacher.safetensors").exists()
    # the LoRA-shaped arms share one fit and its teacher; PEQA and TuneQDM share the scales one
    keys = {arm: weight_runs[arm][1]["recovery_base"] for arm in MARGINS}
    assert keys["peqa"] == keys["tuneqdm"] != keys["dreambooth"]
    assert len({keys[a] for a in keys if a not in ("peqa", "tuneqdm")}) == 1
    assert run(cfg)["run_key"] == record["run_key"]  # done: the rerun reads the record


def test_report_pairs_arms_over_shared_seeds():
    """The paired rows: a − b per seed over the seeds where both ran ok, with n."""
    import pandas as pd

    from benchmark.report.recovery import paired

    rows = [
        ("selective", 0, 0.5, 0.7), ("selective_bp_only", 0, 0.25, 0.8),
        ("selective", 1, 0.75, 0.6), ("selective_bp_only", 1, 0.25, 0.8),
        ("selective", 2, 0.9, 0.5),  # no partner: not counted
    ]  # fmt: skip
    runs = pd.DataFrame(
        [{"recovery.arm": a, "seed": s, "state": "ok", "recovery_gap_closed": g,
          "recovery_prediction_distance": d} for a, s, g, d in rows]
    )  # fmt: skip
    spec = recovery_report_spec()
    pairs, arms = spec["pairs"], spec["arms"]
    (line,) = [line for line in paired(runs, pairs, arms) if line.startswith("| selective")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "selective BP-low / ZO-high − selective, BP-low only"  # display names
    assert cells[2].startswith("+0.375 [") and cells[3].startswith("-0.150")
    # beside the bootstrap's, the t interval: +0.375 ± 12.706 · 0.177 / √2 (diffs 0.25, 0.5)
    assert " t [-1.213, +1.963]" in cells[2]
    assert cells[4] == "2 / 2" and cells[5] == "2"  # seeds where a closed more, of n
    assert not [line for line in paired(runs, pairs, arms) if line.startswith("| Hollowed")]  # no such runs


def recovery_report_spec() -> dict:
    """The ``report`` section of conf/experiment/recovery.yaml (arm names, paired questions)."""
    from omegaconf import OmegaConf

    from benchmark.sweep.plan import primary_config

    return OmegaConf.to_container(primary_config(["experiment=recovery"]).report, resolve=True)
