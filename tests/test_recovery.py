"""Known-answer personalization (experiment=recovery): the teacher, the scores, one run per
teacher kind end to end on the tiny model, and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmark import models
from benchmark.recovery import (
    RecoveryConfig,
    curve_steps,
    gap_closed,
    heldout_loss,
    install,
    lora_teacher,
    scales_teacher,
    token_scores,
    token_teacher,
)
from benchmark.recovery_run import IMAGES_NAME, TEACHER_NAME
from benchmark.run import run
from benchmark.schema import validate
from methods.base import ConfigError
from methods.textual_inversion import TextualInversion
from tests.conftest import compose

# A run small enough for CI: 2 steps, 2 images each, 8 held-out draws, 2 sampler steps.
SMALL = [
    "experiment=recovery", "train.max_steps=2", "recovery.curve_points=3", "recovery.train_images=2",
    "recovery.heldout_images=2", "recovery.heldout_draws=8", "recovery.draw_batch=8",
    "recovery.generation_steps=2",
]  # fmt: skip


def test_token_teacher_is_drawn_from_the_seed_at_the_set_distance():
    e0 = {"<sks>": torch.randn(1, 32, generator=torch.Generator().manual_seed(0))}
    a, b, c = token_teacher(e0, 3, 0.5), token_teacher(e0, 3, 0.5), token_teacher(e0, 4, 0.5)
    assert torch.equal(a["<sks>"], b["<sks>"]) and not torch.equal(a["<sks>"], c["<sks>"])
    ratio = (a["<sks>"] - e0["<sks>"]).norm() / e0["<sks>"].norm()
    assert ratio.item() == pytest.approx(0.5, rel=1e-5)  # fp32 rounding of a float64 draw


def test_scales_teacher_keeps_tuneqdm_sets_equal_and_delta_in_at_one():
    initial = {
        "a.delta_out": torch.rand(4, 6) + 0.5,
        "a.delta_in": torch.ones(4, 3),
        "b.scale": torch.rand(5),
    }
    teacher = scales_teacher(initial, 0, 0.1)
    factor = teacher["a.delta_out"] / initial["a.delta_out"]
    assert torch.allclose(factor, factor[:1].expand_as(factor))  # one timestep-independent factor
    assert not torch.allclose(factor, torch.ones_like(factor))
    assert torch.equal(teacher["a.delta_in"], initial["a.delta_in"])
    assert (teacher["b.scale"] / initial["b.scale"] - 1).abs().max() < 0.6  # 0.1 N(0,1): 6 sigma


def test_lora_teacher_is_low_rank_with_the_set_relative_norm():
    unet = models.build_from_config(compose(["model=tiny"]).model).unet
    deltas = lora_teacher(unet, seed=0, rank=2, scale=0.5)
    assert deltas and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for k in deltas)
    for name, delta in deltas.items():
        weight = unet.get_parameter(name)
        assert delta.shape == weight.shape
        assert torch.linalg.matrix_rank(delta.double(), rtol=1e-5).item() <= 2  # fp32-rounded rank 2
        assert (delta.norm() / weight.norm()).item() == pytest.approx(0.5, rel=1e-4)


def test_gap_closed_and_curve_steps():
    assert gap_closed(1.0, 1.0, 0.8) == 0.0
    assert gap_closed(0.8, 1.0, 0.8) == 1.0
    assert gap_closed(0.9, 1.0, 0.8) == pytest.approx(0.5)
    assert gap_closed(0.9, 1.0, 1.0) is None and gap_closed(0.9, 1.0, 1.1) is None  # no gap to close
    assert curve_steps(200, 5) == [0, 50, 100, 150, 200]
    assert curve_steps(2, 5) == [0, 1, 2]


def test_token_scores_known_values():
    e0, teacher = {"t": torch.tensor([[1.0, 0.0]])}, {"t": torch.tensor([[0.0, 1.0]])}
    assert token_scores(e0, e0, teacher) == {"token_cosine": 0.0, "token_distance": 1.0}
    assert token_scores(teacher, e0, teacher) == {"token_cosine": 1.0, "token_distance": 0.0}


def test_heldout_loss_sees_the_teacher_and_repeats_bit_for_bit():
    """Common random numbers: the same draws for every model. The teacher installed through
    the method's own apply changes the loss; scoring twice gives the same number."""
    cfg = compose(["model=tiny", "method=ti"])
    rc = RecoveryConfig(heldout_draws=8, draw_batch=8)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    method = TextualInversion(TextualInversion.Config(name="ti", steps=1, lr=0.0, resolution=64))

    def loss(token):
        pipeline = models.load_pipeline(cfg.model)
        install(pipeline, method, "token", {"<sks>": token})
        return heldout_loss(pipeline, images, "a photo of <sks>", 0, rc)

    e0 = torch.zeros(1, 32)
    far = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))
    assert loss(e0) == loss(e0)
    assert loss(far) != loss(e0)


def test_recovery_config_refuses_bad_values(tiny_cfg):
    with pytest.raises(ConfigError, match=r"recovery.heldout_draws=0 must be >= 1"):
        validate(tiny_cfg(*SMALL, "+experiment/recovery=ti", "recovery.heldout_draws=0"))
    with pytest.raises(ConfigError, match=r"recovery.*nope"):
        validate(tiny_cfg(*SMALL, "+experiment/recovery=ti", "+recovery.nope=1"))


@pytest.mark.parametrize("arm", ["ti", "peqa", "hollowed_f05"])  # token, scales, LoRA-shaped teachers
def test_one_run_per_teacher_kind_records_its_curve(tiny_cfg, arm):
    cfg = tiny_cfg(*SMALL, f"+experiment/recovery={arm}")
    record = run(cfg)
    assert record["status"] == "ok", record["error"]
    (run_dir,) = Path(cfg.paths.results).glob("runs/*/dog6/*")
    assert record["curve_step"] == [0, 1, 2]
    assert {len(record[k]) for k in record if k.startswith("curve_")} == {3}
    assert record["recovery_gap"] == record["recovery_loss_initial"] - record["recovery_loss_teacher"]
    assert record["curve_loss"][0] == record["recovery_loss_initial"]
    assert record["curve_prediction_distance"][0] == 1.0  # the start, relative to itself
    assert record["recovery_loss"] == record["curve_loss"][-1]
    expected = gap_closed(
        record["recovery_loss"], record["recovery_loss_initial"], record["recovery_loss_teacher"]
    )
    assert record["recovery_gap_closed"] == expected
    # the last snapshot is the artifact a user would store
    artifact = load_file(str(run_dir / json.loads((run_dir / "trained.json").read_text())["artifact"]))
    last = load_file(str(run_dir / "snapshots" / "step0000002.safetensors"))
    assert artifact.keys() == last.keys() and all(torch.equal(artifact[k], last[k]) for k in artifact)
    images = load_file(str(run_dir / IMAGES_NAME))
    assert images["train"].shape == (2, 3, 64, 64) and not torch.equal(images["train"], images["heldout"])
    if arm == "ti":
        teacher, start = (
            load_file(str(run_dir / TEACHER_NAME)),
            load_file(str(run_dir / "snapshots/step0000000.safetensors")),
        )
        cosine = torch.nn.functional.cosine_similarity(
            teacher["<sks>"].double(), start["<sks>"].double()
        ).item()
        assert record["curve_token_distance"][0] == 1.0
        assert record["curve_token_cosine"][0] == pytest.approx(cosine, abs=1e-12)
        assert record["curve_token_distance"][-1] != 1.0  # the token moved
    assert run(cfg)["run_key"] == record["run_key"]  # done: the rerun reads the record


def test_report_draws_the_table_and_the_curves(tiny_cfg, capsys):
    from benchmark.report import main as report_main

    cfg = tiny_cfg(*SMALL, "+experiment/recovery=ti")
    assert run(cfg)["status"] == "ok"
    args = [*SMALL, "+experiment/recovery=ti", "seed=0", "model=tiny", f"data.root={cfg.data.root}"]
    args.append(f"paths.results={cfg.paths.results}")
    assert report_main(args) == 0
    out = Path(cfg.paths.results) / "recovery"
    table = (out / "table.md").read_text()
    (row,) = [line for line in table.splitlines() if line.startswith("| ti |")]
    assert "| 1 / 1 |" in row
    assert (out / "curves.png").stat().st_size > 10_000
    assert not math.isnan(float(__import__("pandas").read_csv(out / "table.csv")["gap"][0]))
