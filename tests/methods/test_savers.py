"""The memory savers (methods/common/savers.py) on every backprop method: each checked by its
effect (half-precision frozen weights beside fp32 trained ones, an 8-bit optimizer state,
gradient buffers kept, activations not stored), not by its flag; the ones that do not apply
are refused in one line; the run key changes only when a saver is on."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmark import data
from benchmark.config import make_method, plain, run_key
from benchmark.memory.estimate import estimate
from benchmark.train import step_generator
from methods.common.base import ConfigError
from methods.common.registry import method_class, method_names
from methods.common.sampling import training_batch
from tests.conftest import compose, set_up_method

BACKPROP = tuple(n for n in method_names() if not method_class(n).gradient_free)
# selective: every step BP-low, so that each step backpropagates
ALWAYS_BP = {"selective": ("method.schedule=always_bp_low",)}


@pytest.fixture(scope="module")
def images(dataset_root):
    return data.load_images(data.subject_image_paths(dataset_root, data.get_subject("dog6")), 64)


def one_step(method, images, step):
    """Step ``step`` as the training loop draws it."""
    generator = step_generator(0, step)
    batch = training_batch(images, method.cfg.data, 0, step, method.cfg.batch_size, generator)
    return float(method.step(batch, step)["loss"])


def frozen_floats(method) -> list[torch.Tensor]:
    return [
        t
        for module in method.half_modules()
        for t in (*module.parameters(), *module.buffers())
        if t.is_floating_point() and not t.requires_grad and t.numel()
    ]


@pytest.mark.parametrize("name", BACKPROP)
def test_mixed_precision_keeps_trained_fp32_and_frozen_in_half(tiny_cfg, images, name):
    cfg = tiny_cfg(f"method={name}", "train.mixed_precision=bf16", *ALWAYS_BP.get(name, ()))
    method = set_up_method(cfg, images)
    trained = list(method.trainable_parameters().values())
    frozen = frozen_floats(method)
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert frozen and {t.dtype for t in frozen} == {torch.bfloat16}
    before = [p.detach().clone() for p in trained]
    frozen_before = [t.clone() for t in frozen]
    loss = one_step(method, images, 0)
    assert loss == loss  # not NaN
    assert any(not torch.equal(p, b) for p, b in zip(trained, before)), "nothing trained"
    assert all(torch.equal(t, b) for t, b in zip(frozen, frozen_before)), "a frozen weight moved"
    assert all(p.dtype == torch.float32 for p in trained)


def _first_update(tiny_cfg, images, *overrides):
    cfg = tiny_cfg("method=lora", "method.lr=1e-3", *overrides)
    method = set_up_method(cfg, images)
    params = list(method.trainable_parameters().values())
    before = [p.detach().clone() for p in params]
    loss = one_step(method, images, 0)
    return loss, torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)]), method


def test_fp16_scales_the_loss_and_unscales_before_clipping(tiny_cfg, images):
    """The fp16 step moves the LoRA as the fp32 step does (Adam's first step: about lr per
    entry with a gradient). Clipping the still-scaled gradient (x65536) shrinks the update by
    orders of magnitude; a loss not scaled back, likewise in the other direction."""
    loss32, update32, _ = _first_update(tiny_cfg, images)
    loss16, update16, method = _first_update(tiny_cfg, images, "train.mixed_precision=fp16")
    assert method.scaler is not None and method.scaler.get_scale() == 2.0**16
    assert abs(loss16 - loss32) < 0.05 * loss32  # fp16 activations: a percent-level difference
    cosine = torch.nn.functional.cosine_similarity(update16, update32, dim=0)
    assert cosine > 0.9
    assert 0.8 < update16.norm() / update32.norm() < 1.25


def test_a_run_with_fp16_and_8bit_adam_resumes_bit_identically(tiny_cfg, images):
    savers = ("train.mixed_precision=fp16", "method.optimizer=adamw8bit", "method.rank=64")
    cfg = tiny_cfg("method=lora", "method.lr=1e-3", *savers)  # rank 64: 8-bit moments (>= 4096 values)
    straight = set_up_method(cfg, images)
    for step in range(3):
        one_step(straight, images, step)
    first = set_up_method(cfg, images)
    for step in range(2):
        one_step(first, images, step)
    state = copy.deepcopy(first.checkpoint())
    assert "scaler" in state
    resumed = set_up_method(cfg, images)
    resumed.restore(state)
    one_step(resumed, images, 2)
    for k, p in straight.trainable_parameters().items():
        assert torch.equal(p, resumed.trainable_parameters()[k]), k


@pytest.mark.parametrize("name", ("dreambooth", "ti"))
def test_8bit_adamw_keeps_8bit_moments(tiny_cfg, images, name):
    cfg = tiny_cfg(f"method={name}", "method.optimizer=adamw8bit")
    method = set_up_method(cfg, images)
    before = {k: p.detach().clone() for k, p in method.trainable_parameters().items()}
    one_step(method, images, 0)
    big = [p for p in method.optimizer.state if p.numel() >= 4096]
    assert big
    for p in big:
        state = method.optimizer.state[p]
        assert state["state1"].dtype == state["state2"].dtype == torch.uint8
        moments = [state[k] for k in ("state1", "state2", "absmax1", "absmax2")]
        assert sum(m.nbytes for m in moments) < 2.1 * p.numel()  # fp32 AdamW: 8 bytes per value
    changed = [k for k, p in method.trainable_parameters().items() if not torch.equal(p, before[k])]
    assert changed


def test_set_grads_to_none_false_keeps_the_gradient_buffers(tiny_cfg, images):
    cfg = tiny_cfg("method=lora", "train.set_grads_to_none=false")
    method = set_up_method(cfg, images)
    one_step(method, images, 0)
    grads = [p.grad for p in method.trainable_parameters().values()]
    assert all(g is not None and not g.any() for g in grads)
    default = set_up_method(tiny_cfg("method=lora"), images)
    one_step(default, images, 0)
    assert all(p.grad is None for p in default.trainable_parameters().values())


@pytest.mark.parametrize("name", ("dreambooth", "ti", "hollowed"))
def test_gradient_checkpointing_gives_the_same_gradients(tiny_cfg, images, name):
    """Recomputing activations in backward changes no number (fp32, the same kernels)."""
    grads = []
    for checkpointing in ("false", "true"):
        cfg = tiny_cfg(f"method={name}", f"train.gradient_checkpointing={checkpointing}")
        method = set_up_method(cfg, images)
        seen: dict[int, torch.Tensor] = {}

        def keep(optimizer, args, kwargs, seen=seen):
            params = optimizer.param_groups[0]["params"]
            seen.update({i: p.grad.clone() for i, p in enumerate(params) if p.grad is not None})

        method.optimizer.register_step_pre_hook(keep)
        one_step(method, images, 0)
        grads.append(seen)
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for i, g in grads[0].items():
        torch.testing.assert_close(grads[1][i], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()) + 1e-12)


def _predicted(*overrides) -> object:
    return estimate(compose(["model=tiny", *overrides]))


@pytest.mark.parametrize("name", ("lora", "hollowed"))  # diffusers' checkpointing; Hollowed Net's own
def test_gradient_checkpointing_lowers_the_backward_peak(name):
    """The activations stored for backward are what checkpointing drops (predicted on the tiny
    model at 256 px, where they are large beside its weights); the forward runs twice."""
    size = "method.resolution=256"
    plain = _predicted(f"method={name}", size)
    checkpointed = _predicted(f"method={name}", size, "train.gradient_checkpointing=true")
    assert checkpointed.phase_peak_bytes["backward"] < 0.85 * plain.phase_peak_bytes["backward"]
    assert checkpointed.predicted_step_flops > 1.1 * plain.predicted_step_flops


def test_predicted_savers_effects_on_dreambooth():
    plain = _predicted("method=dreambooth")
    eight_bit = _predicted("method=dreambooth", "method.optimizer=adamw8bit")
    assert eight_bit.breakdown["optimizer_state"] < 0.35 * plain.breakdown["optimizer_state"]
    per_tensor = _predicted("method=dreambooth", "train.foreach=false")
    assert per_tensor.phase_peak_bytes["optimizer"] < plain.phase_peak_bytes["optimizer"]
    kept = _predicted("method=dreambooth", "train.set_grads_to_none=false")
    assert kept.phase_breakdown["forward"]["gradients"] > 0.9 * plain.breakdown["optimizer_state"] / 2
    half = _predicted("method=lora", "train.mixed_precision=fp16")
    assert (
        half.breakdown["weights_fp16"] > 0
        and half.breakdown["weights_fp32"] < 0.05 * half.breakdown["weights_fp16"]
    )


def test_dreambooth_trains_the_text_encoder_and_its_artifact_carries_it(tiny_cfg, images):
    from benchmark import models

    cfg = tiny_cfg("method=dreambooth", "method.lr=1e-3", "method.train_text_encoder=true")
    method = set_up_method(cfg, images)
    encoder = method.c.text_encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    one_step(method, images, 0)
    moved = [k for k, v in encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert moved
    artifact = method.state_dict()
    assert any(k.startswith("text_encoder.") for k in artifact)
    pipeline = models.load_components(cfg.model).pipeline()
    method.apply(pipeline, artifact)
    for k, v in encoder.state_dict().items():
        assert torch.equal(pipeline.text_encoder.state_dict()[k], v), k

    frozen = set_up_method(tiny_cfg("method=dreambooth", "method.lr=1e-3"), images)
    kept = {k: v.clone() for k, v in frozen.c.text_encoder.state_dict().items()}
    one_step(frozen, images, 0)
    assert all(torch.equal(v, kept[k]) for k, v in frozen.c.text_encoder.state_dict().items())
    assert not any(k.startswith("text_encoder") for k in frozen.state_dict())


@pytest.mark.parametrize(
    "overrides, words",
    [
        (("method=zoodip", "train.gradient_checkpointing=true"), ("train.gradient_checkpointing", "zoodip")),
        (("method=gfti", "train.mixed_precision=bf16"), ("train.mixed_precision", "gfti")),
        (("method=lora", "method.optimizer=adamw8bit", "train.foreach=true"), ("train.foreach", "adamw8bit")),
        (("method=lora", "train.mixed_precision=fp8"), ("'fp8'", "no, fp16, bf16")),
        (("method=ti", "method.optimizer=sgd"), ("method.optimizer='sgd'", "adamw8bit")),
    ],
)
def test_a_saver_that_does_not_apply_is_refused_in_one_line(tiny_cfg, overrides, words):
    from benchmark.schema import validate

    cfg = tiny_cfg(*overrides)
    for check in (lambda: validate(cfg), lambda: make_method(cfg)):
        with pytest.raises(ConfigError) as e:
            check()
        message = str(e.value)
        assert "\n" not in message and all(w in message for w in words), message


def test_the_run_key_changes_only_with_a_saver_on(tiny_cfg):
    default = tiny_cfg("method=lora")
    spelled = tiny_cfg(
        "method=lora",
        "train.mixed_precision=no",
        "train.gradient_checkpointing=false",
        "method.optimizer=adamw",
    )
    assert run_key(default) == run_key(spelled)
    without_keys = copy.deepcopy(plain(default))
    for key in ("mixed_precision", "gradient_checkpointing", "set_grads_to_none", "foreach"):
        del without_keys["train"][key]
    del without_keys["method"]["optimizer"]
    assert run_key(without_keys) == run_key(default)  # a config without the saver keys
    keys = {
        run_key(tiny_cfg("method=lora", o))
        for o in ("train.mixed_precision=bf16", "method.optimizer=adamw8bit")
    }
    assert run_key(default) not in keys and len(keys) == 2
