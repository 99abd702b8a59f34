"""Known-answer personalization (experiment=recovery): the teacher, the scores, one run per
teacher kind end to end on the tiny model, and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmark import data, models
from benchmark.models import set_posterior_logvar
from benchmark.recovery.fit import JointTeacher, fit_key, install_reference, teacher_weights
from benchmark.recovery.run import (
    IMAGES_NAME,
    TEACHER_NAME,
    class_image_paths,
    fitted,
    recovery_config,
    split_images,
)
from benchmark.recovery.teacher import (
    RecoveryConfig,
    apply_error,
    curve_steps,
    gap_closed,
    heldout_loss,
    heldout_scores,
    install,
    lora_teacher,
    scale_factors,
    scales_teacher,
    token_scores,
    token_teacher,
)
from benchmark.run import run
from benchmark.schema import validate
from methods.common.base import ConfigError
from methods.ti import TextualInversion
from tests.conftest import compose, set_up_method

pytestmark = pytest.mark.integration

# A run small enough for CI: 2 steps, a 2-step fit of the base, 8 held-out draws (the machinery,
# not the measurement: that is `nox -s recovery`).
SMALL = [
    "experiment=recovery", "model=tiny_recovery", "train.max_steps=2", "recovery.curve_points=3",
    "recovery.heldout_draws=8", "recovery.draw_batch=8", "recovery.fit_steps=2", "recovery.fit_batch=2",
    "recovery.class_images=4", "recovery.teacher_steps=1", "recovery.token_fit_steps=2",
    "recovery.token_teacher_steps=1",
]  # fmt: skip
# fit_steps=0: no fit, the images made by the model with the teacher in place (2 of each, 2 sampler steps)
GENERATED = [
    "recovery.fit_steps=0",
    "recovery.train_images=2",
    "recovery.heldout_images=2",
    "recovery.generation_steps=2",
]


def test_token_teacher_is_drawn_from_the_seed_at_the_set_distance():
    e0 = {"<sks>": torch.randn(1, 32, generator=torch.Generator().manual_seed(0))}
    a, b, c = token_teacher(e0, 3, 0.5), token_teacher(e0, 3, 0.5), token_teacher(e0, 4, 0.5)
    assert torch.equal(a["<sks>"], b["<sks>"]) and not torch.equal(a["<sks>"], c["<sks>"])
    ratio = (a["<sks>"] - e0["<sks>"]).norm() / e0["<sks>"].norm()
    assert ratio.item() == pytest.approx(0.5, rel=1e-5)  # fp32 rounding of a float64 draw


def test_scales_teacher_keeps_tuneqdm_sets_equal_and_delta_in_at_one():
    unet = models.build_from_config(compose(["model=tiny"]).model).unet
    factors = scale_factors(unet, 0, 0.1)
    again, other = scale_factors(unet, 0, 0.1), scale_factors(unet, 1, 0.1)
    assert all(torch.equal(factors[k], again[k]) for k in factors)  # drawn from the seed
    assert not any(torch.equal(factors[k], other[k]) for k in factors)
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert sorted(factors) == sorted(f"{n}.weight" for n in layers)
    name = layers[0]
    out = unet.get_submodule(name).weight.shape[0]
    assert factors[f"{name}.weight"].shape == (out,)
    assert (factors[f"{name}.weight"] - 1).abs().max() < 0.6  # 0.1 N(0,1): 6 sigma
    initial = {
        f"{name}.delta_out": torch.rand(4, out) + 0.5,  # TuneQDM: 4 timestep sets
        f"{name}.delta_in": torch.ones(4, 3),
        f"{layers[1]}.scale": torch.rand(unet.get_submodule(layers[1]).weight.shape[0]) + 0.5,  # PEQA
    }
    teacher = scales_teacher(initial, factors)
    ratio = teacher[f"{name}.delta_out"] / initial[f"{name}.delta_out"]
    assert torch.allclose(ratio, factors[f"{name}.weight"].expand_as(ratio), rtol=1e-6)  # every set
    assert torch.equal(teacher[f"{name}.delta_in"], initial[f"{name}.delta_in"])
    peqa_ratio = teacher[f"{layers[1]}.scale"] / initial[f"{layers[1]}.scale"]
    assert torch.allclose(peqa_ratio, factors[f"{layers[1]}.weight"], rtol=1e-6)


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


# The method's apply of the teacher against the teacher put in directly, on the tiny model
# (random weights): measured 0 for TI, 6e-4 for PEQA and TuneQDM, 1.4e-3 for ZOODiP, 1.8e-3 for
# GF-TI (their quantized U-Net; GF-TI's fp16 text encoder). An apply that puts in half of the
# change scores about 0.25.
APPLY_ERROR = 0.02


@pytest.mark.parametrize("method_name", ["ti", "peqa"])  # every arm: recovery_apply_error in its run
def test_the_methods_apply_of_the_teacher_matches_the_teacher_put_in_directly(method_name):
    """The teacher's change of the noise predictions through the method's own ``apply`` equals
    the change of the teacher written into the embedding table / multiplied into the weights;
    an apply that drops every other layer's scales (or half the token's move) does not."""
    cfg = compose(["model=tiny", f"method={method_name}"])
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    method = set_up_method(cfg, images, 1)
    kind = method.teacher_kind
    initial = {k: v.detach().float().clone() for k, v in method.state_dict().items()}
    if kind == "token":
        change = teacher = token_teacher(initial, 0, 1.0)
        faulty = {k: (initial[k] + teacher[k]) / 2 for k in teacher}
    else:
        change = scale_factors(models.load_pipeline(cfg.model).unet, 0, 0.1)
        teacher = scales_teacher(initial, change)
        faulty = {k: initial[k] if i % 2 else v for i, (k, v) in enumerate(sorted(teacher.items()))}
    prompt = "a photo of " + method.subject_phrase(data.get_subject("dog6"))
    rc = RecoveryConfig(heldout_draws=8, draw_batch=8)

    def predictions(put) -> torch.Tensor:
        pipeline = models.load_pipeline(cfg.model)
        put(pipeline)
        return heldout_scores(pipeline, images, prompt, 0, rc)[1]

    def put_reference(state):
        return lambda pipeline: state and install_reference(pipeline, kind, state, "<sks>")

    reference = predictions(put_reference(change)) - predictions(
        put_reference(initial if kind == "token" else {})
    )

    def applied(artifact) -> torch.Tensor:
        return predictions(lambda pipeline: method.apply(pipeline, artifact))

    start = applied(initial)
    assert apply_error(applied(teacher) - start, reference) < APPLY_ERROR
    assert apply_error(applied(faulty) - start, reference) > 5 * APPLY_ERROR


def test_recovery_config_refuses_bad_values(tiny_cfg):
    with pytest.raises(ConfigError, match=r"recovery.heldout_draws=0 must be >= 1"):
        validate(tiny_cfg(*SMALL, "+experiment/recovery=ti", "recovery.heldout_draws=0"))
    with pytest.raises(ConfigError, match=r"recovery.*nope"):
        validate(tiny_cfg(*SMALL, "+experiment/recovery=ti", "+recovery.nope=1"))
    with pytest.raises(ConfigError, match=r"recovery.holdout_images=1 needs the fitted base"):
        validate(
            tiny_cfg(*SMALL, "+experiment/recovery=ti", "+recovery.holdout_images=1", "recovery.fit_steps=0")
        )
    with pytest.raises(
        ConfigError, match=r"recovery.holdout_images=5: the subject has 5 images; hold out 1 to 4"
    ):
        split_images(torch.zeros(5, 3, 8, 8), 5)


@pytest.fixture(scope="session")
def arm_run(tmp_path_factory, dataset_root):
    """(cfg, record) of one small run of an arm, run once per session: the runs are the slow part,
    and the end-to-end test and the report test read the same one."""
    done = {}

    def get(arm: str, extra: list[str]):
        key = (arm, tuple(extra))
        if key not in done:
            results = tmp_path_factory.mktemp(f"recovery_{arm}") / "results"
            base = [
                "model=tiny",
                f"data.root={dataset_root}",
                f"paths.results={results}",
                "train.progress=false",
            ]
            cfg = compose([*base, *SMALL, f"+experiment/recovery={arm}", *extra])
            done[key] = cfg, run(cfg)
        return done[key]

    return get


@pytest.mark.parametrize(
    "arm, extra",
    [("ti", []), ("peqa", GENERATED)],  # token (fitted), scales (generated); LoRA-shaped fitted:
)  # tests/recovery/test_recovery_weights.py
def test_one_run_per_teacher_kind_records_its_curve(arm_run, dataset_root, arm, extra):
    cfg, record = arm_run(arm, extra)
    assert record["status"] == "ok", record["error"]
    (run_dir,) = Path(cfg.paths.results).glob("runs/*/dog6/*")
    assert record["curve_step"] == [0, 1, 2]
    assert {len(record[k]) for k in record if k.startswith("curve_")} == {3}
    assert record["recovery_gap"] == record["recovery_loss_initial"] - record["recovery_loss_teacher"]
    assert record["curve_loss"][0] == record["recovery_loss_initial"]
    assert record["curve_prediction_distance"][0] == 1.0  # the start, relative to itself
    assert record["recovery_loss"] == record["curve_loss"][-1]
    # scored on the trained model, not the start: two steps move both the loss and the prediction
    assert record["recovery_loss"] != record["recovery_loss_initial"]
    assert record["curve_prediction_distance"][-1] != 1.0
    expected = gap_closed(
        record["recovery_loss"], record["recovery_loss_initial"], record["recovery_loss_teacher"]
    )
    assert record["recovery_gap_closed"] == expected
    # the last snapshot is the artifact a user would store
    artifact = load_file(str(run_dir / json.loads((run_dir / "trained.json").read_text())["artifact"]))
    last = load_file(str(run_dir / "snapshots" / "step0000002.safetensors"))
    assert artifact.keys() == last.keys() and all(torch.equal(artifact[k], last[k]) for k in artifact)
    images = load_file(str(run_dir / IMAGES_NAME))
    if extra:  # made by the teacher: two sets of 2
        assert record["recovery_base"] is None
        assert images["train"].shape == (2, 3, 64, 64) and not torch.equal(images["train"], images["heldout"])
    else:  # the subject's real images, held out = fresh draws on them; the base fitted and cached
        photos = data.load_images(data.subject_image_paths(dataset_root, "dog6"), 64)
        assert torch.equal(images["train"], photos) and torch.equal(images["heldout"], photos)
        assert (
            Path(cfg.paths.results) / "recovery_bases" / f"{record['recovery_base']}.safetensors"
        ).exists()
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


def test_holdout_images_are_never_trained_on_and_scored_beside(arm_run, dataset_root):
    """recovery.holdout_images=2: TI trains on the first 3 of dog6's 5 photos; the last 2 are
    scored as well, as their own gap closed, from the same start and teacher."""
    cfg, record = arm_run("ti", ["+recovery.holdout_images=2"])
    assert record["status"] == "ok", record["error"]
    (run_dir,) = Path(cfg.paths.results).glob("runs/*/dog6/*")
    photos = data.load_images(data.subject_image_paths(dataset_root, "dog6"), 64)
    images = load_file(str(run_dir / IMAGES_NAME))
    assert torch.equal(images["train"], photos[:3]) and torch.equal(images["heldout"], photos[:3])
    assert torch.equal(images["heldout_images"], photos[3:])
    assert record["recovery_heldout_images"] == 2
    assert record["curve_image_loss"][0] == record["recovery_image_loss_initial"]
    assert (
        record["recovery_image_loss"] != record["recovery_image_loss_initial"]
    )  # scored on the trained token
    assert record["recovery_image_loss_initial"] != record["recovery_loss_initial"]  # other images
    assert record["recovery_image_gap_closed"] == gap_closed(
        record["recovery_image_loss"],
        record["recovery_image_loss_initial"],
        record["recovery_image_loss_teacher"],
    )
    assert (
        record["recovery_image_gap"]
        == record["recovery_image_loss_initial"] - record["recovery_image_loss_teacher"]
    )


def test_report_draws_the_table_and_the_curves(arm_run, capsys):
    from benchmark.report.cli import main as report_main
    from benchmark.report.tables import report_dir

    cfg, record = arm_run("ti", [])
    assert record["status"] == "ok"
    args = [*SMALL, "+experiment/recovery=ti", "seed=0", f"data.root={cfg.data.root}"]
    args.append(f"paths.results={cfg.paths.results}")
    assert report_main(args) == 0
    out = report_dir(Path(cfg.paths.results), "recovery", args)
    assert out != Path(cfg.paths.results) / "recovery"  # narrowed: the full report stays untouched
    table = (out / "table.md").read_text()
    (row,) = [line for line in table.splitlines() if line.startswith("| TI |")]
    assert "| 1 / 1 |" in row
    assert (out / "curves.png").stat().st_size > 10_000
    assert not math.isnan(float(__import__("pandas").read_csv(out / "table.csv")["gap"][0]))


def test_teacher_weights_apply_the_teacher_functionally_and_pass_gradients():
    params = {
        "a.weight": torch.randn(3, 2, requires_grad=True),
        "c.weight": torch.randn(2, 2, 1, 1, requires_grad=True),
    }
    delta = {"a.weight": torch.ones(3, 2)}
    lora = teacher_weights(params, "lora", delta)
    assert set(lora) == {"a.weight"} and torch.equal(lora["a.weight"], params["a.weight"] + 1)
    factors = {"a.weight": torch.tensor([1.0, 2.0, 3.0]), "c.weight": torch.tensor([0.5, 1.0])}
    scaled = teacher_weights(params, "scales", factors)
    assert torch.equal(scaled["a.weight"], params["a.weight"] * torch.tensor([[1.0], [2.0], [3.0]]))  # rows
    assert torch.equal(scaled["c.weight"][0], params["c.weight"][0] * 0.5)
    assert teacher_weights(params, "token", {"<sks>": torch.ones(1, 2)}) == {}  # the text states carry it
    scaled["a.weight"].sum().backward()  # the fit trains W through W (+) teacher
    assert torch.equal(params["a.weight"].grad, factors["a.weight"][:, None].expand(3, 2))


def test_joint_teacher_starts_at_the_draw_and_keeps_its_form():
    """The jointly fitted teacher: LoRA-shaped as rank-r factors whose product is the drawn
    delta W; scales as the factors themselves; gradients reach them through teacher_weights."""
    g = torch.Generator().manual_seed(0)
    delta = {"a.weight": (torch.randn(6, 2, generator=g) @ torch.randn(2, 5, generator=g))}
    lora = JointTeacher("lora", delta, rank=2, device="cpu")
    assert [tuple(p.shape) for p in lora.parameters()] == [(6, 2), (2, 5)]
    assert torch.allclose(
        lora.current()["a.weight"], delta["a.weight"], atol=1e-5
    )  # fp32 SVD of a rank-2 draw
    factors = {"a.weight": torch.tensor([0.9, 1.0, 1.1, 1.2, 0.8, 1.0])}
    scales = JointTeacher("scales", factors, rank=2, device="cpu")
    assert torch.equal(scales.current()["a.weight"], factors["a.weight"])
    params = {"a.weight": torch.randn(6, 5, generator=g)}
    teacher_weights(params, "lora", lora.current())["a.weight"].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters())


def test_recovery_model_has_a_deterministic_posterior_at_unit_scale(dataset_root):
    """tiny_recovery: the images reach the latents (a random VAE's posterior is noise, std ~1)."""
    cfg = compose(["experiment=recovery"])
    assert cfg.model.name == "tiny_recovery"
    vae = models.build_from_config(cfg.model).vae
    photos = data.load_images(data.subject_image_paths(dataset_root, "dog6"), 64)
    posterior = vae.encode(photos).latent_dist
    assert posterior.std.max().item() == pytest.approx(math.exp(-4.5), rel=1e-3)
    latent_std = (posterior.mean * vae.config.scaling_factor).std().item()
    assert 0.7 < latent_std < 1.4  # unit scale as SD's latents (scaling 4.05 from a std of 0.247)
    random_vae = models.build_from_config(compose(["model=tiny"]).model).vae
    assert random_vae.encode(photos).latent_dist.std.mean().item() > 0.5  # what tiny_recovery fixes
    set_posterior_logvar(random_vae, None)  # None leaves it as it is
    assert random_vae.encode(photos).latent_dist.std.mean().item() > 0.5


def test_class_images_are_the_other_subjects_of_the_class_in_turn(dataset_root):
    dog6 = data.subject_image_paths(dataset_root, "dog6")
    chosen = class_image_paths(dog6, data.get_subject("dog6"), 8)
    folders = [p.parent.name for p in chosen]
    assert folders == ["dog", "dog2", "dog3", "dog5", "dog7", "dog8", "dog", "dog2"]
    can = data.subject_image_paths(dataset_root, "can")  # the only can: every other subject
    others = {p.parent.name for p in class_image_paths(can, data.get_subject("can"), 100)}
    assert "can" not in others and len(others) == 29


def test_fitted_base_is_cached_by_its_inputs(tiny_cfg):
    """The fit changes the U-Net, is stored once under its key, and is read back, not refitted."""
    from benchmark.config import method_config
    from methods.common.registry import method_class

    cfg = tiny_cfg(*SMALL, "+experiment/recovery=dreambooth", "recovery.fit_steps=1")
    rc, method_cfg, subject = recovery_config(cfg), method_config(cfg), data.get_subject("dog6")
    paths, cls = data.subject_image_paths(cfg.data.root, subject), method_class("dreambooth")
    unet = models.load_components(cfg.model).unet
    change = lora_teacher(unet, 0, 4, 0.5)
    args = (
        cfg,
        rc,
        cls,
        method_cfg,
        subject,
        paths,
        "lora",
        change,
        {},
        "a photo of sks dog",
        torch.device("cpu"),
    )
    key, losses, state, teacher = fitted(*args)
    assert (
        losses is not None and len(losses) == 2 and all(map(math.isfinite, losses))
    )  # 1 joint + 1 teacher-only
    assert any(not torch.equal(state[k], v) for k, v in unet.state_dict().items())
    # fit_teacher (default): the teacher was fitted with W from the draw, and stays rank 4
    assert teacher.keys() == change.keys() and any(not torch.equal(teacher[k], change[k]) for k in change)
    assert all(torch.linalg.matrix_rank(d.double(), rtol=1e-5).item() <= 4 for d in teacher.values())
    again_key, again_losses, again, again_teacher = fitted(*args)
    assert again_key == key and again_losses is None and all(torch.equal(again[k], state[k]) for k in state)
    assert all(torch.equal(again_teacher[k], teacher[k]) for k in teacher)
    assert fit_key([change]) != fit_key([lora_teacher(unet, 1, 4, 0.5)])  # another teacher, another base


def test_curves_draw_token_distance_on_a_log_scale_when_it_spans_10x(tmp_path, monkeypatch):
    """GF-TI's token goes 20-30x as far as its start: the token-distance panel turns
    logarithmic (the other arms stay readable), and the step axis says GF-TI's is a generation."""
    import matplotlib.figure
    import pandas as pd

    from benchmark.report.recovery import curves

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))

    def runs(far: float) -> pd.DataFrame:
        rows = [(arm, [1.0, 0.9, end]) for arm, end in (("ti", 0.95), ("gfti", far))]
        return pd.DataFrame(
            [{"recovery.arm": arm, "method": arm, "seed": 0, "state": "ok", "curve_step": [0, 5, 10],
              "curve_loss": [0.2, 0.19, 0.18], "curve_token_distance": distance}
             for arm, distance in rows]
        )  # fmt: skip

    for far, scale in ((26.0, "log"), (1.5, "linear")):
        saved.clear()
        curves(runs(far), tmp_path / "curves.png", {"gfti": "GF-TI (class-noun start)"})
        (fig,) = saved
        loss_ax, token_ax = fig.axes[:2]
        assert loss_ax.get_yscale() == "linear" and token_ax.get_yscale() == scale
        assert token_ax.get_xlabel() == "training step (GF-TI: generation)"
