"""benchmark.models: the tiny model, the SD1.5 architecture (under FakeTensorMode), hub errors."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may touch the network

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmark.models import (
    Components,
    WeightsUnavailable,
    build_from_config,
    build_pipeline,
    load_components,
    load_pipeline,
)

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


def model_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def text_states(components: Components, prompt: str) -> torch.Tensor:
    ids = components.tokenizer(
        [prompt], padding="max_length", max_length=components.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    return components.text_encoder(ids.to(components.device))[0]


@pytest.fixture(scope="module")
def tiny() -> Components:
    return load_components(model_cfg("tiny"))


def test_configs_name_their_kind():
    assert {n: model_cfg(n).kind for n in ("sd15", "tiny", "sd15_arch")} == {
        "sd15": "hub",
        "tiny": "tiny",
        "sd15_arch": "arch",
    }
    sd15 = model_cfg("sd15")
    assert sd15.hub_id == "stable-diffusion-v1-5/stable-diffusion-v1-5" and sd15.path is None
    assert sd15.resolution == 512 and model_cfg("tiny").resolution == 64


# -- tiny ------------------------------------------------------------------------------


def test_tiny_is_frozen_eval_and_small(tiny):
    assert tiny.device == torch.device("cpu") and tiny.dtype == torch.float32
    total = 0
    for module in (tiny.text_encoder, tiny.vae, tiny.unet):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
        assert {p.dtype for p in module.parameters()} == {torch.float32}
        total += sum(p.numel() for p in module.parameters())
    assert total < 5_000_000  # a few MB
    assert len(tiny.tokenizer) == 49408 and tiny.tokenizer.pad_token_id == 49407
    assert tiny.text_encoder.config.eos_token_id == tiny.tokenizer.eos_token_id == 49407
    assert tiny.vae.config.scaling_factor == pytest.approx(0.18215)
    sched = tiny.noise_scheduler.config
    assert (sched.num_train_timesteps, sched.beta_schedule, sched.prediction_type) == (
        1000,
        "scaled_linear",
        "epsilon",
    )
    assert (sched.beta_start, sched.beta_end, sched.clip_sample) == (0.00085, 0.012, False)


def test_tiny_weights_are_deterministic_and_leave_the_rng_alone(tiny):
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    again = build_from_config(model_cfg("tiny"))
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG was not consumed
    for name in ("text_encoder", "vae", "unet"):
        a, b = getattr(tiny, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    other = build_from_config(model_cfg("tiny", init_seed=1))
    assert not torch.equal(other.unet.conv_in.weight, tiny.unet.conv_in.weight)


def test_tiny_fp16_is_the_fp32_model_rounded(tiny):
    half = build_from_config(model_cfg("tiny"), torch.float16)
    assert half.unet.dtype == torch.float16
    assert torch.equal(half.unet.conv_in.weight, tiny.unet.conv_in.weight.half())


@torch.no_grad()
def test_tiny_unet_and_vae_shapes_and_size(tiny):
    states = text_states(tiny, "a photo of a sks dog")
    assert states.shape == (1, 77, 32)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = tiny.vae.encode(images).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    assert tiny.vae.decode(latents).sample.shape == (1, 3, 64, 64)
    out = tiny.unet(latents, torch.tensor([500]), states).sample
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    # "a few-MB model": what keeps the suite fast is its size (no wall-clock assertion)
    networks = ("unet", "vae", "text_encoder")
    sizes = {name: sum(p.numel() for p in getattr(tiny, name).parameters()) for name in networks}
    assert sum(sizes.values()) < 4_000_000, sizes  # 1.6 M of them the 49,408 x 32 token table


def test_tiny_unet_trains_when_unfrozen(tiny):
    unet = build_from_config(model_cfg("tiny")).unet.requires_grad_(True).train()
    with torch.no_grad():
        states = text_states(tiny, "a dog")
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 999]), states.expand(2, -1, -1)).sample
    out.square().mean().backward()
    assert unet.conv_in.weight.grad is not None and unet.conv_in.weight.grad.abs().sum() > 0


def test_tiny_pipeline_is_deterministic(tiny):
    pipe = build_pipeline(tiny)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.scheduler.config.skip_prk_steps
    assert pipe.safety_checker is None and pipe.vae_scale_factor == 8

    def run(seed: int) -> np.ndarray:
        gen = torch.Generator().manual_seed(seed)
        return pipe("a photo of a sks dog", num_inference_steps=2, output_type="np", generator=gen).images

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, 64, 64, 3) and np.isfinite(a).all()
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    pil = pipe("a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert pil.size == (64, 64)
    # A freshly loaded pipeline is the same model: same image.
    fresh = load_pipeline(model_cfg("tiny"))
    gen = torch.Generator().manual_seed(0)
    d = fresh("a photo of a sks dog", num_inference_steps=2, output_type="np", generator=gen).images
    assert np.array_equal(a, d)


def test_components_to_moves_and_records_device(tiny):
    comps = load_components(model_cfg("tiny"), device="cpu")
    assert comps.to("cpu") is comps and comps.device == torch.device("cpu")
    assert comps.unet.device == torch.device("cpu")


def test_unknown_kind_is_a_one_line_value_error():
    with pytest.raises(ValueError, match="model.kind='bogus'.*hub, tiny, arch") as err:
        load_components(OmegaConf.create({"name": "x", "kind": "bogus"}))
    assert "\n" not in str(err.value)


# -- SD1.5 architecture, never materialised -------------------------------------------


def test_sd15_arch_builds_under_fake_tensor_mode_with_sd15_parameter_counts():
    with FakeTensorMode():
        nets = build_from_config(model_cfg("sd15_arch"), torch.float16)
        counts = {n: sum(p.numel() for p in m.parameters()) for n, m in nets._asdict().items() if m}
        assert {p.dtype for p in nets.unet.parameters()} == {torch.float16}
        out = nets.unet(
            torch.randn(1, 4, 64, 64, dtype=torch.float16),
            torch.tensor([1]),
            torch.randn(1, 77, 768, dtype=torch.float16),
        ).sample
        assert out.shape == (1, 4, 64, 64)
    assert counts == {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
    assert nets.unet.config.sample_size == 64 and nets.vae.config.sample_size == 512
    assert nets.text_encoder.config.hidden_act == "quick_gelu"


# -- real weights: errors must be fast and one line -------------------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    return tmp_path


def test_hub_without_network_or_cache_fails_fast(offline, monkeypatch):
    """Fast = no network attempt at all (no timeouts, no retries); no wall-clock assertion."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError(f"network attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    cfg = model_cfg("sd15", hub_id="zo-bench-tests/no-such-model")
    with pytest.raises(WeightsUnavailable) as err:
        load_components(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert "'zo-bench-tests/no-such-model'" in message and "model.path=" in message


def test_path_that_is_not_a_diffusers_folder(offline):
    with pytest.raises(WeightsUnavailable) as err:
        load_components(model_cfg("sd15", path=str(offline)))
    message = str(err.value)
    assert "\n" not in message and str(offline) in message and "model_index.json" in message


def test_local_diffusers_folder_loads(offline, tiny):
    """A saved pipeline folder (what `hf download` gives for SD1.5) loads through the hub path."""
    folder = offline / "tiny-diffusers"
    build_pipeline(tiny).save_pretrained(folder)
    loaded = load_components(model_cfg("sd15", path=str(folder)))
    assert type(loaded.noise_scheduler).__name__ == "DDPMScheduler"
    assert loaded.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert not loaded.unet.training and not any(p.requires_grad for p in loaded.unet.parameters())
    for name in ("text_encoder", "vae", "unet"):
        a, b = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.tokenizer("a sks dog").input_ids == tiny.tokenizer("a sks dog").input_ids
