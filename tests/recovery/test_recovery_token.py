"""Known-answer personalization, the token teacher (docs/recovery.md, "Token arms"): its own fit settings
(``recovery.token_*``), which leave the weight teachers' fit as it is; the contrast images C of
the token fit; the cross-attention gain; one teacher and one fitted base for all token arms."""

from __future__ import annotations

import pytest
import torch

from benchmark import data, models
from benchmark.config import method_config
from benchmark.recovery.run import (
    amplify_cross_attention,
    joint_token_states,
    other_class_image_paths,
    prepare,
    prompt_states,
    recovery_config,
)
from benchmark.recovery.teacher import RecoveryConfig
from methods.common.base import ConfigError
from tests.conftest import compose

pytestmark = pytest.mark.integration

# One fit step on 2 + 2 draws: the machinery, not the measurement.
SMALL_FIT = [
    "experiment=recovery",
    "recovery.token_fit_steps=1",
    "recovery.token_teacher_steps=0",
    "recovery.fit_batch=2",
    "recovery.class_images=4",
]


def test_token_fit_settings_are_checked_and_leave_the_weight_teachers_alone():
    with pytest.raises(ConfigError, match=r"recovery.token_class_images='dogs'; choose one of"):
        RecoveryConfig(token_class_images="dogs")
    with pytest.raises(ConfigError, match=r"recovery.token_fit_batch=0 must be >= 1"):
        RecoveryConfig(token_fit_batch=0)
    with pytest.raises(ConfigError, match=r"recovery.token_attention_gain=-1.0 must be >= 0"):
        RecoveryConfig(token_attention_gain=-1.0)
    with pytest.raises(ConfigError, match=r"recovery.token_teacher_steps=-1 must be >= 0"):
        RecoveryConfig(token_teacher_steps=-1)
    with pytest.raises(
        ConfigError, match=r"recovery.token_teacher_steps=60 needs recovery.token_joint_fit=true"
    ):
        RecoveryConfig(token_teacher_steps=60, token_joint_fit=False)
    rc = RecoveryConfig(
        fit_steps=100, fit_lr=3e-3, teacher_steps=60,
        token_fit_steps=30, token_fit_lr=1e-2, token_fit_batch=4, token_teacher_steps=7, token_joint_fit=True,
    )  # fmt: skip
    token = rc.for_teacher("token")
    assert (token.fit_steps, token.fit_lr, token.fit_batch, token.teacher_steps) == (30, 1e-2, 4, 7)
    assert rc.for_teacher("lora") is rc and rc.for_teacher("scales") is rc  # untouched
    unset = RecoveryConfig(fit_steps=100, teacher_steps=60).for_teacher("token")
    assert (unset.fit_steps, unset.fit_lr, unset.fit_batch, unset.teacher_steps) == (
        100,
        1e-3,
        8,
        60,
    )  # null: shared


def test_other_class_images_are_every_other_class_in_turn(dataset_root):
    dog6 = data.subject_image_paths(dataset_root, "dog6")
    chosen = other_class_image_paths(dog6, data.get_subject("dog6"), 100)
    classes = [data.get_subject(p.parent.name).class_noun for p in chosen]
    assert "dog" not in classes
    first_round = [p.parent.name for p in chosen[:22]]
    assert len(set(first_round)) == 22  # the 22 subjects that are no dog, one image each first


def test_amplify_cross_attention_scales_only_the_cross_attention_output():
    unet = models.build_from_config(compose(["model=tiny"]).model).unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    amplify_cross_attention(unet, 3.0)
    after = unet.state_dict()
    scaled = [k for k in after if "attn2.to_out.0" in k]
    assert scaled and all(torch.allclose(after[k], 3 * before[k]) for k in scaled)
    assert all(torch.equal(after[k], before[k]) for k in after if k not in scaled)


def test_token_arms_share_one_teacher_and_one_fitted_base(tmp_path, dataset_root):
    """The teacher is drawn around e0 in fp32 whatever the method's precision, and the fit reads
    the token's text states unquantized: TI, GF-TI and ZOODiP get the same teacher and base."""
    settings = {}
    for arm in ("ti", "zoodip", "gfti"):
        cfg = compose([*SMALL_FIT, f"+experiment/recovery={arm}", f"data.root={dataset_root}",
                       f"paths.results={tmp_path}"])  # fmt: skip
        subject = data.get_subject(cfg.subject)
        paths = data.subject_image_paths(dataset_root, subject)
        settings[arm] = prepare(
            cfg, recovery_config(cfg), method_config(cfg), subject, paths, torch.device("cpu")
        )
    ti = settings["ti"]
    assert ti.base_key is not None and ti.fit_losses is not None  # fitted once, by the first arm
    for arm in ("zoodip", "gfti"):
        assert settings[arm].base_key == ti.base_key and settings[arm].fit_losses is None  # cached
        assert torch.equal(settings[arm].teacher["<sks>"], ti.teacher["<sks>"])


def test_joint_fit_states_are_the_installed_tokens_and_pass_gradients_to_it():
    """recovery.token_joint_fit: the teacher's text states as a function of its token equal the
    states with the token put in the pipeline, and the fit's gradient reaches the token."""
    cfg = compose(["experiment=recovery", "+experiment/recovery=ti"])
    method_cfg, prompt = method_config(cfg), "a photo of <sks>"
    token = {"<sks>": 0.1 * torch.randn(1, 32, generator=torch.Generator().manual_seed(0))}
    states = joint_token_states(cfg, method_cfg, token, prompt, "cpu")
    hidden = states()
    expected = prompt_states(cfg, method_cfg, "token", token, prompt, "cpu")
    assert torch.allclose(hidden, expected, rtol=0, atol=1e-5)  # fp32 states of unit scale
    hidden[0, 5:].sum().backward()  # the positions after the token read it (causal attention)
    assert states.token.grad is not None and states.token.grad.abs().sum() > 0


def test_token_teacher_steps_move_only_the_teacher_token(tmp_path, dataset_root):
    """recovery.token_teacher_steps: after the joint fit, steps of the teacher token alone on S:
    the fitted U-Net is bit-identical to the one without them, the teacher token has moved."""
    settings = {}
    for steps in (0, 2):
        cfg = compose([*SMALL_FIT, "+experiment/recovery=ti", f"recovery.token_teacher_steps={steps}",
                       f"data.root={dataset_root}", f"paths.results={tmp_path / str(steps)}"])  # fmt: skip
        subject = data.get_subject(cfg.subject)
        paths = data.subject_image_paths(dataset_root, subject)
        settings[steps] = prepare(
            cfg, recovery_config(cfg), method_config(cfg), subject, paths, torch.device("cpu")
        )
    without, with_steps = settings[0], settings[2]
    assert len(without.fit_losses) == 1 and len(with_steps.fit_losses) == 3
    assert without.base_key != with_steps.base_key  # cached apart
    unet_a, unet_b = without.components.unet.state_dict(), with_steps.components.unet.state_dict()
    assert all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    assert not torch.equal(without.teacher["<sks>"], with_steps.teacher["<sks>"])
